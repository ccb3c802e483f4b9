//! Training augmentation, as timm trains its image models: random-resized-crop and horizontal
//! flip per image, RandAugment-style magnitude ops, and mixup/cutmix across a batch.
//!
//! Every random choice comes from an RNG the loader seeds by (run seed, epoch, position), so a
//! resumed run and an uninterrupted one see the same augmented images whichever thread made them.
use ::image::imageops::{self, FilterType};
use ::image::{Rgb, Rgb32FImage};
use rand::rngs::StdRng;
use rand::Rng;

/// What training does to each image and batch. [`Augment::none`] is the identity.
#[derive(Clone, Debug, PartialEq)]
pub struct Augment {
    /// Random-resized-crop: the crop's area is drawn from [`crop_scale`, 1] of the image and its
    /// aspect ratio from [3/4, 4/3] (timm's defaults use 0.08 for ImageNet at 224 px); `None`
    /// uses the eval transform instead.
    ///
    /// [`crop_scale`]: Augment::crop_scale
    pub crop_scale: Option<f32>,
    /// Mirror left–right with probability ½.
    pub flip: bool,
    /// RandAugment: this many ops per image, drawn uniformly (0: off).
    pub rand_ops: usize,
    /// RandAugment's magnitude, 0..=10 (timm's `m9` is 9).
    pub rand_magnitude: f32,
    /// Mixup's Beta(α, α) parameter (0: off).
    pub mixup: f32,
    /// CutMix's Beta(α, α) parameter (0: off). With both on, each batch uses one of them, ½ each.
    pub cutmix: f32,
}

impl Augment {
    /// No augmentation: every image goes through the eval transform.
    pub fn none() -> Self {
        Self {
            crop_scale: None,
            flip: false,
            rand_ops: 0,
            rand_magnitude: 9.0,
            mixup: 0.0,
            cutmix: 0.0,
        }
    }
    /// Random-resized-crop (area from `crop_scale` to 1) and horizontal flip.
    pub fn crop_flip(crop_scale: f32) -> Self {
        Self {
            crop_scale: Some(crop_scale),
            flip: true,
            ..Self::none()
        }
    }
    /// Whether images need a per-image random transform.
    pub fn per_image(&self) -> bool {
        self.crop_scale.is_some() || self.flip || self.rand_ops > 0
    }
    /// Whether batches are mixed.
    pub fn mixes(&self) -> bool {
        self.mixup > 0.0 || self.cutmix > 0.0
    }
    /// The settings as a run records them.
    pub fn describe(&self) -> String {
        if *self == Self::none() {
            return "none".into();
        }
        let mut parts = vec![];
        if let Some(s) = self.crop_scale {
            parts.push(format!("rrc{s}"));
        }
        if self.flip {
            parts.push("flip".into());
        }
        if self.rand_ops > 0 {
            parts.push(format!("rand-n{}-m{}", self.rand_ops, self.rand_magnitude));
        }
        if self.mixup > 0.0 {
            parts.push(format!("mixup{}", self.mixup));
        }
        if self.cutmix > 0.0 {
            parts.push(format!("cutmix{}", self.cutmix));
        }
        parts.join("+")
    }
}

/// The crop `(x, y, w, h)` of random-resized-crop: area in [scale_min, 1] of the image, aspect
/// ratio log-uniform in [3/4, 4/3]; after ten misses, the largest centred crop within that ratio.
pub fn random_crop(w: u32, h: u32, scale_min: f32, rng: &mut StdRng) -> (u32, u32, u32, u32) {
    let area = (w * h) as f32;
    let (lo, hi) = ((3.0f32 / 4.0).ln(), (4.0f32 / 3.0).ln());
    for _ in 0..10 {
        let target = area * rng.gen_range(scale_min.min(1.0)..=1.0);
        let ratio = rng.gen_range(lo..=hi).exp();
        let cw = (target * ratio).sqrt().round() as u32;
        let ch = (target / ratio).sqrt().round() as u32;
        if (1..=w).contains(&cw) && (1..=h).contains(&ch) {
            return (rng.gen_range(0..=w - cw), rng.gen_range(0..=h - ch), cw, ch);
        }
    }
    let ratio = w as f32 / h as f32;
    let (cw, ch) = if ratio < 0.75 {
        (w, ((w as f32 / 0.75).round() as u32).min(h))
    } else if ratio > 4.0 / 3.0 {
        (((h as f32 * 4.0 / 3.0).round() as u32).min(w), h)
    } else {
        (w, h)
    };
    ((w - cw) / 2, (h - ch) / 2, cw, ch)
}

