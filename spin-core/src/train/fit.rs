//! Epochs: the training loop over a data set and evaluation.
use super::classifier::{count_correct, Classifier, StepParams};
use super::optim::{AdamW, OneCycle};
use crate::data::Dataset;
use crate::error::Error;
use rand::seq::SliceRandom;
use rand::SeedableRng;

/// A training run's settings.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    /// Epochs of the whole schedule.
    pub epochs: usize,
    /// Images per step.
    pub batch: usize,
    /// Peak learning rate of the one-cycle schedule.
    pub lr: f32,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f32,
    /// Label smoothing ε.
    pub label_smoothing: f32,
    /// Clip the global gradient L2 norm to this value.
    pub clip: Option<f32>,
    /// Seeds the example order (and, through the caller, the initialisation).
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
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PassStats {
    /// Mean loss.
    pub loss: f32,
    /// Fraction classified correctly.
    pub accuracy: f32,
    /// Images seen.
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
    use super::super::classifier::smooth_targets;
    use super::*;

    #[test]
    fn smoothing_and_accuracy() {
        let t = smooth_targets(&[1], 4, 0.1);
        let want = [0.025, 0.925, 0.025, 0.025];
        assert!(t.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6), "{t:?}");
        assert!((t.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert_eq!(count_correct(&[0.1, 0.9, 0.0, 0.5, 0.2, 0.1], &[1, 2]), 1);
    }

    #[test]
    fn epochs_are_reproducible_shuffles() {
        assert_eq!(epoch_order(10, 3, 1), epoch_order(10, 3, 1));
        assert_ne!(epoch_order(10, 3, 1), epoch_order(10, 3, 2));
        assert_eq!(steps_per_epoch(10, 4), 3);
    }
}
