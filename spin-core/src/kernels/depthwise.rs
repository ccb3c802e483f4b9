//! Depthwise K×K convolution ('same' zero padding, stride 1) on channels-last host buffers
//! `(B, H, W, C)`: the forward (a register-tiled AVX-512 kernel for f32, a per-pixel kernel
//! compiled for AVX-512/AVX2 otherwise, both with an optional fused epilogue) and the backward.
use super::elementwise::zeros;
use super::epilogue::Epilogue;
use crate::base::{Nhwc, SpinDtype, F32_LANES};
use multiversion::multiversion;
use rayon::prelude::*;

/// Sizes of one depthwise convolution.
#[derive(Clone, Copy, Debug)]
pub struct DwGeometry {
    /// Images.
    pub b: usize,
    /// Height.
    pub h: usize,
    /// Width.
    pub w: usize,
    /// Channels.
    pub c: usize,
    /// Kernel size (odd).
    pub k: usize,
    /// Padding on each side, `k / 2`.
    pub p: usize,
}

impl DwGeometry {
    /// The geometry of a convolution of `x` with a K×K kernel; panics on an even or too large K.
    pub fn new((b, h, w, c): Nhwc, k: usize) -> Self {
        assert!(k % 2 == 1, "dwconv: 'same' padding needs an odd kernel, got {k}");
        assert!(k <= MAX_K, "dwconv: kernels up to {MAX_K} are supported, got {k}");
        Self {
            b,
            h,
            w,
            c,
            k,
            p: k / 2,
        }
    }
    /// Output columns `wi` for which input column `wi + kx - p` exists.
    fn out_cols(&self, kx: usize) -> std::ops::Range<usize> {
        self.p.saturating_sub(kx)..(self.w + self.p).saturating_sub(kx).min(self.w)
    }
}

#[inline(always)]
fn fma_row<E: SpinDtype>(out: &mut [E], x: &[E], w: &[E]) {
    for ((o, &xv), &wv) in out.iter_mut().zip(x).zip(w) {
        *o += xv * wv;
    }
}

/// Channels per register block of the per-pixel forward kernel: four AVX-512 registers of f32.
const CH: usize = 4 * F32_LANES;

/// Largest kernel the depthwise kernels take (rows kept on the stack).
const MAX_K: usize = 31;

/// Forward: one rayon task per output row (b, h). For each output pixel and block of CH channels
/// the K×K taps accumulate in a fixed-size array the compiler keeps in vector registers, so each
/// input value is loaded once per tap and each output written once. `wt` is `(K·K, C)`.
pub fn forward<E: SpinDtype>(
    g: &DwGeometry,
    x: &[E],
    wt: &[E],
    bias: &[E],
    epi: Option<&Epilogue<'_, E>>,
) -> Vec<E> {
    let mut out = zeros(g.b * g.h * g.w * g.c);
    forward_into(g, x, wt, bias, epi, &mut out);
    out
}

/// [`forward`] into a given buffer: the register-tiled kernel for f32 where the CPU has
/// AVX-512, the per-pixel one otherwise.
pub fn forward_into<E: SpinDtype>(
    g: &DwGeometry,
    x: &[E],
    wt: &[E],
    bias: &[E],
    epi: Option<&Epilogue<'_, E>>,
    out: &mut [E],
) {
    #[cfg(target_arch = "x86_64")]
    if super::f32_avx512::<E>() {
        use super::{as_f32, as_f32_mut};
        let epi32 = epi.map(|e| Epilogue {
            bias: as_f32(e.bias),
            scale: as_f32(e.scale),
            shift: as_f32(e.shift),
            act: e.act,
        });
        // SAFETY: `f32_avx512` detected AVX-512F.
        unsafe {
            dw_tiled_avx512(
                g,
                as_f32(x),
                as_f32(wt),
                as_f32(bias),
                epi32.as_ref(),
                as_f32_mut(out),
            )
        };
        return;
    }
    out.par_chunks_mut(g.w * g.c)
        .enumerate()
        .for_each(|(row, o)| dw_forward_row(g, x, wt, bias, row, o, epi));
}

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

