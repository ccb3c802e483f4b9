//! The normalisation ops on channels-last matrices `(rows, C)`: a per-channel affine map
//! (BatchNorm at inference), BatchNorm with batch statistics, LayerNorm. On the CPU each is one
//! fused op on dfdx's tape ([`crate::kernels::norm`]); elsewhere, and as the reference, dfdx's ops.
use super::{values, with_grad};
use crate::base::{Mat, SpinDtype, BN_EPS, LN_EPS};
use crate::kernels::elementwise::add_into;
use crate::kernels::norm;
use dfdx::prelude::*;
use dfdx::tensor::{Storage, Tape};

/// The normalisation ops on a device.
pub trait NormKernels<E: SpinDtype>: Storage<E> + Sized {
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
}

impl<E: SpinDtype> NormKernels<E> for Cpu {
    fn channel_affine<T: Tape<E, Self> + Merge<T>>(
        x: Tensor<(usize, usize), E, Self, T>,
        s: Tensor<(usize,), E, Self, T>,
        t: Tensor<(usize,), E, Self, T>,
    ) -> Tensor<(usize, usize), E, Self, T> {
        fused3(
            "batch norm (eval)",
            x,
            s,
            t,
            |x, s, t| (norm::affine_fwd(x, s, t), ()),
            |x, s, _, gy, gx| {
                let (dx, ds, dt) = norm::affine_bwd(x, s, gy);
                add_into(gx, &dx);
                (ds, dt)
            },
        )
        .0
    }

    fn batch_norm_train<T: Tape<E, Self> + Merge<T>>(
        x: Tensor<(usize, usize), E, Self, T>,
        g: Tensor<(usize,), E, Self, T>,
        b: Tensor<(usize,), E, Self, T>,
    ) -> (Tensor<(usize, usize), E, Self, T>, Vec<E>, Vec<E>) {
        let (y, cache) = fused3(
            "batch norm",
            x,
            g,
            b,
            |x, g, b| norm::batch_norm_fwd(x, g, b, BN_EPS),
            |x, g, cache, gy, gx| {
                let (dx, dg, db) = norm::batch_norm_bwd(x, g, cache, gy);
                add_into(gx, &dx);
                (dg, db)
            },
        );
        (y, cache.mean.clone(), cache.var.clone())
    }

    fn layer_norm<T: Tape<E, Self> + Merge<T>>(
        x: Tensor<(usize, usize), E, Self, T>,
        g: Tensor<(usize,), E, Self, T>,
        b: Tensor<(usize,), E, Self, T>,
    ) -> Tensor<(usize, usize), E, Self, T> {
        fused3(
            "layer norm",
            x,
            g,
            b,
            |x, g, b| norm::layer_norm_fwd(x, g, b, LN_EPS),
            |x, g, stats, gy, gx| norm::layer_norm_bwd(x, g, stats, gy, gx),
        )
        .0
    }
}

#[cfg(feature = "cuda")]
impl<E: SpinDtype> NormKernels<E> for dfdx::tensor::Cuda
where
    dfdx::tensor::Cuda: Device<E>,
{
    fn channel_affine<T: Tape<E, Self> + Merge<T>>(
        x: Tensor<(usize, usize), E, Self, T>,
        s: Tensor<(usize,), E, Self, T>,
        t: Tensor<(usize,), E, Self, T>,
    ) -> Tensor<(usize, usize), E, Self, T> {
        affine_composed(x, s, t)
    }

    fn batch_norm_train<T: Tape<E, Self> + Merge<T>>(
        x: Tensor<(usize, usize), E, Self, T>,
        g: Tensor<(usize,), E, Self, T>,
        b: Tensor<(usize,), E, Self, T>,
    ) -> (Tensor<(usize, usize), E, Self, T>, Vec<E>, Vec<E>) {
        batch_norm_train_composed(x, g, b)
    }

    fn layer_norm<T: Tape<E, Self> + Merge<T>>(
        x: Tensor<(usize, usize), E, Self, T>,
        g: Tensor<(usize,), E, Self, T>,
        b: Tensor<(usize,), E, Self, T>,
    ) -> Tensor<(usize, usize), E, Self, T> {
        layer_norm_composed(x, g, b)
    }
}

