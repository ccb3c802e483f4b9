//! PyTorch checkpoint files (`torch.save`: `.pth`, `.pt`, `.bin`, `.pyth`), read with the
//! `pytorch-reader` crate, which parses the pickle without executing anything and refuses types
//! it cannot represent (quantized, complex, sparse tensors, extension opcodes).
//!
//! The state dict may sit at the top or under `model_state` (SlowFast's `.pyth`), `state_dict`,
//! `model` or `model_ema`; floating tensors (F32, F16, BF16, F64) are read as f64, and integer
//! ones — BatchNorm's `num_batches_tracked` — are skipped and reported.
use super::io::TensorMap;
use crate::error::Error;
use pytorch_reader::{DType, PytorchReader};
use std::collections::BTreeMap;
use std::path::Path;

/// Where the state dict may be nested, in the order they are tried.
pub const NESTINGS: [&str; 4] = ["model_state", "state_dict", "model", "model_ema"];

/// What reading a PyTorch file found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TorchReport {
    /// The key the state dict was nested under (`None`: at the top).
    pub nested_under: Option<String>,
    /// Tensors read.
    pub tensors: usize,
    /// Non-floating tensors passed over (e.g. `num_batches_tracked`).
    pub skipped: Vec<String>,
    /// How many tensors of each stored dtype were converted (e.g. `f16` → 3).
    pub dtypes: BTreeMap<String, usize>,
}

/// Whether the file is a PyTorch checkpoint (a zip archive as `torch.save` writes since
/// PyTorch 1.6, or a legacy pickle stream) rather than safetensors, judged by its first bytes: a
/// safetensors file starts with its header's length (8 bytes, little-endian) and then `{`.
pub fn is_torch_file(path: &Path) -> Result<bool, Error> {
    use std::io::Read;
    let mut head = [0u8; 9];
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let n = f.take(9).read(&mut head).map_err(|e| Error::io(path, e))?;
    let safetensors = n == 9 && head[8] == b'{';
    let zip = head.starts_with(b"PK\x03\x04");
    // A legacy file is a pickle: PROTO (0x80) and a protocol version of 2 to 5.
    let pickle = n >= 2 && head[0] == 0x80 && (2..=5).contains(&head[1]);
    Ok(!safetensors && (zip || pickle))
}

fn bad(path: &Path, reason: impl std::fmt::Display) -> Error {
    Error::Invalid(format!(
        "{}: not a readable PyTorch checkpoint: {reason}",
        path.display()
    ))
}

/// The state dict of a PyTorch file: its keys (without the nesting) and their tensors.
fn state_dict(path: &Path) -> Result<(Option<String>, Vec<(String, pytorch_reader::Tensor)>), Error> {
    let reader = PytorchReader::new(path).map_err(|e| bad(path, e))?;
    let all = reader.into_tensors();
    let nesting = NESTINGS
        .iter()
        .find(|n| all.keys().any(|k| k.starts_with(&format!("{n}."))));
    let mut out: Vec<(String, pytorch_reader::Tensor)> = match nesting {
        None => all.into_iter().collect(),
        Some(n) => {
            let prefix = format!("{n}.");
            all.into_iter()
                .filter_map(|(k, t)| k.strip_prefix(&prefix).map(|k| (k.to_string(), t)))
                .collect()
        }
    };
    if out.is_empty() {
        return Err(bad(path, "it holds no tensors"));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((nesting.map(|n| n.to_string()), out))
}

/// The keys of a PyTorch file's state dict (its floating tensors), without reading their data.
pub fn torch_keys(path: &Path) -> Result<Vec<String>, Error> {
    let (_, tensors) = state_dict(path)?;
    Ok(tensors
        .into_iter()
        .filter(|(_, t)| float_dtype(t.dtype()).is_some())
        .map(|(k, _)| k)
        .collect())
}

fn float_dtype(d: DType) -> Option<&'static str> {
    match d {
        DType::F32 => Some("f32"),
        DType::F16 => Some("f16"),
        DType::BF16 => Some("bf16"),
        DType::F64 => Some("f64"),
        _ => None,
    }
}

/// Reads a PyTorch file's state dict as f64 tensors by key, with what was found.
pub fn read_torch(path: &Path) -> Result<(TensorMap, TorchReport), Error> {
    let (nested_under, tensors) = state_dict(path)?;
    let mut report = TorchReport {
        nested_under,
        ..TorchReport::default()
    };
    let mut map = TensorMap::new();
    for (key, t) in tensors {
        let Some(name) = float_dtype(t.dtype()) else {
            report.skipped.push(key);
            continue;
        };
        let bytes = t.read().map_err(|e| bad(path, e))?;
        let values: Vec<f64> = match t.dtype() {
            DType::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as f64)
                .collect(),
            DType::F64 => bytes
                .chunks_exact(8)
                .map(|b| f64::from_ne_bytes(b.try_into().expect("chunks of 8")))
                .collect(),
            DType::F16 => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_ne_bytes([b[0], b[1]]).to_f64())
                .collect(),
            _ => bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_ne_bytes([b[0], b[1]]).to_f64())
                .collect(),
        };
        *report.dtypes.entry(name.to_string()).or_default() += 1;
        map.insert(key, (t.shape().to_vec(), values));
    }
    report.tensors = map.len();
    Ok((map, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_told_apart_by_their_first_bytes() {
        let dir = std::env::temp_dir().join(format!("spin-torch-magic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cases: [(&[u8], bool); 4] = [
            // safetensors whose header length happens to start with 0x80 (as a pickle does)
            (b"\x80\x02\0\0\0\0\0\0{\"a\":1}", false),
            (b"PK\x03\x04rest of a zip", true),
            (b"\x80\x02\x8a\x0alegacy pickle", true),
            (b"\x80\x09", false),
        ];
        for (i, (bytes, torch)) in cases.iter().enumerate() {
            let p = dir.join(format!("{i}"));
            std::fs::write(&p, bytes).unwrap();
            assert_eq!(is_torch_file(&p).unwrap(), *torch, "case {i}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
