//! Image classification data: the built-in digits set, CIFAR-10's binary batches, and ImageFolder
//! directories. Every reader returns a typed error naming the file and the problem.
//!
//! A [`Dataset`] holds what is cheap to hold — labels, and either compact 8-bit pixels (digits,
//! CIFAR-10) or file paths (folders) — and makes model-sized, normalised images only when a batch
//! needs them: [`Loader`] decodes and augments batches on a bounded pool of threads, so memory
//! does not grow with the data set.
mod augment;
mod formats;
mod image;
mod loader;
mod resize;
mod sample;

pub use self::image::{
    decode, eval_crop, eval_geometry, eval_pixels, is_image_file, normalise, pil_rgb, preprocess,
};
pub use augment::{flip_and_rand, mix_batch, rand_augment, random_crop, random_resized_crop, Augment, Mix};
pub use formats::{check_cifar_batch, check_digits};
pub use loader::{Batch, Loader};
pub use resize::{pil_resize, Filter, BICUBIC, BILINEAR};

use crate::error::Error;
pub use crate::models::DataConfig;
use ::image::Rgb32FImage;
use formats::{cifar_names, list_folder, read_cifar_batch, read_digits};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The digits set shipped inside spin (see `spin-core/data/README.md` for its attribution).
pub const DIGITS_CSV_GZ: &[u8] = include_bytes!("../../data/digits.csv.gz");

/// ImageNet-1k's classes in the order of a classifier's outputs: (WordNet id, names), e.g.
/// `("n02123045", "tabby, tabby cat")` at 281 (attribution in `spin-core/data/README.md`).
///
/// ```
/// let classes = spin_core::data::imagenet_classes();
/// assert_eq!(classes.len(), 1000);
/// assert_eq!(classes[281], ("n02123045", "tabby, tabby cat"));
/// ```
pub fn imagenet_classes() -> Vec<(&'static str, &'static str)> {
    include_str!("../../data/imagenet_classes.tsv")
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .collect()
}

/// Where a data set's images come from.
#[derive(Clone, Debug)]
enum Source {
    /// Square images read at load time, CHW bytes; a byte v stands for v / `max`.
    Memory { pixels: Vec<u8>, size: usize, max: f32 },
    /// Image files, decoded when a batch needs them.
    Files(Vec<PathBuf>),
}

