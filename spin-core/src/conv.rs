//! The convolutions ConvMixer and ViT need, which dfdx 0.13 only has behind its nightly feature.
//!
//! Layout: activations inside a model are channels-last. A feature map is `(B, H, W, C)` and, viewed
//! as a matrix, `(B·H·W, C)`, so a pointwise 1×1 convolution is one plain matmul and BatchNorm is a
//! per-column affine map. Public inputs stay NCHW as in PyTorch; [`Kernels::patchify`] reads them.
//!
//! On the CPU both ops are hand-written kernels registered on dfdx's tape with
//! `Tape::add_backward_op`, split across cores with rayon. Any other dfdx device (CUDA) gets the
//! fallbacks below, built from dfdx's own ops, so the same model types run there.
use crate::dtype::SpinDtype;
use crate::infer::{self, MixerBlockHost, VitBlockHost, VitScratch};
use crate::layers::Act;
use crate::norm;
use dfdx::prelude::*;
use dfdx::tensor::{Storage, Tape};
use multiversion::multiversion;
use rayon::prelude::*;
use std::sync::Arc;

/// A CPU tensor's values: one memcpy (dfdx's `as_vec` walks strided indices one by one).
pub fn host<S: Shape, E: SpinDtype>(t: &Tensor<S, E, Cpu>) -> Vec<E> {
    let t = t.clone().contiguous();
    let mut v = vec![E::zero(); t.shape().num_elements()];
    t.copy_into(&mut v);
    v
}

/// Shape of a channels-last feature map `(B, H, W, C)` with runtime dims.
pub type Nhwc = (usize, usize, usize, usize);

/// The kernels spin adds to a dfdx device.
pub trait Kernels<E: SpinDtype>: Storage<E> + Sized {
    /// `x · Wᵀ + b` with PyTorch's `(out, in)` weight `w`, `x` `(rows, in)`, for f32 and f64.
    fn linear<T: Tape<E, Self> + Merge<T>>(
        x: Tensor<(usize, usize), E, Self, T>,
        w: Tensor<(usize, usize), E, Self, T>,
        b: Tensor<(usize,), E, Self, T>,
    ) -> Tensor<(usize, usize), E, Self, T>;

    /// Depthwise K×K convolution, stride 1, zero 'same' padding (odd K), with bias.
    /// `x` is `(B, H, W, C)`, `w` is PyTorch's `(C, 1, K, K)` flattened to `(C, K·K)`, `b` is `(C,)`.
    fn dwconv<T: Tape<E, Self> + Merge<T>>(
        x: Tensor<Nhwc, E, Self, T>,
        w: Tensor<(usize, usize), E, Self, T>,
        b: Tensor<(usize,), E, Self, T>,
        k: usize,
    ) -> Result<Tensor<Nhwc, E, Self, T>, Self::Err>;

    /// Cuts an NCHW image batch `(B, Cin, H, W)` into non-overlapping P×P patches, one row per patch
    /// in (b, row, col) order, laid out `(cin, py, px)` like a PyTorch conv weight `(O, Cin, P, P)`:
    /// the result is `(B·(H/P)·(W/P), Cin·P·P)`, so the patch embedding is a single matmul.
    fn patchify<T: Tape<E, Self>>(
        x: Tensor<Nhwc, E, Self, T>,
        p: usize,
    ) -> Result<Tensor<(usize, usize), E, Self, T>, Self::Err>;

    /// Exact (erf) GELU; see [`crate::layers::gelu`].
    fn gelu<S: Shape, T: Tape<E, Self>>(x: Tensor<S, E, Self, T>) -> Tensor<S, E, Self, T>;

    /// `x · s + t` per column of `(rows, C)`.
    fn channel_affine<T: Tape<E, Self> + Merge<T>>(
        x: Tensor<(usize, usize), E, Self, T>,
        s: Tensor<(usize,), E, Self, T>,
        t: Tensor<(usize,), E, Self, T>,
    ) -> Tensor<(usize, usize), E, Self, T>;

    /// BatchNorm of `(rows, C)` with batch statistics; also returns the batch mean and biased variance.
    fn batch_norm_train<T: Tape<E, Self> + Merge<T>>(
        x: Tensor<(usize, usize), E, Self, T>,
        g: Tensor<(usize,), E, Self, T>,
        b: Tensor<(usize,), E, Self, T>,
    ) -> (Tensor<(usize, usize), E, Self, T>, Vec<E>, Vec<E>);

    /// LayerNorm of each row of `(rows, C)`, eps 1e-6.
    fn layer_norm<T: Tape<E, Self> + Merge<T>>(
        x: Tensor<(usize, usize), E, Self, T>,
        g: Tensor<(usize,), E, Self, T>,
        b: Tensor<(usize,), E, Self, T>,
    ) -> Tensor<(usize, usize), E, Self, T>;

    /// Inference only: multi-head attention's core on timm's qkv layout, `qkv` `(B·N, 3·D)` with
    /// columns (3, heads, head_dim) → `softmax(q·kᵀ/√head_dim)·v` as `(B·N, D)`
    /// ([`crate::infer::attention_core`]). `None` where the device has no such kernel.
    fn attention_core_infer(
        _qkv: &Tensor<(usize, usize), E, Self>,
        _batch: usize,
        _heads: usize,
    ) -> Option<Tensor<(usize, usize), E, Self>> {
        None
    }

    /// Inference only: timm encoder blocks on tokens `x` `(B·N, D)`, one per entry of what
    /// `blocks()` returns ([`crate::infer::vit_block`]); `blocks` is only called when the device
    /// and dtype have the kernel. `None` where they do not.
    fn vit_blocks_infer(
        _x: &Tensor<(usize, usize), E, Self>,
        _batch: usize,
        _heads: usize,
        _blocks: &dyn Fn() -> Arc<Vec<VitBlockHost<E>>>,
    ) -> Option<Tensor<(usize, usize), E, Self>> {
        None
    }

