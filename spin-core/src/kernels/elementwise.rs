//! Elementwise host loops: GELU and its gradient, bias rows, gradient accumulation. Plain loops
//! over chunks (not a per-element rayon map) so the compiler vectorises them; compiled for
//! AVX-512 and AVX2 too and picked at run time. GELU in f32 on AVX-512 takes [`avx512::gelu16`].
use super::{as_f32, as_f32_mut, f32_avx512};
use crate::base::{SpinDtype, F32_LANES};
use multiversion::multiversion;
use rayon::prelude::*;

/// Elements per rayon task of elementwise kernels.
pub const CHUNK: usize = 16 * 1024;

/// GELU of a chunk into `y`.
pub fn gelu_chunk<E: SpinDtype>(y: &mut [E], x: &[E]) {
    assert_eq!(y.len(), x.len(), "gelu: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if f32_avx512::<E>() {
        // SAFETY: AVX-512F was detected; `y` and `x` have the same length.
        return unsafe { avx512::gelu_rows(as_f32_mut(y), Some(as_f32(x)), None) };
    }
    gelu_chunk_portable(y, x);
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn gelu_chunk_portable<E: SpinDtype>(y: &mut [E], x: &[E]) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o = v.gelu_and_grad().0;
    }
}

/// `gx += gy · GELU'(x)` over a chunk.
pub fn gelu_grad_chunk<E: SpinDtype>(gx: &mut [E], x: &[E], gy: &[E]) {
    assert!(
        gx.len() == x.len() && gy.len() == x.len(),
        "gelu_grad: lengths differ"
    );
    #[cfg(target_arch = "x86_64")]
    if f32_avx512::<E>() {
        // SAFETY: AVX-512F was detected; the three slices have the same length.
        return unsafe { avx512::gelu_rows(as_f32_mut(gx), Some(as_f32(x)), Some(as_f32(gy))) };
    }
    gelu_grad_chunk_portable(gx, x, gy);
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn gelu_grad_chunk_portable<E: SpinDtype>(gx: &mut [E], x: &[E], gy: &[E]) {
    for ((a, &v), &g) in gx.iter_mut().zip(x).zip(gy) {
        *a += g * v.gelu_and_grad().1;
    }
}

/// `h = gy · GELU'(h)` over a chunk: a fused op's own pre-activation buffer turned into its
/// gradient, where [`gelu_grad_chunk`] would add into a zeroed one.
pub fn gelu_grad_in_place_chunk<E: SpinDtype>(h: &mut [E], gy: &[E]) {
    assert_eq!(h.len(), gy.len(), "gelu_grad_in_place: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if f32_avx512::<E>() {
        // SAFETY: AVX-512F was detected; the two slices have the same length.
        return unsafe { avx512::gelu_rows(as_f32_mut(h), None, Some(as_f32(gy))) };
    }
    gelu_grad_in_place_portable(h, gy);
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn gelu_grad_in_place_portable<E: SpinDtype>(h: &mut [E], gy: &[E]) {
    for (v, &g) in h.iter_mut().zip(gy) {
        *v = g * v.gelu_and_grad().1;
    }
}

/// `h = gy · GELU'(h)`, split across threads.
pub fn gelu_grad_in_place<E: SpinDtype>(h: &mut [E], gy: &[E]) {
    h.par_chunks_mut(CHUNK)
        .zip(gy.par_chunks(CHUNK))
        .for_each(|(hc, gc)| gelu_grad_in_place_chunk(hc, gc));
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

/// `len` zeros, written across threads. `vec![0; len]` is calloc, which clears a reused block with
/// one memset on the calling thread: in a DeiT-Tiny training step on two threads, the outputs'
/// and gradients' memsets were 8 % of the time, most of it with the other core idle.
pub fn zeros<E: SpinDtype>(len: usize) -> Vec<E> {
    let mut v: Vec<E> = Vec::with_capacity(len);
    v.spare_capacity_mut()[..len]
        .par_chunks_mut(CHUNK)
        .for_each(|c| c.fill(std::mem::MaybeUninit::new(E::zero())));
    // SAFETY: the chunks above cover the first `len` slots, and each was written.
    unsafe { v.set_len(len) };
    v
}

/// A copy of `src`, written across threads: a residual's sum starts from a copy of the skip, and
/// one memcpy per block kept a core idle.
pub fn copied<E: SpinDtype>(src: &[E]) -> Vec<E> {
    let mut v: Vec<E> = Vec::with_capacity(src.len());
    v.spare_capacity_mut()[..src.len()]
        .par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(d, s)| {
            for (d, &s) in d.iter_mut().zip(s) {
                d.write(s);
            }
        });
    // SAFETY: the chunks above cover the first `src.len()` slots, and each was written.
    unsafe { v.set_len(src.len()) };
    v
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

/// `out = a + b` over a chunk.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn sum_chunk<E: SpinDtype>(out: &mut [E], a: &[E], b: &[E]) {
    for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
        *o = x + y;
    }
}

/// `out = a + b`, split across threads.
pub fn sum_into<E: SpinDtype>(out: &mut [E], a: &[E], b: &[E]) {
    assert!(
        a.len() == out.len() && b.len() == out.len(),
        "sum_into: lengths differ"
    );
    out.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(o, (x, y))| sum_chunk(o, x, y));
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

/// GELU of every value, in place.
pub fn gelu_inplace<E: SpinDtype>(h: &mut [E]) {
    #[cfg(target_arch = "x86_64")]
    if f32_avx512::<E>() {
        // SAFETY: AVX-512F was detected.
        return unsafe { avx512::gelu_rows(as_f32_mut(h), None, None) };
    }
    gelu_inplace_portable(h);
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn gelu_inplace_portable<E: SpinDtype>(h: &mut [E]) {
    for v in h.iter_mut() {
        *v = v.gelu_and_grad().0;
    }
}

/// GELU on sixteen f32 lanes. With its derivative ([`avx512::gelu16`]): [`SpinDtype::gelu_and_grad`]'s
/// f32 formula (one exponential shared by Φ and φ, erf from Abramowitz & Stegun 7.1.26), with
/// `1/(1 + p·z)` from the 14-bit reciprocal estimate and one Newton step (relative error ~2⁻²⁸)
/// instead of a division, whose throughput bounded the portable loop; it differs from the
/// portable loop by rounding only. The value alone ([`avx512::gelu16_value`], forward passes and
/// the fused epilogues): a rational erf without the exponential, within 2.5e-7 of max(1, |x|)
/// of the f64 form (tested).
#[cfg(target_arch = "x86_64")]
pub mod avx512 {
    use super::F32_LANES;
    use std::arch::x86_64::*;

    /// exp(x) for x ≤ 0 on 16 lanes: the portable `fast_exp`'s range reduction and polynomial.
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn exp_nonpos(x: __m512) -> __m512 {
        const SHIFTER: f32 = 12_583_039.0; // 1.5·2^23 + 127, see `fast_exp`
        let c = _mm512_set1_ps;
        let x = _mm512_max_ps(x, c(-87.0));
        let t = _mm512_fmadd_ps(x, c(std::f32::consts::LOG2_E), c(SHIFTER));
        let k = _mm512_sub_ps(t, c(SHIFTER));
        let r = _mm512_fmadd_ps(k, c(2.121_944_4e-4), _mm512_fnmadd_ps(k, c(0.693_359_4), x));
        let mut p = _mm512_fmadd_ps(c(1.987_569_1e-4), r, c(1.398_199_9e-3));
        for coef in [8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
            p = _mm512_fmadd_ps(p, r, c(coef));
        }
        let y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), c(1.0));
        let pow2 = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_castps_si512(t)));
        _mm512_mul_ps(y, pow2)
    }

    /// (GELU(x), GELU'(x)) on 16 lanes.
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn gelu16(x: __m512) -> (__m512, __m512) {
        let c = _mm512_set1_ps;
        // SAFETY: AVX-512F, this function's own requirement.
        let e = unsafe { exp_nonpos(_mm512_mul_ps(_mm512_mul_ps(c(-0.5), x), x)) };
        let z = _mm512_mul_ps(_mm512_abs_ps(x), c(std::f32::consts::FRAC_1_SQRT_2));
        let den = _mm512_fmadd_ps(c(0.327_591_1), z, c(1.0));
        let r0 = _mm512_rcp14_ps(den);
        let t = _mm512_mul_ps(r0, _mm512_fnmadd_ps(den, r0, c(2.0)));
        let mut poly = _mm512_fmadd_ps(c(1.061_405_4), t, c(-1.453_152_1));
        for coef in [1.421_413_8, -0.284_496_72, 0.254_829_6] {
            poly = _mm512_fmadd_ps(poly, t, c(coef));
        }
        poly = _mm512_mul_ps(poly, t);
        // 1 − poly·e ≥ 0, so or-ing in x's sign bit gives erf(x/√2).
        let erf_abs = _mm512_fnmadd_ps(poly, e, c(1.0));
        let sign = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(i32::MIN));
        let erf = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(erf_abs), sign));
        let cdf = _mm512_fmadd_ps(c(0.5), erf, c(0.5));
        let pdf = _mm512_mul_ps(e, c(0.398_942_3));
        (_mm512_mul_ps(x, cdf), _mm512_fmadd_ps(x, pdf, cdf))
    }

    /// GELU(x) alone on 16 lanes, for forward passes: `x/2 · (1 + erf(x/√2))` with erf(x/√2) as
    /// `x·P(x²)/Q(x²)` (x clamped to ±5.5437, where erf rounds to ±1), a rational function of
    /// degrees 6 and 4 in x² fitted to erf by `scripts/fit_gelu_erf.py` (least squares reweighted
    /// towards the largest error; |error| ≤ 4.3e-8 in exact arithmetic), with the division as the
    /// 14-bit reciprocal estimate and one Newton step. Evaluated in f32 it stays within 2.5e-7 of
    /// max(1, |x|) of the f64 form (tested; a throwaway dense sweep found the largest error,
    /// 1.07e-6, at x = 5.17). 20 operations instead of [`gelu16`]'s 33 (its exponential serves
    /// the derivative); by an operation count GELU is about a tenth of a ConvMixer-256 forward
    /// pass.
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn gelu16_value(x: __m512) -> __m512 {
        const P: [f32; 7] = [
            0.797_884_3,
            0.072_872_74,
            0.009_085_866,
            3.511_617_5e-4,
            6.584_418_8e-6,
            -4.406_852e-8,
            2.201_039_1e-10,
        ];
        const Q: [f32; 5] = [1.0, 0.257_996_83, 0.029_391_246, 0.001_861_163_8, 6.400_859e-5];
        const CLAMP: f32 = 5.543_717;
        let c = _mm512_set1_ps;
        let xc = _mm512_min_ps(_mm512_max_ps(x, c(-CLAMP)), c(CLAMP));
        let u = _mm512_mul_ps(xc, xc);
        let horner = |coefs: &[f32]| {
            let (last, rest) = coefs.split_last().expect("coefficients");
            rest.iter()
                .rev()
                .fold(c(*last), |acc, &k| _mm512_fmadd_ps(acc, u, c(k)))
        };
        let (p, q) = (horner(&P), horner(&Q));
        let r0 = _mm512_rcp14_ps(q);
        let inv_q = _mm512_mul_ps(r0, _mm512_fnmadd_ps(q, r0, c(2.0)));
        let erf = _mm512_mul_ps(_mm512_mul_ps(xc, p), inv_q);
        let half_x = _mm512_mul_ps(x, c(0.5));
        _mm512_fmadd_ps(half_x, erf, half_x)
    }

    /// Over `out`'s values, 16 at a time (a masked tail): `out = GELU(x)` (x = `out` itself when
    /// `x` is `None`); when `gy` is given, `out += gy · GELU'(x)`, or `out = gy · GELU'(out)`
    /// when `x` is `None`.
    ///
    /// # Safety
    /// The CPU must support AVX-512F. Lengths are asserted.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn gelu_rows(out: &mut [f32], x: Option<&[f32]>, gy: Option<&[f32]>) {
        let n = out.len();
        assert!(x.is_none_or(|x| x.len() == n) && gy.is_none_or(|g| g.len() == n));
        let add = x.is_some();
        let o = out.as_mut_ptr();
        let xp = x.map_or(o as *const f32, |x| x.as_ptr());
        for i in (0..n).step_by(F32_LANES) {
            let left = n - i;
            let m: __mmask16 = if left >= F32_LANES { !0 } else { (1 << left) - 1 };
            // SAFETY: AVX-512F (the contract); every access is at i + lane with lane < left under
            // the mask, inside slices of n values (asserted).
            unsafe {
                let xv = _mm512_maskz_loadu_ps(m, xp.add(i));
                let v = match gy {
                    None => gelu16_value(xv),
                    Some(g) => {
                        let g = _mm512_maskz_loadu_ps(m, g.as_ptr().add(i));
                        if add {
                            _mm512_fmadd_ps(g, gelu16(xv).1, _mm512_maskz_loadu_ps(m, o.add(i)))
                        } else {
                            _mm512_mul_ps(g, gelu16(xv).1)
                        }
                    }
                };
                _mm512_mask_storeu_ps(o.add(i), m, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `copied` copies every value, over lengths of one chunk or less and of several with a
    /// short last one.
    #[test]
    fn copies_are_equal() {
        for len in [0, 1, CHUNK - 1, 3 * CHUNK + 5] {
            let src: Vec<f32> = (0..len).map(|i| i as f32 * 0.5 - 3.0).collect();
            assert_eq!(copied(&src), src);
        }
    }

    /// `zeros` gives zeros of the length asked, also where the allocator hands back a block that
    /// held other values just before (one of the same size is filled and freed first), over
    /// lengths of one chunk or less and of several with a short last one.
    #[test]
    fn zeros_are_zeros_of_the_length_asked() {
        for len in [0, 1, CHUNK - 1, 3 * CHUNK + 5] {
            drop(std::hint::black_box(vec![1.5f32; len]));
            let z = zeros::<f32>(len);
            assert_eq!(z.len(), len);
            assert!(z.iter().all(|&v| v == 0.0), "a value of {len} is not zero");
        }
    }

    /// The f32 kernels (the AVX-512 lanes where the CPU has them) against the f64 definition:
    /// GELU, in place and into a buffer, within 2.5e-7 of max(1, |x|) (two to three of f32's
    /// rounding steps at the output; the rational erf's largest error is near x = 5.17), and the
    /// gradient, accumulated and in place, within 1e-6, over ±7.8 in steps of 1e-5 (past the
    /// clamp at 5.54) on a length that leaves a masked tail.
    #[test]
    fn f32_gelu_kernels_match_the_f64_definition() {
        let n = 16 * 97_500 + 11;
        let x: Vec<f32> = (0..n).map(|i| (i as f32 - n as f32 / 2.0) * 1e-5).collect();
        let gy: Vec<f32> = (0..n).map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0).collect();
        let mut y = vec![f32::NAN; n];
        gelu_chunk(&mut y, &x);
        let mut inplace = x.clone();
        gelu_inplace(&mut inplace);
        let mut gx = vec![0.5f32; n];
        gelu_grad_chunk(&mut gx, &x, &gy);
        let mut gh = x.clone();
        gelu_grad_in_place_chunk(&mut gh, &gy);
        for i in 0..n {
            let (want, slope) = (x[i] as f64).gelu_and_grad();
            assert!(
                (y[i] as f64 - want).abs() < 2.5e-7 * (x[i].abs() as f64).max(1.0),
                "GELU({}) = {} vs {want}",
                x[i],
                y[i]
            );
            assert_eq!(y[i], inplace[i], "in place and into a buffer differ at {}", x[i]);
            let g_alone = gy[i] as f64 * slope;
            assert!(
                (gh[i] as f64 - g_alone).abs() < 1e-6,
                "gradient in place at {}: {} vs {g_alone}",
                x[i],
                gh[i]
            );
            let g = 0.5 + g_alone;
            assert!(
                (gx[i] as f64 - g).abs() < 1e-6,
                "gradient at {}: {} vs {g}",
                x[i],
                gx[i]
            );
        }
    }
}
