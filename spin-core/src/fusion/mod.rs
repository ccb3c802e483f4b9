//! Weight fusion (SPIN): a shared model made from a trained unshared one.
//!
//! A *group* is the set of layers that use the same stored copy of a part — for every pattern, the
//! layers the schedule maps to one index (for `sequential`, SPIN's contiguous groups). Each shared
//! tensor is reduced from its group's tensors; everything stored once per layer (and the stem,
//! head and norms) is copied. The reduction works on timm keys, so it serves every family and
//! granularity: a shared model lists, for each stored tensor, the keys of every layer using it.
//!
//! [`FusionMixer`] and [`FusionVit`] are SPIN's fusion-aware training (WFWS) for ConvMixers and
//! ViTs: each keeps all D original tensors and the reduction coefficients, fuses in every forward
//! pass, trains end to end, and `export_fused` writes a plain shared model. [`refit`] refits a
//! fused ConvMixer to its source on calibration images in closed form.
mod mixer;
pub mod refit;
mod vit;

pub use mixer::{Fusion, FusionMixer};
pub use refit::{refit_mixer, MixerGroups, MixerShape};
pub use vit::{FusionVit, FusionVitOf};

use crate::base::SpinDtype;
use crate::checkpoint::lookup;
use crate::error::Error;
use crate::nn::param::TimmKeys;

pub use crate::checkpoint::TensorMap;
use std::path::Path;

/// How a group's tensors become one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduction {
    /// The average of the group's tensors.
    Mean,
    /// The first layer's tensor.
    ChooseFirst,
    /// The mean of α_l·W_l, one learnable scalar per layer (initially 1).
    ScalarWeightedMean,
    /// The mean of γ_l\[o\]·W_l\[o, …\], one learnable value per output channel and layer (initially 1).
    ChannelWeightedMean,
}

impl std::str::FromStr for Reduction {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Ok(match s {
            "mean" => Reduction::Mean,
            "choose_first" => Reduction::ChooseFirst,
            "scalar_weighted_mean" => Reduction::ScalarWeightedMean,
            "channel_weighted_mean" => Reduction::ChannelWeightedMean,
            _ => {
                return Err(Error::Invalid(format!(
                    "unknown reduction `{s}`: use mean, choose_first, scalar_weighted_mean or channel_weighted_mean"
                )))
            }
        })
    }
}

/// Reduces one group. `members` are the group's tensors in layer order, all of shape `dims`;
/// `coeffs[l]` is layer l's coefficient vector (1 value, or `dims[0]` for per-channel), `None`
/// meaning all ones. Tensors of one dimension (biases, norm parameters, running statistics) are
/// averaged (`ChooseFirst`: the first), as SPIN does for biases.
pub fn reduce(
    members: &[&[f64]],
    dims: &[usize],
    reduction: Reduction,
    coeffs: Option<&[Vec<f64>]>,
) -> Vec<f64> {
    let n = members[0].len();
    if reduction == Reduction::ChooseFirst {
        return members[0].to_vec();
    }
    let rows = dims.first().copied().unwrap_or(1).max(1);
    let per_row = n / rows;
    let weighted = dims.len() > 1
        && matches!(
            reduction,
            Reduction::ScalarWeightedMean | Reduction::ChannelWeightedMean
        );
    let mut out = vec![0.0; n];
    for (l, m) in members.iter().enumerate() {
        for (k, v) in m.iter().enumerate() {
            let c = match (weighted, coeffs) {
                (true, Some(cs)) if cs[l].len() == 1 => cs[l][0],
                (true, Some(cs)) => cs[l][k / per_row],
                _ => 1.0,
            };
            out[k] += c * v;
        }
    }
    let inv = 1.0 / members.len() as f64;
    out.iter_mut().for_each(|v| *v *= inv);
    out
}

/// The layer a `blocks.{i}.…` key belongs to.
pub fn layer_of(key: &str) -> Option<usize> {
    key.strip_prefix("blocks.")?.split('.').next()?.parse().ok()
}

/// Reads every tensor of a model under its timm keys (shared tensors under each of their keys).
pub fn tensor_map<M: TimmKeys + Clone>(model: &M) -> TensorMap {
    let mut m = model.clone();
    let mut out = TensorMap::new();
    for slot in m.timm_slots() {
        let dims = slot.tensor.dims();
        let data: Vec<f64> = slot.tensor.read().into_iter().map(|v| v.as_f64()).collect();
        for k in slot.keys {
            out.insert(k, (dims.clone(), data.clone()));
        }
    }
    out
}

