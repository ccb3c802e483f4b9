//! The attention core on timm's qkv layout, on host buffers: one task per (image, block of query
//! rows), every head in it, with a vectorised softmax.
use super::elementwise::zeros;
use super::gemm::{matmul, MatRef};
use crate::base::{SpinDtype, F32_LANES};
use multiversion::multiversion;
use rayon::prelude::*;

/// `softmax(q·kᵀ/√head_dim)·v` for every head, on timm's qkv layout: `qkv` `(B·N, 3·D)` with
/// columns (3, heads, head_dim), into `out` `(B·N, D)`. q, k and v are read in place (strided).
/// In f32 on AVX-512 with heads of whole vectors, the fused tiles of [`super::attention_tile`].
pub fn attention_core<E: SpinDtype>(qkv: &[E], out: &mut [E], batch: usize, heads: usize, d: usize) {
    assert_eq!(
        qkv.len(),
        3 * out.len(),
        "attention: qkv must be three times the output"
    );
    let hd = d / heads;
    #[cfg(target_arch = "x86_64")]
    if super::f32_avx512::<E>() && super::attention_tile::applies(hd) {
        let out = super::as_f32_mut(out);
        return super::attention_tile::attention_core_f32(super::as_f32(qkv), out, batch, heads, d);
    }
    let rows = out.len() / d;
    let n = rows / batch;
    let scale = E::cast((hd as f64).powf(-0.5));
    // Blocks of query rows per image: enough tasks to keep every thread busy at batch 1.
    let per_image = (2 * rayon::current_num_threads()).div_ceil(batch).max(1);
    let qb = n.div_ceil(per_image);
    let mut tasks: Vec<(usize, usize, &mut [E])> = Vec::new();
    let mut rest = out;
    for b in 0..batch {
        let mut q0 = 0;
        while q0 < n {
            let q1 = (q0 + qb).min(n);
            let (head, tail) = rest.split_at_mut((q1 - q0) * d);
            tasks.push((b, q0, head));
            rest = tail;
            q0 = q1;
        }
    }
    // kᵀ per (image, head), `(head_dim, n)` row-major, made once: read in place, k would be
    // gathered column by column in every task's product.
    let mut kt = zeros(rows * d);
    kt.par_chunks_mut(hd * n).enumerate().for_each(|(bh, t)| {
        let (b, h) = (bh / heads, bh % heads);
        for i in 0..n {
            let k = &qkv[(b * n + i) * 3 * d + d + h * hd..][..hd];
            for (l, &v) in k.iter().enumerate() {
                t[l * n + i] = v;
            }
        }
    });
    tasks.into_par_iter().for_each(|(b, q0, o)| {
        let m = o.len() / d;
        let img = &qkv[b * n * 3 * d..(b + 1) * n * 3 * d];
        let mut s = vec![E::zero(); m * n];
        for h in 0..heads {
            let q = MatRef::strided(&img[q0 * 3 * d + h * hd..], m, hd, 3 * d);
            let k_t = MatRef::row_major(&kt[(b * heads + h) * hd * n..][..hd * n], hd, n);
            let v = MatRef::strided(&img[2 * d + h * hd..], n, hd, 3 * d);
            matmul(&mut s, n, q, k_t, scale, false);
            softmax_rows(&mut s, n);
            matmul(
                &mut o[h * hd..],
                d,
                MatRef::row_major(&s, m, n),
                v,
                E::one(),
                false,
            );
        }
    });
}

/// The keys of every (image, head) packed for [`attention_rows`], where the fused f32 kernel
/// ([`super::attention_tile`]) takes this dtype and head size; `None` elsewhere (then
/// [`attention_core`] is the way).
pub fn packed_keys<E: SpinDtype>(qkv: &[E], batch: usize, heads: usize, d: usize) -> Option<Vec<Vec<f32>>> {
    #[cfg(target_arch = "x86_64")]
    if super::f32_avx512::<E>() && super::attention_tile::applies(d / heads) {
        return Some(super::attention_tile::pack_all_keys(
            super::as_f32(qkv),
            batch,
            heads,
            d,
        ));
    }
    let _ = (qkv, batch, heads, d);
    None
}

