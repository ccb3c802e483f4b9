//! The attention core in f32 on AVX-512 (inference, and training's forward, which also writes
//! the softmax), fused per tile of six query rows: the tile's scores, their softmax and its
//! product with v stay in one thread's L1 and registers.
//!
//! Through gemm, each head took two calls that pack their operands, a softmax pass and a
//! transposed copy of k: 17 % of DeiT-Tiny's batch-1 forward in the profile (15 % now). Here k
//! is packed once per (image, head) as panels of 16 keys, `(head_dim, 16)` each (the last
//! zero-padded), v is read in place, and both products keep a 6 × 64 tile on 24 registers.
//! Four tiles take each group of key panels in turn, their six softmax rows run side by side,
//! and v's rows are prefetched: DeiT-Tiny's batch-1 attention with its key packing, on one
//! thread, 201–208 → 181–196 µs (two runs each of the `kernel_timing` example's last line).
use super::elementwise::avx512::exp_nonpos;
use crate::base::F32_LANES;
pub use keys::pack_all_keys;
use rayon::prelude::*;
use std::arch::x86_64::*;

mod keys;

/// Query rows per tile.
const R: usize = 6;
/// Key panels (or v's 16-column vectors) per register tile: 6 × 4 accumulators.
const C: usize = 4;
/// Tiles that take each group of key panels in turn while it is in L1: a head's packed keys
/// (52 KB at DeiT's 197 tokens) do not fit there, and one tile alone streamed them from L2.
const ST: usize = 4;

/// Whether [`attention_core_f32`] takes heads of `head_dim` values here: AVX-512F and whole
/// 16-lane vectors per head.
pub fn applies(head_dim: usize) -> bool {
    super::packed::available() && head_dim > 0 && head_dim.is_multiple_of(F32_LANES)
}

/// [`super::attention::attention_core`] for f32: `qkv` `(B·N, 3·D)` with columns (3, heads,
/// head_dim) into `out` `(B·N, D)`. Panics unless [`applies`] to `D / heads`.
pub fn attention_core_f32(qkv: &[f32], out: &mut [f32], batch: usize, heads: usize, d: usize) {
    let n = tokens(qkv, out, (batch, heads, d));
    if n == 0 {
        return;
    }
    let keys = pack_all_keys(qkv, batch, heads, d);
    // Enough tasks for every thread at batch 1, each a run of whole tiles, the runs as even as
    // the tile count allows (runs of a fixed length left DeiT's 197 query rows split 107 : 90).
    let tiles = n.div_ceil(R);
    let per_image = (4 * rayon::current_num_threads()).div_ceil(batch).clamp(1, tiles);
    let tasks: Vec<std::ops::Range<usize>> = (0..batch)
        .flat_map(|b| {
            (0..per_image).map(move |i| {
                b * n + i * tiles / per_image * R..b * n + ((i + 1) * tiles / per_image * R).min(n)
            })
        })
        .collect();
    let mut slices = Vec::with_capacity(tasks.len());
    let mut rest = &mut out[..];
    for span in &tasks {
        let (head, tail) = rest.split_at_mut(span.len() * d);
        slices.push(head);
        rest = tail;
    }
    tasks
        .into_par_iter()
        .zip(slices)
        .for_each(|(span, o)| attention_rows_f32(qkv, &keys, (n, heads, d), span, o));
}

/// Tokens per image of `qkv` `(B·N, 3·D)` and `out` `(B·N, D)`; panics unless the sizes agree
/// and [`applies`] to `D / heads`.
fn tokens(qkv: &[f32], out: &[f32], (batch, heads, d): (usize, usize, usize)) -> usize {
    let hd = d / heads;
    assert!(applies(hd) && d == heads * hd, "attention: head size {hd}");
    assert!(
        batch > 0 && qkv.len() == 3 * out.len() && out.len().is_multiple_of(batch * d),
        "attention: qkv is not {batch} images of 3 × {d} features"
    );
    out.len() / (batch * d)
}

