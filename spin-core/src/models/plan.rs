//! A member's plan: everything needed to rebuild it elsewhere — family and sizes, the schedule
//! and granularity, the FiPS plan, the data config — as one JSON object. Every checkpoint spin
//! writes carries it in its metadata under [`PLAN_KEY`], `spin zoo --format json` lists it for
//! every member, and spin-torch builds the same model from it.
use super::{Family, ModelInfo};
use serde::{Deserialize, Serialize};
use spin_rules::{ConvMixerShare, CropMode, Interpolation, VitShare};

/// The safetensors metadata key of the plan.
pub const PLAN_KEY: &str = "spin.plan";

/// How a model expects its input: size, normalisation and the eval-time resize (timm's
/// `resolve_data_config` for that model).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DataConfig {
    /// Input image side.
    #[serde(rename = "size")]
    pub image: usize,
    /// Per-channel mean subtracted after scaling to [0, 1].
    pub mean: [f32; 3],
    /// Per-channel standard deviation divided by.
    pub std: [f32; 3],
    /// Eval transform: resize to image / crop_pct (how, `crop_mode` says), then centre-crop.
    pub crop_pct: f32,
    /// The eval resize's filter, as timm names it (`bicubic`, `bilinear`).
    pub interpolation: String,
    /// How the eval resize fits the image, as timm names it: `center` (the shorter side),
    /// `squash` (both sides), `border` (the longer side, then padding with the mean colour).
    #[serde(default = "center")]
    pub crop_mode: String,
}

fn center() -> String {
    CropMode::Center.name().into()
}

/// What a declaration may change in timm's eval transform for its family
/// (`#[vit(..., crop_pct = 0.95, crop_mode = squash, interpolation = bilinear)]`); `None` keeps
/// timm's value.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EvalOverride {
    /// The eval crop.
    pub crop_pct: Option<f32>,
    /// How the resize fits the image.
    pub crop_mode: Option<CropMode>,
    /// The resize's filter.
    pub interpolation: Option<Interpolation>,
}

impl EvalOverride {
    /// Nothing overridden.
    pub const NONE: Self = Self {
        crop_pct: None,
        crop_mode: None,
        interpolation: None,
    };
}

impl DataConfig {
    /// ImageNet's channel means.
    pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
    /// ImageNet's channel standard deviations.
    pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

    /// ImageNet statistics at `image` with this eval crop.
    pub fn imagenet(image: usize, crop_pct: f32) -> Self {
        Self {
            image,
            mean: Self::IMAGENET_MEAN,
            std: Self::IMAGENET_STD,
            crop_pct,
            interpolation: "bicubic".into(),
            crop_mode: center(),
        }
    }
    /// How a model expects its input, as timm's data config would give it: ImageNet statistics
    /// and timm's eval crop at 224 — 0.96 for timm's ConvMixers, 1.0 for SPIN's (ml-spin resizes to
    /// 224 and centre-crops 224), 0.9 for DeiT; CIFAR-10 statistics at 32; inputs
    /// centred to [-1, 1] for the 8×8 digits members. What the declaration overrides
    /// (`crop_pct`, `crop_mode`, `interpolation`) replaces timm's value.
    ///
    /// ```
    /// use spin_core::{models::DataConfig, Describe};
    /// # use spin_core::prelude::*;
    /// #[convmixer(dim = 16, kernel = 3, patch = 1, image = 8, classes = 10, depth = 2)]
    /// struct Tiny;
    /// assert_eq!(DataConfig::for_model(&Tiny::info()), DataConfig::centred(8));
    ///
    /// #[vit(dim = 32, heads = 2, patch = 16, image = 224, classes = 10, depth = 2,
    ///       crop_pct = 0.95, crop_mode = squash)]
    /// struct Squashed;
    /// let cfg = DataConfig::for_model(&Squashed::info());
    /// assert_eq!((cfg.crop_pct, cfg.crop_mode.as_str(), cfg.interpolation.as_str()), (0.95, "squash", "bicubic"));
    /// ```
    pub fn for_model(info: &ModelInfo) -> Self {
        let mut cfg = Self::family_default(info);
        let o = &info.eval;
        if let Some(c) = o.crop_pct {
            cfg.crop_pct = c;
        }
        if let Some(m) = o.crop_mode {
            cfg.crop_mode = m.name().into();
        }
        if let Some(i) = o.interpolation {
            cfg.interpolation = i.name().into();
        }
        cfg
    }

