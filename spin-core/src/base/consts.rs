//! Numeric constants shared by the kernels and the layers.

/// BatchNorm epsilon, as PyTorch's default.
pub const BN_EPS: f64 = 1e-5;
/// BatchNorm running-statistics momentum, as PyTorch's default.
pub const BN_MOMENTUM: f64 = 0.1;
/// LayerNorm epsilon, as timm's ViT.
pub const LN_EPS: f64 = 1e-6;
/// f32 values in one AVX-512 register: the width kernels block their loops by, so that one
/// block of independent accumulators fills a vector register.
pub const F32_LANES: usize = 16;
