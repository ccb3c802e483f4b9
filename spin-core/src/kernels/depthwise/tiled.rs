//! The depthwise forward's register-tiled AVX-512 kernel for f32 (see [`dw_tiled_avx512`]).
use super::DwGeometry;
use crate::base::F32_LANES;
use crate::kernels::epilogue::Epilogue;
use rayon::prelude::*;

/// Output pixels per tile of the tiled kernel.
const PIX: usize = 8;

/// `for kx in 0..k { body(kx, q) for q in the tile's pixels whose input column is inside the
/// image }` for a tile whose pixels q take input columns q + kx − e (e = p − p0) and which has
/// `f` = w + p − p0 columns to the image's right edge: at 16 × 16 with K = 9 the border's
/// columns were another seventh of the multiply-adds. The clipped kx (at most p on each side)
/// each get a loop with constant bounds (a match over the few spans there are), so that it
/// unrolls and the accumulators stay in registers; the rest one loop over all pixels. Where a
/// kx would be clipped on both sides (an image narrower than a tile), all pixels: the skipped
/// ones only multiply the slab's zero border.
macro_rules! for_taps {
    ($k:expr, $edges:expr, |$kx:ident, $q:ident| $body:block) => {
        let (k, (e, f)): (usize, (usize, usize)) = ($k, $edges);
        // kx < kl: pixels q ≥ e − kx; kx ≥ kr: pixels q < f − kx.
        let (kl, kr) = (e.min(k), (f + 1).saturating_sub(PIX).min(k));
        let (kl, kr) = if kl <= kr { (kl, kr) } else { (0, k) };
        for $kx in 0..kl {
            match e - $kx {
                1 => for $q in 1..PIX $body,
                2 => for $q in 2..PIX $body,
                3 => for $q in 3..PIX $body,
                4 => for $q in 4..PIX $body,
                5 => for $q in 5..PIX $body,
                6 => for $q in 6..PIX $body,
                7 => for $q in 7..PIX $body,
                _ => {}
            }
        }
        for $kx in kl..kr {
            for $q in 0..PIX $body
        }
        for $kx in kr..k {
            match f.saturating_sub($kx) {
                7 => for $q in 0..7 $body,
                6 => for $q in 0..6 $body,
                5 => for $q in 0..5 $body,
                4 => for $q in 0..4 $body,
                3 => for $q in 0..3 $body,
                2 => for $q in 0..2 $body,
                1 => for $q in 0..1 $body,
                0 => {}
                _ => for $q in 0..PIX $body,
            }
        }
    };
}
const _: () = assert!(PIX == 8, "for_taps! spells out the spans of 8 pixels");

/// The output of the tiled kernel, written by tasks that own disjoint sets of channels.
struct SharedOut(*mut f32);
// SAFETY: the pointer is only written through, by tasks that each own a disjoint block of
// channels (see `dw_tiled_avx512`), while the buffer it points into is borrowed mutably.
unsafe impl Send for SharedOut {}
// SAFETY: as for Send: no two tasks write the same element, and none reads through it.
unsafe impl Sync for SharedOut {}

/// One pixel's 16 channels, aligned so that each slab load is one cache line (an unaligned
/// 64-byte load straddles two, which halved the kernel's load throughput).
#[derive(Clone, Copy, Default)]
#[repr(C, align(64))]
struct Lanes([f32; F32_LANES]);

thread_local! {
    /// Each worker's slab, kept between tasks and calls (allocating and zeroing it per task cost
    /// more than its border), and the (H, W, K) it was laid out for: only the interior is ever
    /// written after it is zeroed, so while the geometry stays the same its border stays zero.
    static SLAB: std::cell::RefCell<(Vec<Lanes>, (usize, usize, usize))> =
        const { std::cell::RefCell::new((Vec::new(), (0, 0, 0))) };
}

