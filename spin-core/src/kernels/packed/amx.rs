//! The packed products on Intel AMX tiles, at f32 accuracy.
//!
//! The tile unit multiplies pairs of bf16 and sums them in f32, sixteen times the multiply-adds
//! per cycle of the AVX-512 FMA units. An f32 is the exact sum of three bf16 (its top 8
//! significant bits, the next 8 and the last 8), so a product of two f32 is a sum of nine
//! products of parts; the six whose orders add up to at most 2 keep every term above f32's own
//! rounding (the three dropped are below 2⁻²⁴ of the product), and the tests hold the results to
//! a tighter tolerance against f64 than the f32 kernel's. Six tile products per 32-deep step
//! would be 2.6 times the FMA units' f32 rate; the tile loads hold it back (with eight tile
//! registers, four for a 32 × 32 output, each step loads fourteen input tiles for 24 products,
//! and a load into a tile waits for the products still reading it). On one thread at ViT shapes
//! it runs 1.1–1.2 times the AVX-512 kernel's rate (`kernel_timing`); on two, whole forward
//! passes of ConvMixer-768/32 and DeiT-Small gain 20–30 % (the README's performance section).
//! Splitting costs more than packing, so only weights kept between calls take this path. Set
//! `SPIN_AMX=0` to use the AVX-512 kernel instead.
use super::Lhs;
use crate::kernels::epilogue::{avx512::activate16, Epilogue};
use rayon::prelude::*;
use std::arch::asm;
use std::arch::x86_64::*;
use std::cell::RefCell;

/// bf16 values per tile row (64 bytes): the inner-dimension step of one tile product.
const KT: usize = 32;
/// Rows (or inner-dimension pairs) per tile.
const TR: usize = 16;
/// bf16 values per tile.
const TILE: usize = TR * KT;
/// One 32-deep step of a 32-row (or 32-column) block: three parts, two tiles each.
const STEP: usize = 6 * TILE;
/// The part pairs (left, right) multiplied per step, ordered so that each changes one operand's
/// part (two tile loads) from the one before.
const PAIRS: [(usize, usize); 6] = [(2, 0), (1, 0), (1, 1), (0, 1), (0, 0), (0, 2)];

/// Whether the AMX kernel runs here: a CPU with AMX-BF16 and AVX-512, Linux granting the tile
/// state to this process, and `SPIN_AMX` not `0`.
pub fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| std::env::var("SPIN_AMX").map_or(true, |v| v.trim() != "0") && detect())
}

#[cfg(target_os = "linux")]
fn detect() -> bool {
    use std::arch::x86_64::__cpuid_count;
    let (max_leaf, leaf7) = (__cpuid_count(0, 0).eax, __cpuid_count(7, 0));
    let amx = max_leaf >= 7 && (leaf7.edx >> 22) & 1 == 1 && (leaf7.edx >> 24) & 1 == 1;
    if !amx || !std::arch::is_x86_feature_detected!("avx512bw") {
        return false;
    }
    // Linux hands out the tile registers' state only to processes that ask
    // (arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)); it refuses where the kernel or the
    // hypervisor does not support it.
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with this request only changes the process's permitted xsave features.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(not(target_os = "linux"))]
fn detect() -> bool {
    false
}

/// A `(k, n)` right-hand matrix split into bf16 parts: per block of 32 columns, per 32-deep
/// step, per part, two tiles of 16 pairs of rows × 16 columns (pairs interleaved, as the tile
/// product reads them); zero-padded to whole blocks.
#[derive(Clone, Debug, Default)]
pub struct AmxRhs {
    data: Vec<u16>,
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
    static LHS_PARTS: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
}

/// `x` split into bf16 parts in the tile layout of [`LHS_PARTS`], the inner dimension's padding
/// zeroed.
///
/// # Safety
/// The CPU must support AVX-512F and BW.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn split_lhs(dst: &mut Vec<u16>, x: Lhs<'_>) {
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

/// A tile configuration (palette 1): tiles 0, 1 and 4 (the output's and the left operand's top
/// row half) `top` rows, tiles 2, 3 and 5 (the bottom half) `bottom` rows, 6 and 7 (the right
/// operand) 16; every row 64 bytes. A tile with no rows is unconfigured.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn new(top: usize, bottom: usize) -> Self {
        let mut c = [0u8; 64];
        c[0] = 1;
        for (t, rows) in [top, top, bottom, bottom, top, bottom, TR, TR]
            .into_iter()
            .enumerate()
        {
            c[16 + 2 * t] = if rows > 0 { 64 } else { 0 };
            c[48 + t] = rows as u8;
        }
        Self(c)
    }
}

