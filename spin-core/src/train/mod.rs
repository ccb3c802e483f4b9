//! Training and evaluation on the CPU as a library: AdamW with decoupled weight decay, SPIN's
//! one-cycle, cosine or constant learning rate with warm-up, label smoothing, clipping by global L2 norm ([`optim`], [`schedule`], [`fit`]); an
//! object-safe [`Classifier`] so a model chosen by name at run time can be trained
//! ([`classifier`]); and whole runs with checkpoints, metrics, resume and a stop on divergence
//! ([`mod@run`]), which `spin train` only calls.
pub mod analyze;
pub mod classifier;
pub mod fit;
pub mod optim;
pub mod recalibrate;
pub mod refit;
pub mod run;
pub mod schedule;

pub use analyze::{analyze, Analysis, Grouping, SimilarityKind};
pub use classifier::{
    count_correct, load_all_but_head, mixed_targets, smooth_targets, Classifier, Runner, StepParams,
    StepStats,
};
pub use fit::{epoch_order, evaluate, evaluate_with, steps_per_epoch, train_epoch, PassStats, TrainConfig};
pub use optim::AdamW;
pub use recalibrate::recalibrate_bn;
pub use refit::refit_fused;
pub use run::{fine_tune, run, EpochRecord, Event, RunOptions, RunState, TrainResult};
pub use schedule::{LrSchedule, OneCycle, Schedule};
