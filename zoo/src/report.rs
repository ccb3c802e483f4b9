//! Tables and plots: `spin zoo` in four formats, and `spin compare`'s table, CSV and figure.
use clap::ValueEnum;
use comfy_table::{presets, CellAlignment, Table};
use plotters::prelude::*;
use serde::Serialize;
use spin_core::train::TrainResult;
use spin_core::{Error, Family, ModelInfo};
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
}

impl Row {
    pub fn from_info(i: &ModelInfo) -> Self {
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
        }
    }
}

fn human(n: f64) -> String {
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
/// characters for every member name) unless `wide`; CSV and JSON always hold every field.
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

/// Registers the shipped font once, so PNG text renders without system fonts.
fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            include_bytes!("../assets/DejaVuSans.ttf"),
        );
    });
}

/// SPIN's trade-off figure on the data at hand: test accuracy against parameters (left) and
/// against MACs (right), log scale; circles are unshared models, triangles shared ones.
pub fn compare_plot(rows: &[(Row, &TrainResult)], dir: &Path, data: &str) -> Result<(), Error> {
    register_font();
    let png = dir.join("compare.png");
    let svg = dir.join("compare.svg");
    let err = |p: &Path, e: String| Error::Invalid(format!("{}: cannot draw the plot: {e}", p.display()));
    {
        let root = BitMapBackend::new(&png, (1200, 520)).into_drawing_area();
        draw(&root, rows, data).map_err(|e| err(&png, e))?;
        root.present().map_err(|e| err(&png, e.to_string()))?;
    }
    {
        let root = SVGBackend::new(&svg, (1200, 520)).into_drawing_area();
        draw(&root, rows, data).map_err(|e| err(&svg, e))?;
        root.present().map_err(|e| err(&svg, e.to_string()))?;
    }
    Ok(())
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    rows: &[(Row, &TrainResult)],
    data: &str,
) -> Result<(), String> {
    let e = |x: DrawingAreaErrorKind<DB::ErrorType>| x.to_string();
    root.fill(&WHITE).map_err(e)?;
    let root = root
        .titled(
            &format!("Test accuracy on {data}: shared (▲) vs unshared (●)"),
            ("sans-serif", 22),
        )
        .map_err(e)?;
    let (left, right) = root.split_horizontally(600);
    let accs: Vec<f64> = rows.iter().map(|(_, r)| r.test_accuracy as f64 * 100.0).collect();
    let lo = accs.iter().cloned().fold(f64::INFINITY, f64::min);
    let hi = accs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let pad = ((hi - lo) * 0.15).max(1.0);
    let y = (lo - pad).max(0.0)..(hi + pad).min(100.5);
    for (area, label, get) in [
        (
            &left,
            "parameters",
            (|r: &Row| r.params as f64) as fn(&Row) -> f64,
        ),
        (&right, "MACs per image", |r: &Row| r.macs as f64),
    ] {
        let xs: Vec<f64> = rows.iter().map(|(r, _)| get(r)).collect();
        let xmin = xs.iter().cloned().fold(f64::INFINITY, f64::min) / 1.6;
        let xmax = xs.iter().cloned().fold(f64::NEG_INFINITY, f64::max) * 1.6;
        let mut chart = ChartBuilder::on(area)
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(52)
            .build_cartesian_2d((xmin..xmax).log_scale(), y.clone())
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_desc(label)
            .x_labels(5)
            .y_desc("test accuracy (%)")
            .x_label_formatter(&|v| human(*v))
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(e)?;
        for (i, (r, res)) in rows.iter().enumerate() {
            let p = (get(r), res.test_accuracy as f64 * 100.0);
            let color = match r.family.as_str() {
                f if f == Family::ConvMixer.name() => RGBColor(31, 119, 180),
                _ => RGBColor(214, 39, 40),
            };
            let shared = r.share != "none";
            if shared {
                chart
                    .draw_series(std::iter::once(TriangleMarker::new(p, 9, color.filled())))
                    .map_err(e)?;
            } else {
                chart
                    .draw_series(std::iter::once(Circle::new(p, 7, color.filled())))
                    .map_err(e)?;
            }
            let short = r.name.trim_start_matches("digits_");
            chart
                .draw_series(std::iter::once(Text::new(
                    short.to_string(),
                    // Staggered so labels of nearby points do not print over each other.
                    (
                        p.0 * 1.05,
                        p.1 + (y.end - y.start) * (0.035 * ((i % 3) as f64 - 1.0) + 0.01),
                    ),
                    ("sans-serif", 12).into_font().color(&BLACK),
                )))
                .map_err(e)?;
        }
    }
    Ok(())
}