/// Attention output rows `rows` of `B·N` (images of `n` tokens) into `out` (`rows.len() × d`),
/// on this thread, with keys from [`packed_keys`]: a pass over row chunks can run its attention
/// and what follows without a barrier in between.
pub fn attention_rows<E: SpinDtype>(
    qkv: &[E],
    keys: &[Vec<f32>],
    shape: (usize, usize, usize),
    rows: std::ops::Range<usize>,
    out: &mut [E],
) {
    #[cfg(target_arch = "x86_64")]
    super::attention_tile::attention_rows_f32(super::as_f32(qkv), keys, shape, rows, super::as_f32_mut(out));
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (qkv, keys, shape, rows, out);
        unreachable!("attention_rows: `packed_keys` makes no keys on this CPU");
    }
}

/// Tokens per image, head size and the scores' scale for `outputs` values of `batch` images of `d`
/// features, checking the kept softmax's size `probs`.
fn shapes<E: SpinDtype>(
    outputs: usize,
    probs: usize,
    (batch, heads, d): (usize, usize, usize),
) -> (usize, usize, E) {
    let n = outputs / d / batch.max(1);
    assert_eq!(
        outputs,
        batch * n * d,
        "attention: outputs are not {batch} images of {d} features"
    );
    assert_eq!(probs, batch * heads * n * n, "attention: probabilities' size");
    let hd = d / heads;
    (n, hd, E::cast((hd as f64).powf(-0.5)))
}

/// Training's forward: [`attention_core`], one task per image, also keeping every head's
/// softmax in `probs` `(B, heads, N, N)` for [`attention_core_backward`]: in f32 on AVX-512 the
/// fused tiles ([`super::attention_tile::attention_core_keep_f32`]), otherwise gemm's products.
pub fn attention_core_keep<E: SpinDtype>(
    qkv: &[E],
    out: &mut [E],
    probs: &mut [E],
    (batch, heads, d): (usize, usize, usize),
) {
    assert_eq!(
        qkv.len(),
        3 * out.len(),
        "attention: qkv must be three times the output"
    );
    #[cfg(target_arch = "x86_64")]
    if super::f32_avx512::<E>() && super::attention_tile::applies(d / heads.max(1)) {
        let (out, probs) = (super::as_f32_mut(out), super::as_f32_mut(probs));
        return super::attention_tile::attention_core_keep_f32(
            super::as_f32(qkv),
            out,
            probs,
            (batch, heads, d),
        );
    }
    let (n, hd, scale) = shapes::<E>(out.len(), probs.len(), (batch, heads, d));
    out.par_chunks_mut(n * d)
        .zip(probs.par_chunks_mut(heads * n * n))
        .enumerate()
        .for_each(|(b, (o, pb))| {
            let img = &qkv[b * n * 3 * d..][..n * 3 * d];
            let part = |i: usize, h: usize| MatRef::strided(&img[i * d + h * hd..], n, hd, 3 * d);
            for (h, s) in pb.chunks_mut(n * n).enumerate() {
                matmul(s, n, part(0, h), part(1, h).t(), scale, false);
                softmax_rows(s, n);
                matmul(
                    &mut o[h * hd..],
                    d,
                    MatRef::row_major(s, n, n),
                    part(2, h),
                    E::one(),
                    false,
                );
            }
        });
}

