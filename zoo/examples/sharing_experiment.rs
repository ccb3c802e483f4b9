//! SPIN's question on the built-in digits: is a shared model better made from a trained unshared
//! one (weight fusion) than trained shared from scratch, and does the schedule matter?
//!
//! For a ConvMixer (share rates 2 and 4) and a ViT (rates 2 and 3; depth 6), per seed: train the
//! unshared model, ask `spin analyze` for its grouping, then for each schedule (sequential,
//! strided, and for the ViT the similarity-guided member the analysis gave) record
//!
//! - the accuracy of the mean-fused model right away (ConvMixers with BatchNorm recalibration),
//! - for ConvMixers, right away after `spin fuse --refit 3` (refitted to the unshared model on the
//!   calibration images, no labels),
//! - after fine-tuning from the mean-fused weights,
//! - after fusion-aware training with channel coefficients (exported as a plain shared model),
//! - and the same shared member trained from scratch,
//!
//! all with the same fine-tuning budget. Writes `results.csv`, prints a markdown table of the
//! mean and spread over seeds, and draws `experiment.png`/`.svg`.
//!
//! ```sh
//! cargo run --release -p zoo --example sharing_experiment -- [OUT_DIR] [SEEDS] [BASE_EPOCHS] [EPOCHS]
//! # the table and the plot again from OUT_DIR/results.csv, without training:
//! cargo run --release -p zoo --example sharing_experiment -- --redraw OUT_DIR
//! ```
use clap::Parser;
use plotters::prelude::*;
use spin_core::train::TrainResult;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use zoo::args::{Cli, Cmd};

/// One family's plan: the unshared member, and per share rate the shared members by schedule.
struct Family {
    base: &'static str,
    rates: &'static [(usize, &'static [(&'static str, &'static str)])],
}

const FAMILIES: &[Family] = &[
    Family {
        base: "digits_convmixer_64_8",
        rates: &[
            (
                2,
                &[
                    ("sequential", "digits_convmixer_64_8_ws2_sequential"),
                    ("strided", "digits_convmixer_64_8_ws2_strided"),
                ],
            ),
            (
                4,
                &[
                    ("sequential", "digits_convmixer_64_8_ws4_sequential"),
                    ("strided", "digits_convmixer_64_8_ws4_strided"),
                ],
            ),
        ],
    },
    Family {
        base: "digits_vit_64_6",
        rates: &[
            (
                2,
                &[
                    ("sequential", "digits_vit_64_6_ws2_sequential"),
                    ("strided", "digits_vit_64_6_ws2_strided"),
                    ("similarity", "digits_vit_64_6_ws2_similar"),
                ],
            ),
            (3, &[("sequential", "digits_vit_64_6_ws3_sequential")]),
        ],
    },
];

/// Runs one `spin` command line, returning what it printed.
fn spin(args: &[&str]) -> String {
    let cli = Cli::try_parse_from(std::iter::once("spin").chain(args.iter().copied()))
        .unwrap_or_else(|e| panic!("spin {}: {e}", args.join(" ")));
    let mut out = Vec::new();
    zoo::cli::run(cli, &mut out).unwrap_or_else(|e| panic!("spin {}: {e}", args.join(" ")));
    String::from_utf8(out).expect("utf-8")
}

/// Runs `spin train` and returns its result.
fn train(args: &[&str]) -> TrainResult {
    let cli = Cli::try_parse_from(["spin", "train"].into_iter().chain(args.iter().copied()))
        .unwrap_or_else(|e| panic!("spin train {}: {e}", args.join(" ")));
    let Cmd::Train(a) = cli.cmd else { unreachable!() };
    zoo::cli::train(&a, &mut std::io::sink()).unwrap_or_else(|e| panic!("spin train {}: {e}", args.join(" ")))
}

/// The last number on the line that starts with `prefix`.
fn number_after(text: &str, prefix: &str) -> f32 {
    let line = text
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no `{prefix}` in {text}"));
    line.rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .expect("a number")
}

