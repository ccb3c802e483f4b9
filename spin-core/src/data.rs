//! Image classification data: the built-in digits set, CIFAR-10's binary batches, and a folder of
//! class sub-directories. Every reader returns a typed error naming the file and the problem.
//!
//! Images are held as NCHW f32, already resized to the model's input size and normalised.
use crate::Error;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::path::{Path, PathBuf};

/// The digits set shipped inside spin (see `spin-core/data/README.md` for its attribution).
pub const DIGITS_CSV_GZ: &[u8] = include_bytes!("../data/digits.csv.gz");

/// How a model expects its input: size, normalisation and the eval-time resize (timm's
/// `resolve_data_config` for that model).
#[derive(Clone, Debug, PartialEq)]
pub struct DataConfig {
    pub image: usize,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// Eval transform: resize the shorter side to image / crop_pct, then centre-crop.
    pub crop_pct: f32,
}

impl DataConfig {
    pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
    pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

    pub fn imagenet(image: usize, crop_pct: f32) -> Self {
        Self {
            image,
            mean: Self::IMAGENET_MEAN,
            std: Self::IMAGENET_STD,
            crop_pct,
        }
    }
    /// Centred to [-1, 1], no crop: spin's config for the small built-in data.
    pub fn centred(image: usize) -> Self {
        Self {
            image,
            mean: [0.5; 3],
            std: [0.5; 3],
            crop_pct: 1.0,
        }
    }
}

/// A labelled image set, NCHW, normalised.
#[derive(Clone, Debug, Default)]
pub struct Dataset {
    pub images: Vec<f32>,
    pub labels: Vec<usize>,
    pub image: usize,
    pub classes: usize,
    pub class_names: Vec<String>,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    fn item_len(&self) -> usize {
        3 * self.image * self.image
    }
    /// The images and labels at `idx`, images concatenated NCHW.
    pub fn gather(&self, idx: &[usize]) -> (Vec<f32>, Vec<usize>) {
        let n = self.item_len();
        let mut x = Vec::with_capacity(idx.len() * n);
        for &i in idx {
            x.extend_from_slice(&self.images[i * n..(i + 1) * n]);
        }
        (x, idx.iter().map(|&i| self.labels[i]).collect())
    }
    fn subset(&self, idx: &[usize]) -> Dataset {
        let (images, labels) = self.gather(idx);
        Dataset {
            images,
            labels,
            ..self.meta()
        }
    }
    fn meta(&self) -> Dataset {
        Dataset {
            images: vec![],
            labels: vec![],
            image: self.image,
            classes: self.classes,
            class_names: self.class_names.clone(),
        }
    }
}

/// A train/test split.
#[derive(Clone, Debug)]
pub struct Split {
    pub train: Dataset,
    pub test: Dataset,
}

/// Which data set to read: `digits`, `cifar10:DIR` or `folder:DIR`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataSpec {
    Digits,
    Cifar10(PathBuf),
    Folder(PathBuf),
}

impl std::str::FromStr for DataSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.split_once(':') {
            None if s == "digits" => Ok(DataSpec::Digits),
            Some(("cifar10", dir)) if !dir.is_empty() => Ok(DataSpec::Cifar10(dir.into())),
            Some(("folder", dir)) if !dir.is_empty() => Ok(DataSpec::Folder(dir.into())),
            _ => Err(Error::Invalid(format!(
                "unknown data `{s}`: use digits, cifar10:DIR or folder:DIR"
            ))),
        }
    }
}

impl std::fmt::Display for DataSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DataSpec::Digits => write!(f, "digits"),
            DataSpec::Cifar10(d) => write!(f, "cifar10:{}", d.display()),
            DataSpec::Folder(d) => write!(f, "folder:{}", d.display()),
        }
    }
}

/// The fraction of digits and folder data held out for testing, with a fixed seed so every run
/// and every model sees the same split.
pub const TEST_FRACTION: f64 = 0.2;
const SPLIT_SEED: u64 = 20_220_722;

