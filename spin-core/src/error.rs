//! The one error type of spin-core: every fallible public function returns it.
use std::path::PathBuf;

/// What went wrong, in one line that names the file, key or argument at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid safetensors file: {reason}")]
    Safetensors { path: PathBuf, reason: String },
    #[error("{path}: tensor `{key}` is stored as {dtype}, expected F32, F16 or BF16")]
    Dtype {
        path: PathBuf,
        key: String,
        dtype: String,
    },
    #[error("{path}: missing tensor `{key}` (expected shape {expected:?})")]
    MissingKey {
        path: PathBuf,
        key: String,
        expected: Vec<usize>,
    },
    #[error("{path}: unexpected tensor `{key}` (shape {shape:?}); this model has no such parameter")]
    UnexpectedKey {
        path: PathBuf,
        key: String,
        shape: Vec<usize>,
    },
    #[error("{path}: tensor `{key}` has shape {found:?}, the model expects {expected:?}")]
    Shape {
        path: PathBuf,
        key: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{path}: `{first}` and `{other}` share one parameter in this model but differ in the file (max |diff| {max_diff:e})")]
    TiedDiffer {
        path: PathBuf,
        first: String,
        other: String,
        max_diff: f64,
    },
    #[error("{path}: tensor `{key}` holds {value}, which does not fit in {dtype}")]
    Overflow {
        path: PathBuf,
        key: String,
        value: f64,
        dtype: String,
    },
    #[error("{path}{}: {reason}", line.map(|l| format!(", line {l}")).unwrap_or_default())]
    Data {
        path: PathBuf,
        line: Option<usize>,
        reason: String,
    },
    #[error("{path}: cannot decode image: {reason}")]
    Image { path: PathBuf, reason: String },
    #[error("training diverged: the loss became {loss} at epoch {epoch}, step {step}")]
    Diverged { epoch: usize, step: usize, loss: f32 },
    #[error("{0}")]
    Rule(#[from] spin_rules::RuleError),
    #[error("{0}")]
    Invalid(String),
    #[error("device error: {0}")]
    Device(String),
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
