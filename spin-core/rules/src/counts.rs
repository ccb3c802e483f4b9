//! Unique trainable parameters and multiply-accumulates of the two families, as `const fn`s: a
//! declared model's `PARAMS` and `MACS` are evaluated by these at compile time, and the run-time
//! description uses the same functions. MACs follow `torch.utils.flop_counter` (FLOPs / 2,
//! biases not counted).
use crate::share::{count, ConvMixerShare, VitShare};

/// Unique trainable parameters of a ConvMixer (BatchNorm running statistics excluded).
///
/// ```
/// use spin_rules::{counts, ConvMixerShare};
/// // timm's convmixer_768_32, and SPIN's pointwise sharing at rate 2.
/// assert_eq!(counts::convmixer_params(768, 7, 7, 1000, 32, 32, ConvMixerShare::Pointwise), 21_110_248);
/// assert_eq!(counts::convmixer_params(768, 7, 7, 1000, 32, 16, ConvMixerShare::Pointwise), 11_660_776);
/// ```
#[allow(clippy::too_many_arguments)]
pub const fn convmixer_params(
    dim: usize,
    kernel: usize,
    patch: usize,
    classes: usize,
    depth: usize,
    groups: usize,
    share: ConvMixerShare,
) -> usize {
    let stem = dim * 3 * patch * patch + dim + 2 * dim;
    let dw = dim * kernel * kernel + dim;
    let pw = dim * dim + dim;
    let bns = 4 * dim;
    let head = dim * classes + classes;
    stem + count(share.depthwise(), depth, groups) * dw
        + count(share.pointwise(), depth, groups) * pw
        + count(share.norms(), depth, groups) * bns
        + head
}

/// Values a ConvMixer stores but does not train: its BatchNorms' running statistics.
pub const fn convmixer_buffers(dim: usize, depth: usize, groups: usize, share: ConvMixerShare) -> usize {
    2 * dim + 4 * dim * count(share.norms(), depth, groups)
}

/// Multiply-accumulates per image of a ConvMixer.
pub const fn convmixer_macs(
    dim: usize,
    kernel: usize,
    patch: usize,
    image: usize,
    classes: usize,
    depth: usize,
) -> u64 {
    let g = (image / patch) as u64;
    let (c, k, p) = (dim as u64, kernel as u64, patch as u64);
    let stem = c * 3 * p * p * g * g;
    let block = c * k * k * g * g + c * c * g * g;
    stem + depth as u64 * block + c * classes as u64
}

/// Unique trainable parameters of a ViT.
///
/// ```
/// use spin_rules::{counts, VitShare};
/// // timm's deit_small_patch16_224, and SPIN's DeiT-S at share rate 2.
/// assert_eq!(counts::vit_params(384, 16, 224, 1536, 1000, 12, 12, VitShare::AttnMlp), 22_050_664);
/// assert_eq!(counts::vit_params(384, 16, 224, 1536, 1000, 12, 6, VitShare::AttnMlp), 11_413_096);
/// ```
#[allow(clippy::too_many_arguments)]
pub const fn vit_params(
    dim: usize,
    patch: usize,
    image: usize,
    hidden: usize,
    classes: usize,
    depth: usize,
    groups: usize,
    share: VitShare,
) -> usize {
    let tokens = (image / patch) * (image / patch) + 1;
    let embed = dim * 3 * patch * patch + dim + dim + tokens * dim;
    let attn = 3 * dim * dim + 3 * dim + dim * dim + dim;
    let mlp = mlp_params(dim, hidden);
    let norms = 4 * dim;
    let head = 2 * dim + dim * classes + classes;
    embed
        + count(share.attn(), depth, groups) * attn
        + count(share.mlp(), depth, groups) * mlp
        + count(share.norms(), depth, groups) * norms
        + head
}

/// Weights and biases of one timm MLP block.
pub const fn mlp_params(dim: usize, hidden: usize) -> usize {
    hidden * dim + hidden + dim * hidden + dim
}

/// Multiply-accumulates per image of a ViT: patch embedding, qkv, q·kᵀ, attn·v, proj, fc1, fc2,
/// head.
pub const fn vit_macs(
    dim: usize,
    patch: usize,
    image: usize,
    hidden: usize,
    classes: usize,
    depth: usize,
) -> u64 {
    let np = ((image / patch) * (image / patch)) as u64;
    let n = np + 1;
    let (d, h, p) = (dim as u64, hidden as u64, patch as u64);
    let embed = d * 3 * p * p * np;
    let block = n * d * 3 * d + 2 * n * n * d + n * d * d + 2 * n * d * h;
    embed + depth as u64 * block + d * classes as u64
}