/// Reads a data set, resized and normalised for `cfg`.
pub fn load(spec: &DataSpec, cfg: &DataConfig) -> Result<Split, Error> {
    match spec {
        DataSpec::Digits => {
            let raw = read_digits(Path::new("<built-in digits>"), DIGITS_CSV_GZ)?;
            Ok(split(finish(raw, cfg)))
        }
        DataSpec::Cifar10(dir) => {
            let mut train = Raw::empty(32, 10, cifar_names());
            for i in 1..=5 {
                read_cifar_batch(&dir.join(format!("data_batch_{i}.bin")), &mut train)?;
            }
            let mut test = Raw::empty(32, 10, cifar_names());
            read_cifar_batch(&dir.join("test_batch.bin"), &mut test)?;
            Ok(Split {
                train: finish(train, cfg),
                test: finish(test, cfg),
            })
        }
        DataSpec::Folder(dir) => Ok(split(finish(read_folder(dir, cfg.image)?, cfg))),
    }
}

/// Images in [0, 1], NCHW, at their native square size.
#[derive(Debug)]
struct Raw {
    pixels: Vec<f32>,
    labels: Vec<usize>,
    size: usize,
    classes: usize,
    names: Vec<String>,
}

impl Raw {
    fn empty(size: usize, classes: usize, names: Vec<String>) -> Self {
        Self {
            pixels: vec![],
            labels: vec![],
            size,
            classes,
            names,
        }
    }
}

fn cifar_names() -> Vec<String> {
    [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    .map(String::from)
    .to_vec()
}

fn split(all: Dataset) -> Split {
    let mut idx: Vec<usize> = (0..all.len()).collect();
    idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(SPLIT_SEED));
    let n_test = (all.len() as f64 * TEST_FRACTION).round() as usize;
    let (test, train) = idx.split_at(n_test);
    let (mut train, mut test) = (train.to_vec(), test.to_vec());
    train.sort_unstable();
    test.sort_unstable();
    Split {
        train: all.subset(&train),
        test: all.subset(&test),
    }
}

/// Resizes (bilinear) to the model's size and normalises per channel.
fn finish(raw: Raw, cfg: &DataConfig) -> Dataset {
    let (s, t) = (raw.size, cfg.image);
    let n = raw.labels.len();
    let mut images = Vec::with_capacity(n * 3 * t * t);
    for i in 0..n {
        let img = &raw.pixels[i * 3 * s * s..(i + 1) * 3 * s * s];
        let img = if s == t {
            img.to_vec()
        } else {
            resize_chw(img, s, t)
        };
        for (c, plane) in img.chunks(t * t).enumerate() {
            images.extend(plane.iter().map(|&v| (v - cfg.mean[c]) / cfg.std[c]));
        }
    }
    Dataset {
        images,
        labels: raw.labels,
        image: t,
        classes: raw.classes,
        class_names: raw.names,
    }
}

fn resize_chw(img: &[f32], from: usize, to: usize) -> Vec<f32> {
    let mut hwc = image::Rgb32FImage::new(from as u32, from as u32);
    for (x, y, p) in hwc.enumerate_pixels_mut() {
        let (x, y) = (x as usize, y as usize);
        for c in 0..3 {
            p.0[c] = img[(c * from + y) * from + x];
        }
    }
    let out = image::imageops::resize(&hwc, to as u32, to as u32, image::imageops::FilterType::Triangle);
    let mut chw = vec![0.0; 3 * to * to];
    for (x, y, p) in out.enumerate_pixels() {
        for c in 0..3 {
            chw[(c * to + y as usize) * to + x as usize] = p.0[c];
        }
    }
    chw
}

/// Parses the digits CSV (gzipped): 64 pixel values 0..16 and a label 0..9 per row.
fn read_digits(path: &Path, gz: &[u8]) -> Result<Raw, Error> {
    use std::io::Read;
    let mut text = String::new();
    flate2::read::GzDecoder::new(gz)
        .read_to_string(&mut text)
        .map_err(|e| Error::Data {
            path: path.into(),
            line: None,
            reason: format!("cannot decompress: {e}"),
        })?;
    parse_digits(path, &text)
}

/// Checks digits CSV text and returns its row count (for the fuzz and property tests).
pub fn check_digits(text: &str) -> Result<usize, Error> {
    Ok(parse_digits(Path::new("<text>"), text)?.labels.len())
}

