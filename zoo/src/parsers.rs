//! The value parsers of `spin`'s options: each refuses what makes no sense in one line that
//! clap prefixes with the option's name.
use spin_core::checkpoint::StorageDtype;
use spin_core::data::DataSpec;
use spin_core::error::Error;
use spin_core::fips::SparseSchedule;
use spin_core::fusion::Reduction;
use spin_core::train::{Schedule, SimilarityKind};

/// A count of at least one (epochs, batch, steps, …).
pub(crate) fn count(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("`{s}` is not a whole number")),
    }
}

/// A finite number in `range`, described by `what` in the error.
pub(crate) fn number_in(s: &str, range: impl std::ops::RangeBounds<f64>, what: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("`{s}` is not a number"))?;
    if v.is_finite() && range.contains(&v) {
        Ok(v)
    } else {
        Err(format!("must be {what}, got {s}"))
    }
}

/// A learning rate: finite and above zero.
pub(crate) fn learning_rate(s: &str) -> Result<f32, String> {
    number_in(
        s,
        (std::ops::Bound::Excluded(0.0), std::ops::Bound::Unbounded),
        "above 0",
    )
    .map(|v| v as f32)
}

/// Zero or more, finite (weight decay, clipping norm).
pub(crate) fn non_negative(s: &str) -> Result<f32, String> {
    number_in(s, 0.0.., "0 or more").map(|v| v as f32)
}

/// A fraction in [0, 1) (label smoothing, sparsity).
pub(crate) fn fraction(s: &str) -> Result<f64, String> {
    number_in(s, 0.0..1.0, "in [0, 1)")
}

/// A fraction in (0, 1] (FiPS's budget).
pub(crate) fn budget(s: &str) -> Result<f64, String> {
    number_in(
        s,
        (std::ops::Bound::Excluded(0.0), std::ops::Bound::Included(1.0)),
        "in (0, 1]",
    )
}

/// RandAugment's magnitude: 0 to 10.
pub(crate) fn magnitude(s: &str) -> Result<f64, String> {
    number_in(s, 0.0..=10.0, "in [0, 10]")
}

pub(crate) fn parse_schedule(s: &str) -> Result<Schedule, String> {
    s.parse().map_err(|e: Error| e.to_string())
}

pub(crate) fn parse_reduction(s: &str) -> Result<Reduction, String> {
    s.parse().map_err(|e: Error| e.to_string())
}

/// A batch for statistics: one image has no variance.
pub(crate) fn at_least_two(s: &str) -> Result<usize, String> {
    match count(s)? {
        1 => Err("must be at least 2".into()),
        n => Ok(n),
    }
}

pub(crate) fn parse_data(s: &str) -> Result<DataSpec, String> {
    s.parse().map_err(|e: Error| e.to_string())
}

pub(crate) fn parse_dtype(s: &str) -> Result<StorageDtype, String> {
    s.parse().map_err(|e: Error| e.to_string())
}

pub(crate) fn parse_similarity(s: &str) -> Result<SimilarityKind, String> {
    s.parse().map_err(|e: Error| e.to_string())
}

pub(crate) fn parse_sparse_schedule(s: &str) -> Result<SparseSchedule, String> {
    s.parse().map_err(|e: Error| e.to_string())
}
