//! Fusion-aware training for ConvMixers (SPIN's WFWS).
use super::{fuse_into, tensor_map, Reduction};
use crate::base::{Mat, Nchw, SpinDtype};
use crate::device::SpinDevice;
use crate::error::Error;
use crate::models::convmixer::{info, keys, ConvMixer, ConvMixerConfig, Fused};
use crate::models::{ModelInfo, SpinModel};
use crate::nn::param::{param1, param2, Slot, TimmKeys};
use crate::nn::storage::names;
use dfdx::prelude::*;
use dfdx::tensor::Tape;
use spin_rules::users;
use std::marker::PhantomData;

/// SPIN's fusion-aware ConvMixer: the unshared model `CU` with all D tensors, plus per-layer
/// coefficients, fused every forward pass into the sharing of `CS` (same dims; pointwise and/or
/// depthwise shared, BatchNorms per layer).
///
/// ```
/// use spin_core::fusion::{Fusion, FusionMixer, Reduction};
/// use spin_core::prelude::*;
///
/// #[convmixer(dim = 16, kernel = 3, patch = 2, image = 8, classes = 4, depth = 4)]
/// struct Base;
/// #[convmixer(dim = 16, kernel = 3, patch = 2, image = 8, classes = 4)]
/// #[shared_blocks(depth = 4, groups = 2, pattern = sequential)]
/// struct Shared;
///
/// FusionMixer::<Base, Shared, f32, Cpu>::check_pair().unwrap();
/// let dev = Cpu::default();
/// let mut wfws = dev.build_module::<Fusion<Base, Shared>, f32>();
/// wfws.reduction = Reduction::ChannelWeightedMean;
/// let shared = wfws.export_fused().unwrap(); // a plain shared ConvMixer
/// assert_eq!(shared.pw.len(), 2);
/// ```
#[derive(Debug)]
pub struct FusionMixer<CU: ConvMixerConfig, CS: ConvMixerConfig, E: Dtype, D: Storage<E>> {
    /// The unshared model: all D tensors train.
    pub base: ConvMixer<CU, E, D>,
    /// α_l, one per layer (scalar_weighted_mean), for the pointwise and the depthwise conv.
    pub alpha_pw: Vec<Tensor<Rank1<1>, E, D>>,
    /// α_l of the depthwise conv.
    pub alpha_dw: Vec<Tensor<Rank1<1>, E, D>>,
    /// γ_l, one per output channel and layer (channel_weighted_mean).
    pub gamma_pw: Vec<Tensor<(CU::Dim,), E, D>>,
    /// γ_l of the depthwise conv.
    pub gamma_dw: Vec<Tensor<(CU::Dim,), E, D>>,
    /// How each group is fused.
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
pub(super) fn scalar_fields<'a, M, E, D, S>(
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
        let (u, s) = (info::<CU>(), info::<CS>());
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
        x: Tensor<Nchw, E, D, T>,
        pointwise: bool,
    ) -> (Tensor<Nchw, E, D, T>, Vec<Fused<E, D, T>>) {
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
        x: Tensor<Nchw, E, D, T>,
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
            let pointwise = key == format!("{}.weight", keys::block(l, keys::POINTWISE));
            let depthwise = key == format!("{}.weight", keys::block(l, keys::DEPTHWISE));
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
        let mut i = info::<CS>();
        i.params = self.num_trainable_params();
        i
    }
    fn logits<T: Tape<E, D> + Merge<T>>(&self, x: Tensor<Nchw, E, D, T>) -> Tensor<Mat, E, D, T> {
        // The inference path does not touch running statistics; a clone shares all tensors.
        self.clone().logits_impl(x, false)
    }
    fn logits_mut<T: Tape<E, D> + Merge<T>>(&mut self, x: Tensor<Nchw, E, D, T>) -> Tensor<Mat, E, D, T> {
        self.logits_impl(x, true)
    }
    /// The exported shared model, not the training-time tensors.
    fn deployable(&self) -> Result<Box<dyn TimmKeys<Elem = E> + '_>, Error> {
        Ok(Box::new(self.export_fused()?))
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
