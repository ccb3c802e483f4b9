//! The MLP storage of a FiPS ViT: one basis U per group of blocks, and per block the sparse
//! factors of fc1 and fc2 (values and 0/1 masks) and the biases.
//!
//! Checkpoint keys (the rest of the model keeps timm's keys):
//! - `fips.bases` `(groups, dim, rank)`: every group's U, stored once;
//! - `fips.block_group` `(depth,)`: the group of each block;
//! - `blocks.{i}.mlp.fc1.v` and `fc1.mask`: the sparse factor V `(rank, hidden)` of fc1, whose
//!   weight is `(U·V)ᵀ`, stored compactly (see [`PackedSlot`]): its kept values `(nnz,)` and its
//!   mask as bits, U8 `(rank, ⌈hidden/8⌉)`; `fc1.bias` `(hidden,)`. The same under `fc2`, whose
//!   weight is `U·V`, with `fc2.bias` `(dim,)`.
//!
//! The masks are applied in the forward pass, so a pruned entry has no effect and no gradient.
pub use super::vit::FipsDecl;
use super::vit::{VitConfig, VitMlps};
use super::{FipsPlanInfo, ModelInfo};
use crate::base::{Mat, SpinDtype};
use crate::device::{fill_linear, SpinDevice};
use crate::error::Error;
use crate::kernels::blocks::HostLinear;
use crate::nn::functional::gelu;
use crate::nn::init::reset_trunc_normal;
use crate::nn::param::{param1, param2, PackedSlot, ParamSlot, Slot};
use crate::nn::storage::vec_fields;
use dfdx::prelude::*;
use dfdx::tensor::Tape;
use spin_rules::counts::mlp_params;
use spin_rules::fips::{mask_bytes, model_params, MATRICES_PER_BLOCK};

/// A tensor dimension fixed when the model is made (rank, number of groups, depth), not in the
/// type: FiPS picks its rank from a budget at run time. dfdx 0.13 registers only tensors whose
/// shape is `ConstShape`, so this dim says it is const with `SIZE = 0` while it carries its real
/// size; only runtime-checked reshapes (`reshape_like`) are ever applied to it, and the `reset`
/// functions below give freshly built tensors the declared size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MadeDim(pub usize);

impl Dim for MadeDim {
    fn size(&self) -> usize {
        self.0
    }
    fn from_size(size: usize) -> Option<Self> {
        Some(Self(size))
    }
}

impl ConstDim for MadeDim {
    const SIZE: usize = 0;
}

/// `(rank, Hidden)`: the shape of one V.
pub type FactorShape<C> = (MadeDim, <C as VitConfig>::Hidden);

/// The size a tensor keeps when reset, or for a freshly built one (size 0) the declared size.
fn made(current: usize, declared: Option<usize>) -> MadeDim {
    MadeDim(if current > 0 {
        current
    } else {
        declared.unwrap_or(0)
    })
}

fn reset_factor<C: VitConfig, E: SpinDtype, D: SpinDevice<E>>(
    t: &mut Tensor<FactorShape<C>, E, D>,
) -> Result<(), D::Err> {
    let shape = (made(t.shape().0 .0, C::FIPS.map(|f| f.rank)), Default::default());
    *t = t.device().try_zeros_like(&shape)?;
    reset_trunc_normal(t)
}

fn reset_mask<C: VitConfig, E: SpinDtype, D: SpinDevice<E>>(
    t: &mut Tensor<FactorShape<C>, E, D>,
) -> Result<(), D::Err> {
    let shape = (made(t.shape().0 .0, C::FIPS.map(|f| f.rank)), Default::default());
    *t = t.device().try_ones_like(&shape)?;
    Ok(())
}

fn reset_bases<C: VitConfig, E: SpinDtype, D: SpinDevice<E>>(
    t: &mut Tensor<(MadeDim, C::Dim, MadeDim), E, D>,
) -> Result<(), D::Err> {
    let &(g, _, r) = t.shape();
    let shape = (
        made(g.0, C::FIPS.map(|f| f.groups.len())),
        Default::default(),
        made(r.0, C::FIPS.map(|f| f.rank)),
    );
    *t = t.device().try_zeros_like(&shape)?;
    reset_trunc_normal(t)
}

