//! Fused inference forwards on host buffers (ViT encoder blocks, a ConvMixer's pointwise half),
//! the host weights they take, and the cache that keeps a ViT's between calls.
//!
//! Without a tape nothing needs to be kept for a backward pass, so a block can run as a few
//! passes over row chunks, each a rayon task that normalises its rows, multiplies them through
//! [`crate::gemm`] and applies bias, activation and residual while they are still in cache —
//! instead of a dfdx op per step, several of which run on one thread. Only attention mixes rows;
//! it runs as one task per (image, block of query rows), every head in it. The model code decides
//! when these apply ([`crate::conv::Kernels`] returns `None` elsewhere) and fills the weights.
use crate::conv::Epilogue;
use crate::dtype::{SpinDevice, SpinDtype};
use crate::gemm::{matmul, row_chunk, transpose_into, MatRef};
use crate::layers::Act;
use crate::layers::LN_EPS;
use dfdx::nn::tensor_collection::{RecursiveWalker, TensorVisitor, ViewTensorRef};
use dfdx::prelude::*;
use multiversion::multiversion;
use rayon::prelude::*;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};

/// A Linear layer's weight and bias on the host, the weight as `Wᵀ` `(in, out)` row-major: then
/// gemm packs it with contiguous copies, where PyTorch's `(out, in)` needs a strided gather on
/// every call (a quarter of DeiT-Tiny's inference time in the profile).
#[derive(Clone, Debug, Default)]
pub struct HostLinear<E> {
    pub wt: Vec<E>,
    pub b: Vec<E>,
}

impl<E: SpinDtype> HostLinear<E> {
    /// The weight as the `(in, out)` right-hand side of `x · Wᵀ`.
    fn rhs(&self) -> MatRef<'_, E> {
        let out = self.b.len();
        MatRef::row_major(&self.wt, self.wt.len() / out.max(1), out)
    }

    /// Copies a dfdx weight and bias in, reusing the buffers. The weight is `(out, in)` as
    /// PyTorch's, or already `(in, out)` when `in_major`.
    pub fn fill<S: Shape, B: Shape, D: Device<E>>(
        &mut self,
        w: &Tensor<S, E, D>,
        b: &Tensor<B, E, D>,
        in_major: bool,
    ) {
        to_host(b, &mut self.b);
        if in_major {
            to_host(w, &mut self.wt);
        } else {
            let mut raw = Vec::new();
            to_host(w, &mut raw);
            let out = self.b.len();
            transpose_into(&mut self.wt, &raw, out, raw.len() / out.max(1));
        }
    }
}

/// A tensor's values into `buf` (resized; no allocation once it has the size).
pub fn to_host<S: Shape, E: SpinDtype, D: Device<E>>(t: &Tensor<S, E, D>, buf: &mut Vec<E>) {
    let t = t.clone().contiguous();
    buf.resize(t.shape().num_elements(), E::zero());
    t.copy_into(buf);
}

/// One pre-norm encoder block's weights on the host, refilled per block.
#[derive(Clone, Debug, Default)]
pub struct VitBlockHost<E> {
    pub norm1: (Vec<E>, Vec<E>),
    pub qkv: HostLinear<E>,
    pub proj: HostLinear<E>,
    pub norm2: (Vec<E>, Vec<E>),
    pub fc1: HostLinear<E>,
    pub fc2: HostLinear<E>,
}

/// Every block's host weights, kept between inference calls: copying and re-laying out the
/// weights took a quarter of DeiT-Tiny's forward pass.
///
/// The entry is valid while every tensor of the model still uses the buffer it had when the entry
/// was made. It holds a clone of the model (shared buffers, no copy), so those buffers stay alive
/// and unchanged: dfdx writes to a shared buffer by copying it first (`Arc::make_mut`), so an
/// update moves the written tensor to a new buffer, and the next call sees a different key and
/// refills. A traced (training) forward drops the entry.
pub struct BlockCache<E, M> {
    slot: Mutex<Option<Box<CacheEntry<E, M>>>>,
}

struct CacheEntry<E, M> {
    keys: Vec<[usize; 2]>,
    _source: M,
    blocks: Arc<Vec<VitBlockHost<E>>>,
}

impl<E, M> Default for BlockCache<E, M> {
    fn default() -> Self {
        Self {
            slot: Mutex::new(None),
        }
    }
}

impl<E, M> std::fmt::Debug for BlockCache<E, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BlockCache")
    }
}

