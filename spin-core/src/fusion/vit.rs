//! Fusion-aware training for ViTs: SPIN's WFWS with attention, MLP or both shared.
use super::mixer::scalar_fields;
use super::{fuse_into, tensor_map, Reduction};
use crate::base::{Mat, Nchw, SpinDtype};
use crate::device::SpinDevice;
use crate::error::Error;
use crate::models::vit::{info, FusedBlock, FusedLinear, Vit, VitConfig};
use crate::models::{ModelInfo, SpinModel};
use crate::nn::param::{param1, param2, Slot, TimmKeys};
use crate::nn::storage::names;
use dfdx::prelude::*;
use dfdx::tensor::Tape;
use spin_rules::users;
use std::marker::PhantomData;

/// The Linears of a ViT block that fusion reduces, in the order coefficients are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    Qkv,
    Proj,
    Fc1,
    Fc2,
}

impl Part {
    const ALL: [Part; 4] = [Part::Qkv, Part::Proj, Part::Fc1, Part::Fc2];
    fn key(self) -> &'static str {
        match self {
            Part::Qkv => "attn.qkv",
            Part::Proj => "attn.proj",
            Part::Fc1 => "mlp.fc1",
            Part::Fc2 => "mlp.fc2",
        }
    }
}

/// SPIN's fusion-aware ViT: the unshared model `CU` with all D blocks, plus per-layer
/// coefficients for qkv, proj, fc1 and fc2, fused every forward pass into the sharing of `CS`
/// (same dims; attention and/or MLP shared, LayerNorms per layer).
///
/// ```
/// use spin_core::fusion::{FusionVit, FusionVitOf, Reduction};
/// use spin_core::prelude::*;
///
/// #[vit(dim = 16, heads = 2, patch = 4, image = 8, classes = 3, depth = 4)]
/// struct Base;
/// #[vit(dim = 16, heads = 2, patch = 4, image = 8, classes = 3)]
/// #[shared_blocks(depth = 4, groups = 2, pattern = strided, share = attn_mlp)]
/// struct Shared;
///
/// FusionVit::<Base, Shared, f32, Cpu>::check_pair().unwrap();
/// let dev = Cpu::default();
/// let mut wfws = dev.build_module::<FusionVitOf<Base, Shared>, f32>();
/// wfws.reduction = Reduction::ChannelWeightedMean;
/// let shared = wfws.export_fused().unwrap(); // a plain shared ViT
/// assert_eq!(shared.attn.len(), 2);
/// ```
#[derive(Debug)]
pub struct FusionVit<CU: VitConfig, CS: VitConfig, E: Dtype, D: Storage<E>> {
    /// The unshared model: all D blocks train.
    pub base: Vit<CU, E, D>,
    /// α_l per part (qkv, proj, fc1, fc2), one per layer (scalar_weighted_mean).
    pub alpha: [Vec<Tensor<Rank1<1>, E, D>>; 4],
    /// γ_l of qkv, one per output and layer (channel_weighted_mean).
    pub gamma_qkv: Vec<Tensor<(CU::Qkv,), E, D>>,
    /// γ_l of proj.
    pub gamma_proj: Vec<Tensor<(CU::Dim,), E, D>>,
    /// γ_l of fc1.
    pub gamma_fc1: Vec<Tensor<(CU::Hidden,), E, D>>,
    /// γ_l of fc2.
    pub gamma_fc2: Vec<Tensor<(CU::Dim,), E, D>>,
    /// How each group is fused.
    pub reduction: Reduction,
    _shared: PhantomData<CS>,
}

impl<CU: VitConfig, CS: VitConfig, E: Dtype, D: Storage<E>> Clone for FusionVit<CU, CS, E, D> {
    fn clone(&self) -> Self {
        Self {
            base: self.base.clone(),
            alpha: self.alpha.clone(),
            gamma_qkv: self.gamma_qkv.clone(),
            gamma_proj: self.gamma_proj.clone(),
            gamma_fc1: self.gamma_fc1.clone(),
            gamma_fc2: self.gamma_fc2.clone(),
            reduction: self.reduction,
            _shared: PhantomData,
        }
    }
}

