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

/// Whether LayerNorm's arithmetic is in f32: for f32 values, as PyTorch computes it (its CPU
/// kernel accumulates in f32); other dtypes in f64. In f64 DeiT-Tiny's LayerNorms were 5 % of a
/// training step.
fn in_f32<E: SpinDtype>() -> bool {
    std::any::TypeId::of::<E>() == std::any::TypeId::of::<f32>()
}

/// `v` as type `A`: itself when E is A (`cast` from f64 checks the range, which kept the loops
/// from vectorising), otherwise through f64.
#[inline(always)]
fn to<A: SpinDtype, E: SpinDtype>(v: E) -> A {
    if std::any::TypeId::of::<A>() == std::any::TypeId::of::<E>() {
        // SAFETY: A and E are the same type.
        unsafe { std::mem::transmute_copy(&v) }
    } else {
        A::cast(v.as_f64())
    }
}

/// LayerNorm over each row: returns y and per-row (mean, 1/σ).
pub fn layer_norm_fwd<E: SpinDtype>(x: &[E], g: &[E], b: &[E], eps: f64) -> (Vec<E>, Vec<f64>) {
    let mut y = zeros(x.len());
    let stats = layer_norm_fwd_into(&mut y, x, g, b, eps);
    (y, stats)
}

/// [`layer_norm_fwd`] into `y` (overwritten); returns per-row (mean, 1/σ).
pub fn layer_norm_fwd_into<E: SpinDtype>(y: &mut [E], x: &[E], g: &[E], b: &[E], eps: f64) -> Vec<f64> {
    if in_f32::<E>() {
        layer_norm_fwd_in::<f32, E>(y, x, g, b, eps)
    } else {
        layer_norm_fwd_in::<f64, E>(y, x, g, b, eps)
    }
}

/// [`layer_norm_fwd_into`] with arithmetic in `A`.
fn layer_norm_fwd_in<A: SpinDtype, E: SpinDtype>(
    y: &mut [E],
    x: &[E],
    g: &[E],
    b: &[E],
    eps: f64,
) -> Vec<f64> {
    let c = g.len();
    assert_eq!(y.len(), x.len(), "layer norm: output size");
    let mut stats = vec![0.0; 2 * (x.len() / c)];
    y.par_chunks_mut(c)
        .zip(x.par_chunks(c))
        .zip(stats.par_chunks_mut(2))
        .for_each(|((yr, xr), st)| {
            let (mean, inv) = layer_norm_row::<A, E>(yr, xr, (g, b), eps);
            st[0] = mean.as_f64();
            st[1] = inv.as_f64();
        });
    stats
}

/// One row of [`layer_norm_fwd`], in `A`; returns (mean, 1/σ). The statistics were one serial
/// chain of adds per row, 2.4 % of a DeiT-Tiny training step.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn layer_norm_row<A: SpinDtype, E: SpinDtype>(
    y: &mut [E],
    x: &[E],
    (g, b): (&[E], &[E]),
    eps: f64,
) -> (A, A) {
    let (mean, inv) = row_stats::<A, E>(x, eps);
    for (((o, &v), &g), &b) in y.iter_mut().zip(x).zip(g).zip(b) {
        *o = to((to::<A, E>(v) - mean) * inv * to(g) + to(b));
    }
    (mean, inv)
}

/// A row's mean and 1/sqrt(biased variance + eps) in `A`, with lane accumulators (inlined into
/// its multiversioned callers, so it runs on their vector units).
#[inline(always)]
fn row_stats<A: SpinDtype, E: SpinDtype>(x: &[E], eps: f64) -> (A, A) {
    let c = A::cast(x.len() as f64);
    let mut acc = [A::zero(); F32_LANES];
    let mut tail = x.chunks_exact(F32_LANES);
    for ch in &mut tail {
        for l in 0..F32_LANES {
            acc[l] += to(ch[l]);
        }
    }
    let sum = tail.remainder().iter().fold(A::zero(), |s, &v| s + to(v));
    let mean = acc.iter().fold(sum, |s, &v| s + v) / c;
    let mut acc = [A::zero(); F32_LANES];
    let mut tail = x.chunks_exact(F32_LANES);
    for ch in &mut tail {
        for l in 0..F32_LANES {
            let v = to::<A, E>(ch[l]) - mean;
            acc[l] += v * v;
        }
    }
    let sq = tail.remainder().iter().fold(A::zero(), |s, &v| {
        let d = to::<A, E>(v) - mean;
        s + d * d
    });
    let var = acc.iter().fold(sq, |s, &v| s + v) / c;
    (mean, A::one() / (var + A::cast(eps)).sqrt())
}

/// Backward of [`layer_norm_fwd`]: with ĝ = dy·γ, dx = (ĝ − mean(ĝ) − x̂·mean(ĝ·x̂))/σ per row,
/// added onto `gx` (dfdx's gradient buffer: no buffer of its own to zero and add); returns dγ =
/// Σ dy·x̂ and dβ = Σ dy. One pass over the rows: per block of `BLOCK` (64) rows their dx and the
/// block's column sums, the blocks' sums added in order in f64, as in [`col_sums`] (its two
/// passes, a separate dx pass and the add took 4.5 % of a DeiT-Tiny training step).
pub fn layer_norm_bwd<E: SpinDtype>(
    x: &[E],
    g: &[E],
    stats: &[f64],
    gy: &[E],
    gx: &mut [E],
) -> (Vec<E>, Vec<E>) {
    if in_f32::<E>() {
        layer_norm_bwd_in::<f32, E>(x, g, stats, gy, gx)
    } else {
        layer_norm_bwd_in::<f64, E>(x, g, stats, gy, gx)
    }
}

