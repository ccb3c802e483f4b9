//! Epochs: the training loop over a data set and evaluation.
use super::classifier::{count_correct, Classifier, StepParams};
use super::optim::AdamW;
use super::schedule::{LrSchedule, Schedule};
use crate::data::{Augment, Dataset, Loader};
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
    /// Peak learning rate.
    pub lr: f32,
    /// The learning-rate curve after warm-up.
    pub schedule: Schedule,
    /// Epochs of linear learning-rate warm-up.
    pub warmup_epochs: usize,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f32,
    /// Label smoothing ε.
    pub label_smoothing: f32,
    /// Clip the global gradient L2 norm to this value.
    pub clip: Option<f32>,
    /// Seeds the example order and the augmentation (and, through the caller, the initialisation).
    pub seed: u64,
    /// What training does to each image and batch.
    pub augment: Augment,
    /// The threads that decode and augment batches (they do not change the results).
    pub loader: Loader,
}

impl TrainConfig {
    /// The learning rate of every step of the run.
    pub fn lr_schedule(&self, steps_per_epoch: usize) -> LrSchedule {
        LrSchedule {
            kind: self.schedule,
            lr: self.lr,
            warmup_steps: self.warmup_epochs * steps_per_epoch,
            total_steps: self.epochs * steps_per_epoch,
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 10,
            batch: 64,
            lr: 2e-3,
            schedule: Schedule::OneCycle,
            warmup_epochs: 0,
            weight_decay: 0.05,
            label_smoothing: 0.1,
            clip: Some(1.0),
            seed: 0,
            augment: Augment::none(),
            loader: Loader::default(),
        }
    }
}

/// Loss and accuracy over a pass.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PassStats {
    /// Mean loss.
    pub loss: f32,
    /// Fraction classified correctly (top-1).
    pub accuracy: f32,
    /// Fraction whose label is among the five largest logits (evaluation only; 0 in training).
    pub top5: f32,
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

/// The seed of an epoch's augmentation.
fn epoch_seed(seed: u64, epoch: usize) -> u64 {
    seed.wrapping_mul(0xA24B_AED4_963E_E407) ^ (epoch as u64).wrapping_add(1)
}

/// One epoch of training. `progress` is called after every step with (step, loss, accuracy so far).
/// A non-finite loss stops the epoch with [`Error::Diverged`] before the optimiser applies it.
/// With mixup or cutmix, accuracy counts an image as right when its own label wins.
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
    let sched = cfg.lr_schedule(per_epoch);
    let (mut loss_sum, mut correct, mut seen) = (0.0f64, 0usize, 0usize);
    let seed = epoch_seed(cfg.seed, epoch);
    cfg.loader
        .run(data, &order, cfg.batch, Some(&cfg.augment), seed, &mut |s, b| {
            if b.labels.is_empty() {
                return Ok(());
            }
            let hp = StepParams {
                lr: sched.at(epoch * per_epoch + s),
                label_smoothing: cfg.label_smoothing,
                clip: cfg.clip,
            };
            let st = model.train_step(&b.images, &b.labels, b.mix.as_ref(), opt, &hp)?;
            if !st.loss.is_finite() {
                return Err(Error::Diverged {
                    epoch,
                    step: s,
                    loss: st.loss,
                });
            }
            loss_sum += st.loss as f64 * b.labels.len() as f64;
            correct += st.correct;
            seen += b.labels.len();
            progress(
                s + 1,
                (loss_sum / seen as f64) as f32,
                correct as f32 / seen as f32,
            );
            Ok(())
        })?;
    Ok(PassStats {
        loss: (loss_sum / seen.max(1) as f64) as f32,
        accuracy: correct as f32 / seen.max(1) as f32,
        top5: 0.0,
        images: seen,
    })
}

/// Loss (plain cross-entropy) and accuracy on a data set, in inference mode (eval transform;
/// files that do not decode are left out unless the data is strict).
pub fn evaluate(model: &dyn Classifier, data: &Dataset, batch: usize) -> Result<PassStats, Error> {
    evaluate_with(model, data, batch, &Loader::default(), &mut |_| {})
}

/// [`evaluate`] with these loader threads, calling `progress` with the images done so far.
pub fn evaluate_with(
    model: &dyn Classifier,
    data: &Dataset,
    batch: usize,
    loader: &Loader,
    progress: &mut dyn FnMut(usize),
) -> Result<PassStats, Error> {
    let (mut loss_sum, mut correct, mut in_top5, mut seen) = (0.0f64, 0usize, 0usize, 0usize);
    let idx: Vec<usize> = (0..data.len()).collect();
    loader.run(data, &idx, batch.max(1), None, 0, &mut |_, b| {
        let y = &b.labels;
        if y.is_empty() {
            return Ok(());
        }
        let logits = model.predict(&b.images, y.len());
        let k = logits.len() / y.len();
        for (i, &l) in y.iter().enumerate() {
            let row = &logits[i * k..(i + 1) * k];
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let lse = max + row.iter().map(|v| (v - max).exp()).sum::<f32>().ln();
            loss_sum += (lse - row[l]) as f64;
            // Top-5: fewer than five logits above the label's (ties count for the label).
            in_top5 += usize::from(row.iter().filter(|&&v| v > row[l]).count() < 5);
        }
        correct += count_correct(&logits, y);
        seen += y.len();
        progress(seen);
        Ok(())
    })?;
    let n = seen.max(1);
    Ok(PassStats {
        loss: (loss_sum / n as f64) as f32,
        accuracy: correct as f32 / n as f32,
        top5: in_top5 as f32 / n as f32,
        images: seen,
    })
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
