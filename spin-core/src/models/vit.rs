//! ViT/DeiT as timm's `VisionTransformer`, with SPIN's sharing.
//!
//! patch embedding → prepend the cls token → add the position embedding → pre-norm blocks
//! `x + attn(norm1(x))`, `x + mlp(norm2(x))` → final LayerNorm → cls-token pooling → head.
pub use super::vit_config::{info, FipsDecl, VitConfig};
pub use super::vit_mlps::{DenseMlps, VitMlps};
use super::ModelInfo;
use crate::base::{Mat, Nchw, SpinDtype};
use crate::device::{buffer_keys, fill_linear, to_host, BlockCache, SpinDevice, VitBlockParams};
use crate::kernels::blocks::VitBlockHost;
use crate::nn::functional::{attention_heads, linear, linear_gelu, linear_residual, residual, vit_blocks};
use crate::nn::init::reset_trunc_normal;
use crate::nn::layers::{Attention, LayerNorm, Mlp, PatchConv, VitLinear};
use crate::nn::param::{param1, param2, push_slots, PackedSlot, ParamSlot, Slot, TimmKeys};
use crate::nn::storage::{names, vec_fields};
use dfdx::prelude::*;
use dfdx::tensor::Tape;
use spin_rules::{count, slot, users};
use std::marker::PhantomData;

/// A fused (weight, bias) pair of one Linear, from outside the model (fusion-aware training).
pub type FusedLinear<E, D, T> = (Tensor<Mat, E, D, T>, Tensor<(usize,), E, D, T>);

/// One block's Linears given from outside instead of the stored ones: attention's (qkv, proj)
/// and the MLP's (fc1, fc2), each when set (see [`crate::fusion::FusionVit`]).
pub struct FusedBlock<E: Dtype, D: Storage<E>, T> {
    /// qkv and proj.
    pub attn: Option<(FusedLinear<E, D, T>, FusedLinear<E, D, T>)>,
    /// fc1 and fc2.
    pub mlp: Option<(FusedLinear<E, D, T>, FusedLinear<E, D, T>)>,
}

/// A built ViT; block parts are stored per group or per layer (see [`crate::nn::storage`]), the MLPs
/// as `M` says.
///
/// ```
/// use spin_core::prelude::*;
///
/// #[vit(dim = 32, heads = 2, patch = 4, image = 16, classes = 10)]
/// #[shared_blocks(depth = 4, groups = 1, pattern = sequential, share = all)]
/// struct Albert;
///
/// let dev = Cpu::default();
/// let vit = dev.build_module::<Albert, f32>();
/// assert_eq!((vit.attn.len(), vit.norm1.len(), vit.mlp.len()), (1, 1, 1));
/// let tokens = vit.forward_features(dev.zeros::<Rank4<2, 3, 16, 16>>());
/// assert_eq!(tokens.shape().1.size(), 17); // 16 patches and the cls token
/// ```
#[derive(Debug)]
pub struct Vit<C: VitConfig, E: Dtype, D: Storage<E>, M = DenseMlps<C, E, D>> {
    /// The patch embedding (`patch_embed.proj`).
    pub patch_embed: PatchConv<C::Dim, C::Patch, E, D>,
    /// The class token.
    pub cls_token: Tensor<(Const<1>, Const<1>, C::Dim), E, D>,
    /// The position embedding, cls token included.
    pub pos_embed: Tensor<(Const<1>, C::Tokens, C::Dim), E, D>,
    /// LayerNorm before attention (`blocks.i.norm1`).
    pub norm1: Vec<LayerNorm<C::Dim, E, D>>,
    /// Attention (`blocks.i.attn`).
    pub attn: Vec<Attention<C::Dim, C::Qkv, E, D>>,
    /// LayerNorm before the MLP (`blocks.i.norm2`).
    pub norm2: Vec<LayerNorm<C::Dim, E, D>>,
    /// The blocks' MLPs (`blocks.i.mlp`), dense or FiPS factors.
    pub mlp: M,
    /// The final LayerNorm.
    pub norm: LayerNorm<C::Dim, E, D>,
    /// The classifier (`head`).
    pub head: VitLinear<C::Dim, C::Classes, E, D>,
    /// The blocks' weights laid out for the fused inference kernels, kept between calls.
    infer: BlockCache<Vec<VitBlockHost<E>>, Vit<C, E, D, M>>,
    _config: PhantomData<C>,
}