/// The attention core's backward, one task per image: from the kept softmax `P` and the
/// output's gradient dO, adds onto `dqkv` `(B·N, 3·D)` on timm's layout (a gradient buffer: no
/// buffer of its own to zero and add). Per head:
/// dV = Pᵀ·dO, dP = dO·Vᵀ, dS = P ⊙ (dP − rowsum(dP ⊙ P)), dQ = s·dS·K, dK = s·dSᵀ·Q.
pub fn attention_core_backward<E: SpinDtype>(
    qkv: &[E],
    probs: &[E],
    gout: &[E],
    dqkv: &mut [E],
    (batch, heads, d): (usize, usize, usize),
) {
    assert!(
        qkv.len() == 3 * gout.len() && dqkv.len() == qkv.len(),
        "attention: qkv and its gradient must be three times the output"
    );
    let (n, hd, scale) = shapes::<E>(gout.len(), probs.len(), (batch, heads, d));
    dqkv.par_chunks_mut(n * 3 * d)
        .zip(probs.par_chunks(heads * n * n))
        .enumerate()
        .for_each(|(b, (g, pb))| {
            let img = &qkv[b * n * 3 * d..][..n * 3 * d];
            let go = &gout[b * n * d..][..n * d];
            let part = |i: usize, h: usize| MatRef::strided(&img[i * d + h * hd..], n, hd, 3 * d);
            let mut ds = vec![E::zero(); n * n];
            for (h, p) in pb.chunks(n * n).enumerate() {
                let pm = MatRef::row_major(p, n, n);
                let go_h = MatRef::strided(&go[h * hd..], n, hd, d);
                matmul(&mut g[2 * d + h * hd..], 3 * d, pm.t(), go_h, E::one(), true);
                matmul(&mut ds, n, go_h, part(2, h).t(), E::one(), false);
                softmax_grad_rows(&mut ds, p, n);
                let dsm = MatRef::row_major(&ds, n, n);
                matmul(&mut g[h * hd..], 3 * d, dsm, part(1, h), scale, true);
                matmul(&mut g[d + h * hd..], 3 * d, dsm.t(), part(0, h), scale, true);
            }
        });
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
/// The softmax's backward on every row (rows of `n`), in place: `dp` (dL/dP) becomes dL/dS =
/// `p ⊙ (dp − Σ dp ⊙ p)`. Sixteen accumulators for the row's sum, as in [`softmax_rows`] (one
/// running sum was a serial chain of adds, 1.3 % of a DeiT-Tiny training step on one thread).
pub fn softmax_grad_rows<E: SpinDtype>(dp: &mut [E], p: &[E], n: usize) {
    for (dr, pr) in dp.chunks_mut(n).zip(p.chunks(n)) {
        let mut acc = [E::zero(); F32_LANES];
        let (dc, pc) = (dr.chunks_exact(F32_LANES), pr.chunks_exact(F32_LANES));
        let tail = dc
            .remainder()
            .iter()
            .zip(pc.remainder())
            .fold(E::zero(), |a, (&x, &y)| a + x * y);
        for (d, q) in dc.zip(pc) {
            for l in 0..F32_LANES {
                acc[l] += d[l] * q[l];
            }
        }
        let dot = acc.iter().fold(tail, |a, &b| a + b);
        for (x, &y) in dr.iter_mut().zip(pr) {
            *x = y * (*x - dot);
        }
    }
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
/// Softmax of every row of `s` (rows of `n`), in place; sixteen independent accumulators per
/// reduction, since one running max or sum is a serial chain the compiler may not reorder.
pub fn softmax_rows<E: SpinDtype>(s: &mut [E], n: usize) {
    for row in s.chunks_mut(n) {
        let mut m = [E::neg_infinity(); F32_LANES];
        let mut tail = row.chunks_exact(F32_LANES);
        for c in &mut tail {
            for l in 0..F32_LANES {
                m[l] = if c[l] > m[l] { c[l] } else { m[l] };
            }
        }
        let max = tail
            .remainder()
            .iter()
            .chain(&m)
            .fold(E::neg_infinity(), |a, &b| a.max(b));
        let mut acc = [E::zero(); F32_LANES];
        let mut tail = row.chunks_exact_mut(F32_LANES);
        for c in &mut tail {
            for l in 0..F32_LANES {
                c[l] = (c[l] - max).exp_nonpos();
                acc[l] += c[l];
            }
        }
        let mut sum = E::zero();
        for v in tail.into_remainder() {
            *v = (*v - max).exp_nonpos();
            sum += *v;
        }
        let inv = E::one() / acc.iter().fold(sum, |a, &b| a + b);
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The softmax's backward against its definition (f64, 1e-12), on rows of 37: two whole
    /// 16-lane blocks and a tail.
    #[test]
    fn softmax_grad_rows_match_the_definition() {
        let n = 37;
        let p: Vec<f64> = crate::kernels::test_values::<f64>(3 * n, 1)
            .iter()
            .map(|x| x + 0.5)
            .collect();
        let dp: Vec<f64> = crate::kernels::test_values(3 * n, 2);
        let mut got = dp.clone();
        softmax_grad_rows(&mut got, &p, n);
        for r in 0..3 {
            let row = r * n..(r + 1) * n;
            let dot: f64 = dp[row.clone()]
                .iter()
                .zip(&p[row.clone()])
                .map(|(a, b)| a * b)
                .sum();
            for i in row {
                let want = p[i] * (dp[i] - dot);
                assert!((got[i] - want).abs() < 1e-12, "({r}, {i}): {} vs {want}", got[i]);
            }
        }
    }
}
