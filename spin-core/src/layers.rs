//! timm-exact building blocks. Each holds its parameters with the shapes PyTorch uses (so a
//! checkpoint maps one to one) and does its math on runtime-shaped `(rows, features)` matrices, so
//! the heavy code is compiled once per dtype and device, not once per model.
use crate::checkpoint::ParamSlot;
#[allow(unused_imports)]
use crate::conv::Kernels as _;
use crate::conv::Nhwc;
use crate::dtype::{SpinDevice, SpinDtype};
use dfdx::prelude::*;
use dfdx::tensor::Tape;
use rand::Rng;

/// `(rows, features)`: a batch of tokens or pixels, channels last.
pub type Mat = (usize, usize);

/// BatchNorm epsilon, as PyTorch's default.
pub const BN_EPS: f64 = 1e-5;
/// BatchNorm running-statistics momentum, as PyTorch's default.
pub const BN_MOMENTUM: f64 = 0.1;
/// LayerNorm epsilon, as timm's ViT.
pub const LN_EPS: f64 = 1e-6;

/// The activation a ConvMixer uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Act {
    /// GELU in its exact form, x·Φ(x) with the erf (PyTorch's default, not the tanh approximation).
    #[default]
    Gelu,
    Relu,
}

impl Act {
    pub fn apply<E: SpinDtype, D: SpinDevice<E>, T: Tape<E, D>>(
        self,
        x: Tensor<Mat, E, D, T>,
    ) -> Tensor<Mat, E, D, T> {
        match self {
            Act::Gelu => gelu(x),
            Act::Relu => x.relu(),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Act::Gelu => "gelu",
            Act::Relu => "relu",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Initialisation: distributions that sample in f64 and convert, so they work for every dtype.

/// U(-a, a) with a = 1/sqrt(fan_in), PyTorch's default for conv and linear weights
/// (kaiming_uniform with a = sqrt(5)); fan_in is the product of all dims but the first.
pub fn reset_fan_in<S: Shape, E: SpinDtype, D: Device<E>>(t: &mut Tensor<S, E, D>) -> Result<(), D::Err> {
    let dims = t.shape().concrete();
    let dims = dims.as_ref();
    let fan_in: usize = dims.iter().skip(1).product::<usize>().max(1);
    let a = 1.0 / (fan_in as f64).sqrt();
    t.try_fill_with_distr(Sample(move |r: &mut dyn rand::RngCore| r.gen_range(-a..a)))
}

/// timm's ViT init for weights and embeddings: normal(0, 0.02) truncated to ±2 (absolute).
pub fn reset_trunc_normal<S: Shape, E: SpinDtype, D: Device<E>>(
    t: &mut Tensor<S, E, D>,
) -> Result<(), D::Err> {
    t.try_fill_with_distr(Sample(|r: &mut dyn rand::RngCore| loop {
        let v: f64 = <rand_distr::StandardNormal as rand_distr::Distribution<f64>>::sample(
            &rand_distr::StandardNormal,
            r,
        ) * 0.02;
        if v.abs() <= 2.0 {
            break v;
        }
    }))
}

pub fn reset_zeros<S: Shape, E: SpinDtype, D: Device<E>>(t: &mut Tensor<S, E, D>) -> Result<(), D::Err> {
    t.try_fill_with_zeros()
}

pub fn reset_ones<S: Shape, E: SpinDtype, D: Device<E>>(t: &mut Tensor<S, E, D>) -> Result<(), D::Err> {
    t.try_fill_with_ones()
}

/// A distribution given by a closure producing f64 samples.
struct Sample<F>(F);
impl<E: SpinDtype, F: Fn(&mut dyn rand::RngCore) -> f64> rand_distr::Distribution<E> for Sample<F> {
    fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> E {
        let mut r = RngRef(rng);
        E::cast((self.0)(&mut r))
    }
}
struct RngRef<'a, R: ?Sized>(&'a mut R);
impl<R: rand::RngCore + ?Sized> rand::RngCore for RngRef<'_, R> {
    fn next_u32(&mut self) -> u32 {
        self.0.next_u32()
    }
    fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        self.0.fill_bytes(dest)
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand::Error> {
        self.0.try_fill_bytes(dest)
    }
}

/// A stored parameter as a runtime-shaped matrix `(rows, cols)` on the caller's tape. Reshaping a
/// contiguous tensor moves no data, and the gradient flows back to the stored tensor.
pub fn param2<S: Shape, E: SpinDtype, D: SpinDevice<E>, T: Tape<E, D>>(
    t: &Tensor<S, E, D>,
    rows: usize,
    cols: usize,
) -> Tensor<Mat, E, D, T> {
    t.retaped::<T>().reshape_like(&(rows, cols))
}

/// A stored parameter as a runtime-shaped vector on the caller's tape.
pub fn param1<S: Shape, E: SpinDtype, D: SpinDevice<E>, T: Tape<E, D>>(
    t: &Tensor<S, E, D>,
) -> Tensor<(usize,), E, D, T> {
    let n = t.shape().num_elements();
    t.retaped::<T>().reshape_like(&(n,))
}

// ---------------------------------------------------------------------------------------------
// Functional forms on runtime shapes: the code every model shares.

/// Exact GELU, `x·Φ(x) = 0.5·x·(1 + erf(x/√2))`, as PyTorch's default `nn.GELU`.
///
/// Not dfdx's `accurate_gelu`: dfdx 0.13 computes the right values but its derivative drops the
/// 1/√2 of the inner term, so gradients through it are wrong (checked by the tests below).
pub fn gelu<S: Shape, E: SpinDtype, D: SpinDevice<E>, T: Tape<E, D>>(
    x: Tensor<S, E, D, T>,
) -> Tensor<S, E, D, T> {
    D::gelu(x)
}

/// GELU from dfdx ops for devices without spin's kernel: with g = GELU(x) and g' = GELU'(x)
/// computed as constants (by [`SpinDtype::gelu_and_grad`]), `x⊙g' + (g − x⊙g')` has GELU's value
/// and GELU's derivative.
pub fn gelu_fallback<S: Shape, E: SpinDtype, D: Device<E>, T: Tape<E, D>>(
    x: Tensor<S, E, D, T>,
) -> Tensor<S, E, D, T> {
    let dev = x.device().clone();
    let shape = *x.shape();
    let (mut slope, mut shift) = (Vec::new(), Vec::new());
    for v in x.as_vec() {
        let (g, dg) = v.gelu_and_grad();
        slope.push(dg);
        shift.push(g - v * dg);
    }
    x * dev.tensor_from_vec(slope, shape) + dev.tensor_from_vec(shift, shape)
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
    D::dwconv(x.reshape_like(&(b, h, wd, c)), w, bias, k)
        .unwrap()
        .reshape_like(&(rows, c))
}

/// `x · Wᵀ + b` with PyTorch's `(out, in)` weight.
pub fn linear<E: SpinDtype, D: SpinDevice<E>, T: Tape<E, D> + Merge<T>>(
    x: Tensor<Mat, E, D, T>,
    w: Tensor<Mat, E, D, T>,
    b: Tensor<(usize,), E, D, T>,
) -> Tensor<Mat, E, D, T> {
    if crate::gemm::has_kernels::<E>() {
        D::linear(x, w, b)
    } else {
        linear_composed(x, w, b)
    }
}

/// [`linear`] from dfdx ops (fallback and reference).
pub fn linear_composed<E: SpinDtype, D: Device<E>, T: Tape<E, D> + Merge<T>>(
    x: Tensor<Mat, E, D, T>,
    w: Tensor<Mat, E, D, T>,
    b: Tensor<(usize,), E, D, T>,
) -> Tensor<Mat, E, D, T> {
    let rows = x.shape().0;
    let out = w.shape().0;
    x.matmul(w.permute()) + b.broadcast_like::<_, Axis<0>>(&(rows, out))
}

/// Per-column affine map `x · s + t` from dfdx ops (the fallback of [`crate::conv::Kernels::channel_affine`]).
pub fn affine_composed<E: SpinDtype, D: Device<E>, T: Tape<E, D> + Merge<T>>(
    x: Tensor<Mat, E, D, T>,
    s: Tensor<(usize,), E, D, T>,
    t: Tensor<(usize,), E, D, T>,
) -> Tensor<Mat, E, D, T> {
    let shape = *x.shape();
    x * s.broadcast_like::<_, Axis<0>>(&shape) + t.broadcast_like::<_, Axis<0>>(&shape)
}

/// LayerNorm over the features of each row, eps 1e-6, with scale and shift.
pub fn layer_norm<E: SpinDtype, D: SpinDevice<E>, T: Tape<E, D> + Merge<T>>(
    x: Tensor<Mat, E, D, T>,
    g: Tensor<(usize,), E, D, T>,
    b: Tensor<(usize,), E, D, T>,
) -> Tensor<Mat, E, D, T> {
    D::layer_norm(x, g, b)
}

/// [`layer_norm`] from dfdx ops (fallback and reference).
pub fn layer_norm_composed<E: SpinDtype, D: Device<E>, T: Tape<E, D> + Merge<T>>(
    x: Tensor<Mat, E, D, T>,
    g: Tensor<(usize,), E, D, T>,
    b: Tensor<(usize,), E, D, T>,
) -> Tensor<Mat, E, D, T> {
    affine_composed(x.normalize::<Axis<1>>(LN_EPS), g, b)
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
    D::channel_affine(x, scale, shift)
}

/// BatchNorm with batch statistics (training). Returns the output and the batch mean and biased
/// variance, which the caller folds into its running statistics.
pub fn batch_norm_train<E: SpinDtype, D: SpinDevice<E>, T: Tape<E, D> + Merge<T>>(
    x: Tensor<Mat, E, D, T>,
    g: Tensor<(usize,), E, D, T>,
    b: Tensor<(usize,), E, D, T>,
) -> (Tensor<Mat, E, D, T>, Vec<E>, Vec<E>) {
    D::batch_norm_train(x, g, b)
}

/// [`batch_norm_train`] from dfdx ops (fallback and reference).
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
    let qkv = linear(x, qkv_w, qkv_b);
    if !T::OWNS_TAPE {
        // Inference: the core in one kernel where the device has it.
        let (q, tape) = qkv.split_tape();
        if let Some(core) = D::attention_core_infer(&q, batch, heads) {
            return linear(core.put_tape(tape), proj_w, proj_b);
        }
        return attention_core_composed(q.put_tape(tape), batch, heads, proj_w, proj_b);
    }
    attention_core_composed(qkv, batch, heads, proj_w, proj_b)
}