fn parse_digits(path: &Path, text: &str) -> Result<Raw, Error> {
    let mut raw = Raw::empty(8, 10, (0..10).map(|d| d.to_string()).collect());
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let bad = |reason: String| Error::Data {
            path: path.into(),
            line: Some(i + 1),
            reason,
        };
        let values: Vec<&str> = line.split(',').map(str::trim).collect();
        if values.len() != 65 {
            return Err(bad(format!(
                "expected 65 comma-separated values (64 pixels and a label), found {}",
                values.len()
            )));
        }
        let mut nums = [0u32; 65];
        for (j, v) in values.iter().enumerate() {
            nums[j] = v
                .parse::<f64>()
                .ok()
                .filter(|x| x.fract() == 0.0 && *x >= 0.0 && *x <= 16.0)
                .map(|x| x as u32)
                .ok_or_else(|| bad(format!("column {}: `{v}` is not a whole number in 0..=16", j + 1)))?;
        }
        if nums[64] > 9 {
            return Err(bad(format!("label {} is not a digit 0..9", nums[64])));
        }
        for _ in 0..3 {
            raw.pixels.extend(nums[..64].iter().map(|&v| v as f32 / 16.0));
        }
        raw.labels.push(nums[64] as usize);
    }
    if raw.labels.is_empty() {
        return Err(Error::Data {
            path: path.into(),
            line: None,
            reason: "no rows".into(),
        });
    }
    Ok(raw)
}

/// Appends one CIFAR-10 binary batch: records of a label byte and 3072 pixel bytes (R, G, B planes).
fn read_cifar_batch(path: &Path, out: &mut Raw) -> Result<(), Error> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_cifar_batch(path, &bytes, out)
}

const CIFAR_RECORD: usize = 1 + 3 * 32 * 32;

fn parse_cifar_batch(path: &Path, bytes: &[u8], out: &mut Raw) -> Result<(), Error> {
    if bytes.is_empty() || !bytes.len().is_multiple_of(CIFAR_RECORD) {
        return Err(Error::Data {
            path: path.into(),
            line: None,
            reason: format!(
                "{} bytes is not a whole number of CIFAR-10 records ({CIFAR_RECORD} bytes each)",
                bytes.len()
            ),
        });
    }
    for (i, rec) in bytes.chunks_exact(CIFAR_RECORD).enumerate() {
        if rec[0] > 9 {
            return Err(Error::Data {
                path: path.into(),
                line: None,
                reason: format!("record {i} has label {}, CIFAR-10 labels are 0..9", rec[0]),
            });
        }
        out.labels.push(rec[0] as usize);
        out.pixels.extend(rec[1..].iter().map(|&b| b as f32 / 255.0));
    }
    Ok(())
}

/// Checks CIFAR-10 bytes as a batch file (for the fuzz and property tests).
pub fn check_cifar_batch(bytes: &[u8]) -> Result<usize, Error> {
    let mut raw = Raw::empty(32, 10, cifar_names());
    parse_cifar_batch(Path::new("<bytes>"), bytes, &mut raw)?;
    Ok(raw.labels.len())
}

/// One sub-directory per class (sorted by name), PNG or JPEG images inside, resized to `size`.
fn read_folder(dir: &Path, size: usize) -> Result<Raw, Error> {
    let mut classes: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    classes.sort();
    if classes.is_empty() {
        return Err(Error::Data {
            path: dir.into(),
            line: None,
            reason: "no class sub-directories".into(),
        });
    }
    let names = classes
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    let mut raw = Raw::empty(size, classes.len(), names);
    for (label, class) in classes.iter().enumerate() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(class)
            .map_err(|e| Error::io(class, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let ext = p.extension().map(|e| e.to_string_lossy().to_ascii_lowercase());
                matches!(ext.as_deref(), Some("png" | "jpg" | "jpeg"))
            })
            .collect();
        files.sort();
        for f in files {
            let img = decode(&f)?;
            let img = image::imageops::resize(
                &img.to_rgb32f(),
                size as u32,
                size as u32,
                image::imageops::FilterType::Triangle,
            );
            raw.pixels.extend(hwc_to_chw(&img, size));
            raw.labels.push(label);
        }
    }
    if raw.labels.is_empty() {
        return Err(Error::Data {
            path: dir.into(),
            line: None,
            reason: "no PNG or JPEG images found".into(),
        });
    }
    Ok(raw)
}