fn reset_block_group<C: VitConfig, E: SpinDtype, D: SpinDevice<E>>(
    t: &mut Tensor<(MadeDim,), E, D>,
) -> Result<(), D::Err> {
    if t.shape().0 .0 == C::DEPTH && C::FIPS.is_none() {
        return Ok(()); // storage made at run time: its groups are its own
    }
    let mut v = vec![E::cast(0.0); C::DEPTH];
    if let Some(f) = C::FIPS {
        for (g, blocks) in f.groups.iter().enumerate() {
            for &b in blocks.iter() {
                v[b] = E::cast(g as f64);
            }
        }
    }
    *t = t.device().try_tensor_from_vec(v, (MadeDim(C::DEPTH),))?;
    Ok(())
}

/// One block's FiPS MLP: fc1 = (U·(v1 ⊙ m1))ᵀ with bias b1, fc2 = U·(v2 ⊙ m2) with bias b2.
#[derive(Clone, Debug)]
pub struct FipsLayer<C: VitConfig, E: Dtype, D: Storage<E>> {
    /// fc1's factor V.
    pub v1: Tensor<FactorShape<C>, E, D>,
    /// fc1's 0/1 mask (not trained).
    pub m1: Tensor<FactorShape<C>, E, D>,
    /// fc1's bias.
    pub b1: Tensor<(C::Hidden,), E, D>,
    /// fc2's factor V.
    pub v2: Tensor<FactorShape<C>, E, D>,
    /// fc2's 0/1 mask (not trained).
    pub m2: Tensor<FactorShape<C>, E, D>,
    /// fc2's bias.
    pub b2: Tensor<(C::Dim,), E, D>,
}

impl<C: VitConfig, E: SpinDtype, D: SpinDevice<E>> TensorCollection<E, D> for FipsLayer<C, E, D> {
    type To<E2: Dtype, D2: Device<E2>> = FipsLayer<C, E2, D2>;
    fn iter_tensors<V: ModuleVisitor<Self, E, D>>(
        visitor: &mut V,
    ) -> Result<Option<Self::To<V::E2, V::D2>>, V::Err> {
        let factor = || TensorOptions::reset_with(reset_factor::<C, E, D>);
        let mask = || TensorOptions::detached(reset_mask::<C, E, D>);
        visitor.visit_fields(
            (
                Self::tensor("v1", |s| &s.v1, |s| &mut s.v1, factor()),
                Self::tensor("m1", |s| &s.m1, |s| &mut s.m1, mask()),
                Self::tensor("b1", |s| &s.b1, |s| &mut s.b1, TensorOptions::reset_to_zeros()),
                Self::tensor("v2", |s| &s.v2, |s| &mut s.v2, factor()),
                Self::tensor("m2", |s| &s.m2, |s| &mut s.m2, mask()),
                Self::tensor("b2", |s| &s.b2, |s| &mut s.b2, TensorOptions::reset_to_zeros()),
            ),
            |(v1, m1, b1, v2, m2, b2)| FipsLayer {
                v1,
                m1,
                b1,
                v2,
                m2,
                b2,
            },
        )
    }
}

/// A FiPS ViT's MLPs: `bases` holds every group's U `(groups, Dim, rank)`, `block_group` the group
/// of each block (a detached tensor, so it travels with the model through dfdx's conversions),
/// `layers` the per-block factors.
#[derive(Clone, Debug)]
pub struct FipsMlps<C: VitConfig, E: Dtype, D: Storage<E>> {
    /// Every group's basis U, `(groups, Dim, rank)`.
    pub bases: Tensor<(MadeDim, C::Dim, MadeDim), E, D>,
    /// The group of each block (detached).
    pub block_group: Tensor<(MadeDim,), E, D>,
    /// Each block's factors and biases.
    pub layers: Vec<FipsLayer<C, E, D>>,
}