/// The attention core from dfdx ops (training, other devices, and the reference).
fn attention_core_composed<E: SpinDtype, D: SpinDevice<E>, T: Tape<E, D> + Merge<T>>(
    qkv: Tensor<Mat, E, D, T>,
    batch: usize,
    heads: usize,
    proj_w: Tensor<Mat, E, D, T>,
    proj_b: Tensor<(usize,), E, D, T>,
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
    let out = attn
        .matmul(v)
        .permute::<_, Axes4<0, 2, 1, 3>>()
        .reshape_like(&(rows, dim));
    linear(out, proj_w, proj_b)
}

// ---------------------------------------------------------------------------------------------
// Parameter holders. Shapes are type-level (dfdx registers only const-shaped tensors) and follow
// PyTorch's layouts; the math above runs on runtime shapes.

macro_rules! collection {
    ($ty:ident < $($g:ident),* > { $($field:ident : $opt:expr),* $(,)? }) => {
        impl<$($g: ConstDim,)* E: SpinDtype, D: SpinDevice<E>> TensorCollection<E, D> for $ty<$($g,)* E, D> {
            type To<E2: Dtype, D2: Device<E2>> = $ty<$($g,)* E2, D2>;
            fn iter_tensors<V: ModuleVisitor<Self, E, D>>(
                visitor: &mut V,
            ) -> Result<Option<Self::To<V::E2, V::D2>>, V::Err> {
                visitor.visit_fields(
                    ($(Self::tensor(stringify!($field), |s| &s.$field, |s| &mut s.$field, $opt),)*),
                    |($($field,)*)| $ty { $($field,)* },
                )
            }
        }
        impl<$($g: ConstDim,)* E: SpinDtype, D: SpinDevice<E>> $ty<$($g,)* E, D> {
            /// This part's tensors under their PyTorch names, for checkpoints.
            pub fn slots(&mut self) -> Vec<(String, &mut dyn ParamSlot<E>)> {
                vec![$((stringify!($field).to_string(), &mut self.$field as &mut dyn ParamSlot<E>),)*]
            }
        }
    };
}

