//! Linear layers at inference with their weight packed once, read by an AVX-512 microkernel that
//! adds the bias (and the residual) on its registers (f32 only).
//!
//! gemm packs the whole right-hand matrix inside every call, and a ViT block's passes call it once
//! per 128-row task: at DeiT-Small's batch 8 each weight was packed 13 times per block, a tenth
//! of the forward pass. Kept weights ([`crate::device::BlockCache`]) are packed once instead, as
//! panels of [`NR`] output columns, `(k, NR)` each (the last one zero-padded); a 12 × 32 tile of
//! outputs stays in 24 registers through the whole inner dimension and is written once.
use rayon::prelude::*;

/// Output columns per panel: two AVX-512 registers.
pub const NR: usize = 32;
/// Rows per microkernel tile: 12 × 2 accumulators leave registers for the weight and the input.
const MR: usize = 12;

/// A `(k, n)` right-hand matrix as panels of [`NR`] columns, each `(k, NR)` row-major, the last
/// one zero-padded. Empty until packed.
#[derive(Clone, Debug, Default)]
pub struct PackedRhs {
    data: Vec<f32>,
    k: usize,
    n: usize,
}

impl PackedRhs {
    /// Packs a `(k, n)` row-major `Wᵀ`, panels in parallel.
    pub fn pack(wt: &[f32], k: usize, n: usize) -> Self {
        assert_eq!(wt.len(), n * k, "pack: weight is not k × n");
        let mut data = vec![0.0; n.div_ceil(NR) * k * NR];
        data.par_chunks_mut(k * NR).enumerate().for_each(|(p, panel)| {
            let cols = NR.min(n - p * NR);
            for (kk, row) in panel.chunks_mut(NR).enumerate() {
                row[..cols].copy_from_slice(&wt[kk * n + p * NR..][..cols]);
            }
        });
        Self { data, k, n }
    }

    /// Whether a weight has been packed.
    pub fn is_packed(&self) -> bool {
        !self.data.is_empty()
    }

    /// Inner dimension.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Output columns.
    pub fn n(&self) -> usize {
        self.n
    }
}

/// Whether [`linear_packed`] runs here: a CPU with AVX-512F.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `out = x · W + bias`, or `out += x · W + bias` when `accumulate`, for `x` `(rows, k)` row-major
/// on this thread (callers split rows). Panics unless [`available`] and `w` is packed.
pub fn linear_packed(out: &mut [f32], x: &[f32], w: &PackedRhs, bias: &[f32], accumulate: bool) {
    assert!(
        available() && w.is_packed(),
        "linear_packed needs AVX-512F and a packed weight"
    );
    let (k, n) = (w.k, w.n);
    let rows = x.len() / k.max(1);
    assert!(
        x.len() == rows * k && out.len() == rows * n && bias.len() == n,
        "linear_packed: sizes"
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F is present (asserted above); sizes are checked inside.
    unsafe {
        rows_avx512(out, x, w, bias, accumulate)
    }
}

/// Every panel over every MR-row tile of `x`; the rows of a task stay in L2 while the panels
/// pass over them.
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn rows_avx512(out: &mut [f32], x: &[f32], w: &PackedRhs, bias: &[f32], accumulate: bool) {
    let (k, n) = (w.k, w.n);
    let rows = x.len() / k;
    assert!(out.len() == rows * n && w.data.len() == n.div_ceil(NR) * k * NR);
    for p in 0..n.div_ceil(NR) {
        let tile = Tile {
            panel: &w.data[p * k * NR..][..k * NR],
            bias,
            c0: p * NR,
            cols: NR.min(n - p * NR),
            accumulate,
        };
        for r0 in (0..rows).step_by(MR) {
            let mr = MR.min(rows - r0);
            let (xs, os) = (&x[r0 * k..(r0 + mr) * k], &mut out[r0 * n..(r0 + mr) * n]);
            // SAFETY: AVX-512F (this function's contract); `xs` and `os` hold mr whole rows.
            unsafe {
                match mr {
                    MR => tile.run::<MR>(xs, k, os, n),
                    11 => tile.run::<11>(xs, k, os, n),
                    10 => tile.run::<10>(xs, k, os, n),
                    9 => tile.run::<9>(xs, k, os, n),
                    8 => tile.run::<8>(xs, k, os, n),
                    7 => tile.run::<7>(xs, k, os, n),
                    6 => tile.run::<6>(xs, k, os, n),
                    5 => tile.run::<5>(xs, k, os, n),
                    4 => tile.run::<4>(xs, k, os, n),
                    3 => tile.run::<3>(xs, k, os, n),
                    2 => tile.run::<2>(xs, k, os, n),
                    _ => tile.run::<1>(xs, k, os, n),
                }
            }
        }
    }
}

/// One panel and what its outputs get: the bias, and the old output when accumulating.
struct Tile<'a> {
    panel: &'a [f32],
    bias: &'a [f32],
    c0: usize,
    cols: usize,
    accumulate: bool,
}

