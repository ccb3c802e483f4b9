//! The data set formats spin reads: the built-in digits CSV, CIFAR-10's binary batches and a
//! folder of class sub-directories. Every reader names the file and the problem in its errors.
use super::{Files, Raw};
use crate::error::Error;
use std::path::{Path, PathBuf};

pub(super) fn cifar_names() -> Vec<String> {
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

/// Parses the digits CSV (gzipped): 64 pixel values 0..16 and a label 0..9 per row.
pub(super) fn read_digits(path: &Path, gz: &[u8]) -> Result<Raw, Error> {
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

pub(super) fn parse_digits(path: &Path, text: &str) -> Result<Raw, Error> {
    let mut raw = Raw::empty(8, 16.0, 10, (0..10).map(|d| d.to_string()).collect());
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
            raw.pixels.extend(nums[..64].iter().map(|&v| v as u8));
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
pub(super) fn read_cifar_batch(path: &Path, out: &mut Raw) -> Result<(), Error> {
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
        out.pixels.extend_from_slice(&rec[1..]);
    }
    Ok(())
}

/// Checks CIFAR-10 bytes as a batch file (for the fuzz and property tests).
pub fn check_cifar_batch(bytes: &[u8]) -> Result<usize, Error> {
    let mut raw = Raw::empty(32, 255.0, 10, cifar_names());
    parse_cifar_batch(Path::new("<bytes>"), bytes, &mut raw)?;
    Ok(raw.labels.len())
}

/// The class sub-directories of an ImageFolder directory, sorted by name.
pub(super) fn class_dirs(dir: &Path) -> Result<Vec<PathBuf>, Error> {
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
    Ok(classes)
}

/// One sub-directory per class (sorted by name), images in any format the image crate reads
/// (PNG, JPEG, BMP, GIF, WebP, TIFF). Only each file's header is read here (its pixels are decoded
/// when a batch needs them): a file whose header does not read is skipped and recorded in
/// `skipped`, or with `strict` fails the listing; a class without a single image is an error
/// naming it.
pub(super) fn list_folder(
    dir: &Path,
    strict: bool,
    skipped: &mut Vec<(PathBuf, String)>,
) -> Result<Files, Error> {
    let classes = class_dirs(dir)?;
    let mut out = Files {
        names: classes
            .iter()
            .map(|p| p.file_name().unwrap_or_default().to_string_lossy().into_owned())
            .collect(),
        ..Files::default()
    };
    for (label, class) in classes.iter().enumerate() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(class)
            .map_err(|e| Error::io(class, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        let before = out.labels.len();
        for f in files {
            if ::image::ImageFormat::from_path(&f).is_err() {
                skipped.push((f, "not an image file".into()));
                continue;
            }
            match check_header(&f) {
                Ok(()) => {
                    out.paths.push(f);
                    out.labels.push(label);
                }
                Err(e) if strict => return Err(e),
                Err(e) => skipped.push((f, e.to_string())),
            }
        }
        if out.labels.len() == before {
            return Err(Error::Data {
                path: class.clone(),
                line: None,
                reason: "this class has no readable image (images in sub-folders are not read)".into(),
            });
        }
    }
    Ok(out)
}

/// Reads an image file's header: its format and a non-empty size.
fn check_header(path: &Path) -> Result<(), Error> {
    let bad = |reason: String| Error::Image {
        path: path.into(),
        reason,
    };
    let (w, h) = ::image::ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?
        .into_dimensions()
        .map_err(|e| bad(e.to_string()))?;
    if w == 0 || h == 0 {
        return Err(bad(format!("the image is {w}×{h}")));
    }
    Ok(())
}