/// A Linear layer: `weight (O, I)`, `bias (O,)`.
#[derive(Clone, Debug)]
pub struct Linear<I: ConstDim, O: ConstDim, E: Dtype, D: Storage<E>> {
    pub weight: Tensor<(O, I), E, D>,
    pub bias: Tensor<(O,), E, D>,
}
collection!(Linear<I, O> {
    weight: TensorOptions::reset_with(reset_fan_in),
    bias: TensorOptions::reset_to_zeros(),
});

impl<I: ConstDim, O: ConstDim, E: SpinDtype, D: SpinDevice<E>> Linear<I, O, E, D> {
    pub fn forward<T: Tape<E, D> + Merge<T>>(&self, x: Tensor<Mat, E, D, T>) -> Tensor<Mat, E, D, T> {
        linear(x, param2(&self.weight, O::SIZE, I::SIZE), param1(&self.bias))
    }
}

/// A ViT Linear layer: same tensors, timm's truncated-normal init.
#[derive(Clone, Debug)]
pub struct VitLinear<I: ConstDim, O: ConstDim, E: Dtype, D: Storage<E>> {
    pub weight: Tensor<(O, I), E, D>,
    pub bias: Tensor<(O,), E, D>,
}
collection!(VitLinear<I, O> {
    weight: TensorOptions::reset_with(reset_trunc_normal),
    bias: TensorOptions::reset_to_zeros(),
});