/// `spin fips`'s report: the plan, parameters, per-block errors and accuracies.
pub fn fips_table(r: &FipsResult, calib_rows: usize, out: &mut dyn Write) -> std::io::Result<()> {
    let groups: Vec<String> = r.groups.iter().map(|g| format!("{g:?}")).collect();
    writeln!(
        out,
        "{}: FiPS over groups {} — rank {}, sparsity {:.2}, budget {:.2}",
        r.model,
        groups.join(" "),
        r.rank,
        r.sparsity,
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

/// The reconstruction loss per step (left) and each block's error before and after (right), log scale.
pub fn fips_plot(losses: &[f32], before: &[f64], after: &[f64], path: &Path) -> Result<(), Error> {
    register_font();
    let err = |e: String| Error::Invalid(format!("{}: cannot draw the plot: {e}", path.display()));
    let root = BitMapBackend::new(path, (1000, 420)).into_drawing_area();
    draw_fips(&root, losses, before, after).map_err(err)?;
    root.present().map_err(|e| err(e.to_string()))
}

fn draw_fips<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    losses: &[f32],
    before: &[f64],
    after: &[f64],
) -> Result<(), String> {
    let e = |x: DrawingAreaErrorKind<DB::ErrorType>| x.to_string();
    root.fill(&WHITE).map_err(e)?;
    let (left, right) = root.split_horizontally(500);
    let positive = |v: f64| v.max(1e-12);
    let range = |vals: &mut dyn Iterator<Item = f64>| {
        let (lo, hi) = vals.fold((f64::INFINITY, 0.0f64), |(l, h), v| {
            (l.min(positive(v)), h.max(v))
        });
        if lo.is_finite() && hi > 0.0 {
            (lo / 1.5)..(hi * 1.5)
        } else {
            1e-6..1.0
        }
    };
    let y = range(&mut losses.iter().map(|&v| v as f64));
    let mut chart = ChartBuilder::on(&left)
        .caption("reconstruction loss (Σ block MSE)", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d(0..losses.len().max(1), y.log_scale())
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_label_formatter(&|v| format!("{v:.1e}"))
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(e)?;
    chart
        .draw_series(LineSeries::new(
            losses.iter().enumerate().map(|(i, &l)| (i, positive(l as f64))),
            RGBColor(31, 119, 180).stroke_width(2),
        ))
        .map_err(e)?;
    let y = range(&mut before.iter().chain(after).copied());
    let mut chart = ChartBuilder::on(&right)
        .caption(
            "block output MSE: one-shot ● vs reconstructed ▲",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5..(before.len() as f64 - 0.5), y.log_scale())
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("block")
        .x_labels(before.len().max(2))
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.1e}"))
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(e)?;
    chart
        .draw_series(
            before
                .iter()
                .enumerate()
                .map(|(i, &v)| Circle::new((i as f64, positive(v)), 6, RGBColor(214, 39, 40).filled())),
        )
        .map_err(e)?;
    chart
        .draw_series(
            after.iter().enumerate().map(|(i, &v)| {
                TriangleMarker::new((i as f64, positive(v)), 7, RGBColor(44, 160, 44).filled())
            }),
        )
        .map_err(e)?;
    Ok(())
}
