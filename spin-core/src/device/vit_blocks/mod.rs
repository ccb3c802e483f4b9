//! A ViT's pre-norm blocks, each `x1 = x + proj(attn(LN1(x)))`, `y = x1 + fc2(GELU(fc1(LN2(x1))))`,
//! as one training op: on the CPU in f32 with AVX-512, one op on dfdx's tape for the whole trunk,
//! whose intermediates (each block's norms, qkv, attention output, hidden layer, output, and
//! their gradients) live in its own buffers ([`pass`]). As seven ops a block, dfdx zero-filled
//! each intermediate's gradient on one thread before the op behind it added into it (13 MB per
//! DeiT-Tiny batch-8 block, with the second core idle), and each block's output gradient was
//! zero-filled and added into once more. Elsewhere (other dtypes and devices, no tape), and as the
//! reference, the seven ops a block.
mod pass;
#[cfg(test)]
mod tests;

use super::attention::AttentionKernel;
use super::linear::{LinearKernel, Then};
use super::norm::NormKernels;
use super::values;
use crate::base::{Mat, SpinDtype};
use crate::kernels::elementwise::{add_into, copied};
use crate::kernels::f32_avx512;
use dfdx::prelude::*;
use dfdx::tensor::{Storage, Tape};
use pass::{Block, Weights};

/// A vector parameter on tape `T`.
type Vector<E, D, T> = Tensor<(usize,), E, D, T>;

/// One block's parameters on the caller's tape: each norm's (scale, shift) and each Linear's
/// (weight `(out, in)`, bias), as timm names them.
pub struct VitBlockParams<E: Dtype, D: Storage<E>, T> {
    /// `norm1`.
    pub norm1: (Vector<E, D, T>, Vector<E, D, T>),
    /// `attn.qkv`, outputs laid out (3, heads, head_dim).
    pub qkv: (Tensor<Mat, E, D, T>, Vector<E, D, T>),
    /// `attn.proj`.
    pub proj: (Tensor<Mat, E, D, T>, Vector<E, D, T>),
    /// `norm2`.
    pub norm2: (Vector<E, D, T>, Vector<E, D, T>),
    /// `mlp.fc1`.
    pub fc1: (Tensor<Mat, E, D, T>, Vector<E, D, T>),
    /// `mlp.fc2`.
    pub fc2: (Tensor<Mat, E, D, T>, Vector<E, D, T>),
}

/// The blocks op on a device.
pub trait VitBlocksKernel<E: SpinDtype>: Storage<E> + Sized {
    /// `blocks` in order on `x` `(batch·N, D)`, with `heads` attention heads (a shared block's
    /// tensors appear once per use).
    fn vit_blocks<T: Tape<E, Self> + Merge<T>>(
        x: Tensor<Mat, E, Self, T>,
        blocks: Vec<VitBlockParams<E, Self, T>>,
        batch: usize,
        heads: usize,
    ) -> Tensor<Mat, E, Self, T>;
}

impl<E: SpinDtype> VitBlocksKernel<E> for Cpu {
    /// With a tape in f32 on AVX-512, the host kernels of every block's seven ops in one op (each
    /// part's time under its op's name in [`super::profile`]); otherwise [`vit_blocks_composed`].
    fn vit_blocks<T: Tape<E, Self> + Merge<T>>(
        x: Tensor<Mat, E, Self, T>,
        blocks: Vec<VitBlockParams<E, Self, T>>,
        batch: usize,
        heads: usize,
    ) -> Tensor<Mat, E, Self, T> {
        if !T::OWNS_TAPE || !f32_avx512::<E>() || blocks.is_empty() {
            return vit_blocks_composed(x, blocks, batch, heads);
        }
        let (x, mut tape) = x.contiguous().split_tape();
        let (rows, d) = *x.shape();
        assert!(
            batch > 0 && rows % batch == 0 && heads > 0 && d % heads == 0,
            "vit blocks: {rows} × {d} tokens do not split into {batch} images and {heads} heads"
        );
        let mut params = Vec::with_capacity(blocks.len());
        for p in blocks {
            let (p, t) = p.untaped(tape);
            params.push(p);
            tape = t;
        }
        let xs = values(&x);
        // Block i's input is block i − 1's output (x for the first); each block's pass keeps
        // what its backward reads.
        let mut passes: Vec<Block<E>> = Vec::with_capacity(params.len());
        for p in &params {
            let w = Weights::of(p, d);
            let input = passes.last().map_or(&xs[..], |b| &b.y);
            let pass = Block::forward(input, w, batch, heads);
            passes.push(pass);
        }
        // The last output is read by no block's backward.
        let y = passes
            .last_mut()
            .map(|b| std::mem::take(&mut b.y))
            .unwrap_or_default();
        let y = x.device().tensor_from_vec(y, (rows, d));
        let y_keep = y.clone();
        tape.add_backward_op(move |grads| {
            let mut g = copied(grads.get_or_alloc_mut(&y_keep)?);
            // Back through the blocks: each turns its output's gradient into its input's.
            while let Some(pass) = passes.pop() {
                let p = params.pop().expect("a pass per block");
                let input = passes.last().map_or(&xs[..], |b| &b.y);
                g = pass.backward(grads, &p, input, g)?;
            }
            add_into(grads.get_or_alloc_mut(&x)?, &g);
            Ok(())
        });
        y.put_tape(tape)
    }
}