    /// Inference only: a ConvMixer trunk's `depth` blocks on `x` `(B·G·G, C)`, block i's weights
    /// from `fill(i, w)`: each block as two fused passes (depthwise + bias + act + folded BN +
    /// residual, then [`crate::infer::pointwise_into`]), on host buffers from the first block to the
    /// last. `None` where the device or dtype has no such kernels.
    fn mixer_blocks_infer(
        _x: &Tensor<(usize, usize), E, Self>,
        _geometry: (usize, usize, usize),
        _depth: usize,
        _pw_residual: bool,
        _fill: &mut dyn FnMut(usize, &mut MixerBlockHost<E>),
    ) -> Option<Tensor<(usize, usize), E, Self>> {
        None
    }

    /// Identifies a tensor's buffer and layout (the addresses of its first element and of the
    /// next one along its last non-unit axis), for [`crate::infer::BlockCache`]; `None` where the
    /// device's buffers are not host memory.
    fn buffer_key<S: Shape>(_t: &Tensor<S, E, Self>) -> Option<[usize; 2]> {
        None
    }
}

/// What a fused inference kernel applies to each raw convolution output `a` of channel j:
/// `act(a + bias[j])·scale[j] + shift[j]`.
pub struct Epilogue<'a, E> {
    pub bias: &'a [E],
    pub scale: &'a [E],
    pub shift: &'a [E],
    pub act: Act,
}

impl<E: SpinDtype> Epilogue<'_, E> {
    /// Applies the epilogue to `a`, the outputs with their bias already added (channels
    /// `c0..c0 + a.len()`), adding `skip` when given.
    #[inline(always)]
    pub(crate) fn apply(&self, out: &mut [E], a: &[E], c0: usize, skip: Option<&[E]>) {
        let n = a.len();
        let (s, t) = (&self.scale[c0..c0 + n], &self.shift[c0..c0 + n]);
        match self.act {
            Act::Gelu => {
                for j in 0..n {
                    out[j] = a[j].gelu_and_grad().0 * s[j] + t[j];
                }
            }
            Act::Relu => {
                for j in 0..n {
                    let v = if a[j] > E::zero() { a[j] } else { E::zero() };
                    out[j] = v * s[j] + t[j];
                }
            }
        }
        if let Some(skip) = skip {
            for j in 0..n {
                out[j] += skip[j];
            }
        }
    }
}

impl<E: SpinDtype> Kernels<E> for Cpu {
    /// Through gemm's AVX-512 kernels (dfdx's matmul stops at AVX2), forward and backward. Other
    /// dtypes than f32 and f64 would take gemm.rs's plain loop: [`crate::layers::linear`] sends
    /// them to dfdx's matmul instead.
    fn linear<T: Tape<E, Self> + Merge<T>>(
        x: Tensor<(usize, usize), E, Self, T>,
        w: Tensor<(usize, usize), E, Self, T>,
        b: Tensor<(usize,), E, Self, T>,
    ) -> Tensor<(usize, usize), E, Self, T> {
        let (x, tx) = x.split_tape();
        let (w, tw) = w.split_tape();
        let (b, tb) = b.split_tape();
        let mut tape = tx.merge(tw).merge(tb);
        let ((rows, inp), (out, w_in)) = (*x.shape(), *w.shape());
        assert_eq!(
            inp, w_in,
            "linear: input has {inp} features, the weight takes {w_in}"
        );
        assert_eq!(
            b.shape().0,
            out,
            "linear: bias size differs from the weight's outputs"
        );
        let ws = host(&w);
        let l = infer::HostLinear {
            wt: transpose(&ws, out, inp),
            b: host(&b),
        };
        let mut y = vec![E::zero(); rows * out];
        infer::linear_rows(&host(&x), &l, &mut y);
        let y = x.device().tensor_from_vec(y, (rows, out));
        if T::OWNS_TAPE {
            let y_keep = y.clone();
            tape.add_backward_op(move |grads| {
                let gy = host(&grads.get(&y_keep));
                // dx = dy · W, dW = dyᵀ · x, db = Σ_rows dy.
                let mut gx = vec![E::zero(); rows * inp];
                crate::gemm::par_matmul(&gy, crate::gemm::MatRef::row_major(&ws, out, inp), &mut gx);
                let gw = crate::gemm::par_matmul_tn(&gy, out, &host(&x), inp);
                let gb = norm::col_sums(rows, out, |r, acc| norm::add_row(acc, &gy[r * out..][..out]));
                accumulate(grads.get_or_alloc_mut(&x)?, &gx);
                accumulate(grads.get_or_alloc_mut(&w)?, &gw);
                let gb: Vec<E> = gb.into_iter().map(E::cast).collect();
                accumulate(grads.get_or_alloc_mut(&b)?, &gb);
                Ok(())
            });
        }
        y.put_tape(tape)
    }

    fn dwconv<T: Tape<E, Self> + Merge<T>>(
        x: Tensor<Nhwc, E, Self, T>,
        w: Tensor<(usize, usize), E, Self, T>,
        b: Tensor<(usize,), E, Self, T>,
        k: usize,
    ) -> Result<Tensor<Nhwc, E, Self, T>, Self::Err> {
        let (x, tx) = x.split_tape();
        let (w, tw) = w.split_tape();
        let (b, tb) = b.split_tape();
        let mut tape = tx.merge(tw).merge(tb);
        let geo = DwGeometry::new(*x.shape(), k);
        assert_eq!(
            w.shape().0,
            geo.c,
            "dwconv: weight has {} channels, input {}",
            w.shape().0,
            geo.c
        );
        assert_eq!(w.shape().1, k * k, "dwconv: weight is not K·K per channel");
        let xs = host(&x);
        let wt = transpose(&host(&w), geo.c, k * k);
        let out = dw_forward(&geo, &xs, &wt, &host(&b), None);
        let y = x.device().tensor_from_vec(out, *x.shape());
        if T::OWNS_TAPE {
            let y_keep = y.clone();
            tape.add_backward_op(move |grads| {
                let gy = host(&grads.get(&y_keep));
                let (gx, gw, gb) = dw_backward(&geo, &xs, &wt, &gy);
                accumulate(grads.get_or_alloc_mut(&x)?, &gx);
                accumulate(grads.get_or_alloc_mut(&w)?, &transpose(&gw, k * k, geo.c));
                accumulate(grads.get_or_alloc_mut(&b)?, &gb);
                Ok(())
            });
        }
        Ok(y.put_tape(tape))
    }

