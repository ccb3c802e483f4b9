//! Tables and plots: `spin zoo` in four formats, and `spin compare`'s table, CSV and figure.
use clap::ValueEnum;
use comfy_table::{presets, CellAlignment, Table};
use serde::Serialize;
use spin_core::models::DataConfig;
use spin_core::train::TrainResult;
use spin_core::{Error, ModelInfo};
use std::io::Write;
use std::path::Path;

/// How `spin zoo` prints its list.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Format {
    Table,
    Csv,
    Markdown,
    Json,
}

/// What `spin fips` measured, as `--json` prints it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FipsResult {
    pub model: String,
    /// `gmp` or `rigl`.
    pub sparse_schedule: String,
    pub groups: Vec<Vec<usize>>,
    pub rank: usize,
    pub budget: f64,
    pub sparsity: f64,
    pub dense_params: usize,
    pub fips_params: usize,
    pub dense_mlp_params: usize,
    pub fips_mlp_params: usize,
    pub init_block_mse: Vec<f64>,
    pub final_block_mse: Vec<f64>,
    pub dense_accuracy: f32,
    pub one_shot_accuracy: f32,
    pub reconstructed_accuracy: f32,
    pub finetuned_accuracy: Option<f32>,
    pub seconds: f64,
}

/// One member as `spin zoo` lists it. Sizes count each stored tensor once (shared tensors once)
/// plus BatchNorm running statistics, in MB of 10⁶ bytes.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub name: String,
    pub family: String,
    pub params: usize,
    pub macs: u64,
    pub depth: usize,
    pub groups: usize,
    pub pattern: String,
    pub share: String,
    pub compression: f64,
    pub size_f32_mb: f64,
    pub size_f16_mb: f64,
    /// The eval transform (timm's data config, with the declaration's overrides).
    pub input: usize,
    pub crop_pct: f32,
    pub crop_mode: String,
    pub interpolation: String,
}

impl Row {
    pub fn from_info(i: &ModelInfo) -> Self {
        let data = DataConfig::for_model(i);
        Row {
            name: i.name.into(),
            family: i.family.name().into(),
            params: i.params,
            macs: i.macs,
            depth: i.depth,
            groups: i.groups,
            pattern: if i.share == "none" {
                "-".into()
            } else {
                i.pattern.clone()
            },
            share: i.share.into(),
            compression: i.compression(),
            size_f32_mb: i.size_bytes(4) as f64 / 1e6,
            size_f16_mb: i.size_bytes(2) as f64 / 1e6,
            input: data.image,
            crop_pct: data.crop_pct,
            crop_mode: data.crop_mode,
            interpolation: data.interpolation,
        }
    }
}

pub(crate) fn human(n: f64) -> String {
    match n {
        n if n >= 1e9 => format!("{:.2} G", n / 1e9),
        n if n >= 1e6 => format!("{:.2} M", n / 1e6),
        n if n >= 1e3 => format!("{:.1} k", n / 1e3),
        n => format!("{n:.0}"),
    }
}

fn table(markdown: bool) -> Table {
    let mut t = Table::new();
    t.load_preset(if markdown {
        presets::ASCII_MARKDOWN
    } else {
        presets::UTF8_BORDERS_ONLY
    });
    t
}

