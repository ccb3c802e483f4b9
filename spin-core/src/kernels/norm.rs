//! Fused normalisation kernels on channels-last matrices `(rows, C)`: BatchNorm with batch
//! statistics, a per-channel affine map (BatchNorm at inference), and LayerNorm over each row.
//!
//! Each is one pass in and one out, split across cores, instead of the half-dozen single-threaded
//! dfdx ops (broadcasts, reductions, elementwise) the composed forms in [`crate::device`] take.
//! Column sums use fixed row blocks added in order, so results do not depend on thread timing.
use super::elementwise::zeros;
use crate::base::{SpinDtype, F32_LANES, LN_EPS};
use multiversion::multiversion;
use rayon::prelude::*;

/// Rows per block of a column reduction.
const BLOCK: usize = 64;

/// Σ over rows of `f(row)`'s contribution, per column, as f64: fixed blocks, ordered sum.
pub fn col_sums(rows: usize, c: usize, f: impl Fn(usize, &mut [f64]) + Sync) -> Vec<f64> {
    let partials: Vec<Vec<f64>> = (0..rows.div_ceil(BLOCK))
        .into_par_iter()
        .map(|b| {
            let mut acc = vec![0.0; c];
            for r in b * BLOCK..((b + 1) * BLOCK).min(rows) {
                f(r, &mut acc);
            }
            acc
        })
        .collect();
    let mut out = vec![0.0; c];
    for p in partials {
        for (o, v) in out.iter_mut().zip(p) {
            *o += v;
        }
    }
    out
}

/// Adds a row to per-column f64 sums.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub fn add_row<E: SpinDtype>(acc: &mut [f64], row: &[E]) {
    for (a, &v) in acc.iter_mut().zip(row) {
        *a += v.as_f64();
    }
}

fn cast<E: SpinDtype>(v: &[f64]) -> Vec<E> {
    v.iter().map(|&x| E::cast(x)).collect()
}

/// `x · s + t` per column: forward, and backward given dL/dy → (dL/dx, dL/ds, dL/dt).
pub fn affine_fwd<E: SpinDtype>(x: &[E], s: &[E], t: &[E]) -> Vec<E> {
    let c = s.len();
    let mut y = zeros(x.len());
    y.par_chunks_mut(c * BLOCK)
        .zip(x.par_chunks(c * BLOCK))
        .for_each(|(yb, xb)| {
            for (yr, xr) in yb.chunks_mut(c).zip(xb.chunks(c)) {
                affine_row(yr, xr, s, t);
            }
        });
    y
}

/// `y = x · s + t` for one row.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn affine_row<E: SpinDtype>(y: &mut [E], x: &[E], s: &[E], t: &[E]) {
    for (((o, &v), &a), &b) in y.iter_mut().zip(x).zip(s).zip(t) {
        *o = v * a + b;
    }
}

/// `y = x · s` for one row.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn scale_row<E: SpinDtype>(y: &mut [E], x: &[E], s: &[E]) {
    for ((o, &v), &a) in y.iter_mut().zip(x).zip(s) {
        *o = v * a;
    }
}

/// `acc += (x − mean)²` for one row, per column.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn add_sq_dev_row<E: SpinDtype>(acc: &mut [f64], x: &[E], mean: &[f64]) {
    for ((a, &v), &m) in acc.iter_mut().zip(x).zip(mean) {
        let d = v.as_f64() - m;
        *a += d * d;
    }
}

/// `acc += dy · (x − mean)` for one row, per column (BatchNorm's scale gradient before 1/σ).
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn add_centered_dy_row<E: SpinDtype>(acc: &mut [f64], x: &[E], gy: &[E], mean: &[f64]) {
    for (((a, &v), &g), &m) in acc.iter_mut().zip(x).zip(gy).zip(mean) {
        *a += g.as_f64() * (v.as_f64() - m);
    }
}

/// `acc += dy · x` for one row, per column.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn add_prod_row<E: SpinDtype>(acc: &mut [f64], x: &[E], gy: &[E]) {
    for ((a, &v), &g) in acc.iter_mut().zip(x).zip(gy) {
        *a += (g * v).as_f64();
    }
}