/// Random-resized-crop of one image to `size` × `size` (bilinear), area from `scale_min` to 1.
pub fn random_resized_crop(img: &Rgb32FImage, size: u32, scale_min: f32, rng: &mut StdRng) -> Rgb32FImage {
    let (x, y, w, h) = random_crop(img.width(), img.height(), scale_min, rng);
    let crop = imageops::crop_imm(img, x, y, w, h).to_image();
    if (w, h) == (size, size) {
        crop
    } else {
        imageops::resize(&crop, size, size, FilterType::Triangle)
    }
}

/// The per-image ops after the crop: flip (½) and RandAugment.
pub fn flip_and_rand(img: &mut Rgb32FImage, aug: &Augment, rng: &mut StdRng) {
    if aug.flip && rng.gen_bool(0.5) {
        imageops::flip_horizontal_in_place(img);
    }
    rand_augment(img, aug.rand_ops, aug.rand_magnitude, rng);
}

/// The RandAugment ops spin draws from (timm's list without equalize and sharpness).
const OPS: [&str; 12] = [
    "identity",
    "autocontrast",
    "rotate",
    "solarize",
    "color",
    "posterize",
    "contrast",
    "brightness",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
];

/// Applies `n` ops drawn uniformly at magnitude `m` (of 10); geometric ops and enhancement
/// factors take a random sign, as in timm.
pub fn rand_augment(img: &mut Rgb32FImage, n: usize, m: f32, rng: &mut StdRng) {
    let level = (m / 10.0).clamp(0.0, 1.0);
    for _ in 0..n {
        let op = OPS[rng.gen_range(0..OPS.len())];
        let signed = if rng.gen_bool(0.5) { level } else { -level };
        let (w, h) = (img.width() as f32, img.height() as f32);
        match op {
            "autocontrast" => autocontrast(img),
            "rotate" => {
                let (s, c) = (signed * 30f32).to_radians().sin_cos();
                warp(img, [c, -s, s, c], [0.0, 0.0]);
            }
            "solarize" => {
                let threshold = 1.0 - level;
                map(img, |v| if v > threshold { 1.0 - v } else { v });
            }
            "color" => blend_gray(img, 1.0 + 0.9 * signed, false),
            "posterize" => {
                let levels = 2f32.powi(8 - (4.0 * level).round() as i32);
                map(img, |v| (v * levels).floor().min(levels - 1.0) / levels);
            }
            "contrast" => blend_gray(img, 1.0 + 0.9 * signed, true),
            "brightness" => {
                let f = 1.0 + 0.9 * signed;
                map(img, |v| v * f);
            }
            "shear_x" => warp(img, [1.0, 0.3 * signed, 0.0, 1.0], [0.0, 0.0]),
            "shear_y" => warp(img, [1.0, 0.0, 0.3 * signed, 1.0], [0.0, 0.0]),
            "translate_x" => warp(img, [1.0, 0.0, 0.0, 1.0], [0.45 * signed * w, 0.0]),
            "translate_y" => warp(img, [1.0, 0.0, 0.0, 1.0], [0.0, 0.45 * signed * h]),
            _ => {}
        }
    }
}

fn map(img: &mut Rgb32FImage, f: impl Fn(f32) -> f32) {
    for p in img.pixels_mut() {
        for v in &mut p.0 {
            *v = f(*v).clamp(0.0, 1.0);
        }
    }
}

fn autocontrast(img: &mut Rgb32FImage) {
    for c in 0..3 {
        let (lo, hi) = img.pixels().fold((f32::MAX, f32::MIN), |(lo, hi), p| {
            (lo.min(p.0[c]), hi.max(p.0[c]))
        });
        if hi > lo {
            for p in img.pixels_mut() {
                p.0[c] = (p.0[c] - lo) / (hi - lo);
            }
        }
    }
}

/// Blends with the grey image (`per_image`: its mean grey, as PIL's contrast; else each pixel's
/// own grey, as PIL's colour): factor 0 is grey, 1 the image.
fn blend_gray(img: &mut Rgb32FImage, factor: f32, per_image: bool) {
    let gray = |p: &Rgb<f32>| 0.299 * p.0[0] + 0.587 * p.0[1] + 0.114 * p.0[2];
    let mean = img.pixels().map(gray).sum::<f32>() / (img.width() * img.height()).max(1) as f32;
    for p in img.pixels_mut() {
        let g = if per_image { mean } else { gray(p) };
        for v in &mut p.0 {
            *v = (g + factor * (*v - g)).clamp(0.0, 1.0);
        }
    }
}