#[cfg(feature = "cuda")]
impl<E: SpinDtype> VitBlocksKernel<E> for dfdx::tensor::Cuda
where
    dfdx::tensor::Cuda: Device<E>,
{
    fn vit_blocks<T: Tape<E, Self> + Merge<T>>(
        x: Tensor<Mat, E, Self, T>,
        blocks: Vec<VitBlockParams<E, Self, T>>,
        batch: usize,
        heads: usize,
    ) -> Tensor<Mat, E, Self, T> {
        vit_blocks_composed(x, blocks, batch, heads)
    }
}

/// The blocks from the device's seven ops each (fallback and reference).
pub fn vit_blocks_composed<E, D, T>(
    x: Tensor<Mat, E, D, T>,
    blocks: Vec<VitBlockParams<E, D, T>>,
    batch: usize,
    heads: usize,
) -> Tensor<Mat, E, D, T>
where
    E: SpinDtype,
    D: Storage<E> + LinearKernel<E> + NormKernels<E> + AttentionKernel<E>,
    T: Tape<E, D> + Merge<T>,
{
    blocks.into_iter().fold(x, |x, p| {
        let skip = x.with_empty_tape();
        let qkv = D::linear(
            D::layer_norm(x, p.norm1.0, p.norm1.1),
            p.qkv.0,
            p.qkv.1,
            Then::Nothing,
        );
        let attn = D::attention_core(qkv, batch, heads);
        let x1 = D::linear(attn, p.proj.0, p.proj.1, Then::Add(skip));
        let skip = x1.with_empty_tape();
        let h = D::linear(
            D::layer_norm(x1, p.norm2.0, p.norm2.1),
            p.fc1.0,
            p.fc1.1,
            Then::Gelu,
        );
        D::linear(h, p.fc2.0, p.fc2.1, Then::Add(skip))
    })
}

/// `t` made contiguous without its tape, and `tape` with `t`'s merged in.
fn untape<S: Shape, E: SpinDtype, T: Tape<E, Cpu> + Merge<T>>(
    t: Tensor<S, E, Cpu, T>,
    tape: T,
) -> (Tensor<S, E, Cpu>, T) {
    let (t, own) = t.contiguous().split_tape();
    (t, tape.merge(own))
}

impl<E: SpinDtype, T: Tape<E, Cpu> + Merge<T>> VitBlockParams<E, Cpu, T> {
    /// The parameters without their tapes, and `tape` with all of theirs merged in.
    fn untaped(self, tape: T) -> (VitBlockParams<E, Cpu, NoneTape>, T) {
        let (g1, tape) = untape(self.norm1.0, tape);
        let (b1, tape) = untape(self.norm1.1, tape);
        let (qkv_w, tape) = untape(self.qkv.0, tape);
        let (qkv_b, tape) = untape(self.qkv.1, tape);
        let (proj_w, tape) = untape(self.proj.0, tape);
        let (proj_b, tape) = untape(self.proj.1, tape);
        let (g2, tape) = untape(self.norm2.0, tape);
        let (b2, tape) = untape(self.norm2.1, tape);
        let (fc1_w, tape) = untape(self.fc1.0, tape);
        let (fc1_b, tape) = untape(self.fc1.1, tape);
        let (fc2_w, tape) = untape(self.fc2.0, tape);
        let (fc2_b, tape) = untape(self.fc2.1, tape);
        let p = VitBlockParams {
            norm1: (g1, b1),
            qkv: (qkv_w, qkv_b),
            proj: (proj_w, proj_b),
            norm2: (g2, b2),
            fc1: (fc1_w, fc1_b),
            fc2: (fc2_w, fc2_b),
        };
        (p, tape)
    }
}
