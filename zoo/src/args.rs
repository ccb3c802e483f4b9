//! The `spin` command's arguments (clap), with their help texts and parsers.
use crate::parsers::*;
use crate::report::Format;
use clap::{Args, Parser, Subcommand};
use spin_core::checkpoint::StorageDtype;
use spin_core::data::{Augment, DataSpec, Loader};
use spin_core::error::Error;
use spin_core::fips::SparseSchedule;
use spin_core::fusion::Reduction;
use spin_core::train::{Schedule, SimilarityKind, TrainConfig};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "spin",
    version,
    about = "Weight-shared isotropic vision networks: list, train, evaluate, compare"
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// List every zoo member with its parameters, MACs, sharing and size on disk.
    Zoo(ZooArgs),
    /// Train a member on digits, CIFAR-10 or a folder of images.
    Train(TrainArgs),
    /// Evaluate trained weights on the held-out split.
    Eval(EvalArgs),
    /// Classify image files (PNG or JPEG).
    Predict(PredictArgs),
    /// Train several members and plot accuracy against parameters and MACs.
    Compare(CompareArgs),
    /// Make a shared model from a trained unshared checkpoint by weight fusion.
    Fuse(FuseArgs),
    /// Re-estimate a checkpoint's BatchNorm statistics on calibration images (cumulative average).
    Recalibrate(RecalibrateArgs),
    /// Measure how alike a trained model's layers are (CKA of block outputs, cosine of block
    /// weights) and find the groupings that keep alike layers together.
    Analyze(AnalyzeArgs),
    /// Time a forward pass (or with --train a training step) after warm-up.
    Bench(BenchArgs),
    /// Convert a checkpoint (a PyTorch `.pth`/`.pt`/`.bin`/`.pyth` file, or safetensors) of a
    /// member into spin's safetensors, with the member's plan.
    Import(ImportArgs),
    /// Compress a trained ViT's MLPs with FiPS (shared SVD bases, sparse factors, block-wise
    /// reconstruction on calibration images).
    Fips(FipsArgs),
}

