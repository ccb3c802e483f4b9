//! Weight fusion (SPIN): a shared model made from a trained unshared one.
//!
//! A *group* is the set of layers that use the same stored copy of a part — for every pattern, the
//! layers the schedule maps to one index (for `sequential`, SPIN's contiguous groups). Each shared
//! tensor is reduced from its group's tensors; everything stored once per layer (and the stem,
//! head and norms) is copied. The reduction works on timm keys, so it serves every family and
//! granularity: a shared model lists, for each stored tensor, the keys of every layer using it.
//!
//! [`FusionMixer`] is SPIN's fusion-aware training (WFWS) for ConvMixers: it keeps all D original
//! tensors and the reduction coefficients, fuses in every forward pass, trains end to end, and
//! [`FusionMixer::export_fused`] writes a plain shared model.
use crate::checkpoint::{Slot, TimmKeys};
use crate::conv::Nhwc;
use crate::convmixer::{ConvMixer, ConvMixerConfig, Fused};
use crate::describe::ModelInfo;
use crate::dtype::{SpinDevice, SpinDtype};
use crate::layers::{param1, param2, Mat};
use crate::sharing::{names, users};
use crate::train::SpinModel;
use crate::Error;
use dfdx::prelude::*;
use dfdx::tensor::Tape;
use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::path::Path;

/// Every tensor of a checkpoint or model by timm key: (shape, values).
pub type TensorMap = BTreeMap<String, (Vec<usize>, Vec<f64>)>;

/// How a group's tensors become one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduction {
    /// The average of the group's tensors.
    Mean,
    /// The first layer's tensor.
    ChooseFirst,
    /// The mean of α_l·W_l, one learnable scalar per layer (initially 1).
    ScalarWeightedMean,
    /// The mean of γ_l[o]·W_l[o, …], one learnable value per output channel and layer (initially 1).
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

/// Reads a safetensors checkpoint into a [`TensorMap`].
pub fn read_checkpoint(path: &Path) -> Result<TensorMap, Error> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    crate::checkpoint::read_tensors(path, &bytes)
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
            let (shape, data) = source.get(key).ok_or_else(|| Error::MissingKey {
                path: src.into(),
                key: key.clone(),
                expected: dims.clone(),
            })?;
            if *shape != dims {
                return Err(Error::Shape {
                    path: src.into(),
                    key: key.clone(),
                    expected: dims.clone(),
                    found: shape.clone(),
                });
            }
            members.push(data.as_slice());
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

// ---------------------------------------------------------------------------------------------
// Fusion-aware training for ConvMixers.

/// SPIN's fusion-aware ConvMixer: the unshared model `CU` with all D tensors, plus per-layer
/// coefficients, fused every forward pass into the sharing of `CS` (same dims; pointwise and/or
/// depthwise shared, BatchNorms per layer).
#[derive(Debug)]
pub struct FusionMixer<CU: ConvMixerConfig, CS: ConvMixerConfig, E: Dtype, D: Storage<E>> {
    pub base: ConvMixer<CU, E, D>,
    /// α_l, one per layer (scalar_weighted_mean), for the pointwise and the depthwise conv.
    pub alpha_pw: Vec<Tensor<Rank1<1>, E, D>>,
    pub alpha_dw: Vec<Tensor<Rank1<1>, E, D>>,
    /// γ_l, one per output channel and layer (channel_weighted_mean).
    pub gamma_pw: Vec<Tensor<(CU::Dim,), E, D>>,
    pub gamma_dw: Vec<Tensor<(CU::Dim,), E, D>>,
    pub reduction: Reduction,
    _shared: PhantomData<CS>,
}

impl<CU: ConvMixerConfig, CS: ConvMixerConfig, E: Dtype, D: Storage<E>> Clone for FusionMixer<CU, CS, E, D> {
    fn clone(&self) -> Self {
        Self {
            base: self.base.clone(),
            alpha_pw: self.alpha_pw.clone(),
            alpha_dw: self.alpha_dw.clone(),
            gamma_pw: self.gamma_pw.clone(),
            gamma_dw: self.gamma_dw.clone(),
            reduction: self.reduction,
            _shared: PhantomData,
        }
    }
}