/// [`forward`] for f32 with AVX-512, one task per (image, block of 16 channels). A task copies
/// its slice of the input into a zero-padded slab `(H+K−1, W'+K−1, 16)` (a few dozen KiB, so it
/// stays in cache and the inner loops have no edge cases), then sweeps tiles of 8 output pixels
/// in two rows: the 16 accumulators stay in registers while the K×K taps stream past, so each
/// input load serves two multiply-adds (the weight vectors are shared by the 8 pixels), where
/// the per-pixel kernel ([`dw_forward_row`]) needs two loads for one. The epilogue (ReLU,
/// scale, shift, the residual read back from the slab) runs on the registers, so each output is
/// stored once and nothing is read back from `out`.
///
/// # Safety
/// The CPU must support AVX-512F. Buffer sizes are asserted, so slices of any size are safe.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dw_tiled_avx512(
    g: &DwGeometry,
    x: &[f32],
    wt: &[f32],
    bias: &[f32],
    epi: Option<&Epilogue<'_, f32>>,
    out: &mut [f32],
) {
    use super::epilogue::avx512::activate16;
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

/// One output row of [`forward`], compiled for AVX-512 and AVX2 too and picked at run time
/// (the build targets baseline x86-64, whose 16 SSE registers cannot hold the accumulators). For
/// each output pixel and block of CH channels the K×K taps accumulate in a fixed-size array the
/// compiler keeps in vector registers, so each input value is loaded once per tap and each output
/// written once, through the epilogue when there is one. `wt` is `(K·K, C)`.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn dw_forward_row<E: SpinDtype>(
    g: &DwGeometry,
    x: &[E],
    wt: &[E],
    bias: &[E],
    row: usize,
    o: &mut [E],
    epi: Option<&Epilogue<'_, E>>,
) {
    let (h, w, c, k, p) = (g.h, g.w, g.c, g.k, g.p);
    let (bi, hi) = (row / h, row % h);
    let mut rows: [(usize, &[E]); MAX_K] = [(0, &[]); MAX_K];
    let mut nrows = 0;
    for ky in 0..k {
        if let Some(hh) = (hi + ky).checked_sub(p).filter(|&hh| hh < h) {
            rows[nrows] = (ky, &x[(bi * h + hh) * w * c..][..w * c]);
            nrows += 1;
        }
    }
    let rows = &rows[..nrows];
    let skip = &x[row * w * c..][..w * c];
    for wi in 0..w {
        let kx0 = p.saturating_sub(wi);
        let kx1 = (w + p - wi).min(k);
        let mut c0 = 0;
        while c0 < c {
            let n = CH.min(c - c0);
            let mut acc = [E::zero(); CH];
            acc[..n].copy_from_slice(&bias[c0..c0 + n]);
            for &(ky, xrow) in rows {
                for kx in kx0..kx1 {
                    let xi = wi + kx - p;
                    let xs = &xrow[xi * c + c0..][..n];
                    let ws = &wt[(ky * k + kx) * c + c0..][..n];
                    if n == CH {
                        let (xs, ws): (&[E; CH], &[E; CH]) = (xs.try_into().unwrap(), ws.try_into().unwrap());
                        for j in 0..CH {
                            acc[j] += xs[j] * ws[j];
                        }
                    } else {
                        for j in 0..n {
                            acc[j] += xs[j] * ws[j];
                        }
                    }
                }
            }
            let at = wi * c + c0;
            match epi {
                None => o[at..][..n].copy_from_slice(&acc[..n]),
                Some(e) => e.apply(&mut o[at..][..n], &acc[..n], c0, Some(&skip[at..][..n])),
            }
            c0 += n;
        }
    }
}

/// Backward: returns (dL/dx, dL/dw in `(K·K, C)`, dL/db).
pub fn backward<E: SpinDtype>(g: &DwGeometry, x: &[E], wt: &[E], gy: &[E]) -> (Vec<E>, Vec<E>, Vec<E>) {
    let (h, c, k) = (g.h, g.c, g.k);
    // dL/dx[hh, xi] = Σ dy[hh + p − ky, xi + p − kx]·w[ky, kx]: the same 'same'-padded depthwise
    // convolution of dy with the kernel turned half a turn (tap t ↔ K·K − 1 − t), so it takes
    // the forward's kernels.
    let flipped: Vec<E> = wt.chunks(c).rev().flat_map(|tap| tap.iter().copied()).collect();
    let mut gx = zeros(x.len());
    forward_into(g, gy, &flipped, &vec![E::zero(); c], None, &mut gx);
    // dL/dw and dL/db: partial sums over fixed blocks of output rows, added in block order, so
    // the result does not depend on how rayon schedules the work (training is reproducible).
    let kkc = k * k * c;
    let rows = g.b * h;
    let block = rows.div_ceil(32).max(1);
    let partials: Vec<Vec<E>> = (0..rows.div_ceil(block))
        .into_par_iter()
        .map(|blk| dw_backward_w_block(g, x, gy, blk * block..((blk + 1) * block).min(rows)))
        .collect();
    let mut sums = vec![E::zero(); kkc + c];
    for part in partials {
        for (s, v) in sums.iter_mut().zip(part) {
            *s += v;
        }
    }
    let gb = sums[kkc..].to_vec();
    let mut gw = sums;
    gw.truncate(kkc);
    (gx, gw, gb)
}