/// One 32 × 32 output tile (`BOTH`), or its top 16 rows, over `steps` inner steps: `c = Σ A_i ·
/// B_j` over [`PAIRS`]. Tiles 0–3 hold c, 4–5 the left part's two row halves, 6–7 the right
/// part's two column halves. The rows are the configured ones (fewer in a last, short block).
///
/// # Safety
/// AMX is available and a [`TileConfig`] loaded on this thread, with a bottom half if `BOTH`;
/// `a` and `b` point at `steps` steps of [`STEP`] values, `c` at 32 × 32 f32.
#[inline(always)]
unsafe fn tile_block<const BOTH: bool>(a: *const u16, b: *const u16, steps: usize, c: *mut f32) {
    // SAFETY: the caller's contract; every address below is inside the three buffers.
    unsafe {
        asm!("tilezero tmm0", "tilezero tmm1", options(nostack, nomem));
        if BOTH {
            asm!("tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
        }
        for step in 0..steps {
            let (a, b) = (a.add(step * STEP), b.add(step * STEP));
            let mut held = (usize::MAX, usize::MAX);
            for (pair, (i, j)) in PAIRS.into_iter().enumerate() {
                // The next step's tiles into L1 while this one's products run: 12 KB over the
                // six pairs, 32 lines per pair (loads the tile unit waits on otherwise). Past
                // the last step the addresses lie outside the buffers: a prefetch never faults,
                // and `wrapping_add` keeps the arithmetic defined.
                let next =
                    if pair % 2 == 0 { a } else { b }.wrapping_add(STEP + pair / 2 * 2 * TILE) as *const i8;
                for line in 0..32 {
                    _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(line * 64));
                }
                let (ai, bj) = (a.add(2 * i * TILE), b.add(2 * j * TILE));
                match (held.0 != i, held.1 != j, BOTH) {
                    (true, true, true) => asm!(
                        "tileloadd tmm4, [{a} + {s}*1]", "tileloadd tmm6, [{b} + {s}*1]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tileloadd tmm7, [{b} + {s}*1 + 1024]", "tdpbf16ps tmm1, tmm4, tmm7",
                        "tileloadd tmm5, [{a} + {s}*1 + 1024]", "tdpbf16ps tmm2, tmm5, tmm6",
                        "tdpbf16ps tmm3, tmm5, tmm7",
                        a = in(reg) ai, b = in(reg) bj, s = in(reg) 64usize, options(nostack, readonly)),
                    (true, false, true) => asm!(
                        "tileloadd tmm4, [{a} + {s}*1]", "tdpbf16ps tmm0, tmm4, tmm6",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        "tileloadd tmm5, [{a} + {s}*1 + 1024]", "tdpbf16ps tmm2, tmm5, tmm6",
                        "tdpbf16ps tmm3, tmm5, tmm7",
                        a = in(reg) ai, s = in(reg) 64usize, options(nostack, readonly)),
                    (_, _, true) => asm!(
                        "tileloadd tmm6, [{b} + {s}*1]", "tdpbf16ps tmm0, tmm4, tmm6",
                        "tdpbf16ps tmm2, tmm5, tmm6",
                        "tileloadd tmm7, [{b} + {s}*1 + 1024]", "tdpbf16ps tmm1, tmm4, tmm7",
                        "tdpbf16ps tmm3, tmm5, tmm7",
                        b = in(reg) bj, s = in(reg) 64usize, options(nostack, readonly)),
                    (true, true, false) => asm!(
                        "tileloadd tmm4, [{a} + {s}*1]", "tileloadd tmm6, [{b} + {s}*1]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tileloadd tmm7, [{b} + {s}*1 + 1024]", "tdpbf16ps tmm1, tmm4, tmm7",
                        a = in(reg) ai, b = in(reg) bj, s = in(reg) 64usize, options(nostack, readonly)),
                    (true, false, false) => asm!(
                        "tileloadd tmm4, [{a} + {s}*1]", "tdpbf16ps tmm0, tmm4, tmm6",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        a = in(reg) ai, s = in(reg) 64usize, options(nostack, readonly)),
                    (_, _, false) => asm!(
                        "tileloadd tmm6, [{b} + {s}*1]", "tdpbf16ps tmm0, tmm4, tmm6",
                        "tileloadd tmm7, [{b} + {s}*1 + 1024]", "tdpbf16ps tmm1, tmm4, tmm7",
                        b = in(reg) bj, s = in(reg) 64usize, options(nostack, readonly)),
                }
                held = (i, j);
            }
        }
        asm!("tilestored [{c} + {s}*1], tmm0", "tilestored [{c} + {s}*1 + 64], tmm1",
             c = in(reg) c, s = in(reg) 128usize, options(nostack));
        if BOTH {
            asm!("tilestored [{c} + {s}*1 + 2048], tmm2", "tilestored [{c} + {s}*1 + 2112], tmm3",
                 c = in(reg) c, s = in(reg) 128usize, options(nostack));
        }
    }
}

