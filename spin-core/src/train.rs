//! Training and evaluation on the CPU: AdamW with decoupled weight decay, SPIN's one-cycle learning
//! rate, label smoothing, clipping by global L2 norm, and an object-safe [`Classifier`] so a model
//! chosen by name at run time can be trained.
//!
//! The optimiser is spin's own rather than dfdx's `Adam`, whose moments are private: resuming a run
//! needs them saved and restored exactly.
use crate::checkpoint::{write_atomic, StorageDtype, TimmCheckpoint, TimmKeys};
use crate::conv::Nhwc;
use crate::data::Dataset;
use crate::describe::ModelInfo;
use crate::dtype::{SpinDevice, SpinDtype};
use crate::fusion::{fuse_into, FusionReport, Reduction, TensorMap};
use crate::layers::Mat;
use crate::Error;
use dfdx::nn::tensor_collection::{RecursiveWalker, TensorVisitor, ViewTensorMut, ViewTensorRef};
use dfdx::prelude::*;
use dfdx::tensor::Tape;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::path::Path;

/// A spin model with a runtime-shaped entry point (NCHW images in, logits out).
pub trait SpinModel<E: SpinDtype, D: SpinDevice<E>>:
    TensorCollection<E, D> + TimmKeys<Elem = E> + Clone
{
    fn info(&self) -> ModelInfo;
    /// Inference logits.
    fn logits<T: Tape<E, D> + Merge<T>>(&self, x: Tensor<Nhwc, E, D, T>) -> Tensor<Mat, E, D, T>;
    /// Training logits (BatchNorm uses and updates batch statistics).
    fn logits_mut<T: Tape<E, D> + Merge<T>>(&mut self, x: Tensor<Nhwc, E, D, T>) -> Tensor<Mat, E, D, T>;
    /// Saves the model one deploys: the model itself, or for a training-time wrapper (fusion-aware
    /// training) the plain model it exports.
    fn save_deployable(&self, path: &Path, dtype: StorageDtype) -> Result<(), Error> {
        TimmCheckpoint::save_timm_as(self, path, dtype)
    }
}

/// What one optimiser step saw.
#[derive(Clone, Copy, Debug)]
pub struct StepStats {
    pub loss: f32,
    pub correct: usize,
    pub grad_norm: f32,
}

/// An f32 CPU model behind a trait object: what the registry hands out and the command line drives.
pub trait Classifier: Send {
    fn info(&self) -> ModelInfo;
    fn num_params(&self) -> usize;
    /// Logits `(batch, classes)`, flattened, for NCHW images at the model's size.
    fn predict(&self, images: &[f32], batch: usize) -> Vec<f32>;
    /// One training step: forward (training mode), label-smoothed cross-entropy, backward,
    /// clipping, AdamW.
    fn train_step(
        &mut self,
        images: &[f32],
        labels: &[usize],
        opt: &mut AdamW,
        hp: &StepParams,
    ) -> Result<StepStats, Error>;
    /// Loads a timm checkpoint (for a fusion-aware model: the unshared model to start from).
    fn load_timm(&mut self, path: &Path) -> Result<(), Error>;
    /// Saves the deployable model (for a fusion-aware model: the exported shared model).
    fn save_timm(&self, path: &Path, dtype: StorageDtype) -> Result<(), Error>;
    /// Fills this (shared) model from an unshared model's tensors by weight fusion.
    fn fuse_from(&mut self, source: &TensorMap, reduction: Reduction) -> Result<FusionReport, Error>;
}

/// Per-step hyper-parameters.
#[derive(Clone, Copy, Debug)]
pub struct StepParams {
    pub lr: f32,
    pub label_smoothing: f32,
    pub clip: Option<f32>,
}

/// Holds a model and its gradient buffers.
pub struct Runner<M> {
    pub model: M,
    grads: Option<Gradients<f32, Cpu>>,
    dev: Cpu,
}

impl<M: SpinModel<f32, Cpu>> Runner<M> {
    pub fn new(model: M, dev: Cpu) -> Self {
        Self {
            model,
            grads: None,
            dev,
        }
    }
}

fn images_tensor(dev: &Cpu, images: &[f32], batch: usize, classes_img: usize) -> Tensor<Nhwc, f32, Cpu> {
    dev.tensor_from_vec(images.to_vec(), (batch, 3, classes_img, classes_img))
}