    /// timm's eval transform for the family at the member's size.
    fn family_default(info: &ModelInfo) -> Self {
        match (info.image, info.family) {
            (8, _) => Self::centred(8),
            (32, _) => Self {
                image: 32,
                mean: [0.4914, 0.4822, 0.4465],
                std: [0.2470, 0.2435, 0.2616],
                crop_pct: 1.0,
                interpolation: "bilinear".into(),
                crop_mode: center(),
            },
            (img, Family::ConvMixer) => match &info.arch {
                Arch::ConvMixer { variant, .. } if variant == "spin" => Self::imagenet(img, 1.0),
                _ => Self::imagenet(img, 0.96),
            },
            (img, Family::Vit) => Self::imagenet(img, 0.9),
        }
    }

    /// Centred to [-1, 1], no crop: spin's config for the small built-in data.
    pub fn centred(image: usize) -> Self {
        Self {
            image,
            mean: [0.5; 3],
            std: [0.5; 3],
            crop_pct: 1.0,
            interpolation: "bilinear".into(),
            crop_mode: center(),
        }
    }
}

/// A FiPS compression as a plan states it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FipsPlanInfo {
    /// The blocks that share each basis.
    pub groups: Vec<Vec<usize>>,
    /// The fraction of the MLP weights kept.
    pub budget: f64,
    /// The fraction of the factors' entries pruned.
    pub sparsity: f64,
    /// The rank of every basis.
    pub rank: usize,
}

/// The family-specific arguments of a declaration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Arch {
    /// A ConvMixer's.
    ConvMixer {
        /// Depthwise kernel size.
        kernel: usize,
        /// `gelu` or `relu`.
        act: String,
        /// `timm` or `spin` (SPIN's residual around the pointwise part).
        variant: String,
    },
    /// A ViT's.
    Vit {
        /// Attention heads.
        heads: usize,
        /// MLP hidden width over the embedding width.
        mlp_ratio: f64,
    },
}

/// A member's plan (see the module docs).
///
/// ```
/// use spin_core::models::Plan;
/// use spin_core::prelude::*;
///
/// #[convmixer(dim = 32, kernel = 5, patch = 2, image = 16, classes = 10, act = relu)]
/// #[shared_blocks(depth = 4, groups = 2, pattern = strided)]
/// struct Shared;
///
/// let plan = Plan::from_info(&Shared::info());
/// let json = plan.to_json();
/// assert!(json.contains("\"schedule\":[0,1,0,1]") && json.contains("\"act\":\"relu\""));
/// assert_eq!(Plan::from_json(&json).unwrap(), plan);
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// The member's name.
    pub name: String,
    /// `convmixer` or `vit`.
    pub family: String,
    /// Channels or embedding width.
    pub dim: usize,
    /// Blocks.
    pub depth: usize,
    /// Patch size.
    pub patch: usize,
    /// Input image side.
    pub image: usize,
    /// Output classes.
    pub classes: usize,
    /// The family's own arguments.
    #[serde(flatten)]
    pub arch: Arch,
    /// Parameter groups.
    pub groups: usize,
    /// The sharing pattern's name.
    pub pattern: String,
    /// The group of every block.
    pub schedule: Vec<usize>,
    /// What the blocks of a group share (`none` when nothing is).
    pub share: String,
    /// The FiPS compression of the MLPs, if any.
    pub fips: Option<FipsPlanInfo>,
    /// The input the model expects.
    pub data: DataConfig,
    /// Unique trainable parameters.
    pub params: usize,
    /// Multiply-accumulates per image.
    pub macs: u64,
}

