//! The bottom layer: element types, shapes and the numeric constants every layer above agrees on.
//! Nothing here imports anything else of spin-core.
mod consts;
mod dtype;
mod shapes;

pub use consts::{BN_EPS, BN_MOMENTUM, F32_LANES, LN_EPS};
pub use dtype::SpinDtype;
pub use shapes::{Mat, Nchw, Nhwc};
pub use spin_rules::{Act, Variant};