impl<I: ConstDim, O: ConstDim, E: SpinDtype, D: SpinDevice<E>> VitLinear<I, O, E, D> {
    pub fn forward<T: Tape<E, D> + Merge<T>>(&self, x: Tensor<Mat, E, D, T>) -> Tensor<Mat, E, D, T> {
        linear(x, param2(&self.weight, O::SIZE, I::SIZE), param1(&self.bias))
    }
    pub fn w<T: Tape<E, D>>(&self) -> Tensor<Mat, E, D, T> {
        param2(&self.weight, O::SIZE, I::SIZE)
    }
    pub fn b<T: Tape<E, D>>(&self) -> Tensor<(usize,), E, D, T> {
        param1(&self.bias)
    }
}

/// A convolution with kernel = stride = P and no padding (ConvMixer's stem, ViT's patch
/// embedding): `weight (C, 3, P, P)`, `bias (C,)`, computed as patchify + matmul.
#[derive(Clone, Debug)]
pub struct PatchConv<C: ConstDim, P: ConstDim, E: Dtype, D: Storage<E>> {
    pub weight: Tensor<(C, Const<3>, P, P), E, D>,
    pub bias: Tensor<(C,), E, D>,
}
collection!(PatchConv<C, P> {
    weight: TensorOptions::reset_with(reset_fan_in),
    bias: TensorOptions::reset_to_zeros(),
});

impl<C: ConstDim, P: ConstDim, E: SpinDtype, D: SpinDevice<E>> PatchConv<C, P, E, D> {
    /// NCHW images `(B, 3, H, W)` → `(B·(H/P)·(W/P), C)`, channels last.
    pub fn forward<T: Tape<E, D> + Merge<T>>(&self, x: Tensor<Nhwc, E, D, T>) -> Tensor<Mat, E, D, T> {
        let patches = D::patchify(x, P::SIZE).unwrap();
        linear(
            patches,
            param2(&self.weight, C::SIZE, 3 * P::SIZE * P::SIZE),
            param1(&self.bias),
        )
    }
}

/// A depthwise K×K convolution with 'same' padding: `weight (C, 1, K, K)`, `bias (C,)`.
#[derive(Clone, Debug)]
pub struct DwConv<C: ConstDim, K: ConstDim, E: Dtype, D: Storage<E>> {
    pub weight: Tensor<(C, Const<1>, K, K), E, D>,
    pub bias: Tensor<(C,), E, D>,
}
collection!(DwConv<C, K> {
    weight: TensorOptions::reset_with(reset_fan_in),
    bias: TensorOptions::reset_to_zeros(),
});

