//! The global average pool over each image's tokens as an op, `(B·N, C)` → `(B, C)`: host loops
//! per image on the CPU ([`crate::kernels::pool`]), dfdx's `mean` over the token axis elsewhere.
use super::with_grad;
use crate::base::{Mat, SpinDtype};
use crate::kernels::pool;
use dfdx::prelude::*;
use dfdx::tensor::{Storage, Tape};

/// The token mean on a device.
pub trait PoolKernel<E: SpinDtype>: Storage<E> + Sized {
    /// The mean of each of `images` images' rows of `x` `(images·N, C)`; see
    /// [`crate::nn::functional::mean_tokens`].
    fn mean_tokens<T: Tape<E, Self>>(x: Tensor<Mat, E, Self, T>, images: usize) -> Tensor<Mat, E, Self, T>;
}

impl<E: SpinDtype> PoolKernel<E> for Cpu {
    fn mean_tokens<T: Tape<E, Self>>(x: Tensor<Mat, E, Self, T>, images: usize) -> Tensor<Mat, E, Self, T> {
        let (rows, c) = *x.shape();
        assert!(
            images > 0 && rows.is_multiple_of(images),
            "mean_tokens: {rows} rows are not {images} images' tokens"
        );
        let (x, mut tape) = x.contiguous().split_tape();
        let y = pool::mean_tokens(&super::values(&x), images, c);
        let y = x.device().tensor_from_vec(y, (images, c));
        if T::OWNS_TAPE {
            let y_keep = y.clone();
            tape.add_backward_op(move |grads| {
                with_grad(grads, &y_keep, "mean pool", |grads, gy| {
                    pool::mean_tokens_grad(grads.get_or_alloc_mut(&x)?, gy, c);
                    Ok(())
                })
            });
        }
        y.put_tape(tape)
    }
}

#[cfg(feature = "cuda")]
impl<E: SpinDtype> PoolKernel<E> for dfdx::tensor::Cuda
where
    dfdx::tensor::Cuda: Device<E>,
{
    fn mean_tokens<T: Tape<E, Self>>(x: Tensor<Mat, E, Self, T>, images: usize) -> Tensor<Mat, E, Self, T> {
        mean_tokens_fallback(x, images)
    }
}

/// The token mean from dfdx ops (the reference the CPU op is tested against).
pub fn mean_tokens_fallback<E: SpinDtype, D: Device<E>, T: Tape<E, D>>(
    x: Tensor<Mat, E, D, T>,
    images: usize,
) -> Tensor<Mat, E, D, T> {
    let (rows, c) = *x.shape();
    x.reshape_like(&(images, rows / images, c)).mean::<_, Axis<1>>()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values and the input gradient against dfdx's mean (f64, 1e-12): 3 images of 4 tokens, 5
    /// channels, and an input that is a transposed view (the op makes it contiguous first).
    #[test]
    fn mean_tokens_matches_dfdx_mean() {
        let dev = Cpu::seed_from_u64(5);
        let x: Tensor<Rank2<5, 12>, f64, _> = dev.sample_normal();
        let r: Tensor<Rank2<3, 5>, f64, _> = dev.sample_normal();
        let run = |ours: bool| {
            let xt = x.leaky_trace().permute::<Rank2<12, 5>, _>();
            let xt = xt.reshape_like(&(12usize, 5usize));
            let y = if ours {
                Cpu::mean_tokens(xt, 3)
            } else {
                mean_tokens_fallback(xt, 3)
            };
            let value = y.retaped::<NoneTape>().as_vec();
            let r = r.clone().reshape_like(&(3usize, 5usize));
            let g = (y * r).sum::<(), _>().backward();
            (value, g.get(&x).as_vec())
        };
        let (want, got) = (run(false), run(true));
        for (w, o) in [(&want.0, &got.0), (&want.1, &got.1)] {
            assert_eq!(w.len(), o.len());
            for (a, b) in w.iter().zip(o.iter()) {
                assert!((a - b).abs() < 1e-12, "{a} vs {b}");
            }
        }
    }
}