impl<CU: ConvMixerConfig, CS: ConvMixerConfig, E: SpinDtype, D: SpinDevice<E>> TensorCollection<E, D>
    for FusionMixer<CU, CS, E, D>
{
    type To<E2: Dtype, D2: Device<E2>> = FusionMixer<CU, CS, E2, D2>;
    fn iter_tensors<V: ModuleVisitor<Self, E, D>>(
        visitor: &mut V,
    ) -> Result<Option<Self::To<V::E2, V::D2>>, V::Err> {
        let (a1, a2, g1, g2) = (
            names("alpha_pw", CU::DEPTH),
            names("alpha_dw", CU::DEPTH),
            names("gamma_pw", CU::DEPTH),
            names("gamma_dw", CU::DEPTH),
        );
        visitor.visit_fields(
            (
                Self::module("base", |s| &s.base, |s| &mut s.base),
                scalar_fields::<Self, E, D, Rank1<1>>(&a1, |s| &s.alpha_pw, |s| &mut s.alpha_pw),
                scalar_fields::<Self, E, D, Rank1<1>>(&a2, |s| &s.alpha_dw, |s| &mut s.alpha_dw),
                scalar_fields::<Self, E, D, (CU::Dim,)>(&g1, |s| &s.gamma_pw, |s| &mut s.gamma_pw),
                scalar_fields::<Self, E, D, (CU::Dim,)>(&g2, |s| &s.gamma_dw, |s| &mut s.gamma_dw),
            ),
            |(base, alpha_pw, alpha_dw, gamma_pw, gamma_dw)| FusionMixer {
                base,
                alpha_pw,
                alpha_dw,
                gamma_pw,
                gamma_dw,
                reduction: Reduction::Mean,
                _shared: PhantomData,
            },
        )
    }
}

/// Registers a `Vec` of coefficient tensors (initialised to one).
#[allow(clippy::type_complexity)]
fn scalar_fields<'a, M, E, D, S>(
    names: &'a [String],
    get: fn(&M) -> &Vec<Tensor<S, E, D>>,
    get_mut: fn(&mut M) -> &mut Vec<Tensor<S, E, D>>,
) -> Vec<
    dfdx::nn::tensor_collection::TensorField<
        'a,
        impl FnMut(&M) -> &Tensor<S, E, D>,
        impl FnMut(&mut M) -> &mut Tensor<S, E, D>,
        M,
        S,
        E,
        D,
    >,
>
where
    E: SpinDtype,
    D: SpinDevice<E>,
    M: TensorCollection<E, D>,
    S: ConstShape,
{
    (0..names.len())
        .map(|j| {
            M::tensor(
                &names[j],
                move |s: &M| &get(s)[j],
                move |s: &mut M| &mut get_mut(s)[j],
                TensorOptions::reset_to_ones(),
            )
        })
        .collect()
}

impl<CU: ConvMixerConfig, CS: ConvMixerConfig, E: SpinDtype, D: SpinDevice<E>> FusionMixer<CU, CS, E, D> {
    /// Checks that `CS` is `CU` with shared convolutions (same dims, BatchNorms per layer).
    pub fn check_pair() -> Result<(), Error> {
        let (u, s) = (crate::convmixer::info::<CU>(), crate::convmixer::info::<CS>());
        let same = u.dim == s.dim
            && u.depth == s.depth
            && u.image == s.image
            && u.classes == s.classes
            && u.groups == u.depth;
        if !same || CS::SHARE.norms() || CU::ACT != CS::ACT || CU::VARIANT != CS::VARIANT {
            return Err(Error::Invalid(format!(
                "fusion-aware training needs an unshared model and a shared one of the same architecture with \
                 BatchNorms per layer; got {} and {}",
                u.name, s.name
            )));
        }
        Ok(())
    }

