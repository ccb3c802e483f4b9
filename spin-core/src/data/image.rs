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
pub fn decode(path: &Path) -> Result<::image::DynamicImage, Error> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    ::image::load_from_memory(&bytes).map_err(|e| Error::Image {
        path: path.into(),
        reason: e.to_string(),
    })
}

/// Where timm's eval transform takes a `w` × `h` image for `cfg`: torchvision's `Resize` of the
/// shorter side to ⌊image / crop_pct⌋ (the longer side truncated, as Python's `int`), then
/// `CenterCrop(image)` with its offsets rounded half to even, as Python's `round`. Returns the
/// resized size and the crop's top-left corner.
pub fn eval_geometry(w: u32, h: u32, cfg: &DataConfig) -> ((u32, u32), (u32, u32)) {
    let image = cfg.image as u32;
    let size = ((cfg.image as f64 / f64::from(cfg.crop_pct)).floor() as u32).max(image);
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    let new_long = ((f64::from(size) * f64::from(long) / f64::from(short.max(1))) as u32).max(size);
    let (nw, nh) = if w <= h {
        (size, new_long)
    } else {
        (new_long, size)
    };
    let offset = |n: u32| (f64::from(n - image) / 2.0).round_ties_even() as u32;
    ((nw, nh), (offset(nw), offset(nh)))
}

/// timm's eval transform up to `ToTensor`, on 8-bit pixels as PIL runs it: resize with the
/// member's filter ([`pil_resize`]), centre-crop. Returns image × image RGB.
pub fn eval_pixels(img: &RgbImage, cfg: &DataConfig) -> RgbImage {
    let ((nw, nh), (x0, y0)) = eval_geometry(img.width(), img.height(), cfg);
    let resized = pil_resize(img, nw, nh, Filter::named(&cfg.interpolation));
    ::image::imageops::crop_imm(&resized, x0, y0, cfg.image as u32, cfg.image as u32).to_image()
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

/// timm's eval transform for one image: `convert('RGB')`, [`eval_pixels`], `ToTensor`,
/// [`normalise`]. Returns CHW.
pub fn preprocess(img: &::image::DynamicImage, cfg: &DataConfig) -> Vec<f32> {
    normalise(&to_unit(&eval_pixels(&img.to_rgb8(), cfg)), cfg)
}
