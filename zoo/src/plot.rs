//! Figures: `spin compare`'s trade-off plot, `spin fips`'s reconstruction plot and `spin
//! analyze`'s similarity heatmaps (PNG, SVG).
use crate::report::{human, Row};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use spin_core::train::TrainResult;
use spin_core::{Error, Family};
use std::path::Path;

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
/// against MACs (right), log scale, with a tick at every 1-2-5 step; colour is the family, a
/// circle an unshared model and a triangle a shared one; members at the same x are spread apart
/// and labels are placed so they do not overlap.
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

/// Tick values in [lo, hi] at 1-2-5 steps of each decade (1-2-3-5 when that would give fewer
/// than three, every step from 1 to 9 when that still would, powers of ten alone when more
/// than eight).
pub fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let within = |mantissas: &[f64]| -> Vec<f64> {
        let (e0, e1) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
        (e0..=e1)
            .flat_map(|e| mantissas.iter().map(move |m| m * 10f64.powi(e)))
            .filter(|v| (lo..=hi).contains(v))
            .collect()
    };
    let ticks = within(&[1.0, 2.0, 5.0]);
    match ticks.len() {
        0..=2 if within(&[1.0, 2.0, 3.0, 5.0]).len() >= 3 => within(&[1.0, 2.0, 3.0, 5.0]),
        0..=2 => within(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]),
        3..=8 => ticks,
        _ => within(&[1.0]),
    }
}

/// A tick label: [`human`] without trailing zeros (`2 M`, `50 k`, `1.5 M`).
fn tick_label(v: f64) -> String {
    let h = human(v);
    match h.split_once(' ') {
        Some((num, unit)) if num.contains('.') => {
            format!("{} {unit}", num.trim_end_matches('0').trim_end_matches('.'))
        }
        _ => h,
    }
}

/// x positions with equal values spread apart (multiplicatively, for a log axis) so every
/// point shows.
pub fn spread(xs: &[f64]) -> Vec<f64> {
    xs.iter()
        .enumerate()
        .map(|(i, &x)| {
            let same: Vec<usize> = (0..xs.len()).filter(|&j| xs[j] == x).collect();
            let rank = same.iter().position(|&j| j == i).unwrap_or(0) as f64;
            x * 1.06f64.powf(rank - (same.len() as f64 - 1.0) / 2.0)
        })
        .collect()
}

