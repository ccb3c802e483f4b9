//! Sharing: which layers share which parameters. The rules (schedules, patterns, granularities)
//! are spin-rules', re-exported here; [`SharedStack`] is the trunk a stand-alone
//! `#[shared_blocks]` declares over a user's own block type; [`similarity`] finds which layers
//! of a trained network are alike enough to share.
//!
//! ```
//! use spin_core::sharing::{Pattern, Schedule};
//! let s = Schedule::new(6, 3, &Pattern::CycleRev).unwrap();
//! assert_eq!(s.as_slice(), &[0, 1, 2, 2, 1, 0]);
//! ```
pub mod similarity;
mod stack;

pub use spin_rules::schedule::{fill, make};
pub use spin_rules::{count, slot, users, ConvMixerShare, Pattern, Schedule, VitShare};
pub use stack::{SharedStack, StackConfig};
