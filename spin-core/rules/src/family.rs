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