/// Label-smoothed one-hot targets: (1 − ε)·onehot + ε/K.
pub fn smooth_targets(labels: &[usize], classes: usize, eps: f32) -> Vec<f32> {
    let mut t = vec![eps / classes as f32; labels.len() * classes];
    for (i, &l) in labels.iter().enumerate() {
        t[i * classes + l] += 1.0 - eps;
    }
    t
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
        opt: &mut AdamW,
        hp: &StepParams,
    ) -> Result<StepStats, Error> {
        let info = self.model.info();
        let batch = labels.len();
        let x = images_tensor(&self.dev, images, batch, info.image);
        let grads = self.grads.take().unwrap_or_else(|| self.model.alloc_grads());
        let logits = self.model.logits_mut(x.traced(grads));
        let correct = count_correct(&logits.as_vec(), labels);
        let targets = self.dev.tensor_from_vec(
            smooth_targets(labels, info.classes, hp.label_smoothing),
            (batch, info.classes),
        );
        let loss = cross_entropy_with_logits_loss(logits, targets);
        let loss_value = loss.array();
        let mut grads = loss.backward();
        let grad_norm = if loss_value.is_finite() {
            opt.step(&mut self.model, &grads, hp.lr, hp.clip)
        } else {
            f32::NAN
        };
        self.model.zero_grads(&mut grads);
        self.grads = Some(grads);
        Ok(StepStats {
            loss: loss_value,
            correct,
            grad_norm,
        })
    }
    fn load_timm(&mut self, path: &Path) -> Result<(), Error> {
        TimmCheckpoint::load_timm(&mut self.model, path)
    }
    fn save_timm(&self, path: &Path, dtype: StorageDtype) -> Result<(), Error> {
        self.model.save_deployable(path, dtype)
    }
    fn fuse_from(&mut self, source: &TensorMap, reduction: Reduction) -> Result<FusionReport, Error> {
        fuse_into(&mut self.model, source, reduction, &|_, _| None)
    }
}

// ---------------------------------------------------------------------------------------------

/// AdamW (decoupled weight decay, as PyTorch's `AdamW`), with optional clipping of the global
/// gradient L2 norm. Weight decay skips 1-D tensors (biases and norm scales), as timm does.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamW {
    pub betas: (f32, f32),
    pub eps: f32,
    pub weight_decay: f32,
    /// Steps taken so far.
    pub t: u64,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl AdamW {
    pub fn new(weight_decay: f32) -> Self {
        Self {
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay,
            t: 0,
            m: vec![],
            v: vec![],
        }
    }

    /// One update of every trainable tensor of `model` from `grads`; returns the gradient norm
    /// before clipping.
    pub fn step<M: TensorCollection<f32, Cpu>>(
        &mut self,
        model: &mut M,
        grads: &Gradients<f32, Cpu>,
        lr: f32,
        clip: Option<f32>,
    ) -> f32 {
        let mut gather = Gather { grads, out: vec![] };
        let _ = M::iter_tensors(&mut RecursiveWalker {
            m: &*model,
            f: &mut gather,
        });
        let g = gather.out;
        let norm = g
            .iter()
            .flat_map(|v| v.iter())
            .map(|&x| (x as f64) * (x as f64))
            .sum::<f64>()
            .sqrt() as f32;
        let scale = match clip {
            Some(c) if norm > c => c / (norm + 1e-6),
            _ => 1.0,
        };
        if self.m.len() != g.len() {
            self.m = g.iter().map(|v| vec![0.0; v.len()]).collect();
            self.v = self.m.clone();
        }
        self.t += 1;
        let mut update = Update {
            opt: self,
            grads: &g,
            lr,
            scale,
            i: 0,
        };
        let _ = M::iter_tensors(&mut RecursiveWalker {
            m: model,
            f: &mut update,
        });
        norm
    }

    /// Saves the optimiser state (moments and step) with extra metadata, atomically.
    pub fn save(&self, path: &Path, meta: &[(&str, String)]) -> Result<(), Error> {
        use safetensors::tensor::{Dtype, TensorView};
        let bytes: Vec<(String, Vec<u8>)> = self
            .m
            .iter()
            .enumerate()
            .map(|(i, m)| (format!("m.{i:04}"), m))
            .chain(self.v.iter().enumerate().map(|(i, v)| (format!("v.{i:04}"), v)))
            .map(|(k, v)| (k, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
            .collect();
        let views = bytes
            .iter()
            .map(|(k, b)| {
                (
                    k.clone(),
                    TensorView::new(Dtype::F32, vec![b.len() / 4], b).unwrap(),
                )
            })
            .collect::<Vec<_>>();
        let mut md: std::collections::HashMap<String, String> =
            meta.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        md.insert("adamw.t".into(), self.t.to_string());
        md.insert("adamw.weight_decay".into(), self.weight_decay.to_string());
        let data = safetensors::tensor::serialize(views, &Some(md)).map_err(|e| Error::Safetensors {
            path: path.into(),
            reason: e.to_string(),
        })?;
        write_atomic(path, &data)
    }

    /// Restores state written by [`AdamW::save`]; returns its metadata.
    pub fn load(path: &Path) -> Result<(Self, std::collections::HashMap<String, String>), Error> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let bad = |reason: String| Error::Safetensors {
            path: path.into(),
            reason,
        };
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
        let md = header.metadata().clone().unwrap_or_default();
        let tensors = crate::checkpoint::read_tensors(path, &bytes)?;
        let get = |k: &str| {
            md.get(k)
                .cloned()
                .ok_or_else(|| bad(format!("missing metadata `{k}`")))
        };
        let t = get("adamw.t")?.parse().map_err(|_| bad("bad `adamw.t`".into()))?;
        let wd = get("adamw.weight_decay")?
            .parse()
            .map_err(|_| bad("bad `adamw.weight_decay`".into()))?;
        let mut opt = AdamW::new(wd);
        opt.t = t;
        for (k, (_, v)) in tensors {
            let v: Vec<f32> = v.into_iter().map(|x| x as f32).collect();
            match k.split_once('.') {
                Some(("m", _)) => opt.m.push(v),
                Some(("v", _)) => opt.v.push(v),
                _ => return Err(bad(format!("unexpected tensor `{k}`"))),
            }
        }
        Ok((opt, md))
    }
}

/// Copies out the gradient of every trainable tensor, in visiting order.
struct Gather<'a> {
    grads: &'a Gradients<f32, Cpu>,
    out: Vec<Vec<f32>>,
}