/// The dL/dw `(K·K, C)` and dL/db partial sums of a block of output rows.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn dw_backward_w_block<E: SpinDtype>(
    g: &DwGeometry,
    x: &[E],
    gy: &[E],
    rows: std::ops::Range<usize>,
) -> Vec<E> {
    let (h, w, c, k, p) = (g.h, g.w, g.c, g.k, g.p);
    let kkc = k * k * c;
    let mut acc = vec![E::zero(); kkc + c];
    for row in rows {
        let (bi, hi) = (row / h, row % h);
        let grow = &gy[row * w * c..][..w * c];
        for px in grow.chunks(c) {
            for (a, &v) in acc[kkc..].iter_mut().zip(px) {
                *a += v;
            }
        }
        for ky in 0..k {
            let Some(hh) = (hi + ky).checked_sub(p).filter(|&hh| hh < h) else {
                continue;
            };
            let xrow = &x[(bi * h + hh) * w * c..][..w * c];
            for kx in 0..k {
                let a = &mut acc[(ky * k + kx) * c..][..c];
                for wi in g.out_cols(kx) {
                    let xi = wi + kx - p;
                    fma_row(a, &grow[wi * c..][..c], &xrow[xi * c..][..c]);
                }
            }
        }
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::Act;

    #[test]
    fn f32_forward_with_epilogue_matches_the_f64_row_kernel() {
        // The f32 path (tiled on AVX-512 CPUs) against the per-pixel kernel in f64, with each
        // activation and without an epilogue; 40 channels leave a partial block of 8, 13 columns
        // a partial tile (5, narrower than a tile, one clipped on both sides: taps of the
        // border are skipped per side), 11 rows an odd last row, and 2 images check the image
        // offsets.
        let (b, h, c) = (2, 11, 40);
        let v = crate::kernels::test_values::<f64>;
        let f32s = |v: &[f64]| v.iter().map(|&a| a as f32).collect::<Vec<f32>>();
        for (w, k) in [(13, 3), (13, 7), (5, 9)] {
            let g = DwGeometry::new((b, h, w, c), k);
            let (x, wt, bias) = (v(b * h * w * c, 1), v(k * k * c, 2), v(c, 3));
            let (scale, shift) = (v(c, 4), v(c, 5));
            for act in [None, Some(Act::Relu), Some(Act::Gelu)] {
                let epi64 = act.map(|act| Epilogue {
                    bias: &bias,
                    scale: &scale,
                    shift: &shift,
                    act,
                });
                let mut want = vec![0.0f64; x.len()];
                want.par_chunks_mut(w * c)
                    .enumerate()
                    .for_each(|(row, o)| dw_forward_row(&g, &x, &wt, &bias, row, o, epi64.as_ref()));
                let (bias32, scale32, shift32) = (f32s(&bias), f32s(&scale), f32s(&shift));
                let epi32 = act.map(|act| Epilogue {
                    bias: &bias32,
                    scale: &scale32,
                    shift: &shift32,
                    act,
                });
                let got = forward(&g, &f32s(&x), &f32s(&wt), &bias32, epi32.as_ref());
                for (i, (a, e)) in got.iter().zip(&want).enumerate() {
                    assert!((*a as f64 - e).abs() < 1e-5, "k {k} {act:?} at {i}: {a} vs {e}");
                }
            }
        }
    }

    #[test]
    fn no_channels_give_an_empty_output() {
        // The weights' per-block layout splits rows of C values: C = 0 must not split by zero.
        let g = DwGeometry::new((2, 3, 3, 0), 3);
        assert!(forward::<f32>(&g, &[], &[], &[], None).is_empty());
    }
}
