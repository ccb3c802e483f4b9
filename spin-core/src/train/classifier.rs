//! An f32 CPU model behind a trait object ([`Classifier`]): what the registry hands out, the
//! training loop drives and the command line uses, whatever the model's type.
use super::optim::AdamW;
use crate::base::Nchw;
use crate::checkpoint::{load_tensors, save_keys, LoadReport, StorageDtype, TensorMap, TimmCheckpoint};
use crate::data::Mix;
use crate::device::profile::{timed, Pass::Phase};
use crate::error::Error;
use crate::fusion::{fuse_into, tensor_map, FusionReport, Reduction};
use crate::models::{ModelInfo, SpinModel};
use dfdx::prelude::*;
use std::path::Path;

/// What one optimiser step saw.
#[derive(Clone, Copy, Debug)]
pub struct StepStats {
    /// The batch's mean loss.
    pub loss: f32,
    /// Images whose largest logit is at their label.
    pub correct: usize,
    /// The global gradient L2 norm before clipping.
    pub grad_norm: f32,
}

/// An f32 CPU model behind a trait object: what the registry hands out and the command line drives.
///
/// ```
/// use spin_core::prelude::*;
/// use spin_core::train::{AdamW, Classifier, Runner, StepParams};
///
/// #[convmixer(dim = 8, kernel = 3, patch = 2, image = 8, classes = 3, depth = 2)]
/// struct Tiny;
///
/// let dev = Cpu::default();
/// let mut model: Box<dyn Classifier> = Box::new(Runner::new(dev.build_module::<Tiny, f32>(), dev));
/// let images = vec![0.5f32; 2 * 3 * 8 * 8];
/// let hp = StepParams { lr: 1e-3, label_smoothing: 0.1, clip: Some(1.0) };
/// let step = model.train_step(&images, &[0, 2], None, &mut AdamW::new(0.05), &hp).unwrap();
/// assert!(step.loss.is_finite());
/// assert_eq!(model.predict(&images, 2).len(), 2 * 3);
/// ```
pub trait Classifier: Send {
    /// The model's description.
    fn info(&self) -> ModelInfo;
    /// Trainable parameters as the optimiser sees them (each shared tensor once).
    fn num_params(&self) -> usize;
    /// Logits `(batch, classes)`, flattened, for NCHW images at the model's size.
    fn predict(&self, images: &[f32], batch: usize) -> Vec<f32>;
    /// One training step: forward (training mode), label-smoothed cross-entropy (against the
    /// mixed targets when `mix` says how the batch was mixed), backward, clipping, AdamW.
    fn train_step(
        &mut self,
        images: &[f32],
        labels: &[usize],
        mix: Option<&Mix>,
        opt: &mut AdamW,
        hp: &StepParams,
    ) -> Result<StepStats, Error>;
    /// Loads a timm checkpoint (for a fusion-aware model: the unshared model to start from).
    fn load_timm(&mut self, path: &Path) -> Result<(), Error> {
        self.load_checkpoint(path).map(|_| ())
    }
    /// [`Classifier::load_timm`] from safetensors or a PyTorch file, telling what was read.
    fn load_checkpoint(&mut self, path: &Path) -> Result<LoadReport, Error>;
    /// Saves the deployable model (for a fusion-aware model: the exported shared model).
    fn save_timm(&self, path: &Path, dtype: StorageDtype) -> Result<(), Error>;
    /// The training-time tensors by checkpoint key (for a fusion-aware model, its unshared
    /// base's): what a run's resumable state holds.
    fn state_tensors(&self) -> TensorMap;
    /// Restores tensors given by [`Classifier::state_tensors`]; `source` names them in errors.
    fn load_state_tensors(&mut self, source: &Path, tensors: &TensorMap) -> Result<(), Error>;
    /// Fills this (shared) model from an unshared model's tensors by weight fusion.
    fn fuse_from(&mut self, source: &TensorMap, reduction: Reduction) -> Result<FusionReport, Error>;
    /// A training-mode forward pass and nothing else: BatchNorms normalise with the batch's
    /// statistics and move their running ones (no loss, no gradient, no step).
    fn forward_train_mode(&mut self, images: &[f32], batch: usize);
    /// Every block's output for NCHW images: one `batch × features` row-major matrix per block,
    /// each image's positions and channels flattened into its row (empty when the model has no
    /// blocks of its own).
    fn block_features(&self, images: &[f32], batch: usize) -> Vec<Vec<f32>>;
}

/// Per-step hyper-parameters.
#[derive(Clone, Copy, Debug)]
pub struct StepParams {
    /// Learning rate.
    pub lr: f32,
    /// Label smoothing ε.
    pub label_smoothing: f32,
    /// Clip the global gradient L2 norm to this value.
    pub clip: Option<f32>,
}

/// Holds a model and its gradient buffers.
pub struct Runner<M> {
    /// The model.
    pub model: M,
    grads: Option<Gradients<f32, Cpu>>,
    dev: Cpu,
}

impl<M: SpinModel<f32, Cpu>> Runner<M> {
    /// A runner for `model` on the CPU device `dev`.
    pub fn new(model: M, dev: Cpu) -> Self {
        Self {
            model,
            grads: None,
            dev,
        }
    }
}

fn images_tensor(dev: &Cpu, images: &[f32], batch: usize, classes_img: usize) -> Tensor<Nchw, f32, Cpu> {
    dev.tensor_from_vec(images.to_vec(), (batch, 3, classes_img, classes_img))
}