impl<CU: VitConfig, CS: VitConfig, E: SpinDtype, D: SpinDevice<E>> TensorCollection<E, D>
    for FusionVit<CU, CS, E, D>
{
    type To<E2: Dtype, D2: Device<E2>> = FusionVit<CU, CS, E2, D2>;
    fn iter_tensors<V: ModuleVisitor<Self, E, D>>(
        visitor: &mut V,
    ) -> Result<Option<Self::To<V::E2, V::D2>>, V::Err> {
        let n = CU::DEPTH;
        let a: [Vec<String>; 4] =
            Part::ALL.map(|p| names(&format!("alpha_{}", p.key().replace('.', "_")), n));
        let g: [Vec<String>; 4] =
            Part::ALL.map(|p| names(&format!("gamma_{}", p.key().replace('.', "_")), n));
        visitor.visit_fields(
            (
                Self::module("base", |s| &s.base, |s| &mut s.base),
                (
                    scalar_fields::<Self, E, D, Rank1<1>>(&a[0], |s| &s.alpha[0], |s| &mut s.alpha[0]),
                    scalar_fields::<Self, E, D, Rank1<1>>(&a[1], |s| &s.alpha[1], |s| &mut s.alpha[1]),
                    scalar_fields::<Self, E, D, Rank1<1>>(&a[2], |s| &s.alpha[2], |s| &mut s.alpha[2]),
                    scalar_fields::<Self, E, D, Rank1<1>>(&a[3], |s| &s.alpha[3], |s| &mut s.alpha[3]),
                ),
                (
                    scalar_fields::<Self, E, D, (CU::Qkv,)>(&g[0], |s| &s.gamma_qkv, |s| &mut s.gamma_qkv),
                    scalar_fields::<Self, E, D, (CU::Dim,)>(&g[1], |s| &s.gamma_proj, |s| &mut s.gamma_proj),
                    scalar_fields::<Self, E, D, (CU::Hidden,)>(&g[2], |s| &s.gamma_fc1, |s| &mut s.gamma_fc1),
                    scalar_fields::<Self, E, D, (CU::Dim,)>(&g[3], |s| &s.gamma_fc2, |s| &mut s.gamma_fc2),
                ),
            ),
            |(base, (a0, a1, a2, a3), (gamma_qkv, gamma_proj, gamma_fc1, gamma_fc2))| FusionVit {
                base,
                alpha: [a0, a1, a2, a3],
                gamma_qkv,
                gamma_proj,
                gamma_fc1,
                gamma_fc2,
                reduction: Reduction::Mean,
                _shared: PhantomData,
            },
        )
    }
}

impl<CU: VitConfig, CS: VitConfig, E: SpinDtype, D: SpinDevice<E>> FusionVit<CU, CS, E, D> {
    /// Checks that `CS` is `CU` with shared attention and/or MLPs (same dims, LayerNorms per
    /// layer).
    pub fn check_pair() -> Result<(), Error> {
        let (u, s) = (info::<CU>(), info::<CS>());
        let same = u.dim == s.dim
            && u.depth == s.depth
            && u.image == s.image
            && u.patch == s.patch
            && u.classes == s.classes
            && u.arch == s.arch
            && u.groups == u.depth
            && CU::FIPS.is_none()
            && CS::FIPS.is_none();
        if !same || CS::SHARE.norms() {
            return Err(Error::Invalid(format!(
                "fusion-aware training needs an unshared ViT and a shared one of the same architecture with \
                 LayerNorms per layer; got {} and {}",
                u.name, s.name
            )));
        }
        Ok(())
    }

