//! Multi-head attention's core, `softmax(q·kᵀ/√head_dim)·v` on timm's qkv layout, as an op: on
//! the CPU one op on dfdx's tape (host kernels: the fused AVX-512 tiles forward, gemm's products
//! backward, every head of an image in one task, the softmax kept for the backward); elsewhere,
//! and as the reference, dfdx's reshapes, slices, batched matmuls and softmax.
use super::{values, with_grad};
use crate::base::{Mat, SpinDtype};
use crate::kernels::attention::{attention_core, attention_core_backward, attention_core_keep};
use crate::kernels::elementwise::zeros;
use dfdx::prelude::*;
use dfdx::tensor::{Storage, Tape};

/// The attention core on a device.
pub trait AttentionKernel<E: SpinDtype>: Storage<E> + Sized {
    /// `qkv` `(B·N, 3·D)` with columns (3, heads, head_dim) → `softmax(q·kᵀ/√head_dim)·v` as
    /// `(B·N, D)`, heads side by side.
    fn attention_core<T: Tape<E, Self> + Merge<T>>(
        qkv: Tensor<Mat, E, Self, T>,
        batch: usize,
        heads: usize,
    ) -> Tensor<Mat, E, Self, T>;
}

impl<E: SpinDtype> AttentionKernel<E> for Cpu {
    /// Inference takes [`attention_core`] (query rows split across threads, nothing kept); with
    /// a tape, [`attention_core_keep`] and [`attention_core_backward`]: dfdx's composed core
    /// copies q, k and v out by slicing and permuting, multiplies through gemm 0.15 (AVX2 at
    /// most) and runs its softmax on one thread — a fifth of a DeiT-Tiny training step.
    fn attention_core<T: Tape<E, Self> + Merge<T>>(
        qkv: Tensor<Mat, E, Self, T>,
        batch: usize,
        heads: usize,
    ) -> Tensor<Mat, E, Self, T> {
        let (qkv, mut tape) = qkv.contiguous().split_tape();
        let (rows, three_d) = *qkv.shape();
        let d = three_d / 3;
        assert!(
            three_d == 3 * d && d % heads == 0 && rows % batch == 0,
            "attention: qkv {rows} × {three_d} does not split into {batch} images and {heads} heads"
        );
        let n = rows / batch;
        let xs = values(&qkv);
        let mut out = zeros(rows * d);
        if !T::OWNS_TAPE {
            attention_core(&xs, &mut out, batch, heads, d);
            return qkv.device().tensor_from_vec(out, (rows, d)).put_tape(tape);
        }
        let mut probs = zeros(batch * heads * n * n);
        attention_core_keep(&xs, &mut out, &mut probs, (batch, heads, d));
        let y = qkv.device().tensor_from_vec(out, (rows, d));
        let y_keep = y.clone();
        tape.add_backward_op(move |grads| {
            with_grad(grads, &y_keep, "attention core", |grads, go| {
                let g = grads.get_or_alloc_mut(&qkv)?;
                attention_core_backward(&xs, &probs, go, g, (batch, heads, d));
                Ok(())
            })
        });
        y.put_tape(tape)
    }
}

#[cfg(feature = "cuda")]
impl<E: SpinDtype> AttentionKernel<E> for dfdx::tensor::Cuda
where
    dfdx::tensor::Cuda: Device<E>,
{
    fn attention_core<T: Tape<E, Self> + Merge<T>>(
        qkv: Tensor<Mat, E, Self, T>,
        batch: usize,
        heads: usize,
    ) -> Tensor<Mat, E, Self, T> {
        attention_core_composed(qkv, batch, heads)
    }
}

/// The attention core from dfdx ops (other devices, and the reference).
pub fn attention_core_composed<E: SpinDtype, D: Device<E>, T: Tape<E, D> + Merge<T>>(
    qkv: Tensor<Mat, E, D, T>,
    batch: usize,
    heads: usize,
) -> Tensor<Mat, E, D, T> {
    let (rows, three_d) = *qkv.shape();
    let (n, dim) = (rows / batch, three_d / 3);
    let hd = dim / heads;
    let qkv = qkv
        .reshape_like(&(batch, n, 3, heads, hd))
        .permute::<_, Axes5<2, 0, 3, 1, 4>>();
    let part = |qkv: Tensor<(usize, usize, usize, usize, usize), E, D, T>, i: usize| {
        qkv.slice((i..i + 1, .., .., .., ..))
            .reshape_like(&(batch, heads, n, hd))
    };
    let q = part(qkv.with_empty_tape(), 0);
    let k = part(qkv.with_empty_tape(), 1);
    let v = part(qkv, 2);
    let scale = E::cast((hd as f64).powf(-0.5));
    let attn = (q * scale)
        .matmul(k.permute::<_, Axes4<0, 1, 3, 2>>())
        .softmax::<Axis<3>>();
    attn.matmul(v)
        .permute::<_, Axes4<0, 2, 1, 3>>()
        .reshape_like(&(rows, dim))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_attention_matches_the_composed_ops_forward_and_backward() {
        // f64: 2 images of 5 tokens, 3 heads of 4 dims; the gradient through a random projection.
        let dev = Cpu::seed_from_u64(7);
        let (batch, heads, n, d) = (2, 3, 5, 12);
        let qkv: Tensor<Mat, f64, Cpu> = dev.sample_normal_like(&(batch * n, 3 * d));
        let r: Tensor<Mat, f64, Cpu> = dev.sample_normal_like(&(batch * n, d));
        let ya = Cpu::attention_core(qkv.leaky_trace(), batch, heads);
        let yb = attention_core_composed(qkv.leaky_trace(), batch, heads);
        let yi = Cpu::attention_core(qkv.clone(), batch, heads);
        for ((a, b), c) in ya.as_vec().iter().zip(yb.as_vec()).zip(yi.as_vec()) {
            assert!((a - b).abs() < 1e-12 && (c - b).abs() < 1e-12, "{a} / {c} vs {b}");
        }
        // qkv also enters the loss itself, recorded after the attention, so that use's gradient
        // (r2) is in qkv's buffer before the attention's backward runs, which must add onto it.
        // The composed ops are the reference for the attention's part only: their slices'
        // backward (dfdx 0.13) loses a gradient already there.
        let r2: Tensor<Mat, f64, Cpu> = dev.sample_normal_like(&(batch * n, 3 * d));
        let x = qkv.leaky_trace();
        let direct = x.with_empty_tape();
        let y = Cpu::attention_core(x, batch, heads);
        let ga = ((y * r.clone()).sum::<(), _>() + (direct * r2.clone()).sum::<(), _>()).backward();
        let gb = (yb * r).sum::<(), _>().backward();
        let ga = ga.get(&qkv).as_vec();
        let gb: Vec<f64> = gb
            .get(&qkv)
            .as_vec()
            .iter()
            .zip(r2.as_vec())
            .map(|(g, d)| g + d)
            .collect();
        let scale = gb.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        assert!(scale > 0.1, "the reference gradient is not trivial");
        for (i, (a, b)) in ga.iter().zip(&gb).enumerate() {
            assert!((a - b).abs() < 1e-12 * scale.max(1.0), "dqkv[{i}]: {a} vs {b}");
        }
    }
}
