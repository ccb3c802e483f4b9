//! The Linear op `x · Wᵀ + b`: on the CPU one op on dfdx's tape, in f32 through the packed
//! AVX-512 microkernel (forward and backward) and otherwise gemm's kernels; elsewhere, and as the
//! reference, dfdx's matmul.
use super::cache::KeptLinears;
use super::{host, transpose, values, with_grad};
use crate::base::{Mat, SpinDtype};
use crate::kernels::blocks::{linear_rows, HostLinear};
use crate::kernels::elementwise::{add_into, zeros};
use crate::kernels::gemm::{par_matmul, par_matmul_tn, MatRef};
use crate::kernels::norm::{add_row, col_sums};
use crate::kernels::{as_f32, as_f32_mut, f32_avx512, packed};
use dfdx::prelude::*;
use dfdx::tensor::{Storage, Tape};

/// `x · Wᵀ + b` with PyTorch's `(out, in)` weight.
pub trait LinearKernel<E: SpinDtype>: Storage<E> + Sized {
    /// `x · Wᵀ + b` with PyTorch's `(out, in)` weight `w`, `x` `(rows, in)`, for f32 and f64.
    fn linear<T: Tape<E, Self> + Merge<T>>(
        x: Tensor<(usize, usize), E, Self, T>,
        w: Tensor<(usize, usize), E, Self, T>,
        b: Tensor<(usize,), E, Self, T>,
    ) -> Tensor<(usize, usize), E, Self, T>;
}

/// The Linear layers run without a tape, kept packed between calls.
static KEPT: KeptLinears = KeptLinears::new();

impl<E: SpinDtype> LinearKernel<E> for Cpu {
    /// Through AVX-512 kernels (dfdx's matmul stops at AVX2), forward and backward: in f32 the
    /// packed microkernel with the weight (and, for dW, x) packed once per call, in f64 gemm's. Other
    /// dtypes than f32 and f64 would take gemm.rs's plain loop: [`crate::nn::functional::linear`] sends
    /// them to dfdx's matmul instead.
    fn linear<T: Tape<E, Self> + Merge<T>>(
        x: Tensor<(usize, usize), E, Self, T>,
        w: Tensor<(usize, usize), E, Self, T>,
        b: Tensor<(usize,), E, Self, T>,
    ) -> Tensor<(usize, usize), E, Self, T> {
        let (x, tx) = x.contiguous().split_tape();
        let (w, tw) = w.contiguous().split_tape();
        let (b, tb) = b.contiguous().split_tape();
        let mut tape = tx.merge(tw).merge(tb);
        let ((rows, inp), (out, w_in)) = (*x.shape(), *w.shape());
        assert_eq!(
            inp, w_in,
            "linear: input has {inp} features, the weight takes {w_in}"
        );
        assert_eq!(
            b.shape().0,
            out,
            "linear: bias size differs from the weight's outputs"
        );
        let make = |ws: &[E]| {
            let mut l = HostLinear {
                wt: transpose(ws, out, inp),
                b: host(&b),
                ..Default::default()
            };
            // Packed once here, the weight is read in place by every row task (gemm would pack it
            // again in each); a training step's for that one call.
            if T::OWNS_TAPE {
                l.pack_for_one_call();
            } else {
                l.pack();
            }
            l
        };
        // Without a tape the weights are not about to change: keep the layer for the next call.
        // With one, the backward needs W as it is: read in place (`values` holds its buffer,
        // which dfdx copies before any write while it is shared).
        let (l, ws) = if T::OWNS_TAPE {
            let ws = values(&w);
            (std::sync::Arc::new(make(&ws)), Some(ws))
        } else {
            (KEPT.get(&w, &b, || make(&values(&w))), None)
        };
        let mut y = zeros(rows * out);
        linear_rows(&values(&x), &l, &mut y);
        let y = x.device().tensor_from_vec(y, (rows, out));
        if T::OWNS_TAPE {
            let y_keep = y.clone();
            tape.add_backward_op(move |grads| {
                with_grad(grads, &y_keep, "linear", |grads, gy| {
                    let gb = col_sums(rows, out, |r, acc| add_row(acc, &gy[r * out..][..out]));
                    let gb: Vec<E> = gb.into_iter().map(E::cast).collect();
                    add_into(grads.get_or_alloc_mut(&b)?, &gb);
                    if f32_avx512::<E>() {
                        // Both products accumulate straight into dfdx's gradient buffers.
                        let (gy, dims) = (as_f32(gy), (out, inp));
                        let gx = as_f32_mut(grads.get_or_alloc_mut(&x)?);
                        let ws = ws.as_deref().unwrap_or_default();
                        packed::linear_grad_input(gy, as_f32(ws), dims, gx);
                        let gw = as_f32_mut(grads.get_or_alloc_mut(&w)?);
                        packed::linear_grad_weight(gy, as_f32(&values(&x)), dims, gw);
                        return Ok(());
                    }
                    // dx = dy · W, dW = dyᵀ · x, db = Σ_rows dy.
                    let mut gx = zeros(rows * inp);
                    let ws = ws.as_deref().unwrap_or_default();
                    par_matmul(gy, MatRef::row_major(ws, out, inp), &mut gx);
                    let gw = par_matmul_tn(gy, out, &values(&x), inp);
                    add_into(grads.get_or_alloc_mut(&x)?, &gx);
                    add_into(grads.get_or_alloc_mut(&w)?, &gw);
                    Ok(())
                })
            });
        }
        y.put_tape(tape)
    }
}

