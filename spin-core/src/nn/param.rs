//! How a model exposes its tensors: as runtime-shaped views on a tape for the math, and as
//! [`Slot`]s under their checkpoint keys for loading, saving and fusion.
use crate::base::{Mat, SpinDtype};
use crate::device::SpinDevice;
use crate::error::Error;
use dfdx::prelude::*;
use dfdx::tensor::Tape;

/// A stored parameter as a runtime-shaped matrix `(rows, cols)` on the caller's tape. Reshaping a
/// contiguous tensor moves no data, and the gradient flows back to the stored tensor.
pub fn param2<S: Shape, E: SpinDtype, D: SpinDevice<E>, T: Tape<E, D>>(
    t: &Tensor<S, E, D>,
    rows: usize,
    cols: usize,
) -> Tensor<Mat, E, D, T> {
    t.retaped::<T>().reshape_like(&(rows, cols))
}

/// A stored parameter as a runtime-shaped vector on the caller's tape.
pub fn param1<S: Shape, E: SpinDtype, D: SpinDevice<E>, T: Tape<E, D>>(
    t: &Tensor<S, E, D>,
) -> Tensor<(usize,), E, D, T> {
    let n = t.shape().num_elements();
    t.retaped::<T>().reshape_like(&(n,))
}

/// One stored tensor as the checkpoint code sees it.
pub trait ParamSlot<E> {
    /// The tensor's shape.
    fn dims(&self) -> Vec<usize>;
    /// Its values, row-major.
    fn read(&self) -> Vec<E>;
    /// Overwrites its values (row-major, as many as it holds).
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
    /// Every key that names the tensor: one per layer that uses it.
    pub keys: Vec<String>,
    /// The tensor.
    pub tensor: &'a mut dyn ParamSlot<E>,
}

/// A pruned tensor and its 0/1 mask, both `(rows, cols)` in memory, stored compactly: under
/// `values_key` the kept entries in row-major order `(nnz,)`, under `mask_key` the mask as bits,
/// U8 `(rows, ⌈cols / 8⌉)`, entry `8j + b` of a row in bit b (least significant first) of byte j.
pub struct PackedSlot<'a, E> {
    /// The key of the kept values.
    pub values_key: String,
    /// The key of the bit mask.
    pub mask_key: String,
    /// The dense values (zero where pruned).
    pub values: &'a mut dyn ParamSlot<E>,
    /// The 0/1 mask.
    pub mask: &'a mut dyn ParamSlot<E>,
}

/// Lists a model's tensors under timm's names. Implemented by every spin model.
pub trait TimmKeys {
    /// The element type of the model's tensors.
    type Elem: SpinDtype;
    /// Every stored tensor with the keys that name it.
    fn timm_slots(&mut self) -> Vec<Slot<'_, Self::Elem>>;
    /// Pruned tensors stored as values and bit masks (FiPS's factors); none by default.
    fn packed_slots(&mut self) -> Vec<PackedSlot<'_, Self::Elem>> {
        Vec::new()
    }
    /// The model's plan as JSON (`crate::models::Plan`), written into every checkpoint and
    /// checked against a checkpoint's on loading; `None` for a model without one.
    fn plan_json(&self) -> Option<String> {
        None
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
