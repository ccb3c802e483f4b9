//! The Linear op `x · Wᵀ + b`: on the CPU one op on dfdx's tape, in f32 through the packed
//! AVX-512 microkernel (forward and backward) and otherwise gemm's kernels; elsewhere, and as the
//! reference, dfdx's matmul.
use super::cache::KeptLinears;
use super::{host, transpose, values, with_grad};
use crate::base::{Mat, SpinDtype};
use crate::kernels::blocks::{linear_rows, HostLinear};
use crate::kernels::elementwise::{self, add_into, zeros};
use crate::kernels::gemm::{par_matmul, par_matmul_tn, MatRef};
use crate::kernels::norm::{add_row, col_sums};
use crate::kernels::{as_f32, as_f32_mut, f32_avx512, packed};
use dfdx::prelude::*;
use dfdx::tensor::{Storage, Tape};

/// What a Linear's output gets inside the same op, so that dfdx holds one tensor (and one
/// gradient buffer, which it zero-fills on one thread) where it would hold two.
pub enum Then<S> {
    /// Nothing: `x · Wᵀ + b`.
    Nothing,
    /// Exact GELU, `GELU(x · Wᵀ + b)`: an MLP's first layer.
    Gelu,
    /// The residual sum, `skip + x · Wᵀ + b`: a block's last layer.
    Add(S),
}

impl<S> Then<S> {
    /// The op's name in [`super::profile`], forward and backward.
    pub fn op_name(&self) -> &'static str {
        match self {
            Then::Nothing => "linear",
            Then::Gelu => "linear+gelu",
            Then::Add(_) => "linear+residual",
        }
    }
}

/// `x · Wᵀ + b` with PyTorch's `(out, in)` weight, and what follows it.
pub trait LinearKernel<E: SpinDtype>: Storage<E> + Sized {
    /// `then` applied to `x · Wᵀ + b`, with PyTorch's `(out, in)` weight `w`, `x` `(rows, in)`,
    /// for f32 and f64.
    fn linear<T: Tape<E, Self> + Merge<T>>(
        x: Tensor<(usize, usize), E, Self, T>,
        w: Tensor<(usize, usize), E, Self, T>,
        b: Tensor<(usize,), E, Self, T>,
        then: Then<Tensor<(usize, usize), E, Self, T>>,
    ) -> Tensor<(usize, usize), E, Self, T>;
}

/// The Linear layers run without a tape, kept packed between calls.
static KEPT: KeptLinears = KeptLinears::new();