impl<C: VitConfig, E: Dtype, D: Storage<E>, M: Clone> Clone for Vit<C, E, D, M> {
    fn clone(&self) -> Self {
        Self {
            patch_embed: self.patch_embed.clone(),
            cls_token: self.cls_token.clone(),
            pos_embed: self.pos_embed.clone(),
            norm1: self.norm1.clone(),
            attn: self.attn.clone(),
            norm2: self.norm2.clone(),
            mlp: self.mlp.clone(),
            norm: self.norm.clone(),
            head: self.head.clone(),
            infer: BlockCache::default(),
            _config: PhantomData,
        }
    }
}

impl<C: VitConfig, E: SpinDtype, D: SpinDevice<E>, M: TensorCollection<E, D>> TensorCollection<E, D>
    for Vit<C, E, D, M>
{
    type To<E2: Dtype, D2: Device<E2>> = Vit<C, E2, D2, M::To<E2, D2>>;

    fn iter_tensors<V: ModuleVisitor<Self, E, D>>(
        visitor: &mut V,
    ) -> Result<Option<Self::To<V::E2, V::D2>>, V::Err> {
        let s = C::SHARE;
        let (dn, gn) = (C::DEPTH, C::GROUPS);
        let n1 = names("norm1", count(s.norms(), dn, gn));
        let at = names("attn", count(s.attn(), dn, gn));
        let n2 = names("norm2", count(s.norms(), dn, gn));
        visitor.visit_fields(
            (
                (
                    Self::module("patch_embed", |s| &s.patch_embed, |s| &mut s.patch_embed),
                    Self::tensor(
                        "cls_token",
                        |s| &s.cls_token,
                        |s| &mut s.cls_token,
                        TensorOptions::reset_with(reset_trunc_normal),
                    ),
                    Self::tensor(
                        "pos_embed",
                        |s| &s.pos_embed,
                        |s| &mut s.pos_embed,
                        TensorOptions::reset_with(reset_trunc_normal),
                    ),
                ),
                vec_fields::<Self, _, E, D>(&n1, |s| &s.norm1, |s| &mut s.norm1),
                vec_fields::<Self, _, E, D>(&at, |s| &s.attn, |s| &mut s.attn),
                vec_fields::<Self, _, E, D>(&n2, |s| &s.norm2, |s| &mut s.norm2),
                (
                    Self::module("mlp", |s| &s.mlp, |s| &mut s.mlp),
                    Self::module("norm", |s| &s.norm, |s| &mut s.norm),
                    Self::module("head", |s| &s.head, |s| &mut s.head),
                ),
            ),
            |((patch_embed, cls_token, pos_embed), norm1, attn, norm2, (mlp, norm, head))| Vit {
                patch_embed,
                cls_token,
                pos_embed,
                norm1,
                attn,
                norm2,
                mlp,
                norm,
                head,
                infer: BlockCache::default(),
                _config: PhantomData,
            },
        )
    }
}

impl<C: VitConfig, E: SpinDtype, D: SpinDevice<E>, M: VitMlps<C, E, D>> Vit<C, E, D, M> {
    /// The model's description (the MLP storage corrects the counts).
    pub fn info(&self) -> ModelInfo {
        let mut i = info::<C>();
        self.mlp.describe(&mut i);
        i
    }

    /// The same model with other MLP storage (e.g. FiPS factors made from these MLPs).
    pub fn with_mlps<M2>(self, mlp: M2) -> Vit<C, E, D, M2> {
        Vit {
            patch_embed: self.patch_embed,
            cls_token: self.cls_token,
            pos_embed: self.pos_embed,
            norm1: self.norm1,
            attn: self.attn,
            norm2: self.norm2,
            mlp,
            norm: self.norm,
            head: self.head,
            infer: BlockCache::default(),
            _config: PhantomData,
        }
    }

