//! Host kernels: plain loops and matrix products on slices, split across threads with rayon and
//! compiled for AVX-512/AVX2 where it pays. They know nothing of dfdx or of models; the device
//! layer ([`crate::device`]) puts them on dfdx's tape.
pub mod attention;
#[cfg(target_arch = "x86_64")]
pub mod attention_tile;
pub mod blocks;
pub mod depthwise;
pub mod elementwise;
pub mod epilogue;
pub mod gemm;
pub mod norm;
pub mod packed;
pub mod patchify;
pub mod peak;
pub mod pool;
pub mod reuse;

use std::any::TypeId;

/// Whether `E` is f32 and the CPU has AVX-512F: the condition of every f32 AVX-512 path.
pub(crate) fn f32_avx512<E: 'static>() -> bool {
    TypeId::of::<E>() == TypeId::of::<f32>() && packed::available()
}

/// `len` deterministic values in [−0.5, 0.5), different for each seed: the kernel tests' inputs.
#[cfg(test)]
pub(crate) fn test_values<E: crate::base::SpinDtype>(len: usize, seed: usize) -> Vec<E> {
    (0..len)
        .map(|i| E::cast(((i * 7919 + seed * 104_729) % 1999) as f64 / 1999.0 - 0.5))
        .collect()
}

/// `v` as f32 values; callers have checked that E is f32.
pub(crate) fn as_f32<E: 'static>(v: &[E]) -> &[f32] {
    assert_eq!(TypeId::of::<E>(), TypeId::of::<f32>());
    // SAFETY: E is f32 (asserted), so the slice is a `[f32]` of the same length and layout.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const f32, v.len()) }
}

/// `v` as mutable f32 values; callers have checked that E is f32.
pub(crate) fn as_f32_mut<E: 'static>(v: &mut [E]) -> &mut [f32] {
    assert_eq!(TypeId::of::<E>(), TypeId::of::<f32>());
    // SAFETY: as for `as_f32`; the borrow of `v` is carried over to the result.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut f32, v.len()) }
}
