//! spin-core: the pieces behind spin's statically typed, weight-shared isotropic networks.
//!
//! - [`conv`]: the convolutions dfdx 0.13 lacks on stable (depthwise K×K, patch embedding), written
//!   on dfdx's public autograd API with multi-threaded CPU kernels and a dfdx-ops fallback.
//! - [`layers`]: timm-exact building blocks (Linear, BatchNorm, LayerNorm, attention, MLP).
//! - [`schedule`] and [`sharing`]: which parameter group each layer uses, and storage that keeps
//!   each shared tensor once.
//! - [`convmixer`] and [`vit`]: the two isotropic families, typed by a config the macros generate.
//! - [`checkpoint`]: timm-named safetensors in and out.
#![allow(clippy::type_complexity)]
extern crate self as spin_core;

pub mod checkpoint;
pub mod conv;
pub mod convmixer;
pub mod data;
pub mod describe;
pub mod dtype;
pub mod error;
pub mod fusion;
pub mod layers;
pub mod norm;
pub mod schedule;
pub mod sharing;
pub mod train;
pub mod vit;

pub use checkpoint::TimmCheckpoint;
pub use describe::{Describe, Family, ModelInfo};
pub use dtype::{SpinDevice, SpinDtype};
pub use error::Error;
pub use schedule::{Pattern, Schedule};

/// Re-exported so generated code and users need only spin-core.
pub use dfdx;

/// Everything a model declaration needs: dfdx's prelude, spin's traits and the macros.
pub mod prelude {
    pub use crate::checkpoint::TimmCheckpoint;
    pub use crate::describe::{Describe, Family, ModelInfo};
    pub use crate::dtype::{SpinDevice, SpinDtype};
    pub use crate::schedule::{Pattern, Schedule};
    pub use crate::sharing::{ConvMixerShare, VitShare};
    pub use dfdx::prelude::*;
    pub use spin_macros::*;
}

// The CUDA device gets spin's kernels through the dfdx-op fallbacks (type-checked in CI with
// `--features cuda,dfdx/ci-check`).
#[cfg(feature = "cuda")]
const _: fn() = || {
    fn is_spin_device<D: SpinDevice<f32>>() {}
    is_spin_device::<dfdx::tensor::Cuda>();
};