impl Tile<'_> {
    /// `R` rows of `x` × the panel: 2R accumulators through the whole inner dimension, then the
    /// bias (and old output) added on the registers and one masked store per output vector.
    ///
    /// # Safety
    /// The CPU must support AVX-512F. Sizes are asserted.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn run<const R: usize>(&self, x: &[f32], k: usize, out: &mut [f32], ldo: usize) {
        use std::arch::x86_64::*;
        assert!(x.len() == R * k && self.panel.len() == k * NR && out.len() == R * ldo);
        assert!(self.c0 + self.cols <= ldo && self.cols <= NR && self.bias.len() == ldo);
        // SAFETY: AVX-512F is present (the contract). Reads: x at r·k + kk < R·k, the panel at
        // kk·NR + 32 ≤ k·NR; bias and out at c0 + lanes < c0 + cols ≤ ldo under the masks;
        // writes: out at r·ldo + c0 + lanes, under the same masks.
        unsafe {
            let (xp, bp) = (x.as_ptr(), self.panel.as_ptr());
            let mut acc = [[_mm512_setzero_ps(); 2]; R];
            for kk in 0..k {
                let b0 = _mm512_loadu_ps(bp.add(kk * NR));
                let b1 = _mm512_loadu_ps(bp.add(kk * NR + 16));
                for (r, a) in acc.iter_mut().enumerate() {
                    let xv = _mm512_set1_ps(*xp.add(r * k + kk));
                    a[0] = _mm512_fmadd_ps(xv, b0, a[0]);
                    a[1] = _mm512_fmadd_ps(xv, b1, a[1]);
                }
            }
            let masks: [__mmask16; 2] = [lane_mask(self.cols), lane_mask(self.cols.saturating_sub(16))];
            // `wrapping_add`: with a short last panel the second half starts past the row's end;
            // its mask is then empty and nothing there is read or written.
            let bias = [0, 1]
                .map(|h| _mm512_maskz_loadu_ps(masks[h], self.bias.as_ptr().wrapping_add(self.c0 + 16 * h)));
            for (r, a) in acc.iter().enumerate() {
                for h in 0..2 {
                    if masks[h] == 0 {
                        continue;
                    }
                    let o = out.as_mut_ptr().add(r * ldo + self.c0 + 16 * h);
                    let mut v = _mm512_add_ps(a[h], bias[h]);
                    if self.accumulate {
                        v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(masks[h], o));
                    }
                    _mm512_mask_storeu_ps(o, masks[h], v);
                }
            }
        }
    }
}

/// The first `n` of 16 lanes (all for n ≥ 16).
fn lane_mask(n: usize) -> u16 {
    if n >= 16 {
        !0
    } else {
        (1u16 << n) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_products_match_the_definition() {
        if !available() {
            return;
        }
        // 29 rows (two full tiles and a partial one), 40 outputs (a full panel and a partial
        // one), with and without accumulation.
        let (rows, k, n) = (29, 37, 40);
        let v = |len: usize, seed: usize| -> Vec<f32> {
            (0..len)
                .map(|i| ((i * 7919 + seed * 104_729) % 1999) as f32 / 1999.0 - 0.5)
                .collect()
        };
        let (x, wt, bias, old) = (v(rows * k, 1), v(k * n, 2), v(n, 3), v(rows * n, 4));
        let packed = PackedRhs::pack(&wt, k, n);
        for accumulate in [false, true] {
            let mut got = if accumulate {
                old.clone()
            } else {
                vec![f32::NAN; rows * n]
            };
            linear_packed(&mut got, &x, &packed, &bias, accumulate);
            for i in 0..rows {
                for j in 0..n {
                    let dot: f64 = (0..k).map(|l| x[i * k + l] as f64 * wt[l * n + j] as f64).sum();
                    let want = dot + bias[j] as f64 + if accumulate { old[i * n + j] as f64 } else { 0.0 };
                    let e = (got[i * n + j] as f64 - want).abs();
                    assert!(
                        e < 1e-5,
                        "accumulate {accumulate} ({i}, {j}): {} vs {want}",
                        got[i * n + j]
                    );
                }
            }
        }
    }
}
