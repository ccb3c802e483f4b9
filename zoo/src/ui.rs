//! What every command shares on the terminal: progress bars and output errors.
use indicatif::{ProgressBar, ProgressStyle};
use spin_core::data::{self, DataConfig, DataSpec, Split};
use spin_core::models::ModelInfo;
use spin_core::Error;

/// An error writing the command's output (to stdout, or whatever it is piped into).
pub fn io(e: std::io::Error) -> Error {
    Error::io("<output>", e)
}

/// A progress bar of `steps` steps with its remaining time (hidden when `quiet`).
pub fn progress(steps: usize, prefix: String, quiet: bool) -> ProgressBar {
    let pb = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(steps as u64)
    };
    let style = ProgressStyle::with_template("{prefix:>28} [{bar:24}] {pos:>3}/{len} ETA {eta:>4} {msg}")
        .expect("a constant, valid template")
        .progress_chars("=> ");
    pb.set_style(style);
    pb.set_prefix(prefix);
    pb
}

/// A data set for a member: read with its eval transform, skipped files reported on stderr (one
/// line), and its classes checked against the member's head — more classes than outputs is an
/// error, fewer is said once.
pub fn load_data(spec: &DataSpec, info: &ModelInfo, strict: bool) -> Result<Split, Error> {
    let split = data::load_with(spec, &DataConfig::for_model(info), strict)?;
    if let Some((first, why)) = split.skipped.first() {
        eprintln!(
            "spin: warning: skipped {} file(s) of {spec} (first: {}: {why}); --strict makes this an error",
            split.skipped.len(),
            first.display()
        );
    }
    let classes = split.train.classes;
    if classes > info.classes {
        return Err(Error::Invalid(format!(
            "{} has {} classes but {} has {classes}: declare a member with {classes} classes",
            info.name, info.classes, spec
        )));
    }
    if classes < info.classes {
        eprintln!(
            "spin: warning: {spec} has {classes} classes, {} has {} outputs; outputs {classes}..{} are never a target",
            info.name,
            info.classes,
            info.classes - 1
        );
    }
    Ok(split)
}

/// Says on stderr, in one line, which files failed to decode while batches were made.
pub fn warn_skipped(sets: &[&data::Dataset]) {
    // Subsets of one folder share their record: count each file once.
    let skipped: std::collections::BTreeMap<_, _> = sets.iter().flat_map(|s| s.skipped()).collect();
    if let Some((first, why)) = skipped.iter().next() {
        eprintln!(
            "spin: warning: {} file(s) did not decode and were left out (first: {}: {why}); --strict makes this an error",
            skipped.len(),
            first.display()
        );
    }
}

/// Refuses a data set with no training images (`imagenet:DIR` is a validation set).
pub fn need_training_images(split: &Split, spec: &DataSpec) -> Result<(), Error> {
    if split.train.is_empty() {
        return Err(Error::Invalid(format!(
            "{spec} has no training images (imagenet:DIR is for `spin eval`; train on folder:DIR)"
        )));
    }
    Ok(())
}