/// Loads every tensor of the checkpoint at `path` into `model` but the classifier's (`head.*`),
/// which keeps its initial values: the start of fine-tuning to another class count. Returns how
/// many tensors were loaded.
pub fn load_all_but_head(model: &mut dyn Classifier, path: &Path) -> Result<usize, Error> {
    let is_head = |k: &str| k.starts_with("head.");
    let mut tensors = crate::fusion::read_checkpoint(path)?;
    tensors.retain(|k, _| !is_head(k));
    let loaded = tensors.len();
    tensors.extend(model.state_tensors().into_iter().filter(|(k, _)| is_head(k)));
    model.load_state_tensors(path, &tensors)?;
    Ok(loaded)
}

/// Label-smoothed one-hot targets: (1 − ε)·onehot + ε/K.
pub fn smooth_targets(labels: &[usize], classes: usize, eps: f32) -> Vec<f32> {
    let mut t = vec![eps / classes as f32; labels.len() * classes];
    for (i, &l) in labels.iter().enumerate() {
        t[i * classes + l] += 1.0 - eps;
    }
    t
}

/// Smoothed targets of a batch, mixed as `mix` says: lam·own + (1 − lam)·partner's.
pub fn mixed_targets(labels: &[usize], mix: Option<&Mix>, classes: usize, eps: f32) -> Vec<f32> {
    let own = smooth_targets(labels, classes, eps);
    match mix {
        None => own,
        Some(m) => {
            let partner = smooth_targets(&m.partner, classes, eps);
            own.iter()
                .zip(partner)
                .map(|(a, b)| m.lam * a + (1.0 - m.lam) * b)
                .collect()
        }
    }
}

/// How many rows of `logits` have their maximum at the label.
pub fn count_correct(logits: &[f32], labels: &[usize]) -> usize {
    let k = logits.len() / labels.len().max(1);
    labels
        .iter()
        .enumerate()
        .filter(|&(i, &l)| {
            let row = &logits[i * k..(i + 1) * k];
            let arg = (0..k).fold(0, |best, j| if row[j] > row[best] { j } else { best });
            arg == l
        })
        .count()
}

impl<M: SpinModel<f32, Cpu> + Send + 'static> Classifier for Runner<M> {
    fn info(&self) -> ModelInfo {
        self.model.info()
    }
    fn num_params(&self) -> usize {
        self.model.num_trainable_params()
    }
    fn predict(&self, images: &[f32], batch: usize) -> Vec<f32> {
        let img = self.model.info().image;
        self.model
            .logits(images_tensor(&self.dev, images, batch, img))
            .as_vec()
    }
    fn train_step(
        &mut self,
        images: &[f32],
        labels: &[usize],
        mix: Option<&Mix>,
        opt: &mut AdamW,
        hp: &StepParams,
    ) -> Result<StepStats, Error> {
        let info = self.model.info();
        let batch = labels.len();
        let x = images_tensor(&self.dev, images, batch, info.image);
        let grads = self.grads.take().unwrap_or_else(|| self.model.alloc_grads());
        let (loss, correct) = timed("forward and loss", Phase, || {
            let logits = self.model.logits_mut(x.traced(grads));
            let correct = count_correct(&logits.as_vec(), labels);
            let targets = self.dev.tensor_from_vec(
                mixed_targets(labels, mix, info.classes, hp.label_smoothing),
                (batch, info.classes),
            );
            (cross_entropy_with_logits_loss(logits, targets), correct)
        });
        let loss_value = loss.array();
        let mut grads = timed("backward", Phase, || loss.backward());
        let grad_norm = timed("optimizer", Phase, || {
            if loss_value.is_finite() {
                opt.step_and_zero_grads(&mut self.model, &mut grads, hp.lr, hp.clip)
            } else {
                self.model.zero_grads(&mut grads);
                f32::NAN
            }
        });
        self.grads = Some(grads);
        Ok(StepStats {
            loss: loss_value,
            correct,
            grad_norm,
        })
    }
    fn load_checkpoint(&mut self, path: &Path) -> Result<LoadReport, Error> {
        TimmCheckpoint::load_checkpoint(&mut self.model, path)
    }
    fn save_timm(&self, path: &Path, dtype: StorageDtype) -> Result<(), Error> {
        save_keys(&mut *self.model.deployable()?, path, dtype)
    }
    fn state_tensors(&self) -> TensorMap {
        tensor_map(&self.model)
    }
    fn load_state_tensors(&mut self, source: &Path, tensors: &TensorMap) -> Result<(), Error> {
        load_tensors(&mut self.model, source, tensors)
    }
    fn forward_train_mode(&mut self, images: &[f32], batch: usize) {
        let img = self.model.info().image;
        let _ = self
            .model
            .logits_mut(images_tensor(&self.dev, images, batch, img));
    }
    fn fuse_from(&mut self, source: &TensorMap, reduction: Reduction) -> Result<FusionReport, Error> {
        fuse_into(&mut self.model, source, reduction, &|_, _| None)
    }
    fn block_features(&self, images: &[f32], batch: usize) -> Vec<Vec<f32>> {
        let img = self.model.info().image;
        // Rows are (image, position) pairs in image order, so each image's rows are contiguous.
        self.model
            .block_outputs(images_tensor(&self.dev, images, batch, img))
            .iter()
            .map(|t| t.as_vec())
            .collect()
    }
}
