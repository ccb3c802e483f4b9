//! timm-exact layers as functions on runtime shapes `(rows, features)`: the math every model
//! shares, written on the device ops, so it is compiled once per dtype and device, not once per
//! model.
use crate::base::{Act, Mat, SpinDtype, BN_EPS};
use crate::device::profile::{timed, Pass::Forward};
use crate::device::{linear_composed, SpinDevice, Then, VitBlockParams};
use crate::kernels::gemm::has_kernels;
use dfdx::prelude::*;
use dfdx::tensor::Tape;

/// The activation `act` of `x`.
pub fn activation<E: SpinDtype, D: SpinDevice<E>, T: Tape<E, D>>(
    act: Act,
    x: Tensor<Mat, E, D, T>,
) -> Tensor<Mat, E, D, T> {
    match act {
        Act::Gelu => gelu(x),
        Act::Relu => timed("relu", Forward, || x.relu()),
    }
}

/// Exact GELU, `x·Φ(x) = 0.5·x·(1 + erf(x/√2))`, as PyTorch's default `nn.GELU`.
///
/// Not dfdx's `accurate_gelu`: dfdx 0.13 computes the right values but its derivative drops the
/// 1/√2 of the inner term, so gradients through it are wrong (checked by the tests below).
pub fn gelu<S: Shape, E: SpinDtype, D: SpinDevice<E>, T: Tape<E, D>>(
    x: Tensor<S, E, D, T>,
) -> Tensor<S, E, D, T> {
    timed("gelu", Forward, || D::gelu(x))
}

/// The residual sum `y + skip` of two tensors of one shape (a block's output and its input).
pub fn residual<S: Shape, E: SpinDtype, D: SpinDevice<E>, T: Tape<E, D> + Merge<T>>(
    y: Tensor<S, E, D, T>,
    skip: Tensor<S, E, D, T>,
) -> Tensor<S, E, D, T> {
    timed("residual", Forward, || D::residual(y, skip))
}

/// The global average pool: the mean of each of `images` images' token rows, `(images·N, C)` →
/// `(images, C)`.
pub fn mean_tokens<E: SpinDtype, D: SpinDevice<E>, T: Tape<E, D>>(
    x: Tensor<Mat, E, D, T>,
    images: usize,
) -> Tensor<Mat, E, D, T> {
    timed("mean pool", Forward, || D::mean_tokens(x, images))
}

/// Depthwise K×K 'same' convolution of `(B·H·W, C)` features with weight `(C, K·K)`, bias `(C,)`.
pub fn depthwise<E: SpinDtype, D: SpinDevice<E>, T: Tape<E, D> + Merge<T>>(
    x: Tensor<Mat, E, D, T>,
    w: Tensor<Mat, E, D, T>,
    bias: Tensor<(usize,), E, D, T>,
    (b, h, wd): (usize, usize, usize),
    k: usize,
) -> Tensor<Mat, E, D, T> {
    let (rows, c) = *x.shape();
    timed("depthwise", Forward, || {
        D::dwconv(x.reshape_like(&(b, h, wd, c)), w, bias, k).unwrap()
    })
    .reshape_like(&(rows, c))
}

/// `x · Wᵀ + b` with PyTorch's `(out, in)` weight.
pub fn linear<E: SpinDtype, D: SpinDevice<E>, T: Tape<E, D> + Merge<T>>(
    x: Tensor<Mat, E, D, T>,
    w: Tensor<Mat, E, D, T>,
    b: Tensor<(usize,), E, D, T>,
) -> Tensor<Mat, E, D, T> {
    linear_then(x, w, b, Then::Nothing)
}

/// `GELU(x · Wᵀ + b)`: [`gelu`] of [`linear`] as one op (an MLP's first layer).
pub fn linear_gelu<E: SpinDtype, D: SpinDevice<E>, T: Tape<E, D> + Merge<T>>(
    x: Tensor<Mat, E, D, T>,
    w: Tensor<Mat, E, D, T>,
    b: Tensor<(usize,), E, D, T>,
) -> Tensor<Mat, E, D, T> {
    linear_then(x, w, b, Then::Gelu)
}

/// `skip + x · Wᵀ + b`: the [`residual`] sum of [`linear`] and `skip` as one op (a block's last
/// layer).
pub fn linear_residual<E: SpinDtype, D: SpinDevice<E>, T: Tape<E, D> + Merge<T>>(
    x: Tensor<Mat, E, D, T>,
    w: Tensor<Mat, E, D, T>,
    b: Tensor<(usize,), E, D, T>,
    skip: Tensor<Mat, E, D, T>,
) -> Tensor<Mat, E, D, T> {
    linear_then(x, w, b, Then::Add(skip))
}

