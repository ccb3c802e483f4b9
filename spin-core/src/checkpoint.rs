//! timm checkpoints: safetensors files with timm's key names and PyTorch's layouts.
//!
//! A model lists its parameters as [`Slot`]s: one stored tensor and every timm key that names it.
//! An unshared tensor has one key; a shared one has a key per layer that uses it, so a saved
//! shared model is an ordinary timm checkpoint (tied copies), and loading one into a shared model
//! checks that the copies agree.
use crate::dtype::{SpinDevice, SpinDtype};
use crate::Error;
use dfdx::prelude::*;
use safetensors::tensor::{Dtype as StDtype, SafeTensors, TensorView};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// One stored tensor as the checkpoint code sees it.
pub trait ParamSlot<E> {
    fn dims(&self) -> Vec<usize>;
    fn read(&self) -> Vec<E>;
    fn write(&mut self, data: &[E]);
}

impl<S: Shape, E: SpinDtype, D: SpinDevice<E>> ParamSlot<E> for Tensor<S, E, D> {
    fn dims(&self) -> Vec<usize> {
        self.shape().concrete().into()
    }
    fn read(&self) -> Vec<E> {
        self.as_vec()
    }
    fn write(&mut self, data: &[E]) {
        self.copy_from(data)
    }
}

/// A stored tensor and the timm keys that name it.
pub struct Slot<'a, E> {
    pub keys: Vec<String>,
    pub tensor: &'a mut dyn ParamSlot<E>,
}

/// A pruned tensor and its 0/1 mask, both `(rows, cols)` in memory, stored compactly: under
/// `values_key` the kept entries in row-major order `(nnz,)`, under `mask_key` the mask as bits,
/// U8 `(rows, ⌈cols / 8⌉)`, entry `8j + b` of a row in bit b (least significant first) of byte j.
pub struct PackedSlot<'a, E> {
    pub values_key: String,
    pub mask_key: String,
    pub values: &'a mut dyn ParamSlot<E>,
    pub mask: &'a mut dyn ParamSlot<E>,
}

/// Lists a model's tensors under timm's names. Implemented by every spin model.
pub trait TimmKeys {
    type Elem: SpinDtype;
    fn timm_slots(&mut self) -> Vec<Slot<'_, Self::Elem>>;
    /// Pruned tensors stored as values and bit masks (FiPS's factors); none by default.
    fn packed_slots(&mut self) -> Vec<PackedSlot<'_, Self::Elem>> {
        Vec::new()
    }
    /// Checks what keys and shapes cannot (FiPS masks, group indices); called on a loaded copy
    /// before the model is replaced by it.
    fn check_loaded(&self) -> Result<(), Error> {
        Ok(())
    }
}

/// Appends the slots of one part entry: `names` are the part's tensors (`weight`, `bias`, …),
/// `prefixes` the timm prefixes of every layer that uses this entry.
pub fn push_slots<'a, E>(
    out: &mut Vec<Slot<'a, E>>,
    prefixes: &[String],
    tensors: Vec<(String, &'a mut dyn ParamSlot<E>)>,
) {
    for (name, tensor) in tensors {
        let keys = prefixes.iter().map(|p| format!("{p}.{name}")).collect();
        out.push(Slot { keys, tensor });
    }
}

/// The dtype tensors are stored in on disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StorageDtype {
    #[default]
    F32,
    F16,
    BF16,
    /// Full precision, for f64 models.
    F64,
}

impl std::str::FromStr for StorageDtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            "bf16" => Ok(Self::BF16),
            "f64" => Ok(Self::F64),
            _ => Err(Error::Invalid(format!(
                "unknown storage dtype `{s}`: use f32, f16, bf16 or f64"
            ))),
        }
    }
}

/// Loading and saving timm checkpoints; implemented for every model that lists its tensors.
pub trait TimmCheckpoint {
    /// Loads a timm safetensors checkpoint (F32, F16, BF16 or F64 tensors). Every model key must be
    /// present with its exact shape, no other key may be (BatchNorm's `num_batches_tracked` is
    /// ignored), and tied copies of a shared tensor must be equal. Nothing is changed on error.
    fn load_timm(&mut self, path: impl AsRef<Path>) -> Result<(), Error>;
    /// Saves in timm's layout as F32.
    fn save_timm(&self, path: impl AsRef<Path>) -> Result<(), Error> {
        self.save_timm_as(path, StorageDtype::F32)
    }
    /// Saves in timm's layout in the given storage dtype, atomically (temporary file, then rename).
    fn save_timm_as(&self, path: impl AsRef<Path>, dtype: StorageDtype) -> Result<(), Error>;
}