/// Resamples through the affine map `[a, b, c, d]` about the centre plus `shift` (output pixel
/// (x, y) reads the input at A·(x − centre) + centre − shift), bilinear, grey outside.
fn warp(img: &mut Rgb32FImage, a: [f32; 4], shift: [f32; 2]) {
    let src = img.clone();
    let (w, h) = (src.width() as f32, src.height() as f32);
    let (cx, cy) = ((w - 1.0) / 2.0, (h - 1.0) / 2.0);
    for (x, y, p) in img.enumerate_pixels_mut() {
        let (dx, dy) = (x as f32 - cx, y as f32 - cy);
        let sx = a[0] * dx + a[1] * dy + cx - shift[0];
        let sy = a[2] * dx + a[3] * dy + cy - shift[1];
        *p = sample(&src, sx, sy);
    }
}

fn sample(img: &Rgb32FImage, x: f32, y: f32) -> Rgb<f32> {
    let (w, h) = (img.width() as i64, img.height() as i64);
    let (x0, y0) = (x.floor() as i64, y.floor() as i64);
    let (fx, fy) = (x - x0 as f32, y - y0 as f32);
    let at = |xi: i64, yi: i64| {
        if (0..w).contains(&xi) && (0..h).contains(&yi) {
            img.get_pixel(xi as u32, yi as u32).0
        } else {
            [0.5; 3]
        }
    };
    let (p00, p10, p01, p11) = (at(x0, y0), at(x0 + 1, y0), at(x0, y0 + 1), at(x0 + 1, y0 + 1));
    let mut out = [0.0; 3];
    for c in 0..3 {
        let top = p00[c] + fx * (p10[c] - p00[c]);
        let bottom = p01[c] + fx * (p11[c] - p01[c]);
        out[c] = top + fy * (bottom - top);
    }
    Rgb(out)
}

/// How a batch was mixed: each image holds `lam` of itself and `1 − lam` of the image at the
/// mirrored position (timm's batch-flip mixing), so its target is `lam`·own + (1 − `lam`)·partner's.
#[derive(Clone, Debug, PartialEq)]
pub struct Mix {
    /// Each image's partner's label.
    pub partner: Vec<usize>,
    /// The weight of each image's own label.
    pub lam: f32,
}

/// Mixes a batch of NCHW images in place (mixup or cutmix, per `aug`), returning the partner labels
/// and weight; `None` when neither is on.
pub fn mix_batch(
    images: &mut [f32],
    labels: &[usize],
    side: usize,
    aug: &Augment,
    rng: &mut StdRng,
) -> Option<Mix> {
    if !aug.mixes() || labels.len() < 2 {
        return None;
    }
    let use_cutmix = aug.cutmix > 0.0 && (aug.mixup <= 0.0 || rng.gen_bool(0.5));
    let alpha = if use_cutmix { aug.cutmix } else { aug.mixup };
    let mut lam = beta(alpha, rng);
    let n = labels.len();
    let item = 3 * side * side;
    let orig = images.to_vec();
    if use_cutmix {
        let cut = (1.0 - lam).sqrt();
        let (cw, ch) = ((side as f32 * cut) as usize, (side as f32 * cut) as usize);
        let (cx, cy) = (rng.gen_range(0..side), rng.gen_range(0..side));
        let (x0, x1) = (cx.saturating_sub(cw / 2), (cx + cw / 2).min(side));
        let (y0, y1) = (cy.saturating_sub(ch / 2), (cy + ch / 2).min(side));
        for i in 0..n {
            let j = n - 1 - i;
            for c in 0..3 {
                for y in y0..y1 {
                    let row = c * side * side + y * side;
                    images[i * item + row + x0..i * item + row + x1]
                        .copy_from_slice(&orig[j * item + row + x0..j * item + row + x1]);
                }
            }
        }
        // The label weight follows the box that was actually pasted (clipped at the border).
        lam = 1.0 - ((x1 - x0) * (y1 - y0)) as f32 / (side * side) as f32;
    } else {
        for i in 0..n {
            let j = n - 1 - i;
            for k in 0..item {
                images[i * item + k] = lam * orig[i * item + k] + (1.0 - lam) * orig[j * item + k];
            }
        }
    }
    Some(Mix {
        partner: (0..n).map(|i| labels[n - 1 - i]).collect(),
        lam,
    })
}

