//! FiPS's optimisation: block-wise reconstruction on calibration images — prune gradually while
//! minimising Σ_blocks MSE(compressed block(original input), original output).
//!
//! Attention is left as it is, so a block's output differs from the original only through its
//! MLP: the MSE of the block outputs is the MSE of the MLP outputs on the block's own (original)
//! normalised MLP inputs, which is what is stored and matched.
use super::factors::{cubic_sparsity, rigl_fraction};
use crate::error::Error;
use crate::models::fips_mlps::FipsMlps;
use crate::models::vit::{Vit, VitConfig, VitMlps};
use crate::train::AdamW;
use dfdx::prelude::*;
use rand::{Rng, SeedableRng};

/// Hyper-parameters of the block-wise reconstruction.
#[derive(Clone, Debug, PartialEq)]
pub struct ReconConfig {
    /// Optimiser steps.
    pub steps: usize,
    /// Peak learning rate of AdamW, decayed to zero by a cosine.
    pub lr: f32,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f32,
    /// Token rows drawn per block per step.
    pub rows: usize,
    /// Sparsity at step 0; the cubic schedule reaches the plan's sparsity at
    /// `prune_until · steps` and holds it.
    pub initial_sparsity: f64,
    /// Fraction of the steps over which the sparsity ramps up.
    pub prune_until: f64,
    /// Steps between mask updates.
    pub prune_every: usize,
    /// How the sparsity is reached: gradual magnitude pruning, or RigL.
    pub schedule: SparseSchedule,
    /// RigL: the fraction of kept entries moved at the first update, decayed by a cosine.
    pub rigl_fraction: f64,
    /// RigL: the fraction of the steps after which the masks stay put.
    pub rigl_until: f64,
    /// Seeds the row sampling.
    pub seed: u64,
}

/// How the factors reach their sparsity during reconstruction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SparseSchedule {
    /// Gradual magnitude pruning: the cubic schedule from `initial_sparsity` to the target,
    /// masks by magnitude every `prune_every` steps.
    #[default]
    Gmp,
    /// RigL (FiPS's reference default): the target sparsity from a magnitude mask at step 0;
    /// every `prune_every` steps until `rigl_until`, drop the smallest-magnitude fraction of the
    /// kept entries and regrow as many where the dense gradient is largest (regrown at zero), the
    /// fraction decaying by a cosine. An update step moves masks instead of weights.
    Rigl,
}

impl std::str::FromStr for SparseSchedule {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "gmp" => Ok(Self::Gmp),
            "rigl" => Ok(Self::Rigl),
            _ => Err(Error::Invalid(format!(
                "unknown sparse schedule `{s}`: use gmp or rigl"
            ))),
        }
    }
}

impl Default for ReconConfig {
    fn default() -> Self {
        Self {
            steps: 300,
            lr: 1e-3,
            weight_decay: 0.0,
            rows: 256,
            initial_sparsity: 0.0,
            prune_until: 0.5,
            prune_every: 10,
            schedule: SparseSchedule::Gmp,
            rigl_fraction: 0.3,
            rigl_until: 0.75,
            seed: 0,
        }
    }
}

/// Each block's MLP inputs and outputs in the original model, `(rows, Dim)` row-major.
#[derive(Clone, Debug)]
pub struct Calibration {
    /// The model width.
    pub dim: usize,
    /// Token rows per block.
    pub rows: usize,
    /// Each block's normalised MLP inputs, `(rows, dim)` row-major.
    pub inputs: Vec<Vec<f32>>,
    /// Each block's MLP outputs in the original model.
    pub targets: Vec<Vec<f32>>,
}

/// Runs the original model on `n` NCHW images in batches and keeps every block's MLP input and
/// output.
pub fn calibrate<C: VitConfig, M: VitMlps<C, f32, Cpu>>(
    vit: &Vit<C, f32, Cpu, M>,
    images: &[f32],
    n: usize,
    batch: usize,
) -> Calibration {
    let dev = vit.cls_token.device().clone();
    let img = C::Image::SIZE;
    let per = 3 * img * img;
    let mut inputs = vec![Vec::new(); C::DEPTH];
    let mut targets = vec![Vec::new(); C::DEPTH];
    for start in (0..n).step_by(batch.max(1)) {
        let b = batch.min(n - start);
        let x = dev.tensor_from_vec(images[start * per..(start + b) * per].to_vec(), (b, 3, img, img));
        for (i, (z, y)) in vit.mlp_io(x).into_iter().enumerate() {
            inputs[i].extend(z.as_vec());
            targets[i].extend(y.as_vec());
        }
    }
    let dim = C::Dim::SIZE;
    Calibration {
        dim,
        rows: inputs.first().map_or(0, |v| v.len() / dim),
        inputs,
        targets,
    }
}