impl TensorVisitor<f32, Cpu> for Gather<'_> {
    type Viewer = ViewTensorRef;
    type Err = dfdx::tensor::CpuError;
    type E2 = f32;
    type D2 = Cpu;
    fn visit<S: Shape>(
        &mut self,
        opts: TensorOptions<S, f32, Cpu>,
        t: &Tensor<S, f32, Cpu>,
    ) -> Result<Option<Tensor<S, f32, Cpu>>, Self::Err> {
        if opts.do_gradient_update {
            self.out.push(self.grads.get(t).as_vec());
        }
        Ok(None)
    }
}

struct Update<'a> {
    opt: &'a mut AdamW,
    grads: &'a [Vec<f32>],
    lr: f32,
    scale: f32,
    i: usize,
}

impl TensorVisitor<f32, Cpu> for Update<'_> {
    type Viewer = ViewTensorMut;
    type Err = dfdx::tensor::CpuError;
    type E2 = f32;
    type D2 = Cpu;
    fn visit<S: Shape>(
        &mut self,
        opts: TensorOptions<S, f32, Cpu>,
        t: &mut Tensor<S, f32, Cpu>,
    ) -> Result<Option<Tensor<S, f32, Cpu>>, Self::Err> {
        if !opts.do_gradient_update {
            return Ok(None);
        }
        let i = self.i;
        self.i += 1;
        let o = &mut *self.opt;
        let (b1, b2) = o.betas;
        let bc1 = 1.0 - b1.powi(o.t as i32);
        let bc2 = 1.0 - b2.powi(o.t as i32);
        let decay = if S::NUM_DIMS > 1 {
            1.0 - self.lr * o.weight_decay
        } else {
            1.0
        };
        let mut p = t.as_vec();
        let (m, v) = (&mut o.m[i], &mut o.v[i]);
        for (k, pk) in p.iter_mut().enumerate() {
            let g = self.grads[i][k] * self.scale;
            m[k] = b1 * m[k] + (1.0 - b1) * g;
            v[k] = b2 * v[k] + (1.0 - b2) * g * g;
            let step = (m[k] / bc1) / ((v[k] / bc2).sqrt() + o.eps);
            *pk = *pk * decay - self.lr * step;
        }
        t.copy_from(&p);
        Ok(None)
    }
}

/// SPIN's "one-cycle" learning rate: piecewise linear through (0, 0), (0.4T, lr), (0.8T, lr/20),
/// (T, 0) over T steps.
#[derive(Clone, Copy, Debug)]
pub struct OneCycle {
    pub lr: f32,
    pub total_steps: usize,
}

impl OneCycle {
    pub fn at(&self, step: usize) -> f32 {
        let t = self.total_steps.max(1) as f32;
        let s = step as f32;
        let pts = [
            (0.0, 0.0),
            (0.4 * t, self.lr),
            (0.8 * t, self.lr / 20.0),
            (t, 0.0),
        ];
        for w in pts.windows(2) {
            let ((x0, y0), (x1, y1)) = (w[0], w[1]);
            if s <= x1 {
                return y0 + (y1 - y0) * (s - x0) / (x1 - x0).max(1e-12);
            }
        }
        0.0
    }
}

