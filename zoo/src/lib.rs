//! spin's zoo: SPIN's ConvMixer and DeiT families, their weight-shared members, and small members
//! for the built-in digits data. Every member is a fixed-shape type declared with spin's macros;
//! [`MEMBERS`] is generated from the same declarations, so it lists every one of them and can
//! build any of them by name at run time.
//!
//! Shared members are named `<base>_ws<r>_<pattern>`: r = depth / groups layers per shared tensor.
//! ConvMixers share their pointwise conv (SPIN's choice); DeiTs share attention and MLP with
//! LayerNorms per layer, and `_ws12_all` shares everything (ALBERT).
use spin_core::data::DataConfig;
use spin_core::dfdx::prelude::*;
use spin_core::fips::{FipsCompress, FipsLoader, FipsRunner};
use spin_core::fusion::{Fusion, FusionVitOf, Reduction};
use spin_core::models::convmixer::ConvMixerConfig;
use spin_core::models::vit::VitConfig;
use spin_core::models::SpinModel;
use spin_core::train::{Classifier, Runner};
use spin_core::{Describe, Error, ModelInfo};

pub use spin_core::prelude::{convmixer, fips, shared_blocks, vit};

pub mod analyze_cmd;
pub mod args;
pub mod bench;
pub mod cli;
pub mod fips_cmd;
pub mod infer_cmd;
mod parsers;
pub mod plot;
pub mod report;
pub mod ui;

/// Builds a fusion-aware trainer with a reduction.
pub type FusionBuilder = fn(u64, Reduction) -> Box<dyn Classifier>;

/// A zoo member: its description and how to build it.
pub struct Member {
    pub info: fn() -> ModelInfo,
    pub build: fn(u64) -> Box<dyn Classifier>,
    /// For a shared member declared `shared <- base` (`shared <- base vit` for a ViT): its
    /// fusion-aware trainer, which keeps the base model's D tensors and fuses them every forward
    /// pass (SPIN's WFWS).
    pub fusion: Option<FusionBuilder>,
    /// For a dense ViT: its FiPS compression pipeline (`spin fips`).
    pub fips: Option<FipsRunner>,
    /// For a ViT: loads a FiPS checkpoint of it at the file's rank and groups.
    pub load_fips: Option<FipsLoader>,
}

fn build_fusion<B: ConvMixerConfig, S: ConvMixerConfig>(
    seed: u64,
    reduction: Reduction,
) -> Box<dyn Classifier> {
    // The zoo's pairs are checked by a test, so a failure here is a declaration bug.
    spin_core::fusion::FusionMixer::<B, S, f32, Cpu>::check_pair().expect("a valid fusion pair");
    let dev = Cpu::seed_from_u64(seed);
    let mut model = dev.build_module::<Fusion<B, S>, f32>();
    model.reduction = reduction;
    Box::new(Runner::new(model, dev))
}

fn build_vit_fusion<B: VitConfig, S: VitConfig>(seed: u64, reduction: Reduction) -> Box<dyn Classifier> {
    spin_core::fusion::FusionVit::<B, S, f32, Cpu>::check_pair().expect("a valid fusion pair");
    let dev = Cpu::seed_from_u64(seed);
    let mut model = dev.build_module::<FusionVitOf<B, S>, f32>();
    model.reduction = reduction;
    Box::new(Runner::new(model, dev))
}

fn build_member<X>(seed: u64) -> Box<dyn Classifier>
where
    X: BuildOnDevice<Cpu, f32>,
    X::Built: SpinModel<f32, Cpu> + Send + 'static,
{
    let dev = Cpu::seed_from_u64(seed);
    let model = dev.build_module::<X, f32>();
    Box::new(Runner::new(model, dev))
}