    fn patchify<T: Tape<E, Self>>(
        x: Tensor<Nhwc, E, Self, T>,
        p: usize,
    ) -> Result<Tensor<(usize, usize), E, Self, T>, Self::Err> {
        let (x, mut tape) = x.split_tape();
        let (bn, cin, h, w) = *x.shape();
        assert!(
            h % p == 0 && w % p == 0,
            "patchify: {h}×{w} is not divisible by {p}"
        );
        let idx = patch_index(bn, cin, h, w, p);
        let xs = host(&x);
        let out: Vec<E> = idx.par_iter().map(|&i| xs[i]).collect();
        let shape = (bn * (h / p) * (w / p), cin * p * p);
        let y = x.device().tensor_from_vec(out, shape);
        if T::OWNS_TAPE {
            let y_keep = y.clone();
            tape.add_backward_op(move |grads| {
                let gy = host(&grads.get(&y_keep));
                let gx = grads.get_or_alloc_mut(&x)?;
                // Patches do not overlap: every input element has exactly one output slot.
                for (o, &i) in idx.iter().enumerate() {
                    gx[i] += gy[o];
                }
                Ok(())
            });
        }
        Ok(y.put_tape(tape))
    }

    fn gelu<S: Shape, T: Tape<E, Self>>(x: Tensor<S, E, Self, T>) -> Tensor<S, E, Self, T> {
        let (x, mut tape) = x.split_tape();
        let xs = host(&x);
        // Plain loops over chunks (not a per-element rayon map) so the compiler vectorises them.
        let mut y = vec![E::zero(); xs.len()];
        y.par_chunks_mut(ELEMWISE_CHUNK)
            .zip(xs.par_chunks(ELEMWISE_CHUNK))
            .for_each(|(yo, xi)| gelu_chunk(yo, xi));
        let y = x.device().tensor_from_vec(y, *x.shape());
        if T::OWNS_TAPE {
            let y_keep = y.clone();
            tape.add_backward_op(move |grads| {
                let gy = host(&grads.get(&y_keep));
                let gx = grads.get_or_alloc_mut(&x)?;
                gx.par_chunks_mut(ELEMWISE_CHUNK)
                    .zip(xs.par_chunks(ELEMWISE_CHUNK).zip(gy.par_chunks(ELEMWISE_CHUNK)))
                    .for_each(|(a, (xi, gi))| gelu_grad_chunk(a, xi, gi));
                Ok(())
            });
        }
        y.put_tape(tape)
    }

    fn channel_affine<T: Tape<E, Self> + Merge<T>>(
        x: Tensor<(usize, usize), E, Self, T>,
        s: Tensor<(usize,), E, Self, T>,
        t: Tensor<(usize,), E, Self, T>,
    ) -> Tensor<(usize, usize), E, Self, T> {
        norm::fused3(
            x,
            s,
            t,
            |x, s, t| (norm::affine_fwd(x, s, t), ()),
            |x, s, _, gy| norm::affine_bwd(x, s, gy),
        )
        .0
    }

    fn batch_norm_train<T: Tape<E, Self> + Merge<T>>(
        x: Tensor<(usize, usize), E, Self, T>,
        g: Tensor<(usize,), E, Self, T>,
        b: Tensor<(usize,), E, Self, T>,
    ) -> (Tensor<(usize, usize), E, Self, T>, Vec<E>, Vec<E>) {
        let (y, cache) = norm::fused3(
            x,
            g,
            b,
            |x, g, b| norm::batch_norm_fwd(x, g, b, crate::layers::BN_EPS),
            |x, g, cache, gy| norm::batch_norm_bwd(x, g, cache, gy),
        );
        (y, cache.mean.clone(), cache.var.clone())
    }

    fn layer_norm<T: Tape<E, Self> + Merge<T>>(
        x: Tensor<(usize, usize), E, Self, T>,
        g: Tensor<(usize,), E, Self, T>,
        b: Tensor<(usize,), E, Self, T>,
    ) -> Tensor<(usize, usize), E, Self, T> {
        norm::fused3(
            x,
            g,
            b,
            |x, g, b| norm::layer_norm_fwd(x, g, b, crate::layers::LN_EPS),
            |x, g, stats, gy| norm::layer_norm_bwd(x, g, stats, gy),
        )
        .0
    }

    fn attention_core_infer(
        qkv: &Tensor<(usize, usize), E, Self>,
        batch: usize,
        heads: usize,
    ) -> Option<Tensor<(usize, usize), E, Self>> {
        let (rows, three_d) = *qkv.shape();
        let mut out = vec![E::zero(); rows * three_d / 3];
        infer::attention_core(&host(qkv), &mut out, batch, heads, three_d / 3);
        Some(qkv.device().tensor_from_vec(out, (rows, three_d / 3)))
    }

    fn vit_blocks_infer(
        x: &Tensor<(usize, usize), E, Self>,
        batch: usize,
        heads: usize,
        blocks: &dyn Fn() -> Arc<Vec<VitBlockHost<E>>>,
    ) -> Option<Tensor<(usize, usize), E, Self>> {
        if !crate::gemm::has_kernels::<E>() {
            return None;
        }
        let mut xs = host(x);
        let mut scratch = VitScratch::default();
        for w in blocks().iter() {
            infer::vit_block(&mut xs, w, batch, heads, &mut scratch);
        }
        Some(x.device().tensor_from_vec(xs, *x.shape()))
    }