    /// Each block's MLP input (its normalised tokens) and MLP output, on NCHW images: what FiPS's
    /// block-wise reconstruction matches (attention is untouched, so matching the MLP output is
    /// matching the block output).
    pub fn mlp_io(&self, x: Tensor<Nchw, E, D>) -> Vec<(Tensor<Mat, E, D>, Tensor<Mat, E, D>)> {
        let mut out = Vec::with_capacity(C::DEPTH);
        self.blocks(
            x,
            Some(&mut |_, z: &_, y: &_, _: &_| out.push((Tensor::clone(z), Tensor::clone(y)))),
            None,
        );
        out
    }

    /// Every block's output on NCHW images, `(B·N, D)` tokens: what `spin analyze` compares
    /// across layers.
    pub fn block_outputs(&self, x: Tensor<Nchw, E, D>) -> Vec<Tensor<Mat, E, D>> {
        let mut out = Vec::with_capacity(C::DEPTH);
        self.blocks(
            x,
            Some(&mut |_, _: &_, _: &_, x: &Tensor<Mat, E, D>| out.push(x.clone())),
            None,
        );
        out
    }

    /// Embedding and blocks (no final norm) on NCHW images: `(B·N, D)` token features. `observe`
    /// sees each block's MLP input, MLP output and block output; `fused` replaces the stored
    /// Linears of every block (fusion-aware training).
    #[allow(clippy::type_complexity)]
    fn blocks<T: Tape<E, D> + Merge<T>>(
        &self,
        x: Tensor<Nchw, E, D, T>,
        mut observe: Option<
            &mut dyn FnMut(usize, &Tensor<Mat, E, D>, &Tensor<Mat, E, D>, &Tensor<Mat, E, D>),
        >,
        fused: Option<&[FusedBlock<E, D, T>]>,
    ) -> Tensor<Mat, E, D, T> {
        let b = x.shape().0;
        let (d, n) = (C::Dim::SIZE, C::Tokens::SIZE);
        let patches = self.patch_embed.forward(x).reshape_like(&(b, n - 1, d));
        let cls = param2::<_, _, _, T>(&self.cls_token, 1, d)
            .reshape_like(&(d,))
            .broadcast_like::<_, Axes2<0, 1>>(&(b, 1, d));
        let tokens = (cls, patches).concat_along(Axis::<1>);
        let pos = param2::<_, _, _, T>(&self.pos_embed, n, d).broadcast_like::<_, Axis<0>>(&(b, n, d));
        let mut x = (tokens + pos).reshape_like(&(b * n, d));
        let (s, sched) = (C::SHARE, C::SCHEDULE);
        if !T::OWNS_TAPE && observe.is_none() && fused.is_none() {
            // Inference: every block in the device's fused kernel, where it has one.
            let (x0, tape) = x.split_tape();
            let blocks = || {
                self.infer.get(
                    buffer_keys::<_, E, D>(self),
                    || self.clone(),
                    || (0..C::DEPTH).map(|i| self.host_block(i)).collect(),
                )
            };
            if let Some(y) = D::vit_blocks_infer(&x0, b, C::HEADS, &blocks) {
                return y.put_tape(tape);
            }
            x = x0.put_tape(tape);
        } else if T::OWNS_TAPE {
            self.infer.clear();
        }
        let dense: Option<Vec<_>> = (0..C::DEPTH).map(|i| self.mlp.dense(i)).collect();
        if let (true, None, None, Some(mlps)) = (T::OWNS_TAPE, &observe, fused, dense) {
            // Training plain blocks: one op (see `VitBlocksKernel`).
            let params = mlps.into_iter().enumerate().map(|(i, mlp)| {
                let (jn, ja) = (slot(s.norms(), sched, i), slot(s.attn(), sched, i));
                self.block_params(jn, ja, mlp)
            });
            return vit_blocks(x, params.collect(), b, C::HEADS);
        }
        for i in 0..C::DEPTH {
            let (jn, ja) = (slot(s.norms(), sched, i), slot(s.attn(), sched, i));
            let skip = x.with_empty_tape();
            let xn = self.norm1[jn].forward(x);
            let fused_i = fused.map(|f| &f[i]);
            let t = |p: &FusedLinear<E, D, T>| (p.0.with_empty_tape(), p.1.with_empty_tape());
            // Each residual sum is taken into the op before it (one tensor fewer for dfdx).
            x = match fused_i.and_then(|f| f.attn.as_ref()) {
                Some((qkv, proj)) => {
                    let ((qw, qb), (pw, pb)) = (t(qkv), t(proj));
                    linear_residual(attention_heads(xn, b, C::HEADS, qw, qb), pw, pb, skip)
                }
                None => self.attn[ja].forward_residual(xn, skip, b, C::HEADS),
            };
            let skip = x.with_empty_tape();
            let z = self.norm2[jn].forward(x);
            let fused_mlp = fused_i
                .and_then(|f| f.mlp.as_ref())
                .map(|(fc1, fc2)| (t(fc1), t(fc2)));
            let Some(f) = observe.as_mut() else {
                x = match fused_mlp {
                    Some(((w1, b1), (w2, b2))) => linear_residual(linear_gelu(z, w1, b1), w2, b2, skip),
                    None => self.mlp.forward_residual(i, z, skip),
                };
                continue;
            };
            // Observed: the MLP's output on its own as well.
            let z_seen = z.retaped::<NoneTape>();
            let y = match fused_mlp {
                Some(((w1, b1), (w2, b2))) => linear(linear_gelu(z, w1, b1), w2, b2),
                None => self.mlp.forward(i, z),
            };
            let y_seen = y.retaped::<NoneTape>();
            x = residual(y, skip);
            f(i, &z_seen, &y_seen, &x.retaped::<NoneTape>());
        }
        x
    }

