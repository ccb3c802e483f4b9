//! spin-core: the pieces behind spin's statically typed, weight-shared isotropic networks.
//!
//! - [`conv`]: the convolutions dfdx 0.13 lacks on stable (depthwise K×K, patch embedding), written
//!   on dfdx's public autograd API with multi-threaded CPU kernels and a dfdx-ops fallback.
//! - [`layers`]: timm-exact building blocks (Linear, BatchNorm, LayerNorm, attention, MLP).
//! - [`schedule`] and [`sharing`]: which parameter group each layer uses, and storage that keeps
//!   each shared tensor once.
//! - [`convmixer`] and [`vit`]: the two isotropic families, typed by a config the macros generate.
//! - [`checkpoint`]: timm-named safetensors in and out.
//! - [`infer`] (on [`gemm`]): fused inference forwards on host buffers, used when there is no tape.
#![allow(clippy::type_complexity)]
extern crate self as spin_core;

/// The typed surface both families share: `forward` on a batch `(B, 3, IMG, IMG)` (any `B: Dim`)
/// and on a single image `(3, IMG, IMG)`, `forward_mut` on a batch, and [`train::SpinModel`]. All
/// of it converts to the runtime-shaped `forward_dyn` / `forward_dyn_mut` and back, so the model
/// logic is written once per family.
macro_rules! typed_surface {
    ($model:ident, $config:ident $(, $m:ident : $mb:ident)?) => {
        impl<C: $config, E: SpinDtype, D: SpinDevice<E>, B: Dim, T: Tape<E, D> + Merge<T> $(, $m: $mb<C, E, D>)?>
            Module<Tensor<(B, Const<3>, C::Image, C::Image), E, D, T>> for $model<C, E, D $(, $m)?>
        {
            type Output = Tensor<(B, C::Classes), E, D, T>;
            type Error = D::Err;
            fn try_forward(
                &self,
                x: Tensor<(B, Const<3>, C::Image, C::Image), E, D, T>,
            ) -> Result<Self::Output, D::Err> {
                let b = x.shape().0;
                let img = C::Image::SIZE;
                let y = self.forward_dyn(x.reshape_like(&(b.size(), 3, img, img)));
                Ok(y.reshape_like(&(b, Default::default())))
            }
        }

        impl<C: $config, E: SpinDtype, D: SpinDevice<E>, T: Tape<E, D> + Merge<T> $(, $m: $mb<C, E, D>)?>
            Module<Tensor<(Const<3>, C::Image, C::Image), E, D, T>> for $model<C, E, D $(, $m)?>
        {
            type Output = Tensor<(C::Classes,), E, D, T>;
            type Error = D::Err;
            fn try_forward(
                &self,
                x: Tensor<(Const<3>, C::Image, C::Image), E, D, T>,
            ) -> Result<Self::Output, D::Err> {
                let img = C::Image::SIZE;
                let y = self.forward_dyn(x.reshape_like(&(1, 3, img, img)));
                Ok(y.reshape_like(&(Default::default(),)))
            }
        }

        impl<C: $config, E: SpinDtype, D: SpinDevice<E>, B: Dim, T: Tape<E, D> + Merge<T> $(, $m: $mb<C, E, D>)?>
            ModuleMut<Tensor<(B, Const<3>, C::Image, C::Image), E, D, T>> for $model<C, E, D $(, $m)?>
        {
            type Output = Tensor<(B, C::Classes), E, D, T>;
            type Error = D::Err;
            fn try_forward_mut(
                &mut self,
                x: Tensor<(B, Const<3>, C::Image, C::Image), E, D, T>,
            ) -> Result<Self::Output, D::Err> {
                let b = x.shape().0;
                let img = C::Image::SIZE;
                let y = self.forward_dyn_mut(x.reshape_like(&(b.size(), 3, img, img)));
                Ok(y.reshape_like(&(b, Default::default())))
            }
        }

        impl<C: $config, E: SpinDtype, D: SpinDevice<E> $(, $m: $mb<C, E, D>)?> crate::train::SpinModel<E, D>
            for $model<C, E, D $(, $m)?>
        {
            fn info(&self) -> crate::describe::ModelInfo {
                $model::info(self)
            }
            fn logits<T: Tape<E, D> + Merge<T>>(&self, x: Tensor<Nhwc, E, D, T>) -> Tensor<Mat, E, D, T> {
                self.forward_dyn(x)
            }
            fn logits_mut<T: Tape<E, D> + Merge<T>>(
                &mut self,
                x: Tensor<Nhwc, E, D, T>,
            ) -> Tensor<Mat, E, D, T> {
                self.forward_dyn_mut(x)
            }
        }
    };
}

pub mod checkpoint;
pub mod conv;
pub mod convmixer;
pub mod data;
pub mod describe;
pub mod dtype;
pub mod error;
pub mod fips;
pub mod fusion;
pub mod gemm;
pub mod infer;
pub mod layers;
pub mod norm;
pub mod schedule;
pub mod sharing;
pub mod train;
pub mod vit;

pub use checkpoint::TimmCheckpoint;
pub use describe::{Describe, Family, ModelInfo};
pub use dtype::{SpinDevice, SpinDtype};
pub use error::Error;
pub use schedule::{Pattern, Schedule};

/// Re-exported so generated code and users need only spin-core.
pub use dfdx;

/// Everything a model declaration needs: dfdx's prelude, spin's traits and the macros.
pub mod prelude {
    pub use crate::checkpoint::TimmCheckpoint;
    pub use crate::describe::{Describe, Family, ModelInfo};
    pub use crate::dtype::{SpinDevice, SpinDtype};
    pub use crate::schedule::{Pattern, Schedule};
    pub use crate::sharing::{ConvMixerShare, VitShare};
    pub use dfdx::prelude::*;
    pub use spin_macros::*;
}

// The CUDA device gets spin's kernels through the dfdx-op fallbacks (type-checked in CI with
// `--features cuda,dfdx/ci-check`).
#[cfg(feature = "cuda")]
const _: fn() = || {
    fn is_spin_device<D: SpinDevice<f32>>() {}
    is_spin_device::<dfdx::tensor::Cuda>();
};
