//! Depthwise K×K convolution ('same' zero padding, stride 1) on channels-last host buffers
//! `(B, H, W, C)`: the forward (a register-tiled AVX-512 kernel for f32, a per-pixel kernel
//! compiled for AVX-512/AVX2 otherwise, both with an optional fused epilogue) and the backward.
use super::elementwise::zeros;
use super::epilogue::Epilogue;
use crate::base::{Nhwc, SpinDtype, F32_LANES};
use multiversion::multiversion;
use rayon::prelude::*;
#[cfg(target_arch = "x86_64")]
use tiled::dw_tiled_avx512;

#[cfg(target_arch = "x86_64")]
mod tiled;

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