/// A 32 × 32 tile of f32 products, aligned for the tile stores.
#[repr(C, align(64))]
struct Products([f32; KT * KT]);

/// [`super::matmul_packed`] (or its epilogue form, `post`) on AMX tiles, on this thread.
///
/// # Safety
/// [`available`] must hold. Sizes are asserted.
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn matmul(
    out: &mut [f32],
    x: Lhs<'_>,
    w: &AmxRhs,
    n: usize,
    bias: Option<&[f32]>,
    accumulate: bool,
    (post, skip): (Option<&Epilogue<'_, f32>>, Option<&[f32]>),
) {
    let (rows, k) = (x.rows, x.k);
    let (steps, row_blocks, col_blocks) = (k.div_ceil(KT), rows.div_ceil(KT), n.div_ceil(KT));
    assert!(
        out.len() == rows * n && w.data.len() == col_blocks * steps * STEP,
        "amx::matmul: sizes"
    );
    // The last block's rows: whole tiles of them cost as much as 32.
    let last_rows = rows - KT * row_blocks.saturating_sub(1);
    let (full, short) = (
        TileConfig::new(TR, TR),
        TileConfig::new(last_rows.min(TR), last_rows.saturating_sub(TR)),
    );
    let mut products = Products([0.0; KT * KT]);
    LHS_PARTS.with_borrow_mut(|lhs| {
        // SAFETY: AVX-512F and BW come with `available`.
        unsafe { split_lhs(lhs, x) };
        for cb in 0..col_blocks {
            let (c0, cols) = (cb * KT, KT.min(n - cb * KT));
            for rb in 0..row_blocks {
                let block_rows = if rb + 1 == row_blocks { last_rows } else { KT };
                // SAFETY: `available` (the contract) granted the tile state; a configuration
                // with the block's rows is loaded first and the state released after; the block
                // reads row block rb's and column block cb's `steps` steps, inside the buffers
                // (split and asserted above), and writes its rows of `products`.
                unsafe {
                    let config = if block_rows == KT { &full } else { &short };
                    asm!("ldtilecfg [{}]", in(reg) config, options(nostack, readonly));
                    let (a, b) = (
                        lhs.as_ptr().add(rb * steps * STEP),
                        w.data.as_ptr().add(cb * steps * STEP),
                    );
                    if block_rows > TR {
                        tile_block::<true>(a, b, steps, products.0.as_mut_ptr());
                    } else {
                        tile_block::<false>(a, b, steps, products.0.as_mut_ptr());
                    }
                    asm!("tilerelease", options(nostack, nomem));
                }
                for (r, p) in products.0.chunks_exact(KT).take(block_rows).enumerate() {
                    let at = (rb * KT + r) * n + c0;
                    let o = &mut out[at..at + cols];
                    let p = &p[..cols];
                    match (post, accumulate, bias) {
                        (Some(epi), _, _) => {
                            // SAFETY: AVX-512F (the contract); `finish` checks the sizes.
                            unsafe { finish(o, p, epi, c0, skip.map(|s| &s[at..at + cols])) }
                        }
                        (None, false, None) => o.copy_from_slice(p),
                        (None, true, None) => o.iter_mut().zip(p).for_each(|(o, p)| *o += p),
                        (None, false, Some(b)) => o
                            .iter_mut()
                            .zip(p)
                            .zip(&b[c0..])
                            .for_each(|((o, p), b)| *o = p + b),
                        (None, true, Some(b)) => o
                            .iter_mut()
                            .zip(p)
                            .zip(&b[c0..])
                            .for_each(|((o, p), b)| *o += p + b),
                    }
                }
            }
        }
    });
}

/// One row of a tile's products through the epilogue (channels `c0..c0 + p.len()`, at most 32)
/// into `out`, while they are in L1: `act(p + bias)·scale + shift (+ skip)`.
///
/// # Safety
/// The CPU must support AVX-512F.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn finish(out: &mut [f32], p: &[f32], epi: &Epilogue<'_, f32>, c0: usize, skip: Option<&[f32]>) {
    let cols = p.len();
    assert!(
        out.len() == cols
            && cols <= KT
            && epi.bias.len().min(epi.scale.len()).min(epi.shift.len()) >= c0 + cols
    );
    assert!(skip.is_none_or(|s| s.len() == cols));
    for v0 in (0..cols).step_by(TR) {
        let left = cols - v0;
        let m: __mmask16 = if left >= TR { !0 } else { (1 << left) - 1 };
        // SAFETY: AVX-512F (the contract); every lane read or written is below `cols` in `out`,
        // `p` and `skip`, and below c0 + cols in the epilogue's vectors (asserted above).
        unsafe {
            let at = |v: &[f32], from: usize| _mm512_maskz_loadu_ps(m, v.as_ptr().add(from));
            let a = _mm512_add_ps(at(p, v0), at(epi.bias, c0 + v0));
            let mut y = activate16(a, epi.act, at(epi.scale, c0 + v0), at(epi.shift, c0 + v0));
            if let Some(s) = skip {
                y = _mm512_add_ps(y, at(s, v0));
            }
            _mm512_mask_storeu_ps(out.as_mut_ptr().add(v0), m, y);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{linear_packed, matmul_packed_epilogue, PackedRhs};
    use super::*;
    use crate::base::{Act, SpinDtype};

    /// `len` deterministic values in [−2, 2), different for each seed.
    fn v(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 7919 + seed * 104_729) % 1999) as f32 / 500.0 - 2.0)
            .collect()
    }

    /// The tile products against their definition in f64, at the f32 kernel's tolerance
    /// (relative to the sum of magnitudes): 40 rows (a short last block of 8, top half only) and
    /// 61 (29: both halves, the bottom short), an inner dimension of one partial step and of
    /// three and a bit, 45 outputs (a partial column block), with and without accumulating.
    #[test]
    fn tile_products_match_the_definition() {
        if !available() {
            return;
        }
        for (rows, k, n, accumulate) in [(40, 19, 45, false), (61, 101, 45, true), (32, 64, 32, false)] {
            let (x, wt, bias, old) = (v(rows * k, 1), v(k * n, 2), v(n, 3), v(rows * n, 4));
            let packed = PackedRhs::pack_kept(&wt, k, n);
            let mut got = if accumulate {
                old.clone()
            } else {
                vec![f32::NAN; rows * n]
            };
            linear_packed(&mut got, &x, &packed, &bias, accumulate);
            for i in 0..rows {
                for j in 0..n {
                    let terms = (0..k).map(|l| x[i * k + l] as f64 * wt[l * n + j] as f64);
                    let scale: f64 = terms.clone().map(f64::abs).sum::<f64>() + 1.0;
                    let old = if accumulate { old[i * n + j] as f64 } else { 0.0 };
                    let want = terms.sum::<f64>() + bias[j] as f64 + old;
                    let e = (got[i * n + j] as f64 - want).abs() / scale;
                    assert!(
                        e < 1e-6,
                        "{rows}×{k}×{n} ({i}, {j}): {} vs {want}",
                        got[i * n + j]
                    );
                }
            }
        }
    }

    /// The epilogue form: `act(x·W + b)·s + t + skip` on tile products, 20 rows.
    #[test]
    fn tile_epilogue_matches_the_definition() {
        if !available() {
            return;
        }
        let (rows, k, n) = (20, 70, 40);
        let (x, wt, skip) = (v(rows * k, 1), v(k * n, 2), v(rows * n, 3));
        let (bias, scale, shift) = (v(n, 4), v(n, 5), v(n, 6));
        let packed = PackedRhs::pack_kept(&wt, k, n);
        let epi = Epilogue {
            bias: &bias,
            scale: &scale,
            shift: &shift,
            act: Act::Gelu,
        };
        let mut got = vec![f32::NAN; rows * n];
        matmul_packed_epilogue(&mut got, Lhs::rows(&x, rows, k), &packed, &epi, Some(&skip));
        for i in 0..rows {
            for j in 0..n {
                let a = bias[j] as f64
                    + (0..k)
                        .map(|l| x[i * k + l] as f64 * wt[l * n + j] as f64)
                        .sum::<f64>();
                let want = a.gelu_and_grad().0 * scale[j] as f64 + shift[j] as f64 + skip[i * n + j] as f64;
                let e = (got[i * n + j] as f64 - want).abs();
                assert!(
                    e < 1e-4 * (1.0 + want.abs()),
                    "({i}, {j}): {} vs {want}",
                    got[i * n + j]
                );
            }
        }
    }

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
