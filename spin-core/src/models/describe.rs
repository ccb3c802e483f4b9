//! What a model is, for tables, the registry and the command line.
use super::plan::{Arch, EvalOverride, FipsPlanInfo};

/// The two isotropic families spin knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    /// ConvMixer (Trockman & Kolter), as timm's `convmixer`.
    ConvMixer,
    /// ViT/DeiT, as timm's `VisionTransformer`.
    Vit,
}

impl Family {
    /// The family's name in tables and plans.
    pub fn name(self) -> &'static str {
        match self {
            Family::ConvMixer => "convmixer",
            Family::Vit => "vit",
        }
    }
}

/// A model's description: everything `spin zoo` prints about it.
///
/// ```
/// use spin_core::prelude::*;
///
/// #[convmixer(dim = 64, kernel = 3, patch = 1, image = 8, classes = 10)]
/// #[shared_blocks(depth = 8, groups = 2, pattern = strided)]
/// struct Shared;
///
/// let info = Shared::info();
/// assert!(info.compression() > 2.0); // eight pointwise convs stored as two
/// assert_eq!(info.size_bytes(4), 4 * (info.params + info.buffers));
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct ModelInfo {
    /// The member's name (`convmixer_768_32_ws2_sequential`).
    pub name: &'static str,
    /// Its family.
    pub family: Family,
    /// Unique trainable parameters (each shared tensor once; BN running statistics excluded).
    pub params: usize,
    /// Multiply-accumulates per image at the declared size (torch.utils.flop_counter's FLOPs / 2).
    pub macs: u64,
    /// Layers.
    pub depth: usize,
    /// Parameter groups the layers use.
    pub groups: usize,
    /// The sharing pattern's name.
    pub pattern: String,
    /// What is shared (`pointwise`, `attn_mlp`, `fips`, …; `none` when nothing is).
    pub share: &'static str,
    /// The group of every layer.
    pub schedule: Vec<usize>,
    /// Channels (ConvMixer) or embedding width (ViT).
    pub dim: usize,
    /// Input image side.
    pub image: usize,
    /// Patch size (ConvMixer's stem, ViT's patch embedding).
    pub patch: usize,
    /// The family's own arguments.
    pub arch: Arch,
    /// The FiPS compression of the MLPs, if any.
    pub fips: Option<FipsPlanInfo>,
    /// Output classes.
    pub classes: usize,
    /// Parameters of the same model with nothing shared.
    pub unshared_params: usize,
    /// Values stored but not trained: BatchNorm running statistics (each stored copy once).
    pub buffers: usize,
    /// Bytes of the bit masks stored beside pruned tensors (FiPS's factors).
    pub mask_bytes: usize,
    /// The declaration's overrides of timm's eval transform (see [`super::DataConfig::for_model`]).
    pub eval: EvalOverride,
}

impl ModelInfo {
    /// Unshared parameters over shared parameters (1.0 when nothing is shared).
    pub fn compression(&self) -> f64 {
        self.unshared_params as f64 / self.params as f64
    }
    /// Bytes of the unique tensors (parameters, BN running statistics, masks) at
    /// `bytes_per_value` each: the size of the model on disk with every shared tensor stored once
    /// and pruned tensors as their kept values and bit masks.
    pub fn size_bytes(&self, bytes_per_value: usize) -> usize {
        (self.params + self.buffers) * bytes_per_value + self.mask_bytes
    }
}

/// Implemented by every declared model type: its description, without building it.
///
/// ```
/// use spin_core::prelude::*;
///
/// #[vit(dim = 64, heads = 4, patch = 2, image = 8, classes = 10)]
/// #[shared_blocks(depth = 6, groups = 3, pattern = strided)]
/// struct SmallVit;
///
/// let info = SmallVit::info();
/// assert_eq!((info.depth, info.groups, info.share), (6, 3, "attn_mlp"));
/// assert_eq!(info.schedule, [0, 1, 2, 0, 1, 2]);
/// assert_eq!(info.params, SmallVit::PARAMS);
/// ```
pub trait Describe {
    /// The model's description.
    fn info() -> ModelInfo;
}

impl ModelInfo {
    /// The fields every family fills alike from its config; counts are zero for the family to
    /// set. `share` is the granularity's name, reported as `none` when every layer has its own
    /// parameters.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn declared(
        name: &'static str,
        family: Family,
        (dim, image, classes, patch): (usize, usize, usize, usize),
        arch: Arch,
        depth: usize,
        groups: usize,
        pattern: &str,
        schedule: &[usize],
        share: &'static str,
    ) -> Self {
        Self {
            name,
            family,
            params: 0,
            macs: 0,
            depth,
            groups,
            pattern: pattern.into(),
            share: if groups == depth { "none" } else { share },
            schedule: schedule.to_vec(),
            dim,
            image,
            classes,
            patch,
            arch,
            fips: None,
            unshared_params: 0,
            buffers: 0,
            mask_bytes: 0,
            eval: EvalOverride::NONE,
        }
    }
}