/// `out = a · dy + b · x + d` for one row, per column (BatchNorm's input gradient).
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn bn_dx_row<E: SpinDtype>(out: &mut [E], gy: &[E], x: &[E], (a, b, d): (&[E], &[E], &[E])) {
    for (j, o) in out.iter_mut().enumerate() {
        *o = a[j] * gy[j] + b[j] * x[j] + d[j];
    }
}

/// Backward of [`affine_fwd`]: (dL/dx, dL/ds, dL/dt).
pub fn affine_bwd<E: SpinDtype>(x: &[E], s: &[E], gy: &[E]) -> (Vec<E>, Vec<E>, Vec<E>) {
    let c = s.len();
    let rows = x.len() / c;
    let mut gx = zeros(x.len());
    gx.par_chunks_mut(c * BLOCK)
        .zip(gy.par_chunks(c * BLOCK))
        .for_each(|(gb, yb)| {
            for (gr, yr) in gb.chunks_mut(c).zip(yb.chunks(c)) {
                scale_row(gr, yr, s);
            }
        });
    let gs = col_sums(rows, c, |r, acc| {
        add_prod_row(acc, &x[r * c..][..c], &gy[r * c..][..c])
    });
    let gt = col_sums(rows, c, |r, acc| add_row(acc, &gy[r * c..][..c]));
    (gx, cast(&gs), cast(&gt))
}

/// Batch statistics of a BatchNorm in training mode.
#[derive(Clone, Debug)]
pub struct BnCache<E> {
    /// Per-channel batch mean.
    pub mean: Vec<E>,
    /// Per-channel biased batch variance.
    pub var: Vec<E>,
    /// Per-channel 1/√(var + eps).
    pub inv: Vec<E>,
}

/// BatchNorm over rows with batch statistics: returns y and (mean, biased var, 1/σ).
pub fn batch_norm_fwd<E: SpinDtype>(x: &[E], g: &[E], b: &[E], eps: f64) -> (Vec<E>, BnCache<E>) {
    let c = g.len();
    let rows = x.len() / c;
    let n = rows as f64;
    let mean = col_sums(rows, c, |r, acc| add_row(acc, &x[r * c..][..c]));
    let mean: Vec<f64> = mean.iter().map(|s| s / n).collect();
    let var = col_sums(rows, c, |r, acc| add_sq_dev_row(acc, &x[r * c..][..c], &mean));
    let var: Vec<f64> = var.iter().map(|s| s / n).collect();
    let inv: Vec<f64> = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    // y = x·(γ/σ) + (β − μ·γ/σ)
    let scale: Vec<E> = (0..c).map(|j| E::cast(g[j].as_f64() * inv[j])).collect();
    let shift: Vec<E> = (0..c)
        .map(|j| E::cast(b[j].as_f64() - mean[j] * g[j].as_f64() * inv[j]))
        .collect();
    let y = affine_fwd(x, &scale, &shift);
    (
        y,
        BnCache {
            mean: cast(&mean),
            var: cast(&var),
            inv: cast(&inv),
        },
    )
}