impl<C: ConstDim, K: ConstDim, E: SpinDtype, D: SpinDevice<E>> DwConv<C, K, E, D> {
    /// `x` is `(B·H·W, C)`; `hw` gives the spatial size.
    pub fn forward<T: Tape<E, D> + Merge<T>>(
        &self,
        x: Tensor<Mat, E, D, T>,
        (b, h, w): (usize, usize, usize),
    ) -> Tensor<Mat, E, D, T> {
        let k = K::SIZE;
        depthwise(
            x,
            param2(&self.weight, C::SIZE, k * k),
            param1(&self.bias),
            (b, h, w),
            k,
        )
    }
}

/// BatchNorm over channels: `weight`, `bias` (trained), `running_mean`, `running_var` (not).
#[derive(Clone, Debug)]
pub struct BatchNorm<C: ConstDim, E: Dtype, D: Storage<E>> {
    pub weight: Tensor<(C,), E, D>,
    pub bias: Tensor<(C,), E, D>,
    pub running_mean: Tensor<(C,), E, D>,
    pub running_var: Tensor<(C,), E, D>,
}
collection!(BatchNorm<C> {
    weight: TensorOptions::reset_to_ones(),
    bias: TensorOptions::reset_to_zeros(),
    running_mean: TensorOptions::detached(reset_zeros),
    running_var: TensorOptions::detached(reset_ones),
});

impl<C: ConstDim, E: SpinDtype, D: SpinDevice<E>> BatchNorm<C, E, D> {
    /// Inference: running statistics.
    pub fn forward<T: Tape<E, D> + Merge<T>>(&self, x: Tensor<Mat, E, D, T>) -> Tensor<Mat, E, D, T> {
        batch_norm_eval(
            x,
            &self.running_mean.as_vec(),
            &self.running_var.as_vec(),
            param1(&self.weight),
            param1(&self.bias),
        )
    }

    /// The inference map as one scale and shift per channel: `γ/√(var + eps)` and
    /// `β − mean·γ/√(var + eps)`.
    pub fn folded(&self) -> (Vec<E>, Vec<E>) {
        let (g, b) = (self.weight.as_vec(), self.bias.as_vec());
        let (m, v) = (self.running_mean.as_vec(), self.running_var.as_vec());
        let scale: Vec<E> = g
            .iter()
            .zip(&v)
            .map(|(&g, &v)| g * (E::one() / (v + E::cast(BN_EPS)).sqrt()))
            .collect();
        let shift = b
            .iter()
            .zip(&m)
            .zip(&scale)
            .map(|((&b, &m), &s)| b - m * s)
            .collect();
        (scale, shift)
    }

    /// Training: batch statistics. Returns the output and the statistics to fold into the running
    /// ones with [`BatchNorm::update_running`] (kept apart so a forward pass can borrow `self`).
    pub fn forward_train<T: Tape<E, D> + Merge<T>>(
        &self,
        x: Tensor<Mat, E, D, T>,
    ) -> (Tensor<Mat, E, D, T>, BatchStats<E>) {
        let rows = x.shape().0;
        let (y, mean, var) = batch_norm_train(x, param1(&self.weight), param1(&self.bias));
        (y, BatchStats { mean, var, rows })
    }

    /// Moves the running statistics by PyTorch's rule: momentum 0.1, unbiased batch variance.
    pub fn update_running(&mut self, s: &BatchStats<E>) {
        let m = BN_MOMENTUM;
        let n = s.rows as f64;
        let unbias = if n > 1.0 { n / (n - 1.0) } else { 1.0 };
        let mix = |old: Vec<E>, new: &[E], f: f64| -> Vec<E> {
            old.iter()
                .zip(new)
                .map(|(&r, &b)| E::cast((1.0 - m) * r.as_f64() + m * b.as_f64() * f))
                .collect()
        };
        let rm = mix(self.running_mean.as_vec(), &s.mean, 1.0);
        let rv = mix(self.running_var.as_vec(), &s.var, unbias);
        self.running_mean.copy_from(&rm);
        self.running_var.copy_from(&rv);
    }

    /// Training forward that updates the running statistics at once.
    pub fn forward_mut<T: Tape<E, D> + Merge<T>>(&mut self, x: Tensor<Mat, E, D, T>) -> Tensor<Mat, E, D, T> {
        let (y, stats) = self.forward_train(x);
        self.update_running(&stats);
        y
    }
}

/// Batch statistics of one BatchNorm call in training mode.
#[derive(Clone, Debug)]
pub struct BatchStats<E> {
    pub mean: Vec<E>,
    pub var: Vec<E>,
    pub rows: usize,
}