    fn coeff<T: Tape<E, D>>(&self, l: usize, pointwise: bool, c: usize) -> Option<Tensor<(usize,), E, D, T>> {
        match self.reduction {
            Reduction::ScalarWeightedMean => {
                let a = if pointwise {
                    &self.alpha_pw[l]
                } else {
                    &self.alpha_dw[l]
                };
                Some(
                    a.retaped::<T>()
                        .reshape::<Rank0>()
                        .broadcast_like::<_, Axis<0>>(&(c,)),
                )
            }
            Reduction::ChannelWeightedMean => Some(param1(if pointwise {
                &self.gamma_pw[l]
            } else {
                &self.gamma_dw[l]
            })),
            _ => None,
        }
    }

    /// One fused (weight, bias) per layer of the shared model, on the caller's tape: the tape of
    /// the fusion itself is merged into `x`'s so that it runs once in the backward pass.
    fn fuse<T: Tape<E, D> + Merge<T>>(
        &self,
        x: Tensor<Nhwc, E, D, T>,
        pointwise: bool,
    ) -> (Tensor<Nhwc, E, D, T>, Vec<Fused<E, D, T>>) {
        let c = CU::Dim::SIZE;
        let cols = if pointwise {
            c
        } else {
            CU::Kernel::SIZE * CU::Kernel::SIZE
        };
        let (x, mut tape) = x.split_tape();
        let mut groups = Vec::new();
        for g in 0..CS::GROUPS {
            let layers = users(true, CS::SCHEDULE, g);
            let n = E::cast(1.0 / layers.len() as f64);
            let (mut w, mut b): (Option<Tensor<Mat, E, D, T>>, Option<Tensor<(usize,), E, D, T>>) =
                (None, None);
            for (idx, &l) in layers.iter().enumerate() {
                if self.reduction == Reduction::ChooseFirst && idx > 0 {
                    break;
                }
                let (wl, bl) = if pointwise {
                    (
                        param2::<_, _, _, T>(&self.base.pw[l].weight, c, cols),
                        param1::<_, _, _, T>(&self.base.pw[l].bias),
                    )
                } else {
                    (
                        param2::<_, _, _, T>(&self.base.dw[l].weight, c, cols),
                        param1::<_, _, _, T>(&self.base.dw[l].bias),
                    )
                };
                let wl = match self.coeff::<T>(l, pointwise, c) {
                    Some(k) => wl * k.broadcast_like::<_, Axis<1>>(&(c, cols)),
                    None => wl,
                };
                w = Some(match w {
                    None => wl,
                    Some(acc) => acc + wl,
                });
                b = Some(match b {
                    None => bl,
                    Some(acc) => acc + bl,
                });
            }
            let (mut w, mut b) = (w.unwrap(), b.unwrap());
            if self.reduction != Reduction::ChooseFirst {
                w = w * n;
                b = b * n;
            }
            let (w, tw) = w.split_tape();
            let (b, tb) = b.split_tape();
            tape = tape.merge(tw).merge(tb);
            groups.push((w, b));
        }
        let per_layer = (0..CS::DEPTH)
            .map(|i| {
                (
                    groups[CS::SCHEDULE[i]].0.retaped::<T>(),
                    groups[CS::SCHEDULE[i]].1.retaped::<T>(),
                )
            })
            .collect();
        (x.put_tape(tape), per_layer)
    }

    fn logits_impl<T: Tape<E, D> + Merge<T>>(
        &mut self,
        x: Tensor<Nhwc, E, D, T>,
        train: bool,
    ) -> Tensor<Mat, E, D, T> {
        let (x, pw) = if CS::SHARE.pointwise() {
            let (x, f) = self.fuse(x, true);
            (x, Some(f))
        } else {
            (x, None)
        };
        let (x, dw) = if CS::SHARE.depthwise() {
            let (x, f) = self.fuse(x, false);
            (x, Some(f))
        } else {
            (x, None)
        };
        if train {
            self.base.forward_fused_mut(x, pw.as_deref(), dw.as_deref())
        } else {
            self.base.forward_fused(x, pw.as_deref(), dw.as_deref())
        }
    }

