//! The patchify op (a P×P stride-P convolution's input as a matrix): run copies on the CPU, dfdx's
//! reshape and permute elsewhere and as the reference.
use super::{values, with_grad};
use crate::base::{Nchw, SpinDtype};
use crate::kernels::elementwise::zeros;
use crate::kernels::patchify::{patchify_into, unpatchify_add, PatchGeometry};
use dfdx::prelude::*;
use dfdx::tensor::{Storage, Tape};

/// Patch extraction on a device.
pub trait PatchifyKernel<E: SpinDtype>: Storage<E> + Sized {
    /// Cuts an NCHW image batch `(B, Cin, H, W)` into non-overlapping P×P patches, one row per patch
    /// in (b, row, col) order, laid out `(cin, py, px)` like a PyTorch conv weight `(O, Cin, P, P)`:
    /// the result is `(B·(H/P)·(W/P), Cin·P·P)`, so the patch embedding is a single matmul.
    fn patchify<T: Tape<E, Self>>(
        x: Tensor<Nchw, E, Self, T>,
        p: usize,
    ) -> Result<Tensor<(usize, usize), E, Self, T>, Self::Err>;
}

impl<E: SpinDtype> PatchifyKernel<E> for Cpu {
    fn patchify<T: Tape<E, Self>>(
        x: Tensor<Nchw, E, Self, T>,
        p: usize,
    ) -> Result<Tensor<(usize, usize), E, Self, T>, Self::Err> {
        let (x, mut tape) = x.contiguous().split_tape();
        let (bn, cin, h, w) = *x.shape();
        assert!(
            h % p == 0 && w % p == 0,
            "patchify: {h}×{w} is not divisible by {p}"
        );
        let g = PatchGeometry { b: bn, cin, h, w, p };
        let mut out = zeros(x.shape().num_elements());
        patchify_into(&g, &values(&x), &mut out);
        let y = x
            .device()
            .tensor_from_vec(out, (bn * (h / p) * (w / p), g.patch_len()));
        if T::OWNS_TAPE {
            let y_keep = y.clone();
            tape.add_backward_op(move |grads| {
                with_grad(grads, &y_keep, "patchify", |grads, gy| {
                    unpatchify_add(&g, gy, grads.get_or_alloc_mut(&x)?);
                    Ok(())
                })
            });
        }
        Ok(y.put_tape(tape))
    }
}

#[cfg(feature = "cuda")]
impl<E: SpinDtype> PatchifyKernel<E> for dfdx::tensor::Cuda
where
    dfdx::tensor::Cuda: Device<E>,
{
    fn patchify<T: Tape<E, Self>>(
        x: Tensor<Nchw, E, Self, T>,
        p: usize,
    ) -> Result<Tensor<(usize, usize), E, Self, T>, Self::Err> {
        patchify_fallback(x, p)
    }
}

/// Patchify from dfdx's reshape and permute (see [`PatchifyKernel::patchify`]).
pub fn patchify_fallback<E: SpinDtype, D: Device<E>, T: Tape<E, D>>(
    x: Tensor<Nchw, E, D, T>,
    p: usize,
) -> Result<Tensor<(usize, usize), E, D, T>, D::Err> {
    let (bn, cin, h, w) = *x.shape();
    let (hp, wp) = (h / p, w / p);
    x.try_reshape_like(&(bn, cin, hp, p, wp, p))?
        .try_permute::<_, Axes6<0, 2, 4, 1, 3, 5>>()?
        .try_reshape_like(&(bn * hp * wp, cin * p * p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patchify_matches_fallback_in_value_and_gradient() {
        let dev = Cpu::seed_from_u64(2);
        let shape = (2, 3, 8, 4);
        let x: Tensor<Nchw, f64, _> = dev.sample_normal_like(&shape);
        let r: Tensor<(usize, usize), f64, _> = dev.sample_normal_like(&(2 * 4 * 2, 3 * 4));
        let a = Cpu::patchify(x.leaky_trace(), 2).unwrap();
        let b = patchify_fallback(x.leaky_trace(), 2).unwrap();
        assert_eq!(a.as_vec(), b.as_vec());
        let ga = (a * r.clone()).sum::<(), _>().backward();
        let gb = (b * r).sum::<(), _>().backward();
        assert_eq!(ga.get(&x).as_vec(), gb.get(&x).as_vec());
    }
}
