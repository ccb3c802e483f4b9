//! Image resizing as PIL does it (`Image.resize` with BICUBIC or BILINEAR on 8-bit images), which
//! is what timm's eval transform runs: a separable filter whose support widens with the scale
//! when shrinking (antialiasing), coefficients in 22-bit fixed point, a horizontal pass rounded
//! to 8 bits, then a vertical one. Matching it keeps spin's inputs equal to timm's.
use ::image::RgbImage;

/// Fixed-point precision of the coefficients, as PIL's (32 bits less 8 for pixels and 2 spare).
const PRECISION_BITS: u32 = 22;

/// A resampling filter: its support (in input pixels at scale 1) and its kernel.
#[derive(Clone, Copy, Debug)]
pub struct Filter {
    support: f64,
    kernel: fn(f64) -> f64,
}

/// Keys' bicubic with a = −0.5 (PIL's BICUBIC).
pub const BICUBIC: Filter = Filter {
    support: 2.0,
    kernel: |x| {
        const A: f64 = -0.5;
        let x = x.abs();
        if x < 1.0 {
            ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
        } else if x < 2.0 {
            (((x - 5.0) * x + 8.0) * x - 4.0) * A
        } else {
            0.0
        }
    },
};

/// The triangle filter (PIL's BILINEAR).
pub const BILINEAR: Filter = Filter {
    support: 1.0,
    kernel: |x| (1.0 - x.abs()).max(0.0),
};

impl Filter {
    /// The filter timm names (`bicubic`, `bilinear`); anything else is bicubic, timm's default.
    pub fn named(name: &str) -> Filter {
        match name {
            "bilinear" => BILINEAR,
            _ => BICUBIC,
        }
    }
}

/// For each output position: the first input index and the fixed-point weights from there.
fn coefficients(in_size: usize, out_size: usize, filter: Filter) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = filter.support * filter_scale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            // C's int casts truncate toward zero; the bounds are clamped to the image after.
            let lo = ((center - support + 0.5) as i64).max(0) as usize;
            let hi = ((center + support + 0.5) as i64).clamp(0, in_size as i64) as usize;
            let mut w: Vec<f64> = (lo..hi)
                .map(|x| (filter.kernel)((x as f64 - center + 0.5) / filter_scale))
                .collect();
            let sum: f64 = w.iter().sum();
            if sum != 0.0 {
                w.iter_mut().for_each(|v| *v /= sum);
            }
            let one = f64::from(1u32 << PRECISION_BITS);
            let fixed = w
                .iter()
                .map(|&v| {
                    if v < 0.0 {
                        (-0.5 + v * one) as i32
                    } else {
                        (0.5 + v * one) as i32
                    }
                })
                .collect();
            (lo, fixed)
        })
        .collect()
}

/// Rounds a fixed-point sum (which starts at one half) to a clamped 8-bit value.
fn clip8(sum: i32) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One pass along x (`horizontal`) or y, to `out` positions.
fn pass(img: &RgbImage, out: u32, horizontal: bool, filter: Filter) -> RgbImage {
    let (w, h) = img.dimensions();
    let (in_size, (ow, oh)) = if horizontal { (w, (out, h)) } else { (h, (w, out)) };
    let coeffs = coefficients(in_size as usize, out as usize, filter);
    RgbImage::from_fn(ow, oh, |x, y| {
        let (lo, k) = &coeffs[if horizontal { x } else { y } as usize];
        let mut sums = [1i32 << (PRECISION_BITS - 1); 3];
        for (i, &kw) in k.iter().enumerate() {
            let src = (lo + i) as u32;
            let p = if horizontal {
                img.get_pixel(src, y)
            } else {
                img.get_pixel(x, src)
            };
            for (sum, &v) in sums.iter_mut().zip(&p.0) {
                *sum += i32::from(v) * kw;
            }
        }
        ::image::Rgb(sums.map(clip8))
    })
}

/// Resizes an 8-bit RGB image to `w` × `h` exactly as PIL's `Image.resize` does with `filter`
/// (an axis whose size does not change is not filtered).
pub fn pil_resize(img: &RgbImage, w: u32, h: u32, filter: Filter) -> RgbImage {
    let mut out = img.clone();
    if out.width() != w {
        out = pass(&out, w, true, filter);
    }
    if out.height() != h {
        out = pass(&out, h, false, filter);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_and_flat_images_stay_flat() {
        for (i, o) in [(300, 224), (97, 224), (224, 224), (1000, 7)] {
            for (_, k) in coefficients(i, o, BICUBIC) {
                let sum: i64 = k.iter().map(|&v| i64::from(v)).sum();
                assert!(
                    (sum - (1 << PRECISION_BITS)).abs() <= k.len() as i64,
                    "{i}->{o}: {sum}"
                );
            }
        }
        let flat = RgbImage::from_pixel(37, 23, ::image::Rgb([200, 17, 90]));
        let out = pil_resize(&flat, 64, 11, BICUBIC);
        assert!(out.pixels().all(|p| p.0 == [200, 17, 90]));
        assert_eq!(pil_resize(&flat, 37, 23, BICUBIC), flat);
    }

    #[test]
    fn bicubic_is_keys_kernel() {
        assert_eq!((BICUBIC.kernel)(0.0), 1.0);
        assert_eq!((BICUBIC.kernel)(1.0), 0.0);
        assert!(((BICUBIC.kernel)(0.5) - 0.5625).abs() < 1e-12);
        assert!(((BICUBIC.kernel)(1.5) + 0.0625).abs() < 1e-12);
        assert_eq!((BICUBIC.kernel)(2.0), 0.0);
    }
}
