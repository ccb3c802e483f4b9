//! The residual sum `y + skip` as an op: one vectorised pass forward, and backward the gradient
//! added into both inputs' buffers. dfdx's own add walks both operands by strided index, and its
//! backward copies a shared buffer first: about 7 % of a ConvMixer training step.
use super::{values, with_grad};
use crate::base::SpinDtype;
use crate::kernels::elementwise::{add_into, sum_into, zeros};
use dfdx::prelude::*;
use dfdx::tensor::{Storage, Tape};

/// The residual sum on a device.
pub trait ResidualKernel<E: SpinDtype>: Storage<E> + Sized {
    /// `y + skip`; see [`crate::nn::functional::residual`].
    fn residual<S: Shape, T: Tape<E, Self> + Merge<T>>(
        y: Tensor<S, E, Self, T>,
        skip: Tensor<S, E, Self, T>,
    ) -> Tensor<S, E, Self, T>;
}

impl<E: SpinDtype> ResidualKernel<E> for Cpu {
    fn residual<S: Shape, T: Tape<E, Self> + Merge<T>>(
        y: Tensor<S, E, Self, T>,
        skip: Tensor<S, E, Self, T>,
    ) -> Tensor<S, E, Self, T> {
        assert_eq!(
            y.shape().concrete(),
            skip.shape().concrete(),
            "residual: the two shapes differ"
        );
        let (y, ty) = y.contiguous().split_tape();
        let (skip, ts) = skip.contiguous().split_tape();
        let mut tape = ty.merge(ts);
        let (a, b) = (values(&y), values(&skip));
        let mut out = zeros(a.len());
        sum_into(&mut out, &a, &b);
        let out = y.device().tensor_from_vec(out, *y.shape());
        if T::OWNS_TAPE {
            let out_keep = out.clone();
            tape.add_backward_op(move |grads| {
                with_grad(grads, &out_keep, "residual", |grads, g| {
                    add_into(grads.get_or_alloc_mut(&y)?, g);
                    add_into(grads.get_or_alloc_mut(&skip)?, g);
                    Ok(())
                })
            });
        }
        out.put_tape(tape)
    }
}

#[cfg(feature = "cuda")]
impl<E: SpinDtype> ResidualKernel<E> for dfdx::tensor::Cuda
where
    dfdx::tensor::Cuda: Device<E>,
{
    fn residual<S: Shape, T: Tape<E, Self> + Merge<T>>(
        y: Tensor<S, E, Self, T>,
        skip: Tensor<S, E, Self, T>,
    ) -> Tensor<S, E, Self, T> {
        y + skip
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values and both gradients against dfdx's own add (the reference; f64, 1e-12), with the
    /// skip operand a broadcast tensor (its gradient summed over the broadcast rows) and, in a
    /// second case, the same tensor on both sides (against 2·y), whose gradient then arrives twice.
    #[test]
    fn residual_matches_dfdx_add() {
        let dev = Cpu::seed_from_u64(3);
        let y: Tensor<Rank2<4, 6>, f64, _> = dev.sample_normal();
        let row: Tensor<Rank1<6>, f64, _> = dev.sample_normal();
        let r: Tensor<Rank2<4, 6>, f64, _> = dev.sample_normal();
        let run = |ours: bool, same: bool| {
            let (yt, rt) = (y.leaky_trace(), row.leaky_trace());
            let skip = if same {
                yt.with_empty_tape()
            } else {
                rt.broadcast::<Rank2<4, 6>, _>()
            };
            // dfdx's add refuses one tensor on both sides; 2·y is the reference there.
            let sum = match (ours, same) {
                (true, _) => Cpu::residual(yt, skip),
                (false, false) => yt + skip,
                (false, true) => yt * 2.0,
            };
            let value = sum.retaped::<NoneTape>().as_vec();
            let g = (sum * r.clone()).sum::<(), _>().backward();
            let g_row = if same { Vec::new() } else { g.get(&row).as_vec() };
            (value, g.get(&y).as_vec(), g_row)
        };
        for same in [false, true] {
            let (want, got) = (run(false, same), run(true, same));
            for (w, o) in [(&want.0, &got.0), (&want.1, &got.1), (&want.2, &got.2)] {
                assert_eq!(w.len(), o.len());
                for (a, b) in w.iter().zip(o.iter()) {
                    assert!((a - b).abs() < 1e-12, "same={same}: {a} vs {b}");
                }
            }
        }
    }
}
