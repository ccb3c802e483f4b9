//! Host kernels: plain loops and matrix products on slices, split across threads with rayon and
//! compiled for AVX-512/AVX2 where it pays. They know nothing of dfdx or of models; the device
//! layer ([`crate::device`]) puts them on dfdx's tape.
pub mod attention;
pub mod blocks;
pub mod depthwise;
pub mod elementwise;
pub mod epilogue;
pub mod gemm;
pub mod norm;
pub mod packed;
pub mod patchify;
pub mod peak;
