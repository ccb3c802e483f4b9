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
    /// Exact GELU x·Φ(x) and its derivative Φ(x) + x·φ(x), evaluated in f64.
    fn gelu_and_grad(self) -> (Self, Self) {
        let v = self.as_f64();
        let cdf = 0.5 * (1.0 + libm::erf(v * std::f64::consts::FRAC_1_SQRT_2));
        let pdf = (-0.5 * v * v).exp() * (0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2);
        (Self::cast(v * cdf), Self::cast(cdf + v * pdf))
    }
}
impl SpinDtype for f32 {
    /// f32 evaluation (erff, as PyTorch's f32 kernel): twice as fast as going through f64.
    fn gelu_and_grad(self) -> (Self, Self) {
        let cdf = 0.5 * (1.0 + libm::erff(self * std::f32::consts::FRAC_1_SQRT_2));
        let pdf = (-0.5 * self * self).exp() * (0.5 * std::f32::consts::FRAC_2_SQRT_PI * std::f32::consts::FRAC_1_SQRT_2);
        (self * cdf, cdf + self * pdf)
    }
}
impl SpinDtype for f64 {}
impl SpinDtype for half::f16 {}

/// A dfdx device with the ops spin needs: dfdx's own plus spin's convolution kernels
/// ([`crate::conv::Kernels`]): hand-written on the CPU, dfdx-op fallbacks elsewhere.
pub trait SpinDevice<E: SpinDtype>: Device<E> + crate::conv::Kernels<E> {}
impl<E: SpinDtype, D: Device<E> + crate::conv::Kernels<E>> SpinDevice<E> for D {}
