//! timm checkpoints: safetensors files (or PyTorch's own `torch.save` files, read only) with
//! timm's key names and PyTorch's layouts.
//!
//! A model lists its parameters as [`Slot`](crate::nn::param::Slot)s: one stored tensor and every timm key that names it.
//! An unshared tensor has one key; a shared one has a key per layer that uses it, so a saved
//! shared model is an ordinary timm checkpoint (tied copies), and loading one into a shared model
//! checks that the copies agree.
mod io;
mod layout;
mod packed;
mod torch;

pub use io::{
    lookup, read_file, read_safetensors_header, read_tensors, write_atomic, write_file, Header, TensorMap,
};
pub use layout::{ml_spin_to_timm, Layout};
pub use torch::{is_torch_file, read_torch, torch_keys, TorchReport, NESTINGS};

use crate::base::SpinDtype;
use crate::error::Error;
use crate::models::{Plan, PLAN_KEY};
use crate::nn::param::TimmKeys;
use io::encode;
use packed::{pack, unpack};
use safetensors::tensor::{Dtype as StDtype, TensorView};
use std::collections::BTreeSet;
use std::path::Path;

/// The dtype tensors are stored in on disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StorageDtype {
    #[default]
    /// IEEE single precision (the default).
    F32,
    /// IEEE half precision; values beyond ±65504 are refused.
    F16,
    /// bfloat16: f32's range, 8 bits of mantissa.
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
///
/// ```
/// use spin_core::prelude::*;
///
/// #[vit(dim = 16, heads = 2, patch = 4, image = 8, classes = 3)]
/// #[shared_blocks(depth = 2, groups = 1, pattern = sequential)]
/// struct Tiny;
///
/// let dev = Cpu::seed_from_u64(1);
/// let path = std::env::temp_dir().join(format!("spin-doc-{}.safetensors", std::process::id()));
/// let a = dev.build_module::<Tiny, f32>();
/// a.save_timm(&path).unwrap(); // the shared blocks under both layers' timm keys
/// let mut b = Cpu::seed_from_u64(2).build_module::<Tiny, f32>();
/// b.load_timm(&path).unwrap();
/// assert_eq!(a.attn[0].qkv.weight.as_vec(), b.attn[0].qkv.weight.as_vec());
/// # std::fs::remove_file(path).unwrap();
/// ```
pub trait TimmCheckpoint {
    /// Loads a timm checkpoint (F32, F16, BF16 or F64 tensors), safetensors or PyTorch
    /// ([`TimmCheckpoint::load_checkpoint`]). Every model key must be present with its exact shape,
    /// no other key may be (BatchNorm's `num_batches_tracked` is ignored), and tied copies of a
    /// shared tensor must be equal. Nothing is changed on error.
    fn load_timm(&mut self, path: impl AsRef<Path>) -> Result<(), Error> {
        self.load_checkpoint(path).map(|_| ())
    }
    /// [`TimmCheckpoint::load_timm`], telling what was found: the format is detected from the
    /// file's first bytes — safetensors (whose spin plan, if any, is checked first) or a PyTorch
    /// file with the state dict at the top or under one of [`NESTINGS`].
    fn load_checkpoint(&mut self, path: impl AsRef<Path>) -> Result<LoadReport, Error>;
    /// Saves in timm's layout as F32.
    fn save_timm(&self, path: impl AsRef<Path>) -> Result<(), Error> {
        self.save_timm_as(path, StorageDtype::F32)
    }
    /// Saves in timm's layout in the given storage dtype, atomically (temporary file, then rename).
    fn save_timm_as(&self, path: impl AsRef<Path>, dtype: StorageDtype) -> Result<(), Error>;
}

impl<M: TimmKeys + Clone> TimmCheckpoint for M {
    fn load_checkpoint(&mut self, path: impl AsRef<Path>) -> Result<LoadReport, Error> {
        let path = path.as_ref();
        let (format, torch, tensors) = if is_torch_file(path)? {
            let (tensors, torch) = read_torch(path)?;
            ("pytorch", Some(torch), tensors)
        } else {
            let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
            check_plan(self, path, &bytes)?;
            ("safetensors", None, read_tensors(path, &bytes)?)
        };
        let count = tensors.len();
        let layout = Layout::detect(tensors.keys());
        let tensors = match layout {
            Layout::Timm => tensors,
            Layout::MlSpin => {
                let plan = self
                    .plan_json()
                    .map(|p| Plan::from_json(&p))
                    .transpose()
                    .map_err(Error::Invalid)?;
                let schedule = plan.map(|p| p.schedule).unwrap_or_default();
                ml_spin_to_timm(path, tensors, &schedule)?
            }
        };
        load_tensors(self, path, &tensors)?;
        Ok(LoadReport {
            format,
            layout,
            torch,
            tensors: count,
        })
    }

    fn save_timm_as(&self, path: impl AsRef<Path>, dtype: StorageDtype) -> Result<(), Error> {
        // Tensors are shared Arcs: the clone copies no data.
        save_keys(&mut self.clone(), path.as_ref(), dtype)
    }
}