/// [`super::forward`] for f32 with AVX-512, one task per (image, block of 16 channels). A task
/// copies its slice of the input into a zero-padded slab `(H+K−1, W'+K−1, 16)` (a few dozen
/// KiB, so it stays in cache and the inner loops have no edge cases), then sweeps tiles of 8
/// output pixels in two rows: the 16 accumulators stay in registers while the K×K taps stream
/// past, so each input load serves two multiply-adds (the weight vectors are shared by the 8
/// pixels), where the per-pixel kernel ([`super::dw_forward_row`]) needs two loads for one.
/// Taps that would only multiply the slab's zero border are skipped. The epilogue (ReLU, scale,
/// shift, the residual read back from the slab) runs on the registers, so each output is stored
/// once and nothing is read back from `out`.
///
/// # Safety
/// The CPU must support AVX-512F. Buffer sizes are asserted, so slices of any size are safe.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn dw_tiled_avx512(
    g: &DwGeometry,
    x: &[f32],
    wt: &[f32],
    bias: &[f32],
    epi: Option<&Epilogue<'_, f32>>,
    out: &mut [f32],
) {
    use crate::kernels::epilogue::avx512::activate16;
    use std::arch::x86_64::*;
    let (h, w, c, k, p) = (g.h, g.w, g.c, g.k, g.p);
    let (hp, wp) = (h + k - 1, w.div_ceil(PIX) * PIX + k - 1);
    assert!(x.len() == g.b * h * w * c && out.len() == x.len() && wt.len() == k * k * c);
    assert!(bias.len() == c && epi.is_none_or(|e| e.scale.len() == c && e.shift.len() == c));
    let cblocks = c.div_ceil(F32_LANES);
    // Each block of channels' K·K weight vectors, laid out once per call (zero past `c`): read
    // per task from `wt`, one cache line per tap and cold after the pointwise products, they
    // were 6 % of this kernel's samples.
    let taps = k * k;
    let mut blocked_wt = vec![Lanes::default(); cblocks * taps];
    for (t, row) in wt.chunks_exact(c.max(1)).enumerate() {
        for (cb, chunk) in row.chunks(F32_LANES).enumerate() {
            blocked_wt[cb * taps + t].0[..chunk.len()].copy_from_slice(chunk);
        }
    }
    let dst = SharedOut(out.as_mut_ptr());
    (0..g.b * cblocks).into_par_iter().for_each(|task| {
        // SAFETY: AVX-512F is present (the caller's contract). Reads: `x` and the per-channel
        // vectors at pixel·c + c0 (or c0) with mask lanes < n ≤ c − c0 (inside them, asserted
        // sizes); the slab at rows < hp and columns < wp (its length); `wv` at taps < k².
        // Writes: `out` at the same in-bounds offsets as `x`, channels c0..c0 + n, which only
        // this task writes.
        unsafe {
            let dst = &dst;
            let (b, c0) = (task / cblocks, (task % cblocks) * F32_LANES);
            let n = F32_LANES.min(c - c0);
            // Lanes c0..c0 + n of a pixel; masked loads and stores never touch the others.
            let mask: __mmask16 = if n == F32_LANES { !0 } else { (1 << n) - 1 };
            // Per-channel vectors of this block (zero in the masked-off lanes).
            let lanes = |v: &[f32]| _mm512_maskz_loadu_ps(mask, v.as_ptr().add(c0));
            SLAB.with_borrow_mut(|(slab, laid_out_for)| {
                if *laid_out_for != (h, w, k) {
                    slab.clear();
                    slab.resize(hp * wp, Lanes::default());
                    *laid_out_for = (h, w, k);
                }
                // The border is zero (see SLAB); copy the interior.
                for r in p..h + p {
                    let row = &mut slab[r * wp..(r + 1) * wp];
                    for wi in 0..w {
                        let src = x.as_ptr().add(((b * h + r - p) * w + wi) * c + c0);
                        // The pixel two rows down: a task reads one cache line per pixel at a
                        // stride of C values, which the hardware prefetchers do not follow
                        // (ConvMixer-768/32's depthwise share of the pass 12.8 → 11.9 %). A
                        // prefetch never faults, so past the image's end it is only wasted.
                        _mm_prefetch::<_MM_HINT_T0>(src.wrapping_add(2 * w * c) as *const i8);
                        _mm512_store_ps(row[wi + p].0.as_mut_ptr(), _mm512_maskz_loadu_ps(mask, src));
                    }
                }
                let base = slab.as_ptr() as *const f32;
                let at = |r: usize, col: usize| base.add((r * wp + col) * F32_LANES);
                let wv = &blocked_wt[c0 / F32_LANES * taps..][..taps];
                let init = lanes(bias);
                let (scale, shift) = match epi {
                    Some(e) => (lanes(e.scale), lanes(e.shift)),
                    None => (_mm512_set1_ps(1.0), _mm512_setzero_ps()),
                };
                // The outputs of row `hi` at p0.. through the epilogue, one masked store each.
                let emit = |hi: usize, p0: usize, acc: &[__m512; PIX]| {
                    for (q, &a) in acc.iter().enumerate().take(w - p0) {
                        let o = dst.0.add(((b * h + hi) * w + p0 + q) * c + c0);
                        let v = match epi {
                            None => a,
                            Some(e) => _mm512_add_ps(
                                activate16(a, e.act, scale, shift),
                                _mm512_load_ps(at(hi + p, p0 + q + p)),
                            ),
                        };
                        _mm512_mask_storeu_ps(o, mask, v);
                    }
                };
                let wrow = |ky: usize| wv.as_ptr().add(ky * k) as *const f32;
                // acc[q] += Σ_kx x[q + kx]·w[kx] along one slab row, over the tile's pixels
                // whose input at kx is not the zero border (`for_taps!`).
                macro_rules! taps {
                    ($xrow:expr, $w:expr, $acc:expr, $edges:expr) => {
                        for_taps!(k, $edges, |kx, q| {
                            let wk = _mm512_load_ps($w.add(kx * F32_LANES));
                            let xv = _mm512_load_ps($xrow.add((q + kx) * F32_LANES));
                            $acc[q] = _mm512_fmadd_ps(xv, wk, $acc[q]);
                        });
                    };
                }
                // Two output rows at a time: slab row h0 + sr feeds row h0 through kernel row sr
                // and row h0 + 1 through kernel row sr − 1, so each input load serves two
                // multiply-adds (one load per multiply-add bounded the one-row loop). Slab rows
                // of the zero border (h0 + sr < p or ≥ h + p) are skipped: at 16 × 16 with K = 9
                // they were a seventh of the multiply-adds.
                for h0 in (0..h).step_by(2) {
                    let (lo, hi) = (p.saturating_sub(h0), (h + p - h0).min(k + 1));
                    for p0 in (0..w).step_by(PIX) {
                        let edges = (p.saturating_sub(p0), w + p - p0);
                        let mut acc0 = [init; PIX];
                        if h0 + 1 == h {
                            for ky in lo..hi.min(k) {
                                taps!(at(h0 + ky, p0), wrow(ky), acc0, edges);
                            }
                            emit(h0, p0, &acc0);
                            continue;
                        }
                        let mut acc1 = [init; PIX];
                        if lo == 0 {
                            taps!(at(h0, p0), wrow(0), acc0, edges);
                        }
                        for sr in lo.max(1)..hi.min(k) {
                            let (xrow, w0, w1) = (at(h0 + sr, p0), wrow(sr), wrow(sr - 1));
                            for_taps!(k, edges, |kx, q| {
                                let wk0 = _mm512_load_ps(w0.add(kx * F32_LANES));
                                let wk1 = _mm512_load_ps(w1.add(kx * F32_LANES));
                                let xv = _mm512_load_ps(xrow.add((q + kx) * F32_LANES));
                                acc0[q] = _mm512_fmadd_ps(xv, wk0, acc0[q]);
                                acc1[q] = _mm512_fmadd_ps(xv, wk1, acc1[q]);
                            });
                        }
                        if hi > k {
                            taps!(at(h0 + k, p0), wrow(k - 1), acc1, edges);
                        }
                        emit(h0, p0, &acc0);
                        emit(h0 + 1, p0, &acc1);
                    }
                }
            });
        }
    });
}
