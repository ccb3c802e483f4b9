//! What every command shares on the terminal: progress bars and output errors.
use indicatif::{ProgressBar, ProgressStyle};
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