/// A training run's settings.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch: usize,
    pub lr: f32,
    pub weight_decay: f32,
    pub label_smoothing: f32,
    pub clip: Option<f32>,
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 10,
            batch: 64,
            lr: 2e-3,
            weight_decay: 0.05,
            label_smoothing: 0.1,
            clip: Some(1.0),
            seed: 0,
        }
    }
}

/// Loss and accuracy over a pass.
#[derive(Clone, Copy, Debug, Default)]
pub struct PassStats {
    pub loss: f32,
    pub accuracy: f32,
    pub images: usize,
}

/// The example order of epoch `epoch`: a shuffle seeded by the run seed and the epoch, so a resumed
/// run sees exactly the batches the uninterrupted run would have.
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    let mut rng =
        rand::rngs::StdRng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9).wrapping_add(epoch as u64));
    idx.shuffle(&mut rng);
    idx
}

/// Steps per epoch for a data set size and batch size (the last, smaller batch included).
pub fn steps_per_epoch(n: usize, batch: usize) -> usize {
    n.div_ceil(batch.max(1))
}

/// One epoch of training. `progress` is called after every step with (step, loss, accuracy so far).
/// A non-finite loss stops the epoch with [`Error::Diverged`] before the optimiser applies it.
pub fn train_epoch(
    model: &mut dyn Classifier,
    opt: &mut AdamW,
    data: &Dataset,
    cfg: &TrainConfig,
    epoch: usize,
    progress: &mut dyn FnMut(usize, f32, f32),
) -> Result<PassStats, Error> {
    let order = epoch_order(data.len(), cfg.seed, epoch);
    let per_epoch = steps_per_epoch(data.len(), cfg.batch);
    let sched = OneCycle {
        lr: cfg.lr,
        total_steps: per_epoch * cfg.epochs,
    };
    let (mut loss_sum, mut correct, mut seen) = (0.0f64, 0usize, 0usize);
    for (s, idx) in order.chunks(cfg.batch).enumerate() {
        let (x, y) = data.gather(idx);
        let hp = StepParams {
            lr: sched.at(epoch * per_epoch + s),
            label_smoothing: cfg.label_smoothing,
            clip: cfg.clip,
        };
        let st = model.train_step(&x, &y, opt, &hp)?;
        if !st.loss.is_finite() {
            return Err(Error::Diverged {
                epoch,
                step: s,
                loss: st.loss,
            });
        }
        loss_sum += st.loss as f64 * y.len() as f64;
        correct += st.correct;
        seen += y.len();
        progress(
            s + 1,
            (loss_sum / seen as f64) as f32,
            correct as f32 / seen as f32,
        );
    }
    Ok(PassStats {
        loss: (loss_sum / seen.max(1) as f64) as f32,
        accuracy: correct as f32 / seen.max(1) as f32,
        images: seen,
    })
}

/// Loss (plain cross-entropy) and accuracy on a data set, in inference mode.
pub fn evaluate(model: &dyn Classifier, data: &Dataset, batch: usize) -> PassStats {
    let (mut loss_sum, mut correct) = (0.0f64, 0usize);
    let idx: Vec<usize> = (0..data.len()).collect();
    for chunk in idx.chunks(batch.max(1)) {
        let (x, y) = data.gather(chunk);
        let logits = model.predict(&x, y.len());
        let k = logits.len() / y.len();
        for (i, &l) in y.iter().enumerate() {
            let row = &logits[i * k..(i + 1) * k];
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let lse = max + row.iter().map(|v| (v - max).exp()).sum::<f32>().ln();
            loss_sum += (lse - row[l]) as f64;
        }
        correct += count_correct(&logits, &y);
    }
    let n = data.len().max(1);
    PassStats {
        loss: (loss_sum / n as f64) as f32,
        accuracy: correct as f32 / n as f32,
        images: data.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_cycle_passes_through_its_points() {
        let s = OneCycle {
            lr: 1.0,
            total_steps: 100,
        };
        assert_eq!(s.at(0), 0.0);
        assert!((s.at(40) - 1.0).abs() < 1e-6);
        assert!((s.at(20) - 0.5).abs() < 1e-6);
        assert!((s.at(80) - 0.05).abs() < 1e-6);
        assert!(s.at(100).abs() < 1e-6);
    }

    #[test]
    fn smoothing_and_accuracy() {
        let t = smooth_targets(&[1], 4, 0.1);
        let want = [0.025, 0.925, 0.025, 0.025];
        assert!(t.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6), "{t:?}");
        assert!((t.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert_eq!(count_correct(&[0.1, 0.9, 0.0, 0.5, 0.2, 0.1], &[1, 2]), 1);
    }
}