/// Registers a fused op with three inputs (x, γ, β) on the tape: `fwd` computes the output and a
/// cache from the input values, `bwd` from the cache and dL/dy adds dL/dx onto x's gradient
/// buffer (its last argument) and returns dL/dγ and dL/dβ. `op` names it in
/// [`super::profile`].
fn fused3<E, T, C>(
    op: &'static str,
    x: Tensor<(usize, usize), E, Cpu, T>,
    g: Tensor<(usize,), E, Cpu, T>,
    b: Tensor<(usize,), E, Cpu, T>,
    fwd: impl FnOnce(&[E], &[E], &[E]) -> (Vec<E>, C),
    bwd: impl FnOnce(&[E], &[E], &C, &[E], &mut [E]) -> (Vec<E>, Vec<E>) + 'static,
) -> (Tensor<(usize, usize), E, Cpu, T>, std::sync::Arc<C>)
where
    E: SpinDtype,
    T: dfdx::tensor::Tape<E, Cpu> + Merge<T>,
    C: Send + Sync + 'static,
{
    let (x, tx) = x.contiguous().split_tape();
    let (g, tg) = g.contiguous().split_tape();
    let (b, tb) = b.contiguous().split_tape();
    let mut tape = tx.merge(tg).merge(tb);
    let (xs, gs) = (values(&x), values(&g));
    let (y, cache) = fwd(&xs, &gs, &values(&b));
    let cache = std::sync::Arc::new(cache);
    let y = x.device().tensor_from_vec(y, *x.shape());
    if T::OWNS_TAPE {
        let (y_keep, cache) = (y.clone(), cache.clone());
        tape.add_backward_op(move |grads| {
            with_grad(grads, &y_keep, op, |grads, gy| {
                let (gg, gb) = bwd(&xs, &gs, &cache, gy, grads.get_or_alloc_mut(&x)?);
                add_into(grads.get_or_alloc_mut(&g)?, &gg);
                add_into(grads.get_or_alloc_mut(&b)?, &gb);
                Ok(())
            })
        });
    }
    (y.put_tape(tape), cache)
}

/// Per-column affine map `x · s + t` from dfdx ops (the fallback of [`NormKernels::channel_affine`]).
pub fn affine_composed<E: SpinDtype, D: Device<E>, T: Tape<E, D> + Merge<T>>(
    x: Tensor<Mat, E, D, T>,
    s: Tensor<(usize,), E, D, T>,
    t: Tensor<(usize,), E, D, T>,
) -> Tensor<Mat, E, D, T> {
    let shape = *x.shape();
    x * s.broadcast_like::<_, Axis<0>>(&shape) + t.broadcast_like::<_, Axis<0>>(&shape)
}

/// [`crate::nn::functional::layer_norm`] from dfdx ops (fallback and reference).
pub fn layer_norm_composed<E: SpinDtype, D: Device<E>, T: Tape<E, D> + Merge<T>>(
    x: Tensor<Mat, E, D, T>,
    g: Tensor<(usize,), E, D, T>,
    b: Tensor<(usize,), E, D, T>,
) -> Tensor<Mat, E, D, T> {
    affine_composed(x.normalize::<Axis<1>>(LN_EPS), g, b)
}