#[derive(Args, Debug)]
pub struct FipsArgs {
    /// The trained dense ViT's checkpoint (timm layout; safetensors or PyTorch).
    #[arg(long)]
    pub from: PathBuf,
    /// The dense ViT zoo member the checkpoint holds.
    #[arg(long)]
    pub model: String,
    /// Fraction of the MLP weights kept, in (0, 1] (sets the rank together with --sparsity).
    #[arg(long, default_value_t = 0.5, value_parser = budget)]
    pub budget: f64,
    /// Fraction of the sparse factors' entries pruned, in [0, 1).
    #[arg(long, default_value_t = 0.75, value_parser = fraction)]
    pub sparsity: f64,
    /// Calibration data, its training split (test accuracy is measured on its test split):
    /// `digits`, `cifar10:DIR` or `folder:DIR`.
    #[arg(long, default_value = "digits", value_parser = parse_data)]
    pub calib: DataSpec,
    /// How many calibration images to use (at least 1).
    #[arg(long, default_value_t = 256, value_parser = count)]
    pub calib_images: usize,
    /// Consecutive blocks per group (default: 4 if it divides the depth, else the largest of 3, 2, 1 that does).
    #[arg(long, value_parser = count)]
    pub group_size: Option<usize>,
    /// Explicit groups instead, e.g. `0,1,2,3;4,5,6,7;8,9,10,11`.
    #[arg(long, conflicts_with = "group_size")]
    pub groups: Option<String>,
    /// Block-wise reconstruction steps (AdamW, cosine decay; the sparsity is reached by the cubic
    /// schedule over the first half).
    #[arg(long, default_value_t = 300, value_parser = count)]
    pub steps: usize,
    /// Peak learning rate of the reconstruction (AdamW, cosine decay).
    #[arg(long, default_value_t = 1e-3, value_parser = learning_rate)]
    pub lr: f32,
    /// Token rows per block per step.
    #[arg(long, default_value_t = 256, value_parser = count)]
    pub rows: usize,
    /// How the factors reach the sparsity: gmp (cubic gradual magnitude pruning) or rigl
    /// (the sparsity at once, then prune-and-regrow every 10 steps until 75 % of the steps).
    #[arg(long, default_value = "gmp", value_parser = parse_sparse_schedule)]
    pub sparse_schedule: SparseSchedule,
    /// End-to-end fine-tuning epochs on the calibration data after reconstruction (0: none).
    #[arg(long, default_value_t = 0)]
    pub finetune_epochs: usize,
    /// Peak learning rate of the fine-tuning.
    #[arg(long, default_value_t = 2e-4, value_parser = learning_rate)]
    pub finetune_lr: f32,
    /// The FiPS checkpoint to write; a plot of the loss and per-block errors goes beside it (.png).
    #[arg(long)]
    pub out: PathBuf,
    /// Storage dtype of the written checkpoint: f32, f16, bf16 or f64.
    #[arg(long, default_value = "f32", value_parser = parse_dtype)]
    pub save_dtype: StorageDtype,
    /// Seeds the initialisation and the sampling of calibration rows.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// The checkpoint to read: `torch.save` output (state dict at the top or under model_state,
    /// state_dict, model or model_ema; timm's keys) or safetensors.
    #[arg(long)]
    pub from: PathBuf,
    /// The zoo member it holds.
    #[arg(long)]
    pub model: String,
    /// The safetensors file to write (timm layout, with the member's plan).
    #[arg(long)]
    pub out: PathBuf,
    /// The key names the file must use: auto (told from the keys), timm, or ml-spin (SPIN's
    /// reference code: `patch_embed.*`, `blocks.{i}.dwise_blk.*`, `pwise_w.{g}`, `head.fc.*`).
    #[arg(long, default_value = "auto", value_parser = ["auto", "timm", "ml-spin"])]
    pub layout: String,
    /// Storage dtype of the written checkpoint: f32, f16, bf16 or f64.
    #[arg(long, default_value = "f32", value_parser = parse_dtype)]
    pub save_dtype: StorageDtype,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// The zoo member to time (`spin zoo` lists them).
    #[arg(long, required_unless_present = "peak")]
    pub model: Option<String>,
    /// Measure the machine's FP32 FMA throughput (GFLOP/s on --threads threads) instead.
    #[arg(long, conflicts_with_all = ["model", "train", "weights"])]
    pub peak: bool,
    /// Images per forward pass or step (at least 1).
    #[arg(long, default_value_t = 1, value_parser = count)]
    pub batch: usize,
    /// Time these trained weights (e.g. a FiPS checkpoint, at its own rank) instead of a
    /// freshly initialised model.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Time a full training step (forward, cross-entropy, backward, AdamW) instead of a forward pass.
    #[arg(long)]
    pub train: bool,
    /// Timed iterations after warm-up (at least 1).
    #[arg(long, default_value_t = 20, value_parser = count)]
    pub iters: usize,
    /// Worker threads (default: one per core).
    #[arg(long, value_parser = count)]
    pub threads: Option<usize>,
    /// Compute dtype: f32, or f16 (forward only).
    #[arg(long, default_value = "f32", value_parser = ["f32", "f16"])]
    pub dtype: String,
    /// With --train: also the wall time of each op per step, forward and backward, the rest of
    /// each pass and the optimizer (where the step's time goes).
    #[arg(long, requires = "train")]
    pub profile: bool,
    /// Print one JSON object instead of a line of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct FuseArgs {
    /// The trained unshared checkpoint (timm layout; safetensors or PyTorch).
    #[arg(long)]
    pub from: PathBuf,
    /// The shared zoo member to make.
    #[arg(long)]
    pub model: String,
    /// mean, choose_first, scalar_weighted_mean or channel_weighted_mean (the weighted ones start
    /// from coefficients of one, i.e. the mean, until trained with `spin train --fusion`).
    #[arg(long, default_value = "mean", value_parser = parse_reduction)]
    pub reduction: Reduction,
    /// The shared checkpoint to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Storage dtype of the written checkpoint: f32, f16, bf16 or f64.
    #[arg(long, default_value = "f32", value_parser = parse_dtype)]
    pub save_dtype: StorageDtype,
    /// Calibration data (`digits`, `cifar10:DIR`, `folder:DIR`): the fused model's BatchNorm
    /// statistics are re-estimated on its training split, and its test accuracy is reported
    /// before and after.
    #[arg(long, value_parser = parse_data)]
    pub calib: Option<DataSpec>,
    #[command(flatten)]
    pub recal: Recalibration,
    /// With --calib: report the accuracies but keep the copied statistics.
    #[arg(long, requires = "calib")]
    pub no_recalibrate: bool,
    /// With --calib: refit the fused ConvMixer to --from on the calibration images for this many
    /// passes (closed-form least squares, no labels; the pass closest to --from is kept). 0: off.
    #[arg(long, default_value_t = 0, requires = "calib")]
    pub refit: usize,
    /// Check that --model is declared with the grouping `spin analyze` found: `auto` analyses
    /// --from on the --calib data now, a path reads the analysis.json it wrote.
    #[arg(long)]
    pub groups: Option<String>,
}

