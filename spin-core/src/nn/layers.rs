//! Parameter holders: timm's layers with their tensors in the shapes PyTorch uses (so a checkpoint
//! maps one to one), type-level so dfdx can register them, computing through
//! [`super::functional`] on runtime shapes.
use super::functional::{
    attention, attention_heads, batch_norm_eval, batch_norm_train, depthwise, layer_norm, linear,
    linear_gelu, linear_residual,
};
use super::init::{reset_fan_in, reset_ones, reset_trunc_normal, reset_zeros};
use super::param::{param1, param2, ParamSlot};
use crate::base::{Mat, Nchw, SpinDtype, BN_EPS, BN_MOMENTUM};
use crate::device::SpinDevice;
use dfdx::prelude::*;
use dfdx::tensor::Tape;

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
    /// `(out, in)`.
    pub weight: Tensor<(O, I), E, D>,
    /// `(out,)`.
    pub bias: Tensor<(O,), E, D>,
}
collection!(Linear<I, O> {
    weight: TensorOptions::reset_with(reset_fan_in),
    bias: TensorOptions::reset_to_zeros(),
});

impl<I: ConstDim, O: ConstDim, E: SpinDtype, D: SpinDevice<E>> Linear<I, O, E, D> {
    /// `x · Wᵀ + b` on `(rows, in)`.
    pub fn forward<T: Tape<E, D> + Merge<T>>(&self, x: Tensor<Mat, E, D, T>) -> Tensor<Mat, E, D, T> {
        linear(x, param2(&self.weight, O::SIZE, I::SIZE), param1(&self.bias))
    }
}

/// A ViT Linear layer: same tensors, timm's truncated-normal init.
#[derive(Clone, Debug)]
pub struct VitLinear<I: ConstDim, O: ConstDim, E: Dtype, D: Storage<E>> {
    /// `(out, in)`.
    pub weight: Tensor<(O, I), E, D>,
    /// `(out,)`.
    pub bias: Tensor<(O,), E, D>,
}
collection!(VitLinear<I, O> {
    weight: TensorOptions::reset_with(reset_trunc_normal),
    bias: TensorOptions::reset_to_zeros(),
});

impl<I: ConstDim, O: ConstDim, E: SpinDtype, D: SpinDevice<E>> VitLinear<I, O, E, D> {
    /// `x · Wᵀ + b` on `(rows, in)`.
    pub fn forward<T: Tape<E, D> + Merge<T>>(&self, x: Tensor<Mat, E, D, T>) -> Tensor<Mat, E, D, T> {
        linear(x, param2(&self.weight, O::SIZE, I::SIZE), param1(&self.bias))
    }
    /// The weight as a runtime-shaped matrix on the caller's tape.
    pub fn w<T: Tape<E, D>>(&self) -> Tensor<Mat, E, D, T> {
        param2(&self.weight, O::SIZE, I::SIZE)
    }
    /// The bias as a runtime-shaped vector on the caller's tape.
    pub fn b<T: Tape<E, D>>(&self) -> Tensor<(usize,), E, D, T> {
        param1(&self.bias)
    }
}

/// A convolution with kernel = stride = P and no padding (ConvMixer's stem, ViT's patch
/// embedding): `weight (C, 3, P, P)`, `bias (C,)`, computed as patchify + matmul.
#[derive(Clone, Debug)]
pub struct PatchConv<C: ConstDim, P: ConstDim, E: Dtype, D: Storage<E>> {
    /// `(C, 3, P, P)`.
    pub weight: Tensor<(C, Const<3>, P, P), E, D>,
    /// `(C,)`.
    pub bias: Tensor<(C,), E, D>,
}
collection!(PatchConv<C, P> {
    weight: TensorOptions::reset_with(reset_fan_in),
    bias: TensorOptions::reset_to_zeros(),
});