/// `results.csv` back into the map `main` fills.
fn read_results(path: &Path) -> BTreeMap<(String, usize, String, String), Vec<f32>> {
    let text = std::fs::read_to_string(path).expect("results.csv");
    let mut results: BTreeMap<_, Vec<f32>> = BTreeMap::new();
    for line in text.lines().skip(1) {
        // seed, family, rate, schedule, "method" (may hold a comma), accuracy
        let f: Vec<&str> = line.split(',').collect();
        let method = f[4..f.len() - 1].join(",").trim_matches('"').to_string();
        let key = (
            f[1].to_string(),
            f[2].parse().expect("rate"),
            f[3].to_string(),
            method,
        );
        results
            .entry(key)
            .or_default()
            .push(f[f.len() - 1].parse().expect("accuracy"));
    }
    results
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--redraw") {
        let out = PathBuf::from(args.get(1).expect("--redraw OUT_DIR"));
        let results = read_results(&out.join("results.csv"));
        let seeds = results.values().map(Vec::len).max().unwrap_or(0) as u64;
        print!("{}", markdown(&results, seeds, "?", "?"));
        plot(&results, &out).expect("the plot");
        return;
    }
    let out = PathBuf::from(args.first().map_or("runs/experiment", String::as_str));
    let seeds: u64 = args.get(1).map_or(3, |s| s.parse().expect("SEEDS"));
    let base_epochs = args.get(2).map_or("20", String::as_str).to_string();
    let epochs = args.get(3).map_or("6", String::as_str).to_string();
    std::fs::create_dir_all(&out).expect("the output directory");
    // (family, rate, schedule, method) → accuracies over seeds
    let mut results: BTreeMap<(String, usize, String, String), Vec<f32>> = BTreeMap::new();
    let mut csv = String::from("seed,family,rate,schedule,method,accuracy\n");
    let mut record = |seed: u64, fam: &str, rate: usize, sched: &str, method: &str, acc: f32| {
        let _ = writeln!(csv, "{seed},{fam},{rate},{sched},\"{method}\",{acc:.4}");
        eprintln!("seed {seed} {fam} ws{rate} {sched:<10} {method:<24} {acc:.4}");
        results
            .entry((fam.to_string(), rate, sched.to_string(), method.to_string()))
            .or_default()
            .push(acc);
    };
    for seed in 0..seeds {
        let s = seed.to_string();
        for fam in FAMILIES {
            let dir = |name: &str| out.join(format!("s{seed}")).join(name).display().to_string();
            let base_dir = dir(fam.base);
            let base = train(&[
                "--model",
                fam.base,
                "--epochs",
                &base_epochs,
                "--seed",
                &s,
                "--out",
                &base_dir,
                "--quiet",
            ]);
            record(seed, fam.base, 1, "-", "unshared", base.test_accuracy);
            let ckpt = Path::new(&base_dir)
                .join("checkpoint.safetensors")
                .display()
                .to_string();
            for &(rate, members) in fam.rates {
                let groups = (members_depth(fam.base) / rate).to_string();
                let an = spin(&[
                    "analyze",
                    "--from",
                    &ckpt,
                    "--groups",
                    &groups,
                    "--out",
                    &dir("analysis"),
                    "--quiet",
                ]);
                let found = an
                    .lines()
                    .find(|l| l.trim_start().starts_with("contiguous"))
                    .unwrap_or("");
                eprintln!("seed {seed} {} ws{rate}: {}", fam.base, found.trim());
                for &(sched, member) in members {
                    let fused = dir(&format!("{member}.fused.safetensors"));
                    let mut fuse = vec![
                        "fuse", "--from", &ckpt, "--model", member, "--out", &fused, "--calib", "digits",
                    ];
                    if fam.base.contains("vit") {
                        fuse.push("--no-recalibrate");
                    }
                    let text = spin(&fuse);
                    let right_away = if fam.base.contains("vit") {
                        number_after(&text, "test accuracy with the copied")
                    } else {
                        number_after(&text, "test accuracy after recalibrating")
                    };
                    record(
                        seed,
                        fam.base,
                        rate,
                        sched,
                        "fused (mean), no training",
                        right_away,
                    );
                    if !fam.base.contains("vit") {
                        let refit = dir(&format!("{member}.refit.safetensors"));
                        fuse[6] = &refit;
                        fuse.extend(["--refit", "3"]);
                        let text = spin(&fuse);
                        let acc = number_after(&text, "test accuracy after refitting");
                        record(seed, fam.base, rate, sched, METHODS[1], acc);
                    }
                    let common = ["--model", member, "--epochs", &epochs, "--seed", &s, "--quiet"];
                    let ft = |extra: &[&str], name: &str| {
                        let d = dir(&format!("{member}.{name}"));
                        let args: Vec<&str> = common
                            .iter()
                            .copied()
                            .chain(extra.iter().copied())
                            .chain(["--out", &d])
                            .collect();
                        train(&args).test_accuracy
                    };
                    record(
                        seed,
                        fam.base,
                        rate,
                        sched,
                        "fused (mean) + fine-tune",
                        ft(&["--init-from", &ckpt], "mean"),
                    );
                    let fusion = ["--init-from", ckpt.as_str(), "--fusion", "channel_weighted_mean"];
                    record(
                        seed,
                        fam.base,
                        rate,
                        sched,
                        "fusion-aware (channel)",
                        ft(&fusion, "channel"),
                    );
                    record(seed, fam.base, rate, sched, "from scratch", ft(&[], "scratch"));
                }
            }
        }
    }
    std::fs::write(out.join("results.csv"), csv).expect("results.csv");
    let table = markdown(&results, seeds, &base_epochs, &epochs);
    print!("{table}");
    std::fs::write(out.join("results.md"), table).expect("results.md");
    plot(&results, &out).expect("the plot");
}

