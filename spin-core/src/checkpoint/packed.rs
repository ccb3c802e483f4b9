//! Pruned tensors on disk: their kept values and a bit mask.
use super::io::{lookup, TensorMap};
use crate::base::SpinDtype;
use crate::error::Error;
use crate::nn::param::PackedSlot;
use std::path::Path;

/// A packed slot's dense values and 0/1 mask from the file, checked against the slot's shape.
pub(super) fn unpack<E: SpinDtype>(
    path: &Path,
    file: &TensorMap,
    p: &PackedSlot<'_, E>,
) -> Result<(Vec<E>, Vec<E>), Error> {
    let dims = p.values.dims();
    let cols = *dims.last().unwrap_or(&1);
    let rows = dims.iter().product::<usize>() / cols.max(1);
    let per_row = cols.div_ceil(8);
    let bits = lookup(file, path, &p.mask_key, &[rows, per_row])?;
    let mut mask = vec![E::cast(0.0); rows * cols];
    for r in 0..rows {
        for j in 0..per_row {
            let byte = bits[r * per_row + j] as usize;
            for b in 0..8 {
                let c = 8 * j + b;
                if byte >> b & 1 == 1 {
                    if c >= cols {
                        return Err(Error::Invalid(format!(
                            "{}: `{}` sets a bit past column {cols}",
                            path.display(),
                            p.mask_key
                        )));
                    }
                    mask[r * cols + c] = E::cast(1.0);
                }
            }
        }
    }
    let nnz = mask.iter().filter(|m| m.as_f64() != 0.0).count();
    let kept = lookup(file, path, &p.values_key, &[nnz])?;
    let mut kept = kept.iter();
    let values = mask
        .iter()
        .map(|m| match m.as_f64() != 0.0 {
            true => E::cast(*kept.next().unwrap_or(&0.0)),
            false => E::cast(0.0),
        })
        .collect();
    Ok((values, mask))
}

/// A 0/1 mask `(rows, cols)` as bits: its shape on disk `(rows, ⌈cols / 8⌉)` and bytes, entry
/// `8j + b` of a row in bit b (least significant first) of byte j.
pub(super) fn pack<E: SpinDtype>(mask: &[E], cols: usize) -> (Vec<usize>, Vec<u8>) {
    let rows = mask.len() / cols.max(1);
    let per_row = cols.div_ceil(8);
    let mut bits = vec![0u8; rows * per_row];
    for (i, m) in mask.iter().enumerate() {
        if m.as_f64() != 0.0 {
            let (r, c) = (i / cols, i % cols);
            bits[r * per_row + c / 8] |= 1 << (c % 8);
        }
    }
    (vec![rows, per_row], bits)
}