    /// Layer `l`'s (weight, bias) of `part` on the caller's tape, its rows scaled by the layer's
    /// coefficients when the reduction has them.
    fn weighted<T: Tape<E, D>>(&self, l: usize, part: Part) -> FusedLinear<E, D, T> {
        let b = &self.base;
        let (d, h) = (CU::Dim::SIZE, CU::Hidden::SIZE);
        let (w, bias) = match part {
            Part::Qkv => (
                param2(&b.attn[l].qkv.weight, 3 * d, d),
                param1(&b.attn[l].qkv.bias),
            ),
            Part::Proj => (param2(&b.attn[l].proj.weight, d, d), param1(&b.attn[l].proj.bias)),
            Part::Fc1 => (param2(&b.mlp[l].fc1.weight, h, d), param1(&b.mlp[l].fc1.bias)),
            Part::Fc2 => (param2(&b.mlp[l].fc2.weight, d, h), param1(&b.mlp[l].fc2.bias)),
        };
        self.scaled(l, part, w, bias)
    }

    fn scaled<T: Tape<E, D>>(
        &self,
        l: usize,
        part: Part,
        w: Tensor<Mat, E, D, T>,
        bias: Tensor<(usize,), E, D, T>,
    ) -> FusedLinear<E, D, T> {
        let (o, i) = *w.shape();
        let k = Part::ALL.iter().position(|p| *p == part).expect("a part");
        let coeff: Option<Tensor<(usize,), E, D, T>> = match self.reduction {
            Reduction::ScalarWeightedMean => Some(
                self.alpha[k][l]
                    .retaped::<T>()
                    .reshape::<Rank0>()
                    .broadcast_like::<_, Axis<0>>(&(o,)),
            ),
            Reduction::ChannelWeightedMean => Some(match part {
                Part::Qkv => param1(&self.gamma_qkv[l]),
                Part::Proj => param1(&self.gamma_proj[l]),
                Part::Fc1 => param1(&self.gamma_fc1[l]),
                Part::Fc2 => param1(&self.gamma_fc2[l]),
            }),
            _ => None,
        };
        match coeff {
            Some(c) => (w * c.broadcast_like::<_, Axis<1>>(&(o, i)), bias),
            None => (w, bias),
        }
    }

    /// Every group's fused (weight, bias) of `part`, on `tape`.
    fn fuse_part<T: Tape<E, D> + Merge<T>>(
        &self,
        part: Part,
        tape: &mut T,
    ) -> Vec<FusedLinear<E, D, NoneTape>> {
        let mut groups = Vec::with_capacity(CS::GROUPS);
        for g in 0..CS::GROUPS {
            let layers = users(true, CS::SCHEDULE, g);
            let take = if self.reduction == Reduction::ChooseFirst {
                1
            } else {
                layers.len()
            };
            let n = E::cast(1.0 / take as f64);
            let mut acc: Option<FusedLinear<E, D, T>> = None;
            for &l in layers.iter().take(take) {
                let (w, b) = self.weighted::<T>(l, part);
                acc = Some(match acc {
                    None => (w, b),
                    Some((aw, ab)) => (aw + w, ab + b),
                });
            }
            let (w, b) = acc.expect("every group has a layer");
            let (w, b) = if take > 1 { (w * n, b * n) } else { (w, b) };
            let (w, tw) = w.split_tape();
            let (b, tb) = b.split_tape();
            *tape = std::mem::take(tape).merge(tw).merge(tb);
            groups.push((w, b));
        }
        groups
    }

    /// Logits with every shared part fused from the current tensors; the fusion's tape is merged
    /// into `x`'s so that it runs once in the backward pass.
    fn logits_impl<T: Tape<E, D> + Merge<T> + Default>(
        &self,
        x: Tensor<Nchw, E, D, T>,
    ) -> Tensor<Mat, E, D, T> {
        let (x, mut tape) = x.split_tape();
        let share = CS::SHARE;
        let attn = share.attn().then(|| {
            (
                self.fuse_part(Part::Qkv, &mut tape),
                self.fuse_part(Part::Proj, &mut tape),
            )
        });
        let mlp = share.mlp().then(|| {
            (
                self.fuse_part(Part::Fc1, &mut tape),
                self.fuse_part(Part::Fc2, &mut tape),
            )
        });
        let pick = |v: &[FusedLinear<E, D, NoneTape>], i: usize| {
            let (w, b) = &v[CS::SCHEDULE[i]];
            (w.retaped::<T>(), b.retaped::<T>())
        };
        let blocks: Vec<FusedBlock<E, D, T>> = (0..CS::DEPTH)
            .map(|i| FusedBlock {
                attn: attn.as_ref().map(|(q, p)| (pick(q, i), pick(p, i))),
                mlp: mlp.as_ref().map(|(f1, f2)| (pick(f1, i), pick(f2, i))),
            })
            .collect();
        self.base.forward_fused(x.put_tape(tape), Some(&blocks))
    }

