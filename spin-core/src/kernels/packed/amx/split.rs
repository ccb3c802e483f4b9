//! Splitting f32 operands into the three bf16 parts the tile kernel multiplies, in its tile
//! layouts: a kept weight once ([`AmxRhs`]), a call's rows on every call.
use super::{available, KT, STEP, TILE, TR};
use crate::kernels::packed::Lhs;
use rayon::prelude::*;
use std::arch::x86_64::*;
use std::cell::RefCell;

/// A `(k, n)` right-hand matrix split into bf16 parts: per block of 32 columns, per 32-deep
/// step, per part, two tiles of 16 pairs of rows × 16 columns (pairs interleaved, as the tile
/// product reads them); zero-padded to whole blocks.
#[derive(Clone, Debug, Default)]
pub struct AmxRhs {
    pub(super) data: Vec<u16>,
}

/// The three bf16 parts of `v` (bit patterns), whose sum is `v` exactly: each the top 16 bits of
/// what the parts before it leave, which has at most 16, then 8, significant bits. (The kernels
/// split 32 values at a time, [`split32`]; the tests check both against this.)
#[cfg(test)]
fn parts(v: f32) -> [u16; 3] {
    let hi = v.to_bits() & 0xffff_0000;
    let rest = v - f32::from_bits(hi);
    let mid = rest.to_bits() & 0xffff_0000;
    let lo = (rest - f32::from_bits(mid)).to_bits();
    [(hi >> 16) as u16, (mid >> 16) as u16, (lo >> 16) as u16]
}

impl AmxRhs {
    /// Splits and lays out a `(k, n)` row-major `Wᵀ`, column blocks in parallel. Panics unless
    /// [`available`].
    pub fn pack(wt: &[f32], k: usize, n: usize) -> Self {
        use std::mem::MaybeUninit;
        assert!(
            available() && wt.len() == k * n,
            "AmxRhs::pack: AMX and a k × n weight"
        );
        let steps = k.div_ceil(KT);
        let len = n.div_ceil(KT) * steps * STEP;
        let mut data: Vec<u16> = Vec::with_capacity(len);
        if len > 0 {
            data.spare_capacity_mut()[..len]
                .par_chunks_mut(steps * STEP)
                .enumerate()
                .for_each(|(cb, block)| {
                    // SAFETY: AVX-512 is present (`available`); `MaybeUninit<u16>` has u16's
                    // layout, and the block is written, not read.
                    unsafe {
                        let block = &mut *(block as *mut [MaybeUninit<u16>] as *mut [u16]);
                        pack_columns(block, wt, k, n, cb * KT)
                    }
                });
        }
        // SAFETY: `pack_columns` writes every value of every block (padding included), and the
        // blocks cover all `len`.
        unsafe { data.set_len(len) };
        Self { data }
    }
}

/// One 32-column block of [`AmxRhs`] from columns `c0..` of `wt`, every value written (zeros past
/// the matrix): per step and pair of rows, each part's two tile rows interleave the pair.
///
/// # Safety
/// The CPU must support AVX-512F and BW; `block` holds `k.div_ceil(KT)` steps.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_columns(block: &mut [u16], wt: &[f32], k: usize, n: usize, c0: usize) {
    let cols = KT.min(n - c0);
    let lanes = |from: usize| -> __mmask16 {
        let left = cols.saturating_sub(from).min(TR);
        ((1u32 << left) - 1) as __mmask16
    };
    // Lane 2c + e of a tile row takes column c (of this half) of row e of the pair.
    let pick = |half: i16| {
        let idx: [i16; 32] = std::array::from_fn(|l| (l / 2) as i16 + half * TR as i16 + (l % 2) as i16 * 32);
        // SAFETY: AVX-512F (the contract); 32 i16 read from a local array.
        unsafe { _mm512_loadu_si512(idx.as_ptr() as *const __m512i) }
    };
    let (lo_half, hi_half) = (pick(0), pick(1));
    for (s, step) in block.chunks_exact_mut(STEP).enumerate() {
        for p in 0..TR {
            let row = |e: usize| -> [__m512i; 3] {
                let kk = s * KT + 2 * p + e;
                if kk >= k {
                    return [_mm512_setzero_si512(); 3];
                }
                let at = &wt[kk * n + c0..][..cols];
                // SAFETY: AVX-512F and BW (the contract); the masks keep the loads inside `at`.
                unsafe {
                    let load =
                        |from: usize| _mm512_maskz_loadu_ps(lanes(from), at.as_ptr().wrapping_add(from));
                    split32(load(0), load(TR))
                }
            };
            let (even, odd) = (row(0), row(1));
            for j in 0..3 {
                for (h, idx) in [lo_half, hi_half].into_iter().enumerate() {
                    let dst = &mut step[(2 * j + h) * TILE + p * KT..][..KT];
                    // SAFETY: AVX-512BW (the contract); 32 u16 into a slice of 32.
                    unsafe {
                        let v = _mm512_permutex2var_epi16(even[j], idx, odd[j]);
                        _mm512_storeu_si512(dst.as_mut_ptr() as *mut __m512i, v);
                    }
                }
            }
        }
    }
}

