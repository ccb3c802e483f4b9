//! The two isotropic families as dfdx models: [`convmixer::ConvMixer`] and [`vit::Vit`] (whose
//! MLPs are dense, or FiPS factors: [`fips_mlps`]), typed by the config a declaration generates,
//! and what every model offers at run time ([`SpinModel`], [`ModelInfo`]).
use crate::base::{Mat, Nchw, SpinDtype};
use crate::device::SpinDevice;
use crate::error::Error;
use crate::nn::param::TimmKeys;
use dfdx::prelude::*;
use dfdx::tensor::Tape;

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

        impl<C: $config, E: SpinDtype, D: SpinDevice<E> $(, $m: $mb<C, E, D>)?> crate::models::SpinModel<E, D>
            for $model<C, E, D $(, $m)?>
        {
            fn info(&self) -> crate::models::ModelInfo {
                $model::info(self)
            }
            fn logits<T: Tape<E, D> + Merge<T>>(&self, x: Tensor<Nchw, E, D, T>) -> Tensor<Mat, E, D, T> {
                self.forward_dyn(x)
            }
            fn logits_mut<T: Tape<E, D> + Merge<T>>(
                &mut self,
                x: Tensor<Nchw, E, D, T>,
            ) -> Tensor<Mat, E, D, T> {
                self.forward_dyn_mut(x)
            }
            fn block_outputs(&self, x: Tensor<Nchw, E, D>) -> Vec<Tensor<Mat, E, D>> {
                $model::block_outputs(self, x)
            }
        }
    };
}

pub mod convmixer;
mod describe;
pub mod fips_mlps;
mod plan;
pub mod vit;
mod vit_config;
mod vit_mlps;

pub use describe::{Describe, Family, ModelInfo};
pub use plan::{Arch, DataConfig, EvalOverride, FipsPlanInfo, Plan, PLAN_KEY};

/// A spin model with a runtime-shaped entry point (NCHW images in, logits out): what training,
/// evaluation and the registry drive.
///
/// ```
/// use spin_core::prelude::*;
/// use spin_core::models::SpinModel;
///
/// #[convmixer(dim = 16, kernel = 3, patch = 2, image = 8, classes = 10, depth = 2)]
/// struct Tiny;
///
/// let dev = Cpu::default();
/// let model = dev.build_module::<Tiny, f32>();
/// let logits = model.logits(dev.zeros_like(&(4, 3, 8, 8)));
/// assert_eq!(*logits.shape(), (4, 10));
/// assert_eq!(model.info().params, Tiny::PARAMS);
/// ```
pub trait SpinModel<E: SpinDtype, D: SpinDevice<E>>:
    TensorCollection<E, D> + TimmKeys<Elem = E> + Clone
{
    /// The model's description.
    fn info(&self) -> ModelInfo;
    /// Inference logits `(B, classes)` for NCHW images.
    fn logits<T: Tape<E, D> + Merge<T>>(&self, x: Tensor<Nchw, E, D, T>) -> Tensor<Mat, E, D, T>;
    /// Training logits (BatchNorm uses and updates batch statistics).
    fn logits_mut<T: Tape<E, D> + Merge<T>>(&mut self, x: Tensor<Nchw, E, D, T>) -> Tensor<Mat, E, D, T>;
    /// The model one deploys: the model itself, or for a training-time wrapper (fusion-aware
    /// training) the plain model it exports. Saving writes this.
    fn deployable(&self) -> Result<Box<dyn TimmKeys<Elem = E> + '_>, Error> {
        Ok(Box::new(self.clone()))
    }
    /// Every block's output, `(B·positions, width)`, with running statistics (empty for a model
    /// without blocks of its own, e.g. a fusion-aware wrapper).
    fn block_outputs(&self, x: Tensor<Nchw, E, D>) -> Vec<Tensor<Mat, E, D>> {
        let _ = x;
        Vec::new()
    }
}
