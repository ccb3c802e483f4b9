//! Helpers shared by spin's integration tests (the tests themselves live in `tests/`).
//!
//! The README is included below so that its Rust examples compile and run as doc tests.
#![doc = include_str!("../../README.md")]
use spin_core::checkpoint::read_tensors;
use std::path::{Path, PathBuf};

/// A committed fixture made by `scripts/make_fixtures.py` with the real timm.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

/// One tensor of a safetensors file as (shape, values).
pub fn tensor(file: &str, key: &str) -> (Vec<usize>, Vec<f64>) {
    let path = fixture(file);
    let bytes = std::fs::read(&path).unwrap();
    read_tensors(&path, &bytes)
        .unwrap()
        .remove(key)
        .unwrap_or_else(|| panic!("{key} not in {file}"))
}

/// Largest |a − b| over the largest |b|: the relative error the parity tests bound.
pub fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-12);
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max) / scale
}

/// A scratch directory for a test, removed first if it exists.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("spin-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