/// A labelled image set; images are made (decoded, resized, normalised) on demand.
#[derive(Clone, Debug)]
pub struct Dataset {
    source: Source,
    /// Every image's class.
    pub labels: Vec<usize>,
    /// Number of classes.
    pub classes: usize,
    /// Class names, by index.
    pub class_names: Vec<String>,
    /// The model's input: size, normalisation, eval crop.
    pub config: DataConfig,
    /// Fail on a file that does not decode (else skip it and record it).
    strict: bool,
    /// Files that failed to decode while batches were made (shared by clones and subsets).
    late_skips: Arc<Mutex<Vec<(PathBuf, String)>>>,
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
    /// The model's input side.
    pub fn image(&self) -> usize {
        self.config.image
    }
    /// Whether images are decoded from files as batches need them (else they are held in memory
    /// as 8-bit pixels at their native size).
    pub fn is_streamed(&self) -> bool {
        matches!(self.source, Source::Files(_))
    }
    /// Image `i` as read, before any transform.
    fn source_image(&self, i: usize) -> Result<Rgb32FImage, Error> {
        match &self.source {
            Source::Memory { pixels, size, max } => {
                let (s, plane) = (*size, size * size);
                let px = &pixels[i * 3 * plane..(i + 1) * 3 * plane];
                Ok(Rgb32FImage::from_fn(s as u32, s as u32, |x, y| {
                    let at = y as usize * s + x as usize;
                    ::image::Rgb([0, 1, 2].map(|c| px[c * plane + at] as f32 / max))
                }))
            }
            Source::Files(paths) => {
                Ok(::image::DynamicImage::ImageRgb8(pil_rgb(&decode(&paths[i])?)).to_rgb32f())
            }
        }
    }
    /// Image `i` at the model's size, normalised, CHW: the eval transform, or with `augment`
    /// the training transform drawn from `rng`.
    pub fn item(&self, i: usize, augment: Option<(&Augment, &mut StdRng)>) -> Result<Vec<f32>, Error> {
        if let (Source::Files(paths), None) = (&self.source, &augment) {
            // timm's eval transform on the file's 8-bit pixels, as `spin predict` runs it.
            return Ok(preprocess(&decode(&paths[i])?, &self.config));
        }
        let img = self.source_image(i)?;
        let size = self.config.image as u32;
        let out = match augment {
            None => self.eval_resize(&img),
            Some((aug, rng)) => {
                let mut out = match aug.crop_scale {
                    Some(scale) => random_resized_crop(&img, size, scale, rng),
                    None => self.eval_resize(&img),
                };
                flip_and_rand(&mut out, aug, rng);
                out
            }
        };
        Ok(normalise(&out, &self.config))
    }
    /// The eval transform's geometry: in-memory (square) images are resized to the model's size;
    /// files get timm's resize-and-centre-crop, as `spin predict` does.
    fn eval_resize(&self, img: &Rgb32FImage) -> Rgb32FImage {
        let size = self.config.image as u32;
        match self.source {
            Source::Memory { .. } if img.width() == size && img.height() == size => img.clone(),
            Source::Memory { .. } => {
                ::image::imageops::resize(img, size, size, ::image::imageops::FilterType::Triangle)
            }
            Source::Files(_) => eval_crop(img, &self.config),
        }
    }
    /// [`Dataset::item`], but a file that does not decode is recorded and gives `None` unless the
    /// set is strict.
    pub(crate) fn try_item(
        &self,
        i: usize,
        augment: Option<(&Augment, &mut StdRng)>,
    ) -> Result<Option<Vec<f32>>, Error> {
        match self.item(i, augment) {
            Ok(x) => Ok(Some(x)),
            Err(e) if self.strict => Err(e),
            Err(e) => {
                if let Source::Files(paths) = &self.source {
                    let mut skips = self.late_skips.lock().unwrap_or_else(|p| p.into_inner());
                    skips.push((paths[i].clone(), e.to_string()));
                }
                Ok(None)
            }
        }
    }
    /// Files that failed to decode while batches were made, with the reason.
    pub fn skipped(&self) -> Vec<(PathBuf, String)> {
        self.late_skips.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    /// The images (eval transform, NCHW) and labels at `idx`, decoded on [`Loader::default`]'s
    /// threads; files that do not decode are left out (or fail, when strict).
    pub fn gather(&self, idx: &[usize]) -> Result<(Vec<f32>, Vec<usize>), Error> {
        let (mut x, mut y) = (Vec::new(), Vec::new());
        Loader::default().run(self, idx, idx.len().max(1), None, 0, &mut |_, b| {
            x = b.images;
            y = b.labels;
            Ok(())
        })?;
        Ok((x, y))
    }
    /// The images at `idx`, in that order, as a data set of their own.
    pub fn subset(&self, idx: &[usize]) -> Dataset {
        let source = match &self.source {
            Source::Memory { pixels, size, max } => {
                let n = 3 * size * size;
                Source::Memory {
                    pixels: idx
                        .iter()
                        .flat_map(|&i| pixels[i * n..(i + 1) * n].iter().copied())
                        .collect(),
                    size: *size,
                    max: *max,
                }
            }
            Source::Files(paths) => Source::Files(idx.iter().map(|&i| paths[i].clone()).collect()),
        };
        Dataset {
            source,
            labels: idx.iter().map(|&i| self.labels[i]).collect(),
            ..self.clone_meta()
        }
    }
    fn clone_meta(&self) -> Dataset {
        Dataset {
            source: Source::Files(vec![]),
            labels: vec![],
            classes: self.classes,
            class_names: self.class_names.clone(),
            config: self.config.clone(),
            strict: self.strict,
            late_skips: self.late_skips.clone(),
        }
    }
    fn from_raw(raw: Raw, config: &DataConfig, strict: bool) -> Dataset {
        Dataset {
            source: Source::Memory {
                pixels: raw.pixels,
                size: raw.size,
                max: raw.max,
            },
            labels: raw.labels,
            classes: raw.classes,
            class_names: raw.names,
            config: config.clone(),
            strict,
            late_skips: Default::default(),
        }
    }
    fn from_files(files: Files, config: &DataConfig, strict: bool) -> Dataset {
        Dataset {
            source: Source::Files(files.paths),
            labels: files.labels,
            classes: files.names.len(),
            class_names: files.names,
            config: config.clone(),
            strict,
            late_skips: Default::default(),
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
    /// An ImageNet-1k validation directory (`imagenet:DIR`): one sub-directory per class, named
    /// by WordNet id (`n01440764`) or by class index (`0` … `999`); evaluation only.
    ImageNet(PathBuf),
}

impl std::str::FromStr for DataSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.split_once(':') {
            None if s == "digits" => Ok(DataSpec::Digits),
            Some(("cifar10", dir)) if !dir.is_empty() => Ok(DataSpec::Cifar10(dir.into())),
            Some(("folder", dir)) if !dir.is_empty() => Ok(DataSpec::Folder(dir.into())),
            Some(("imagenet", dir)) if !dir.is_empty() => Ok(DataSpec::ImageNet(dir.into())),
            _ => Err(Error::Invalid(format!(
                "unknown data `{s}`: use digits, cifar10:DIR, folder:DIR or imagenet:DIR"
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
            DataSpec::ImageNet(d) => write!(f, "imagenet:{}", d.display()),
        }
    }
}

/// The fraction of digits and folder data held out for testing, with a fixed seed so every run
/// and every model sees the same split.
pub const TEST_FRACTION: f64 = 0.2;
const SPLIT_SEED: u64 = 20_220_722;

/// Reads a data set for a model with input `cfg`; image files that are not images or whose header
/// does not read are skipped and listed in [`Split::skipped`].
pub fn load(spec: &DataSpec, cfg: &DataConfig) -> Result<Split, Error> {
    load_with(spec, cfg, false)
}

/// [`load`], failing on the first file that does not read when `strict` (then, too, while
/// batches are decoded).
pub fn load_with(spec: &DataSpec, cfg: &DataConfig, strict: bool) -> Result<Split, Error> {
    match spec {
        DataSpec::Digits => {
            let raw = read_digits(Path::new("<built-in digits>"), DIGITS_CSV_GZ)?;
            Ok(split(Dataset::from_raw(raw, cfg, strict)))
        }
        DataSpec::Cifar10(dir) => {
            let mut train = Raw::empty(32, 255.0, 10, cifar_names());
            for i in 1..=5 {
                read_cifar_batch(&dir.join(format!("data_batch_{i}.bin")), &mut train)?;
            }
            let mut test = Raw::empty(32, 255.0, 10, cifar_names());
            read_cifar_batch(&dir.join("test_batch.bin"), &mut test)?;
            Ok(Split {
                train: Dataset::from_raw(train, cfg, strict),
                test: Dataset::from_raw(test, cfg, strict),
                skipped: Vec::new(),
            })
        }
        DataSpec::ImageNet(dir) => {
            let mut skipped = Vec::new();
            let mut files = list_folder(dir, strict, &mut skipped)?;
            let classes = imagenet_classes();
            let index: Vec<usize> = files
                .names
                .iter()
                .map(|name| {
                    classes
                        .iter()
                        .position(|(wnid, _)| wnid == name)
                        .or_else(|| name.parse::<usize>().ok().filter(|&i| i < classes.len()))
                        .ok_or_else(|| Error::Data {
                            path: dir.join(name),
                            line: None,
                            reason: "not an ImageNet-1k class: name class folders by WordNet id (n01440764) or index (0..999)".into(),
                        })
                })
                .collect::<Result<_, _>>()?;
            files.labels.iter_mut().for_each(|l| *l = index[*l]);
            files.names = classes.iter().map(|(_, n)| n.to_string()).collect();
            let test = Dataset::from_files(files, cfg, strict);
            Ok(Split {
                train: test.subset(&[]),
                test,
                skipped,
            })
        }
        DataSpec::Folder(dir) => {
            let mut skipped = Vec::new();
            let (train_dir, val_dir) = (dir.join("train"), dir.join("val"));
            if !train_dir.is_dir() {
                let all = Dataset::from_files(list_folder(dir, strict, &mut skipped)?, cfg, strict);
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
            let train = Dataset::from_files(list_folder(&train_dir, strict, &mut skipped)?, cfg, strict);
            let test = Dataset::from_files(list_folder(&val_dir, strict, &mut skipped)?, cfg, strict);
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

/// Square images as 8-bit CHW planes at their native size.
#[derive(Debug)]
pub(crate) struct Raw {
    pixels: Vec<u8>,
    labels: Vec<usize>,
    size: usize,
    /// The value that stands for 1.0 (16 for the digits, 255 for CIFAR-10).
    max: f32,
    classes: usize,
    names: Vec<String>,
}

impl Raw {
    pub(crate) fn empty(size: usize, max: f32, classes: usize, names: Vec<String>) -> Self {
        Self {
            pixels: vec![],
            labels: vec![],
            size,
            max,
            classes,
            names,
        }
    }
}

/// An ImageFolder listing: every image file with its class.
#[derive(Debug, Default)]
pub(crate) struct Files {
    paths: Vec<PathBuf>,
    labels: Vec<usize>,
    names: Vec<String>,
}

fn split(all: Dataset) -> Split {
    let mut idx: Vec<usize> = (0..all.len()).collect();
    idx.shuffle(&mut StdRng::seed_from_u64(SPLIT_SEED));
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

#[cfg(test)]
mod tests {
    use super::formats::parse_digits;
    use super::*;

    #[test]
    fn digits_load_with_a_fixed_split() {
        let s = load(&DataSpec::Digits, &DataConfig::centred(8)).unwrap();
        assert_eq!(s.train.len() + s.test.len(), 1797);
        assert_eq!(s.test.len(), 359);
        let (images, labels) = s.train.gather(&[0, 5, 9]).unwrap();
        assert_eq!(images.len(), 3 * 3 * 64);
        assert_eq!(
            labels,
            vec![s.train.labels[0], s.train.labels[5], s.train.labels[9]]
        );
        assert!(images.iter().all(|v| (-1.0..=1.0).contains(v)));
        let again = load(&DataSpec::Digits, &DataConfig::centred(8)).unwrap();
        assert_eq!(s.test.labels, again.test.labels);
        // Resizing to a larger model input works too.
        let big = load(&DataSpec::Digits, &DataConfig::centred(16)).unwrap();
        assert_eq!(big.test.gather(&[0, 1]).unwrap().0.len(), 2 * 3 * 256);
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