/// Where to put each label (pixels): right of its point, moved up or down in steps of a line
/// until it overlaps no marker and no label placed before it.
fn place_labels(points: &[(i32, i32)], widths: &[i32], line: i32) -> Vec<(i32, i32)> {
    // Every marker is an obstacle (a box of 16 px around its point), and so is each placed label.
    let mut placed: Vec<(i32, i32, i32)> = points.iter().map(|&(x, y)| (x - 8, y - 8, 16)).collect();
    let mut out = Vec::new();
    for (&(px, py), &w) in points.iter().zip(widths) {
        let x = px + 10;
        let y = [0, -1, 1, -2, 2, -3, 3, -4, 4]
            .iter()
            .map(|k| py - line / 2 + k * line)
            .find(|&y| {
                placed.iter().enumerate().all(|(k, &(ox, oy, ow))| {
                    // A label may touch its own marker's box.
                    let own = k < points.len() && points[k] == (px, py);
                    own || x + w <= ox || ox + ow <= x || y + line <= oy || oy + line <= y
                })
            })
            .unwrap_or(py - line / 2);
        placed.push((x, y, w));
        out.push((x, y));
    }
    out
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    rows: &[(Row, &TrainResult)],
    data: &str,
) -> Result<(), String> {
    let e = |x: DrawingAreaErrorKind<DB::ErrorType>| x.to_string();
    root.fill(&WHITE).map_err(e)?;
    let full = root.clone();
    // Title on the first line, legend on the second, where they cover no point.
    let (top, root) = root.split_vertically(60);
    top.draw(&Text::new(
        format!("Test accuracy on {data}"),
        (16, 6),
        ("sans-serif", 22).into_font().color(&BLACK),
    ))
    .map_err(e)?;
    let (left, right) = root.split_horizontally(600);
    let mut legend: Vec<(String, RGBColor, bool)> = Vec::new();
    let accs: Vec<f64> = rows.iter().map(|(_, r)| r.test_accuracy as f64 * 100.0).collect();
    let lo = accs.iter().cloned().fold(f64::INFINITY, f64::min);
    let hi = accs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let pad = ((hi - lo) * 0.15).max(1.0);
    let y = (lo - pad).max(0.0)..(hi + pad).min(100.5);
    let colour = |r: &Row| match r.family.as_str() {
        f if f == Family::ConvMixer.name() => RGBColor(31, 119, 180),
        _ => RGBColor(214, 39, 40),
    };
    for (panel, (area, label, get)) in [
        (
            &left,
            "parameters",
            (|r: &Row| r.params as f64) as fn(&Row) -> f64,
        ),
        (&right, "MACs per image", |r: &Row| r.macs as f64),
    ]
    .into_iter()
    .enumerate()
    {
        let xs = spread(&rows.iter().map(|(r, _)| get(r)).collect::<Vec<_>>());
        let xmin = xs.iter().cloned().fold(f64::INFINITY, f64::min) / 1.6;
        let xmax = xs.iter().cloned().fold(f64::NEG_INFINITY, f64::max) * 1.6;
        let mut chart = ChartBuilder::on(area)
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(52)
            .build_cartesian_2d(
                (xmin..xmax).log_scale().with_key_points(log_ticks(xmin, xmax)),
                y.clone(),
            )
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_desc(label)
            .y_desc("test accuracy (%)")
            .x_label_formatter(&|v| tick_label(*v))
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(e)?;
        let mut legend_done = std::collections::BTreeSet::new();
        for ((r, res), &x) in rows.iter().zip(&xs) {
            let p = (x, res.test_accuracy as f64 * 100.0);
            let c = colour(r);
            let shared = r.share != "none";
            let key = format!("{}, {}", r.family, if shared { "shared" } else { "unshared" });
            if shared {
                chart.draw_series(std::iter::once(TriangleMarker::new(p, 9, c.filled())))
            } else {
                chart.draw_series(std::iter::once(Circle::new(p, 7, c.filled())))
            }
            .map_err(e)?;
            if panel == 0 && legend_done.insert(key.clone()) {
                legend.push((key, c, shared));
            }
        }
        let names: Vec<&str> = rows
            .iter()
            .map(|(r, _)| r.name.trim_start_matches("digits_"))
            .collect();
        let pixels: Vec<(i32, i32)> = rows
            .iter()
            .zip(&xs)
            .map(|((_, res), &x)| chart.backend_coord(&(x, res.test_accuracy as f64 * 100.0)))
            .collect();
        let widths: Vec<i32> = names.iter().map(|n| 7 * n.chars().count() as i32).collect();
        for (name, pos) in names.iter().zip(place_labels(&pixels, &widths, 14)) {
            full.draw(&Text::new(
                name.to_string(),
                pos,
                ("sans-serif", 12).into_font().color(&BLACK),
            ))
            .map_err(e)?;
        }
    }
    let mut x = 16;
    for (key, c, shared) in legend {
        let at = (x + 7, 44);
        if shared {
            full.draw(&TriangleMarker::new(at, 7, c.filled())).map_err(e)?;
        } else {
            full.draw(&Circle::new(at, 6, c.filled())).map_err(e)?;
        }
        full.draw(&Text::new(
            key.clone(),
            (x + 18, 37),
            ("sans-serif", 14).into_font().color(&BLACK),
        ))
        .map_err(e)?;
        x += 30 + 7 * key.chars().count() as i32;
    }
    Ok(())
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

/// `spin analyze`'s heatmaps, side by side: CKA between block outputs and cosine similarity
/// between block weights, layer against layer, each value printed in its cell; the boxes mark
/// the chosen grouping's groups along the diagonal where they are contiguous.
pub fn similarity_plot(
    panels: &[(&str, &[Vec<f64>])],
    schedule: &[usize],
    dir: &Path,
) -> Result<Vec<std::path::PathBuf>, Error> {
    register_font();
    let (png, svg) = (dir.join("similarity.png"), dir.join("similarity.svg"));
    let err = |p: &Path, e: String| Error::Invalid(format!("{}: cannot draw the plot: {e}", p.display()));
    let size = (520 * panels.len() as u32, 540);
    {
        let root = BitMapBackend::new(&png, size).into_drawing_area();
        draw_heatmaps(&root, panels, schedule).map_err(|e| err(&png, e))?;
        root.present().map_err(|e| err(&png, e.to_string()))?;
    }
    {
        let root = SVGBackend::new(&svg, size).into_drawing_area();
        draw_heatmaps(&root, panels, schedule).map_err(|e| err(&svg, e))?;
        root.present().map_err(|e| err(&svg, e.to_string()))?;
    }
    Ok(vec![png, svg])
}

fn draw_heatmaps<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    panels: &[(&str, &[Vec<f64>])],
    schedule: &[usize],
) -> Result<(), String> {
    use plotters::style::colors::colormaps::ViridisRGB;
    let e = |x: DrawingAreaErrorKind<DB::ErrorType>| x.to_string();
    root.fill(&WHITE).map_err(e)?;
    for (area, (title, sim)) in root.split_evenly((1, panels.len())).iter().zip(panels) {
        let d = sim.len();
        let edge = d as f64 - 0.5;
        // Layer k's cell is centred on k; the y axis runs down, so row 0 is at the top as a
        // matrix is read.
        let mut chart = ChartBuilder::on(area)
            .caption(*title, ("sans-serif", 18))
            .margin(14)
            .x_label_area_size(40)
            .y_label_area_size(40)
            .build_cartesian_2d(-0.5..edge, edge..-0.5)
            .map_err(e)?;
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc("layer")
            .y_desc("layer")
            .x_labels(d)
            .y_labels(d)
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| format!("{v:.0}"))
            .label_style(("sans-serif", 12))
            .draw()
            .map_err(e)?;
        let cells = || (0..d).flat_map(|i| (0..d).map(move |j| (i, j)));
        let at = |k: usize| k as f64;
        chart
            .draw_series(cells().map(|(i, j)| {
                let v = sim[i][j].clamp(0.0, 1.0);
                Rectangle::new(
                    [(at(j) - 0.5, at(i) - 0.5), (at(j) + 0.5, at(i) + 0.5)],
                    ViridisRGB::get_color(v as f32).filled(),
                )
            }))
            .map_err(e)?;
        if d <= 16 {
            let size = if d <= 8 { 13 } else { 10 };
            let centred = Pos::new(HPos::Center, VPos::Center);
            chart
                .draw_series(cells().map(|(i, j)| {
                    let colour = if sim[i][j] > 0.6 { BLACK } else { WHITE };
                    let style = ("sans-serif", size).into_font().color(&colour).pos(centred);
                    Text::new(format!("{:.2}", sim[i][j]), (at(j), at(i)), style)
                }))
                .map_err(e)?;
        }
        // Each contiguous run of one group as a box on the diagonal.
        let mut start = 0;
        let n = schedule.len().min(d);
        for end in 1..=n {
            if end == n || schedule[end] != schedule[start] {
                let (a, b) = (at(start) - 0.5, at(end) - 0.5);
                chart
                    .draw_series(std::iter::once(Rectangle::new(
                        [(a, a), (b, b)],
                        RED.stroke_width(3),
                    )))
                    .map_err(e)?;
                start = end;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_fall_within_a_decade_too() {
        assert_eq!(log_ticks(15e3, 480e3), vec![2e4, 5e4, 1e5, 2e5]);
        let t = log_ticks(1.5e6, 8.4e6);
        assert_eq!(t, vec![2e6, 3e6, 5e6]);
        assert_eq!(log_ticks(3.1e6, 4.9e6), vec![4e6]);
        assert_eq!(
            (tick_label(2e6), tick_label(5e4), tick_label(1.5e6)),
            ("2 M".into(), "50 k".into(), "1.5 M".into())
        );
        assert_eq!(log_ticks(1.0, 1e9).len(), 10);
    }

    #[test]
    fn equal_xs_are_spread_and_labels_do_not_overlap() {
        let xs = spread(&[2.4e6, 2.4e6, 5.25e6, 2.4e6]);
        assert!(xs[0] < xs[1] && xs[1] < xs[3] && xs[2] == 5.25e6, "{xs:?}");
        let placed = place_labels(&[(100, 100), (102, 103), (101, 99)], &[80, 80, 80], 14);
        for (i, a) in placed.iter().enumerate() {
            for b in &placed[..i] {
                assert!((a.1 - b.1).abs() >= 14, "{placed:?}");
            }
        }
    }
}
