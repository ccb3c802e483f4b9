//! A fused ConvMixer refitted to its unshared source on calibration images
//! ([`crate::fusion::refit`] does the arithmetic; this reads the model and the data).
use super::classifier::Classifier;
use crate::checkpoint::TensorMap;
use crate::data::{Dataset, Loader};
use crate::error::Error;
use crate::fusion::{refit_mixer, MixerGroups, MixerShape};
use crate::models::{Arch, ModelInfo};
use spin_rules::{parse_name, users, Act, ConvMixerShare, Variant};
use std::path::Path;

/// The shape and the sharing of a ConvMixer member with BatchNorms per layer.
fn mixer_of(info: &ModelInfo) -> Result<(MixerShape, MixerGroups), Error> {
    let refuse = |why: &str| Err(Error::Invalid(format!("{}: {why}", info.name)));
    let Arch::ConvMixer { kernel, act, variant } = &info.arch else {
        return refuse("refitting after fusion is built for ConvMixers only");
    };
    let share = parse_name(ConvMixerShare::NAMES, "share", info.share).map_err(Error::Invalid)?;
    if share.norms() {
        return refuse("a refit fits each layer's BatchNorms, and this model shares them");
    }
    let stored = |shared: bool| -> Vec<Vec<usize>> {
        let n = if shared { info.groups } else { info.depth };
        (0..n).map(|j| users(shared, &info.schedule, j)).collect()
    };
    let mut schedule = stored(true);
    schedule.sort_by_key(|layers| layers.first().copied());
    let shape = MixerShape {
        dim: info.dim,
        depth: info.depth,
        kernel: *kernel,
        patch: info.patch,
        image: info.image,
        classes: info.classes,
        act: parse_name(Act::NAMES, "act", act).map_err(Error::Invalid)?,
        variant: parse_name(Variant::NAMES, "variant", variant).map_err(Error::Invalid)?,
    };
    let groups = MixerGroups {
        depthwise: stored(share.depthwise()),
        pointwise: stored(share.pointwise()),
        schedule,
    };
    Ok((shape, groups))
}

/// Refits the fused ConvMixer `model` to the unshared `teacher` tensors on `images` images of
/// `data` drawn evenly across classes (eval transform), for `passes` passes; `on_pass(pass, logit
/// MSE)` hears of each, pass 0 being the model as it came. Returns every pass's error; the model
/// keeps the best pass.
pub fn refit_fused(
    model: &mut dyn Classifier,
    teacher: &TensorMap,
    data: &Dataset,
    images: usize,
    passes: usize,
    on_pass: &mut dyn FnMut(usize, f64),
) -> Result<Vec<f64>, Error> {
    let info = model.info();
    let (shape, groups) = mixer_of(&info)?;
    let idx = data.stratified(images, 0);
    let mut pixels = Vec::new();
    Loader::default().run(data, &idx, 64, None, 0, &mut |_, b| {
        pixels.extend_from_slice(&b.images);
        Ok(())
    })?;
    if pixels.is_empty() {
        return Err(Error::Invalid("no calibration image decodes".into()));
    }
    let mut student = model.state_tensors();
    let errors = refit_mixer(&shape, &groups, teacher, &mut student, &pixels, passes, on_pass)?;
    model.load_state_tensors(Path::new("<refitted model>"), &student)?;
    Ok(errors)
}