/// Declares the members and generates [`MEMBERS`] from the same list.
macro_rules! zoo {
    ($( $(#[$attr:meta])+ $name:ident $(<- $base:ident $($vit:ident)?)?; )+) => {
        $( $(#[$attr])+ #[allow(non_camel_case_types)] pub struct $name; )+

        /// Every member of the zoo, in declaration order.
        pub static MEMBERS: &[Member] = &[
            $( Member {
                info: <$name as Describe>::info,
                build: build_member::<$name>,
                fusion: zoo!(@fusion $name $($base $($vit)?)?),
                fips: <$name as FipsCompress>::RUNNER,
                load_fips: <$name as FipsCompress>::LOADER,
            }, )+
        ];
    };
    (@fusion $name:ident $base:ident vit) => { Some(build_vit_fusion::<$base, $name>) };
    (@fusion $name:ident $base:ident) => { Some(build_fusion::<$base, $name>) };
    (@fusion $name:ident) => { None };
}

zoo! {
    // ---- ConvMixer: timm's members, SPIN's variant, and their pointwise-shared versions ----
    /// ConvMixer-1536/20, timm `convmixer_1536_20` (k9, p7, GELU).
    #[convmixer(dim = 1536, kernel = 9, patch = 7, image = 224, classes = 1000, act = gelu, depth = 20)]
    convmixer_1536_20;
    #[convmixer(dim = 1536, kernel = 9, patch = 7, image = 224, classes = 1000, act = gelu)]
    #[shared_blocks(depth = 20, groups = 10, pattern = sequential)]
    convmixer_1536_20_ws2_sequential <- convmixer_1536_20;
    #[convmixer(dim = 1536, kernel = 9, patch = 7, image = 224, classes = 1000, act = gelu)]
    #[shared_blocks(depth = 20, groups = 10, pattern = strided)]
    convmixer_1536_20_ws2_strided <- convmixer_1536_20;
    #[convmixer(dim = 1536, kernel = 9, patch = 7, image = 224, classes = 1000, act = gelu)]
    #[shared_blocks(depth = 20, groups = 5, pattern = sequential)]
    convmixer_1536_20_ws4_sequential <- convmixer_1536_20;
    #[convmixer(dim = 1536, kernel = 9, patch = 7, image = 224, classes = 1000, act = gelu)]
    #[shared_blocks(depth = 20, groups = 5, pattern = strided)]
    convmixer_1536_20_ws4_strided <- convmixer_1536_20;
    /// ConvMixer-768/32, timm `convmixer_768_32` (k7, p7, ReLU).
    #[convmixer(dim = 768, kernel = 7, patch = 7, image = 224, classes = 1000, act = relu, depth = 32)]
    convmixer_768_32;
    #[convmixer(dim = 768, kernel = 7, patch = 7, image = 224, classes = 1000, act = relu)]
    #[shared_blocks(depth = 32, groups = 16, pattern = sequential)]
    convmixer_768_32_ws2_sequential <- convmixer_768_32;
    #[convmixer(dim = 768, kernel = 7, patch = 7, image = 224, classes = 1000, act = relu)]
    #[shared_blocks(depth = 32, groups = 16, pattern = strided)]
    convmixer_768_32_ws2_strided <- convmixer_768_32;
    #[convmixer(dim = 768, kernel = 7, patch = 7, image = 224, classes = 1000, act = relu)]
    #[shared_blocks(depth = 32, groups = 8, pattern = sequential)]
    convmixer_768_32_ws4_sequential <- convmixer_768_32;
    #[convmixer(dim = 768, kernel = 7, patch = 7, image = 224, classes = 1000, act = relu)]
    #[shared_blocks(depth = 32, groups = 8, pattern = strided)]
    convmixer_768_32_ws4_strided <- convmixer_768_32;
    /// ConvMixer-1024/20, timm `convmixer_1024_20_ks9_p14`.
    #[convmixer(dim = 1024, kernel = 9, patch = 14, image = 224, classes = 1000, act = gelu, depth = 20)]
    convmixer_1024_20_ks9_p14;
    #[convmixer(dim = 1024, kernel = 9, patch = 14, image = 224, classes = 1000, act = gelu)]
    #[shared_blocks(depth = 20, groups = 10, pattern = sequential)]
    convmixer_1024_20_ks9_p14_ws2_sequential <- convmixer_1024_20_ks9_p14;
    #[convmixer(dim = 1024, kernel = 9, patch = 14, image = 224, classes = 1000, act = gelu)]
    #[shared_blocks(depth = 20, groups = 10, pattern = strided)]
    convmixer_1024_20_ks9_p14_ws2_strided <- convmixer_1024_20_ks9_p14;
    #[convmixer(dim = 1024, kernel = 9, patch = 14, image = 224, classes = 1000, act = gelu)]
    #[shared_blocks(depth = 20, groups = 5, pattern = sequential)]
    convmixer_1024_20_ks9_p14_ws4_sequential <- convmixer_1024_20_ks9_p14;
    #[convmixer(dim = 1024, kernel = 9, patch = 14, image = 224, classes = 1000, act = gelu)]
    #[shared_blocks(depth = 20, groups = 5, pattern = strided)]
    convmixer_1024_20_ks9_p14_ws4_strided <- convmixer_1024_20_ks9_p14;
    /// SPIN's ConvMixer-768/32 (p14, k3, ReLU) with a residual around the pointwise part.
    #[convmixer(dim = 768, kernel = 3, patch = 14, image = 224, classes = 1000, act = relu, variant = spin, depth = 32)]
    convmixer_768_32_p14_k3;
    #[convmixer(dim = 768, kernel = 3, patch = 14, image = 224, classes = 1000, act = relu, variant = spin)]
    #[shared_blocks(depth = 32, groups = 16, pattern = sequential)]
    convmixer_768_32_p14_k3_ws2_sequential <- convmixer_768_32_p14_k3;
    #[convmixer(dim = 768, kernel = 3, patch = 14, image = 224, classes = 1000, act = relu, variant = spin)]
    #[shared_blocks(depth = 32, groups = 16, pattern = strided)]
    convmixer_768_32_p14_k3_ws2_strided <- convmixer_768_32_p14_k3;
    #[convmixer(dim = 768, kernel = 3, patch = 14, image = 224, classes = 1000, act = relu, variant = spin)]
    #[shared_blocks(depth = 32, groups = 8, pattern = sequential)]
    convmixer_768_32_p14_k3_ws4_sequential <- convmixer_768_32_p14_k3;
    #[convmixer(dim = 768, kernel = 3, patch = 14, image = 224, classes = 1000, act = relu, variant = spin)]
    #[shared_blocks(depth = 32, groups = 8, pattern = strided)]
    convmixer_768_32_p14_k3_ws4_strided <- convmixer_768_32_p14_k3;
    /// ConvMixer-256/8 for 32×32 inputs (k9, p2, GELU, 10 classes).
    #[convmixer(dim = 256, kernel = 9, patch = 2, image = 32, classes = 10, act = gelu, depth = 8)]
    convmixer_256_8_ks9_p2;
    #[convmixer(dim = 256, kernel = 9, patch = 2, image = 32, classes = 10, act = gelu)]
    #[shared_blocks(depth = 8, groups = 4, pattern = sequential)]
    convmixer_256_8_ks9_p2_ws2_sequential <- convmixer_256_8_ks9_p2;
    #[convmixer(dim = 256, kernel = 9, patch = 2, image = 32, classes = 10, act = gelu)]
    #[shared_blocks(depth = 8, groups = 4, pattern = strided)]
    convmixer_256_8_ks9_p2_ws2_strided <- convmixer_256_8_ks9_p2;
    #[convmixer(dim = 256, kernel = 9, patch = 2, image = 32, classes = 10, act = gelu)]
    #[shared_blocks(depth = 8, groups = 2, pattern = sequential)]
    convmixer_256_8_ks9_p2_ws4_sequential <- convmixer_256_8_ks9_p2;
    #[convmixer(dim = 256, kernel = 9, patch = 2, image = 32, classes = 10, act = gelu)]
    #[shared_blocks(depth = 8, groups = 2, pattern = strided)]
    convmixer_256_8_ks9_p2_ws4_strided <- convmixer_256_8_ks9_p2;
    // ---- DeiT: attention and MLP shared (SPIN), or everything shared (ALBERT) ----
    /// timm `deit_tiny_patch16_224`.
    #[vit(dim = 192, heads = 3, patch = 16, image = 224, classes = 1000, depth = 12)]
    deit_tiny_patch16_224;
    #[vit(dim = 192, heads = 3, patch = 16, image = 224, classes = 1000)]
    #[shared_blocks(depth = 12, groups = 6, pattern = sequential)]
    deit_tiny_patch16_224_ws2_sequential <- deit_tiny_patch16_224 vit;
    #[vit(dim = 192, heads = 3, patch = 16, image = 224, classes = 1000)]
    #[shared_blocks(depth = 12, groups = 6, pattern = strided)]
    deit_tiny_patch16_224_ws2_strided <- deit_tiny_patch16_224 vit;
    #[vit(dim = 192, heads = 3, patch = 16, image = 224, classes = 1000)]
    #[shared_blocks(depth = 12, groups = 3, pattern = sequential)]
    deit_tiny_patch16_224_ws4_sequential <- deit_tiny_patch16_224 vit;
    #[vit(dim = 192, heads = 3, patch = 16, image = 224, classes = 1000)]
    #[shared_blocks(depth = 12, groups = 3, pattern = strided)]
    deit_tiny_patch16_224_ws4_strided <- deit_tiny_patch16_224 vit;
    #[vit(dim = 192, heads = 3, patch = 16, image = 224, classes = 1000)]
    #[shared_blocks(depth = 12, groups = 1, pattern = sequential, share = all)]
    deit_tiny_patch16_224_ws12_all;
    /// timm `deit_small_patch16_224`.
    #[vit(dim = 384, heads = 6, patch = 16, image = 224, classes = 1000, depth = 12)]
    deit_small_patch16_224;
    #[vit(dim = 384, heads = 6, patch = 16, image = 224, classes = 1000)]
    #[shared_blocks(depth = 12, groups = 6, pattern = sequential)]
    deit_small_patch16_224_ws2_sequential;
    #[vit(dim = 384, heads = 6, patch = 16, image = 224, classes = 1000)]
    #[shared_blocks(depth = 12, groups = 6, pattern = strided)]
    deit_small_patch16_224_ws2_strided;
    #[vit(dim = 384, heads = 6, patch = 16, image = 224, classes = 1000)]
    #[shared_blocks(depth = 12, groups = 3, pattern = sequential)]
    deit_small_patch16_224_ws4_sequential;
    #[vit(dim = 384, heads = 6, patch = 16, image = 224, classes = 1000)]
    #[shared_blocks(depth = 12, groups = 3, pattern = strided)]
    deit_small_patch16_224_ws4_strided;
    #[vit(dim = 384, heads = 6, patch = 16, image = 224, classes = 1000)]
    #[shared_blocks(depth = 12, groups = 1, pattern = sequential, share = all)]
    deit_small_patch16_224_ws12_all;
    /// timm `deit_base_patch16_224`.
    #[vit(dim = 768, heads = 12, patch = 16, image = 224, classes = 1000, depth = 12)]
    deit_base_patch16_224;
    #[vit(dim = 768, heads = 12, patch = 16, image = 224, classes = 1000)]
    #[shared_blocks(depth = 12, groups = 6, pattern = sequential)]
    deit_base_patch16_224_ws2_sequential;
    #[vit(dim = 768, heads = 12, patch = 16, image = 224, classes = 1000)]
    #[shared_blocks(depth = 12, groups = 6, pattern = strided)]
    deit_base_patch16_224_ws2_strided;
    #[vit(dim = 768, heads = 12, patch = 16, image = 224, classes = 1000)]
    #[shared_blocks(depth = 12, groups = 3, pattern = sequential)]
    deit_base_patch16_224_ws4_sequential;
    #[vit(dim = 768, heads = 12, patch = 16, image = 224, classes = 1000)]
    #[shared_blocks(depth = 12, groups = 3, pattern = strided)]
    deit_base_patch16_224_ws4_strided;
    #[vit(dim = 768, heads = 12, patch = 16, image = 224, classes = 1000)]
    #[shared_blocks(depth = 12, groups = 1, pattern = sequential, share = all)]
    deit_base_patch16_224_ws12_all;
    /// FiPS's DeiT-B example: MLPs compressed to half, bases shared by 4 blocks, rank 1365.
    #[vit(dim = 768, heads = 12, patch = 16, image = 224, classes = 1000, depth = 12)]
    #[fips(groups = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]], budget = 0.5, sparsity = 0.75)]
    deit_base_patch16_224_fips;
    // ---- Small members for the built-in 8×8 digits: each trains in well under a minute ----
    /// ConvMixer-64/8 on 8×8 digits, 1×1 patches.
    #[convmixer(dim = 64, kernel = 3, patch = 1, image = 8, classes = 10, act = gelu, depth = 8)]
    digits_convmixer_64_8;
    #[convmixer(dim = 64, kernel = 3, patch = 1, image = 8, classes = 10, act = gelu)]
    #[shared_blocks(depth = 8, groups = 4, pattern = sequential)]
    digits_convmixer_64_8_ws2_sequential <- digits_convmixer_64_8;
    #[convmixer(dim = 64, kernel = 3, patch = 1, image = 8, classes = 10, act = gelu)]
    #[shared_blocks(depth = 8, groups = 4, pattern = strided)]
    digits_convmixer_64_8_ws2_strided <- digits_convmixer_64_8;
    #[convmixer(dim = 64, kernel = 3, patch = 1, image = 8, classes = 10, act = gelu)]
    #[shared_blocks(depth = 8, groups = 2, pattern = sequential)]
    digits_convmixer_64_8_ws4_sequential <- digits_convmixer_64_8;
    #[convmixer(dim = 64, kernel = 3, patch = 1, image = 8, classes = 10, act = gelu)]
    #[shared_blocks(depth = 8, groups = 2, pattern = strided)]
    digits_convmixer_64_8_ws4_strided <- digits_convmixer_64_8;
    /// digits_convmixer_64_8 with a 3-class head: what `spin train --init-from CKPT --num-classes 3`
    /// fine-tunes a trained digits_convmixer_64_8 into (each class count is a member like this).
    #[convmixer(dim = 64, kernel = 3, patch = 1, image = 8, classes = 3, act = gelu, depth = 8)]
    digits_convmixer_64_8_c3;
    /// A ViT-64/6 on 8×8 digits, 2×2 patches.
    #[vit(dim = 64, heads = 4, patch = 2, image = 8, classes = 10, depth = 6)]
    digits_vit_64_6;
    #[vit(dim = 64, heads = 4, patch = 2, image = 8, classes = 10)]
    #[shared_blocks(depth = 6, groups = 3, pattern = sequential)]
    digits_vit_64_6_ws2_sequential <- digits_vit_64_6 vit;
    #[vit(dim = 64, heads = 4, patch = 2, image = 8, classes = 10)]
    #[shared_blocks(depth = 6, groups = 3, pattern = strided)]
    digits_vit_64_6_ws2_strided <- digits_vit_64_6 vit;
    /// The grouping `spin analyze --groups 3` finds for a trained digits_vit_64_6 (CKA of block
    /// outputs; README, "Which layers to share").
    #[vit(dim = 64, heads = 4, patch = 2, image = 8, classes = 10)]
    #[shared_blocks(depth = 6, groups = 3, pattern = [0, 1, 1, 1, 2, 2])]
    digits_vit_64_6_ws2_similar <- digits_vit_64_6 vit;
    #[vit(dim = 64, heads = 4, patch = 2, image = 8, classes = 10)]
    #[shared_blocks(depth = 6, groups = 2, pattern = sequential)]
    digits_vit_64_6_ws3_sequential <- digits_vit_64_6 vit;
    #[vit(dim = 64, heads = 4, patch = 2, image = 8, classes = 10)]
    #[shared_blocks(depth = 6, groups = 1, pattern = sequential, share = all)]
    digits_vit_64_6_ws6_all;
    /// What `spin fips --model digits_vit_64_6 --budget 0.5 --sparsity 0.5` makes (groups of 3).
    #[vit(dim = 64, heads = 4, patch = 2, image = 8, classes = 10, depth = 6)]
    #[fips(groups = [[0, 1, 2], [3, 4, 5]], budget = 0.5, sparsity = 0.5)]
    digits_vit_64_6_fips;
}

/// The member called `name`, or an error suggesting the nearest names (by edit distance,
/// ignoring case).
pub fn find(name: &str) -> Result<&'static Member, Error> {
    if let Some(m) = MEMBERS.iter().find(|m| (m.info)().name == name) {
        return Ok(m);
    }
    let wanted = name.to_lowercase();
    let mut near: Vec<(usize, &str)> = MEMBERS
        .iter()
        .map(|m| (m.info)().name)
        .map(|n| (edit_distance(&wanted, n), n))
        .collect();
    near.sort();
    let near: Vec<&str> = near.iter().take(3).map(|&(_, n)| n).collect();
    Err(Error::Invalid(format!(
        "no zoo member `{name}` (nearest: {}); `spin zoo` lists them all",
        near.join(", ")
    )))
}

/// The member to fine-tune `init`'s model into at `classes` classes: `model` when given (it must
/// have `classes` classes), else the member declared with the checkpoint plan's architecture and
/// sharing but `classes` classes. Either way the plans must agree on everything but the classes.
///
/// Why declared members and not a head sized at run time: a member's head is part of its type,
/// like every other shape, which is what makes its shapes checked and its counts constants; a
/// new class count is one more 3-line declaration (and a rebuild), and the error says which.
pub fn fine_tune_member(
    model: Option<&str>,
    init: &std::path::Path,
    classes: usize,
) -> Result<&'static Member, Error> {
    use spin_core::models::Plan;
    let header = spin_core::checkpoint::read_header(init)?;
    let source = match spin_core::checkpoint::plan_in(init, Some(&header.metadata))? {
        Some(p) => p,
        None => Plan::from_info(&(find(model.ok_or_else(|| {
            Error::Invalid(format!(
                "{}: the checkpoint names no member (no spin plan in it); give --model",
                init.display()
            ))
        })?)?
        .info)()),
    };
    // Compared as if the candidate had the source's classes (and so its head).
    let fits = |m: &Member| {
        let mut plan = Plan::from_info(&(m.info)());
        plan.classes = source.classes;
        plan.mismatch(&source)
    };
    if let Some(name) = model {
        let member = find(name)?;
        let info = (member.info)();
        if info.classes != classes {
            return Err(Error::Invalid(format!(
                "{name} has {} classes, not --num-classes {classes}",
                info.classes
            )));
        }
        return match fits(member) {
            None => Ok(member),
            Some((field, ours, theirs)) => Err(Error::Invalid(format!(
                "{}: the checkpoint is {} with {field} = {theirs}, but {name} has {field} = {ours}",
                init.display(),
                source.name
            ))),
        };
    }
    MEMBERS
        .iter()
        .find(|m| {
            let info = (m.info)();
            info.classes == classes && info.schedule == source.schedule && fits(m).is_none()
        })
        .ok_or_else(|| {
            Error::Invalid(format!(
                "no zoo member is {} with {classes} classes: declare one in zoo/src/lib.rs as {} is \
                 declared but with `classes = {classes}` (e.g. `{}_c{classes}`), rebuild, and run this again",
                source.name, source.name, source.name
            ))
        })
}

/// Levenshtein distance between two names.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let next = (diag + usize::from(ca != cb)).min(row[j] + 1).min(row[j + 1] + 1);
            diag = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

/// Whether `name` contains `filter` or, when it has `*` or `?`, matches it as a glob.
pub fn name_matches(filter: &str, name: &str) -> bool {
    fn glob(p: &[u8], s: &[u8]) -> bool {
        match (p.first(), s.first()) {
            (None, None) => true,
            (Some(b'*'), _) => glob(&p[1..], s) || (!s.is_empty() && glob(p, &s[1..])),
            (Some(b'?'), Some(_)) => glob(&p[1..], &s[1..]),
            (Some(a), Some(b)) if a == b => glob(&p[1..], &s[1..]),
            _ => false,
        }
    }
    if filter.contains(['*', '?']) {
        glob(filter.as_bytes(), name.as_bytes())
    } else {
        name.contains(filter)
    }
}

/// A member by name with trained weights from `weights`. A FiPS checkpoint loads into a ViT
/// member at the rank and groups it was written with, whatever the member declares.
pub fn load(name: &str, weights: &std::path::Path) -> Result<Box<dyn Classifier>, Error> {
    let member = find(name)?;
    if let Some(load_fips) = member.load_fips {
        if spin_core::fips::is_fips_checkpoint(weights)? {
            return load_fips(weights);
        }
    }
    let mut m = (member.build)(0);
    m.load_timm(weights)?;
    Ok(m)
}

/// The member a command works on: `model` when given, else the one the checkpoint's plan names.
pub fn member_name(model: Option<&str>, weights: &std::path::Path) -> Result<String, Error> {
    if let Some(m) = model {
        return Ok(m.to_string());
    }
    let header = spin_core::checkpoint::read_header(weights)?;
    let plan = spin_core::checkpoint::plan_in(weights, Some(&header.metadata))?;
    plan.map(|p| p.name).ok_or_else(|| {
        Error::Invalid(format!(
            "{}: the checkpoint names no member (no spin plan in it); give --model",
            weights.display()
        ))
    })
}

/// Builds a member by name, with parameters initialised from `seed`.
pub fn build(name: &str, seed: u64) -> Result<Box<dyn Classifier>, Error> {
    Ok((find(name)?.build)(seed))
}

/// How a member expects its input (see [`DataConfig::for_model`]).
pub fn data_config(info: &ModelInfo) -> DataConfig {
    DataConfig::for_model(info)
}

/// The digits members `spin compare` trains by default: shared against unshared, per family.
pub const DIGITS_COMPARISON: &[&str] = &[
    "digits_convmixer_64_8",
    "digits_convmixer_64_8_ws2_sequential",
    "digits_convmixer_64_8_ws4_sequential",
    "digits_convmixer_64_8_ws4_strided",
    "digits_vit_64_6",
    "digits_vit_64_6_ws2_sequential",
    "digits_vit_64_6_ws6_all",
];