    fn mixer_blocks_infer(
        x: &Tensor<(usize, usize), E, Self>,
        (b, g, k): (usize, usize, usize),
        depth: usize,
        pw_residual: bool,
        fill: &mut dyn FnMut(usize, &mut MixerBlockHost<E>),
    ) -> Option<Tensor<(usize, usize), E, Self>> {
        if !crate::gemm::has_kernels::<E>() {
            return None;
        }
        let (rows, c) = *x.shape();
        let geo = DwGeometry::new((b, g, g, c), k);
        let mut xs = host(x);
        let mut ys = vec![E::zero(); rows * c];
        let mut w = MixerBlockHost::default();
        for i in 0..depth {
            fill(i, &mut w);
            let epi = Epilogue {
                bias: &w.dw_bias,
                scale: &w.bn1.0,
                shift: &w.bn1.1,
                act: w.act,
            };
            dw_forward_into(&geo, &xs, &w.dw_wt, &w.dw_bias, Some(&epi), &mut ys);
            let epi = Epilogue {
                bias: &w.pw.b,
                scale: &w.bn2.0,
                shift: &w.bn2.1,
                act: w.act,
            };
            infer::pointwise_into(&ys, &w.pw, &epi, pw_residual, &mut xs);
        }
        Some(x.device().tensor_from_vec(xs, (rows, c)))
    }

    fn buffer_key<S: Shape>(t: &Tensor<S, E, Self>) -> Option<[usize; 2]> {
        let shape = *t.shape();
        if shape.num_elements() == 0 {
            return Some([0, 0]);
        }
        let dims = shape.concrete();
        let first = S::Concrete::default();
        let a = &t[first] as *const E as usize;
        let b = match (0..S::NUM_DIMS).rev().find(|&i| dims[i] > 1) {
            Some(axis) => {
                let mut next = first;
                next[axis] = 1;
                &t[next] as *const E as usize
            }
            None => a,
        };
        Some([a, b])
    }
}

#[cfg(feature = "cuda")]
impl<E: SpinDtype> Kernels<E> for dfdx::tensor::Cuda
where
    dfdx::tensor::Cuda: Device<E>,
{
    fn linear<T: Tape<E, Self> + Merge<T>>(
        x: Tensor<(usize, usize), E, Self, T>,
        w: Tensor<(usize, usize), E, Self, T>,
        b: Tensor<(usize,), E, Self, T>,
    ) -> Tensor<(usize, usize), E, Self, T> {
        crate::layers::linear_composed(x, w, b)
    }

    fn dwconv<T: Tape<E, Self> + Merge<T>>(
        x: Tensor<Nhwc, E, Self, T>,
        w: Tensor<(usize, usize), E, Self, T>,
        b: Tensor<(usize,), E, Self, T>,
        k: usize,
    ) -> Result<Tensor<Nhwc, E, Self, T>, Self::Err> {
        dwconv_fallback(x, w, b, k)
    }

    fn patchify<T: Tape<E, Self>>(
        x: Tensor<Nhwc, E, Self, T>,
        p: usize,
    ) -> Result<Tensor<(usize, usize), E, Self, T>, Self::Err> {
        patchify_fallback(x, p)
    }

    fn gelu<S: Shape, T: Tape<E, Self>>(x: Tensor<S, E, Self, T>) -> Tensor<S, E, Self, T> {
        crate::layers::gelu_fallback(x)
    }

    fn channel_affine<T: Tape<E, Self> + Merge<T>>(
        x: Tensor<(usize, usize), E, Self, T>,
        s: Tensor<(usize,), E, Self, T>,
        t: Tensor<(usize,), E, Self, T>,
    ) -> Tensor<(usize, usize), E, Self, T> {
        crate::layers::affine_composed(x, s, t)
    }

    fn batch_norm_train<T: Tape<E, Self> + Merge<T>>(
        x: Tensor<(usize, usize), E, Self, T>,
        g: Tensor<(usize,), E, Self, T>,
        b: Tensor<(usize,), E, Self, T>,
    ) -> (Tensor<(usize, usize), E, Self, T>, Vec<E>, Vec<E>) {
        crate::layers::batch_norm_train_composed(x, g, b)
    }

    fn layer_norm<T: Tape<E, Self> + Merge<T>>(
        x: Tensor<(usize, usize), E, Self, T>,
        g: Tensor<(usize,), E, Self, T>,
        b: Tensor<(usize,), E, Self, T>,
    ) -> Tensor<(usize, usize), E, Self, T> {
        crate::layers::layer_norm_composed(x, g, b)
    }
}

/// Depthwise convolution from dfdx's own ops: pad, then sum K·K shifted slices scaled per channel.
/// Slower than the CPU kernel but runs on any dfdx device; tests check the two agree.
pub fn dwconv_fallback<E: SpinDtype, D: Device<E>, T: Tape<E, D> + Merge<T>>(
    x: Tensor<Nhwc, E, D, T>,
    w: Tensor<(usize, usize), E, D, T>,
    b: Tensor<(usize,), E, D, T>,
    k: usize,
) -> Result<Tensor<Nhwc, E, D, T>, D::Err> {
    let (bn, h, wd, c) = *x.shape();
    let p = k / 2;
    let dev = x.device().clone();
    let zh = dev.try_zeros_like(&(bn, p, wd, c))?;
    let x = (zh.retaped::<T>(), x).try_concat_along(Axis::<1>)?;
    let x = (x, zh.retaped::<T>()).try_concat_along(Axis::<1>)?;
    let zw = dev.try_zeros_like(&(bn, h + 2 * p, p, c))?;
    let x = (zw.retaped::<T>(), x).try_concat_along(Axis::<2>)?;
    let xp = (x, zw.retaped::<T>()).try_concat_along(Axis::<2>)?;
    let shape = (bn, h, wd, c);
    let mut acc = b
        .try_broadcast_like::<_, Axes3<0, 1, 2>>(&shape)?
        .try_add(dev.try_zeros_like(&shape)?)?;
    for ky in 0..k {
        for kx in 0..k {
            let j = ky * k + kx;
            // dfdx 0.13's slice backward assigns rather than adds, so overlapping slices of one
            // tensor would overwrite each other's gradients: slice a fresh copy (new id) each time.
            let xs = xp
                .with_empty_tape()
                .try_mul(E::one())?
                .try_slice((.., ky..ky + h, kx..kx + wd, ..))?;
            let wj = w
                .with_empty_tape()
                .try_mul(E::one())?
                .try_slice((.., j..j + 1))?
                .try_reshape_like(&(c,))?
                .try_broadcast_like::<_, Axes3<0, 1, 2>>(&shape)?;
            acc = acc.try_add(xs.try_mul(wj)?)?;
        }
    }
    // The padded input and the weight carry their own tapes; fold them in with a zero-cost touch.
    let touch_x = xp
        .try_mul(E::one())?
        .try_slice((.., 0..h, 0..wd, ..))?
        .try_mul(E::zero())?;
    let touch_w = w
        .try_mul(E::one())?
        .try_slice((.., 0..1))?
        .try_reshape_like(&(c,))?
        .try_broadcast_like::<_, Axes3<0, 1, 2>>(&shape)?
        .try_mul(E::zero())?;
    acc.try_add(touch_x)?.try_add(touch_w)
}