/// A Beta(α, α) draw, from two Gamma(α) draws.
fn beta(alpha: f32, rng: &mut StdRng) -> f32 {
    use rand_distr::{Distribution, Gamma};
    let g = Gamma::new(alpha as f64, 1.0).expect("alpha is validated above 0");
    let (a, b) = (g.sample(rng), g.sample(rng));
    if a + b > 0.0 {
        (a / (a + b)) as f32
    } else {
        0.5
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn crops_stay_inside_the_image_with_bounded_area_and_ratio() {
        let mut rng = StdRng::seed_from_u64(1);
        for &(w, h) in &[(64u32, 48u32), (8, 8), (300, 20)] {
            for _ in 0..200 {
                let (x, y, cw, ch) = random_crop(w, h, 0.25, &mut rng);
                assert!(
                    cw >= 1 && ch >= 1 && x + cw <= w && y + ch <= h,
                    "{w}x{h}: {x},{y},{cw},{ch}"
                );
            }
        }
        // A big image: the area is within [0.25, 1] and the ratio within [3/4, 4/3] (rounding aside).
        for _ in 0..200 {
            let (_, _, cw, ch) = random_crop(400, 400, 0.25, &mut rng);
            let area = (cw * ch) as f32 / 160_000.0;
            let ratio = cw as f32 / ch as f32;
            assert!((0.24..=1.0).contains(&area), "{area}");
            assert!((0.74..=1.34).contains(&ratio), "{ratio}");
        }
    }

    #[test]
    fn rand_augment_keeps_pixels_in_range_and_magnitude_zero_changes_little() {
        let mut rng = StdRng::seed_from_u64(2);
        // R and G span their whole range already (autocontrast keeps them), B is flat.
        let img = Rgb32FImage::from_fn(16, 12, |x, y| Rgb([x as f32 / 15.0, y as f32 / 11.0, 0.3]));
        let mut changed = 0;
        for _ in 0..50 {
            let mut a = img.clone();
            rand_augment(&mut a, 3, 9.0, &mut rng);
            assert!(a.pixels().all(|p| p.0.iter().all(|v| (0.0..=1.0).contains(v))));
            changed += usize::from(a != img);
        }
        assert!(changed > 40, "{changed} of 50 images changed");
        // At magnitude 0 every op is the identity but posterize's rounding to 8 bits.
        for _ in 0..50 {
            let mut a = img.clone();
            rand_augment(&mut a, 3, 0.0, &mut rng);
            let diff = a
                .pixels()
                .zip(img.pixels())
                .flat_map(|(p, q)| (0..3).map(move |c| (p.0[c] - q.0[c]).abs()));
            assert!(diff.fold(0.0, f32::max) <= 1.0 / 256.0);
        }
    }

    #[test]
    fn mixup_and_cutmix_targets_weigh_what_was_mixed() {
        let side = 4;
        let item = 3 * side * side;
        let base: Vec<f32> = (0..2).flat_map(|i| vec![i as f32; item]).collect();
        let mixup = Augment {
            mixup: 0.4,
            ..Augment::none()
        };
        let mut x = base.clone();
        let m = mix_batch(&mut x, &[3, 7], side, &mixup, &mut StdRng::seed_from_u64(4)).unwrap();
        assert_eq!(m.partner, vec![7, 3]);
        // Image 0 is 0·lam + 1·(1 − lam) everywhere.
        assert!(x[..item].iter().all(|&v| (v - (1.0 - m.lam)).abs() < 1e-6));
        let cutmix = Augment {
            cutmix: 1.0,
            ..Augment::none()
        };
        for seed in 0..20 {
            let mut x = base.clone();
            let m = mix_batch(&mut x, &[3, 7], side, &cutmix, &mut StdRng::seed_from_u64(seed)).unwrap();
            // The pasted fraction of image 0 (ones from image 1) is exactly 1 − lam.
            let pasted = x[..item].iter().filter(|&&v| v == 1.0).count() as f32 / item as f32;
            assert!(
                (pasted - (1.0 - m.lam)).abs() < 1e-6,
                "seed {seed}: {pasted} vs {}",
                m.lam
            );
        }
        assert!(mix_batch(
            &mut base.clone(),
            &[3, 7],
            side,
            &Augment::none(),
            &mut StdRng::seed_from_u64(0)
        )
        .is_none());
    }

    #[test]
    fn augmented_images_have_the_model_size() {
        let img = Rgb32FImage::from_pixel(40, 30, Rgb([0.2, 0.4, 0.6]));
        let aug = Augment {
            rand_ops: 2,
            ..Augment::crop_flip(0.08)
        };
        let mut rng = StdRng::seed_from_u64(5);
        let mut out = random_resized_crop(&img, 16, 0.08, &mut rng);
        flip_and_rand(&mut out, &aug, &mut rng);
        assert_eq!((out.width(), out.height()), (16, 16));
        assert_eq!(aug.describe(), "rrc0.08+flip+rand-n2-m9");
    }
}
