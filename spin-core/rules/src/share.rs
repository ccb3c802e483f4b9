//! What a family shares across the layers of a group, and where each layer's part is stored.
//!
//! A block is made of parts (ConvMixer: depthwise conv, BN, pointwise conv, BN; ViT: norm1,
//! attention, norm2, MLP). Each part is stored once per group when it is shared and once per
//! layer when it is not; layer i uses entry [`slot`]`(shared, schedule, i)`.

/// Which entry of a part's storage layer `i` uses.
#[inline]
pub fn slot(shared: bool, schedule: &[usize], i: usize) -> usize {
    if shared {
        schedule[i]
    } else {
        i
    }
}

/// How many entries a part's storage holds.
pub const fn count(shared: bool, depth: usize, groups: usize) -> usize {
    if shared {
        groups
    } else {
        depth
    }
}

/// The layers that use entry `j` of a part's storage.
pub fn users(shared: bool, schedule: &[usize], j: usize) -> Vec<usize> {
    if shared {
        (0..schedule.len()).filter(|&i| schedule[i] == j).collect()
    } else {
        vec![j]
    }
}

/// What a ConvMixer shares across the layers of a group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConvMixerShare {
    /// The pointwise 1×1 conv (weight and bias): SPIN's choice.
    Pointwise,
    /// The depthwise conv.
    Depthwise,
    /// Both convolutions; BatchNorms stay per layer.
    Both,
    /// The whole block, BatchNorms included.
    Block,
}

impl ConvMixerShare {
    /// Every granularity under the name a declaration uses (`share = pointwise`); the first is
    /// the default.
    pub const NAMES: &'static [(&'static str, Self)] = &[
        ("pointwise", Self::Pointwise),
        ("depthwise", Self::Depthwise),
        ("both", Self::Both),
        ("block", Self::Block),
    ];
    /// Whether the depthwise conv is shared.
    pub const fn depthwise(self) -> bool {
        matches!(self, Self::Depthwise | Self::Both | Self::Block)
    }
    /// Whether the pointwise conv is shared.
    pub const fn pointwise(self) -> bool {
        matches!(self, Self::Pointwise | Self::Both | Self::Block)
    }
    /// Whether the BatchNorms are shared.
    pub const fn norms(self) -> bool {
        matches!(self, Self::Block)
    }
    /// The name a declaration uses.
    pub fn name(self) -> &'static str {
        crate::family::name_of(Self::NAMES, self)
    }
}

/// What a ViT shares across the layers of a group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VitShare {
    /// qkv and proj.
    Attn,
    /// fc1 and fc2.
    Mlp,
    /// Attention and MLP, LayerNorms per layer: SPIN's choice.
    AttnMlp,
    /// Everything including the LayerNorms (ALBERT).
    All,
}

impl VitShare {
    /// Every granularity under the name a declaration uses (`share = attn_mlp`); the first is
    /// the default.
    pub const NAMES: &'static [(&'static str, Self)] = &[
        ("attn_mlp", Self::AttnMlp),
        ("attn", Self::Attn),
        ("mlp", Self::Mlp),
        ("all", Self::All),
    ];
    /// Whether qkv and proj are shared.
    pub const fn attn(self) -> bool {
        matches!(self, Self::Attn | Self::AttnMlp | Self::All)
    }
    /// Whether fc1 and fc2 are shared.
    pub const fn mlp(self) -> bool {
        matches!(self, Self::Mlp | Self::AttnMlp | Self::All)
    }
    /// Whether the LayerNorms are shared.
    pub const fn norms(self) -> bool {
        matches!(self, Self::All)
    }
    /// The name a declaration uses.
    pub fn name(self) -> &'static str {
        crate::family::name_of(Self::NAMES, self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_indices_follow_the_schedule() {
        let sched = [0, 1, 1, 0];
        assert_eq!(slot(true, &sched, 2), 1);
        assert_eq!(slot(false, &sched, 2), 2);
        assert_eq!(users(true, &sched, 0), [0, 3]);
        assert_eq!(users(false, &sched, 3), [3]);
        assert_eq!(count(true, 4, 2), 2);
        assert_eq!(count(false, 4, 2), 4);
        assert_eq!(VitShare::All.name(), "all");
        assert_eq!(
            crate::parse_name(ConvMixerShare::NAMES, "share", "both"),
            Ok(ConvMixerShare::Both)
        );
    }
}