/// Reads a checkpoint (safetensors or PyTorch) into a [`TensorMap`].
pub fn read_checkpoint(path: &Path) -> Result<TensorMap, Error> {
    crate::checkpoint::read_any(path)
}

/// What [`fuse_into`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FusionReport {
    /// Stored tensors reduced from more than one layer.
    pub fused: usize,
    /// Stored tensors copied from one layer.
    pub copied: usize,
}

/// Fills `model` (typically shared) from an unshared model's tensors. `coeffs(key, layer)` gives
/// the weighted reductions' coefficients for a key (None: all ones). Nothing changes on error.
pub fn fuse_into<M: TimmKeys>(
    model: &mut M,
    source: &TensorMap,
    reduction: Reduction,
    coeffs: &dyn Fn(&str, usize) -> Option<Vec<f64>>,
) -> Result<FusionReport, Error> {
    let src = Path::new("<fusion source>");
    let mut slots = model.timm_slots();
    let mut values = Vec::with_capacity(slots.len());
    let mut report = FusionReport::default();
    for slot in &slots {
        let dims = slot.tensor.dims();
        let mut members = Vec::with_capacity(slot.keys.len());
        for key in &slot.keys {
            members.push(lookup(source, src, key, &dims)?);
        }
        let cs: Option<Vec<Vec<f64>>> = slot
            .keys
            .iter()
            .map(|k| layer_of(k).and_then(|l| coeffs(k, l)))
            .collect::<Option<Vec<_>>>();
        if members.len() > 1 {
            report.fused += 1;
        } else {
            report.copied += 1;
        }
        values.push(reduce(&members, &dims, reduction, cs.as_deref()));
    }
    for (slot, v) in slots.iter_mut().zip(values) {
        let v: Vec<M::Elem> = v.into_iter().map(M::Elem::cast).collect();
        slot.tensor.write(&v);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reductions_match_hand_computed_values() {
        let a = [1.0, 2.0, 3.0, 4.0];
        let b = [3.0, 6.0, 5.0, 0.0];
        let dims = [2, 2];
        assert_eq!(
            reduce(&[&a, &b], &dims, Reduction::Mean, None),
            [2.0, 4.0, 4.0, 2.0]
        );
        assert_eq!(reduce(&[&a, &b], &dims, Reduction::ChooseFirst, None), a);
        // Coefficients of one: the weighted means start as the mean.
        let ones = vec![vec![1.0], vec![1.0]];
        assert_eq!(
            reduce(&[&a, &b], &dims, Reduction::ScalarWeightedMean, Some(&ones)),
            [2.0, 4.0, 4.0, 2.0]
        );
        // α = (2, 0): mean of (2a, 0) = a.
        let alpha = vec![vec![2.0], vec![0.0]];
        assert_eq!(
            reduce(&[&a, &b], &dims, Reduction::ScalarWeightedMean, Some(&alpha)),
            a
        );
        // γ per output row: layer 0 rows × (1, 3), layer 1 rows × (1, 0).
        let gamma = vec![vec![1.0, 3.0], vec![1.0, 0.0]];
        assert_eq!(
            reduce(&[&a, &b], &dims, Reduction::ChannelWeightedMean, Some(&gamma)),
            [
                (1.0 + 3.0) / 2.0,
                (2.0 + 6.0) / 2.0,
                (9.0 + 0.0) / 2.0,
                (12.0 + 0.0) / 2.0
            ]
        );
        // Biases (1-D) are averaged whatever the coefficients; choose_first takes the first.
        assert_eq!(
            reduce(
                &[&[1.0, 2.0], &[3.0, 4.0]],
                &[2],
                Reduction::ChannelWeightedMean,
                Some(&gamma)
            ),
            [2.0, 3.0]
        );
        assert_eq!(
            reduce(&[&[1.0, 2.0], &[3.0, 4.0]], &[2], Reduction::ChooseFirst, None),
            [1.0, 2.0]
        );
        assert_eq!(layer_of("blocks.12.0.fn.0.weight"), Some(12));
        assert_eq!(layer_of("head.weight"), None);
    }
}
