//! The packed products on Intel AMX tiles, at f32 accuracy.
//!
//! The tile unit multiplies pairs of bf16 and sums them in f32, sixteen times the multiply-adds
//! per cycle of the AVX-512 FMA units. An f32 is the exact sum of three bf16 (its top 8
//! significant bits, the next 8 and the last 8), so a product of two f32 is a sum of nine
//! products of parts; the six whose orders add up to at most 2 are kept (the three dropped are at
//! most about 2⁻²¹ of the product, a few of f32's rounding steps). The tests hold the results to
//! 1e-6 of the sum of the terms' magnitudes against f64; a throwaway probe at ViT shapes found
//! the largest error below a plain f32 loop's. Six tile products per 32-deep step
//! would be 2.6 times the FMA units' f32 rate; the tile loads hold it back (with eight tile
//! registers, four for a 32 × 32 output, each step loads fourteen input tiles for 24 products,
//! and, as throwaway probes suggested, a load into a tile waits for the products still reading
//! it). On one thread at ViT shapes it runs 1.1–1.5 times the AVX-512 kernel's rate
//! (`kernel_timing`); on two, whole forward passes of ConvMixer-768/32 and DeiT-Small take a
//! fifth to a third less time (the README's performance section).
//! Splitting costs more than packing, so only weights kept between calls take this path. Set
//! `SPIN_AMX=0` to use the AVX-512 kernel instead.
use super::Lhs;
use crate::kernels::epilogue::{avx512::activate16, Epilogue};
use split::{split_lhs, LHS_PARTS};
use std::arch::asm;
use std::arch::x86_64::*;

mod split;
pub use split::AmxRhs;

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
    // Which configuration the tile unit holds (loading one also clears the tiles): switched
    // only between a short last block and the others.
    let mut loaded: Option<bool> = None;
    LHS_PARTS.with_borrow_mut(|lhs| {
        // SAFETY: AVX-512F and BW come with `available`.
        unsafe { split_lhs(lhs, x) };
        for cb in 0..col_blocks {
            let (c0, cols) = (cb * KT, KT.min(n - cb * KT));
            for rb in 0..row_blocks {
                let block_rows = if rb + 1 == row_blocks { last_rows } else { KT };
                let short_block = block_rows != KT;
                // SAFETY: `available` (the contract) granted the tile state; a configuration
                // with the block's rows is loaded before its first tile instruction (and the
                // state released after the last block, below); the block reads row block rb's
                // and column block cb's `steps` steps, inside the buffers (split and asserted
                // above), and writes its rows of `products`.
                unsafe {
                    if loaded != Some(short_block) {
                        let config = if short_block { &short } else { &full };
                        asm!("ldtilecfg [{}]", in(reg) config, options(nostack, readonly));
                        loaded = Some(short_block);
                    }
                    let (a, b) = (
                        lhs.as_ptr().add(rb * steps * STEP),
                        w.data.as_ptr().add(cb * steps * STEP),
                    );
                    if block_rows > TR {
                        tile_block::<true>(a, b, steps, products.0.as_mut_ptr());
                    } else {
                        tile_block::<false>(a, b, steps, products.0.as_mut_ptr());
                    }
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
    if loaded.is_some() {
        // SAFETY: a configuration was loaded above on this thread; this hands the tile state back.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
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
    use super::super::tests::v;
    use super::super::{linear_packed, PackedRhs};
    use super::*;

    /// The tile products against their definition in f64, to 1e-6 of the sum of the terms'
    /// magnitudes (about 16 of f32's rounding steps): 40 rows (a short last block of 8, top half
    /// only) and 61 (29: both halves, the bottom short), an inner dimension of one partial step
    /// and of three and a bit, 45 outputs (a partial column block), with and without accumulating.
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
}
