//! The device layer: spin's ops on dfdx devices, one trait per op in dfdx's style. Each op file
//! holds the trait, the CPU impl (a host kernel from [`crate::kernels`] registered on dfdx's tape
//! with `Tape::add_backward_op`), the fallback for other devices (built from dfdx's own ops, and
//! the reference the tests check the CPU kernel against), and its tests. A CPU op first makes
//! its taped inputs contiguous: free for dense ones, and for a broadcast or permuted one dfdx
//! records the copy, so the op's gradient (in logical order) reaches it in its own layout.
//!
//! [`SpinDevice`] is every op together: the bound every model is generic over.
mod attention;
mod cache;
mod depthwise;
mod gelu;
mod infer;
mod linear;
mod norm;
mod patchify;
mod pool;
pub mod profile;
mod residual;
mod vit_blocks;

pub use attention::{attention_core_composed, AttentionKernel};
pub use cache::{buffer_keys, BlockCache};
pub use depthwise::{dwconv_fallback, DepthwiseKernel};
pub use gelu::{gelu_fallback, GeluKernel};
pub use infer::InferKernels;
pub use linear::{linear_composed, then_composed, LinearKernel, Then};
pub use norm::{affine_composed, batch_norm_train_composed, layer_norm_composed, NormKernels};
pub use patchify::{patchify_fallback, PatchifyKernel};
pub use pool::{mean_tokens_fallback, PoolKernel};
pub use residual::ResidualKernel;
pub use vit_blocks::{vit_blocks_composed, VitBlockParams, VitBlocksKernel};

use crate::base::SpinDtype;
use crate::kernels::blocks::HostLinear;
use crate::kernels::gemm::transpose_into;
use dfdx::prelude::*;
use dfdx::tensor::CpuError;

/// A dfdx device with the ops spin needs: dfdx's own plus spin's, hand-written on the CPU and
/// dfdx-op fallbacks elsewhere.
///
/// ```
/// use spin_core::prelude::*;
/// fn takes_any_spin_device<D: SpinDevice<f32>>(_dev: &D) {}
/// takes_any_spin_device(&Cpu::default());
/// ```
pub trait SpinDevice<E: SpinDtype>:
    Device<E>
    + AttentionKernel<E>
    + LinearKernel<E>
    + DepthwiseKernel<E>
    + PatchifyKernel<E>
    + GeluKernel<E>
    + NormKernels<E>
    + InferKernels<E>
    + ResidualKernel<E>
    + PoolKernel<E>
    + VitBlocksKernel<E>
{
}

impl<E: SpinDtype, D> SpinDevice<E> for D where
    D: Device<E>
        + AttentionKernel<E>
        + LinearKernel<E>
        + DepthwiseKernel<E>
        + PatchifyKernel<E>
        + GeluKernel<E>
        + NormKernels<E>
        + InferKernels<E>
        + ResidualKernel<E>
        + PoolKernel<E>
        + VitBlocksKernel<E>
{
}

/// A CPU tensor's values, read in place: holds the tensor (a clone sharing its buffer, or a
/// contiguous copy when its layout is strided or broadcast) and derefs to its values in logical
/// order. Ops read their inputs through this instead of copying them: those copies were ~7 % of a
/// ConvMixer training step.
pub struct Values<S: Shape, E: SpinDtype> {
    tensor: Tensor<S, E, Cpu>,
}

impl<S: Shape, E: SpinDtype> std::ops::Deref for Values<S, E> {
    type Target = [E];
    fn deref(&self) -> &[E] {
        let n = self.tensor.shape().num_elements();
        if n == 0 {
            return &[];
        }
        let first: *const E = &self.tensor[S::Concrete::default()];
        // SAFETY: dfdx 0.13 tensors have no offset into their buffer, so element 0 of a
        // contiguous tensor is its buffer's first value, and that buffer holds exactly its n
        // values (dfdx's own `copy_into` is a `copy_from_slice` of the whole buffer into n
        // values). The slice borrows `self`, which holds the buffer's `Arc`; dfdx writes to a
        // buffer only through `Arc::make_mut`, which copies a shared one, so no write reaches
        // these values while the slice lives.
        unsafe { std::slice::from_raw_parts(first, n) }
    }
}

/// `t`'s values in logical order, without a copy when `t` is contiguous (see [`Values`]).
pub fn values<S: Shape, E: SpinDtype>(t: &Tensor<S, E, Cpu>) -> Values<S, E> {
    Values {
        tensor: t.clone().contiguous(),
    }
}

/// A dense CPU tensor's buffer as mutable values, written in place (an optimiser's update): dfdx's
/// own writes (`copy_from`) take a whole new slice, which cost a serial copy of every parameter in
/// every step. A buffer shared with a clone is copied first, as any dfdx write does. Panics for a
/// strided or broadcast tensor.
pub fn values_mut<S: Shape, E: SpinDtype>(t: &mut Tensor<S, E, Cpu>) -> &mut [E] {
    let n = t.shape().num_elements();
    if n == 0 {
        return &mut [];
    }
    let zero = S::Concrete::default();
    // `contiguous` keeps the buffer of a tensor whose strides are its shape's and copies any
    // other into a new one: the same first value means the same, dense buffer.
    let dense = std::ptr::eq(&t.clone().contiguous()[zero], &t[zero]);
    assert!(dense, "values_mut: a strided or broadcast tensor");
    let first: *mut E = &mut t[zero];
    // SAFETY: the tensor is dense (checked above; the clone is gone), so its buffer holds exactly
    // its n values (see `Values`) and element 0 is the buffer's first. `IndexMut` went through
    // `Arc::make_mut`, so the buffer is this tensor's alone, and the slice borrows `t` mutably:
    // nothing else reads or writes it while the slice lives.
    unsafe { std::slice::from_raw_parts_mut(first, n) }
}

