//! A training run with files: everything `spin train` does besides parsing its arguments.
//!
//! A run directory holds
//! - `state.safetensors`: the resumable state as one unit — the training-time model's tensors
//!   (`model.<key>`), the optimiser's moments (`adamw.…`), and in its metadata the member, the
//!   epochs done and the metrics so far. It is written atomically (temporary file, fsync,
//!   rename), so a crash at any moment leaves either the previous epoch's state or this one's,
//!   never a model of one epoch beside an optimiser of another;
//! - `checkpoint.safetensors`: the deployable model (timm layout), written after the state;
//! - `best.safetensors`: the deployable model of the epoch with the best test accuracy so far,
//!   written after the checkpoint when an epoch beats every earlier one (a crash just before can
//!   leave it one epoch behind the state's metrics);
//! - `metrics.csv`: one row per epoch, rewritten from the state's metrics after each epoch.
//!
//! `--resume` reads only the state; the other two are outputs, remade from it.
use super::classifier::Classifier;
use super::fit::{evaluate_with, steps_per_epoch, train_epoch, PassStats, TrainConfig};
use super::optim::AdamW;
use crate::checkpoint::{read_file, write_atomic, write_file, StorageDtype, TensorMap};
use crate::data::Dataset;
use crate::error::Error;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The resumable state's file name in a run directory.
pub const STATE_FILE: &str = "state.safetensors";
/// The deployable checkpoint's file name in a run directory.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
/// The file name of the deployable model of the epoch with the best test accuracy so far.
pub const BEST_FILE: &str = "best.safetensors";
/// The per-epoch metrics' file name in a run directory.
pub const METRICS_FILE: &str = "metrics.csv";
/// The header of `metrics.csv`.
pub const METRICS_HEADER: &str =
    "epoch,lr_peak,train_loss,train_accuracy,test_loss,test_accuracy,seconds,images_per_s";

/// Where a run keeps its files and how far it goes this time.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// The run directory (made if missing).
    pub dir: PathBuf,
    /// Continue from the directory's state instead of starting over.
    pub resume: bool,
    /// Stop after this many epochs of the schedule (resume later): splits a run into sessions
    /// without changing its learning-rate schedule.
    pub stop_after: Option<usize>,
    /// Storage dtype of the deployable checkpoint.
    pub save_dtype: StorageDtype,
    /// Images per evaluation batch.
    pub eval_batch: usize,
    /// What else the run depends on, by name (the data set, …), recorded with the run: resuming
    /// with different values, or with another [`TrainConfig`], is refused unless `override_settings`.
    pub settings: Vec<(String, String)>,
    /// Resume even if the settings changed, and start over a directory that holds another
    /// member's run.
    pub override_settings: bool,
}

impl RunOptions {
    /// Options for a run in `dir` with the defaults: a fresh run, to the end, f32 checkpoints.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            resume: false,
            stop_after: None,
            save_dtype: StorageDtype::F32,
            eval_batch: 256,
            settings: Vec::new(),
            override_settings: false,
        }
    }
}

/// Every setting a run is recorded with: the training config's and the caller's.
fn settings(cfg: &TrainConfig, extra: &[(String, String)]) -> BTreeMap<String, String> {
    let mut s = BTreeMap::from([
        ("epochs".to_string(), cfg.epochs.to_string()),
        ("batch".to_string(), cfg.batch.to_string()),
        ("lr".to_string(), cfg.lr.to_string()),
        ("schedule".to_string(), cfg.schedule.to_string()),
        ("warmup-epochs".to_string(), cfg.warmup_epochs.to_string()),
        ("augment".to_string(), cfg.augment.describe()),
        ("weight-decay".to_string(), cfg.weight_decay.to_string()),
        ("label-smoothing".to_string(), cfg.label_smoothing.to_string()),
        ("clip".to_string(), cfg.clip.map_or("0".into(), |c| c.to_string())),
        ("seed".to_string(), cfg.seed.to_string()),
    ]);
    s.extend(extra.iter().cloned());
    s
}

