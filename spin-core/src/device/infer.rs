//! Inference-only kernels a device may have: whole ViT encoder blocks and a
//! whole ConvMixer trunk on host buffers ([`crate::kernels::blocks`]), and buffer identities for
//! the cache of a ViT's host weights. Every method defaults to `None` ("not on this device"), so
//! the models fall back to the composed ops.
use super::host;
use crate::base::SpinDtype;
use crate::kernels::blocks::{mixer_trunk, vit_blocks, MixerTrunkHost, VitBlockHost};
use crate::kernels::gemm::has_kernels;
use dfdx::prelude::*;
use dfdx::tensor::Storage;
use std::sync::Arc;

/// The fused inference kernels of a device.
pub trait InferKernels<E: SpinDtype>: Storage<E> + Sized {
    /// Inference only: timm encoder blocks on tokens `x` `(B·N, D)`, one per entry of what
    /// `blocks()` returns ([`vit_blocks`](crate::kernels::blocks::vit_blocks)); `blocks` is only called when the device
    /// and dtype have the kernel. `None` where they do not.
    fn vit_blocks_infer(
        _x: &Tensor<(usize, usize), E, Self>,
        _batch: usize,
        _heads: usize,
        _blocks: &dyn Fn() -> Arc<Vec<VitBlockHost<E>>>,
    ) -> Option<Tensor<(usize, usize), E, Self>> {
        None
    }

    /// Inference only: a ConvMixer trunk on `x` `(B·G·G, C)`, its weights from `trunk()` (only
    /// called when the device and dtype have the kernels): each block as two fused passes
    /// (depthwise + bias + act + folded BN + residual, then
    /// [`crate::kernels::blocks::pointwise_into`]), on host buffers from the first block to the
    /// last. `None` where the device or dtype has no such kernels.
    fn mixer_blocks_infer(
        _x: &Tensor<(usize, usize), E, Self>,
        _geometry: (usize, usize, usize),
        _pw_residual: bool,
        _trunk: &dyn Fn() -> Arc<MixerTrunkHost<E>>,
    ) -> Option<Tensor<(usize, usize), E, Self>> {
        None
    }

    /// Identifies a tensor's buffer and layout (the addresses of its first element and of the
    /// next one along its last non-unit axis), for [`super::BlockCache`]; `None` where the
    /// device's buffers are not host memory.
    fn buffer_key<S: Shape>(_t: &Tensor<S, E, Self>) -> Option<[usize; 2]> {
        None
    }
}

impl<E: SpinDtype> InferKernels<E> for Cpu {
    fn vit_blocks_infer(
        x: &Tensor<(usize, usize), E, Self>,
        batch: usize,
        heads: usize,
        blocks: &dyn Fn() -> Arc<Vec<VitBlockHost<E>>>,
    ) -> Option<Tensor<(usize, usize), E, Self>> {
        if !has_kernels::<E>() {
            return None;
        }
        let mut xs = host(x);
        vit_blocks(&mut xs, &blocks(), batch, heads);
        Some(x.device().tensor_from_vec(xs, *x.shape()))
    }

    fn mixer_blocks_infer(
        x: &Tensor<(usize, usize), E, Self>,
        geometry: (usize, usize, usize),
        pw_residual: bool,
        trunk: &dyn Fn() -> Arc<MixerTrunkHost<E>>,
    ) -> Option<Tensor<(usize, usize), E, Self>> {
        if !has_kernels::<E>() {
            return None;
        }
        let mut xs = host(x);
        mixer_trunk(&mut xs, geometry, &trunk(), pw_residual);
        Some(x.device().tensor_from_vec(xs, *x.shape()))
    }

    fn buffer_key<S: Shape>(t: &Tensor<S, E, Self>) -> Option<[usize; 2]> {
        let shape = *t.shape();
        if shape.num_elements() == 0 {
            return Some([0, 0]);
        }
        let dims = shape.concrete();
        let first = S::Concrete::default();
        let a = &t[first] as *const E as usize;
        let b = match (0..S::NUM_DIMS).rev().find(|&i| dims[i] > 1) {
            Some(axis) => {
                let mut next = first;
                next[axis] = 1;
                &t[next] as *const E as usize
            }
            None => a,
        };
        Some([a, b])
    }
}

#[cfg(feature = "cuda")]
impl<E: SpinDtype> InferKernels<E> for dfdx::tensor::Cuda where dfdx::tensor::Cuda: Device<E> {}
