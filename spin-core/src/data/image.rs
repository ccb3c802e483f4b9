//! Decoding one image file and timm's eval transform.
use super::DataConfig;
use crate::error::Error;
use ::image::Rgb32FImage;
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

/// The geometry of timm's eval transform: resize the shorter side to image / crop_pct (bicubic),
/// then centre-crop to image × image.
pub fn eval_crop(img: &Rgb32FImage, cfg: &DataConfig) -> Rgb32FImage {
    let (w, h) = (img.width() as f32, img.height() as f32);
    let short = (cfg.image as f32 / cfg.crop_pct).floor().max(cfg.image as f32);
    let scale = short / w.min(h);
    let (nw, nh) = (
        ((w * scale).round() as u32).max(cfg.image as u32),
        ((h * scale).round() as u32).max(cfg.image as u32),
    );
    let resized = ::image::imageops::resize(img, nw, nh, ::image::imageops::FilterType::CatmullRom);
    let (x0, y0) = ((nw - cfg.image as u32) / 2, (nh - cfg.image as u32) / 2);
    ::image::imageops::crop_imm(&resized, x0, y0, cfg.image as u32, cfg.image as u32).to_image()
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

/// timm's eval transform for one image ([`eval_crop`], then [`normalise`]). Returns CHW.
pub fn preprocess(img: &::image::DynamicImage, cfg: &DataConfig) -> Vec<f32> {
    normalise(&eval_crop(&img.to_rgb32f(), cfg), cfg)
}