fn linear_then<E: SpinDtype, D: SpinDevice<E>, T: Tape<E, D> + Merge<T>>(
    x: Tensor<Mat, E, D, T>,
    w: Tensor<Mat, E, D, T>,
    b: Tensor<(usize,), E, D, T>,
    then: Then<Tensor<Mat, E, D, T>>,
) -> Tensor<Mat, E, D, T> {
    if has_kernels::<E>() {
        return timed(then.op_name(), Forward, || D::linear(x, w, b, then));
    }
    // Other dtypes: dfdx's matmul, then the device's own GELU or residual op.
    let y = timed(Then::<()>::Nothing.op_name(), Forward, || {
        linear_composed(x, w, b)
    });
    match then {
        Then::Nothing => y,
        Then::Gelu => gelu(y),
        Then::Add(skip) => residual(y, skip),
    }
}

/// A ViT's pre-norm blocks in order, each `x1 = x + proj(attn(LN1(x)))`, `x1 +
/// fc2(GELU(fc1(LN2(x1))))`, on `batch` sequences laid out `(batch·N, D)`: one op where the
/// device has it (its parts timed under the ops' own names).
pub fn vit_blocks<E: SpinDtype, D: SpinDevice<E>, T: Tape<E, D> + Merge<T>>(
    x: Tensor<Mat, E, D, T>,
    blocks: Vec<VitBlockParams<E, D, T>>,
    batch: usize,
    heads: usize,
) -> Tensor<Mat, E, D, T> {
    D::vit_blocks(x, blocks, batch, heads)
}

/// LayerNorm over the features of each row, eps 1e-6, with scale and shift.
pub fn layer_norm<E: SpinDtype, D: SpinDevice<E>, T: Tape<E, D> + Merge<T>>(
    x: Tensor<Mat, E, D, T>,
    g: Tensor<(usize,), E, D, T>,
    b: Tensor<(usize,), E, D, T>,
) -> Tensor<Mat, E, D, T> {
    timed("layer norm", Forward, || D::layer_norm(x, g, b))
}

/// BatchNorm with given statistics (inference): `(x − mean)/sqrt(var + eps)·γ + β`.
pub fn batch_norm_eval<E: SpinDtype, D: SpinDevice<E>, T: Tape<E, D> + Merge<T>>(
    x: Tensor<Mat, E, D, T>,
    mean: &[E],
    var: &[E],
    g: Tensor<(usize,), E, D, T>,
    b: Tensor<(usize,), E, D, T>,
) -> Tensor<Mat, E, D, T> {
    let dev = x.device().clone();
    let c = mean.len();
    let inv: Vec<E> = var
        .iter()
        .map(|&v| E::one() / (v + E::cast(BN_EPS)).sqrt())
        .collect();
    let neg_mean_inv: Vec<E> = mean.iter().zip(&inv).map(|(&m, &i)| -m * i).collect();
    let inv = dev.tensor_from_vec(inv, (c,));
    let shift = dev.tensor_from_vec(neg_mean_inv, (c,));
    // x·(inv·γ) + (−mean·inv·γ + β): the same map folded into one scale and one shift.
    let scale = g.with_empty_tape() * inv;
    let shift = g * shift + b;
    timed("batch norm (eval)", Forward, || {
        D::channel_affine(x, scale, shift)
    })
}

/// BatchNorm with batch statistics (training). Returns the output and the batch mean and biased
/// variance, which the caller folds into its running statistics.
pub fn batch_norm_train<E: SpinDtype, D: SpinDevice<E>, T: Tape<E, D> + Merge<T>>(
    x: Tensor<Mat, E, D, T>,
    g: Tensor<(usize,), E, D, T>,
    b: Tensor<(usize,), E, D, T>,
) -> (Tensor<Mat, E, D, T>, Vec<E>, Vec<E>) {
    timed("batch norm", Forward, || D::batch_norm_train(x, g, b))
}

/// Multi-head self-attention as timm: one qkv Linear whose outputs are laid out
/// (3, heads, head_dim), softmax(q·kᵀ·head_dim^-0.5)·v, then the output projection.
/// `x` is `(B·N, D)` for `batch` sequences of N tokens.
#[allow(clippy::too_many_arguments)]
pub fn attention<E: SpinDtype, D: SpinDevice<E>, T: Tape<E, D> + Merge<T>>(
    x: Tensor<Mat, E, D, T>,
    batch: usize,
    heads: usize,
    qkv_w: Tensor<Mat, E, D, T>,
    qkv_b: Tensor<(usize,), E, D, T>,
    proj_w: Tensor<Mat, E, D, T>,
    proj_b: Tensor<(usize,), E, D, T>,
) -> Tensor<Mat, E, D, T> {
    linear(attention_heads(x, batch, heads, qkv_w, qkv_b), proj_w, proj_b)
}

