//! Decoding one image file and timm's eval transform.
use super::resize::{pil_resize, Filter};
use super::DataConfig;
use crate::error::Error;
use ::image::{Rgb32FImage, RgbImage};
use std::path::Path;

/// Whether a path names a file in an image format spin reads (by its extension).
pub fn is_image_file(path: &Path) -> bool {
    path.is_file() && ::image::ImageFormat::from_path(path).is_ok()
}

/// Decodes an image file in any format the image crate reads (PNG, JPEG, BMP, GIF, WebP, TIFF).
/// JPEGs go through `jpeg-decoder`, whose chroma upsampling is libjpeg's (as PIL's), and CMYK
/// ones come out as PIL converts them.
pub fn decode(path: &Path) -> Result<::image::DynamicImage, Error> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let failed = |reason: String| Error::Image {
        path: path.into(),
        reason,
    };
    if ::image::guess_format(&bytes).ok() == Some(::image::ImageFormat::Jpeg) {
        return decode_jpeg(&bytes).map_err(failed);
    }
    ::image::load_from_memory(&bytes).map_err(|e| failed(e.to_string()))
}

fn decode_jpeg(bytes: &[u8]) -> Result<::image::DynamicImage, String> {
    use ::image::{DynamicImage as D, ImageBuffer};
    use jpeg_decoder::PixelFormat;
    let mut decoder = jpeg_decoder::Decoder::new(bytes);
    let pixels = decoder.decode().map_err(|e| e.to_string())?;
    let info = decoder.info().ok_or("no image in the file")?;
    let (w, h) = (u32::from(info.width), u32::from(info.height));
    let short = || "the file ends before its pixels do".to_string();
    Ok(match info.pixel_format {
        PixelFormat::L8 => D::ImageLuma8(ImageBuffer::from_raw(w, h, pixels).ok_or_else(short)?),
        PixelFormat::L16 => {
            let values = pixels
                .chunks_exact(2)
                .map(|b| u16::from_ne_bytes([b[0], b[1]])) // jpeg-decoder writes native order
                .collect();
            D::ImageLuma16(ImageBuffer::from_raw(w, h, values).ok_or_else(short)?)
        }
        PixelFormat::RGB24 => D::ImageRgb8(ImageBuffer::from_raw(w, h, pixels).ok_or_else(short)?),
        PixelFormat::CMYK32 => {
            // PIL's cmyk2rgb: each channel (255 − k) − c·(255 − k)/255, the product rounded as
            // its MULDIV255.
            let rgb = pixels
                .chunks_exact(4)
                .flat_map(|p| {
                    let nk = 255 - u32::from(p[3]);
                    let mul = |c: u8| {
                        let t = u32::from(c) * nk + 128;
                        ((t >> 8) + t) >> 8
                    };
                    [0, 1, 2].map(|i| (nk - mul(p[i]).min(nk)) as u8)
                })
                .collect();
            D::ImageRgb8(ImageBuffer::from_raw(w, h, rgb).ok_or_else(short)?)
        }
    })
}

/// Where timm's eval transform takes a `w` × `h` image for `cfg`: the size it resizes to, then
/// the top-left corner of the `image` × `image` crop in the resized image — negative where the
/// crop reaches past it and timm pads (`border` mode).
///
/// - `center`: torchvision's `Resize` of the shorter side to ⌊image / crop_pct⌋, the longer side
///   truncated as Python's `int`;
/// - `squash`: both sides to ⌊image / crop_pct⌋;
/// - `border`: timm's `ResizeKeepRatio(longest=1)`, the longer side to ⌊image / crop_pct⌋ and the
///   other rounded (half to even, as Python's `round`), then `CenterCropOrPad` with the padding's
///   left/top half rounded down.
///
/// Crop offsets are rounded half to even, as torchvision's `CenterCrop`.
pub fn eval_geometry(w: u32, h: u32, cfg: &DataConfig) -> ((u32, u32), (i64, i64)) {
    let image = cfg.image as u32;
    let size = ((cfg.image as f64 / f64::from(cfg.crop_pct)).floor() as u32).max(image);
    let (wf, hf) = (f64::from(w.max(1)), f64::from(h.max(1)));
    let (nw, nh) = match cfg.crop_mode.as_str() {
        "squash" => (size, size),
        "border" => {
            let ratio = (wf / f64::from(size)).max(hf / f64::from(size));
            let side = |x: f64| ((x / ratio).round_ties_even() as u32).max(1);
            (side(wf), side(hf))
        }
        _ => {
            let (short, long) = if w <= h { (wf, hf) } else { (hf, wf) };
            let new_long = ((f64::from(size) * long / short) as u32).max(size);
            if w <= h {
                (size, new_long)
            } else {
                (new_long, size)
            }
        }
    };
    let offset = |n: u32| {
        if n >= image {
            (f64::from(n - image) / 2.0).round_ties_even() as i64
        } else {
            -i64::from((image - n) / 2)
        }
    };
    ((nw, nh), (offset(nw), offset(nh)))
}