/// One finished epoch, as `metrics.csv` records it.
#[derive(Clone, Debug, PartialEq)]
pub struct EpochRecord {
    /// 1-based epoch number.
    pub epoch: usize,
    /// Peak learning rate of the schedule.
    pub lr_peak: f32,
    /// Training loss and accuracy over the epoch.
    pub train: PassStats,
    /// Loss and accuracy on the test split after the epoch.
    pub test: PassStats,
    /// Seconds the epoch's training took.
    pub seconds: f64,
}

impl EpochRecord {
    fn csv(&self) -> String {
        format!(
            "{},{},{:.6},{:.6},{:.6},{:.6},{:.3},{:.1}",
            self.epoch,
            self.lr_peak,
            self.train.loss,
            self.train.accuracy,
            self.test.loss,
            self.test.accuracy,
            self.seconds,
            self.images_per_s()
        )
    }

    /// Training throughput.
    pub fn images_per_s(&self) -> f64 {
        self.train.images as f64 / self.seconds.max(1e-9)
    }
}

/// What a run reports as it goes. An error returned from the observer stops the run: at once, or
/// for [`Event::Step`] at the end of that epoch, before anything of it is written.
#[derive(Debug)]
pub enum Event<'a> {
    /// Test loss and accuracy before the first epoch of a fresh run.
    Initial(PassStats),
    /// An epoch starts (0-based) with this many steps.
    EpochStart {
        /// The epoch, 0-based.
        epoch: usize,
        /// Steps it will take.
        steps: usize,
    },
    /// A step finished: running loss and accuracy over the epoch so far.
    Step {
        /// Steps done in this epoch.
        step: usize,
        /// Mean loss so far.
        loss: f32,
        /// Accuracy so far.
        accuracy: f32,
    },
    /// The state of this epoch is committed; the checkpoint and metrics are not written yet.
    Committed {
        /// Epochs done.
        epochs_done: usize,
    },
    /// An epoch finished and every file of it is written.
    Epoch(&'a EpochRecord),
}

/// What a finished (or paused) run reports.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TrainResult {
    /// The member trained.
    pub name: String,
    /// Its unique parameters.
    pub params: usize,
    /// Its multiply-accumulates per image.
    pub macs: u64,
    /// Test accuracy and loss at the end.
    pub test_accuracy: f32,
    /// Test loss at the end.
    pub test_loss: f32,
    /// Test accuracy before the first epoch (absent when resuming).
    pub initial_accuracy: Option<f32>,
    /// Wall-clock seconds of this session.
    pub seconds: f64,
    /// Epochs run in this session.
    pub epochs_run: usize,
}

/// A run's resumable state: what `state.safetensors` holds.
#[derive(Clone, Debug)]
pub struct RunState {
    /// The member the state belongs to.
    pub model: String,
    /// Epochs completed.
    pub epochs_done: usize,
    /// The optimiser.
    pub optimizer: AdamW,
    /// The training-time model's tensors by checkpoint key.
    pub tensors: TensorMap,
    /// `metrics.csv`'s rows so far, without the header.
    pub metrics: Vec<String>,
    /// The settings the run was started with (see [`RunOptions::settings`]).
    pub settings: BTreeMap<String, String>,
}