impl<M: TimmKeys + Clone> TimmCheckpoint for M {
    fn load_timm(&mut self, path: impl AsRef<Path>) -> Result<(), Error> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let values = read_tensors(path, &bytes)?;
        let slots = self.timm_slots();
        let mut updates = Vec::with_capacity(slots.len());
        let mut known = BTreeSet::new();
        for slot in slots.iter() {
            let dims = slot.tensor.dims();
            let mut first: Option<(&String, &Vec<f64>)> = None;
            for key in &slot.keys {
                known.insert(key.clone());
                let (found, data) = values.get(key).ok_or_else(|| Error::MissingKey {
                    path: path.into(),
                    key: key.clone(),
                    expected: dims.clone(),
                })?;
                if *found != dims {
                    return Err(Error::Shape {
                        path: path.into(),
                        key: key.clone(),
                        expected: dims.clone(),
                        found: found.clone(),
                    });
                }
                match first {
                    None => first = Some((key, data)),
                    Some((k0, d0)) => {
                        let max_diff = d0
                            .iter()
                            .zip(data)
                            .map(|(a, b)| (a - b).abs())
                            .fold(0.0, f64::max);
                        if max_diff > 0.0 {
                            return Err(Error::TiedDiffer {
                                path: path.into(),
                                first: k0.clone(),
                                other: key.clone(),
                                max_diff,
                            });
                        }
                    }
                }
            }
            let data = first.map(|(_, d)| d.iter().map(|&v| M::Elem::cast(v)).collect::<Vec<_>>());
            updates.push(data.unwrap_or_default());
        }
        drop(slots);
        let mut packed_updates = Vec::new();
        for p in self.packed_slots() {
            known.insert(p.values_key.clone());
            known.insert(p.mask_key.clone());
            packed_updates.push(unpack(path, &values, &p)?);
        }
        if let Some((key, (shape, _))) = values
            .iter()
            .find(|(k, _)| !known.contains(*k) && !k.ends_with("num_batches_tracked"))
        {
            return Err(Error::UnexpectedKey {
                path: path.into(),
                key: key.clone(),
                shape: shape.clone(),
            });
        }
        // Written into a copy (tensor storage is copy-on-write), kept only if it checks out.
        let mut loaded = self.clone();
        for (slot, data) in loaded.timm_slots().iter_mut().zip(updates) {
            if !slot.keys.is_empty() {
                slot.tensor.write(&data);
            }
        }
        for (p, (values, mask)) in loaded.packed_slots().into_iter().zip(packed_updates) {
            p.values.write(&values);
            p.mask.write(&mask);
        }
        loaded.check_loaded()?;
        *self = loaded;
        Ok(())
    }

    fn save_timm_as(&self, path: impl AsRef<Path>, dtype: StorageDtype) -> Result<(), Error> {
        let path = path.as_ref();
        let mut model = self.clone(); // tensors are shared Arcs: no data is copied
        let mut buffers: Vec<(String, Vec<usize>, StDtype, Vec<u8>)> = Vec::new();
        for slot in model.timm_slots() {
            let dims = slot.tensor.dims();
            let data: Vec<f64> = slot.tensor.read().into_iter().map(|v| v.as_f64()).collect();
            let first_key = slot.keys.first().cloned().unwrap_or_default();
            let (st, bytes) = encode(path, &first_key, &data, dtype)?;
            for key in &slot.keys {
                if let Some(bn) = key.strip_suffix(".running_mean") {
                    // timm's BatchNorm also saves a step counter; PyTorch accepts it either way.
                    buffers.push((
                        format!("{bn}.num_batches_tracked"),
                        vec![],
                        StDtype::I64,
                        0i64.to_le_bytes().to_vec(),
                    ));
                }
                buffers.push((key.clone(), dims.clone(), st, bytes.clone()));
            }
        }
        for p in model.packed_slots() {
            let (cols, mask) = (*p.mask.dims().last().unwrap_or(&1), p.mask.read());
            let kept: Vec<f64> = p
                .values
                .read()
                .iter()
                .zip(&mask)
                .filter(|(_, m)| m.as_f64() != 0.0)
                .map(|(v, _)| v.as_f64())
                .collect();
            let (st, bytes) = encode(path, &p.values_key, &kept, dtype)?;
            buffers.push((p.values_key.clone(), vec![kept.len()], st, bytes));
            let rows = mask.len() / cols.max(1);
            let per_row = cols.div_ceil(8);
            let mut bits = vec![0u8; rows * per_row];
            for (i, m) in mask.iter().enumerate() {
                if m.as_f64() != 0.0 {
                    let (r, c) = (i / cols, i % cols);
                    bits[r * per_row + c / 8] |= 1 << (c % 8);
                }
            }
            buffers.push((p.mask_key.clone(), vec![rows, per_row], StDtype::U8, bits));
        }
        let views = buffers
            .iter()
            .map(|(k, shape, st, bytes)| {
                TensorView::new(*st, shape.clone(), bytes)
                    .map(|v| (k.clone(), v))
                    .map_err(|e| Error::Invalid(format!("{key}: {e}", key = k)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let bytes = safetensors::tensor::serialize(views, &None).map_err(|e| Error::Safetensors {
            path: path.into(),
            reason: e.to_string(),
        })?;
        write_atomic(path, &bytes)
    }
}

/// A packed slot's dense values and 0/1 mask from the file, checked against the slot's shape.
fn unpack<E: SpinDtype>(
    path: &Path,
    file: &BTreeMap<String, (Vec<usize>, Vec<f64>)>,
    p: &PackedSlot<'_, E>,
) -> Result<(Vec<E>, Vec<E>), Error> {
    let dims = p.values.dims();
    let cols = *dims.last().unwrap_or(&1);
    let rows = dims.iter().product::<usize>() / cols.max(1);
    let per_row = cols.div_ceil(8);
    let get = |key: &str, expected: Vec<usize>| {
        file.get(key).ok_or_else(|| Error::MissingKey {
            path: path.into(),
            key: key.into(),
            expected,
        })
    };
    let (shape, bits) = get(&p.mask_key, vec![rows, per_row])?;
    if *shape != [rows, per_row] {
        return Err(Error::Shape {
            path: path.into(),
            key: p.mask_key.clone(),
            expected: vec![rows, per_row],
            found: shape.clone(),
        });
    }
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
    let (shape, kept) = get(&p.values_key, vec![nnz])?;
    if *shape != [nnz] {
        return Err(Error::Shape {
            path: path.into(),
            key: p.values_key.clone(),
            expected: vec![nnz],
            found: shape.clone(),
        });
    }
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

/// Writes a file so that a reader (or a crash) sees either the old file or the whole new one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp: PathBuf = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let result = (|| {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(|e| Error::io(path, e))
}

/// Every tensor of a safetensors file as (shape, values in f64).
pub fn read_tensors(path: &Path, bytes: &[u8]) -> Result<BTreeMap<String, (Vec<usize>, Vec<f64>)>, Error> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| Error::Safetensors {
        path: path.into(),
        reason: e.to_string(),
    })?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let data = decode(path, &name, &view)?;
        out.insert(name, (view.shape().to_vec(), data));
    }
    Ok(out)
}

