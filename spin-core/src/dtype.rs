//! The dtype and device bounds every spin model is generic over.
use dfdx::prelude::*;

/// A float dtype spin's layers run in: f32, f64, and f16 through `half`.
pub trait SpinDtype: Dtype + num_traits::Float + std::fmt::Debug + Send + Sync + 'static {
    /// The nearest value of this dtype.
    fn cast(v: f64) -> Self {
        <Self as num_traits::NumCast>::from(v).unwrap_or_else(Self::nan)
    }
    fn as_f64(self) -> f64 {
        num_traits::ToPrimitive::to_f64(&self).unwrap_or(f64::NAN)
    }
}
impl SpinDtype for f32 {}
impl SpinDtype for f64 {}
impl SpinDtype for half::f16 {}

/// A dfdx device with the ops spin needs: dfdx's own plus spin's convolution kernels
/// ([`crate::conv::Kernels`]): hand-written on the CPU, dfdx-op fallbacks elsewhere.
pub trait SpinDevice<E: SpinDtype>: Device<E> + crate::conv::Kernels<E> {}
impl<E: SpinDtype, D: Device<E> + crate::conv::Kernels<E>> SpinDevice<E> for D {}