impl<C: ConstDim, P: ConstDim, E: SpinDtype, D: SpinDevice<E>> PatchConv<C, P, E, D> {
    /// NCHW images `(B, 3, H, W)` → `(B·(H/P)·(W/P), C)`, channels last.
    pub fn forward<T: Tape<E, D> + Merge<T>>(&self, x: Tensor<Nchw, E, D, T>) -> Tensor<Mat, E, D, T> {
        use crate::device::profile::{timed, Pass::Forward};
        let patches = timed("patchify", Forward, || D::patchify(x, P::SIZE)).unwrap();
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
    /// `(C, 1, K, K)`.
    pub weight: Tensor<(C, Const<1>, K, K), E, D>,
    /// `(C,)`.
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
    /// Scale γ.
    pub weight: Tensor<(C,), E, D>,
    /// Shift β.
    pub bias: Tensor<(C,), E, D>,
    /// Running mean (not trained).
    pub running_mean: Tensor<(C,), E, D>,
    /// Running variance (not trained).
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
    /// Per-channel mean.
    pub mean: Vec<E>,
    /// Per-channel biased variance.
    pub var: Vec<E>,
    /// Rows the statistics were taken over.
    pub rows: usize,
}

/// LayerNorm over features: `weight`, `bias`.
#[derive(Clone, Debug)]
pub struct LayerNorm<C: ConstDim, E: Dtype, D: Storage<E>> {
    /// Scale.
    pub weight: Tensor<(C,), E, D>,
    /// Shift.
    pub bias: Tensor<(C,), E, D>,
}
collection!(LayerNorm<C> {
    weight: TensorOptions::reset_to_ones(),
    bias: TensorOptions::reset_to_zeros(),
});

impl<C: ConstDim, E: SpinDtype, D: SpinDevice<E>> LayerNorm<C, E, D> {
    /// LayerNorm over the features of each row.
    pub fn forward<T: Tape<E, D> + Merge<T>>(&self, x: Tensor<Mat, E, D, T>) -> Tensor<Mat, E, D, T> {
        layer_norm(x, param1(&self.weight), param1(&self.bias))
    }
}

/// timm's `Attention`: `qkv (3D, D)` and `proj (D, D)`.
#[derive(Clone, Debug)]
pub struct Attention<Dm: ConstDim, Qkv: ConstDim, E: Dtype, D: Storage<E>> {
    /// The qkv projection, outputs laid out (3, heads, head_dim).
    pub qkv: VitLinear<Dm, Qkv, E, D>,
    /// The output projection.
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
    /// This part's tensors under their PyTorch names, for checkpoints.
    pub fn slots(&mut self) -> Vec<(String, &mut dyn ParamSlot<E>)> {
        prefixed("qkv", self.qkv.slots())
            .into_iter()
            .chain(prefixed("proj", self.proj.slots()))
            .collect()
    }
    /// Self-attention of `batch` sequences laid out `(batch·N, D)`.
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
    /// `skip + self.forward(x)`, the sum in the projection's op.
    pub fn forward_residual<T: Tape<E, D> + Merge<T>>(
        &self,
        x: Tensor<Mat, E, D, T>,
        skip: Tensor<Mat, E, D, T>,
        batch: usize,
        heads: usize,
    ) -> Tensor<Mat, E, D, T> {
        let h = attention_heads(x, batch, heads, self.qkv.w(), self.qkv.b());
        linear_residual(h, self.proj.w(), self.proj.b(), skip)
    }
}

/// timm's `Mlp`: `fc1 (H, D)`, exact GELU, `fc2 (D, H)`.
#[derive(Clone, Debug)]
pub struct Mlp<Dm: ConstDim, Hid: ConstDim, E: Dtype, D: Storage<E>> {
    /// The first Linear, `(H, D)`.
    pub fc1: VitLinear<Dm, Hid, E, D>,
    /// The second Linear, `(D, H)`.
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
    /// This part's tensors under their PyTorch names, for checkpoints.
    pub fn slots(&mut self) -> Vec<(String, &mut dyn ParamSlot<E>)> {
        prefixed("fc1", self.fc1.slots())
            .into_iter()
            .chain(prefixed("fc2", self.fc2.slots()))
            .collect()
    }
    /// `fc2(GELU(fc1(x)))`.
    pub fn forward<T: Tape<E, D> + Merge<T>>(&self, x: Tensor<Mat, E, D, T>) -> Tensor<Mat, E, D, T> {
        self.fc2.forward(linear_gelu(x, self.fc1.w(), self.fc1.b()))
    }
    /// `skip + self.forward(x)`, the sum in fc2's op.
    pub fn forward_residual<T: Tape<E, D> + Merge<T>>(
        &self,
        x: Tensor<Mat, E, D, T>,
        skip: Tensor<Mat, E, D, T>,
    ) -> Tensor<Mat, E, D, T> {
        let a = linear_gelu(x, self.fc1.w(), self.fc1.b());
        linear_residual(a, self.fc2.w(), self.fc2.b(), skip)
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
    /// `(C, C, 1, 1)`.
    pub weight: Tensor<(C, C, Const<1>, Const<1>), E, D>,
    /// `(C,)`.
    pub bias: Tensor<(C,), E, D>,
}
collection!(Pointwise<C> {
    weight: TensorOptions::reset_with(reset_fan_in),
    bias: TensorOptions::reset_to_zeros(),
});

impl<C: ConstDim, E: SpinDtype, D: SpinDevice<E>> Pointwise<C, E, D> {
    /// The 1×1 conv of `(rows, C)` channels-last features.
    pub fn forward<T: Tape<E, D> + Merge<T>>(&self, x: Tensor<Mat, E, D, T>) -> Tensor<Mat, E, D, T> {
        linear(x, param2(&self.weight, C::SIZE, C::SIZE), param1(&self.bias))
    }
}