impl RunState {
    /// Reads the state of the run in `dir`.
    pub fn load(dir: &Path) -> Result<Self, Error> {
        let path = dir.join(STATE_FILE);
        if !path.exists() {
            return Err(Error::Invalid(format!(
                "{}: no run to resume here (no {STATE_FILE}); start one without --resume",
                dir.display()
            )));
        }
        let (tensors, meta) = read_file(&path)?;
        let bad = |reason: &str| Error::Safetensors {
            path: path.clone(),
            reason: reason.into(),
        };
        let model = meta
            .get("spin.model")
            .ok_or_else(|| bad("missing metadata `spin.model`"))?;
        let epochs_done = meta
            .get("spin.epochs_done")
            .and_then(|e| e.parse().ok())
            .ok_or_else(|| bad("missing or bad metadata `spin.epochs_done`"))?;
        let optimizer = AdamW::from_tensors(&path, &tensors, &meta)?;
        let metrics = meta
            .get("spin.metrics")
            .map(|m| m.lines().map(str::to_string).collect())
            .unwrap_or_default();
        let tensors = tensors
            .into_iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("model.")?.to_string(), v)))
            .collect();
        let settings = meta
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("spin.setting.")?.to_string(), v.clone())))
            .collect();
        Ok(Self {
            model: model.clone(),
            epochs_done,
            optimizer,
            tensors,
            metrics,
            settings,
        })
    }

    /// Writes the state into `dir` as one file, atomically.
    pub fn save(&self, dir: &Path) -> Result<(), Error> {
        let (mut tensors, mut meta) = self.optimizer.to_tensors();
        for (k, v) in &self.tensors {
            tensors.insert(format!("model.{k}"), v.clone());
        }
        meta.extend([
            ("spin.model".to_string(), self.model.clone()),
            ("spin.epochs_done".to_string(), self.epochs_done.to_string()),
            ("spin.metrics".to_string(), self.metrics.join("\n")),
        ]);
        meta.extend(
            self.settings
                .iter()
                .map(|(k, v)| (format!("spin.setting.{k}"), v.clone())),
        );
        // F32: the training model and the optimiser are f32, so the state restores bit for bit.
        write_file(&dir.join(STATE_FILE), &tensors, StorageDtype::F32, &meta)
    }
}

