//! What a model is, for tables, the registry and the command line.

/// The two isotropic families spin knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    ConvMixer,
    Vit,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::ConvMixer => "convmixer",
            Family::Vit => "vit",
        }
    }
}

/// A model's description: everything `spin zoo` prints about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelInfo {
    pub name: &'static str,
    pub family: Family,
    /// Unique trainable parameters (each shared tensor once; BN running statistics excluded).
    pub params: usize,
    /// Multiply-accumulates per image at the declared size (torch.utils.flop_counter's FLOPs / 2).
    pub macs: u64,
    pub depth: usize,
    pub groups: usize,
    pub pattern: String,
    pub share: &'static str,
    pub schedule: Vec<usize>,
    pub dim: usize,
    pub image: usize,
    pub classes: usize,
    /// Parameters of the same model with nothing shared.
    pub unshared_params: usize,
    /// Values stored but not trained: BatchNorm running statistics (each stored copy once).
    pub buffers: usize,
    /// Bytes of the bit masks stored beside pruned tensors (FiPS's factors).
    pub mask_bytes: usize,
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

/// Implemented by every declared model type.
pub trait Describe {
    fn info() -> ModelInfo;
    /// FiPS compression of this model, for dense ViTs (`spin fips`).
    fn fips() -> Option<crate::fips::FipsRunner> {
        None
    }
}