thread_local! {
    /// A call's left operand split into parts, per 32-row block, step, part and half (16 rows ×
    /// 32 values per tile), kept per worker.
    pub(super) static LHS_PARTS: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
}

/// `x` split into bf16 parts in the tile layout of [`LHS_PARTS`], the inner dimension's padding
/// zeroed.
///
/// # Safety
/// The CPU must support AVX-512F and BW.
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn split_lhs(dst: &mut Vec<u16>, x: Lhs<'_>) {
    let (steps, blocks) = (x.k.div_ceil(KT), x.rows.div_ceil(KT));
    let len = blocks * steps * STEP;
    if dst.len() < len {
        dst.resize(len, 0);
    }
    let mut values = [0f32; KT];
    for (b, block) in dst[..len].chunks_exact_mut(steps * STEP).enumerate() {
        // Rows past the last are left as they are: a short block's tiles are configured with
        // fewer rows and never read them.
        for r in 0..KT.min(x.rows - b * KT) {
            let (h, rr) = (r / TR, r % TR);
            let row = b * KT + r;
            for (s, step) in block.chunks_exact_mut(STEP).enumerate() {
                let depth = KT.min(x.k - s * KT);
                let src = if x.cs == 1 && depth == KT {
                    &x.data[row * x.rs + s * KT..][..KT]
                } else {
                    for (kk, v) in values.iter_mut().enumerate() {
                        *v = if kk < depth {
                            x.data[row * x.rs + (s * KT + kk) * x.cs]
                        } else {
                            0.0
                        };
                    }
                    &values[..]
                };
                // SAFETY: AVX-512F and BW (the contract); 32 values from `src` and 32 bf16 into
                // each part's tile row, whose bounds the slices check.
                unsafe {
                    let split = split32(_mm512_loadu_ps(src.as_ptr()), _mm512_loadu_ps(src[TR..].as_ptr()));
                    for (i, part) in split.into_iter().enumerate() {
                        let at = &mut step[(2 * i + h) * TILE + rr * KT..][..KT];
                        _mm512_storeu_si512(at.as_mut_ptr() as *mut __m512i, part);
                    }
                }
            }
        }
    }
}

/// [`parts`] of 32 values, given as two vectors of 16: per part, the 32 bf16 bit patterns in
/// order (each part is the top half of an f32, so one permutation gathers them).
///
/// # Safety
/// The CPU must support AVX-512F and BW.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn split32(v0: __m512, v1: __m512) -> [__m512i; 3] {
    let top = _mm512_set1_epi32(0xffff_0000u32 as i32);
    let odd_halves = _mm512_set_epi16(
        63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33, 31, 29, 27, 25, 23, 21, 19, 17, 15,
        13, 11, 9, 7, 5, 3, 1,
    );
    let rest = |v: __m512| {
        _mm512_sub_ps(
            v,
            _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), top)),
        )
    };
    let tops = |a: __m512, b: __m512| {
        _mm512_permutex2var_epi16(_mm512_castps_si512(a), odd_halves, _mm512_castps_si512(b))
    };
    let (r0, r1) = (rest(v0), rest(v1));
    [tops(v0, v1), tops(r0, r1), tops(rest(r0), rest(r1))]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_sum_to_the_value() {
        for v in [
            1.0f32,
            -7.123_457,
            1e-30,
            6.5e4,
            0.1,
            -1.0 / 3.0,
            f32::MIN_POSITIVE * 256.0,
        ] {
            let p = parts(v).map(|b| f32::from_bits((b as u32) << 16) as f64);
            assert_eq!(p[0] + p[1] + p[2], v as f64, "{v}");
        }
    }

    /// The vector split gives each lane's [`parts`], in order.
    #[test]
    fn split32_matches_parts() {
        if !std::arch::is_x86_feature_detected!("avx512bw") {
            return;
        }
        let values: [f32; 32] =
            std::array::from_fn(|i| (i as f32 - 15.3) * 0.377_123 * (1 << (i % 7)) as f32);
        let mut got = [[0u16; 32]; 3];
        // SAFETY: AVX-512F and BW were detected; 32 values read, 32 u16 written per part.
        unsafe {
            let split = split32(
                _mm512_loadu_ps(values.as_ptr()),
                _mm512_loadu_ps(values[16..].as_ptr()),
            );
            for (g, v) in got.iter_mut().zip(split) {
                _mm512_storeu_si512(g.as_mut_ptr() as *mut __m512i, v);
            }
        }
        for (i, &v) in values.iter().enumerate() {
            assert_eq!([got[0][i], got[1][i], got[2][i]], parts(v), "lane {i}: {v}");
        }
    }
}