/// [`attention_core_f32`] that also writes the softmax `probs` `(B, heads, N, N)` (a training
/// step's backward reads it), one task per image. Through gemm's products and a separate
/// softmax pass, DeiT-Tiny's batch-8 training step spent 22.7 ms in the attention's forward
/// instead of 20.8 (`spin bench --train --profile`, three runs alternated).
pub fn attention_core_keep_f32(
    qkv: &[f32],
    out: &mut [f32],
    probs: &mut [f32],
    (batch, heads, d): (usize, usize, usize),
) {
    let (n, hd) = (tokens(qkv, out, (batch, heads, d)), d / heads);
    assert_eq!(probs.len(), batch * heads * n * n, "attention: softmax buffer");
    if n == 0 {
        return;
    }
    let keys = pack_all_keys(qkv, batch, heads, d);
    let width = n.div_ceil(F32_LANES) * F32_LANES;
    out.par_chunks_mut(n * d)
        .zip(probs.par_chunks_mut(heads * n * n))
        .enumerate()
        .for_each(|(b, (o, pb))| {
            let mut scores = vec![0.0f32; ST * R * width];
            let img = &qkv[b * n * 3 * d..][..n * 3 * d];
            for r0 in (0..n).step_by(ST * R) {
                let rows = (ST * R).min(n - r0);
                for (h, ph) in pb.chunks_mut(n * n).enumerate() {
                    let task = Task {
                        q: &img[r0 * 3 * d + h * hd..],
                        v: &img[2 * d + h * hd..],
                        ld: 3 * d,
                        keys: &keys[b * heads + h],
                        n,
                        hd,
                    };
                    // SAFETY: AVX-512F (`applies`); the output from row r0, column h·hd, holds
                    // `rows` rows of stride d (the last ending at hd), the softmax block from
                    // row r0 holds `rows` rows of n.
                    unsafe {
                        task.run(
                            rows,
                            &mut scores,
                            &mut o[r0 * d + h * hd..],
                            d,
                            Some(&mut ph[r0 * n..]),
                        )
                    };
                }
            }
        });
}

/// Attention output rows `rows` (indices into the `B·N` rows of `qkv`, images of `n` tokens)
/// into `out` (`rows.len() × d`), on this thread, with the keys [`pack_all_keys`] made: a pass
/// over row chunks can run its attention and what follows it without a barrier in between.
/// Panics unless [`applies`] to `d / heads`.
pub fn attention_rows_f32(
    qkv: &[f32],
    keys: &[Vec<f32>],
    (n, heads, d): (usize, usize, usize),
    rows: std::ops::Range<usize>,
    out: &mut [f32],
) {
    let hd = d / heads;
    assert!(
        applies(hd) && d == heads * hd,
        "attention_rows_f32: head size {hd}"
    );
    assert!(
        n > 0 && qkv.len() == keys.len() / heads * n * 3 * d && out.len() == rows.len() * d,
        "attention_rows_f32: sizes"
    );
    assert!(
        rows.end * 3 * d <= qkv.len(),
        "attention_rows_f32: rows past the end"
    );
    let panels = n.div_ceil(F32_LANES);
    let mut scores = vec![0.0f32; ST * R * panels * F32_LANES];
    let mut r = rows.start;
    let mut o = out;
    while r < rows.end {
        let b = r / n;
        let q0 = r - b * n;
        let (span, rest) = std::mem::take(&mut o).split_at_mut((rows.end.min((b + 1) * n) - r) * d);
        o = rest;
        let img = &qkv[b * n * 3 * d..][..n * 3 * d];
        let span_rows = span.len() / d;
        for r0 in (0..span_rows).step_by(ST * R) {
            let tile_rows = (ST * R).min(span_rows - r0);
            for h in 0..heads {
                let task = Task {
                    q: &img[(q0 + r0) * 3 * d + h * hd..],
                    v: &img[2 * d + h * hd..],
                    ld: 3 * d,
                    keys: &keys[b * heads + h],
                    n,
                    hd,
                };
                let tile = &mut span[r0 * d + h * hd..];
                // SAFETY: AVX-512F (`applies`); `tile` starts at row r0 of this span's rows and
                // has `tile_rows` rows of `d` values from column h·hd (the last one ending at hd).
                unsafe { task.run(tile_rows, &mut scores, tile, d, None) };
            }
        }
        r += span_rows;
    }
}

/// One (image, head): the queries from the tile's first row, v from key 0 (both rows of stride
/// `ld`), the packed keys.
struct Task<'a> {
    q: &'a [f32],
    v: &'a [f32],
    ld: usize,
    keys: &'a [f32],
    n: usize,
    hd: usize,
}