/// LayerNorm over features: `weight`, `bias`.
#[derive(Clone, Debug)]
pub struct LayerNorm<C: ConstDim, E: Dtype, D: Storage<E>> {
    pub weight: Tensor<(C,), E, D>,
    pub bias: Tensor<(C,), E, D>,
}
collection!(LayerNorm<C> {
    weight: TensorOptions::reset_to_ones(),
    bias: TensorOptions::reset_to_zeros(),
});

impl<C: ConstDim, E: SpinDtype, D: SpinDevice<E>> LayerNorm<C, E, D> {
    pub fn forward<T: Tape<E, D> + Merge<T>>(&self, x: Tensor<Mat, E, D, T>) -> Tensor<Mat, E, D, T> {
        layer_norm(x, param1(&self.weight), param1(&self.bias))
    }
}

/// timm's `Attention`: `qkv (3D, D)` and `proj (D, D)`.
#[derive(Clone, Debug)]
pub struct Attention<Dm: ConstDim, Qkv: ConstDim, E: Dtype, D: Storage<E>> {
    pub qkv: VitLinear<Dm, Qkv, E, D>,
    pub proj: VitLinear<Dm, Dm, E, D>,
}

impl<Dm: ConstDim, Qkv: ConstDim, E: SpinDtype, D: SpinDevice<E>> TensorCollection<E, D>
    for Attention<Dm, Qkv, E, D>
{
    type To<E2: Dtype, D2: Device<E2>> = Attention<Dm, Qkv, E2, D2>;
    fn iter_tensors<V: ModuleVisitor<Self, E, D>>(
        visitor: &mut V,
    ) -> Result<Option<Self::To<V::E2, V::D2>>, V::Err> {
        visitor.visit_fields(
            (
                Self::module("qkv", |s| &s.qkv, |s| &mut s.qkv),
                Self::module("proj", |s| &s.proj, |s| &mut s.proj),
            ),
            |(qkv, proj)| Attention { qkv, proj },
        )
    }
}

impl<Dm: ConstDim, Qkv: ConstDim, E: SpinDtype, D: SpinDevice<E>> Attention<Dm, Qkv, E, D> {
    pub fn slots(&mut self) -> Vec<(String, &mut dyn ParamSlot<E>)> {
        prefixed("qkv", self.qkv.slots())
            .into_iter()
            .chain(prefixed("proj", self.proj.slots()))
            .collect()
    }
    pub fn forward<T: Tape<E, D> + Merge<T>>(
        &self,
        x: Tensor<Mat, E, D, T>,
        batch: usize,
        heads: usize,
    ) -> Tensor<Mat, E, D, T> {
        attention(
            x,
            batch,
            heads,
            self.qkv.w(),
            self.qkv.b(),
            self.proj.w(),
            self.proj.b(),
        )
    }
}

/// timm's `Mlp`: `fc1 (H, D)`, exact GELU, `fc2 (D, H)`.
#[derive(Clone, Debug)]
pub struct Mlp<Dm: ConstDim, Hid: ConstDim, E: Dtype, D: Storage<E>> {
    pub fc1: VitLinear<Dm, Hid, E, D>,
    pub fc2: VitLinear<Hid, Dm, E, D>,
}

impl<Dm: ConstDim, Hid: ConstDim, E: SpinDtype, D: SpinDevice<E>> TensorCollection<E, D>
    for Mlp<Dm, Hid, E, D>
{
    type To<E2: Dtype, D2: Device<E2>> = Mlp<Dm, Hid, E2, D2>;
    fn iter_tensors<V: ModuleVisitor<Self, E, D>>(
        visitor: &mut V,
    ) -> Result<Option<Self::To<V::E2, V::D2>>, V::Err> {
        visitor.visit_fields(
            (
                Self::module("fc1", |s| &s.fc1, |s| &mut s.fc1),
                Self::module("fc2", |s| &s.fc2, |s| &mut s.fc2),
            ),
            |(fc1, fc2)| Mlp { fc1, fc2 },
        )
    }
}