fn decode(path: &Path, key: &str, view: &TensorView<'_>) -> Result<Vec<f64>, Error> {
    let b = view.data();
    let chunks = |n: usize| b.chunks_exact(n);
    Ok(match view.dtype() {
        StDtype::F32 => chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        StDtype::F64 => chunks(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        StDtype::F16 => chunks(2)
            .map(|c| half::f16::from_le_bytes(c.try_into().unwrap()).to_f64())
            .collect(),
        StDtype::BF16 => chunks(2)
            .map(|c| half::bf16::from_le_bytes(c.try_into().unwrap()).to_f64())
            .collect(),
        // Counters such as num_batches_tracked: readable, never loaded into a parameter.
        StDtype::I64 if key.ends_with("num_batches_tracked") => vec![],
        // Bit masks of packed slots, one byte per value.
        StDtype::U8 if key.ends_with(".mask") => b.iter().map(|&x| x as f64).collect(),
        other => {
            return Err(Error::Dtype {
                path: path.into(),
                key: key.into(),
                dtype: format!("{other:?}"),
            })
        }
    })
}

fn encode(path: &Path, key: &str, data: &[f64], dtype: StorageDtype) -> Result<(StDtype, Vec<u8>), Error> {
    Ok(match dtype {
        StorageDtype::F32 => (
            StDtype::F32,
            data.iter().flat_map(|&v| (v as f32).to_le_bytes()).collect(),
        ),
        StorageDtype::F16 => {
            if let Some(&v) = data
                .iter()
                .find(|v| v.is_finite() && v.abs() > half::f16::MAX.to_f64())
            {
                return Err(Error::Overflow {
                    path: path.into(),
                    key: key.into(),
                    value: v,
                    dtype: "f16".into(),
                });
            }
            (
                StDtype::F16,
                data.iter()
                    .flat_map(|&v| half::f16::from_f64(v).to_le_bytes())
                    .collect(),
            )
        }
        StorageDtype::BF16 => (
            StDtype::BF16,
            data.iter()
                .flat_map(|&v| half::bf16::from_f64(v).to_le_bytes())
                .collect(),
        ),
        StorageDtype::F64 => (StDtype::F64, data.iter().flat_map(|&v| v.to_le_bytes()).collect()),
    })
}
