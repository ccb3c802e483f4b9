//! Parameter initialisation: distributions that sample in f64 and convert, so they work for every
//! dtype.
use crate::base::SpinDtype;
use dfdx::prelude::*;
use rand::Rng;

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

/// All zeros.
pub fn reset_zeros<S: Shape, E: SpinDtype, D: Device<E>>(t: &mut Tensor<S, E, D>) -> Result<(), D::Err> {
    t.try_fill_with_zeros()
}

/// All ones.
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