/// Trains `model` on `train`, evaluating on `test` after every epoch, with the run directory's
/// files as the module docs describe. A non-finite loss stops the run with
/// [`Error::Diverged`]'s message and the last good files left in place.
pub fn run(
    model: &mut dyn Classifier,
    train: &Dataset,
    test: &Dataset,
    cfg: &TrainConfig,
    opts: &RunOptions,
    observe: &mut dyn FnMut(Event<'_>) -> Result<(), Error>,
) -> Result<TrainResult, Error> {
    let _buffers = crate::kernels::reuse::ReleaseOnDrop;
    let info = model.info();
    let dir = &opts.dir;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let t0 = Instant::now();
    let wanted = settings(cfg, &opts.settings);
    // A state that cannot be read matters only to a resume; a fresh run replaces it.
    let existing = match dir.join(STATE_FILE).exists() {
        false => None,
        true if opts.resume => Some(RunState::load(dir)?),
        true => RunState::load(dir).ok(),
    };
    let mut state = match existing {
        Some(state) if state.model != info.name && !opts.override_settings => {
            return Err(Error::Invalid(format!(
                "{}: the run there trains {}, not {}; choose another directory (or --override to start over)",
                dir.display(),
                state.model,
                info.name
            )))
        }
        Some(mut state) if opts.resume => {
            if let Some((k, old)) = state.settings.iter().find(|(k, v)| wanted.get(*k) != Some(*v)) {
                if !opts.override_settings {
                    let new = wanted.get(k).map_or("nothing", String::as_str);
                    return Err(Error::Invalid(format!(
                        "{}: the run was started with --{k} {old}, not {new}; resume with the same \
                         settings, or pass --override to continue with the new ones",
                        dir.display()
                    )));
                }
            }
            model.load_state_tensors(&dir.join(STATE_FILE), &state.tensors)?;
            state.settings = wanted;
            state
        }
        None if opts.resume => {
            return Err(Error::Invalid(format!(
                "{}: no run to resume here (no {STATE_FILE}); start one without --resume",
                dir.display()
            )))
        }
        _ => RunState {
            model: info.name.to_string(),
            epochs_done: 0,
            optimizer: AdamW::new(cfg.weight_decay),
            tensors: TensorMap::new(),
            metrics: Vec::new(),
            settings: wanted,
        },
    };
    let start = state.epochs_done;
    let mut initial = None;
    let mut last = PassStats::default();
    if start == 0 {
        last = evaluate_with(model, test, opts.eval_batch, &cfg.loader, &mut |_| {})?;
        initial = Some(last.accuracy);
        observe(Event::Initial(last))?;
    }
    let end = opts.stop_after.unwrap_or(cfg.epochs).min(cfg.epochs);
    let checkpoint = dir.join(CHECKPOINT_FILE);
    for epoch in start..end {
        let steps = steps_per_epoch(train.len(), cfg.batch);
        observe(Event::EpochStart { epoch, steps })?;
        let te = Instant::now();
        let mut step_error = None;
        let stats = train_epoch(
            model,
            &mut state.optimizer,
            train,
            cfg,
            epoch,
            &mut |step, loss, accuracy| {
                if let Err(e) = observe(Event::Step { step, loss, accuracy }) {
                    step_error.get_or_insert(e);
                }
            },
        );
        if let Some(e) = step_error {
            return Err(e);
        }
        let stats = match stats {
            Ok(s) => s,
            Err(e @ Error::Diverged { .. }) => {
                let kept = if checkpoint.exists() {
                    format!("the last good checkpoint is {}", checkpoint.display())
                } else {
                    "no epoch finished, so no checkpoint was written".into()
                };
                return Err(Error::Invalid(format!("{e}; stopped, {kept}")));
            }
            Err(e) => return Err(e),
        };
        let seconds = te.elapsed().as_secs_f64();
        last = evaluate_with(model, test, opts.eval_batch, &cfg.loader, &mut |_| {})?;
        let record = EpochRecord {
            epoch: epoch + 1,
            lr_peak: cfg.lr,
            train: stats,
            test: last,
            seconds,
        };
        let best_before = best_accuracy(&state.metrics);
        state.epochs_done = epoch + 1;
        state.tensors = model.state_tensors();
        state.metrics.push(record.csv());
        state.save(dir)?;
        observe(Event::Committed {
            epochs_done: state.epochs_done,
        })?;
        model.save_timm(&checkpoint, opts.save_dtype)?;
        // Compared as recorded (six decimals), so a tie in the metrics is a tie here.
        let accuracy = best_accuracy(&[record.csv()]);
        if best_before.is_none_or(|b| accuracy > Some(b)) {
            model.save_timm(&dir.join(BEST_FILE), opts.save_dtype)?;
        }
        let metrics = format!("{METRICS_HEADER}\n{}\n", state.metrics.join("\n"));
        write_atomic(&dir.join(METRICS_FILE), metrics.as_bytes())?;
        observe(Event::Epoch(&record))?;
    }
    if start >= end {
        last = evaluate_with(model, test, opts.eval_batch, &cfg.loader, &mut |_| {})?;
    }
    Ok(TrainResult {
        name: info.name.to_string(),
        params: info.params,
        macs: info.macs,
        test_accuracy: last.accuracy,
        test_loss: last.loss,
        initial_accuracy: initial,
        seconds: t0.elapsed().as_secs_f64(),
        epochs_run: end.saturating_sub(start),
    })
}

/// The best test accuracy among `metrics.csv` rows (its sixth column).
fn best_accuracy(rows: &[String]) -> Option<f32> {
    rows.iter()
        .filter_map(|r| r.split(',').nth(5)?.parse::<f32>().ok())
        .reduce(f32::max)
}

/// Trains for `epochs` epochs without files (fine-tuning inside a larger job, e.g. after FiPS's
/// reconstruction), with a fresh optimiser; returns the test statistics after each epoch.
pub fn fine_tune(
    model: &mut dyn Classifier,
    train: &Dataset,
    test: &Dataset,
    cfg: &TrainConfig,
    observe: &mut dyn FnMut(Event<'_>) -> Result<(), Error>,
) -> Result<Vec<PassStats>, Error> {
    let _buffers = crate::kernels::reuse::ReleaseOnDrop;
    let mut opt = AdamW::new(cfg.weight_decay);
    let mut out = Vec::with_capacity(cfg.epochs);
    for epoch in 0..cfg.epochs {
        observe(Event::EpochStart {
            epoch,
            steps: steps_per_epoch(train.len(), cfg.batch),
        })?;
        train_epoch(model, &mut opt, train, cfg, epoch, &mut |step, loss, accuracy| {
            let _ = observe(Event::Step { step, loss, accuracy });
        })?;
        out.push(evaluate_with(model, test, cfg.batch, &cfg.loader, &mut |_| {})?);
    }
    Ok(out)
}