    /// The plain shared model: fused tensors from the current weights and coefficients, every
    /// other tensor copied; no coefficients are left over.
    pub fn export_fused(&self) -> Result<ConvMixer<CS, E, D>, Error> {
        let dev = self.base.stem.bias.device().clone();
        let mut shared = <ConvMixer<CS, E, D> as BuildModule<D, E>>::build(&dev);
        let src = tensor_map(&self.base);
        let read = |t: &Tensor<Rank1<1>, E, D>| t.as_vec().iter().map(|v| v.as_f64()).collect::<Vec<f64>>();
        let readc =
            |t: &Tensor<(CU::Dim,), E, D>| t.as_vec().iter().map(|v| v.as_f64()).collect::<Vec<f64>>();
        let coeffs = |key: &str, l: usize| -> Option<Vec<f64>> {
            let pointwise = key == format!("blocks.{l}.1.weight");
            let depthwise = key == format!("blocks.{l}.0.fn.0.weight");
            match (self.reduction, pointwise, depthwise) {
                (Reduction::ScalarWeightedMean, true, _) => Some(read(&self.alpha_pw[l])),
                (Reduction::ScalarWeightedMean, _, true) => Some(read(&self.alpha_dw[l])),
                (Reduction::ChannelWeightedMean, true, _) => Some(readc(&self.gamma_pw[l])),
                (Reduction::ChannelWeightedMean, _, true) => Some(readc(&self.gamma_dw[l])),
                _ => None,
            }
        };
        fuse_into(&mut shared, &src, self.reduction, &coeffs)?;
        Ok(shared)
    }
}

/// The builder of a [`FusionMixer`]: `dev.build_module::<Fusion<Base, Shared>, f32>()`.
pub struct Fusion<CU, CS>(PhantomData<(CU, CS)>);
impl<CU: ConvMixerConfig, CS: ConvMixerConfig, E: SpinDtype, D: SpinDevice<E>> BuildOnDevice<D, E>
    for Fusion<CU, CS>
{
    type Built = FusionMixer<CU, CS, E, D>;
}

impl<CU: ConvMixerConfig, CS: ConvMixerConfig, E: SpinDtype, D: SpinDevice<E>> SpinModel<E, D>
    for FusionMixer<CU, CS, E, D>
{
    fn info(&self) -> ModelInfo {
        let mut i = crate::convmixer::info::<CS>();
        i.params = self.num_trainable_params();
        i
    }
    fn logits<T: Tape<E, D> + Merge<T>>(&self, x: Tensor<Nhwc, E, D, T>) -> Tensor<Mat, E, D, T> {
        // The inference path does not touch running statistics; a clone shares all tensors.
        self.clone().logits_impl(x, false)
    }
    fn logits_mut<T: Tape<E, D> + Merge<T>>(&mut self, x: Tensor<Nhwc, E, D, T>) -> Tensor<Mat, E, D, T> {
        self.logits_impl(x, true)
    }
    /// Saves the exported shared model, not the training-time tensors.
    fn save_deployable(&self, path: &Path, dtype: crate::checkpoint::StorageDtype) -> Result<(), Error> {
        crate::checkpoint::TimmCheckpoint::save_timm_as(&self.export_fused()?, path, dtype)
    }
}

/// Checkpoints of a fusion-aware model are those of its unshared base: `load_timm` takes the
/// pretrained model to start from. Save the result with [`FusionMixer::export_fused`].
impl<CU: ConvMixerConfig, CS: ConvMixerConfig, E: SpinDtype, D: SpinDevice<E>> TimmKeys
    for FusionMixer<CU, CS, E, D>
{
    type Elem = E;
    fn timm_slots(&mut self) -> Vec<Slot<'_, E>> {
        self.base.timm_slots()
    }
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