fn hwc_to_chw(img: &image::Rgb32FImage, size: usize) -> Vec<f32> {
    let mut chw = vec![0.0; 3 * size * size];
    for (x, y, p) in img.enumerate_pixels() {
        for c in 0..3 {
            chw[(c * size + y as usize) * size + x as usize] = p.0[c];
        }
    }
    chw
}

/// Decodes a PNG or JPEG file.
pub fn decode(path: &Path) -> Result<image::DynamicImage, Error> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    image::load_from_memory(&bytes).map_err(|e| Error::Image {
        path: path.into(),
        reason: e.to_string(),
    })
}

/// timm's eval transform for one image: resize the shorter side to image / crop_pct (bicubic),
/// centre-crop to image × image, scale to [0, 1], normalise. Returns CHW.
pub fn preprocess(img: &image::DynamicImage, cfg: &DataConfig) -> Vec<f32> {
    let (w, h) = (img.width() as f32, img.height() as f32);
    let short = (cfg.image as f32 / cfg.crop_pct).floor().max(cfg.image as f32);
    let scale = short / w.min(h);
    let (nw, nh) = (
        ((w * scale).round() as u32).max(cfg.image as u32),
        ((h * scale).round() as u32).max(cfg.image as u32),
    );
    let resized = image::imageops::resize(&img.to_rgb32f(), nw, nh, image::imageops::FilterType::CatmullRom);
    let (x0, y0) = ((nw - cfg.image as u32) / 2, (nh - cfg.image as u32) / 2);
    let crop = image::imageops::crop_imm(&resized, x0, y0, cfg.image as u32, cfg.image as u32).to_image();
    let mut chw = hwc_to_chw(&crop, cfg.image);
    let plane = cfg.image * cfg.image;
    for (c, p) in chw.chunks_mut(plane).enumerate() {
        for v in p {
            *v = (v.clamp(0.0, 1.0) - cfg.mean[c]) / cfg.std[c];
        }
    }
    chw
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_load_with_a_fixed_split() {
        let s = load(&DataSpec::Digits, &DataConfig::centred(8)).unwrap();
        assert_eq!(s.train.len() + s.test.len(), 1797);
        assert_eq!(s.test.len(), 359);
        assert_eq!(s.train.images.len(), s.train.len() * 3 * 64);
        assert!(s.train.images.iter().all(|v| (-1.0..=1.0).contains(v)));
        let again = load(&DataSpec::Digits, &DataConfig::centred(8)).unwrap();
        assert_eq!(s.test.labels, again.test.labels);
        // Resizing to a larger model input works too.
        let big = load(&DataSpec::Digits, &DataConfig::centred(16)).unwrap();
        assert_eq!(big.test.images.len(), 359 * 3 * 256);
    }

    #[test]
    fn bad_digit_rows_are_named() {
        let p = Path::new("d.csv");
        let good = vec!["0"; 64].join(",") + ",3";
        assert!(parse_digits(p, &good).is_ok());
        let short = ["0"; 10].join(",");
        let err = parse_digits(p, &format!("{good}\n{short}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2") && err.contains("found 10"), "{err}");
        let err = parse_digits(p, &(vec!["0"; 64].join(",") + ",12"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("label 12"), "{err}");
        let err = parse_digits(p, &(vec!["x"; 64].join(",") + ",1"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`x`"), "{err}");
    }

    #[test]
    fn data_specs_parse() {
        assert_eq!("digits".parse::<DataSpec>().unwrap(), DataSpec::Digits);
        assert_eq!(
            "cifar10:/d".parse::<DataSpec>().unwrap(),
            DataSpec::Cifar10("/d".into())
        );
        assert!("mnist".parse::<DataSpec>().is_err());
        assert!("folder:".parse::<DataSpec>().is_err());
    }
}
