//! What a ViT declaration fixes: the config trait `#[vit(...)]` implements, the FiPS plan a
//! `#[fips(...)]` adds, and the description both give.
use super::{Arch, EvalOverride, Family, ModelInfo};
use dfdx::prelude::*;
use spin_rules::counts::{vit_macs, vit_params};
use spin_rules::VitShare;

/// What a `#[fips(groups = [...], budget = p, sparsity = s)]` declaration fixes; the macro
/// computes the rank.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FipsDecl {
    /// The blocks that share each basis.
    pub groups: &'static [&'static [usize]],
    /// The fraction of the MLP weights kept.
    pub budget: f64,
    /// The fraction of the factors' entries pruned.
    pub sparsity: f64,
    /// The rank the budget allows (spin-rules' `fips::rank`).
    pub rank: usize,
}

/// A ViT declaration, as `#[vit(...)]` generates it. `Grid` is `Image / Patch`, `Tokens` is
/// `Grid² + 1`, `Qkv` is `3·Dim`, `Hidden` is `mlp_ratio·Dim`.
///
/// ```
/// use spin_core::prelude::*;
/// use spin_core::models::vit::VitConfig;
///
/// #[vit(dim = 32, heads = 2, patch = 4, image = 16, classes = 10, depth = 2)]
/// struct Decl;
///
/// assert_eq!(<Decl as VitConfig>::Tokens::SIZE, 17);
/// assert_eq!(<Decl as VitConfig>::Hidden::SIZE, 128);
/// assert!(<Decl as VitConfig>::FIPS.is_none());
/// ```
pub trait VitConfig: 'static + Clone + Copy + std::fmt::Debug + Default + Send + Sync {
    /// Embedding width.
    type Dim: ConstDim;
    /// Patch size.
    type Patch: ConstDim;
    /// Input image side.
    type Image: ConstDim;
    /// Patches per side, `Image / Patch`.
    type Grid: ConstDim;
    /// Tokens, `Grid² + 1` (the cls token).
    type Tokens: ConstDim;
    /// qkv's outputs, `3·Dim`.
    type Qkv: ConstDim;
    /// MLP hidden width, `mlp_ratio·Dim`.
    type Hidden: ConstDim;
    /// Output classes.
    type Classes: ConstDim;
    /// The member's name.
    const NAME: &'static str;
    /// Attention heads.
    const HEADS: usize;
    /// Blocks.
    const DEPTH: usize;
    /// Parameter groups the blocks use.
    const GROUPS: usize;
    /// The sharing pattern's name.
    const PATTERN: &'static str;
    /// The group of every block.
    const SCHEDULE: &'static [usize];
    /// What the blocks of a group share.
    const SHARE: VitShare;
    /// The FiPS compression a `#[fips(...)]` declaration asks for (`None` for a dense ViT).
    const FIPS: Option<FipsDecl> = None;
    /// The declaration's overrides of timm's eval transform for the family.
    const EVAL: EvalOverride = EvalOverride::NONE;
}

/// The description of a declared ViT.
pub fn info<C: VitConfig>() -> ModelInfo {
    let (d, p, img, h, cls) = (
        C::Dim::SIZE,
        C::Patch::SIZE,
        C::Image::SIZE,
        C::Hidden::SIZE,
        C::Classes::SIZE,
    );
    let (depth, groups) = (C::DEPTH, C::GROUPS);
    ModelInfo {
        params: vit_params(d, p, img, h, cls, depth, groups, C::SHARE),
        macs: vit_macs(d, p, img, h, cls, depth),
        unshared_params: vit_params(d, p, img, h, cls, depth, depth, C::SHARE),
        eval: C::EVAL,
        ..ModelInfo::declared(
            C::NAME,
            Family::Vit,
            (d, img, cls, p),
            Arch::Vit {
                heads: C::HEADS,
                mlp_ratio: h as f64 / d as f64,
            },
            depth,
            groups,
            C::PATTERN,
            C::SCHEDULE,
            C::SHARE.name(),
        )
    }
}