/// Patchify from dfdx's reshape and permute (see [`Kernels::patchify`]).
pub fn patchify_fallback<E: SpinDtype, D: Device<E>, T: Tape<E, D>>(
    x: Tensor<Nhwc, E, D, T>,
    p: usize,
) -> Result<Tensor<(usize, usize), E, D, T>, D::Err> {
    let (bn, cin, h, w) = *x.shape();
    let (hp, wp) = (h / p, w / p);
    x.try_reshape_like(&(bn, cin, hp, p, wp, p))?
        .try_permute::<_, Axes6<0, 2, 4, 1, 3, 5>>()?
        .try_reshape_like(&(bn * hp * wp, cin * p * p))
}

/// Sizes of one depthwise convolution.
#[derive(Clone, Copy, Debug)]
struct DwGeometry {
    b: usize,
    h: usize,
    w: usize,
    c: usize,
    k: usize,
    p: usize,
}

impl DwGeometry {
    fn new((b, h, w, c): Nhwc, k: usize) -> Self {
        assert!(k % 2 == 1, "dwconv: 'same' padding needs an odd kernel, got {k}");
        assert!(k <= MAX_K, "dwconv: kernels up to {MAX_K} are supported, got {k}");
        Self {
            b,
            h,
            w,
            c,
            k,
            p: k / 2,
        }
    }
    /// Output columns `wi` for which input column `wi + kx - p` exists.
    fn out_cols(&self, kx: usize) -> std::ops::Range<usize> {
        self.p.saturating_sub(kx)..(self.w + self.p).saturating_sub(kx).min(self.w)
    }
}

fn transpose<E: Copy + Send + Sync + 'static>(m: &[E], rows: usize, cols: usize) -> Vec<E> {
    let mut t = Vec::new();
    crate::gemm::transpose_into(&mut t, m, rows, cols);
    t
}

fn accumulate<E: SpinDtype>(dst: &mut [E], src: &[E]) {
    dst.par_iter_mut().zip(src.par_iter()).for_each(|(d, &s)| *d += s);
}

#[inline(always)]
fn fma_row<E: SpinDtype>(out: &mut [E], x: &[E], w: &[E]) {
    for ((o, &xv), &wv) in out.iter_mut().zip(x).zip(w) {
        *o += xv * wv;
    }
}

/// GELU of a chunk (see [`dw_forward_row`] for the dispatch).
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn gelu_chunk<E: SpinDtype>(y: &mut [E], x: &[E]) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o = v.gelu_and_grad().0;
    }
}

/// `gx += gy · GELU'(x)` over a chunk.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn gelu_grad_chunk<E: SpinDtype>(gx: &mut [E], x: &[E], gy: &[E]) {
    for ((a, &v), &g) in gx.iter_mut().zip(x).zip(gy) {
        *a += g * v.gelu_and_grad().1;
    }
}

/// Elements per rayon task of elementwise kernels.
const ELEMWISE_CHUNK: usize = 16 * 1024;

/// Channels per register block of the forward kernel: 64 f32 lanes = 4 AVX-512 registers.
const CH: usize = 64;

/// Largest kernel the depthwise kernels take (rows kept on the stack).
const MAX_K: usize = 31;

/// Forward: one rayon task per output row (b, h). For each output pixel and block of CH channels
/// the K×K taps accumulate in a fixed-size array the compiler keeps in vector registers, so each
/// input value is loaded once per tap and each output written once. `wt` is `(K·K, C)`.
fn dw_forward<E: SpinDtype>(
    g: &DwGeometry,
    x: &[E],
    wt: &[E],
    bias: &[E],
    epi: Option<&Epilogue<'_, E>>,
) -> Vec<E> {
    let mut out = vec![E::zero(); g.b * g.h * g.w * g.c];
    dw_forward_into(g, x, wt, bias, epi, &mut out);
    out
}

/// [`dw_forward`] into a given buffer: the register-tiled kernel for f32 where the CPU has
/// AVX-512, the per-pixel one otherwise.
fn dw_forward_into<E: SpinDtype>(
    g: &DwGeometry,
    x: &[E],
    wt: &[E],
    bias: &[E],
    epi: Option<&Epilogue<'_, E>>,
    out: &mut [E],
) {
    #[cfg(target_arch = "x86_64")]
    if TypeId::of::<E>() == TypeId::of::<f32>() && std::arch::is_x86_feature_detected!("avx512f") {
        // E is f32 here: the casts only restate that for the f32 kernel.
        let cast = |v: &[E]| unsafe { std::slice::from_raw_parts(v.as_ptr() as *const f32, v.len()) };
        let (x32, bias32) = (cast(x), cast(bias));
        let epi32 = epi.map(|e| Epilogue {
            bias: cast(e.bias),
            scale: cast(e.scale),
            shift: cast(e.shift),
            act: e.act,
        });
        let out32 = unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr() as *mut f32, out.len()) };
        // Safety: AVX-512F was detected above.
        unsafe { dw_tiled_avx512(g, x32, cast(wt), bias32, epi32.as_ref(), out32) };
        return;
    }
    out.par_chunks_mut(g.w * g.c)
        .enumerate()
        .for_each(|(row, o)| dw_forward_row(g, x, wt, bias, row, o, epi));
}

/// Channels per block of the tiled depthwise kernel: one AVX-512 register of f32.
const LANES: usize = 16;
use std::any::TypeId;
/// Output pixels per tile of the tiled depthwise kernel.
const PIX: usize = 8;

