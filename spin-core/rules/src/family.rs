//! The choices a family declaration names besides its sizes.

/// The activation a ConvMixer uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Act {
    /// GELU in its exact form, x·Φ(x) with the erf (PyTorch's default, not the tanh approximation).
    #[default]
    Gelu,
    /// max(x, 0).
    Relu,
}

impl Act {
    /// Every activation under the name a declaration uses (`act = relu`); the first is the default.
    pub const NAMES: &'static [(&'static str, Self)] = &[("gelu", Self::Gelu), ("relu", Self::Relu)];
    /// The name a declaration uses.
    pub fn name(self) -> &'static str {
        name_of(Self::NAMES, self)
    }
}

/// Whether a ConvMixer's pointwise part has a residual connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Variant {
    /// timm's block: `x = BN(act(pw(x)))`.
    #[default]
    Timm,
    /// SPIN's block: `x = x + BN(act(pw(x)))`.
    Spin,
}

impl Variant {
    /// Every variant under the name a declaration uses (`variant = spin`); the first is the default.
    pub const NAMES: &'static [(&'static str, Self)] = &[("timm", Self::Timm), ("spin", Self::Spin)];
    /// The name a declaration uses.
    pub fn name(self) -> &'static str {
        name_of(Self::NAMES, self)
    }
}

/// The name of `value` in its table (every value has one).
pub(crate) fn name_of<T: PartialEq>(table: &[(&'static str, T)], value: T) -> &'static str {
    table.iter().find(|(_, v)| *v == value).map_or("", |(n, _)| n)
}

/// How timm's eval transform fits an image to the model's input (`crop_mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum CropMode {
    /// Resize the shorter side to image / crop_pct, keeping the aspect ratio, then centre-crop.
    #[default]
    Center,
    /// Resize both sides to image / crop_pct (the aspect ratio is not kept), then centre-crop.
    Squash,
    /// Resize the longer side to image / crop_pct, pad with the mean colour, then centre-crop.
    Border,
}

impl CropMode {
    /// Every mode under the name timm and a declaration use (`crop_mode = squash`); the first
    /// is the default.
    pub const NAMES: &'static [(&'static str, Self)] = &[
        ("center", Self::Center),
        ("squash", Self::Squash),
        ("border", Self::Border),
    ];
    /// The name timm and a declaration use.
    pub fn name(self) -> &'static str {
        name_of(Self::NAMES, self)
    }
}

/// The eval resize's filter (`interpolation`), PIL's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Interpolation {
    /// PIL's bicubic (a = −0.5), antialiased when shrinking.
    #[default]
    Bicubic,
    /// PIL's bilinear, antialiased when shrinking.
    Bilinear,
}

impl Interpolation {
    /// Every filter under the name timm and a declaration use; the first is the default.
    pub const NAMES: &'static [(&'static str, Self)] =
        &[("bicubic", Self::Bicubic), ("bilinear", Self::Bilinear)];
    /// The name timm and a declaration use.
    pub fn name(self) -> &'static str {
        name_of(Self::NAMES, self)
    }
}

/// Why `crop_pct` is not a valid eval crop, if it is not: it must lie in (0, 1] — the resize
/// before the crop never makes the image smaller than the model's input.
pub fn crop_pct_error(crop_pct: f64) -> Option<String> {
    (!(crop_pct > 0.0 && crop_pct <= 1.0))
        .then(|| format!("crop_pct must be in (0, 1] (timm's DeiT uses 0.9), got {crop_pct}"))
}
