//! How a ViT stores its blocks' MLPs ([`VitMlps`]): timm's dense MLPs ([`DenseMlps`]) or FiPS
//! factors ([`super::fips_mlps`]).
use super::vit_config::VitConfig;
use super::ModelInfo;
use crate::base::{Mat, SpinDtype};
use crate::device::{fill_linear, SpinDevice};
use crate::kernels::blocks::HostLinear;
use crate::nn::functional::residual;
use crate::nn::layers::Mlp;
use crate::nn::param::{push_slots, PackedSlot, Slot};
use crate::nn::storage::vec_fields;
use dfdx::prelude::*;
use dfdx::tensor::Tape;
use spin_rules::{count, slot, users};
use std::ops::{Deref, DerefMut};

/// How a ViT stores its blocks' MLPs: timm's dense MLPs under SPIN's schedule ([`DenseMlps`]) or
/// FiPS factors (`FipsMlps` (`models::fips_mlps`)).
pub trait VitMlps<C: VitConfig, E: SpinDtype, D: SpinDevice<E>>:
    TensorCollection<E, D> + Clone + std::fmt::Debug
{
    /// Block `layer`'s MLP on its normalised tokens `(rows, Dim)`.
    fn forward<T: Tape<E, D> + Merge<T>>(
        &self,
        layer: usize,
        x: Tensor<Mat, E, D, T>,
    ) -> Tensor<Mat, E, D, T>;
    /// `skip + self.forward(layer, x)`: the block's residual sum, which a storage may take into
    /// its last op.
    fn forward_residual<T: Tape<E, D> + Merge<T>>(
        &self,
        layer: usize,
        x: Tensor<Mat, E, D, T>,
        skip: Tensor<Mat, E, D, T>,
    ) -> Tensor<Mat, E, D, T> {
        residual(self.forward(layer, x), skip)
    }
    /// Block `layer`'s MLP as timm's dense one, where this storage holds it so: training then
    /// runs the blocks as one op ([`crate::device::VitBlocksKernel`]).
    fn dense(&self, _layer: usize) -> Option<&Mlp<C::Dim, C::Hidden, E, D>> {
        None
    }
    /// Block `layer`'s fc1 and fc2 as dense weights on the host, for the fused inference path.
    fn host_weights(&self, layer: usize, fc1: &mut HostLinear<E>, fc2: &mut HostLinear<E>);
    /// The MLP tensors under their checkpoint keys.
    fn slots(&mut self) -> Vec<Slot<'_, E>>;
    /// Pruned MLP tensors, stored as values and bit masks.
    fn packed_slots(&mut self) -> Vec<PackedSlot<'_, E>> {
        Vec::new()
    }
    /// Corrects a dense ViT's description for this storage (parameter count, sharing).
    fn describe(&self, _info: &mut ModelInfo) {}
    /// Checks a loaded checkpoint beyond keys and shapes.
    fn check(&self) -> Result<(), crate::error::Error> {
        Ok(())
    }
}

/// timm's MLPs, one per group of SPIN's schedule (or per layer when unshared).
#[derive(Debug)]
pub struct DenseMlps<C: VitConfig, E: Dtype, D: Storage<E>>(pub Vec<Mlp<C::Dim, C::Hidden, E, D>>);

impl<C: VitConfig, E: Dtype, D: Storage<E>> Clone for DenseMlps<C, E, D> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<C: VitConfig, E: Dtype, D: Storage<E>> Deref for DenseMlps<C, E, D> {
    type Target = Vec<Mlp<C::Dim, C::Hidden, E, D>>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl<C: VitConfig, E: Dtype, D: Storage<E>> DerefMut for DenseMlps<C, E, D> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl<C: VitConfig, E: SpinDtype, D: SpinDevice<E>> TensorCollection<E, D> for DenseMlps<C, E, D> {
    type To<E2: Dtype, D2: Device<E2>> = DenseMlps<C, E2, D2>;
    fn iter_tensors<V: ModuleVisitor<Self, E, D>>(
        visitor: &mut V,
    ) -> Result<Option<Self::To<V::E2, V::D2>>, V::Err> {
        let n: Vec<String> = (0..count(C::SHARE.mlp(), C::DEPTH, C::GROUPS))
            .map(|j| j.to_string())
            .collect();
        visitor.visit_fields(vec_fields::<Self, _, E, D>(&n, |s| &s.0, |s| &mut s.0), DenseMlps)
    }
}

impl<C: VitConfig, E: SpinDtype, D: SpinDevice<E>> VitMlps<C, E, D> for DenseMlps<C, E, D> {
    fn forward<T: Tape<E, D> + Merge<T>>(
        &self,
        layer: usize,
        x: Tensor<Mat, E, D, T>,
    ) -> Tensor<Mat, E, D, T> {
        self.0[slot(C::SHARE.mlp(), C::SCHEDULE, layer)].forward(x)
    }
    fn forward_residual<T: Tape<E, D> + Merge<T>>(
        &self,
        layer: usize,
        x: Tensor<Mat, E, D, T>,
        skip: Tensor<Mat, E, D, T>,
    ) -> Tensor<Mat, E, D, T> {
        self.0[slot(C::SHARE.mlp(), C::SCHEDULE, layer)].forward_residual(x, skip)
    }
    fn dense(&self, layer: usize) -> Option<&Mlp<C::Dim, C::Hidden, E, D>> {
        Some(&self.0[slot(C::SHARE.mlp(), C::SCHEDULE, layer)])
    }
    fn host_weights(&self, layer: usize, fc1: &mut HostLinear<E>, fc2: &mut HostLinear<E>) {
        let m = &self.0[slot(C::SHARE.mlp(), C::SCHEDULE, layer)];
        fill_linear(fc1, &m.fc1.weight, &m.fc1.bias, false);
        fill_linear(fc2, &m.fc2.weight, &m.fc2.bias, false);
    }
    fn slots(&mut self) -> Vec<Slot<'_, E>> {
        let mut out = Vec::new();
        for (j, m) in self.0.iter_mut().enumerate() {
            let prefixes: Vec<String> = users(C::SHARE.mlp(), C::SCHEDULE, j)
                .into_iter()
                .map(|i| format!("blocks.{i}.mlp"))
                .collect();
            push_slots(&mut out, &prefixes, m.slots());
        }
        out
    }
}