/// Backward of [`batch_norm_fwd`]: with x̂ = (x − μ)/σ, dβ = Σ dy, dγ = Σ dy·x̂,
/// dx = γ/(σN) · (N·dy − dβ − x̂·dγ).
pub fn batch_norm_bwd<E: SpinDtype>(
    x: &[E],
    g: &[E],
    cache: &BnCache<E>,
    gy: &[E],
) -> (Vec<E>, Vec<E>, Vec<E>) {
    let c = g.len();
    let rows = x.len() / c;
    let n = rows as f64;
    let mean: Vec<f64> = cache.mean.iter().map(|v| v.as_f64()).collect();
    let inv: Vec<f64> = cache.inv.iter().map(|v| v.as_f64()).collect();
    let gb = col_sums(rows, c, |r, acc| add_row(acc, &gy[r * c..][..c]));
    let gg = col_sums(rows, c, |r, acc| {
        add_centered_dy_row(acc, &x[r * c..][..c], &gy[r * c..][..c], &mean)
    });
    let gg: Vec<f64> = gg.iter().zip(&inv).map(|(s, i)| s * i).collect();
    // dx = a·dy + b·x + d per column, with a = γ/σ, b = −γ/σ·dγ/(σN), d = −γ/σ·(dβ − μ·dγ/σ)/N.
    let a: Vec<E> = (0..c).map(|j| E::cast(g[j].as_f64() * inv[j])).collect();
    let bx: Vec<E> = (0..c)
        .map(|j| E::cast(-g[j].as_f64() * inv[j] * inv[j] * gg[j] / n))
        .collect();
    let d: Vec<E> = (0..c)
        .map(|j| E::cast(-g[j].as_f64() * inv[j] * (gb[j] - mean[j] * inv[j] * gg[j]) / n))
        .collect();
    let mut gx = zeros(x.len());
    gx.par_chunks_mut(c * BLOCK)
        .zip(x.par_chunks(c * BLOCK))
        .zip(gy.par_chunks(c * BLOCK))
        .for_each(|((ob, xb), gb_)| {
            for ((or, xr), gr) in ob.chunks_mut(c).zip(xb.chunks(c)).zip(gb_.chunks(c)) {
                bn_dx_row(or, gr, xr, (&a, &bx, &d));
            }
        });
    (gx, cast(&gg), cast(&gb))
}

/// LayerNorm over each row: returns y and per-row (mean, 1/σ).
pub fn layer_norm_fwd<E: SpinDtype>(x: &[E], g: &[E], b: &[E], eps: f64) -> (Vec<E>, Vec<f64>) {
    let c = g.len();
    let mut y = zeros(x.len());
    let mut stats = vec![0.0; 2 * (x.len() / c)];
    y.par_chunks_mut(c)
        .zip(x.par_chunks(c))
        .zip(stats.par_chunks_mut(2))
        .for_each(|((yr, xr), st)| {
            let (mean, inv) = layer_norm_row(yr, xr, (g, b), eps);
            st[0] = mean;
            st[1] = inv;
        });
    (y, stats)
}

/// One row of [`layer_norm_fwd`], in f64; returns (mean, 1/σ). The statistics were one serial
/// chain of adds per row, 2.4 % of a DeiT-Tiny training step.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn layer_norm_row<E: SpinDtype>(y: &mut [E], x: &[E], (g, b): (&[E], &[E]), eps: f64) -> (f64, f64) {
    let (mean, inv) = row_stats(x, eps);
    for (((o, &v), &g), &b) in y.iter_mut().zip(x).zip(g).zip(b) {
        *o = E::cast((v.as_f64() - mean) * inv * g.as_f64() + b.as_f64());
    }
    (mean, inv)
}

/// A row's mean and 1/sqrt(biased variance + eps) in f64, with lane accumulators (inlined into
/// its multiversioned callers, so it runs on their vector units).
#[inline(always)]
fn row_stats<E: SpinDtype>(x: &[E], eps: f64) -> (f64, f64) {
    let c = x.len();
    let mut acc = [0.0f64; F32_LANES];
    let mut tail = x.chunks_exact(F32_LANES);
    for ch in &mut tail {
        for l in 0..F32_LANES {
            acc[l] += ch[l].as_f64();
        }
    }
    let sum = tail.remainder().iter().map(|v| v.as_f64()).sum::<f64>() + acc.iter().sum::<f64>();
    let mean = sum / c as f64;
    let mut acc = [0.0f64; F32_LANES];
    let mut tail = x.chunks_exact(F32_LANES);
    for ch in &mut tail {
        for l in 0..F32_LANES {
            let v = ch[l].as_f64() - mean;
            acc[l] += v * v;
        }
    }
    let sq = tail
        .remainder()
        .iter()
        .map(|v| (v.as_f64() - mean).powi(2))
        .sum::<f64>();
    let var = (sq + acc.iter().sum::<f64>()) / c as f64;
    (mean, 1.0 / (var + eps).sqrt())
}

