//! Image classification data: the built-in digits set, CIFAR-10's binary batches, and a folder of
//! class sub-directories. Every reader returns a typed error naming the file and the problem.
//!
//! Images are held as NCHW f32, already resized to the model's input size and normalised.
mod formats;
mod image;

pub use self::image::{decode, preprocess};
pub use formats::{check_cifar_batch, check_digits};

use crate::error::Error;
pub use crate::models::DataConfig;
use formats::{cifar_names, read_cifar_batch, read_digits, read_folder};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::path::{Path, PathBuf};

/// The digits set shipped inside spin (see `spin-core/data/README.md` for its attribution).
pub const DIGITS_CSV_GZ: &[u8] = include_bytes!("../../data/digits.csv.gz");

/// A labelled image set, NCHW, normalised.
#[derive(Clone, Debug, Default)]
pub struct Dataset {
    /// Every image, NCHW, normalised.
    pub images: Vec<f32>,
    /// Every image's class.
    pub labels: Vec<usize>,
    /// Image side.
    pub image: usize,
    /// Number of classes.
    pub classes: usize,
    /// Class names, by index.
    pub class_names: Vec<String>,
}

impl Dataset {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    /// Whether there are no images.
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
    /// The images trained on.
    pub train: Dataset,
    /// The held-out images.
    pub test: Dataset,
    /// Files passed over, with the reason (files that do not decode, files that are not images).
    pub skipped: Vec<(PathBuf, String)>,
}

/// Which data set to read: `digits`, `cifar10:DIR` or `folder:DIR`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataSpec {
    /// The UCI handwritten digits shipped with spin (`digits`).
    Digits,
    /// CIFAR-10's binary batches in a directory (`cifar10:DIR`).
    Cifar10(PathBuf),
    /// An ImageFolder directory (`folder:DIR`): `DIR/train/<class>` and `DIR/val/<class>`, or
    /// one sub-directory per class split by a seeded 20 % hold-out.
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

/// Reads a data set, resized and normalised for `cfg`; files that do not decode are skipped
/// and listed in [`Split::skipped`].
pub fn load(spec: &DataSpec, cfg: &DataConfig) -> Result<Split, Error> {
    load_with(spec, cfg, false)
}

/// [`load`], failing on the first file that does not decode when `strict`.
pub fn load_with(spec: &DataSpec, cfg: &DataConfig, strict: bool) -> Result<Split, Error> {
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
                skipped: Vec::new(),
            })
        }
        DataSpec::Folder(dir) => {
            let mut skipped = Vec::new();
            let (train_dir, val_dir) = (dir.join("train"), dir.join("val"));
            if !train_dir.is_dir() {
                let all = finish(read_folder(dir, cfg.image, strict, &mut skipped)?, cfg);
                return Ok(Split {
                    skipped,
                    ..split(all)
                });
            }
            if !val_dir.is_dir() {
                return Err(Error::Data {
                    path: val_dir,
                    line: None,
                    reason:
                        "a folder with `train/` needs `val/` beside it (one sub-folder per class in each)"
                            .into(),
                });
            }
            let train = finish(read_folder(&train_dir, cfg.image, strict, &mut skipped)?, cfg);
            let test = finish(read_folder(&val_dir, cfg.image, strict, &mut skipped)?, cfg);
            if train.class_names != test.class_names {
                return Err(Error::Data {
                    path: dir.clone(),
                    line: None,
                    reason: format!(
                        "train/ and val/ hold different classes ({:?} and {:?})",
                        train.class_names, test.class_names
                    ),
                });
            }
            Ok(Split { train, test, skipped })
        }
    }
}

/// Images in [0, 1], NCHW, at their native square size.
#[derive(Debug)]
pub(crate) struct Raw {
    pixels: Vec<f32>,
    labels: Vec<usize>,
    size: usize,
    classes: usize,
    names: Vec<String>,
}

impl Raw {
    pub(crate) fn empty(size: usize, classes: usize, names: Vec<String>) -> Self {
        Self {
            pixels: vec![],
            labels: vec![],
            size,
            classes,
            names,
        }
    }
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
        skipped: Vec::new(),
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
    let mut hwc = ::image::Rgb32FImage::new(from as u32, from as u32);
    for (x, y, p) in hwc.enumerate_pixels_mut() {
        let (x, y) = (x as usize, y as usize);
        for c in 0..3 {
            p.0[c] = img[(c * from + y) * from + x];
        }
    }
    let out = ::image::imageops::resize(
        &hwc,
        to as u32,
        to as u32,
        ::image::imageops::FilterType::Triangle,
    );
    let mut chw = vec![0.0; 3 * to * to];
    for (x, y, p) in out.enumerate_pixels() {
        for c in 0..3 {
            chw[(c * to + y as usize) * to + x as usize] = p.0[c];
        }
    }
    chw
}

#[cfg(test)]
mod tests {
    use super::formats::parse_digits;
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