#[cfg(feature = "cuda")]
impl<E: SpinDtype> LinearKernel<E> for dfdx::tensor::Cuda
where
    dfdx::tensor::Cuda: Device<E>,
{
    fn linear<T: Tape<E, Self> + Merge<T>>(
        x: Tensor<(usize, usize), E, Self, T>,
        w: Tensor<(usize, usize), E, Self, T>,
        b: Tensor<(usize,), E, Self, T>,
    ) -> Tensor<(usize, usize), E, Self, T> {
        linear_composed(x, w, b)
    }
}

/// [`crate::nn::functional::linear`] from dfdx ops (fallback and reference).
pub fn linear_composed<E: SpinDtype, D: Device<E>, T: Tape<E, D> + Merge<T>>(
    x: Tensor<Mat, E, D, T>,
    w: Tensor<Mat, E, D, T>,
    b: Tensor<(usize,), E, D, T>,
) -> Tensor<Mat, E, D, T> {
    let rows = x.shape().0;
    let out = w.shape().0;
    x.matmul(w.permute()) + b.broadcast_like::<_, Axis<0>>(&(rows, out))
}

#[cfg(test)]
mod tests {
    use super::*;
    type T = OwnedTape<f64, Cpu>;

    /// The gemm-backed linear op against dfdx's matmul: outputs and the gradients of x, W and b
    /// (f64, 1e-12), with enough rows for several row tasks and an odd output count.
    #[test]
    fn linear_matches_dfdx_matmul_forward_and_backward() {
        let dev = Cpu::seed_from_u64(7);
        let x: Tensor<Mat, f64, Cpu> = dev.sample_normal_like(&(300, 24));
        let w: Tensor<Mat, f64, Cpu> = dev.sample_normal_like(&(37, 24));
        let b: Tensor<(usize,), f64, Cpu> = dev.sample_normal_like(&(37,));
        let r: Tensor<Mat, f64, Cpu> = dev.sample_normal_like(&(300, 37));
        let run = |f: &dyn Fn(
            Tensor<Mat, f64, Cpu, T>,
            Tensor<Mat, f64, Cpu, T>,
            Tensor<(usize,), f64, Cpu, T>,
        ) -> Tensor<Mat, f64, Cpu, T>| {
            let grads = Gradients::leaky();
            let y = f(
                x.clone().traced(grads),
                w.clone().put_tape(OwnedTape::default()),
                b.clone().put_tape(OwnedTape::default()),
            );
            let out = y.retaped::<NoneTape>().as_vec();
            let g = (y * r.clone()).sum::<(), _>().backward();
            (out, g.get(&x).as_vec(), g.get(&w).as_vec(), g.get(&b).as_vec())
        };
        let got = run(&|x, w, b| Cpu::linear(x, w, b));
        let want = run(&|x, w, b| linear_composed(x, w, b));
        let close = |a: &[f64], b: &[f64]| {
            a.iter()
                .zip(b)
                .all(|(a, b)| (a - b).abs() < 1e-12 * (1.0 + b.abs()))
        };
        assert!(close(&got.0, &want.0), "outputs differ");
        assert!(close(&got.1, &want.1), "dL/dx differs");
        assert!(close(&got.2, &want.2), "dL/dW differs");
        assert!(close(&got.3, &want.3), "dL/db differs");
    }

    /// A layer run without a tape is kept, and an in-place write to its weight is seen: the
    /// next call matches dfdx's matmul on the new values (f32, 1e-5), not the kept layer.
    #[test]
    fn kept_layer_follows_weight_writes() {
        let dev = Cpu::seed_from_u64(11);
        let x: Tensor<Mat, f32, Cpu> = dev.sample_normal_like(&(5, 40));
        let mut w: Tensor<Mat, f32, Cpu> = dev.sample_normal_like(&(37, 40));
        let b: Tensor<(usize,), f32, Cpu> = dev.sample_normal_like(&(37,));
        let close = |a: Vec<f32>, b: Vec<f32>| a.iter().zip(&b).all(|(a, b)| (a - b).abs() < 1e-5);
        let first = Cpu::linear(x.clone(), w.clone(), b.clone()).as_vec();
        assert!(close(
            first.clone(),
            linear_composed(x.clone(), w.clone(), b.clone()).as_vec()
        ));
        assert_eq!(Cpu::linear(x.clone(), w.clone(), b.clone()).as_vec(), first);
        let doubled: Vec<f32> = w.as_vec().iter().map(|v| 2.0 * v).collect();
        w.copy_from(&doubled);
        let updated = Cpu::linear(x.clone(), w.clone(), b.clone()).as_vec();
        assert!(close(updated.clone(), linear_composed(x, w, b).as_vec()));
        assert!(!close(updated, first), "the write changed nothing");
    }
}
