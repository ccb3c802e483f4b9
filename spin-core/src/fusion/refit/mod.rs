//! Data-aware fusion for ConvMixers: a fused model refitted to the unshared one on calibration
//! images, in closed form and without labels.
//!
//! Averaging a group's layers breaks a network whose layers were trained from independent random
//! starts: their weights are nearly orthogonal (the digits ConvMixer's within ±0.07 cosine), so
//! the mean reproduces none of them and the fused model sits at chance. A refit pass walks the
//! schedule's groups in order and, from the *fused* model's own activations (so that each fit
//! also corrects the error the layers before it left):
//! - refits every stored depthwise and pointwise conv to the weight that best reproduces, at
//!   every layer using it, the unshared model's pre-activation there (least squares over all
//!   positions of the group's layers: one normal equation Σ_l Z_lᵀZ_l·W = Σ_l Z_lᵀY_l per conv,
//!   per channel for the depthwise one, with a small ridge for conditioning);
//! - refits each layer's own BatchNorms to the per-channel scale and shift that best map the fused
//!   activations onto the unshared model's output of that part (stored as statistics of the
//!   calibration activations and the affine that gives that map, so training mode still agrees);
//! - then the head, as the linear map from the pooled features to the unshared logits.
//!
//! The pass whose logits come closest to the unshared model's (mean squared error on the
//! calibration images) is kept, the fused model as it came in counting as pass 0.
mod host;
mod lstsq;

use crate::checkpoint::TensorMap;
use crate::error::Error;
use host::{activation, linear, taps, trace, Act2, Host, Norm};
use lstsq::{fit_depthwise, fit_linear};
use spin_rules::{Act, Variant};

/// The most memory the activations of a refit may take.
const MAX_TRACE_BYTES: usize = 8 << 30;

/// A ConvMixer's sizes and choices, as [`refit_mixer`] needs them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MixerShape {
    /// Channels.
    pub dim: usize,
    /// Blocks.
    pub depth: usize,
    /// Depthwise kernel size.
    pub kernel: usize,
    /// Patch size of the stem.
    pub patch: usize,
    /// Input image size.
    pub image: usize,
    /// Classes of the head.
    pub classes: usize,
    /// The activation.
    pub act: Act,
    /// timm's block, or SPIN's with a residual around the pointwise part.
    pub variant: Variant,
}

impl MixerShape {
    fn grid(&self) -> usize {
        self.image / self.patch
    }
}

/// Which layers use each stored tensor: the depthwise convs' groups and the pointwise convs'
/// (a group of one for a conv stored per layer), and the schedule's groups, which a pass visits
/// in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MixerGroups {
    /// The layers of each stored depthwise conv.
    pub depthwise: Vec<Vec<usize>>,
    /// The layers of each stored pointwise conv.
    pub pointwise: Vec<Vec<usize>>,
    /// The schedule's groups, in the order a pass refits them.
    pub schedule: Vec<Vec<usize>>,
}

fn mse(a: &Act2, b: &Act2) -> f64 {
    let d = a - b;
    d.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / d.len().max(1) as f64
}

/// Refits the fused ConvMixer `student` (every key of a shared tensor present, as
/// [`super::tensor_map`] gives them) to the unshared `teacher` on NCHW calibration `images`, for
/// `passes` passes (see the module docs); `on_pass(pass, logit MSE)` hears of each. Returns the
/// logits' mean squared error to the teacher's after every pass, pass 0 first; `student` holds
/// the best pass.
pub fn refit_mixer(
    shape: &MixerShape,
    groups: &MixerGroups,
    teacher: &TensorMap,
    student: &mut TensorMap,
    images: &[f32],
    passes: usize,
    on_pass: &mut dyn FnMut(usize, f64),
) -> Result<Vec<f64>, Error> {
    let per_image = 3 * shape.image * shape.image;
    if images.is_empty() || !images.len().is_multiple_of(per_image) {
        return Err(Error::Invalid(format!(
            "refit: {} values are not whole 3×{}×{} images",
            images.len(),
            shape.image,
            shape.image
        )));
    }
    if passes == 0 {
        return Err(Error::Invalid("refit: passes must be at least 1".into()));
    }
    let n = images.len() / per_image;
    let (g, k) = (shape.grid(), shape.kernel);
    // At most three traces at once (the source's, and two of the fused model's while a group's
    // pointwise conv is refitted), each of five activations per block, in f32.
    let bytes = 3 * 5 * shape.depth * n * g * g * shape.dim * 4;
    if bytes > MAX_TRACE_BYTES {
        return Err(Error::Invalid(format!(
            "refit: {n} calibration images would hold {:.1} GiB of activations (at most {} GiB): use fewer",
            bytes as f64 / f64::from(1 << 30),
            MAX_TRACE_BYTES >> 30
        )));
    }
    let t = Host::read(teacher, "<unshared source>", shape)?;
    let mut s = Host::read(student, "<fused model>", shape)?;
    let taps = taps(n * g * g, g, k);
    let target = trace(&t, shape, &t.stem(shape, images, n), n, &taps);
    let stem = s.stem(shape, images, n);
    let mut errors = vec![mse(&trace(&s, shape, &stem, n, &taps).logits, &target.logits)];
    on_pass(0, errors[0]);
    let mut best = (errors[0], s.clone());
    for pass in 1..=passes {
        for layers in &groups.schedule {
            let touched = |stored: &[Vec<usize>]| -> Vec<Vec<usize>> {
                stored
                    .iter()
                    .filter(|u| u.iter().any(|l| layers.contains(l)))
                    .cloned()
                    .collect()
            };
            for users in touched(&groups.depthwise) {
                let now = trace(&s, shape, &stem, n, &taps);
                let pairs: Vec<_> = users
                    .iter()
                    .map(|&l| (&now.input[l], &target.dw_pre[l]))
                    .collect();
                let (w, b) = fit_depthwise(&pairs, &taps, k);
                for &l in &users {
                    (s.blocks[l].dw_w, s.blocks[l].dw_b) = (w.clone(), b.clone());
                }
            }
            let now = trace(&s, shape, &stem, n, &taps);
            for &l in layers {
                let mut z = now.dw_pre[l].clone();
                activation(shape.act, &mut z);
                s.blocks[l].bn1 = Norm::fit(&z, &(&target.mid[l] - &now.input[l]));
            }
            for users in touched(&groups.pointwise) {
                let now = trace(&s, shape, &stem, n, &taps);
                let pairs: Vec<_> = users.iter().map(|&l| (&now.mid[l], &target.pw_pre[l])).collect();
                let (w, b) = fit_linear(&pairs);
                for &l in &users {
                    (s.blocks[l].pw_w, s.blocks[l].pw_b) = (w.clone(), b.clone());
                }
            }
            let now = trace(&s, shape, &stem, n, &taps);
            for &l in layers {
                let mut z = now.pw_pre[l].clone();
                activation(shape.act, &mut z);
                let goal = match shape.variant {
                    Variant::Timm => target.output[l].clone(),
                    Variant::Spin => &target.output[l] - &now.mid[l],
                };
                s.blocks[l].bn2 = Norm::fit(&z, &goal);
            }
        }
        let now = trace(&s, shape, &stem, n, &taps);
        (s.head_w, s.head_b) = fit_linear(&[(&now.pooled, &target.logits)]);
        // Only the head changed since `now`: its features give this pass's logits.
        let err = mse(&linear(&now.pooled, &s.head_w, &s.head_b), &target.logits);
        errors.push(err);
        on_pass(pass, err);
        if err < best.0 {
            best = (err, s.clone());
        }
    }
    best.1.write(student);
    Ok(errors)
}