fn right_align(t: &mut Table, from: usize) {
    for i in from..t.column_count() {
        if let Some(c) = t.column_mut(i) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
}

/// `spin zoo`'s list. The table and markdown formats show the compact columns (within 100
/// characters for every member name) unless `wide`, which adds family, pattern, compression, f16
/// size and the eval transform; CSV and JSON always hold every field.
pub fn zoo_table(rows: &[Row], format: Format, wide: bool, out: &mut dyn Write) -> std::io::Result<()> {
    match format {
        Format::Csv => {
            let mut w = csv::Writer::from_writer(out);
            for r in rows {
                w.serialize(r)?;
            }
            w.flush()
        }
        Format::Json => {
            serde_json::to_writer_pretty(&mut *out, rows)?;
            writeln!(out)
        }
        Format::Table | Format::Markdown => {
            let mut t = table(format == Format::Markdown);
            if wide {
                t.set_header([
                    "name",
                    "family",
                    "params",
                    "MACs",
                    "depth",
                    "groups",
                    "pattern",
                    "share",
                    "compression",
                    "MB f32",
                    "MB f16",
                    "eval transform",
                ]);
            } else {
                t.set_header(["name", "params", "MACs", "groups", "share", "MB f32"]);
            }
            for r in rows {
                let (params, macs) = (human(r.params as f64), human(r.macs as f64));
                if wide {
                    t.add_row([
                        r.name.clone(),
                        r.family.clone(),
                        params,
                        macs,
                        r.depth.to_string(),
                        r.groups.to_string(),
                        r.pattern.clone(),
                        r.share.clone(),
                        format!("{:.2}×", r.compression),
                        format!("{:.1}", r.size_f32_mb),
                        format!("{:.1}", r.size_f16_mb),
                        format!(
                            "{}px {} crop {} {}",
                            r.input, r.crop_mode, r.crop_pct, r.interpolation
                        ),
                    ]);
                } else {
                    t.add_row([
                        r.name.clone(),
                        params,
                        macs,
                        format!("{}/{}", r.groups, r.depth),
                        r.share.clone(),
                        format!("{:.1}", r.size_f32_mb),
                    ]);
                }
            }
            right_align(&mut t, 1);
            if !wide {
                if let Some(c) = t.column_mut(4) {
                    c.set_cell_alignment(CellAlignment::Left);
                }
            }
            writeln!(out, "{t}")
        }
    }
}

pub fn compare_table(rows: &[(Row, &TrainResult)], out: &mut dyn Write) -> std::io::Result<()> {
    let mut t = table(true);
    t.set_header([
        "model",
        "params",
        "MACs",
        "groups/depth",
        "share",
        "test acc",
        "train s",
    ]);
    for (r, res) in rows {
        t.add_row([
            r.name.clone(),
            human(r.params as f64),
            human(r.macs as f64),
            format!("{}/{}", r.groups, r.depth),
            r.share.clone(),
            format!("{:.2}%", res.test_accuracy * 100.0),
            format!("{:.0}", res.seconds),
        ]);
    }
    right_align(&mut t, 1);
    writeln!(out, "{t}")
}

#[derive(Serialize)]
struct CompareRecord<'a> {
    name: &'a str,
    family: &'a str,
    params: usize,
    macs: u64,
    depth: usize,
    groups: usize,
    share: &'a str,
    test_accuracy: f32,
    test_loss: f32,
    train_seconds: f64,
}

pub fn compare_csv(rows: &[(Row, &TrainResult)], path: &Path) -> Result<(), Error> {
    let mut w =
        csv::Writer::from_path(path).map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
    for (r, res) in rows {
        w.serialize(CompareRecord {
            name: &r.name,
            family: &r.family,
            params: r.params,
            macs: r.macs,
            depth: r.depth,
            groups: r.groups,
            share: &r.share,
            test_accuracy: res.test_accuracy,
            test_loss: res.test_loss,
            train_seconds: res.seconds,
        })
        .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
    }
    w.flush().map_err(|e| Error::io(path, e))
}

/// `spin fips`'s report: the plan, parameters, per-block errors and accuracies.
pub fn fips_table(r: &FipsResult, calib_rows: usize, out: &mut dyn Write) -> std::io::Result<()> {
    let groups: Vec<String> = r.groups.iter().map(|g| format!("{g:?}")).collect();
    writeln!(
        out,
        "{}: FiPS over groups {} — rank {}, sparsity {:.2} ({}), budget {:.2}",
        r.model,
        groups.join(" "),
        r.rank,
        r.sparsity,
        r.sparse_schedule,
        r.budget
    )?;
    writeln!(
        out,
        "MLP parameters {} → {} ({:.1} %); model parameters {} → {}",
        human(r.dense_mlp_params as f64),
        human(r.fips_mlp_params as f64),
        100.0 * r.fips_mlp_params as f64 / r.dense_mlp_params as f64,
        human(r.dense_params as f64),
        human(r.fips_params as f64)
    )?;
    let mut t = table(false);
    t.set_header(vec!["block", "MSE one-shot (SVD + prune)", "MSE reconstructed"]);
    for (i, (a, b)) in r.init_block_mse.iter().zip(&r.final_block_mse).enumerate() {
        t.add_row(vec![i.to_string(), format!("{a:.3e}"), format!("{b:.3e}")]);
    }
    right_align(&mut t, 0);
    writeln!(out, "{t}")?;
    writeln!(
        out,
        "(mean squared error of each block's output on {calib_rows} calibration tokens)"
    )?;
    write!(
        out,
        "test accuracy: dense {:.4}, one-shot {:.4}, reconstructed {:.4}",
        r.dense_accuracy, r.one_shot_accuracy, r.reconstructed_accuracy
    )?;
    if let Some(f) = r.finetuned_accuracy {
        write!(out, ", fine-tuned {f:.4}")?;
    }
    writeln!(out, " ({:.1} s)", r.seconds)
}
