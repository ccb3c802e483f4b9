//! Checkpoint key layouts other than timm's, renamed onto timm's keys before loading.
//!
//! ml-spin (SPIN's reference code, SlowFast-based) keeps a ConvMixer's pointwise convs once per
//! parameter group, outside the blocks — `pwise_w.{g}`, `pwise_b.{g}`, layer i using group
//! `mapping[i]` (sequential `i / rate`, strided `i % groups`: the same rules as spin's patterns) —
//! and names the rest `patch_embed.{conv,bn}`, `blocks.{i}.dwise_blk.{0,2}`, `blocks.{i}.bn2` and
//! `head.fc`. Its blocks are SPIN's variant: a residual around both halves.
use super::io::TensorMap;
use crate::error::Error;
use std::path::Path;

/// Which key names a checkpoint uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// timm's (and spin's own).
    Timm,
    /// ml-spin's `WSConvMixer`.
    MlSpin,
}

impl Layout {
    /// The layout's name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Layout::Timm => "timm",
            Layout::MlSpin => "ml-spin",
        }
    }
    /// The layout a checkpoint's keys are in.
    pub fn detect<'a>(mut keys: impl Iterator<Item = &'a String>) -> Layout {
        if keys.any(|k| k.starts_with("pwise_w.") || k.starts_with("patch_embed.conv.")) {
            Layout::MlSpin
        } else {
            Layout::Timm
        }
    }
}

/// ml-spin's prefixes and the timm prefixes they become (block keys keep their layer index).
const RENAMES: [(&str, &str); 6] = [
    ("patch_embed.conv.", "stem.0."),
    ("patch_embed.bn.", "stem.2."),
    ("head.fc.", "head."),
    (".dwise_blk.0.", ".0.fn.0."),
    (".dwise_blk.2.", ".0.fn.2."),
    (".bn2.", ".3."),
];

/// An ml-spin checkpoint's tensors under timm's keys, for a model whose layer i uses pointwise
/// group `schedule[i]`. The file may hold one pointwise conv per layer (an unshared model, or a
/// fusion-aware one before export) or one per group of `schedule`.
pub fn ml_spin_to_timm(path: &Path, tensors: TensorMap, schedule: &[usize]) -> Result<TensorMap, Error> {
    let bad = |reason: String| Error::Invalid(format!("{}: ml-spin checkpoint: {reason}", path.display()));
    if let Some(k) = tensors.keys().find(|k| k.starts_with("reduction_w.")) {
        return Err(bad(format!(
            "it holds fusion coefficients (`{k}`): load the fused model it exports instead"
        )));
    }
    let convs = tensors.keys().filter(|k| k.starts_with("pwise_w.")).count();
    let depth = schedule.len();
    let groups = schedule.iter().max().map_or(0, |g| g + 1);
    let conv_of = |layer: usize| if convs == depth { layer } else { schedule[layer] };
    if convs != depth && convs != groups {
        // The file does not record its mapping, so only a model with the same groups can use it.
        return Err(bad(format!(
            "{convs} pointwise convs (pwise_w.*) for {depth} layers, but the model has {groups} groups: \
             load it into the shared member with {convs} groups and its mapping (sequential or strided)"
        )));
    }
    let mut out = TensorMap::new();
    for (key, value) in tensors {
        if let Some(rest) = key
            .strip_prefix("pwise_w.")
            .or_else(|| key.strip_prefix("pwise_b."))
        {
            let g: usize = rest.parse().map_err(|_| bad(format!("unexpected key `{key}`")))?;
            let (w_or_b, shape) = if key.starts_with("pwise_w.") {
                ("weight", value.0.clone())
            } else {
                ("bias", value.0.clone())
            };
            for layer in (0..depth).filter(|&i| conv_of(i) == g) {
                out.insert(
                    format!("blocks.{layer}.1.{w_or_b}"),
                    (shape.clone(), value.1.clone()),
                );
            }
            continue;
        }
        let renamed = RENAMES
            .iter()
            .find(|(from, _)| key.starts_with(from) || (from.starts_with('.') && key.contains(from)))
            .map(|(from, to)| key.replacen(from, to, 1))
            .unwrap_or(key);
        out.insert(renamed, value);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(keys: &[&str]) -> TensorMap {
        keys.iter()
            .map(|k| (k.to_string(), (vec![1], vec![k.len() as f64])))
            .collect()
    }

    #[test]
    fn keys_are_renamed_and_group_convs_spread_over_their_layers() {
        let file = map(&[
            "patch_embed.conv.weight",
            "patch_embed.bn.running_var",
            "blocks.3.dwise_blk.0.bias",
            "blocks.3.dwise_blk.2.weight",
            "blocks.0.bn2.running_mean",
            "pwise_w.0",
            "pwise_w.1",
            "pwise_b.0",
            "pwise_b.1",
            "head.fc.weight",
        ]);
        assert_eq!(Layout::detect(file.keys()), Layout::MlSpin);
        let out = ml_spin_to_timm(Path::new("f"), file, &[0, 1, 0, 1]).unwrap();
        for k in [
            "stem.0.weight",
            "stem.2.running_var",
            "blocks.3.0.fn.0.bias",
            "blocks.3.0.fn.2.weight",
            "blocks.0.3.running_mean",
            "head.weight",
            "blocks.0.1.weight",
            "blocks.2.1.weight",
            "blocks.3.1.bias",
        ] {
            assert!(out.contains_key(k), "{k} missing from {:?}", out.keys());
        }
        // Strided: layers 1 and 3 use group 1 (`pwise_w.1`).
        assert_eq!(out["blocks.3.1.weight"], out["blocks.1.1.weight"]);
        let err = ml_spin_to_timm(
            Path::new("f"),
            map(&["pwise_w.0", "pwise_w.1", "pwise_w.2"]),
            &[0, 0, 1, 1],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("3 pointwise convs"), "{err}");
        let err = ml_spin_to_timm(Path::new("f"), map(&["pwise_w.0", "pwise_w.1"]), &[0, 1, 2, 3])
            .unwrap_err()
            .to_string();
        assert!(err.contains("the shared member with 2 groups"), "{err}");
        assert_eq!(Layout::detect(map(&["stem.0.weight"]).keys()), Layout::Timm);
    }
}
