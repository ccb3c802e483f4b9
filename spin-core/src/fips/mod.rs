//! FiPS (fine-grained parameter sharing of a ViT's MLPs).
//!
//! Within a group of n blocks, every fc1ᵀ and fc2 matrix (d × h, h = 4d) is written as U·V_l: one
//! dense basis U (d × r) shared by the group and a sparse factor V_l (r × h) per matrix, so fc1's
//! weight is (U·V_l)ᵀ and fc2's is U·V_m. Biases stay per layer.
//!
//! - the rank from a parameter budget and the parameter counts are spin-rules' (`spin_rules::fips`,
//!   re-exported here), shared with the `#[fips]` macro;
//! - [`factors`]: the SVD initialisation, global magnitude masks and the cubic sparsity schedule,
//!   on plain `f64` matrices;
//! - [`plan`]: a plan chosen at run time, and FiPS MLPs made from a dense ViT's by it; the MLP
//!   storage itself is [`crate::models::fips_mlps::FipsMlps`];
//! - [`mod@reconstruct`]: block-wise reconstruction; [`pipeline`]: the whole of `spin fips`.
pub mod factors;
pub mod load;
pub mod pipeline;
pub mod plan;
pub mod reconstruct;

pub use crate::models::fips_mlps::{FipsDecl, FipsLayer, FipsMlps, MadeDim};
pub use factors::{apply_masks, cubic_sparsity, init, magnitude_masks, rigl_fraction, rigl_update, Factors};
pub use load::{is_fips_checkpoint, FipsLoader};
pub use pipeline::{run, FipsCompress, FipsJob, FipsOutcome, FipsReport, FipsRunner};
pub use plan::FipsPlan;
pub use reconstruct::{block_errors, calibrate, reconstruct, Calibration, ReconConfig, SparseSchedule};
pub use spin_rules::fips::{group_params, kept, mlp_params, rank, MATRICES_PER_BLOCK};