/// The output of the tiled kernel, written by tasks that own disjoint sets of channels.
struct SharedOut(*mut f32);
// Safety: each task writes only the channels of its own block (see `dw_tiled_avx512`).
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

/// [`dw_forward`] for f32 with AVX-512, one task per (image, block of 16 channels). A task copies
/// its slice of the input into a zero-padded slab `(H+K−1, W'+K−1, 16)` (a few dozen KiB, so it
/// stays in cache and the inner loops have no edge cases), then sweeps tiles of 8 output pixels:
/// the 8 accumulators stay in registers while the K×K taps stream past, so each multiply-add
/// costs one load of input (the weight vector is shared by the 8 pixels) instead of the two of
/// the per-pixel kernel ([`dw_forward_row`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dw_tiled_avx512(
    g: &DwGeometry,
    x: &[f32],
    wt: &[f32],
    bias: &[f32],
    epi: Option<&Epilogue<'_, f32>>,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (h, w, c, k, p) = (g.h, g.w, g.c, g.k, g.p);
    let (hp, wp) = (h + k - 1, w.div_ceil(PIX) * PIX + k - 1);
    assert!(x.len() == g.b * h * w * c && out.len() == x.len() && wt.len() == k * k * c);
    let cblocks = c.div_ceil(LANES);
    let dst = SharedOut(out.as_mut_ptr());
    (0..g.b * cblocks).into_par_iter().for_each(|task| {
        let dst = &dst;
        let (b, c0) = (task / cblocks, (task % cblocks) * LANES);
        let n = LANES.min(c - c0);
        let mut slab = vec![0.0f32; hp * wp * LANES];
        for hi in 0..h {
            for wi in 0..w {
                let src = &x[((b * h + hi) * w + wi) * c + c0..][..n];
                slab[((hi + p) * wp + wi + p) * LANES..][..n].copy_from_slice(src);
            }
        }
        let mut wv = vec![0.0f32; k * k * LANES];
        for t in 0..k * k {
            wv[t * LANES..][..n].copy_from_slice(&wt[t * c + c0..][..n]);
        }
        let mut tmp = [0.0f32; LANES];
        tmp[..n].copy_from_slice(&bias[c0..c0 + n]);
        // Safety (all pointer reads): rows hi + ky < hp and columns p0 + q + kx < wp index inside
        // the slab; taps ky·k + kx < k² inside `wv`.
        let init = _mm512_loadu_ps(tmp.as_ptr());
        for hi in 0..h {
            for p0 in (0..w).step_by(PIX) {
                let mut acc = [init; PIX];
                for ky in 0..k {
                    let xrow = slab.as_ptr().add(((hi + ky) * wp + p0) * LANES);
                    let wrow = wv.as_ptr().add(ky * k * LANES);
                    for kx in 0..k {
                        let wk = _mm512_loadu_ps(wrow.add(kx * LANES));
                        for (q, a) in acc.iter_mut().enumerate() {
                            *a = _mm512_fmadd_ps(_mm512_loadu_ps(xrow.add((q + kx) * LANES)), wk, *a);
                        }
                    }
                }
                for (q, a) in acc.iter().enumerate().take(w - p0) {
                    _mm512_storeu_ps(tmp.as_mut_ptr(), *a);
                    let at = ((b * h + hi) * w + p0 + q) * c + c0;
                    // Safety: `at..at + n` lies in `out` (asserted sizes) and holds channels
                    // c0..c0 + n, which only this task writes.
                    let o = std::slice::from_raw_parts_mut(dst.0.add(at), n);
                    match epi {
                        None => o.copy_from_slice(&tmp[..n]),
                        Some(e) => e.apply(o, &tmp[..n], c0, Some(&x[at..][..n])),
                    }
                }
            }
        }
    });
}

/// One output row of [`dw_forward`], compiled for AVX-512 and AVX2 too and picked at run time
/// (the build targets baseline x86-64, whose 16 SSE registers cannot hold the accumulators). For
/// each output pixel and block of CH channels the K×K taps accumulate in a fixed-size array the
/// compiler keeps in vector registers, so each input value is loaded once per tap and each output
/// written once, through the epilogue when there is one. `wt` is `(K·K, C)`.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn dw_forward_row<E: SpinDtype>(
    g: &DwGeometry,
    x: &[E],
    wt: &[E],
    bias: &[E],
    row: usize,
    o: &mut [E],
    epi: Option<&Epilogue<'_, E>>,
) {
    let (h, w, c, k, p) = (g.h, g.w, g.c, g.k, g.p);
    let (bi, hi) = (row / h, row % h);
    let mut rows: [(usize, &[E]); MAX_K] = [(0, &[]); MAX_K];
    let mut nrows = 0;
    for ky in 0..k {
        if let Some(hh) = (hi + ky).checked_sub(p).filter(|&hh| hh < h) {
            rows[nrows] = (ky, &x[(bi * h + hh) * w * c..][..w * c]);
            nrows += 1;
        }
    }
    let rows = &rows[..nrows];
    let skip = &x[row * w * c..][..w * c];
    for wi in 0..w {
        let kx0 = p.saturating_sub(wi);
        let kx1 = (w + p - wi).min(k);
        let mut c0 = 0;
        while c0 < c {
            let n = CH.min(c - c0);
            let mut acc = [E::zero(); CH];
            acc[..n].copy_from_slice(&bias[c0..c0 + n]);
            for &(ky, xrow) in rows {
                for kx in kx0..kx1 {
                    let xi = wi + kx - p;
                    let xs = &xrow[xi * c + c0..][..n];
                    let ws = &wt[(ky * k + kx) * c + c0..][..n];
                    if n == CH {
                        let (xs, ws): (&[E; CH], &[E; CH]) = (xs.try_into().unwrap(), ws.try_into().unwrap());
                        for j in 0..CH {
                            acc[j] += xs[j] * ws[j];
                        }
                    } else {
                        for j in 0..n {
                            acc[j] += xs[j] * ws[j];
                        }
                    }
                }
            }
            let at = wi * c + c0;
            match epi {
                None => o[at..][..n].copy_from_slice(&acc[..n]),
                Some(e) => e.apply(&mut o[at..][..n], &acc[..n], c0, Some(&skip[at..][..n])),
            }
            c0 += n;
        }
    }
}