    /// A block's parameters on tape `T`: norm group `jn`, attention group `ja`, MLP `mlp`.
    fn block_params<T: Tape<E, D>>(
        &self,
        jn: usize,
        ja: usize,
        mlp: &Mlp<C::Dim, C::Hidden, E, D>,
    ) -> VitBlockParams<E, D, T> {
        let (n1, n2, at) = (&self.norm1[jn], &self.norm2[jn], &self.attn[ja]);
        VitBlockParams {
            norm1: (param1(&n1.weight), param1(&n1.bias)),
            qkv: (at.qkv.w(), at.qkv.b()),
            proj: (at.proj.w(), at.proj.b()),
            norm2: (param1(&n2.weight), param1(&n2.bias)),
            fc1: (mlp.fc1.w(), mlp.fc1.b()),
            fc2: (mlp.fc2.w(), mlp.fc2.b()),
        }
    }

    /// Block `i`'s weights on the host, as the fused inference kernel takes them.
    fn host_block(&self, i: usize) -> VitBlockHost<E> {
        let (s, sched) = (C::SHARE, C::SCHEDULE);
        let (jn, ja) = (slot(s.norms(), sched, i), slot(s.attn(), sched, i));
        let (n1, n2, at) = (&self.norm1[jn], &self.norm2[jn], &self.attn[ja]);
        let mut w = VitBlockHost::default();
        to_host(&n1.weight, &mut w.norm1.0);
        to_host(&n1.bias, &mut w.norm1.1);
        to_host(&n2.weight, &mut w.norm2.0);
        to_host(&n2.bias, &mut w.norm2.1);
        fill_linear(&mut w.qkv, &at.qkv.weight, &at.qkv.bias, false);
        fill_linear(&mut w.proj, &at.proj.weight, &at.proj.bias, false);
        self.mlp.host_weights(i, &mut w.fc1, &mut w.fc2);
        w.pack();
        w
    }

    /// Logits for a runtime-shaped batch `(B, 3, H, W)`; panics if H, W differ from the declared size.
    pub fn forward_dyn<T: Tape<E, D> + Merge<T>>(&self, x: Tensor<Nchw, E, D, T>) -> Tensor<Mat, E, D, T> {
        self.forward_fused(x, None)
    }

