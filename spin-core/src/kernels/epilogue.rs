//! The epilogue a fused inference kernel applies to its raw outputs.
use super::{as_f32, as_f32_mut};
use crate::base::{Act, SpinDtype, F32_LANES};
use multiversion::multiversion;

/// What a fused inference kernel applies to each raw convolution output `a` of channel j:
/// `act(a + bias[j])·scale[j] + shift[j]`.
pub struct Epilogue<'a, E> {
    /// Per-channel bias added before the activation.
    pub bias: &'a [E],
    /// Per-channel scale after the activation (a folded BatchNorm's).
    pub scale: &'a [E],
    /// Per-channel shift after the scale.
    pub shift: &'a [E],
    /// The activation.
    pub act: Act,
}

impl<E: SpinDtype> Epilogue<'_, E> {
    /// Applies the epilogue to `a`, the outputs with their bias already added (channels
    /// `c0..c0 + a.len()`), adding `skip` when given.
    #[inline(always)]
    pub fn apply(&self, out: &mut [E], a: &[E], c0: usize, skip: Option<&[E]>) {
        let n = a.len();
        let (s, t) = (&self.scale[c0..c0 + n], &self.shift[c0..c0 + n]);
        match self.act {
            Act::Gelu => {
                for j in 0..n {
                    out[j] = a[j].gelu_and_grad().0 * s[j] + t[j];
                }
            }
            Act::Relu => {
                for j in 0..n {
                    let v = if a[j] > E::zero() { a[j] } else { E::zero() };
                    out[j] = v * s[j] + t[j];
                }
            }
        }
        if let Some(skip) = skip {
            for j in 0..n {
                out[j] += skip[j];
            }
        }
    }
}

/// The epilogue over rows that hold raw matmul outputs (bias not yet added), in place: in f32 on
/// AVX-512 lanes ([`avx512::activate16`]), otherwise a loop compiled for AVX-512/AVX2.
pub fn epilogue_rows<E: SpinDtype>(ys: &mut [E], epi: &Epilogue<'_, E>, skip: Option<&[E]>) {
    #[cfg(target_arch = "x86_64")]
    if super::f32_avx512::<E>() {
        let epi32 = Epilogue {
            bias: as_f32(epi.bias),
            scale: as_f32(epi.scale),
            shift: as_f32(epi.shift),
            act: epi.act,
        };
        // SAFETY: AVX-512F was detected.
        return unsafe { avx512::epilogue_rows(as_f32_mut(ys), &epi32, skip.map(as_f32)) };
    }
    epilogue_rows_portable(ys, epi, skip);
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn epilogue_rows_portable<E: SpinDtype>(ys: &mut [E], epi: &Epilogue<'_, E>, skip: Option<&[E]>) {
    let c = epi.bias.len();
    let mut a = [E::zero(); EPILOGUE_BLOCK];
    for (r, row) in ys.chunks_mut(c).enumerate() {
        for c0 in (0..c).step_by(EPILOGUE_BLOCK) {
            let n = (c - c0).min(EPILOGUE_BLOCK);
            for j in 0..n {
                a[j] = row[c0 + j] + epi.bias[c0 + j];
            }
            let skip = skip.map(|s| &s[r * c + c0..][..n]);
            epi.apply(&mut row[c0..c0 + n], &a[..n], c0, skip);
        }
    }
}

/// Channels per block of [`epilogue_rows`]: four AVX-512 registers of f32.
const EPILOGUE_BLOCK: usize = 4 * F32_LANES;

/// The epilogue on AVX-512 lanes (f32).
#[cfg(target_arch = "x86_64")]
pub mod avx512 {
    use super::{Act, Epilogue, F32_LANES};
    use crate::kernels::elementwise::avx512::gelu16_value;
    use std::arch::x86_64::*;

    /// `act(a)·scale + shift` on 16 lanes (`a` with its bias).
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn activate16(a: __m512, act: Act, scale: __m512, shift: __m512) -> __m512 {
        let v = match act {
            Act::Relu => _mm512_max_ps(a, _mm512_setzero_ps()),
            // SAFETY: AVX-512F, this function's own requirement.
            Act::Gelu => unsafe { gelu16_value(a) },
        };
        _mm512_fmadd_ps(v, scale, shift)
    }

    /// [`super::epilogue_rows`] for f32, 16 channels at a time (a masked tail per row).
    ///
    /// # Safety
    /// The CPU must support AVX-512F. Sizes are asserted.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn epilogue_rows(ys: &mut [f32], epi: &Epilogue<'_, f32>, skip: Option<&[f32]>) {
        let c = epi.bias.len();
        assert!(epi.scale.len() == c && epi.shift.len() == c && ys.len().is_multiple_of(c.max(1)));
        assert!(skip.is_none_or(|s| s.len() == ys.len()));
        for (r, row) in ys.chunks_mut(c).enumerate() {
            for c0 in (0..c).step_by(F32_LANES) {
                let left = c - c0;
                let m: __mmask16 = if left >= F32_LANES { !0 } else { (1 << left) - 1 };
                // SAFETY: AVX-512F (the contract); every access is at c0 + lane < c under the
                // mask, in rows of c values (asserted sizes).
                unsafe {
                    let at = |v: &[f32]| _mm512_maskz_loadu_ps(m, v.as_ptr().add(c0));
                    let a = _mm512_add_ps(at(row), at(epi.bias));
                    let mut v = activate16(a, epi.act, at(epi.scale), at(epi.shift));
                    if let Some(s) = skip {
                        v = _mm512_add_ps(v, at(&s[r * c..]));
                    }
                    _mm512_mask_storeu_ps(row.as_mut_ptr().add(c0), m, v);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The f32 epilogue over rows (AVX-512 lanes where the CPU has them) against the portable
    /// loop in f64: both activations, with and without a residual, 37 channels (a masked tail).
    #[test]
    fn f32_rows_match_the_f64_loop() {
        let (rows, c) = (5, 37);
        let v = |len: usize, seed: usize| -> Vec<f64> {
            (0..len)
                .map(|i| ((i * 7919 + seed * 104_729) % 1999) as f64 / 400.0 - 2.5)
                .collect()
        };
        let (ys, bias, scale, shift, skip) = (v(rows * c, 1), v(c, 2), v(c, 3), v(c, 4), v(rows * c, 5));
        let f32s = |x: &[f64]| x.iter().map(|&v| v as f32).collect::<Vec<f32>>();
        for act in [Act::Relu, Act::Gelu] {
            for with_skip in [false, true] {
                let e64 = Epilogue {
                    bias: &bias,
                    scale: &scale,
                    shift: &shift,
                    act,
                };
                let (b32, s32, t32) = (f32s(&bias), f32s(&scale), f32s(&shift));
                let e32 = Epilogue {
                    bias: &b32,
                    scale: &s32,
                    shift: &t32,
                    act,
                };
                let (mut want, mut got) = (ys.clone(), f32s(&ys));
                let skip32 = f32s(&skip);
                epilogue_rows_portable(&mut want, &e64, with_skip.then_some(&skip[..]));
                epilogue_rows(&mut got, &e32, with_skip.then_some(&skip32[..]));
                for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g as f64 - w).abs() < 1e-5 * (1.0 + w.abs()),
                        "{act:?} skip {with_skip} at {i}: {g} vs {w}"
                    );
                }
            }
        }
    }
}
