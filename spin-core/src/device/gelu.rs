//! Exact (erf) GELU as an op: vectorised host loops on the CPU, a value-and-slope formulation in
//! dfdx's ops elsewhere.
use super::{values, with_grad};
use crate::base::SpinDtype;
use crate::kernels::elementwise;
use dfdx::prelude::*;
use dfdx::tensor::{Storage, Tape};

/// GELU on a device.
pub trait GeluKernel<E: SpinDtype>: Storage<E> + Sized {
    /// Exact (erf) GELU; see [`crate::nn::functional::gelu`].
    fn gelu<S: Shape, T: Tape<E, Self>>(x: Tensor<S, E, Self, T>) -> Tensor<S, E, Self, T>;
}

impl<E: SpinDtype> GeluKernel<E> for Cpu {
    fn gelu<S: Shape, T: Tape<E, Self>>(x: Tensor<S, E, Self, T>) -> Tensor<S, E, Self, T> {
        let (x, mut tape) = x.contiguous().split_tape();
        let xs = values(&x);
        let mut y = elementwise::zeros(xs.len());
        elementwise::gelu(&mut y, &xs);
        let y = x.device().tensor_from_vec(y, *x.shape());
        if T::OWNS_TAPE {
            let y_keep = y.clone();
            tape.add_backward_op(move |grads| {
                with_grad(grads, &y_keep, "gelu", |grads, gy| {
                    elementwise::gelu_grad(grads.get_or_alloc_mut(&x)?, &xs, gy);
                    Ok(())
                })
            });
        }
        y.put_tape(tape)
    }
}

#[cfg(feature = "cuda")]
impl<E: SpinDtype> GeluKernel<E> for dfdx::tensor::Cuda
where
    dfdx::tensor::Cuda: Device<E>,
{
    fn gelu<S: Shape, T: Tape<E, Self>>(x: Tensor<S, E, Self, T>) -> Tensor<S, E, Self, T> {
        gelu_fallback(x)
    }
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