    /// Logits with every block's Linears given from outside when `fused` is set (see
    /// [`crate::fusion::FusionVit`]).
    pub fn forward_fused<T: Tape<E, D> + Merge<T>>(
        &self,
        x: Tensor<Nchw, E, D, T>,
        fused: Option<&[FusedBlock<E, D, T>]>,
    ) -> Tensor<Mat, E, D, T> {
        let &(b, c, h, w) = x.shape();
        let img = C::Image::SIZE;
        assert!(
            c == 3 && h == img && w == img,
            "{} takes (B, 3, {img}, {img}) images, got (B, {c}, {h}, {w})",
            C::NAME
        );
        let (d, n) = (C::Dim::SIZE, C::Tokens::SIZE);
        let x = self.norm.forward(self.blocks(x, None, fused));
        let cls = x
            .reshape_like(&(b, n, d))
            .slice((.., 0..1, ..))
            .reshape_like(&(b, d));
        self.head.forward(cls)
    }

    /// A ViT has no BatchNorm and no dropout: training and inference forwards are the same.
    pub fn forward_dyn_mut<T: Tape<E, D> + Merge<T>>(
        &mut self,
        x: Tensor<Nchw, E, D, T>,
    ) -> Tensor<Mat, E, D, T> {
        self.forward_dyn(x)
    }

    /// timm's `forward_features`: normalised tokens, cls first, shape in the type.
    pub fn forward_features<B: Dim, T: Tape<E, D> + Merge<T>>(
        &self,
        x: Tensor<(B, Const<3>, C::Image, C::Image), E, D, T>,
    ) -> Tensor<(B, C::Tokens, C::Dim), E, D, T> {
        let b = x.shape().0;
        let img = C::Image::SIZE;
        let y = self
            .norm
            .forward(self.blocks(x.reshape_like(&(b.size(), 3, img, img)), None, None));
        y.reshape_like(&(b, Default::default(), Default::default()))
    }
}

typed_surface!(Vit, VitConfig, M: VitMlps);

impl<C: VitConfig, E: SpinDtype, D: SpinDevice<E>, M: VitMlps<C, E, D>> TimmKeys for Vit<C, E, D, M> {
    type Elem = E;
    fn plan_json(&self) -> Option<String> {
        Some(super::Plan::from_info(&self.info()).to_json())
    }
    fn timm_slots(&mut self) -> Vec<Slot<'_, E>> {
        let (s, sched) = (C::SHARE, C::SCHEDULE);
        let mut out = Vec::new();
        let layers = |shared: bool, j: usize, suffix: &str| -> Vec<String> {
            users(shared, sched, j)
                .into_iter()
                .map(|i| format!("blocks.{i}.{suffix}"))
                .collect()
        };
        push_slots(&mut out, &["patch_embed.proj".into()], self.patch_embed.slots());
        out.push(Slot {
            keys: vec!["cls_token".into()],
            tensor: &mut self.cls_token as &mut dyn ParamSlot<E>,
        });
        out.push(Slot {
            keys: vec!["pos_embed".into()],
            tensor: &mut self.pos_embed as &mut dyn ParamSlot<E>,
        });
        for (j, m) in self.norm1.iter_mut().enumerate() {
            push_slots(&mut out, &layers(s.norms(), j, "norm1"), m.slots());
        }
        for (j, m) in self.attn.iter_mut().enumerate() {
            push_slots(&mut out, &layers(s.attn(), j, "attn"), m.slots());
        }
        for (j, m) in self.norm2.iter_mut().enumerate() {
            push_slots(&mut out, &layers(s.norms(), j, "norm2"), m.slots());
        }
        out.extend(self.mlp.slots());
        push_slots(&mut out, &["norm".into()], self.norm.slots());
        push_slots(&mut out, &["head".into()], self.head.slots());
        out
    }
    fn packed_slots(&mut self) -> Vec<PackedSlot<'_, E>> {
        self.mlp.packed_slots()
    }
    fn check_loaded(&self) -> Result<(), crate::error::Error> {
        self.mlp.check()
    }
}
