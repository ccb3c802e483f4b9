//! safetensors files: atomic writes, and tensors read into f64 and encoded from it.
use super::StorageDtype;
use crate::error::Error;
use safetensors::tensor::{Dtype as StDtype, SafeTensors, TensorView};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Tensors by key: (shape, values in f64). What a checkpoint holds, read into memory.
pub type TensorMap = BTreeMap<String, (Vec<usize>, Vec<f64>)>;

/// The values under `key`, which must have shape `expected`; errors name `path`, the file the
/// tensors came from.
pub fn lookup<'a>(
    tensors: &'a TensorMap,
    path: &Path,
    key: &str,
    expected: &[usize],
) -> Result<&'a [f64], Error> {
    let (found, data) = tensors.get(key).ok_or_else(|| Error::MissingKey {
        path: path.into(),
        key: key.into(),
        expected: expected.to_vec(),
    })?;
    if found != expected {
        return Err(Error::Shape {
            path: path.into(),
            key: key.into(),
            expected: expected.to_vec(),
            found: found.clone(),
        });
    }
    Ok(data)
}

/// Writes `tensors` in the storage dtype and `metadata` as one safetensors file, atomically.
pub fn write_file(
    path: &Path,
    tensors: &TensorMap,
    dtype: StorageDtype,
    metadata: &BTreeMap<String, String>,
) -> Result<(), Error> {
    let encoded = tensors
        .iter()
        .map(|(key, (shape, data))| Ok((key, shape, encode(path, key, data, dtype)?)))
        .collect::<Result<Vec<_>, Error>>()?;
    let views = encoded
        .iter()
        .map(|(key, shape, (st, bytes))| {
            TensorView::new(*st, shape.to_vec(), bytes)
                .map(|v| (key.to_string(), v))
                .map_err(|e| Error::Invalid(format!("{key}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let md: HashMap<String, String> = metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let bytes = safetensors::tensor::serialize(views, &Some(md)).map_err(|e| Error::Safetensors {
        path: path.into(),
        reason: e.to_string(),
    })?;
    write_atomic(path, &bytes)
}

/// What a safetensors file's header says, read without its tensors' data.
#[derive(Clone, Debug, Default)]
pub struct Header {
    /// The tensors' keys.
    pub keys: std::collections::BTreeSet<String>,
    /// The `__metadata__` entries.
    pub metadata: HashMap<String, String>,
}

/// Reads a safetensors file's header only (length prefix and JSON): its keys and metadata,
/// without reading the tensors.
pub fn read_safetensors_header(path: &Path) -> Result<Header, Error> {
    use std::io::Read;
    // safetensors refuses headers over 100 MB; so does this, before allocating.
    const MAX_HEADER: u64 = 100_000_000;
    let bad = |reason: String| Error::Safetensors {
        path: path.into(),
        reason,
    };
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|e| Error::io(path, e))?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER {
        return Err(bad(format!("header of {n} bytes is too large")));
    }
    let mut json = Vec::new();
    file.take(n)
        .read_to_end(&mut json)
        .map_err(|e| Error::io(path, e))?;
    let mut entries: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&json).map_err(|e| bad(format!("header: {e}")))?;
    let metadata = match entries.remove("__metadata__") {
        Some(m) => serde_json::from_value(m).map_err(|e| bad(format!("__metadata__: {e}")))?,
        None => HashMap::new(),
    };
    Ok(Header {
        keys: entries.into_iter().map(|(k, _)| k).collect(),
        metadata,
    })
}

/// Every tensor of a safetensors file and its metadata.
pub fn read_file(path: &Path) -> Result<(TensorMap, HashMap<String, String>), Error> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| Error::Safetensors {
        path: path.into(),
        reason: e.to_string(),
    })?;
    let metadata = header.metadata().clone().unwrap_or_default();
    Ok((read_tensors(path, &bytes)?, metadata))
}

/// Writes a file so that a reader (or a crash) sees either the old file or the whole new one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp: PathBuf = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let result = (|| {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(|e| Error::io(path, e))
}

/// Every tensor of a safetensors file as (shape, values in f64).
pub fn read_tensors(path: &Path, bytes: &[u8]) -> Result<TensorMap, Error> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| Error::Safetensors {
        path: path.into(),
        reason: e.to_string(),
    })?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let data = decode(path, &name, &view)?;
        out.insert(name, (view.shape().to_vec(), data));
    }
    Ok(out)
}

fn decode(path: &Path, key: &str, view: &TensorView<'_>) -> Result<Vec<f64>, Error> {
    let b = view.data();
    let chunks = |n: usize| b.chunks_exact(n);
    Ok(match view.dtype() {
        StDtype::F32 => chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        StDtype::F64 => chunks(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        StDtype::F16 => chunks(2)
            .map(|c| half::f16::from_le_bytes(c.try_into().unwrap()).to_f64())
            .collect(),
        StDtype::BF16 => chunks(2)
            .map(|c| half::bf16::from_le_bytes(c.try_into().unwrap()).to_f64())
            .collect(),
        // Counters such as num_batches_tracked: readable, never loaded into a parameter.
        StDtype::I64 if key.ends_with("num_batches_tracked") => vec![],
        // Bit masks of packed slots, one byte per value.
        StDtype::U8 if key.ends_with(".mask") => b.iter().map(|&x| x as f64).collect(),
        other => {
            return Err(Error::Dtype {
                path: path.into(),
                key: key.into(),
                dtype: format!("{other:?}"),
            })
        }
    })
}

pub(super) fn encode(
    path: &Path,
    key: &str,
    data: &[f64],
    dtype: StorageDtype,
) -> Result<(StDtype, Vec<u8>), Error> {
    Ok(match dtype {
        StorageDtype::F32 => (
            StDtype::F32,
            data.iter().flat_map(|&v| (v as f32).to_le_bytes()).collect(),
        ),
        StorageDtype::F16 => {
            if let Some(&v) = data
                .iter()
                .find(|v| v.is_finite() && v.abs() > half::f16::MAX.to_f64())
            {
                return Err(Error::Overflow {
                    path: path.into(),
                    key: key.into(),
                    value: v,
                    dtype: "f16".into(),
                });
            }
            (
                StDtype::F16,
                data.iter()
                    .flat_map(|&v| half::f16::from_f64(v).to_le_bytes())
                    .collect(),
            )
        }
        StorageDtype::BF16 => (
            StDtype::BF16,
            data.iter()
                .flat_map(|&v| half::bf16::from_f64(v).to_le_bytes())
                .collect(),
        ),
        StorageDtype::F64 => (StDtype::F64, data.iter().flat_map(|&v| v.to_le_bytes()).collect()),
    })
}