impl<E: SpinDtype> LinearKernel<E> for Cpu {
    /// Through AVX-512 kernels (dfdx's matmul stops at AVX2), forward and backward: in f32 the
    /// packed microkernel with the weight (and, for dW, x) packed once per call, in f64 gemm's. Other
    /// dtypes than f32 and f64 would take gemm.rs's plain loop: [`crate::nn::functional::linear`] sends
    /// them to dfdx's matmul instead. A residual's sum starts from a copy of `skip` that the
    /// product adds onto; GELU keeps its input, which the backward turns into its gradient in
    /// place.
    fn linear<T: Tape<E, Self> + Merge<T>>(
        x: Tensor<(usize, usize), E, Self, T>,
        w: Tensor<(usize, usize), E, Self, T>,
        b: Tensor<(usize,), E, Self, T>,
        then: Then<Tensor<(usize, usize), E, Self, T>>,
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
        let op = then.op_name();
        let (skip, gelu) = match then {
            Then::Nothing => (None, false),
            Then::Gelu => (None, true),
            Then::Add(s) => {
                assert_eq!(
                    *s.shape(),
                    (rows, out),
                    "linear: skip shape differs from the output"
                );
                let (s, ts) = s.contiguous().split_tape();
                tape = tape.merge(ts);
                (Some(s), false)
            }
        };
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
        let mut h = match &skip {
            Some(s) => host(s),
            None => zeros(rows * out),
        };
        linear_rows(&values(&x), &l, &mut h, skip.is_some());
        let y = if gelu {
            let mut a = zeros(rows * out);
            elementwise::gelu(&mut a, &h);
            a
        } else {
            std::mem::take(&mut h)
        };
        let y = x.device().tensor_from_vec(y, (rows, out));
        if T::OWNS_TAPE {
            let y_keep = y.clone();
            tape.add_backward_op(move |grads| {
                with_grad(grads, &y_keep, op, |grads, g_out| {
                    if let Some(s) = &skip {
                        add_into(grads.get_or_alloc_mut(s)?, g_out);
                    }
                    // The product's gradient: GELU's input buffer, no longer needed as such.
                    let gy = if gelu {
                        elementwise::gelu_grad_in_place(&mut h, g_out);
                        &h[..]
                    } else {
                        g_out
                    };
                    if f32_avx512::<E>() {
                        // Both products, and the bias's sums inside the weight's, accumulate
                        // straight into dfdx's gradient buffers (b's moved out meanwhile).
                        let gx = as_f32_mut(grads.get_or_alloc_mut(&x)?);
                        let ws = ws.as_deref().unwrap_or_default();
                        packed::linear_grad_input(as_f32(gy), as_f32(ws), (out, inp), gx, true);
                        return add_weight_grads(grads, (&w, &b), &values(&x), gy);
                    }
                    let gb = col_sums(rows, out, |r, acc| add_row(acc, &gy[r * out..][..out]));
                    let gb: Vec<E> = gb.into_iter().map(E::cast).collect();
                    add_into(grads.get_or_alloc_mut(&b)?, &gb);
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

/// dW += dyᵀ · x and db += Σ_rows dy of a Linear with `(out, in)` weight `w`, input `x` and
/// output gradient `gy`, onto their buffers in `grads`, on the packed AVX-512 kernel (f32; the
/// bias's sums taken while dyᵀ is packed, b's buffer moved out meanwhile).
pub(super) fn add_weight_grads<E: SpinDtype>(
    grads: &mut Gradients<E, Cpu>,
    (w, b): (&Tensor<(usize, usize), E, Cpu>, &Tensor<(usize,), E, Cpu>),
    x: &[E],
    gy: &[E],
) -> Result<(), dfdx::tensor::CpuError> {
    let mut gb = std::mem::take(&mut **grads.get_or_alloc_mut(b)?);
    let gw = as_f32_mut(grads.get_or_alloc_mut(w)?);
    packed::linear_grad_weight(as_f32(gy), as_f32(x), *w.shape(), gw, Some(as_f32_mut(&mut gb)));
    **grads.get_or_alloc_mut(b)? = gb;
    Ok(())
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
        then: Then<Tensor<(usize, usize), E, Self, T>>,
    ) -> Tensor<(usize, usize), E, Self, T> {
        then_composed(linear_composed(x, w, b), then)
    }
}

/// `then` on a Linear's output `y` from dfdx ops (fallback and reference).
pub fn then_composed<E: SpinDtype, D: Device<E>, T: Tape<E, D> + Merge<T>>(
    y: Tensor<Mat, E, D, T>,
    then: Then<Tensor<Mat, E, D, T>>,
) -> Tensor<Mat, E, D, T> {
    match then {
        Then::Nothing => y,
        Then::Gelu => super::gelu::gelu_fallback(y),
        Then::Add(skip) => y + skip,
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
    use crate::device::SpinDevice;

    /// Which [`Then`] a test case takes.
    #[derive(Clone, Copy, Debug)]
    enum Case {
        Nothing,
        Gelu,
        Residual,
    }

    /// The output and the gradients of x, W and b of `Σ r ⊙ then(x·Wᵀ + b)` in dtype `E`, as
    /// f64, by spin's op (`ours`) or dfdx's composed ops; the skip is `x·U + S`, so that x's
    /// gradient also arrives through it.
    fn run<E: SpinDtype>(ours: bool, case: Case) -> [Vec<f64>; 4]
    where
        Cpu: SpinDevice<E>,
    {
        let dev = Cpu::default();
        let sample = |shape: Mat, seed: usize| -> Tensor<Mat, E, Cpu> {
            let v = crate::kernels::test_values(shape.0 * shape.1, seed);
            dev.tensor_from_vec(
                v.into_iter().map(|v: f32| E::cast(4.0 * v as f64)).collect(),
                shape,
            )
        };
        let (x, w, s, u, r) = (
            sample((300, 24), 1),
            sample((37, 24), 2),
            sample((300, 37), 3),
            sample((24, 37), 4),
            sample((300, 37), 5),
        );
        let b = sample((1, 37), 6).reshape_like(&(37,));
        let xt = x.clone().traced(Gradients::leaky());
        let skip = xt.with_empty_tape().matmul(u) + s;
        let (wt, bt) = (
            w.clone().put_tape(OwnedTape::default()),
            b.clone().put_tape(OwnedTape::default()),
        );
        let then = match case {
            Case::Nothing => Then::Nothing,
            Case::Gelu => Then::Gelu,
            Case::Residual => Then::Add(skip),
        };
        let y = if ours {
            Cpu::linear(xt, wt, bt, then)
        } else {
            then_composed(linear_composed(xt, wt, bt), then)
        };
        let f64s = |v: Vec<E>| v.into_iter().map(|v| v.to_f64().unwrap()).collect();
        let out = f64s(y.retaped::<NoneTape>().as_vec());
        let g = (y * r).sum::<(), _>().backward();
        [
            out,
            f64s(g.get(&x).as_vec()),
            f64s(g.get(&w).as_vec()),
            f64s(g.get(&b).as_vec()),
        ]
    }

    /// The linear op alone, with GELU and with a residual sum, against dfdx's composed ops in
    /// f64: outputs and the gradients of x, W and b, within 1e-12 of the magnitude in f64 and 1e-4
    /// in f32 (the packed AVX-512 kernels where the CPU has them), with enough rows for several
    /// row tasks and an odd output count. x also feeds the skip, so an op that overwrote x's
    /// gradient instead of adding to it, or dropped the skip's, would fail.
    #[test]
    fn linear_matches_dfdx_matmul_forward_and_backward() {
        let names = ["output", "dL/dx", "dL/dW", "dL/db"];
        for case in [Case::Nothing, Case::Gelu, Case::Residual] {
            let want = run::<f64>(false, case);
            for (tol, got) in [(1e-12, run::<f64>(true, case)), (1e-4, run::<f32>(true, case))] {
                for ((got, want), name) in got.iter().zip(&want).zip(names) {
                    assert!(
                        got.iter()
                            .zip(want)
                            .all(|(a, b)| (a - b).abs() < tol * (1.0 + b.abs())),
                        "{case:?}: {name} differs (tolerance {tol:e})"
                    );
                }
            }
        }
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
        let first = Cpu::linear(x.clone(), w.clone(), b.clone(), Then::Nothing).as_vec();
        assert!(close(
            first.clone(),
            linear_composed(x.clone(), w.clone(), b.clone()).as_vec()
        ));
        assert_eq!(
            Cpu::linear(x.clone(), w.clone(), b.clone(), Then::Nothing).as_vec(),
            first
        );
        let doubled: Vec<f32> = w.as_vec().iter().map(|v| 2.0 * v).collect();
        w.copy_from(&doubled);
        let updated = Cpu::linear(x.clone(), w.clone(), b.clone(), Then::Nothing).as_vec();
        assert!(close(updated.clone(), linear_composed(x, w, b).as_vec()));
        assert!(!close(updated, first), "the write changed nothing");
    }
}