impl<C: VitConfig, E: SpinDtype, D: SpinDevice<E>> TensorCollection<E, D> for FipsMlps<C, E, D> {
    type To<E2: Dtype, D2: Device<E2>> = FipsMlps<C, E2, D2>;
    fn iter_tensors<V: ModuleVisitor<Self, E, D>>(
        visitor: &mut V,
    ) -> Result<Option<Self::To<V::E2, V::D2>>, V::Err> {
        let names: Vec<String> = (0..C::DEPTH).map(|i| i.to_string()).collect();
        visitor.visit_fields(
            (
                Self::tensor(
                    "bases",
                    |s| &s.bases,
                    |s| &mut s.bases,
                    TensorOptions::reset_with(reset_bases::<C, E, D>),
                ),
                Self::tensor(
                    "block_group",
                    |s| &s.block_group,
                    |s| &mut s.block_group,
                    TensorOptions::detached(reset_block_group::<C, E, D>),
                ),
                vec_fields::<Self, _, E, D>(&names, |s| &s.layers, |s| &mut s.layers),
            ),
            |(bases, block_group, layers)| FipsMlps {
                bases,
                block_group,
                layers,
            },
        )
    }
}

impl<C: VitConfig, E: SpinDtype, D: SpinDevice<E>> FipsMlps<C, E, D> {
    /// Storage for `groups` bases of rank `rank`, zero factors, all-ones masks, and block `i` in
    /// group `group_of[i]` (what a checkpoint is loaded into).
    pub fn zeros(dev: &D, group_of: &[usize], groups: usize, rank: usize) -> Self {
        let shape: FactorShape<C> = (MadeDim(rank), Default::default());
        let layers = (0..C::DEPTH)
            .map(|_| FipsLayer {
                v1: dev.zeros_like(&shape),
                m1: dev.ones_like(&shape),
                b1: dev.zeros(),
                v2: dev.zeros_like(&shape),
                m2: dev.ones_like(&shape),
                b2: dev.zeros(),
            })
            .collect();
        Self {
            bases: dev.zeros_like(&(MadeDim(groups), Default::default(), MadeDim(rank))),
            block_group: dev.tensor_from_vec(
                group_of.iter().map(|&g| E::cast(g as f64)).collect(),
                (MadeDim(C::DEPTH),),
            ),
            layers,
        }
    }

    /// The number of groups and the rank.
    pub fn groups_and_rank(&self) -> (usize, usize) {
        let s = self.bases.shape();
        (s.0 .0, s.2 .0)
    }

    /// The group of every block.
    pub fn group_of(&self) -> Vec<usize> {
        self.block_group
            .as_vec()
            .iter()
            .map(|g| g.as_f64().round() as usize)
            .collect()
    }

    /// The plan's groups, rebuilt from `block_group`.
    pub fn groups(&self) -> Vec<Vec<usize>> {
        let (g, _) = self.groups_and_rank();
        let mut out = vec![Vec::new(); g];
        for (b, k) in self.group_of().into_iter().enumerate() {
            if k < g {
                out[k].push(b);
            }
        }
        out
    }

    /// Zeroes every masked-out entry of the V's (after an optimiser step whose weight decay or
    /// momentum could have moved them).
    pub fn apply_masks(&mut self) {
        for l in self.layers.iter_mut() {
            for (v, m) in [(&mut l.v1, &l.m1), (&mut l.v2, &l.m2)] {
                let kept: Vec<E> = v.as_vec().iter().zip(m.as_vec()).map(|(&x, m)| x * m).collect();
                v.copy_from(&kept);
            }
        }
    }