/// [`crate::nn::functional::batch_norm_train`] from dfdx ops (fallback and reference).
pub fn batch_norm_train_composed<E: SpinDtype, D: Device<E>, T: Tape<E, D> + Merge<T>>(
    x: Tensor<Mat, E, D, T>,
    g: Tensor<(usize,), E, D, T>,
    b: Tensor<(usize,), E, D, T>,
) -> (Tensor<Mat, E, D, T>, Vec<E>, Vec<E>) {
    let shape = *x.shape();
    // Each intermediate keeps its own tape (never `retaped`, which would drop the recorded ops
    // and with them the gradient through the batch statistics).
    let mean = x.with_empty_tape().mean::<_, Axis<0>>();
    let mean_v = mean.as_vec();
    let centered = x - mean.broadcast_like::<_, Axis<0>>(&shape);
    let var = centered.with_empty_tape().square().mean::<_, Axis<0>>();
    let var_v = var.as_vec();
    let inv = (var + E::cast(BN_EPS)).sqrt().recip();
    let xhat = centered * inv.broadcast_like::<_, Axis<0>>(&shape);
    (affine_composed(xhat, g, b), mean_v, var_v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_layer_norm_matches_the_composed_ops_forward_and_backward() {
        // f64, 40 channels (two full lanes of 16 and a partial one), 135 rows (two full blocks of
        // the backward's column sums and a partial one); every gradient through a random
        // projection.
        let dev = Cpu::seed_from_u64(11);
        let (rows, c) = (135, 40);
        let x: Tensor<(usize, usize), f64, Cpu> = dev.sample_normal_like(&(rows, c));
        let g: Tensor<(usize,), f64, Cpu> = dev.sample_normal_like(&(c,));
        let b: Tensor<(usize,), f64, Cpu> = dev.sample_normal_like(&(c,));
        let r: Tensor<(usize, usize), f64, Cpu> = dev.sample_normal_like(&(rows, c));
        let ya = Cpu::layer_norm(x.leaky_trace(), g.retaped(), b.retaped());
        let yb = layer_norm_composed(x.leaky_trace(), g.retaped(), b.retaped());
        for (a, e) in ya.as_vec().iter().zip(yb.as_vec()) {
            assert!((a - e).abs() < 1e-12, "{a} vs {e}");
        }
        let ga = (ya * r.clone()).sum::<(), _>().backward();
        let gb = (yb * r.clone()).sum::<(), _>().backward();
        // x also enters the loss itself, after the norm: its gradient is in the buffer before
        // the norm's backward runs, which must add onto it.
        let xt = x.leaky_trace();
        let direct = xt.with_empty_tape();
        let y = Cpu::layer_norm(xt, g.retaped(), b.retaped());
        let both = ((y * r.clone()).sum::<(), _>() + direct.sum::<(), _>()).backward();
        let added: Vec<f64> = gb.get(&x).as_vec().iter().map(|v| v + 1.0).collect();
        for (i, (p, q)) in both.get(&x).as_vec().iter().zip(&added).enumerate() {
            assert!((p - q).abs() < 1e-10, "dx[{i}] with a direct use: {p} vs {q}");
        }
        for (name, a, e) in [
            ("x", ga.get(&x).as_vec(), gb.get(&x).as_vec()),
            ("g", ga.get(&g).as_vec(), gb.get(&g).as_vec()),
            ("b", ga.get(&b).as_vec(), gb.get(&b).as_vec()),
        ] {
            assert!(
                e.iter().any(|v| v.abs() > 1e-3),
                "d{name} of the reference is not trivial"
            );
            for (i, (p, q)) in a.iter().zip(&e).enumerate() {
                assert!((p - q).abs() < 1e-10, "d{name}[{i}]: {p} vs {q}");
            }
        }
    }

    /// In f32 the kernel computes in f32 (as PyTorch does): against the composed ops in f64 on
    /// the same values, forward and backward, within 2e-5 (outputs and gradients are O(1); dγ
    /// and dβ sum 135 rows).
    #[test]
    fn cpu_layer_norm_in_f32_matches_f64() {
        let dev = Cpu::seed_from_u64(12);
        let (rows, c) = (135, 40);
        let x: Tensor<(usize, usize), f32, Cpu> = dev.sample_normal_like(&(rows, c));
        let g: Tensor<(usize,), f32, Cpu> = dev.sample_normal_like(&(c,));
        let b: Tensor<(usize,), f32, Cpu> = dev.sample_normal_like(&(c,));
        let r: Tensor<(usize, usize), f32, Cpu> = dev.sample_normal_like(&(rows, c));
        let ya = Cpu::layer_norm(x.leaky_trace(), g.retaped(), b.retaped());
        let (x64, g64, b64, r64) = (
            x.clone().to_dtype::<f64>(),
            g.clone().to_dtype::<f64>(),
            b.clone().to_dtype::<f64>(),
            r.clone().to_dtype::<f64>(),
        );
        let yb = layer_norm_composed(x64.leaky_trace(), g64.retaped(), b64.retaped());
        for (a, e) in ya.as_vec().iter().zip(yb.as_vec()) {
            assert!((*a as f64 - e).abs() < 2e-5, "{a} vs {e}");
        }
        let ga = (ya * r).sum::<(), _>().backward();
        let gb = (yb * r64).sum::<(), _>().backward();
        for (name, a, e) in [
            ("x", ga.get(&x).as_vec(), gb.get(&x64).as_vec()),
            ("g", ga.get(&g).as_vec(), gb.get(&g64).as_vec()),
            ("b", ga.get(&b).as_vec(), gb.get(&b64).as_vec()),
        ] {
            for (i, (p, q)) in a.iter().zip(&e).enumerate() {
                assert!((*p as f64 - q).abs() < 2e-5, "d{name}[{i}]: {p} vs {q}");
            }
        }
    }
}
