//! Elementwise host loops: GELU and its gradient, bias rows, gradient accumulation. Plain loops
//! over chunks (not a per-element rayon map) so the compiler vectorises them; compiled for
//! AVX-512 and AVX2 too and picked at run time.
use crate::base::SpinDtype;
use multiversion::multiversion;
use rayon::prelude::*;

/// Elements per rayon task of elementwise kernels.
pub const CHUNK: usize = 16 * 1024;

/// GELU of a chunk into `y`.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub fn gelu_chunk<E: SpinDtype>(y: &mut [E], x: &[E]) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o = v.gelu_and_grad().0;
    }
}

/// `gx += gy · GELU'(x)` over a chunk.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub fn gelu_grad_chunk<E: SpinDtype>(gx: &mut [E], x: &[E], gy: &[E]) {
    for ((a, &v), &g) in gx.iter_mut().zip(x).zip(gy) {
        *a += g * v.gelu_and_grad().1;
    }
}

/// GELU of every value of `x` into `y`, split across threads.
pub fn gelu<E: SpinDtype>(y: &mut [E], x: &[E]) {
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(yo, xi)| gelu_chunk(yo, xi));
}

/// `gx += gy · GELU'(x)`, split across threads.
pub fn gelu_grad<E: SpinDtype>(gx: &mut [E], x: &[E], gy: &[E]) {
    gx.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK).zip(gy.par_chunks(CHUNK)))
        .for_each(|(a, (xi, gi))| gelu_grad_chunk(a, xi, gi));
}

/// `dst += src` over a chunk.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn add_chunk<E: SpinDtype>(dst: &mut [E], src: &[E]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d += s;
    }
}

/// Adds `src` into `dst` (a gradient buffer), split across threads.
pub fn add_into<E: SpinDtype>(dst: &mut [E], src: &[E]) {
    assert_eq!(dst.len(), src.len(), "add_into: lengths differ");
    dst.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(d, s)| add_chunk(d, s));
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
/// Adds the bias `b` to every row of `out`.
pub fn add_bias_rows<E: SpinDtype>(out: &mut [E], b: &[E]) {
    for row in out.chunks_mut(b.len()) {
        for (o, &v) in row.iter_mut().zip(b) {
            *o += v;
        }
    }
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
/// GELU of every value, in place.
pub fn gelu_inplace<E: SpinDtype>(h: &mut [E]) {
    for v in h.iter_mut() {
        *v = v.gelu_and_grad().0;
    }
}