/// What [`TimmCheckpoint::load_checkpoint`] read.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadReport {
    /// `safetensors` or `pytorch`.
    pub format: &'static str,
    /// The key names the file used (renamed to timm's to load).
    pub layout: Layout,
    /// For a PyTorch file: the nesting, skipped keys and stored dtypes.
    pub torch: Option<TorchReport>,
    /// Tensors read from the file.
    pub tensors: usize,
}

/// A checkpoint's header: for safetensors its keys and metadata, read without the tensors; for a
/// PyTorch file its state dict's floating keys (and no metadata).
pub fn read_header(path: &Path) -> Result<Header, Error> {
    if is_torch_file(path)? {
        return Ok(Header {
            keys: torch_keys(path)?.into_iter().collect(),
            metadata: Default::default(),
        });
    }
    read_safetensors_header(path)
}

/// Every tensor of a checkpoint, safetensors or PyTorch, by key.
pub fn read_any(path: &Path) -> Result<TensorMap, Error> {
    if is_torch_file(path)? {
        return Ok(read_torch(path)?.0);
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    read_tensors(path, &bytes)
}

/// Saves any model that lists its tensors (also behind `dyn TimmKeys`) in timm's layout, in the
/// given storage dtype, atomically: shared tensors under every key that names them, pruned ones as
/// values and bit masks.
pub fn save_keys<E: SpinDtype>(
    model: &mut dyn TimmKeys<Elem = E>,
    path: &Path,
    dtype: StorageDtype,
) -> Result<(), Error> {
    {
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
            let (shape, bits) = pack(&mask, cols);
            buffers.push((p.mask_key.clone(), shape, StDtype::U8, bits));
        }
        let views = buffers
            .iter()
            .map(|(k, shape, st, bytes)| {
                TensorView::new(*st, shape.clone(), bytes)
                    .map(|v| (k.clone(), v))
                    .map_err(|e| Error::Invalid(format!("{key}: {e}", key = k)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        // The plan travels with the tensors (PyTorch's loaders ignore metadata). One key, so the
        // header, and with it the file, is the same byte for byte for the same model.
        let metadata = model
            .plan_json()
            .map(|plan| std::collections::HashMap::from([(PLAN_KEY.to_string(), plan)]));
        let bytes = safetensors::tensor::serialize(views, &metadata).map_err(|e| Error::Safetensors {
            path: path.into(),
            reason: e.to_string(),
        })?;
        write_atomic(path, &bytes)
    }
}

/// The plan a checkpoint carries, if any (`bytes` is the file, `path` names it in errors).
pub fn read_plan(path: &Path, bytes: &[u8]) -> Result<Option<Plan>, Error> {
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| Error::Safetensors {
        path: path.into(),
        reason: e.to_string(),
    })?;
    plan_in(path, header.metadata().as_ref())
}

/// The plan in a checkpoint's metadata (from [`read_plan`] or [`read_header`]), if any.
pub fn plan_in(
    path: &Path,
    metadata: Option<&std::collections::HashMap<String, String>>,
) -> Result<Option<Plan>, Error> {
    metadata
        .and_then(|m| m.get(PLAN_KEY))
        .map(|p| {
            Plan::from_json(p)
                .map_err(|e| Error::Invalid(format!("{}: unreadable `{PLAN_KEY}`: {e}", path.display())))
        })
        .transpose()
}

/// Checks the plan a checkpoint carries (if any) against the model's: a mismatch is an error
/// naming the field, before any tensor is compared.
pub fn check_plan<M: TimmKeys + ?Sized>(model: &M, path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let (Some(file), Some(ours)) = (read_plan(path, bytes)?, model.plan_json()) else {
        return Ok(());
    };
    let ours = Plan::from_json(&ours).map_err(Error::Invalid)?;
    match ours.mismatch(&file) {
        None => Ok(()),
        Some((field, model_value, file_value)) => Err(Error::Invalid(format!(
            "{}: the checkpoint is {} with {field} = {file_value}, but {} has {field} = {model_value}",
            path.display(),
            file.name,
            ours.name
        ))),
    }
}

/// Loads `values` (read from `path`, which errors name) into `model` with [`TimmCheckpoint`]'s
/// checks; nothing is changed on error.
pub fn load_tensors<M: TimmKeys + Clone>(
    model: &mut M,
    path: &Path,
    values: &TensorMap,
) -> Result<(), Error> {
    {
        let slots = model.timm_slots();
        let mut updates = Vec::with_capacity(slots.len());
        let mut known = BTreeSet::new();
        for slot in slots.iter() {
            let dims = slot.tensor.dims();
            let mut first: Option<(&String, &[f64])> = None;
            for key in &slot.keys {
                known.insert(key.clone());
                let data = lookup(values, path, key, &dims)?;
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
        for p in model.packed_slots() {
            known.insert(p.values_key.clone());
            known.insert(p.mask_key.clone());
            packed_updates.push(unpack(path, values, &p)?);
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
        let mut loaded = model.clone();
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
        *model = loaded;
        Ok(())
    }
}