/// Backward of [`layer_norm_fwd`]: with ĝ = dy·γ, dx = (ĝ − mean(ĝ) − x̂·mean(ĝ·x̂))/σ per row,
/// added onto `gx` (dfdx's gradient buffer: no buffer of its own to zero and add); returns dγ =
/// Σ dy·x̂ and dβ = Σ dy. One pass over the rows: per block of `BLOCK` (64) rows their dx and the
/// block's column sums, the blocks' sums added in order, as in [`col_sums`] (its two passes, a
/// separate dx pass and the add took 4.5 % of a DeiT-Tiny training step).
pub fn layer_norm_bwd<E: SpinDtype>(
    x: &[E],
    g: &[E],
    stats: &[f64],
    gy: &[E],
    gx: &mut [E],
) -> (Vec<E>, Vec<E>) {
    let c = g.len();
    assert!(
        x.len() == gx.len() && gy.len() == gx.len() && stats.len() == 2 * (x.len() / c.max(1)),
        "layer_norm_bwd: sizes"
    );
    let partials: Vec<[Vec<f64>; 2]> = gx
        .par_chunks_mut(BLOCK * c.max(1))
        .enumerate()
        .map(|(block, gxb)| {
            let mut sums = [vec![0.0; c], vec![0.0; c]];
            for (i, gr) in gxb.chunks_mut(c).enumerate() {
                let r = block * BLOCK + i;
                let rows = (&x[r * c..][..c], &gy[r * c..][..c]);
                layer_norm_bwd_row(gr, rows, g, (stats[2 * r], stats[2 * r + 1]), &mut sums);
            }
            sums
        })
        .collect();
    let (mut gg, mut gb) = (vec![0.0; c], vec![0.0; c]);
    for [pg, pb] in partials {
        gg.iter_mut().zip(pg).for_each(|(o, v)| *o += v);
        gb.iter_mut().zip(pb).for_each(|(o, v)| *o += v);
    }
    (cast(&gg), cast(&gb))
}

/// One row of LayerNorm's backward: `gx += (ĝ − mean(ĝ) − x̂·mean(ĝ ⊙ x̂))·inv`, with x̂ = (x −
/// mean)·inv and ĝ = dy ⊙ g, and `sums` (dγ, dβ) += (dy ⊙ x̂, dy); lane accumulators, since one
/// running sum is a serial chain the compiler may not reorder.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn layer_norm_bwd_row<E: SpinDtype>(
    gx: &mut [E],
    (x, gy): (&[E], &[E]),
    g: &[E],
    (mean, inv): (f64, f64),
    [dg, db]: &mut [Vec<f64>; 2],
) {
    let c = g.len();
    let (mut a1, mut a2) = ([0.0f64; F32_LANES], [0.0f64; F32_LANES]);
    for j0 in (0..c).step_by(F32_LANES) {
        for l in 0..F32_LANES.min(c - j0) {
            let j = j0 + l;
            let gh = gy[j].as_f64() * g[j].as_f64();
            a1[l] += gh;
            a2[l] += gh * (x[j].as_f64() - mean) * inv;
        }
    }
    let (m1, m2) = (
        a1.iter().sum::<f64>() / c as f64,
        a2.iter().sum::<f64>() / c as f64,
    );
    for j in 0..c {
        let dy = gy[j].as_f64();
        let xhat = (x[j].as_f64() - mean) * inv;
        gx[j] = E::cast(gx[j].as_f64() + (dy * g[j].as_f64() - m1 - xhat * m2) * inv);
        dg[j] += dy * xhat;
        db[j] += dy;
    }
}

/// LayerNorm (eps 1e-6) of each row of `x` into `out`; statistics in f64 as the training kernel.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub fn layer_norm_rows<E: SpinDtype>(out: &mut [E], x: &[E], g: &[E], b: &[E]) {
    let c = g.len();
    for (o, xr) in out.chunks_mut(c).zip(x.chunks(c)) {
        let (mean, inv) = row_stats(xr, LN_EPS);
        let (m, s) = (E::cast(mean), E::cast(inv));
        // Zipped rather than indexed: four bounds checks per value kept this loop scalar.
        for (((o, &v), &g), &b) in o.iter_mut().zip(xr).zip(g).zip(b) {
            *o = (v - m) * s * g + b;
        }
    }
}