fn members_depth(base: &str) -> usize {
    zoo::find(base).map(|m| (m.info)().depth).expect("a zoo member")
}

fn mean_spread(v: &[f32]) -> (f32, f32) {
    let mean = v.iter().sum::<f32>() / v.len() as f32;
    let (lo, hi) = v
        .iter()
        .fold((f32::MAX, f32::MIN), |(l, h), &x| (l.min(x), h.max(x)));
    (mean, (hi - lo) / 2.0)
}

const METHODS: [&str; 5] = [
    "fused (mean), no training",
    "fused (mean) + refit, no training",
    "fused (mean) + fine-tune",
    "fusion-aware (channel)",
    "from scratch",
];

fn markdown(
    results: &BTreeMap<(String, usize, String, String), Vec<f32>>,
    seeds: u64,
    base: &str,
    epochs: &str,
) -> String {
    let mut t = format!(
        "Test accuracy (%) on digits, mean ± half-range over {seeds} seeds; unshared models trained {base} epochs, \
         every shared model {epochs} epochs.\n\n| model | rate | schedule | {} |\n|---|---|---|{}\n",
        METHODS.join(" | "),
        "---|".repeat(METHODS.len())
    );
    for ((fam, rate, sched, method), v) in results {
        if method == "unshared" {
            let (m, s) = mean_spread(v);
            let _ = writeln!(
                t,
                "| {fam} | 1 | - | unshared: {:.2} ± {:.2} | | | | |",
                m * 100.0,
                s * 100.0
            );
        } else if method == METHODS[0] {
            let cells: Vec<String> = METHODS
                .iter()
                .map(
                    |m| match results.get(&(fam.clone(), *rate, sched.clone(), m.to_string())) {
                        Some(v) => {
                            let (mean, s) = mean_spread(v);
                            format!("{:.2} ± {:.2}", mean * 100.0, s * 100.0)
                        }
                        None => "–".into(),
                    },
                )
                .collect();
            let _ = writeln!(t, "| {fam} | {rate} | {sched} | {} |", cells.join(" | "));
        }
    }
    t
}