    /// Non-zeros kept by the masks, over all V's.
    pub fn nonzeros(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| [&l.m1, &l.m2])
            .map(|m| m.as_vec().iter().filter(|x| x.as_f64() != 0.0).count())
            .sum()
    }

    /// The fraction of V entries pruned.
    pub fn sparsity(&self) -> f64 {
        let (_, r) = self.groups_and_rank();
        let total = MATRICES_PER_BLOCK * C::DEPTH * r * C::Hidden::SIZE;
        1.0 - self.nonzeros() as f64 / total.max(1) as f64
    }

    /// Checks what a checkpoint cannot: block groups in range, masks of zeros and ones, and the V's
    /// zero wherever their mask is.
    pub fn check(&self) -> Result<(), Error> {
        let (g, _) = self.groups_and_rank();
        for (b, v) in self.block_group.as_vec().iter().enumerate() {
            let k = v.as_f64();
            if k < 0.0 || k.fract() != 0.0 || k as usize >= g {
                return Err(Error::Invalid(format!(
                    "fips.block_group[{b}] = {k} is not a group index below {g}"
                )));
            }
        }
        for (i, l) in self.layers.iter().enumerate() {
            for (name, v, m) in [("fc1", &l.v1, &l.m1), ("fc2", &l.v2, &l.m2)] {
                let (v, m) = (v.as_vec(), m.as_vec());
                if let Some(x) = m.iter().map(|x| x.as_f64()).find(|&x| x != 0.0 && x != 1.0) {
                    return Err(Error::Invalid(format!(
                        "blocks.{i}.mlp.{name}.mask holds {x}: a mask holds only 0 and 1"
                    )));
                }
                if v.iter()
                    .zip(&m)
                    .any(|(x, m)| m.as_f64() == 0.0 && x.as_f64() != 0.0)
                {
                    return Err(Error::Invalid(format!(
                        "blocks.{i}.mlp.{name}.v is non-zero where its mask prunes it"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Block `layer`'s U on the caller's tape, `(Dim, rank)`.
    fn basis<T: Tape<E, D>>(&self, layer: usize, dev: &D) -> Tensor<Mat, E, D, T> {
        let g = self.block_group.as_vec()[layer].as_f64().round() as usize;
        let (_, r) = self.groups_and_rank();
        self.bases
            .retaped::<T>()
            .select(dev.tensor(g))
            .reshape_like(&(C::Dim::SIZE, r))
    }

    /// fc1's and fc2's weights as FiPS forms them, `U·(v ⊙ m)`, each `(Dim, Hidden)`.
    pub fn weights<T: Tape<E, D> + Merge<T>>(
        &self,
        layer: usize,
        dev: &D,
    ) -> (Tensor<Mat, E, D, T>, Tensor<Mat, E, D, T>) {
        let l = &self.layers[layer];
        let (_, r) = self.groups_and_rank();
        let h = C::Hidden::SIZE;
        let masked = |v: &Tensor<FactorShape<C>, E, D>, m: &Tensor<FactorShape<C>, E, D>| {
            param2::<_, _, _, T>(v, r, h) * m.clone().reshape_like(&(r, h))
        };
        let w1 = self.basis::<T>(layer, dev).matmul(masked(&l.v1, &l.m1));
        let w2 = self.basis::<T>(layer, dev).matmul(masked(&l.v2, &l.m2));
        (w1, w2)
    }

    /// The parameters a FiPS ViT stores for its MLPs: each U once, the V's non-zeros, the biases.
    pub fn params(&self) -> usize {
        let (g, r) = self.groups_and_rank();
        g * C::Dim::SIZE * r + self.nonzeros() + C::DEPTH * (C::Hidden::SIZE + C::Dim::SIZE)
    }
}

impl<C: VitConfig, E: SpinDtype, D: SpinDevice<E>> VitMlps<C, E, D> for FipsMlps<C, E, D> {
    fn forward<T: Tape<E, D> + Merge<T>>(
        &self,
        layer: usize,
        x: Tensor<Mat, E, D, T>,
    ) -> Tensor<Mat, E, D, T> {
        let dev = x.device().clone();
        let rows = x.shape().0;
        let (d, h) = (C::Dim::SIZE, C::Hidden::SIZE);
        let (w1, w2) = self.weights::<T>(layer, &dev);
        let l = &self.layers[layer];
        let a = x.matmul(w1) + param1::<_, _, _, T>(&l.b1).broadcast_like::<_, Axis<0>>(&(rows, h));
        gelu(a).matmul(w2.permute()) + param1::<_, _, _, T>(&l.b2).broadcast_like::<_, Axis<0>>(&(rows, d))
    }

    fn host_weights(&self, layer: usize, fc1: &mut HostLinear<E>, fc2: &mut HostLinear<E>) {
        // U·(V ⊙ M): fc1's weight comes out (in, out), fc2's (out, in) as PyTorch's.
        let (w1, w2) = self.weights::<NoneTape>(layer, &self.bases.device().clone());
        let l = &self.layers[layer];
        fill_linear(fc1, &w1, &l.b1, true);
        fill_linear(fc2, &w2, &l.b2, false);
    }

    fn slots(&mut self) -> Vec<Slot<'_, E>> {
        fn one<E>(key: String, tensor: &mut dyn ParamSlot<E>) -> Slot<'_, E> {
            Slot {
                keys: vec![key],
                tensor,
            }
        }
        let mut out = vec![
            one("fips.bases".into(), &mut self.bases),
            one("fips.block_group".into(), &mut self.block_group),
        ];
        for (i, l) in self.layers.iter_mut().enumerate() {
            out.push(one(format!("blocks.{i}.mlp.fc1.bias"), &mut l.b1));
            out.push(one(format!("blocks.{i}.mlp.fc2.bias"), &mut l.b2));
        }
        out
    }

    fn packed_slots(&mut self) -> Vec<PackedSlot<'_, E>> {
        let mut out = Vec::with_capacity(2 * self.layers.len());
        for (i, l) in self.layers.iter_mut().enumerate() {
            for (fc, v, m) in [("fc1", &mut l.v1, &mut l.m1), ("fc2", &mut l.v2, &mut l.m2)] {
                out.push(PackedSlot {
                    values_key: format!("blocks.{i}.mlp.{fc}.v"),
                    mask_key: format!("blocks.{i}.mlp.{fc}.mask"),
                    values: v,
                    mask: m,
                });
            }
        }
        out
    }

    fn check(&self) -> Result<(), Error> {
        FipsMlps::check(self)
    }

    fn describe(&self, info: &mut ModelInfo) {
        let dense = info.depth * mlp_params(C::Dim::SIZE, C::Hidden::SIZE);
        info.params = info.params - dense + self.params();
        let (_, r) = self.groups_and_rank();
        info.buffers += C::DEPTH;
        info.mask_bytes = mask_bytes(C::DEPTH, r, C::Hidden::SIZE);
        info.share = "fips";
        info.pattern = format!("fips r{r}");
        // The plan a FiPS model made at run time holds: its groups and rank are the storage's;
        // budget and sparsity those of a declaration, or as measured.
        let declared = C::FIPS.filter(|f| f.rank == r);
        info.fips = Some(FipsPlanInfo {
            groups: self.groups(),
            budget: declared.map_or(self.params() as f64 / dense.max(1) as f64, |f| f.budget),
            sparsity: declared.map_or(self.sparsity(), |f| f.sparsity),
            rank: r,
        });
    }
}

/// The description of a declared FiPS ViT: the dense ViT's with the MLPs counted as FiPS stores
/// them at the declared rank and sparsity.
pub fn info<C: VitConfig>() -> ModelInfo {
    let mut i = super::vit::info::<C>();
    if let Some(f) = C::FIPS {
        let (d, h) = (C::Dim::SIZE, C::Hidden::SIZE);
        i.params = model_params(i.params, d, h, C::DEPTH, f.groups.len(), f.rank, f.sparsity);
        i.buffers += C::DEPTH;
        i.mask_bytes = mask_bytes(C::DEPTH, f.rank, h);
        i.share = "fips";
        i.pattern = format!("fips r{}", f.rank);
        i.fips = Some(FipsPlanInfo {
            groups: f.groups.iter().map(|g| g.to_vec()).collect(),
            budget: f.budget,
            sparsity: f.sparsity,
            rank: f.rank,
        });
    }
    i
}