impl Task<'_> {
    /// Output rows `rows` (1 to `ST·R`, in tiles of [`R`]) into `out` (row stride `ldo`),
    /// through `scores` (`ST·R` rows of the padded key count): every tile's scores against
    /// one group of key panels, then the next group; then each tile's softmax and product with
    /// v. A short last tile repeats its last query row in the registers and stores only its own
    /// rows. With `probs` (`rows` rows of `n`), the softmax is written there too.
    ///
    /// # Safety
    /// The CPU must support AVX-512F. Sizes are asserted.
    #[target_feature(enable = "avx512f")]
    unsafe fn run(
        &self,
        rows: usize,
        scores: &mut [f32],
        out: &mut [f32],
        ldo: usize,
        mut probs: Option<&mut [f32]>,
    ) {
        let (n, hd, ld) = (self.n, self.hd, self.ld);
        let panels = n.div_ceil(F32_LANES);
        let width = panels * F32_LANES;
        assert!((1..=ST * R).contains(&rows) && scores.len() == ST * R * width);
        assert!(probs.as_ref().is_none_or(|p| p.len() >= rows * n));
        assert!(self.keys.len() == panels * hd * F32_LANES && hd.is_multiple_of(F32_LANES));
        assert!((rows - 1) * ld + hd <= self.q.len() && (n - 1) * ld + hd <= self.v.len());
        assert!((rows - 1) * ldo + hd <= out.len());
        let tiles = rows.div_ceil(R);
        let q_rows = |t: usize| -> [usize; R] { std::array::from_fn(|r| (t * R + r).min(rows - 1) * ld) };
        let scale = (hd as f32).powf(-0.5);
        let s = scores.as_mut_ptr();
        // SAFETY (every block below): AVX-512F (the contract). The key panels are read at
        // (p·hd + kk)·16 + 16 ≤ panels·hd·16; queries at q_rows(t)[r] + kk ≤ (rows−1)·ld + hd;
        // v at j·ld + c·16 + 16 ≤ (n−1)·ld + hd; scores at (t·R + r)·width + lanes < ST·R·width;
        // out at (t·R + r)·ldo + c·16 + 16 ≤ (rows−1)·ldo + hd for t·R + r < rows — all
        // asserted above.
        let mut p = 0;
        while p < panels {
            let c = C.min(panels - p);
            for t in 0..tiles {
                let (q_rows, st) = (q_rows(t), s.wrapping_add(t * R * width));
                // SAFETY: as above.
                unsafe {
                    match c {
                        4 => self.scores::<4>(p, &q_rows, scale, st, width),
                        3 => self.scores::<3>(p, &q_rows, scale, st, width),
                        2 => self.scores::<2>(p, &q_rows, scale, st, width),
                        _ => self.scores::<1>(p, &q_rows, scale, st, width),
                    }
                }
            }
            p += c;
        }
        for t in 0..tiles {
            let tile_rows = R.min(rows - t * R);
            let scores = &mut scores[t * R * width..][..R * width];
            let out = &mut out[t * R * ldo..];
            // SAFETY: as above.
            let inv = unsafe { softmax_rows(scores, width, n) };
            if let Some(probs) = probs.as_deref_mut() {
                for (r, &inv) in inv.iter().enumerate().take(tile_rows) {
                    let dst = &mut probs[(t * R + r) * n..][..n];
                    for (p, &e) in dst.iter_mut().zip(&scores[r * width..][..n]) {
                        *p = e * inv;
                    }
                }
            }
            let mut c0 = 0;
            while c0 < hd {
                let c = C.min((hd - c0) / F32_LANES);
                // SAFETY: as above.
                unsafe {
                    match c {
                        4 => self.weighted_v::<4>(c0, scores, width, &inv, tile_rows, out, ldo),
                        3 => self.weighted_v::<3>(c0, scores, width, &inv, tile_rows, out, ldo),
                        2 => self.weighted_v::<2>(c0, scores, width, &inv, tile_rows, out, ldo),
                        _ => self.weighted_v::<1>(c0, scores, width, &inv, tile_rows, out, ldo),
                    }
                }
                c0 += c * F32_LANES;
            }
        }
    }

    /// Scaled scores of the tile's rows against key panels `p..p + W` into `s` (row stride
    /// `width`).
    ///
    /// # Safety
    /// AVX-512F; the bounds [`Task::run`] asserts.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn scores<const W: usize>(
        &self,
        p: usize,
        q_rows: &[usize; R],
        scale: f32,
        s: *mut f32,
        width: usize,
    ) {
        let hd = self.hd;
        // SAFETY: the caller's bounds (see `run`).
        unsafe {
            let (kp, qp) = (self.keys.as_ptr().add(p * hd * F32_LANES), self.q.as_ptr());
            let mut acc = [[_mm512_setzero_ps(); W]; R];
            for kk in 0..hd {
                let k: [__m512; W] =
                    std::array::from_fn(|c| _mm512_loadu_ps(kp.add((c * hd + kk) * F32_LANES)));
                for (r, a) in acc.iter_mut().enumerate() {
                    let qv = _mm512_set1_ps(*qp.add(q_rows[r] + kk));
                    for c in 0..W {
                        a[c] = _mm512_fmadd_ps(qv, k[c], a[c]);
                    }
                }
            }
            let sv = _mm512_set1_ps(scale);
            for (r, a) in acc.iter().enumerate() {
                for (c, &v) in a.iter().enumerate() {
                    _mm512_storeu_ps(s.add(r * width + (p + c) * F32_LANES), _mm512_mul_ps(v, sv));
                }
            }
        }
    }

    /// `out[r, c0..c0 + 16W] = inv[r] · Σ_j scores[r, j] · v[j, c0..]` for the tile's rows.
    ///
    /// # Safety
    /// AVX-512F; the bounds [`Task::run`] asserts.
    #[target_feature(enable = "avx512f")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn weighted_v<const W: usize>(
        &self,
        c0: usize,
        scores: &[f32],
        width: usize,
        inv: &[f32; R],
        rows: usize,
        out: &mut [f32],
        ldo: usize,
    ) {
        // SAFETY: the caller's bounds (see `run`).
        unsafe {
            let (vp, sp) = (self.v.as_ptr().add(c0), scores.as_ptr());
            let mut acc = [[_mm512_setzero_ps(); W]; R];
            for j in 0..self.n {
                // v's rows lie 3·D values apart and each tile reads a head's all (50 KB at
                // DeiT's 197 tokens, from L2): fetching six rows ahead made the probe's
                // attention 5 % faster. A prefetch never faults; past the end it is wasted.
                for c in 0..W {
                    _mm_prefetch::<_MM_HINT_T0>(
                        vp.wrapping_add((j + 6) * self.ld + c * F32_LANES) as *const i8
                    );
                }
                let v: [__m512; W] =
                    std::array::from_fn(|c| _mm512_loadu_ps(vp.add(j * self.ld + c * F32_LANES)));
                for (r, a) in acc.iter_mut().enumerate() {
                    let pv = _mm512_set1_ps(*sp.add(r * width + j));
                    for c in 0..W {
                        a[c] = _mm512_fmadd_ps(pv, v[c], a[c]);
                    }
                }
            }
            for (r, a) in acc.iter().enumerate().take(rows) {
                let iv = _mm512_set1_ps(inv[r]);
                for (c, &v) in a.iter().enumerate() {
                    _mm512_storeu_ps(
                        out.as_mut_ptr().add(r * ldo + c0 + c * F32_LANES),
                        _mm512_mul_ps(v, iv),
                    );
                }
            }
        }
    }
}