/// Backward: returns (dL/dx, dL/dw in `(K·K, C)`, dL/db).
fn dw_backward<E: SpinDtype>(g: &DwGeometry, x: &[E], wt: &[E], gy: &[E]) -> (Vec<E>, Vec<E>, Vec<E>) {
    let (h, w, c, k) = (g.h, g.w, g.c, g.k);
    // dL/dx: input row hh collects from output rows hh + p - ky.
    let mut gx = vec![E::zero(); x.len()];
    gx.par_chunks_mut(w * c)
        .enumerate()
        .for_each(|(row, o)| dw_backward_x_row(g, wt, gy, row, o));
    // dL/dw and dL/db: partial sums over fixed blocks of output rows, added in block order, so
    // the result does not depend on how rayon schedules the work (training is reproducible).
    let kkc = k * k * c;
    let rows = g.b * h;
    let block = rows.div_ceil(32).max(1);
    let partials: Vec<Vec<E>> = (0..rows.div_ceil(block))
        .into_par_iter()
        .map(|blk| dw_backward_w_block(g, x, gy, blk * block..((blk + 1) * block).min(rows)))
        .collect();
    let mut sums = vec![E::zero(); kkc + c];
    for part in partials {
        for (s, v) in sums.iter_mut().zip(part) {
            *s += v;
        }
    }
    let gb = sums[kkc..].to_vec();
    let mut gw = sums;
    gw.truncate(kkc);
    (gx, gw, gb)
}

/// dL/dx for one input row: input row hh collects from output rows hh + p − ky. Compiled for
/// AVX-512 and AVX2 too, like the forward.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn dw_backward_x_row<E: SpinDtype>(g: &DwGeometry, wt: &[E], gy: &[E], row: usize, o: &mut [E]) {
    let (h, w, c, k, p) = (g.h, g.w, g.c, g.k, g.p);
    let (bi, hh) = (row / h, row % h);
    for ky in 0..k {
        let Some(ho) = (hh + p).checked_sub(ky).filter(|&ho| ho < h) else {
            continue;
        };
        let grow = &gy[(bi * h + ho) * w * c..][..w * c];
        for kx in 0..k {
            let wk = &wt[(ky * k + kx) * c..][..c];
            for wi in g.out_cols(kx) {
                let xi = wi + kx - p;
                fma_row(&mut o[xi * c..][..c], &grow[wi * c..][..c], wk);
            }
        }
    }
}

/// The dL/dw `(K·K, C)` and dL/db partial sums of a block of output rows.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn dw_backward_w_block<E: SpinDtype>(
    g: &DwGeometry,
    x: &[E],
    gy: &[E],
    rows: std::ops::Range<usize>,
) -> Vec<E> {
    let (h, w, c, k, p) = (g.h, g.w, g.c, g.k, g.p);
    let kkc = k * k * c;
    let mut acc = vec![E::zero(); kkc + c];
    for row in rows {
        let (bi, hi) = (row / h, row % h);
        let grow = &gy[row * w * c..][..w * c];
        for px in grow.chunks(c) {
            for (a, &v) in acc[kkc..].iter_mut().zip(px) {
                *a += v;
            }
        }
        for ky in 0..k {
            let Some(hh) = (hi + ky).checked_sub(p).filter(|&hh| hh < h) else {
                continue;
            };
            let xrow = &x[(bi * h + hh) * w * c..][..w * c];
            for kx in 0..k {
                let a = &mut acc[(ky * k + kx) * c..][..c];
                for wi in g.out_cols(kx) {
                    let xi = wi + kx - p;
                    fma_row(a, &grow[wi * c..][..c], &xrow[xi * c..][..c]);
                }
            }
        }
    }
    acc
}