impl Plan {
    /// The plan of a described model.
    pub fn from_info(info: &ModelInfo) -> Self {
        Self {
            name: info.name.into(),
            family: info.family.name().into(),
            dim: info.dim,
            depth: info.depth,
            patch: info.patch,
            image: info.image,
            classes: info.classes,
            arch: info.arch.clone(),
            groups: info.groups,
            pattern: info.pattern.clone(),
            schedule: info.schedule.clone(),
            share: info.share.into(),
            fips: info.fips.clone(),
            data: DataConfig::for_model(info),
            params: info.params,
            macs: info.macs,
        }
    }

    /// The plan as one line of JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// A plan from JSON; the error says what is malformed.
    pub fn from_json(s: &str) -> Result<Self, String> {
        serde_json::from_str(s).map_err(|e| e.to_string())
    }

    /// The first field that makes a model of this plan unable to hold a checkpoint of `other`
    /// (the name, parameter counts and data config may differ): `(field, ours, theirs)`.
    ///
    /// Sharing may differ where it does not matter: a checkpoint holds every layer's copy of a
    /// shared tensor, so a model that ties fewer layers (an unshared one, say) loads it; a model
    /// that ties two layers the checkpoint keeps apart does not (`schedule`).
    pub fn mismatch(&self, other: &Plan) -> Option<(String, String, String)> {
        let (a, b) = (
            serde_json::to_value(self).ok()?,
            serde_json::to_value(other).ok()?,
        );
        const FIELDS: &[&str] = &[
            "family",
            "dim",
            "depth",
            "patch",
            "image",
            "classes",
            "kernel",
            "act",
            "variant",
            "heads",
            "mlp_ratio",
            "fips",
        ];
        // A FiPS model's budget and sparsity describe it; its groups and rank fix its tensors.
        let fips = |p: &Plan| match &p.fips {
            None => "none".to_string(),
            Some(f) => format!("groups {:?} at rank {}", f.groups, f.rank),
        };
        let differs = FIELDS.iter().find_map(|&f| {
            let (x, y) = match f {
                "fips" => (fips(self), fips(other)),
                _ => (a[f].to_string(), b[f].to_string()),
            };
            (x != y).then(|| (f.to_string(), x, y))
        });
        differs.or_else(|| {
            let tied_apart = (0..self.depth).any(|i| {
                (i + 1..self.depth).any(|j| {
                    self.shared_parts()
                        .iter()
                        .any(|&part| self.ties(part, i, j) && !other.ties(part, i, j))
                })
            });
            tied_apart.then(|| {
                let show = |p: &Plan| format!("{:?} ({})", p.schedule, p.share);
                ("schedule".to_string(), show(self), show(other))
            })
        })
    }

    /// The block parts this plan shares across the layers of a group, by a name common to both
    /// families' granularities: `a` (depthwise conv / attention), `b` (pointwise conv / MLP),
    /// `norms`.
    fn shared_parts(&self) -> Vec<&'static str> {
        let (a, b, norms) = match self.family.as_str() {
            "convmixer" => match spin_rules::parse_name(ConvMixerShare::NAMES, "share", &self.share) {
                Ok(s) => (s.depthwise(), s.pointwise(), s.norms()),
                Err(_) => (false, false, false),
            },
            _ => match spin_rules::parse_name(VitShare::NAMES, "share", &self.share) {
                Ok(s) => (s.attn(), s.mlp(), s.norms()),
                Err(_) => (false, false, false),
            },
        };
        [(a, "a"), (b, "b"), (norms, "norms")]
            .into_iter()
            .filter_map(|(on, part)| on.then_some(part))
            .collect()
    }

    /// Whether layers `i` and `j` use one stored copy of `part`.
    fn ties(&self, part: &str, i: usize, j: usize) -> bool {
        self.shared_parts().contains(&part) && self.schedule.get(i) == self.schedule.get(j)
    }
}

impl Family {
    /// The family called `name` (`convmixer`, `vit`).
    pub fn from_name(name: &str) -> Option<Self> {
        [Family::ConvMixer, Family::Vit]
            .into_iter()
            .find(|f| f.name() == name)
    }
}