/// One column per (model, rate, schedule), one marker per method: mean with the seeds' range.
fn plot(results: &BTreeMap<(String, usize, String, String), Vec<f32>>, out: &Path) -> Result<(), String> {
    let _ = plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        include_bytes!("../assets/DejaVuSans.ttf"),
    );
    let configs: Vec<(String, usize, String)> = results
        .keys()
        .filter(|k| k.3 == METHODS[0])
        .map(|k| (k.0.clone(), k.1, k.2.clone()))
        .collect();
    for (path, svg) in [
        (out.join("experiment.png"), false),
        (out.join("experiment.svg"), true),
    ] {
        let size = (1100, 520);
        if svg {
            let root = SVGBackend::new(&path, size).into_drawing_area();
            draw(&root, results, &configs)?;
            root.present().map_err(|e| e.to_string())?;
        } else {
            let root = BitMapBackend::new(&path, size).into_drawing_area();
            draw(&root, results, &configs)?;
            root.present().map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    results: &BTreeMap<(String, usize, String, String), Vec<f32>>,
    configs: &[(String, usize, String)],
) -> Result<(), String> {
    let e = |x: DrawingAreaErrorKind<DB::ErrorType>| x.to_string();
    root.fill(&WHITE).map_err(e)?;
    let mut chart = ChartBuilder::on(root)
        .caption(
            "digits: fused vs from scratch (mean and range over seeds)",
            ("sans-serif", 18),
        )
        .margin(14)
        .x_label_area_size(70)
        .y_label_area_size(50)
        .build_cartesian_2d(-0.5..(configs.len() as f64 - 0.5), 0.0..100.0)
        .map_err(e)?;
    let names: Vec<String> = configs
        .iter()
        .map(|(f, r, s)| format!("{} ws{r} {s}", if f.contains("vit") { "ViT" } else { "CM" }))
        .collect();
    chart
        .configure_mesh()
        .x_labels(configs.len())
        .x_label_formatter(&|v| names.get(v.round() as usize).cloned().unwrap_or_default())
        .y_desc("test accuracy (%)")
        .label_style(("sans-serif", 12))
        .draw()
        .map_err(e)?;
    let colours = [
        RGBColor(214, 39, 40),
        RGBColor(255, 127, 14),
        RGBColor(31, 119, 180),
        RGBColor(44, 160, 44),
        RGBColor(127, 127, 127),
    ];
    for (k, method) in METHODS.iter().enumerate() {
        let offset = (k as f64 - 2.0) * 0.14;
        let points: Vec<(f64, f32, f32, f32)> = configs
            .iter()
            .enumerate()
            .filter_map(|(i, (f, r, s))| {
                let v = results.get(&(f.clone(), *r, s.clone(), method.to_string()))?;
                let (lo, hi) = v
                    .iter()
                    .fold((f32::MAX, f32::MIN), |(l, h), &x| (l.min(x), h.max(x)));
                Some((
                    i as f64 + offset,
                    mean_spread(v).0 * 100.0,
                    lo * 100.0,
                    hi * 100.0,
                ))
            })
            .collect();
        let c = colours[k];
        chart
            .draw_series(points.iter().map(|&(x, _, lo, hi)| {
                PathElement::new(vec![(x, f64::from(lo)), (x, f64::from(hi))], c.stroke_width(2))
            }))
            .map_err(e)?;
        chart
            .draw_series(
                points
                    .iter()
                    .map(|&(x, m, _, _)| Circle::new((x, f64::from(m)), 6, c.filled())),
            )
            .map_err(e)?
            .label(*method)
            .legend(move |(x, y)| Circle::new((x, y), 6, c.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::MiddleLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(e)?;
    Ok(())
}