/// A CPU tensor's values as a new vector, copied across threads (dfdx's `as_vec` walks strided
/// indices one by one, and `copy_into` needs a destination filled first).
pub fn host<S: Shape, E: SpinDtype>(t: &Tensor<S, E, Cpu>) -> Vec<E> {
    crate::kernels::elementwise::copied(&values(t))
}

/// Runs `f` on the gradient reaching `y` (a CPU op's output) without copying it: the buffer is
/// moved out of `grads` for the call and put back after it, so `grads` ends as it was. dfdx's
/// `Gradients::get` would clone it, and [`host`] copy it again. `f`'s time counts as op `op`'s
/// backward in [`profile`].
pub fn with_grad<S: Shape, E: SpinDtype, R>(
    grads: &mut Gradients<E, Cpu>,
    y: &Tensor<S, E, Cpu>,
    op: &'static str,
    f: impl FnOnce(&mut Gradients<E, Cpu>, &[E]) -> Result<R, CpuError>,
) -> Result<R, CpuError> {
    let gy = std::mem::take(&mut **grads.get_or_alloc_mut(y)?);
    let out = profile::timed(op, profile::Pass::Backward, || f(grads, &gy));
    **grads.get_or_alloc_mut(y)? = gy;
    out
}

/// A tensor's values into `buf` (resized; no allocation once it has the size).
pub fn to_host<S: Shape, E: SpinDtype, D: Device<E>>(t: &Tensor<S, E, D>, buf: &mut Vec<E>) {
    let t = t.clone().contiguous();
    buf.resize(t.shape().num_elements(), E::zero());
    t.copy_into(buf);
}

/// Copies a dfdx weight and bias into host buffers, reusing them. The weight is `(out, in)` as
/// PyTorch's, or already `(in, out)` when `in_major`.
pub fn fill_linear<S: Shape, B: Shape, E: SpinDtype, D: Device<E>>(
    l: &mut HostLinear<E>,
    w: &Tensor<S, E, D>,
    b: &Tensor<B, E, D>,
    in_major: bool,
) {
    to_host(b, &mut l.b);
    if in_major {
        to_host(w, &mut l.wt);
    } else {
        let mut raw = Vec::new();
        to_host(w, &mut raw);
        let out = l.b.len();
        transpose_into(&mut l.wt, &raw, out, raw.len() / out.max(1));
    }
}

/// `m` `(rows, cols)` transposed into a new buffer.
fn transpose<E: Copy + Send + Sync + 'static>(m: &[E], rows: usize, cols: usize) -> Vec<E> {
    let mut t = Vec::new();
    transpose_into(&mut t, m, rows, cols);
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`host`] reads the values in their logical order, whatever the layout: a plain tensor, a
    /// permuted one (made contiguous first), a broadcast one, an empty one and a scalar.
    #[test]
    fn host_copies_values_in_order() {
        let dev = Cpu::seed_from_u64(0);
        let t: Tensor<Rank2<3, 5>, f32, _> = dev.sample_normal();
        assert_eq!(host(&t), t.as_vec());
        let p = t.clone().permute::<_, Axes2<1, 0>>();
        assert_eq!(host(&p), p.as_vec());
        let row: Tensor<Rank1<5>, f32, _> = dev.sample_normal();
        let b = row.broadcast::<Rank2<4, 5>, _>();
        assert_eq!(host(&b), b.as_vec());
        let empty: Tensor<(usize, usize), f32, _> = dev.zeros_like(&(0, 4));
        assert!(host(&empty).is_empty());
        assert_eq!(host(&dev.tensor(2.5f64)), vec![2.5]);
    }

    /// Writes through `values_mut` reach the tensor, and not a clone that shared its buffer
    /// before; a permuted view is refused.
    #[test]
    fn values_mut_writes_the_tensor_alone() {
        let dev = Cpu::seed_from_u64(2);
        let mut t: Tensor<Rank2<3, 5>, f32, _> = dev.sample_normal();
        let before = t.as_vec();
        let clone = t.clone();
        values_mut(&mut t).iter_mut().for_each(|v| *v += 1.0);
        let after: Vec<f32> = before.iter().map(|v| v + 1.0).collect();
        assert_eq!(t.as_vec(), after);
        assert_eq!(clone.as_vec(), before);
        let mut p = t.permute::<Rank2<5, 3>, Axes2<1, 0>>();
        let refused = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| values_mut(&mut p).len()));
        assert!(refused.is_err());
    }

    /// [`values`] reads in place: a write to the original tensor after the read (through dfdx's
    /// copy-on-write) leaves the values read unchanged, and a permuted tensor reads in its
    /// logical order.
    #[test]
    fn values_stay_as_read() {
        let dev = Cpu::seed_from_u64(1);
        let mut t: Tensor<Rank2<3, 5>, f32, _> = dev.sample_normal();
        let before = t.as_vec();
        let read = values(&t);
        t.copy_from(&[7.0; 15]);
        assert_eq!(&*read, before.as_slice());
        assert_eq!(t.as_vec(), vec![7.0; 15]);
        let u: Tensor<Rank2<3, 5>, f32, _> = dev.sample_normal();
        let p = u.permute::<_, Axes2<1, 0>>();
        assert_eq!(&*values(&p), p.as_vec().as_slice());
    }
}