    /// The plain shared model: fused tensors from the current weights and coefficients, every
    /// other tensor copied; no coefficients are left over.
    pub fn export_fused(&self) -> Result<Vit<CS, E, D>, Error> {
        let dev = self.base.cls_token.device().clone();
        let mut shared = <Vit<CS, E, D> as BuildModule<D, E>>::build(&dev);
        let src = tensor_map(&self.base);
        let values = |t: Vec<E>| t.iter().map(|v| v.as_f64()).collect::<Vec<f64>>();
        let coeffs = |key: &str, l: usize| -> Option<Vec<f64>> {
            let k = Part::ALL
                .iter()
                .position(|p| key == format!("blocks.{l}.{}.weight", p.key()))?;
            match self.reduction {
                Reduction::ScalarWeightedMean => Some(values(self.alpha[k][l].as_vec())),
                Reduction::ChannelWeightedMean => Some(match Part::ALL[k] {
                    Part::Qkv => values(self.gamma_qkv[l].as_vec()),
                    Part::Proj => values(self.gamma_proj[l].as_vec()),
                    Part::Fc1 => values(self.gamma_fc1[l].as_vec()),
                    Part::Fc2 => values(self.gamma_fc2[l].as_vec()),
                }),
                _ => None,
            }
        };
        fuse_into(&mut shared, &src, self.reduction, &coeffs)?;
        Ok(shared)
    }
}

/// The builder of a [`FusionVit`]: `dev.build_module::<FusionVitOf<Base, Shared>, f32>()`.
pub struct FusionVitOf<CU, CS>(PhantomData<(CU, CS)>);
impl<CU: VitConfig, CS: VitConfig, E: SpinDtype, D: SpinDevice<E>> BuildOnDevice<D, E>
    for FusionVitOf<CU, CS>
{
    type Built = FusionVit<CU, CS, E, D>;
}

impl<CU: VitConfig, CS: VitConfig, E: SpinDtype, D: SpinDevice<E>> SpinModel<E, D>
    for FusionVit<CU, CS, E, D>
{
    fn info(&self) -> ModelInfo {
        let mut i = info::<CS>();
        i.params = self.num_trainable_params();
        i
    }
    fn logits<T: Tape<E, D> + Merge<T>>(&self, x: Tensor<Nchw, E, D, T>) -> Tensor<Mat, E, D, T> {
        self.logits_impl(x)
    }
    fn logits_mut<T: Tape<E, D> + Merge<T>>(&mut self, x: Tensor<Nchw, E, D, T>) -> Tensor<Mat, E, D, T> {
        self.logits_impl(x)
    }
    /// The exported shared model, not the training-time tensors.
    fn deployable(&self) -> Result<Box<dyn TimmKeys<Elem = E> + '_>, Error> {
        Ok(Box::new(self.export_fused()?))
    }
}

/// Checkpoints of a fusion-aware ViT are those of its unshared base: `load_timm` takes the
/// pretrained model to start from. Save the result with [`FusionVit::export_fused`].
impl<CU: VitConfig, CS: VitConfig, E: SpinDtype, D: SpinDevice<E>> TimmKeys for FusionVit<CU, CS, E, D> {
    type Elem = E;
    fn timm_slots(&mut self) -> Vec<Slot<'_, E>> {
        self.base.timm_slots()
    }
}