/// How many calibration images re-estimate BatchNorm statistics.
#[derive(Args, Debug, Clone)]
pub struct Recalibration {
    /// Calibration batches (at least 1).
    #[arg(long, default_value_t = 8, value_parser = count)]
    pub calib_batches: usize,
    /// Images per calibration batch (at least 2).
    #[arg(long, default_value_t = 64, value_parser = at_least_two)]
    pub calib_batch: usize,
}

#[derive(Args, Debug)]
pub struct RecalibrateArgs {
    /// The zoo member (default: the one the checkpoint's plan names).
    #[arg(long)]
    pub model: Option<String>,
    /// The checkpoint whose BatchNorm statistics to re-estimate (safetensors or PyTorch).
    #[arg(long)]
    pub weights: PathBuf,
    /// Calibration data; its training split is used, its test split scored before and after.
    #[arg(long, default_value = "digits", value_parser = parse_data)]
    pub data: DataSpec,
    #[command(flatten)]
    pub recal: Recalibration,
    /// The recalibrated checkpoint to write.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct AnalyzeArgs {
    /// The trained unshared checkpoint (safetensors or PyTorch).
    #[arg(long)]
    pub from: PathBuf,
    /// The unshared zoo member (default: the one the checkpoint's plan names).
    #[arg(long)]
    pub model: Option<String>,
    /// Calibration data; images are drawn from its training split, evenly across classes.
    #[arg(long, default_value = "digits", value_parser = parse_data)]
    pub data: DataSpec,
    /// Groups to assign the layers to (default: half the depth, share rate 2).
    #[arg(long, value_parser = count)]
    pub groups: Option<usize>,
    /// Calibration images for CKA (at least 2).
    #[arg(long, default_value_t = 256, value_parser = at_least_two)]
    pub images: usize,
    /// The similarity the groupings follow: cka (block outputs) or weights (block weights).
    #[arg(long, default_value = "cka", value_parser = parse_similarity)]
    pub by: SimilarityKind,
    /// Directory for analysis.json and the heatmaps (similarity.png, similarity.svg).
    #[arg(long, default_value = "analysis")]
    pub out: PathBuf,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Args, Debug)]
pub struct ZooArgs {
    /// Only members whose name contains this text, or matches it as a glob (`*`, `?`).
    pub filter: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
    /// Every column (the default table keeps to 100 columns).
    #[arg(long)]
    pub wide: bool,
}

