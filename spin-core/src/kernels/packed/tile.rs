//! The packed kernel's microkernel: one panel slice of the weight times up to `MR` rows of the
//! left operand, the accumulators on registers, and what the outputs get on the way out.
use super::{Lhs, MR, NV};
use crate::kernels::epilogue::Epilogue;

/// One panel and what its outputs get: the bias, the old output when accumulating, and at the
/// end of the inner dimension an epilogue (its scale, shift and activation; its bias is `bias`)
/// with the skip rows added after it.
pub(super) struct Tile<'a> {
    pub(super) panel: &'a [f32],
    /// The panel's row stride: [`NR`] when packed, the matrix's columns when read in place.
    pub(super) ld: usize,
    pub(super) bias: Option<&'a [f32]>,
    pub(super) c0: usize,
    pub(super) cols: usize,
    pub(super) accumulate: bool,
    pub(super) post: Option<&'a Epilogue<'a, f32>>,
}

impl Tile<'_> {
    /// [`Tile::run`] for the `x.rows` (1 to [`MR`]) rows of `x`.
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn run_rows<const T: bool>(
        &self,
        x: Lhs<'_>,
        out: &mut [f32],
        skip: Option<&[f32]>,
        ldo: usize,
    ) {
        // SAFETY: AVX-512F (the contract); `run` asserts the sizes.
        unsafe {
            match x.rows {
                MR => self.run_v::<MR, T>(x, out, skip, ldo),
                7 => self.run_v::<7, T>(x, out, skip, ldo),
                6 => self.run_v::<6, T>(x, out, skip, ldo),
                5 => self.run_v::<5, T>(x, out, skip, ldo),
                4 => self.run_v::<4, T>(x, out, skip, ldo),
                3 => self.run_v::<3, T>(x, out, skip, ldo),
                2 => self.run_v::<2, T>(x, out, skip, ldo),
                _ => self.run_v::<1, T>(x, out, skip, ldo),
            }
        }
    }

    /// [`Tile::run`] with as many vectors as the panel has columns: a short last panel (256
    /// outputs leave 16 of 48) costs no multiplies by its zero padding.
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn run_v<const R: usize, const T: bool>(
        &self,
        x: Lhs<'_>,
        out: &mut [f32],
        skip: Option<&[f32]>,
        ldo: usize,
    ) {
        // SAFETY: AVX-512F (the contract); `run` asserts the sizes.
        unsafe {
            match self.cols.div_ceil(16) {
                NV => self.run::<R, T, NV>(x, out, skip, ldo),
                2 => self.run::<R, T, 2>(x, out, skip, ldo),
                _ => self.run::<R, T, 1>(x, out, skip, ldo),
            }
        }
    }

    /// `R` rows of `x` × the first `V` vectors of the panel slice: R·V accumulators through the
    /// block, then the bias (and old output, then the epilogue and skip) added on the registers
    /// and one masked store per output vector. `T`: `x` is transposed (row stride 1, so a step of
    /// the inner dimension reads R adjacent values); otherwise its column stride is 1.
    ///
    /// # Safety
    /// The CPU must support AVX-512F. Sizes are asserted.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn run<const R: usize, const T: bool, const V: usize>(
        &self,
        x: Lhs<'_>,
        out: &mut [f32],
        skip: Option<&[f32]>,
        ldo: usize,
    ) {
        use crate::kernels::epilogue::avx512::activate16;
        use std::arch::x86_64::*;
        let k = x.k;
        let (rs, cs) = if T { (1, x.cs) } else { (x.rs, 1) };
        assert!(x.rows == R && (x.rs, x.cs) == (rs, cs));
        assert!(self.ld >= 16 * V && (k == 0 || (k - 1) * self.ld + 16 * V <= self.panel.len()));
        assert!(k == 0 || (R - 1) * rs + (k - 1) * cs < x.data.len());
        assert!(out.len() == R * ldo && self.c0 + self.cols <= ldo && self.cols <= 16 * V && V <= NV);
        assert!(self.bias.is_none_or(|b| b.len() == ldo));
        assert!(self
            .post
            .is_none_or(|e| e.scale.len() == ldo && e.shift.len() == ldo));
        assert!(skip.is_none_or(|s| s.len() == out.len()));
        // SAFETY: AVX-512F is present (the contract). Reads: x at r·rs + kk·cs ≤ (R−1)·rs +
        // (k−1)·cs (asserted above), the panel below kk·ld + 16·V ≤ (k−1)·ld + 16·V, within it
        // (asserted); bias, scale, shift, out and skip at c0 + lanes < c0 + cols ≤ ldo (in row
        // r < R of out and skip) under the masks; writes: out at r·ldo + c0 + lanes, under the
        // same masks.
        unsafe {
            let (xp, bp) = (x.data.as_ptr(), self.panel.as_ptr());
            let mut acc = [[_mm512_setzero_ps(); V]; R];
            for kk in 0..k {
                let b: [__m512; V] = std::array::from_fn(|h| _mm512_loadu_ps(bp.add(kk * self.ld + 16 * h)));
                for (r, a) in acc.iter_mut().enumerate() {
                    let xv = _mm512_set1_ps(*xp.add(r * rs + kk * cs));
                    for h in 0..V {
                        a[h] = _mm512_fmadd_ps(xv, b[h], a[h]);
                    }
                }
            }
            let masks: [__mmask16; V] = std::array::from_fn(|h| lane_mask(self.cols.saturating_sub(16 * h)));
            // `wrapping_add`: a vector wholly past the panel's columns (V larger than `run_v`
            // picks) starts past the row's end; its mask is empty and nothing there is touched.
            let bias: [__m512; V] = std::array::from_fn(|h| match self.bias {
                Some(b) => _mm512_maskz_loadu_ps(masks[h], b.as_ptr().wrapping_add(self.c0 + 16 * h)),
                None => _mm512_setzero_ps(),
            });
            for (r, a) in acc.iter().enumerate() {
                for h in 0..V {
                    if masks[h] == 0 {
                        continue;
                    }
                    let at = r * ldo + self.c0 + 16 * h;
                    let o = out.as_mut_ptr().add(at);
                    let mut v = _mm512_add_ps(a[h], bias[h]);
                    if self.accumulate {
                        v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(masks[h], o));
                    }
                    if let Some(e) = self.post {
                        let lanes =
                            |p: &[f32]| _mm512_maskz_loadu_ps(masks[h], p.as_ptr().add(self.c0 + 16 * h));
                        v = activate16(v, e.act, lanes(e.scale), lanes(e.shift));
                        if let Some(s) = skip {
                            v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(masks[h], s.as_ptr().add(at)));
                        }
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
