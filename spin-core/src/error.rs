//! The one error type of spin-core: every fallible public function returns it.
use std::path::PathBuf;

/// What went wrong, in one line that names the file, key or argument at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// A file is not valid safetensors.
    #[error("{path}: not a valid safetensors file: {reason}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
    /// A tensor is stored in a dtype spin does not read.
    #[error("{path}: tensor `{key}` is stored as {dtype}, expected F32, F16 or BF16")]
    Dtype {
        /// The file.
        path: PathBuf,
        /// The tensor's key.
        key: String,
        /// The dtype found.
        dtype: String,
    },
    /// A tensor the model needs is not in the file.
    #[error("{path}: missing tensor `{key}` (expected shape {expected:?})")]
    MissingKey {
        /// The file.
        path: PathBuf,
        /// The missing key.
        key: String,
        /// The shape the model expects.
        expected: Vec<usize>,
    },
    /// The file holds a tensor the model has no place for.
    #[error("{path}: unexpected tensor `{key}` (shape {shape:?}); this model has no such parameter")]
    UnexpectedKey {
        /// The file.
        path: PathBuf,
        /// The unexpected key.
        key: String,
        /// Its shape.
        shape: Vec<usize>,
    },
    /// A tensor's shape differs from the model's.
    #[error("{path}: tensor `{key}` has shape {found:?}, the model expects {expected:?}")]
    Shape {
        /// The file.
        path: PathBuf,
        /// The tensor's key.
        key: String,
        /// The model's shape.
        expected: Vec<usize>,
        /// The file's shape.
        found: Vec<usize>,
    },
    /// Two keys the model stores as one shared tensor hold different values.
    #[error("{path}: `{first}` and `{other}` share one parameter in this model but differ in the file (max |diff| {max_diff:e})")]
    TiedDiffer {
        /// The file.
        path: PathBuf,
        /// The first key of the shared tensor.
        first: String,
        /// A key whose values differ from it.
        other: String,
        /// The largest absolute difference.
        max_diff: f64,
    },
    /// A value does not fit the storage dtype asked for.
    #[error("{path}: tensor `{key}` holds {value}, which does not fit in {dtype}")]
    Overflow {
        /// The file being written.
        path: PathBuf,
        /// The tensor's key.
        key: String,
        /// The value that does not fit.
        value: f64,
        /// The storage dtype.
        dtype: String,
    },
    /// A data file is malformed.
    #[error("{path}{}: {reason}", line.map(|l| format!(", line {l}")).unwrap_or_default())]
    Data {
        /// The file.
        path: PathBuf,
        /// The line at fault, for text formats.
        line: Option<usize>,
        /// What is wrong.
        reason: String,
    },
    /// An image file cannot be decoded.
    #[error("{path}: cannot decode image: {reason}")]
    Image {
        /// The file.
        path: PathBuf,
        /// What the decoder said.
        reason: String,
    },
    /// The training loss became NaN or infinite.
    #[error("training diverged: the loss became {loss} at epoch {epoch}, step {step}")]
    Diverged {
        /// The epoch, 0-based.
        epoch: usize,
        /// The step within it.
        step: usize,
        /// The loss.
        loss: f32,
    },
    /// A model rule is broken (schedule, FiPS plan).
    #[error("{0}")]
    Rule(#[from] spin_rules::RuleError),
    /// An argument or a combination of them is not valid; the message says what would be.
    #[error("{0}")]
    Invalid(String),
    /// The device failed.
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
