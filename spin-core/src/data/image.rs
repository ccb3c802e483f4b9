//! Decoding one image file and timm's eval transform.
use super::DataConfig;
use crate::error::Error;
use std::path::Path;

/// An RGB image `(size, size)` as CHW.
pub(super) fn hwc_to_chw(img: &::image::Rgb32FImage, size: usize) -> Vec<f32> {
    let mut chw = vec![0.0; 3 * size * size];
    for (x, y, p) in img.enumerate_pixels() {
        for c in 0..3 {
            chw[(c * size + y as usize) * size + x as usize] = p.0[c];
        }
    }
    chw
}

/// Decodes a PNG or JPEG file.
pub fn decode(path: &Path) -> Result<::image::DynamicImage, Error> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    ::image::load_from_memory(&bytes).map_err(|e| Error::Image {
        path: path.into(),
        reason: e.to_string(),
    })
}

/// timm's eval transform for one image: resize the shorter side to image / crop_pct (bicubic),
/// centre-crop to image × image, scale to [0, 1], normalise. Returns CHW.
pub fn preprocess(img: &::image::DynamicImage, cfg: &DataConfig) -> Vec<f32> {
    let (w, h) = (img.width() as f32, img.height() as f32);
    let short = (cfg.image as f32 / cfg.crop_pct).floor().max(cfg.image as f32);
    let scale = short / w.min(h);
    let (nw, nh) = (
        ((w * scale).round() as u32).max(cfg.image as u32),
        ((h * scale).round() as u32).max(cfg.image as u32),
    );
    let resized = ::image::imageops::resize(
        &img.to_rgb32f(),
        nw,
        nh,
        ::image::imageops::FilterType::CatmullRom,
    );
    let (x0, y0) = ((nw - cfg.image as u32) / 2, (nh - cfg.image as u32) / 2);
    let crop = ::image::imageops::crop_imm(&resized, x0, y0, cfg.image as u32, cfg.image as u32).to_image();
    let mut chw = hwc_to_chw(&crop, cfg.image);
    let plane = cfg.image * cfg.image;
    for (c, p) in chw.chunks_mut(plane).enumerate() {
        for v in p {
            *v = (v.clamp(0.0, 1.0) - cfg.mean[c]) / cfg.std[c];
        }
    }
    chw
}
