//! The whole FiPS pipeline `spin fips` runs: load a trained ViT, calibrate, initialise by SVD,
//! reconstruct block-wise.
use super::plan::FipsPlan;
use super::reconstruct::{block_errors, calibrate, reconstruct, ReconConfig};
use crate::checkpoint::TimmCheckpoint;
use crate::error::Error;
use crate::models::fips_mlps::FipsMlps;
use crate::models::vit::{Vit, VitConfig};
use crate::train::{Classifier, Runner};
use dfdx::prelude::*;
use std::path::Path;

/// What `spin fips` asks for.
#[derive(Clone, Debug)]
pub struct FipsJob<'a> {
    /// The trained (dense) ViT's timm checkpoint.
    pub checkpoint: &'a Path,
    /// Explicit groups, or consecutive groups of `group_size` blocks.
    pub groups: Option<Vec<Vec<usize>>>,
    /// Blocks per group when `groups` is not given.
    pub group_size: usize,
    /// Fraction of the MLP weights kept.
    pub budget: f64,
    /// Fraction of the factors' entries pruned.
    pub sparsity: f64,
    /// Calibration images, NCHW at the model's size, preprocessed.
    pub calib: &'a [f32],
    /// How many images `calib` holds.
    pub calib_n: usize,
    /// The reconstruction's hyper-parameters.
    pub recon: ReconConfig,
}

/// What the pipeline measured.
#[derive(Clone, Debug)]
pub struct FipsReport {
    /// The plan carried out.
    pub plan: FipsPlan,
    /// MLP parameters of the original model and of the FiPS model (each U once, V non-zeros,
    /// biases).
    pub dense_mlp_params: usize,
    /// MLP parameters of the FiPS model.
    pub fips_mlp_params: usize,
    /// Per-block MSE after SVD initialisation and one-shot pruning to the target sparsity, and
    /// after block-wise reconstruction.
    pub init_errors: Vec<f64>,
    /// Per-block MSE after reconstruction.
    pub final_errors: Vec<f64>,
    /// The reconstruction loss (Σ_blocks MSE) at every step.
    pub losses: Vec<f32>,
    /// The factors' sparsity reached.
    pub sparsity: f64,
    /// Token rows per block the calibration produced.
    pub calib_rows: usize,
}

/// The compressed models (one-shot initialisation and the optimised one) and the report.
pub struct FipsOutcome {
    /// The one-shot model: SVD initialisation pruned to the target at once.
    pub init: Box<dyn Classifier>,
    /// The reconstructed model.
    pub model: Box<dyn Classifier>,
    /// What was measured.
    pub report: FipsReport,
}

/// The pipeline for one declared ViT type; the zoo holds one per dense ViT member.
pub type FipsRunner = fn(&FipsJob<'_>, &mut dyn FnMut(usize, f32)) -> Result<FipsOutcome, Error>;

/// Loads the dense model, calibrates, initialises, reconstructs; see the module docs.
pub fn run<C: VitConfig>(
    job: &FipsJob<'_>,
    progress: &mut dyn FnMut(usize, f32),
) -> Result<FipsOutcome, Error> {
    if C::FIPS.is_some() {
        return Err(Error::Invalid(format!(
            "{} is already a FiPS model: compress its dense ViT instead",
            C::NAME
        )));
    }
    let dev = Cpu::seed_from_u64(job.recon.seed);
    let mut dense = Vit::<C, f32, Cpu>::build(&dev);
    dense.load_timm(job.checkpoint)?;
    let groups = match &job.groups {
        Some(g) => g.clone(),
        None => FipsPlan::consecutive(C::DEPTH, job.group_size)?,
    };
    let plan = FipsPlan::new(C::DEPTH, C::Dim::SIZE, groups, job.budget, job.sparsity)?;
    let img = C::Image::SIZE;
    if job.calib.len() != job.calib_n * 3 * img * img || job.calib_n == 0 {
        return Err(Error::Invalid(format!(
            "FiPS needs calibration images of 3×{img}×{img}; got {} values for {} images",
            job.calib.len(),
            job.calib_n
        )));
    }
    let calib = calibrate(&dense, job.calib, job.calib_n, 16);
    let mut mlps = FipsMlps::from_dense(&dense.mlp, &plan)?;
    let mut init = mlps.clone();
    init.prune_to(plan.sparsity);
    let init_errors = block_errors(&init, &calib);
    let losses = reconstruct(&mut mlps, &calib, plan.sparsity, &job.recon, progress)?;
    let final_errors = block_errors(&mlps, &calib);
    let report = FipsReport {
        dense_mlp_params: C::DEPTH * spin_rules::counts::mlp_params(C::Dim::SIZE, C::Hidden::SIZE),
        fips_mlp_params: mlps.params(),
        sparsity: mlps.sparsity(),
        plan,
        init_errors,
        final_errors,
        losses,
        calib_rows: calib.rows,
    };
    let init = dense.clone().with_mlps(init);
    let model = dense.with_mlps(mlps);
    Ok(FipsOutcome {
        init: Box::new(Runner::new(init, dev.clone())),
        model: Box::new(Runner::new(model, dev)),
        report,
    })
}

/// What FiPS can do with a declared model type; declarations implement it (the zoo's registry
/// reads it).
pub trait FipsCompress {
    /// The pipeline, for a dense ViT.
    const RUNNER: Option<FipsRunner>;
    /// The loader of FiPS checkpoints of this ViT at any rank, for ViTs.
    const LOADER: Option<super::load::FipsLoader>;
}