/// [`attention`] up to the output projection: the heads' outputs side by side, `(B·N, D)`, for a
/// caller that projects them with [`linear_residual`].
pub fn attention_heads<E: SpinDtype, D: SpinDevice<E>, T: Tape<E, D> + Merge<T>>(
    x: Tensor<Mat, E, D, T>,
    batch: usize,
    heads: usize,
    qkv_w: Tensor<Mat, E, D, T>,
    qkv_b: Tensor<(usize,), E, D, T>,
) -> Tensor<Mat, E, D, T> {
    let qkv = linear(x, qkv_w, qkv_b);
    timed("attention core", Forward, || D::attention_core(qkv, batch, heads))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::gelu_fallback;
    type T = OwnedTape<f64, Cpu>;

    /// Checks d(Σ f(x) ⊙ r)/dx against central differences, for a function of one matrix.
    fn check_grad(name: &str, shape: Mat, f: impl Fn(Tensor<Mat, f64, Cpu, T>) -> Tensor<Mat, f64, Cpu, T>) {
        let dev = Cpu::seed_from_u64(5);
        let x: Tensor<Mat, f64, Cpu> = dev.sample_normal_like(&shape);
        let probe = f(x.leaky_trace());
        let r: Tensor<Mat, f64, Cpu> = dev.sample_normal_like(probe.shape());
        let g = (probe * r.clone()).sum::<(), _>().backward();
        let analytic = g.get(&x).as_vec();
        let base = x.as_vec();
        let eps = 1e-6;
        for k in 0..base.len() {
            let eval = |d: f64| {
                let mut v = base.clone();
                v[k] += d;
                let y = f(dev.tensor_from_vec(v, shape).leaky_trace());
                (y.retaped::<NoneTape>() * r.clone()).sum::<(), _>().array()
            };
            let num = (eval(eps) - eval(-eps)) / (2.0 * eps);
            assert!(
                (num - analytic[k]).abs() < 1e-6 * (1.0 + num.abs()),
                "{name}: entry {k}: numeric {num}, analytic {}",
                analytic[k]
            );
        }
    }

    #[test]
    fn attention_inference_kernel_equals_the_composed_ops() {
        let dev = Cpu::seed_from_u64(9);
        let x: Tensor<Mat, f64, Cpu> = dev.sample_normal_like(&(2 * 5, 8));
        let w: Tensor<Mat, f64, Cpu> = dev.sample_normal_like(&(24, 8));
        let bq: Tensor<(usize,), f64, Cpu> = dev.sample_normal_like(&(24,));
        let wp: Tensor<Mat, f64, Cpu> = dev.sample_normal_like(&(8, 8));
        let bp: Tensor<(usize,), f64, Cpu> = dev.sample_normal_like(&(8,));
        let fused = attention(x.clone(), 2, 2, w.clone(), bq.clone(), wp.clone(), bp.clone()).as_vec();
        let composed = attention(
            x.leaky_trace(),
            2,
            2,
            w.retaped(),
            bq.retaped(),
            wp.retaped(),
            bp.retaped(),
        );
        for (a, b) in fused.iter().zip(composed.as_vec()) {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let dev = Cpu::seed_from_u64(6);
        let g: Tensor<(usize,), f64, Cpu> = dev.sample_normal_like(&(4,));
        let b: Tensor<(usize,), f64, Cpu> = dev.sample_normal_like(&(4,));
        check_grad("gelu", (3, 4), gelu);
        check_grad("gelu_fallback", (3, 4), gelu_fallback);
        // Strided inputs: the gradient must reach each value in its own layout.
        check_grad("gelu of a transpose", (3, 4), |x| {
            gelu(x.permute::<_, Axes2<1, 0>>())
        });
        check_grad("residual with a transpose", (4, 4), |x| {
            let skip = x.with_empty_tape().permute::<_, Axes2<1, 0>>();
            residual(gelu(x), skip)
        });
        check_grad("layer_norm", (3, 4), |x| layer_norm(x, g.retaped(), b.retaped()));
        check_grad("batch_norm_train", (5, 4), |x| {
            batch_norm_train(x, g.retaped(), b.retaped()).0
        });
        let mean = [0.1, -0.2, 0.3, 0.0];
        let var = [1.5, 0.5, 2.0, 1.0];
        check_grad("batch_norm_eval", (5, 4), |x| {
            batch_norm_eval(x, &mean, &var, g.retaped(), b.retaped())
        });
        let w: Tensor<Mat, f64, Cpu> = dev.sample_normal_like(&(12, 4));
        let bq: Tensor<(usize,), f64, Cpu> = dev.sample_normal_like(&(12,));
        let wp: Tensor<Mat, f64, Cpu> = dev.sample_normal_like(&(4, 4));
        check_grad("attention", (6, 4), |x| {
            attention(x, 2, 2, w.retaped(), bq.retaped(), wp.retaped(), b.retaped())
        });
        check_grad("mean_pool", (6, 4), |x| {
            x.reshape_like(&(2, 3, 4)).mean::<_, Axis<1>>()
        });
    }
}
