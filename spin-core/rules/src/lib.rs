//! The rules of a spin model, in one dependency-free place that both `spin-macros` (at compile
//! time, turning each [`RuleError`] into an error spanned at the argument it names) and
//! `spin-core` (at run time) use:
//!
//! - [`schedule`]: which parameter group each layer uses, and when a schedule is valid;
//! - [`share`]: what a family shares across the layers of a group, and where each layer's part
//!   is stored;
//! - [`family`]: the activations, block variants and eval transforms a declaration may name;
//! - [`counts`]: unique parameters and multiply-accumulates, as `const fn`s so that a declared
//!   model's `PARAMS` and `MACS` are compile-time constants;
//! - [`fips`]: FiPS's rank from a budget, its parameter count and its plan checks.
//!
//! ```
//! use spin_rules::{Pattern, Schedule};
//! let s = Schedule::new(8, 4, &Pattern::Strided).unwrap();
//! assert_eq!(s.as_slice(), &[0, 1, 2, 3, 0, 1, 2, 3]);
//! let err = Schedule::new(10, 4, &Pattern::Sequential).unwrap_err();
//! assert_eq!(err.field, spin_rules::Field::Groups);
//! ```
#![forbid(unsafe_code)]

pub mod counts;
mod error;
pub mod family;
pub mod fips;
pub mod schedule;
pub mod share;

pub use error::{Field, RuleError};
pub use family::{crop_pct_error, Act, CropMode, Interpolation, Variant};
pub use schedule::{Pattern, Schedule};
pub use share::{count, slot, users, ConvMixerShare, VitShare};

/// Looks `name` up in a table of `(name, value)` pairs; the error lists the valid names.
pub fn parse_name<T: Copy>(table: &[(&str, T)], what: &str, name: &str) -> Result<T, String> {
    table
        .iter()
        .find(|(n, _)| *n == name)
        .map(|&(_, v)| v)
        .ok_or_else(|| {
            let valid: Vec<&str> = table.iter().map(|(n, _)| *n).collect();
            format!("unknown {what} `{name}`; valid values are: {}", valid.join(", "))
        })
}
