//! The attention tiles' key packing: each (image, head)'s keys as panels of 16 keys, transposed
//! on registers.
use super::applies;
use crate::base::F32_LANES;
use rayon::prelude::*;
use std::arch::x86_64::*;

/// The keys of every (image, head) of `qkv` `(B·N, 3·D)`, packed for [`super::attention_rows_f32`]
/// (one task each). Panics unless [`applies`] to `D / heads`.
pub fn pack_all_keys(qkv: &[f32], batch: usize, heads: usize, d: usize) -> Vec<Vec<f32>> {
    let hd = d / heads;
    assert!(applies(hd) && d == heads * hd, "pack_all_keys: head size {hd}");
    assert!(
        batch > 0 && qkv.len().is_multiple_of(batch * 3 * d),
        "pack_all_keys: qkv"
    );
    let n = qkv.len() / (batch * 3 * d);
    (0..batch * heads)
        .into_par_iter()
        .map(|bh| {
            let (b, h) = (bh / heads, bh % heads);
            // SAFETY: AVX-512F, asserted above (`applies`).
            unsafe { pack_keys(&qkv[(b * n * 3 + 1) * d + h * hd..], n, hd, 3 * d) }
        })
        .collect()
}

/// The `n` keys `k` (row stride `ld`, `hd` values each, a multiple of 16) as panels of 16 keys,
/// `(hd, 16)` each; lanes past the last key are zero. Each 16 × 16 block is loaded as 16 key
/// rows, transposed on registers and stored as 16 panel rows, in order: a scalar copy (a gather
/// or a scatter per value) cost 1.5–3 % of DeiT-Tiny's batch-1 pass.
///
/// # Safety
/// The CPU must support AVX-512F. Sizes are asserted.
#[target_feature(enable = "avx512f")]
unsafe fn pack_keys(k: &[f32], n: usize, hd: usize, ld: usize) -> Vec<f32> {
    assert!(
        hd.is_multiple_of(F32_LANES) && (n == 0 || (n - 1) * ld + hd <= k.len()),
        "pack_keys: {n} keys of {hd} values with stride {ld} overrun {} values",
        k.len()
    );
    let mut kp: Vec<f32> = Vec::with_capacity(n.div_ceil(F32_LANES) * hd * F32_LANES);
    for p0 in (0..n).step_by(F32_LANES) {
        let keys = F32_LANES.min(n - p0);
        for c0 in (0..hd).step_by(F32_LANES) {
            // SAFETY: AVX-512F (the contract). Loads: key p0 + j < n at columns c0..c0 + 16 ≤
            // hd, inside `k` (asserted). Stores: 256 values at the vector's length, inside the
            // capacity reserved above (panels · hd · 16 in all), each written before `set_len`
            // counts it.
            unsafe {
                let mut rows = [_mm512_setzero_ps(); F32_LANES];
                for (j, row) in rows.iter_mut().enumerate().take(keys) {
                    *row = _mm512_loadu_ps(k.as_ptr().add((p0 + j) * ld + c0));
                }
                let at = kp.as_mut_ptr().add(kp.len());
                for (i, col) in transpose16(rows).into_iter().enumerate() {
                    _mm512_storeu_ps(at.add(i * F32_LANES), col);
                }
                kp.set_len(kp.len() + F32_LANES * F32_LANES);
            }
        }
    }
    kp
}

/// The transpose of 16 rows of 16 values: pairs interleaved at 32 and 64 bits within each
/// 128-bit lane, then 128-bit lanes gathered across rows in two steps.
///
/// # Safety
/// The CPU must support AVX-512F.
#[target_feature(enable = "avx512f")]
unsafe fn transpose16(r: [__m512; F32_LANES]) -> [__m512; F32_LANES] {
    let zero = _mm512_setzero_ps();
    // t: per 128-bit lane, elements (0, 1) or (2, 3) of rows 2i and 2i + 1 interleaved.
    let mut t = [zero; 16];
    for i in (0..16).step_by(2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    // u[4g + j]: per 128-bit lane L, column 4L + j of rows 4g..4g + 4.
    let mut u = [zero; 16];
    for g in (0..16).step_by(4) {
        for h in 0..2 {
            let (a, b) = (t[g + h], t[g + 2 + h]);
            u[g + 2 * h] = _mm512_shuffle_ps::<0x44>(a, b);
            u[g + 2 * h + 1] = _mm512_shuffle_ps::<0xEE>(a, b);
        }
    }
    // v[j], v[4 + j]: lanes (0, 2) and (1, 3) of u[j], then of u[4 + j] (rows 0–7);
    // v[8 + j], v[12 + j] the same for rows 8–15.
    let mut v = [zero; 16];
    for half in [0, 8] {
        for j in 0..4 {
            let (a, b) = (u[half + j], u[half + 4 + j]);
            v[half + j] = _mm512_shuffle_f32x4::<0x88>(a, b);
            v[half + 4 + j] = _mm512_shuffle_f32x4::<0xDD>(a, b);
        }
    }
    // Column j < 8: lanes (0, 2) of v[j], then of v[8 + j]; column 8 + j: lanes (1, 3).
    let mut out = [zero; 16];
    for j in 0..8 {
        out[j] = _mm512_shuffle_f32x4::<0x88>(v[j], v[8 + j]);
        out[j + 8] = _mm512_shuffle_f32x4::<0xDD>(v[j], v[8 + j]);
    }
    out
}
