//! The element types spin's layers run in.
use dfdx::prelude::*;

/// A float dtype spin's layers run in: f32, f64, and f16 through `half`.
///
/// ```
/// use spin_core::SpinDtype;
/// let (y, dy) = 1.0f64.gelu_and_grad();
/// assert!((y - 0.841_344_746).abs() < 1e-9 && (dy - 1.083_315_47).abs() < 1e-8);
/// assert_eq!(f32::cast(0.5), 0.5);
/// ```
pub trait SpinDtype: Dtype + num_traits::Float + std::fmt::Debug + Send + Sync + 'static {
    /// The nearest value of this dtype (NaN where there is none).
    fn cast(v: f64) -> Self {
        <Self as num_traits::NumCast>::from(v).unwrap_or_else(Self::nan)
    }
    /// This value as an f64 (exact for every spin dtype).
    fn as_f64(self) -> f64 {
        num_traits::ToPrimitive::to_f64(&self).unwrap_or(f64::NAN)
    }
    /// Exact GELU x·Φ(x) and its derivative Φ(x) + x·φ(x), evaluated in f64.
    fn gelu_and_grad(self) -> (Self, Self) {
        let v = self.as_f64();
        let cdf = 0.5 * (1.0 + libm::erf(v * std::f64::consts::FRAC_1_SQRT_2));
        let pdf =
            (-0.5 * v * v).exp() * (0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2);
        (Self::cast(v * cdf), Self::cast(cdf + v * pdf))
    }
    /// `exp(self)` for `self ≤ 0` (softmax after subtracting the row maximum).
    fn exp_nonpos(self) -> Self {
        self.exp()
    }
}
impl SpinDtype for f32 {
    /// The vectorisable `fast_exp` (relative error ~1e-7) instead of libm's scalar expf.
    #[inline(always)]
    fn exp_nonpos(self) -> Self {
        fast_exp(self)
    }
    /// A branch-free f32 form the compiler vectorises: one exponential shared by Φ and φ,
    /// erf from Abramowitz & Stegun 7.1.26 (|error| ≤ 1.5e-7). Within 1e-6 of the f64 form for
    /// every input (tested), several times faster than libm's scalar erff and expf.
    #[inline(always)]
    fn gelu_and_grad(self) -> (Self, Self) {
        let x = self;
        let e = fast_exp(-0.5 * x * x); // exp(-(x/√2)²) = √(2π)·φ(x)
        let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
        let t = 1.0 / (1.0 + 0.327_591_1 * z);
        let poly =
            ((((1.061_405_4 * t - 1.453_152_1) * t + 1.421_413_8) * t - 0.284_496_72) * t + 0.254_829_6) * t;
        let erf_abs = 1.0 - poly * e;
        let cdf = 0.5 + 0.5 * erf_abs.copysign(x);
        let pdf = e * 0.398_942_3; // 1/√(2π)
        (x * cdf, cdf + x * pdf)
    }
}

/// exp for x ≤ 0 (as GELU needs), Cephes' polynomial after range reduction; relative error ~1e-7.
/// Branch- and conversion-free so that loops over it vectorise.
#[inline(always)]
fn fast_exp(x: f32) -> f32 {
    let x = x.max(-87.0);
    // Adding 1.5·2^23 + 127 rounds x·log2 e to an integer k (a plain add, unlike `round`) and
    // leaves k + 127, the biased exponent of 2^k, in the low mantissa bits: shifting them into the
    // exponent field builds 2^k without a float-to-int conversion. Exact for |k| < 2^22.
    const SHIFTER: f32 = 12_583_039.0; // 1.5·2^23 + 127
    let t = x * std::f32::consts::LOG2_E + SHIFTER;
    let k = t - SHIFTER;
    let r = x - k * 0.693_359_4 + k * 2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(t.to_bits() << 23)
}

impl SpinDtype for f64 {}
impl SpinDtype for half::f16 {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_gelu_matches_the_f64_definition() {
        let mut worst = (0.0f64, 0.0f64);
        for i in -20_000..=20_000 {
            let x = i as f32 * 5e-4;
            let (y, dy) = x.gelu_and_grad();
            let (ry, rdy) = (x as f64).gelu_and_grad();
            worst.0 = worst.0.max((y as f64 - ry).abs());
            worst.1 = worst.1.max((dy as f64 - rdy).abs());
        }
        assert!(worst.0 < 1e-6 && worst.1 < 1e-6, "max error {worst:?}");
        // Softmax's exponential on x ≤ 0: relative error against f64's exp.
        let mut worst_exp = 0.0f64;
        for i in 0..=80_000 {
            let x = -(i as f32) * 1e-3;
            let r = (x as f64).exp();
            worst_exp = worst_exp.max((x.exp_nonpos() as f64 - r).abs() / r);
        }
        assert!(worst_exp < 1e-6, "exp relative error {worst_exp:e}");
        assert!((-200.0f32).exp_nonpos() < 1e-30);
        for x in [-90.0f32, -30.0, 30.0] {
            let (y, dy) = x.gelu_and_grad();
            assert!(y.is_finite() && dy.is_finite());
        }
    }
}