impl<Dm: ConstDim, Hid: ConstDim, E: SpinDtype, D: SpinDevice<E>> Mlp<Dm, Hid, E, D> {
    pub fn slots(&mut self) -> Vec<(String, &mut dyn ParamSlot<E>)> {
        prefixed("fc1", self.fc1.slots())
            .into_iter()
            .chain(prefixed("fc2", self.fc2.slots()))
            .collect()
    }
    pub fn forward<T: Tape<E, D> + Merge<T>>(&self, x: Tensor<Mat, E, D, T>) -> Tensor<Mat, E, D, T> {
        self.fc2.forward(gelu(self.fc1.forward(x)))
    }
}

fn prefixed<'a, E>(
    p: &str,
    v: Vec<(String, &'a mut dyn ParamSlot<E>)>,
) -> Vec<(String, &'a mut dyn ParamSlot<E>)> {
    v.into_iter().map(|(n, t)| (format!("{p}.{n}"), t)).collect()
}

/// A pointwise 1×1 convolution: `weight (C, C, 1, 1)` as PyTorch stores it, `bias (C,)`;
/// on channels-last features it is one matmul.
#[derive(Clone, Debug)]
pub struct Pointwise<C: ConstDim, E: Dtype, D: Storage<E>> {
    pub weight: Tensor<(C, C, Const<1>, Const<1>), E, D>,
    pub bias: Tensor<(C,), E, D>,
}
collection!(Pointwise<C> {
    weight: TensorOptions::reset_with(reset_fan_in),
    bias: TensorOptions::reset_to_zeros(),
});

impl<C: ConstDim, E: SpinDtype, D: SpinDevice<E>> Pointwise<C, E, D> {
    pub fn forward<T: Tape<E, D> + Merge<T>>(&self, x: Tensor<Mat, E, D, T>) -> Tensor<Mat, E, D, T> {
        linear(x, param2(&self.weight, C::SIZE, C::SIZE), param1(&self.bias))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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

    /// The gemm-backed linear op against dfdx's matmul: outputs and the gradients of x, W and b
    /// (f64, 1e-12), with enough rows for several row tasks and an odd output count.
    #[test]
    fn linear_matches_dfdx_matmul_forward_and_backward() {
        let dev = Cpu::seed_from_u64(7);
        let x: Tensor<Mat, f64, Cpu> = dev.sample_normal_like(&(300, 24));
        let w: Tensor<Mat, f64, Cpu> = dev.sample_normal_like(&(37, 24));
        let b: Tensor<(usize,), f64, Cpu> = dev.sample_normal_like(&(37,));
        let r: Tensor<Mat, f64, Cpu> = dev.sample_normal_like(&(300, 37));
        let run = |f: &dyn Fn(
            Tensor<Mat, f64, Cpu, T>,
            Tensor<Mat, f64, Cpu, T>,
            Tensor<(usize,), f64, Cpu, T>,
        ) -> Tensor<Mat, f64, Cpu, T>| {
            let grads = Gradients::leaky();
            let y = f(
                x.clone().traced(grads),
                w.clone().put_tape(OwnedTape::default()),
                b.clone().put_tape(OwnedTape::default()),
            );
            let out = y.retaped::<NoneTape>().as_vec();
            let g = (y * r.clone()).sum::<(), _>().backward();
            (out, g.get(&x).as_vec(), g.get(&w).as_vec(), g.get(&b).as_vec())
        };
        let got = run(&|x, w, b| Cpu::linear(x, w, b));
        let want = run(&|x, w, b| linear_composed(x, w, b));
        let close = |a: &[f64], b: &[f64]| {
            a.iter()
                .zip(b)
                .all(|(a, b)| (a - b).abs() < 1e-12 * (1.0 + b.abs()))
        };
        assert!(close(&got.0, &want.0), "outputs differ");
        assert!(close(&got.1, &want.1), "dL/dx differs");
        assert!(close(&got.2, &want.2), "dL/dW differs");
        assert!(close(&got.3, &want.3), "dL/db differs");
    }

    #[test]
    fn gradients_match_finite_differences() {
        let dev = Cpu::seed_from_u64(6);
        let g: Tensor<(usize,), f64, Cpu> = dev.sample_normal_like(&(4,));
        let b: Tensor<(usize,), f64, Cpu> = dev.sample_normal_like(&(4,));
        check_grad("gelu", (3, 4), gelu);
        check_grad("gelu_fallback", (3, 4), gelu_fallback);
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