/// Each of the `R` rows (stride `width`) of `s`: `row ← exp(row − max row)` over its first `n`
/// values, returning the rows' 1 / Σ; the last vector masked. The rows go through each step
/// together, so their max and sum chains overlap (one row at a time waited on each chain's
/// latency). Not [`super::attention::softmax_rows`]: that one normalises in a second pass and
/// its portable loop is slower here; the 1 / Σ is applied on the output tile's store instead.
///
/// # Safety
/// The CPU must support AVX-512F. Sizes are asserted.
#[target_feature(enable = "avx512f")]
unsafe fn softmax_rows(s: &mut [f32], width: usize, n: usize) -> [f32; R] {
    assert!(n > 0 && n <= width && s.len() == R * width);
    let p = s.as_mut_ptr();
    let mask = |i: usize| -> __mmask16 {
        let left = n - i;
        if left >= F32_LANES {
            !0
        } else {
            (1 << left) - 1
        }
    };
    // SAFETY: every access is at r·width + i + lane with lane < n − i under the mask, and
    // n ≤ width (asserted).
    unsafe {
        let at = |r: usize, i: usize| p.add(r * width + i);
        let mut m = [_mm512_set1_ps(f32::NEG_INFINITY); R];
        for i in (0..n).step_by(F32_LANES) {
            for (r, m) in m.iter_mut().enumerate() {
                *m = _mm512_mask_max_ps(*m, mask(i), *m, _mm512_maskz_loadu_ps(mask(i), at(r, i)));
            }
        }
        let max: [__m512; R] = std::array::from_fn(|r| _mm512_set1_ps(_mm512_reduce_max_ps(m[r])));
        let mut sum = [_mm512_setzero_ps(); R];
        for i in (0..n).step_by(F32_LANES) {
            for (r, sum) in sum.iter_mut().enumerate() {
                let e = exp_nonpos(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask(i), at(r, i)), max[r]));
                _mm512_mask_storeu_ps(at(r, i), mask(i), e);
                *sum = _mm512_mask_add_ps(*sum, mask(i), *sum, e);
            }
        }
        std::array::from_fn(|r| 1.0 / _mm512_reduce_add_ps(sum[r]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fused tiles against the f64 definition, on shapes that leave short tiles, a partial
    /// key panel and a head of 48 values (a 3-vector column block): 2 images of 23 tokens, in
    /// tasks of a tile or two, in one call over all rows, and in training's call that also
    /// writes the softmax (checked too).
    #[test]
    fn fused_tiles_match_the_f64_definition() {
        if !applies(16) {
            return;
        }
        for (heads, hd) in [(2, 64), (3, 48), (1, 80)] {
            let (batch, n, d) = (2, 23, heads * hd);
            let qkv: Vec<f32> = (0..batch * n * 3 * d)
                .map(|i| ((i * 7919 % 211) as f32 / 105.0 - 1.0) * 1.5)
                .collect();
            let mut out = vec![f32::NAN; batch * n * d];
            attention_core_f32(&qkv, &mut out, batch, heads, d);
            // All rows in one call: four tiles share each key group, then a short one.
            let mut whole = vec![f32::NAN; batch * n * d];
            let keys = pack_all_keys(&qkv, batch, heads, d);
            attention_rows_f32(&qkv, &keys, (n, heads, d), 0..batch * n, &mut whole);
            let (mut kept, mut probs) = (
                vec![f32::NAN; batch * n * d],
                vec![f32::NAN; batch * heads * n * n],
            );
            attention_core_keep_f32(&qkv, &mut kept, &mut probs, (batch, heads, d));
            let at = |b: usize, i: usize, part: usize, h: usize, l: usize| {
                qkv[(b * n + i) * 3 * d + part * d + h * hd + l] as f64
            };
            for b in 0..batch {
                for h in 0..heads {
                    for i in 0..n {
                        let s: Vec<f64> = (0..n)
                            .map(|j| {
                                (0..hd)
                                    .map(|l| at(b, i, 0, h, l) * at(b, j, 1, h, l))
                                    .sum::<f64>()
                                    / (hd as f64).sqrt()
                            })
                            .collect();
                        let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        let e: Vec<f64> = s.iter().map(|v| (v - max).exp()).collect();
                        let sum: f64 = e.iter().sum();
                        for j in 0..n {
                            let got = probs[((b * heads + h) * n + i) * n + j] as f64;
                            assert!((got - e[j] / sum).abs() < 1e-6, "b{b} h{h} P[{i}, {j}]: {got}");
                        }
                        for l in 0..hd {
                            let want = (0..n).map(|j| e[j] / sum * at(b, j, 2, h, l)).sum::<f64>();
                            for got in [&out, &whole, &kept].map(|o| o[(b * n + i) * d + h * hd + l] as f64) {
                                assert!((got - want).abs() < 1e-5, "b{b} h{h} q{i} [{l}]: {got} vs {want}");
                            }
                        }
                    }
                }
            }
        }
    }
}