/// Hyper-parameters shared by `train` and `compare`.
#[derive(Args, Debug, Clone)]
pub struct Hyper {
    /// Data: `digits` (built in), `cifar10:DIR` (the binary batches) or `folder:DIR` (ImageFolder:
    /// `DIR/train/<class>` and `DIR/val/<class>`, or one folder per class with a seeded 20 % held out).
    #[arg(long, default_value = "digits", value_parser = parse_data)]
    pub data: DataSpec,
    /// Fail on the first image that does not decode (default: skip it and say so).
    #[arg(long)]
    pub strict: bool,
    /// Epochs of the whole schedule (at least 1).
    #[arg(long, default_value_t = 10, value_parser = count)]
    pub epochs: usize,
    /// Images per step (at least 1).
    #[arg(long, default_value_t = 64, value_parser = count)]
    pub batch: usize,
    /// Peak learning rate (above 0).
    #[arg(long, default_value_t = 2e-3, value_parser = learning_rate)]
    pub lr: f32,
    /// The learning-rate curve after warm-up: onecycle (SPIN's: up to the peak at 40 %, down to
    /// 1/20 at 80 %, then to 0), cosine (from the peak to 0) or constant.
    #[arg(long, default_value = "onecycle", value_parser = parse_schedule)]
    pub schedule: Schedule,
    /// Epochs of linear warm-up to the peak before the schedule (0 or more, fewer than --epochs).
    #[arg(long, default_value_t = 0)]
    pub warmup_epochs: usize,
    /// Training augmentation: auto (crop-flip for cifar10 and folder data; none for digits, where a
    /// flip or a crop of the 8×8 image changes the digit), none, or crop-flip (random-resized-crop
    /// and horizontal flip).
    #[arg(long, default_value = "auto", value_parser = ["auto", "none", "crop-flip"])]
    pub augment: String,
    /// Random-resized-crop's smallest crop, as a fraction of the image's area, in (0, 1] (timm uses
    /// 0.08 for ImageNet at 224 px; small images lose too much at that).
    #[arg(long, default_value_t = 0.25, value_parser = budget)]
    pub crop_scale: f64,
    /// RandAugment: ops per training image (0: off; timm's `rand-m9-n2` is 2).
    #[arg(long, default_value_t = 0)]
    pub rand_ops: usize,
    /// RandAugment's magnitude, 0 to 10.
    #[arg(long, default_value_t = 9.0, value_parser = magnitude)]
    pub rand_magnitude: f64,
    /// Mixup's Beta(α, α) α (0: off; timm's recipes use 0.8).
    #[arg(long, default_value_t = 0.0, value_parser = non_negative)]
    pub mixup: f32,
    /// CutMix's Beta(α, α) α (0: off; timm's recipes use 1.0). With mixup too, each batch uses one.
    #[arg(long, default_value_t = 0.0, value_parser = non_negative)]
    pub cutmix: f32,
    /// Threads decoding and augmenting batches (at least 1; default: up to 4). Results do not
    /// depend on it.
    #[arg(long, value_parser = count)]
    pub workers: Option<usize>,
    /// AdamW's decoupled weight decay (0 or more; not applied to biases and norms).
    #[arg(long, default_value_t = 0.05, value_parser = non_negative)]
    pub weight_decay: f32,
    /// Label smoothing ε, in [0, 1).
    #[arg(long, default_value_t = 0.1, value_parser = fraction)]
    pub label_smoothing: f64,
    /// Clip the global gradient L2 norm to this value (0 turns clipping off).
    #[arg(long, default_value_t = 1.0, value_parser = non_negative)]
    pub clip: f32,
    /// Seeds the initialisation and the example order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl Hyper {
    /// The training settings these arguments give.
    pub fn config(&self) -> Result<TrainConfig, Error> {
        if self.warmup_epochs >= self.epochs && self.warmup_epochs > 0 {
            return Err(Error::Invalid(format!(
                "--warmup-epochs {} leaves no epoch of the schedule: use fewer than --epochs {}",
                self.warmup_epochs, self.epochs
            )));
        }
        let crop_flip = match self.augment.as_str() {
            "auto" => !matches!(self.data, DataSpec::Digits),
            other => other == "crop-flip",
        };
        let base = if crop_flip {
            Augment::crop_flip(self.crop_scale as f32)
        } else {
            Augment::none()
        };
        let augment = Augment {
            rand_ops: self.rand_ops,
            rand_magnitude: self.rand_magnitude as f32,
            mixup: self.mixup,
            cutmix: self.cutmix,
            ..base
        };
        let loader = match self.workers {
            Some(workers) => Loader {
                workers,
                ..Loader::default()
            },
            None => Loader::default(),
        };
        Ok(TrainConfig {
            epochs: self.epochs,
            batch: self.batch,
            lr: self.lr,
            schedule: self.schedule,
            warmup_epochs: self.warmup_epochs,
            augment,
            loader,
            weight_decay: self.weight_decay,
            label_smoothing: self.label_smoothing as f32,
            clip: (self.clip > 0.0).then_some(self.clip),
            seed: self.seed,
        })
    }
}