/// timm's eval transform up to `ToTensor`, on 8-bit pixels as PIL runs it: resize with the
/// member's filter ([`pil_resize`]) as [`eval_geometry`] says, centre-crop (padding with the mean
/// colour, rounded to 8 bits, where the crop reaches past the image). Returns image × image RGB.
pub fn eval_pixels(img: &RgbImage, cfg: &DataConfig) -> RgbImage {
    let ((nw, nh), (x0, y0)) = eval_geometry(img.width(), img.height(), cfg);
    let resized = pil_resize(img, nw, nh, Filter::named(&cfg.interpolation));
    let fill = ::image::Rgb(cfg.mean.map(|m| (255.0 * f64::from(m)).round_ties_even() as u8));
    let side = cfg.image as u32;
    RgbImage::from_fn(side, side, |x, y| {
        let (sx, sy) = (i64::from(x) + x0, i64::from(y) + y0);
        if (0..i64::from(nw)).contains(&sx) && (0..i64::from(nh)).contains(&sy) {
            *resized.get_pixel(sx as u32, sy as u32)
        } else {
            fill
        }
    })
}

/// An image as PIL's `convert('RGB')` gives it, quirks included: 16-bit grey (PIL's mode `I;16`)
/// is clipped to 255, not scaled; 16-bit colour and grey-with-alpha keep each value's high byte;
/// alpha is dropped, not composited.
pub fn pil_rgb(img: &::image::DynamicImage) -> RgbImage {
    use ::image::DynamicImage as D;
    let high = |v: u16| (v >> 8) as u8;
    match img {
        D::ImageLuma16(g) => RgbImage::from_fn(g.width(), g.height(), |x, y| {
            ::image::Rgb([g.get_pixel(x, y).0[0].min(255) as u8; 3])
        }),
        D::ImageLumaA16(g) => RgbImage::from_fn(g.width(), g.height(), |x, y| {
            ::image::Rgb([high(g.get_pixel(x, y).0[0]); 3])
        }),
        D::ImageRgb16(c) => RgbImage::from_fn(c.width(), c.height(), |x, y| {
            ::image::Rgb(c.get_pixel(x, y).0.map(high))
        }),
        D::ImageRgba16(c) => RgbImage::from_fn(c.width(), c.height(), |x, y| {
            let [r, g, b, _] = c.get_pixel(x, y).0;
            ::image::Rgb([high(r), high(g), high(b)])
        }),
        other => other.to_rgb8(),
    }
}

/// [`eval_pixels`] for an image already in [0, 1] floats (rounded to 8 bits first, as the file's
/// pixels were), returned as floats.
pub fn eval_crop(img: &Rgb32FImage, cfg: &DataConfig) -> Rgb32FImage {
    let bytes = ::image::DynamicImage::ImageRgb32F(img.clone()).to_rgb8();
    to_unit(&eval_pixels(&bytes, cfg))
}

/// 8-bit pixels as [0, 1] floats (`ToTensor`'s division by 255).
fn to_unit(img: &RgbImage) -> Rgb32FImage {
    Rgb32FImage::from_fn(img.width(), img.height(), |x, y| {
        ::image::Rgb(img.get_pixel(x, y).0.map(|v| f32::from(v) / 255.0))
    })
}

/// An image at the model's size as normalised CHW: clamp to [0, 1] (bicubic overshoots), subtract
/// the mean, divide by the standard deviation, per channel.
pub fn normalise(img: &Rgb32FImage, cfg: &DataConfig) -> Vec<f32> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let plane = w * h;
    let mut chw = vec![0.0; 3 * plane];
    for (x, y, p) in img.enumerate_pixels() {
        for c in 0..3 {
            chw[c * plane + y as usize * w + x as usize] =
                (p.0[c].clamp(0.0, 1.0) - cfg.mean[c]) / cfg.std[c];
        }
    }
    chw
}

/// timm's eval transform for one image: `convert('RGB')` ([`pil_rgb`]), [`eval_pixels`],
/// `ToTensor`, [`normalise`]. Returns CHW.
pub fn preprocess(img: &::image::DynamicImage, cfg: &DataConfig) -> Vec<f32> {
    normalise(&to_unit(&eval_pixels(&pil_rgb(img), cfg)), cfg)
}