fn gather(m: &[f32], idx: &[usize], dim: usize) -> Vec<f32> {
    idx.iter()
        .flat_map(|&r| m[r * dim..(r + 1) * dim].iter().copied())
        .collect()
}

/// Each block's MSE between the compressed MLP's output and the original, over all calibration rows.
pub fn block_errors<C: VitConfig>(mlps: &FipsMlps<C, f32, Cpu>, calib: &Calibration) -> Vec<f64> {
    let dev = mlps.bases.device().clone();
    let d = calib.dim;
    const CHUNK: usize = 4096;
    (0..calib.inputs.len())
        .map(|i| {
            let mut sum = 0.0f64;
            for start in (0..calib.rows).step_by(CHUNK) {
                let r = CHUNK.min(calib.rows - start);
                let z = dev.tensor_from_vec(calib.inputs[i][start * d..(start + r) * d].to_vec(), (r, d));
                let y = mlps.forward(i, z).as_vec();
                sum += y
                    .iter()
                    .zip(&calib.targets[i][start * d..(start + r) * d])
                    .map(|(a, b)| ((a - b) as f64).powi(2))
                    .sum::<f64>();
            }
            sum / (calib.rows * d).max(1) as f64
        })
        .collect()
}

/// Block-wise reconstruction: AdamW with cosine decay on Σ_blocks MSE over random token rows,
/// masks updated by the sparse schedule (see [`SparseSchedule`]) and re-applied after every step.
/// `progress(step, loss)` is called after each step. Returns the loss of every step.
pub fn reconstruct<C: VitConfig>(
    mlps: &mut FipsMlps<C, f32, Cpu>,
    calib: &Calibration,
    target_sparsity: f64,
    cfg: &ReconConfig,
    progress: &mut dyn FnMut(usize, f32),
) -> Result<Vec<f32>, Error> {
    if calib.rows == 0 {
        return Err(Error::Invalid("FiPS needs at least one calibration image".into()));
    }
    let dev = mlps.bases.device().clone();
    let d = calib.dim;
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
    let mut opt = AdamW::new(cfg.weight_decay);
    let mut grads = mlps.alloc_grads();
    let prune_steps = ((cfg.steps as f64 * cfg.prune_until) as usize).max(1);
    let rigl_steps = (cfg.steps as f64 * cfg.rigl_until) as usize;
    let mut sparsity = None;
    let mut losses = Vec::with_capacity(cfg.steps);
    if cfg.schedule == SparseSchedule::Rigl {
        mlps.prune_to(target_sparsity);
        sparsity = Some(target_sparsity);
    }
    for step in 0..cfg.steps {
        // RigL: a mask update on every prune_every-th step after the first, until rigl_until.
        let every = cfg.prune_every.max(1);
        let rigl = (cfg.schedule == SparseSchedule::Rigl && step > 0 && step % every == 0)
            .then(|| rigl_fraction(step, rigl_steps, cfg.rigl_fraction))
            .filter(|&f| f > 0.0);
        let saved = rigl.map(|_| mlps.open_masks());
        if cfg.schedule == SparseSchedule::Gmp && (step % every == 0 || step == prune_steps) {
            let s = cubic_sparsity(step, prune_steps, cfg.initial_sparsity, target_sparsity);
            if sparsity != Some(s) {
                mlps.prune_to(s);
                sparsity = Some(s);
            }
        }
        let rows = cfg.rows.min(calib.rows);
        let idx: Vec<usize> = (0..rows).map(|_| rng.gen_range(0..calib.rows)).collect();
        mlps.zero_grads(&mut grads);
        let mut loss_sum = 0.0f32;
        // One backward pass per block; gradients accumulate, so the step sees Σ_blocks MSE.
        for i in 0..calib.inputs.len() {
            let z = dev.tensor_from_vec(gather(&calib.inputs[i], &idx, d), (rows, d));
            let y = dev.tensor_from_vec(gather(&calib.targets[i], &idx, d), (rows, d));
            let loss = mse_loss(mlps.forward(i, z.traced(grads)), y);
            loss_sum += loss.array();
            grads = loss.backward();
        }
        if !loss_sum.is_finite() {
            return Err(Error::Diverged {
                epoch: 0,
                step,
                loss: loss_sum,
            });
        }
        match (rigl, saved) {
            (Some(fraction), Some(saved)) => {
                mlps.rigl_step(saved, &grads, fraction);
            }
            _ => {
                let lr = cfg.lr * 0.5 * (1.0 + (std::f32::consts::PI * step as f32 / cfg.steps as f32).cos());
                opt.step(mlps, &mut grads, lr, None);
            }
        }
        mlps.apply_masks();
        losses.push(loss_sum);
        progress(step, loss_sum);
    }
    // The schedule has reached the target unless there were too few steps: make sure it is met.
    if sparsity != Some(target_sparsity) {
        mlps.prune_to(target_sparsity);
    }
    Ok(losses)
}