#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// The zoo member to train (`spin zoo` lists them); with --num-classes it may be left out.
    #[arg(long, required_unless_present = "num_classes")]
    pub model: Option<String>,
    #[command(flatten)]
    pub hyper: Hyper,
    /// Run directory (state.safetensors, checkpoint.safetensors, metrics.csv); default `runs/MODEL`.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue the run in --out from its last completed epoch (with the settings it was started
    /// with, unless --override).
    #[arg(long)]
    pub resume: bool,
    /// Resume with changed settings, or start over a directory that holds another member's run.
    #[arg(long = "override")]
    pub override_settings: bool,
    /// After training, print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Stop after this many epochs of the schedule (resume later with --resume): splits a run of
    /// --epochs into sessions without changing its learning-rate schedule.
    #[arg(long, value_parser = count)]
    pub stop_after: Option<usize>,
    /// Storage dtype of the saved checkpoint: f32, f16, bf16 or f64.
    #[arg(long, default_value = "f32", value_parser = parse_dtype)]
    pub save_dtype: StorageDtype,
    /// Start from this trained checkpoint: a shared model from an unshared one by weight fusion
    /// (mean unless --fusion says otherwise), or with --num-classes everything but the head.
    #[arg(long)]
    pub init_from: Option<PathBuf>,
    /// Fine-tune --init-from's model on data with this many classes (at least 1): every tensor but
    /// the head is loaded and a new head trains. The member trained is the zoo member with the
    /// checkpoint's architecture and N classes (or --model, which must be such a member).
    #[arg(long, requires = "init_from", conflicts_with = "fusion", value_parser = count)]
    pub num_classes: Option<usize>,
    /// Fusion-aware training (SPIN's WFWS) with this reduction: all D original tensors and the
    /// coefficients train, fused every step; checkpoints hold the exported shared model.
    #[arg(long, value_parser = parse_reduction)]
    pub fusion: Option<Reduction>,
    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// The zoo member the weights belong to (default: the one the checkpoint's plan names).
    #[arg(long)]
    pub model: Option<String>,
    /// The checkpoint (timm layout): safetensors, or a PyTorch file (`.pth`, `.pt`, `.bin`, `.pyth`).
    #[arg(long)]
    pub weights: PathBuf,
    /// Data: `digits`, `cifar10:DIR`, `folder:DIR` (its held-out split, `val/`, is scored) or
    /// `imagenet:DIR` (an ImageNet-1k validation folder, classes by WordNet id or index).
    #[arg(long, default_value = "digits", value_parser = parse_data)]
    pub data: DataSpec,
    /// Fail on the first image that does not decode (default: skip it and say so).
    #[arg(long)]
    pub strict: bool,
    /// Images per batch (at least 1).
    #[arg(long, default_value_t = 256, value_parser = count)]
    pub batch: usize,
    /// Also write the evaluated images, their labels and the logits to this safetensors file
    /// (with the model's plan), e.g. to check another implementation against spin.
    #[arg(long)]
    pub dump_logits: Option<PathBuf>,
    /// Print the result as one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct PredictArgs {
    /// The zoo member the weights belong to (default: the one the checkpoint's plan names).
    #[arg(long)]
    pub model: Option<String>,
    /// The checkpoint (timm layout): safetensors, or a PyTorch file (`.pth`, `.pt`, `.bin`, `.pyth`).
    #[arg(long)]
    pub weights: PathBuf,
    /// How many classes to print per image (at least 1).
    #[arg(long, default_value_t = 3, value_parser = count)]
    pub top: usize,
    /// Print one JSON object per image (image, classes, names, probabilities) instead of text.
    #[arg(long)]
    pub json: bool,
    /// Image files, or directories whose image files are all classified (sorted by name); each
    /// goes through the member's eval transform (resize the short side, centre-crop, normalise).
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
}

#[derive(Args, Debug)]
pub struct CompareArgs {
    /// Comma-separated members; default: the digits members, shared against unshared.
    #[arg(long, value_delimiter = ',')]
    pub models: Vec<String>,
    #[command(flatten)]
    pub hyper: Hyper,
    /// Where the table (CSV), the plot (PNG and SVG) and each run go.
    #[arg(long, default_value = "runs/compare")]
    pub out: PathBuf,
    /// Hide the progress bars.
    #[arg(long)]
    pub quiet: bool,
}
