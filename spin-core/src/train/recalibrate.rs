//! BatchNorm recalibration: after weight fusion the copied running statistics no longer describe
//! the activations of the averaged weights, so they are re-estimated on calibration images as a
//! cumulative average over batches (what `torch.optim.swa_utils.update_bn` does).
//!
//! A training-mode forward moves every running statistic by PyTorch's rule,
//! r ← (1 − m)·r + m·b with momentum m; so each batch's statistic b (variance unbiased) is read
//! back from the change of r, the batches' statistics are averaged, and the average is stored.
use super::classifier::Classifier;
use crate::base::BN_MOMENTUM;
use crate::checkpoint::TensorMap;
use crate::data::{Dataset, Loader};
use crate::error::Error;
use std::path::Path;

fn is_running(key: &str) -> bool {
    key.ends_with(".running_mean") || key.ends_with(".running_var")
}

/// Re-estimates every BatchNorm's running statistics of `model` as the average over the first
/// `batches` batches of `batch` images of `data` (eval transform, in order). Returns the images
/// used. A model whose BatchNorms are shared across layers (each forward would move one several
/// times) or that has none is refused.
pub fn recalibrate_bn(
    model: &mut dyn Classifier,
    data: &Dataset,
    batches: usize,
    batch: usize,
) -> Result<usize, Error> {
    let info = model.info();
    if info.share == "block" {
        return Err(Error::Invalid(format!(
            "{}: its BatchNorms are shared across layers; recalibration needs them per layer",
            info.name
        )));
    }
    let running = |m: &dyn Classifier| -> TensorMap {
        m.state_tensors()
            .into_iter()
            .filter(|(k, _)| is_running(k))
            .collect()
    };
    let mut sums = running(model);
    if sums.is_empty() {
        return Err(Error::Invalid(format!(
            "{} has no BatchNorm to recalibrate",
            info.name
        )));
    }
    sums.values_mut()
        .for_each(|(_, v)| v.iter_mut().for_each(|x| *x = 0.0));
    let idx = data.stratified(batches * batch, 0);
    let (mut seen, mut count) = (0usize, 0usize);
    // Each batch's statistics after are the next batch's before: one read per batch.
    let mut before = running(model);
    Loader::default().run(data, &idx, batch.max(1), None, 0, &mut |_, b| {
        if b.labels.is_empty() {
            return Ok(());
        }
        model.forward_train_mode(&b.images, b.labels.len());
        let now = running(model);
        for ((key, (_, after)), (_, old)) in now.iter().zip(before.values()) {
            let sum = &mut sums.get_mut(key).expect("the same keys every time").1;
            for ((s, &a), &o) in sum.iter_mut().zip(after).zip(old) {
                *s += (a - (1.0 - BN_MOMENTUM) * o) / BN_MOMENTUM;
            }
        }
        before = now;
        seen += b.labels.len();
        count += 1;
        Ok(())
    })?;
    if count == 0 {
        return Err(Error::Invalid("no calibration image decodes".into()));
    }
    let mut state = model.state_tensors();
    for (key, (_, sum)) in sums {
        let entry = state.get_mut(&key).expect("a key of the model's own state");
        entry.1 = sum.iter().map(|s| s / count as f64).collect();
    }
    model.load_state_tensors(Path::new("<recalibrated statistics>"), &state)?;
    Ok(seen)
}
