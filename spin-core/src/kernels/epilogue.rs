//! The epilogue a fused inference kernel applies to its raw outputs.
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

/// The epilogue over rows that hold raw matmul outputs (bias not yet added), in place.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub fn epilogue_rows<E: SpinDtype>(ys: &mut [E], epi: &Epilogue<'_, E>, skip: Option<&[E]>) {
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