/// [`layer_norm_bwd`] with arithmetic in `A`.
fn layer_norm_bwd_in<A: SpinDtype, E: SpinDtype>(
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
    let partials: Vec<[Vec<A>; 2]> = gx
        .par_chunks_mut(BLOCK * c.max(1))
        .enumerate()
        .map(|(block, gxb)| {
            let mut sums = [vec![A::zero(); c], vec![A::zero(); c]];
            for (i, gr) in gxb.chunks_mut(c).enumerate() {
                let r = block * BLOCK + i;
                let rows = (&x[r * c..][..c], &gy[r * c..][..c]);
                let st = (A::cast(stats[2 * r]), A::cast(stats[2 * r + 1]));
                layer_norm_bwd_row(gr, rows, g, st, &mut sums);
            }
            sums
        })
        .collect();
    let (mut gg, mut gb) = (vec![0.0; c], vec![0.0; c]);
    for [pg, pb] in partials {
        gg.iter_mut().zip(pg).for_each(|(o, v)| *o += v.as_f64());
        gb.iter_mut().zip(pb).for_each(|(o, v)| *o += v.as_f64());
    }
    (cast(&gg), cast(&gb))
}

/// One row of LayerNorm's backward in `A`: `gx += (ĝ − mean(ĝ) − x̂·mean(ĝ ⊙ x̂))·inv`, with x̂ =
/// (x − mean)·inv and ĝ = dy ⊙ g, and `sums` (dγ, dβ) += (dy ⊙ x̂, dy); lane accumulators, since
/// one running sum is a serial chain the compiler may not reorder.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn layer_norm_bwd_row<A: SpinDtype, E: SpinDtype>(
    gx: &mut [E],
    (x, gy): (&[E], &[E]),
    g: &[E],
    (mean, inv): (A, A),
    [dg, db]: &mut [Vec<A>; 2],
) {
    let c = g.len();
    // Whole lanes first (a loop of variable length per lane stayed scalar), then the tail.
    let (mut a1, mut a2) = ([A::zero(); F32_LANES], [A::zero(); F32_LANES]);
    let whole = c - c % F32_LANES;
    let lanes = gy[..whole]
        .chunks_exact(F32_LANES)
        .zip(g[..whole].chunks_exact(F32_LANES));
    for ((gy, g), x) in lanes.zip(x[..whole].chunks_exact(F32_LANES)) {
        for l in 0..F32_LANES {
            let gh = to::<A, E>(gy[l]) * to(g[l]);
            a1[l] += gh;
            a2[l] += gh * (to::<A, E>(x[l]) - mean) * inv;
        }
    }
    for j in whole..c {
        let gh = to::<A, E>(gy[j]) * to(g[j]);
        a1[0] += gh;
        a2[0] += gh * (to::<A, E>(x[j]) - mean) * inv;
    }
    let n = A::cast(c as f64);
    let m1 = a1.iter().fold(A::zero(), |s, &v| s + v) / n;
    let m2 = a2.iter().fold(A::zero(), |s, &v| s + v) / n;
    // Zipped rather than indexed: bounds checks kept this loop scalar.
    let sums = dg.iter_mut().zip(db.iter_mut());
    for ((((o, &x), &gy), &g), (dg, db)) in gx.iter_mut().zip(x).zip(gy).zip(g).zip(sums) {
        let dy = to::<A, E>(gy);
        let xhat = (to::<A, E>(x) - mean) * inv;
        *o = to(to::<A, E>(*o) + (dy * to(g) - m1 - xhat * m2) * inv);
        *dg += dy * xhat;
        *db += dy;
    }
}

/// LayerNorm (eps 1e-6) of each row of `x` into `out`, in the training kernel's arithmetic.
pub fn layer_norm_rows<E: SpinDtype>(out: &mut [E], x: &[E], g: &[E], b: &[E]) {
    if in_f32::<E>() {
        layer_norm_rows_in::<f32, E>(out, x, g, b)
    } else {
        layer_norm_rows_in::<f64, E>(out, x, g, b)
    }
}

/// [`layer_norm_rows`] with arithmetic in `A`.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn layer_norm_rows_in<A: SpinDtype, E: SpinDtype>(out: &mut [E], x: &[E], g: &[E], b: &[E]) {
    let c = g.len();
    for (o, xr) in out.chunks_mut(c).zip(x.chunks(c)) {
        let (mean, inv) = row_stats::<A, E>(xr, LN_EPS);
        let (m, s) = (E::cast(mean.as_f64()), E::cast(inv.as_f64()));
        // Zipped rather than indexed: four bounds checks per value kept this loop scalar.
        for (((o, &v), &g), &b) in o.iter_mut().zip(xr).zip(g).zip(b) {
            *o = (v - m) * s * g + b;
        }
    }
}