impl<E, M> BlockCache<E, M> {
    /// The blocks of a model whose tensors have buffer `keys` (see [`buffer_keys`]): the cached
    /// ones while the keys match, else `make()`'s, cached with `source()` (a clone of the model).
    /// Without keys (a device without host buffers) nothing is cached.
    pub fn get(
        &self,
        keys: Option<Vec<[usize; 2]>>,
        source: impl FnOnce() -> M,
        make: impl FnOnce() -> Vec<VitBlockHost<E>>,
    ) -> Arc<Vec<VitBlockHost<E>>> {
        let Some(keys) = keys else {
            return Arc::new(make());
        };
        let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = slot.as_ref() {
            if e.keys == keys {
                return e.blocks.clone();
            }
        }
        *slot = None; // the old weights go before the new ones are made
        let blocks = Arc::new(make());
        *slot = Some(Box::new(CacheEntry {
            keys,
            _source: source(),
            blocks: blocks.clone(),
        }));
        blocks
    }

    /// Drops the entry (training is about to change the weights).
    pub fn clear(&self) {
        *self.slot.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// The buffer key ([`crate::conv::Kernels::buffer_key`]) of every tensor of `m`, in visiting
/// order; `None` if the device has none.
pub fn buffer_keys<M: TensorCollection<E, D>, E: SpinDtype, D: SpinDevice<E>>(
    m: &M,
) -> Option<Vec<[usize; 2]>> {
    let mut keys = BufferKeys::<E, D> {
        out: Some(Vec::new()),
        _d: PhantomData,
    };
    M::iter_tensors(&mut RecursiveWalker { m, f: &mut keys }).ok()?;
    keys.out
}

struct BufferKeys<E, D> {
    out: Option<Vec<[usize; 2]>>,
    _d: PhantomData<(E, D)>,
}

impl<E: SpinDtype, D: SpinDevice<E>> TensorVisitor<E, D> for BufferKeys<E, D> {
    type Viewer = ViewTensorRef;
    type Err = D::Err;
    type E2 = E;
    type D2 = D;
    fn visit<S: Shape>(
        &mut self,
        _opts: TensorOptions<S, E, D>,
        t: &Tensor<S, E, D>,
    ) -> Result<Option<Tensor<S, E, D>>, D::Err> {
        match (D::buffer_key(t), self.out.as_mut()) {
            (Some(k), Some(out)) => out.push(k),
            _ => self.out = None,
        }
        Ok(None)
    }
}

/// Buffers reused from block to block.
#[derive(Default)]
pub struct VitScratch<E> {
    qkv: Vec<E>,
    attn: Vec<E>,
}

/// One timm encoder block at inference, in place on `x` `(batch·n, d)`:
/// `x += proj(attn(LN1(x)))`, then `x += fc2(GELU(fc1(LN2(x))))`.
pub fn vit_block<E: SpinDtype>(
    x: &mut [E],
    w: &VitBlockHost<E>,
    batch: usize,
    heads: usize,
    scratch: &mut VitScratch<E>,
) {
    let d = w.norm1.0.len();
    let rows = x.len() / d;
    let hidden = w.fc1.b.len();
    let chunk = row_chunk(rows);
    scratch.qkv.resize(rows * 3 * d, E::zero());
    scratch.attn.resize(rows * d, E::zero());

    // LN1 and qkv.
    scratch
        .qkv
        .par_chunks_mut(chunk * 3 * d)
        .zip(x.par_chunks(chunk * d))
        .for_each(|(qkv, xs)| {
            let r = xs.len() / d;
            let mut z = vec![E::zero(); r * d];
            layer_norm_rows(&mut z, xs, &w.norm1.0, &w.norm1.1);
            linear_into(qkv, &z, r, &w.qkv, false);
        });

    attention_core(&scratch.qkv, &mut scratch.attn, batch, heads, d);

    // Projection and residual, LN2, MLP and residual: all row-local.
    let attn = &scratch.attn;
    x.par_chunks_mut(chunk * d)
        .zip(attn.par_chunks(chunk * d))
        .for_each(|(xs, a)| {
            let r = xs.len() / d;
            linear_into(xs, a, r, &w.proj, true);
            let mut z = vec![E::zero(); r * d];
            layer_norm_rows(&mut z, xs, &w.norm2.0, &w.norm2.1);
            let mut h = vec![E::zero(); r * hidden];
            linear_into(&mut h, &z, r, &w.fc1, false);
            gelu_inplace(&mut h);
            linear_into(xs, &h, r, &w.fc2, true);
        });
}

/// `out = x · Wᵀ + b` over all rows of `x`, split across threads.
pub fn linear_rows<E: SpinDtype>(x: &[E], l: &HostLinear<E>, out: &mut [E]) {
    let rhs = l.rhs();
    let (k, n) = (rhs.rows, rhs.cols);
    let chunk = row_chunk(x.len() / k.max(1));
    out.par_chunks_mut(chunk * n)
        .zip(x.par_chunks(chunk * k))
        .for_each(|(o, xs)| linear_into(o, xs, xs.len() / k, l, false));
}

/// `out (= or +=) x · Wᵀ + b` for `r` rows.
fn linear_into<E: SpinDtype>(out: &mut [E], x: &[E], r: usize, l: &HostLinear<E>, accumulate: bool) {
    let rhs = l.rhs();
    let n = rhs.cols;
    matmul(
        out,
        n,
        MatRef::row_major(x, r, rhs.rows),
        rhs,
        E::one(),
        accumulate,
    );
    add_bias_rows(out, &l.b);
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn add_bias_rows<E: SpinDtype>(out: &mut [E], b: &[E]) {
    for row in out.chunks_mut(b.len()) {
        for (o, &v) in row.iter_mut().zip(b) {
            *o += v;
        }
    }
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn gelu_inplace<E: SpinDtype>(h: &mut [E]) {
    for v in h.iter_mut() {
        *v = v.gelu_and_grad().0;
    }
}

/// LayerNorm (eps 1e-6) of each row of `x` into `out`; statistics in f64 as the training kernel.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn layer_norm_rows<E: SpinDtype>(out: &mut [E], x: &[E], g: &[E], b: &[E]) {
    let c = g.len();
    for (o, xr) in out.chunks_mut(c).zip(x.chunks(c)) {
        let mut acc = [0.0f64; LANES];
        let mut tail = xr.chunks_exact(LANES);
        for ch in &mut tail {
            for l in 0..LANES {
                acc[l] += ch[l].as_f64();
            }
        }
        let sum = tail.remainder().iter().map(|v| v.as_f64()).sum::<f64>() + acc.iter().sum::<f64>();
        let mean = sum / c as f64;
        let mut acc = [0.0f64; LANES];
        let mut tail = xr.chunks_exact(LANES);
        for ch in &mut tail {
            for l in 0..LANES {
                let v = ch[l].as_f64() - mean;
                acc[l] += v * v;
            }
        }
        let sq = tail
            .remainder()
            .iter()
            .map(|v| (v.as_f64() - mean).powi(2))
            .sum::<f64>();
        let var = (sq + acc.iter().sum::<f64>()) / c as f64;
        let inv = 1.0 / (var + LN_EPS).sqrt();
        let (m, s) = (E::cast(mean), E::cast(inv));
        for j in 0..c {
            o[j] = (xr[j] - m) * s * g[j] + b[j];
        }
    }
}

/// `softmax(q·kᵀ/√head_dim)·v` for every head, on timm's qkv layout: `qkv` `(B·N, 3·D)` with
/// columns (3, heads, head_dim), into `out` `(B·N, D)`. q, k and v are read in place (strided).
pub fn attention_core<E: SpinDtype>(qkv: &[E], out: &mut [E], batch: usize, heads: usize, d: usize) {
    assert_eq!(
        qkv.len(),
        3 * out.len(),
        "attention: qkv must be three times the output"
    );
    let rows = out.len() / d;
    let n = rows / batch;
    let hd = d / heads;
    let scale = E::cast((hd as f64).powf(-0.5));
    // Blocks of query rows per image: enough tasks to keep every thread busy at batch 1.
    let per_image = (2 * rayon::current_num_threads()).div_ceil(batch).max(1);
    let qb = n.div_ceil(per_image);
    let mut tasks: Vec<(usize, usize, &mut [E])> = Vec::new();
    let mut rest = out;
    for b in 0..batch {
        let mut q0 = 0;
        while q0 < n {
            let q1 = (q0 + qb).min(n);
            let (head, tail) = rest.split_at_mut((q1 - q0) * d);
            tasks.push((b, q0, head));
            rest = tail;
            q0 = q1;
        }
    }
    // kᵀ per (image, head), `(head_dim, n)` row-major, made once: read in place, k would be
    // gathered column by column in every task's product.
    let mut kt = vec![E::zero(); rows * d];
    kt.par_chunks_mut(hd * n).enumerate().for_each(|(bh, t)| {
        let (b, h) = (bh / heads, bh % heads);
        for i in 0..n {
            let k = &qkv[(b * n + i) * 3 * d + d + h * hd..][..hd];
            for (l, &v) in k.iter().enumerate() {
                t[l * n + i] = v;
            }
        }
    });
    tasks.into_par_iter().for_each(|(b, q0, o)| {
        let m = o.len() / d;
        let img = &qkv[b * n * 3 * d..(b + 1) * n * 3 * d];
        let mut s = vec![E::zero(); m * n];
        for h in 0..heads {
            let q = MatRef::strided(&img[q0 * 3 * d + h * hd..], m, hd, 3 * d);
            let k_t = MatRef::row_major(&kt[(b * heads + h) * hd * n..][..hd * n], hd, n);
            let v = MatRef::strided(&img[2 * d + h * hd..], n, hd, 3 * d);
            matmul(&mut s, n, q, k_t, scale, false);
            softmax_rows(&mut s, n);
            matmul(
                &mut o[h * hd..],
                d,
                MatRef::row_major(&s, m, n),
                v,
                E::one(),
                false,
            );
        }
    });
}

/// Independent accumulators per reduction: one running max or sum is a serial chain the
/// compiler may not reorder, sixteen are a vector register of f32.
const LANES: usize = 16;

#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn softmax_rows<E: SpinDtype>(s: &mut [E], n: usize) {
    for row in s.chunks_mut(n) {
        let mut m = [E::neg_infinity(); LANES];
        let mut tail = row.chunks_exact(LANES);
        for c in &mut tail {
            for l in 0..LANES {
                m[l] = if c[l] > m[l] { c[l] } else { m[l] };
            }
        }
        let max = tail
            .remainder()
            .iter()
            .chain(&m)
            .fold(E::neg_infinity(), |a, &b| a.max(b));
        let mut acc = [E::zero(); LANES];
        let mut tail = row.chunks_exact_mut(LANES);
        for c in &mut tail {
            for l in 0..LANES {
                c[l] = (c[l] - max).exp_nonpos();
                acc[l] += c[l];
            }
        }
        let mut sum = E::zero();
        for v in tail.into_remainder() {
            *v = (*v - max).exp_nonpos();
            sum += *v;
        }
        let inv = E::one() / acc.iter().fold(sum, |a, &b| a + b);
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
}

/// One ConvMixer block's inference weights on the host: the depthwise kernel as `(K·K, C)`, the
/// pointwise weight as `Wᵀ`, both BatchNorms folded into a scale and shift.
#[derive(Clone, Debug, Default)]
pub struct MixerBlockHost<E> {
    pub dw_wt: Vec<E>,
    pub dw_bias: Vec<E>,
    pub bn1: (Vec<E>, Vec<E>),
    pub pw: HostLinear<E>,
    pub bn2: (Vec<E>, Vec<E>),
    pub act: Act,
}

/// A ConvMixer pointwise half at inference, into `out`: `act(x · Wᵀ + b)·s + t` (BatchNorm
/// folded into the epilogue's scale and shift), plus `x` when `residual`. `x` is `(rows, C)`.
pub fn pointwise_into<E: SpinDtype>(
    x: &[E],
    l: &HostLinear<E>,
    epi: &Epilogue<'_, E>,
    residual: bool,
    out: &mut [E],
) {
    let c = l.b.len();
    let chunk = row_chunk(x.len() / c);
    out.par_chunks_mut(chunk * c)
        .zip(x.par_chunks(chunk * c))
        .for_each(|(ys, xs)| {
            let r = xs.len() / c;
            matmul(ys, c, MatRef::row_major(xs, r, c), l.rhs(), E::one(), false);
            epilogue_rows(ys, epi, residual.then_some(xs));
        });
}

/// The epilogue over rows that hold raw matmul outputs (bias not yet added), in place.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn epilogue_rows<E: SpinDtype>(ys: &mut [E], epi: &Epilogue<'_, E>, skip: Option<&[E]>) {
    let c = epi.bias.len();
    let mut a = [E::zero(); 64];
    for (r, row) in ys.chunks_mut(c).enumerate() {
        for c0 in (0..c).step_by(64) {
            let n = (c - c0).min(64);
            for j in 0..n {
                a[j] = row[c0 + j] + epi.bias[c0 + j];
            }
            let skip = skip.map(|s| &s[r * c + c0..][..n]);
            epi.apply(&mut row[c0..c0 + n], &a[..n], c0, skip);
        }
    }
}