/// For each output element of [`Kernels::patchify`], the flat NCHW index it reads.
fn patch_index(bn: usize, cin: usize, h: usize, w: usize, p: usize) -> Vec<usize> {
    let (hp, wp) = (h / p, w / p);
    let mut idx = Vec::with_capacity(bn * cin * h * w);
    for b in 0..bn {
        for r in 0..hp {
            for q in 0..wp {
                for ci in 0..cin {
                    for py in 0..p {
                        for px in 0..p {
                            idx.push(((b * cin + ci) * h + r * p + py) * w + q * p + px);
                        }
                    }
                }
            }
        }
    }
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand_vec(dev: &Cpu, n: usize) -> Vec<f64> {
        let t: Tensor<(usize,), f64, _> = dev.sample_normal_like(&(n,));
        t.as_vec()
    }

    /// Direct 7-loop reference of a depthwise 'same' convolution on NHWC data.
    fn reference(x: &[f64], w: &[f64], b: &[f64], (bn, h, wd, c): Nhwc, k: usize) -> Vec<f64> {
        let p = k as isize / 2;
        let mut y = vec![0.0; x.len()];
        for n in 0..bn {
            for i in 0..h {
                for j in 0..wd {
                    for ch in 0..c {
                        let mut s = b[ch];
                        for ky in 0..k {
                            for kx in 0..k {
                                let (ii, jj) = (i as isize + ky as isize - p, j as isize + kx as isize - p);
                                if ii >= 0 && jj >= 0 && (ii as usize) < h && (jj as usize) < wd {
                                    s += x[((n * h + ii as usize) * wd + jj as usize) * c + ch]
                                        * w[ch * k * k + ky * k + kx];
                                }
                            }
                        }
                        y[((n * h + i) * wd + j) * c + ch] = s;
                    }
                }
            }
        }
        y
    }

    #[test]
    fn dwconv_forward_matches_direct_loops_and_fallback() {
        let dev = Cpu::seed_from_u64(0);
        let shape = (2, 5, 6, 3);
        for k in [1, 3, 5, 7] {
            let x = rand_vec(&dev, 2 * 5 * 6 * 3);
            let w = rand_vec(&dev, 3 * k * k);
            let b = rand_vec(&dev, 3);
            let want = reference(&x, &w, &b, shape, k);
            let xt = dev.tensor_from_vec(x, shape);
            let wt = dev.tensor_from_vec(w, (3, k * k));
            let bt = dev.tensor_from_vec(b, (3,));
            let got = Cpu::dwconv(xt.clone(), wt.clone(), bt.clone(), k)
                .unwrap()
                .as_vec();
            let fb = dwconv_fallback(xt, wt, bt, k).unwrap().as_vec();
            for i in 0..want.len() {
                assert!((got[i] - want[i]).abs() < 1e-12, "k={k} i={i}");
                assert!((fb[i] - want[i]).abs() < 1e-12, "fallback k={k} i={i}");
            }
        }
    }

    /// f32 takes the register-tiled kernel where the CPU has AVX-512: channels that are not a
    /// multiple of 16, rows that are not a multiple of 8 pixels, against the f64 loops (1e-4).
    #[test]
    fn f32_dwconv_matches_direct_loops_at_awkward_sizes() {
        let dev = Cpu::seed_from_u64(2);
        let shape = (2, 11, 13, 40);
        let n = 2 * 11 * 13 * 40;
        for k in [3, 9, 11] {
            let (x, w, b) = (rand_vec(&dev, n), rand_vec(&dev, 40 * k * k), rand_vec(&dev, 40));
            let want = reference(&x, &w, &b, shape, k);
            let f32s = |v: &[f64]| v.iter().map(|&a| a as f32).collect::<Vec<f32>>();
            let got = Cpu::dwconv(
                dev.tensor_from_vec(f32s(&x), shape),
                dev.tensor_from_vec(f32s(&w), (40, k * k)),
                dev.tensor_from_vec(f32s(&b), (40,)),
                k,
            )
            .unwrap()
            .as_vec();
            for i in 0..want.len() {
                assert!((got[i] as f64 - want[i]).abs() < 1e-4, "k={k} i={i}");
            }
        }
    }

    /// Gradients of loss = Σ y ⊙ r (r fixed random) against central finite differences, f64.
    #[test]
    fn dwconv_gradients_match_finite_differences() {
        let dev = Cpu::seed_from_u64(1);
        let shape = (2, 4, 5, 3);
        let k = 3;
        let n = 2 * 4 * 5 * 3;
        let (x, w, b, r) = (
            rand_vec(&dev, n),
            rand_vec(&dev, 3 * k * k),
            rand_vec(&dev, 3),
            rand_vec(&dev, n),
        );
        let loss = |x: &[f64], w: &[f64], b: &[f64]| -> f64 {
            reference(x, w, b, shape, k)
                .iter()
                .zip(&r)
                .map(|(a, b)| a * b)
                .sum()
        };
        let xt = dev.tensor_from_vec(x.clone(), shape);
        let wt = dev.tensor_from_vec(w.clone(), (3, k * k));
        let bt = dev.tensor_from_vec(b.clone(), (3,));
        let rt = dev.tensor_from_vec(r.clone(), shape);
        let y = Cpu::dwconv(xt.leaky_trace(), wt.retaped(), bt.retaped(), k).unwrap();
        let g = (y * rt).sum::<(), _>().backward();
        let eps = 1e-6;
        let check = |analytic: Vec<f64>, base: &Vec<f64>, which: usize| {
            for i in 0..base.len() {
                let mut hi = base.clone();
                let mut lo = base.clone();
                hi[i] += eps;
                lo[i] -= eps;
                let f = |v: &Vec<f64>| match which {
                    0 => loss(v, &w, &b),
                    1 => loss(&x, v, &b),
                    _ => loss(&x, &w, v),
                };
                let num = (f(&hi) - f(&lo)) / (2.0 * eps);
                assert!(
                    (num - analytic[i]).abs() < 1e-6,
                    "param {which} index {i}: {num} vs {}",
                    analytic[i]
                );
            }
        };
        check(g.get(&xt).as_vec(), &x, 0);
        check(g.get(&wt).as_vec(), &w, 1);
        check(g.get(&bt).as_vec(), &b, 2);
    }

    #[test]
    fn patchify_matches_fallback_in_value_and_gradient() {
        let dev = Cpu::seed_from_u64(2);
        let shape = (2, 3, 8, 4);
        let x: Tensor<Nhwc, f64, _> = dev.sample_normal_like(&shape);
        let r: Tensor<(usize, usize), f64, _> = dev.sample_normal_like(&(2 * 4 * 2, 3 * 4));
        let a = Cpu::patchify(x.leaky_trace(), 2).unwrap();
        let b = patchify_fallback(x.leaky_trace(), 2).unwrap();
        assert_eq!(a.as_vec(), b.as_vec());
        let ga = (a * r.clone()).sum::<(), _>().backward();
        let gb = (b * r).sum::<(), _>().backward();
        assert_eq!(ga.get(&x).as_vec(), gb.get(&x).as_vec());
    }

    #[test]
    fn dwconv_fallback_gradients_match_kernel() {
        let dev = Cpu::seed_from_u64(3);
        let shape = (1, 4, 4, 2);
        let x: Tensor<Nhwc, f64, _> = dev.sample_normal_like(&shape);
        let w: Tensor<(usize, usize), f64, _> = dev.sample_normal_like(&(2, 9));
        let b: Tensor<(usize,), f64, _> = dev.sample_normal_like(&(2,));
        let r: Tensor<Nhwc, f64, _> = dev.sample_normal_like(&shape);
        let ya = Cpu::dwconv(x.leaky_trace(), w.retaped(), b.retaped(), 3).unwrap();
        let ga = (ya * r.clone()).sum::<(), _>().backward();
        let yb = dwconv_fallback(x.leaky_trace(), w.retaped(), b.retaped(), 3).unwrap();
        let gb = (yb * r).sum::<(), _>().backward();
        for (p, q) in ga.get(&w).as_vec().iter().zip(gb.get(&w).as_vec()) {
            assert!((p - q).abs() < 1e-10);
        }
        for (p, q) in ga.get(&x).as_vec().iter().zip(gb.get(&x).as_vec()) {
            assert!((p - q).abs() < 1e-10);
        }
    }
}
