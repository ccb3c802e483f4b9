//! The `spin` command line. Each sub-command is a function here so tests can drive it directly.
use crate::report::{self, Format, Row};
use crate::{find, DIGITS_COMPARISON, MEMBERS};
use clap::Parser;
use indicatif::ProgressBar;
use spin_core::checkpoint::StorageDtype;
use spin_core::fusion::{read_checkpoint, Reduction};
use spin_core::models::{ModelInfo, Plan};
use spin_core::train::{self, Event, RunOptions, TrainResult};
use spin_core::Error;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

pub use crate::args::*;
pub use crate::fips_cmd::fips;
pub use crate::infer_cmd::{eval, import, predict};
use crate::ui::{io, progress};

/// Runs the command line; returns the process exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return argument_error(&e),
    };
    let threads = match &cli.cmd {
        Cmd::Bench(a) => a.threads,
        _ => None,
    };
    let result = set_threads(threads).and_then(|()| {
        // The command runs on one of rayon's workers, which then takes part in every parallel
        // loop. From any other thread each loop would be handed to the pool while the caller
        // sleeps: two context switches per loop, hundreds per forward pass.
        rayon::scope(|_| run(cli, &mut std::io::stdout().lock()))
    });
    match result {
        Ok(()) => 0,
        // The reader went away (`spin zoo | head`): nothing is wrong.
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::BrokenPipe => 0,
        Err(e) => {
            eprintln!("spin: {e}");
            1
        }
    }
}

/// Help and version go to stdout as clap writes them (status 0); an argument error is one line on
/// stderr — clap's message and its suggestion, if any — with status 1, like every other error.
fn argument_error(e: &clap::Error) -> i32 {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let _ = e.print();
        return 0;
    }
    eprintln!("spin: {}", one_line(&e.render().to_string()));
    1
}

/// clap's multi-line message as one line: the error, then any tip, without the usage block.
pub fn one_line(message: &str) -> String {
    let mut parts = Vec::new();
    for line in message.lines().map(str::trim) {
        if line.starts_with("Usage:") || line.starts_with("For more information") {
            break;
        }
        if !line.is_empty() {
            parts.push(line.strip_prefix("error: ").unwrap_or(line).to_string());
        }
    }
    parts.join("; ")
}

/// Sizes rayon's global pool (once per process; a later call with the size it has is a no-op).
fn set_threads(threads: Option<usize>) -> Result<(), Error> {
    match threads {
        Some(0) => Err(Error::Invalid("--threads must be at least 1".into())),
        Some(t) => match rayon::ThreadPoolBuilder::new().num_threads(t).build_global() {
            Ok(()) => Ok(()),
            Err(_) if rayon::current_num_threads() == t => Ok(()),
            Err(e) => Err(Error::Invalid(format!("cannot set {t} threads: {e}"))),
        },
        None => Ok(()),
    }
}

pub fn run(cli: Cli, out: &mut dyn Write) -> Result<(), Error> {
    match cli.cmd {
        Cmd::Zoo(a) => zoo(&a, out),
        Cmd::Train(a) => train(&a, out).map(|_| ()),
        Cmd::Eval(a) => eval(&a, out),
        Cmd::Predict(a) => predict(&a, out),
        Cmd::Compare(a) => compare(&a, out).map(|_| ()),
        Cmd::Fuse(a) => fuse(&a, out),
        Cmd::Bench(a) => bench(&a, out),
        Cmd::Fips(a) => fips(&a, out).map(|_| ()),
        Cmd::Import(a) => import(&a, out),
        Cmd::Recalibrate(a) => recalibrate(&a, out),
        Cmd::Analyze(a) => crate::analyze_cmd::analyze(&a, out).map(|_| ()),
    }
}

/// `spin zoo`: the members as a table, CSV, or (`--format json`) their plans, the objects every
/// checkpoint carries.
pub fn zoo(a: &ZooArgs, out: &mut dyn Write) -> Result<(), Error> {
    let infos: Vec<ModelInfo> = MEMBERS
        .iter()
        .map(|m| (m.info)())
        .filter(|i| a.filter.as_deref().is_none_or(|f| crate::name_matches(f, i.name)))
        .collect();
    if infos.is_empty() {
        let f = a.filter.as_deref().unwrap_or_default();
        return Err(Error::Invalid(format!(
            "no zoo member matches `{f}`; `spin zoo` lists them all"
        )));
    }
    if a.format == Format::Json {
        let plans: Vec<Plan> = infos.iter().map(Plan::from_info).collect();
        serde_json::to_writer_pretty(&mut *out, &plans).map_err(|e| io(e.into()))?;
        return writeln!(out).map_err(io);
    }
    let rows: Vec<Row> = infos.iter().map(Row::from_info).collect();
    report::zoo_table(&rows, a.format, a.wide, out).map_err(io)
}

/// `spin train`: builds the member (from scratch, fused from `--init-from`, or fusion-aware),
/// then runs [`fn@spin_core::train::run`] in `--out`, drawing its progress.
pub fn train(a: &TrainArgs, out: &mut dyn Write) -> Result<TrainResult, Error> {
    let cfg = a.hyper.config()?;
    let member = match (a.num_classes, &a.init_from) {
        (Some(n), Some(init)) => crate::fine_tune_member(a.model.as_deref(), init, n)?,
        _ => find(a.model.as_deref().unwrap_or_default())?,
    };
    let info = (member.info)();
    let split = crate::ui::load_data(&a.hyper.data, &info, a.hyper.strict)?;
    crate::ui::need_training_images(&split, &a.hyper.data)?;
    let mut model = match (a.fusion, &a.init_from) {
        (_, Some(init)) if a.num_classes.is_some() => {
            let mut m = (member.build)(cfg.seed);
            if !a.resume {
                train::load_all_but_head(m.as_mut(), init)?;
            }
            m
        }
        (Some(_), None) => {
            return Err(Error::Invalid("--fusion needs --init-from CKPT, the trained unshared model".into()))
        }
        (Some(_), Some(_)) if a.resume => {
            return Err(Error::Invalid(
                "--resume does not apply to fusion-aware training: its checkpoints hold the exported shared \
                 model; continue with `spin train --init-from` on the unshared model, or train the exported one"
                    .into(),
            ))
        }
        (Some(r), Some(init)) => {
            let build = member.fusion.ok_or_else(|| {
                Error::Invalid(format!(
                    "{} has no fusion-aware trainer: it exists for the shared members declared `<- base` in the zoo",
                    info.name
                ))
            })?;
            let mut m = build(cfg.seed, r);
            m.load_timm(init)?;
            m
        }
        (None, init) => {
            let mut m = (member.build)(cfg.seed);
            if let (Some(init), false) = (init, a.resume) {
                m.fuse_from(&read_checkpoint(init)?, Reduction::Mean)?;
            }
            m
        }
    };
    writeln!(
        out,
        "{}: {} params, {:.1} MMACs/image, {} train / {} test images ({})",
        info.name,
        info.params,
        info.macs as f64 / 1e6,
        split.train.len(),
        split.test.len(),
        a.hyper.data
    )
    .map_err(io)?;
    let mut settings = vec![("data".to_string(), a.hyper.data.to_string())];
    if let Some(init) = &a.init_from {
        settings.push(("init-from".into(), init.display().to_string()));
    }
    if let Some(n) = a.num_classes {
        settings.push(("num-classes".into(), n.to_string()));
    }
    writeln!(
        out,
        "lr {} ({}, {} warm-up epochs), augment {}, {} loader threads",
        cfg.lr,
        cfg.schedule,
        cfg.warmup_epochs,
        cfg.augment.describe(),
        cfg.loader.workers
    )
    .map_err(io)?;
    let opts = RunOptions {
        resume: a.resume,
        stop_after: a.stop_after,
        save_dtype: a.save_dtype,
        settings,
        override_settings: a.override_settings,
        ..RunOptions::new(a.out.clone().unwrap_or_else(|| Path::new("runs").join(info.name)))
    };
    let mut pb = ProgressBar::hidden();
    let mut epoch_start = Instant::now();
    let result = train::run(
        model.as_mut(),
        &split.train,
        &split.test,
        &cfg,
        &opts,
        &mut |event| {
            match event {
                Event::Initial(s) => writeln!(
                    out,
                    "before training: test loss {:.4} acc {:.4}",
                    s.loss, s.accuracy
                )
                .map_err(io)?,
                Event::EpochStart { epoch, steps } => {
                    pb = progress(
                        steps,
                        format!("{} {}/{}", info.name, epoch + 1, cfg.epochs),
                        a.quiet,
                    );
                    epoch_start = Instant::now();
                }
                Event::Step { step, loss, accuracy } => {
                    pb.set_position(step as u64);
                    let ips = (step * cfg.batch) as f64 / epoch_start.elapsed().as_secs_f64().max(1e-9);
                    pb.set_message(format!("loss {loss:.3} acc {accuracy:.3} {ips:.0} img/s"));
                }
                Event::Committed { .. } => pb.finish_and_clear(),
                Event::Epoch(r) => writeln!(
                out,
                "epoch {:>3}: train loss {:.4} acc {:.4} | test loss {:.4} acc {:.4} | {:.1}s, {:.0} img/s",
                r.epoch,
                r.train.loss,
                r.train.accuracy,
                r.test.loss,
                r.test.accuracy,
                r.seconds,
                r.images_per_s()
            )
                .map_err(io)?,
            }
            Ok(())
        },
    )?;
    crate::ui::warn_skipped(&[&split.train, &split.test]);
    if a.resume && result.epochs_run == 0 {
        writeln!(
            out,
            "{}: all {} epochs are done; nothing to train (test accuracy {:.4})",
            opts.dir.display(),
            cfg.epochs,
            result.test_accuracy
        )
        .map_err(io)?;
    }
    if a.json {
        let json = serde_json::to_string(&result).map_err(|e| io(e.into()))?;
        writeln!(out, "{json}").map_err(io)?;
    }
    Ok(result)
}

/// `spin bench`.
pub fn bench(a: &BenchArgs, out: &mut dyn Write) -> Result<(), Error> {
    set_threads(a.threads)?;
    let model = match (&a.model, a.peak) {
        (_, true) => {
            let threads = rayon::current_num_threads();
            let gflops = spin_core::kernels::peak::fma_gflops(1.0);
            let line = if a.json {
                format!("{{\"threads\":{threads},\"peak_gflops\":{gflops:.1}}}")
            } else {
                format!(
                    "FP32 FMA peak on {}: {gflops:.1} GFLOP/s",
                    crate::bench::threads_text(threads)
                )
            };
            return writeln!(out, "{line}").map_err(io);
        }
        (Some(m), false) => m.as_str(),
        (None, false) => return Err(Error::Invalid("give --model NAME (or --peak)".into())),
    };
    let r = match (a.dtype.as_str(), a.train) {
        ("f32", train) => {
            crate::bench::bench(model, a.weights.as_deref(), a.batch, train, a.iters, a.profile)?
        }
        ("f16", false) => crate::bench::bench_f16(model, a.batch, a.iters)?,
        ("f16", true) => return Err(Error::Invalid("f16 benchmarks time the forward pass only".into())),
        (d, _) => return Err(Error::Invalid(format!("unknown dtype `{d}`: use f32 or f16"))),
    };
    if a.json {
        writeln!(
            out,
            "{}",
            serde_json::to_string(&r).map_err(|e| Error::Invalid(e.to_string()))?
        )
        .map_err(io)
    } else {
        writeln!(
            out,
            "{} batch {} {} {} on {}: median {:.2} ms, min {:.2} ms, {:.1} images/s, peak RSS {:.0} MB, matmul on {}",
            r.model, r.batch, r.mode, r.dtype, crate::bench::threads_text(r.threads), r.median_ms, r.min_ms, r.images_per_s, r.peak_rss_mb, r.matmul
        )
        .map_err(io)?;
        if let Some(p) = &r.profile {
            crate::bench::write_profile(out, p, a.iters).map_err(io)?;
        }
        Ok(())
    }
}

/// `spin fuse`: a shared member from a trained unshared checkpoint; with `--calib`, its BatchNorm
/// statistics re-estimated and its accuracy reported before and after.
pub fn fuse(a: &FuseArgs, out: &mut dyn Write) -> Result<(), Error> {
    let mut m = crate::build(&a.model, 0)?;
    if let Some(groups) = &a.groups {
        let analysis = if groups == "auto" {
            let data = a.calib.as_ref().ok_or_else(|| {
                Error::Invalid(
                    "--groups auto analyses --from on calibration images: give --calib DATA".into(),
                )
            })?;
            crate::analyze_cmd::run_analysis(
                None,
                &a.from,
                data,
                256,
                Some(m.info().groups),
                Default::default(),
                true,
            )?
        } else {
            let path = std::path::Path::new(groups);
            let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
            serde_json::from_str(&text).map_err(|e| {
                Error::Invalid(format!(
                    "{}: not an analysis.json written by spin analyze: {e}",
                    path.display()
                ))
            })?
        };
        let method = crate::analyze_cmd::check_member_uses(&m.info(), &analysis)?;
        writeln!(out, "{}: declared with the analysis's {method} grouping", a.model).map_err(io)?;
    }
    let source = read_checkpoint(&a.from)?;
    let report = m.fuse_from(&source, a.reduction)?;
    writeln!(
        out,
        "{}: {} tensors fused from their groups, {} copied; {} params",
        a.model,
        report.fused,
        report.copied,
        m.num_params()
    )
    .map_err(io)?;
    if let Some(calib) = &a.calib {
        let split = calibrate(m.as_mut(), calib, &a.recal, !a.no_recalibrate, out)?;
        if a.refit > 0 {
            let images = a.recal.calib_batches * a.recal.calib_batch;
            let mut say = |pass: usize, err: f64| {
                let _ = writeln!(
                    out,
                    "refit pass {pass}: logits' mean squared error to --from {err:.4}"
                );
            };
            train::refit_fused(m.as_mut(), &source, &split.train, images, a.refit, &mut say)?;
            let after = train::evaluate(m.as_mut(), &split.test, 256)?;
            writeln!(
                out,
                "test accuracy after refitting on {images} images of {calib}: {:.4}",
                after.accuracy
            )
            .map_err(io)?;
        }
    }
    m.save_timm(&a.out, a.save_dtype)?;
    writeln!(out, "wrote {}", a.out.display()).map_err(io)
}

/// `spin recalibrate`: a checkpoint's BatchNorm statistics re-estimated on calibration images.
pub fn recalibrate(a: &RecalibrateArgs, out: &mut dyn Write) -> Result<(), Error> {
    let mut m = crate::load(&crate::member_name(a.model.as_deref(), &a.weights)?, &a.weights)?;
    calibrate(m.as_mut(), &a.data, &a.recal, true, out)?;
    m.save_timm(&a.out, StorageDtype::F32)?;
    writeln!(out, "wrote {}", a.out.display()).map_err(io)
}

/// Test accuracy on `data`'s test split, then (when `apply`) after recalibrating on its
/// training split; returns the split.
fn calibrate(
    m: &mut dyn spin_core::train::Classifier,
    data: &spin_core::data::DataSpec,
    recal: &Recalibration,
    apply: bool,
    out: &mut dyn Write,
) -> Result<spin_core::data::Split, Error> {
    let info = m.info();
    let split = crate::ui::load_data(data, &info, false)?;
    crate::ui::need_training_images(&split, data)?;
    let before = train::evaluate(m, &split.test, 256)?;
    writeln!(
        out,
        "test accuracy with the copied BatchNorm statistics: {:.4}",
        before.accuracy
    )
    .map_err(io)?;
    if apply {
        let used = train::recalibrate_bn(m, &split.train, recal.calib_batches, recal.calib_batch)?;
        let after = train::evaluate(m, &split.test, 256)?;
        writeln!(
            out,
            "test accuracy after recalibrating on {used} images of {data}: {:.4}",
            after.accuracy
        )
        .map_err(io)?;
    }
    Ok(split)
}

/// `spin compare`: trains each member with the same settings, then writes `compare.csv`,
/// `compare.png` and `compare.svg` and prints the table.
pub fn compare(a: &CompareArgs, out: &mut dyn Write) -> Result<Vec<TrainResult>, Error> {
    let names: Vec<String> = if a.models.is_empty() {
        DIGITS_COMPARISON.iter().map(|s| s.to_string()).collect()
    } else {
        a.models.clone()
    };
    for n in &names {
        find(n)?;
    }
    std::fs::create_dir_all(&a.out).map_err(|e| Error::io(&a.out, e))?;
    let mut results = Vec::new();
    for name in &names {
        let t = TrainArgs {
            model: Some(name.clone()),
            num_classes: None,
            hyper: a.hyper.clone(),
            out: Some(a.out.join(name)),
            resume: false,
            override_settings: false,
            json: false,
            stop_after: None,
            init_from: None,
            fusion: None,
            save_dtype: StorageDtype::F32,
            quiet: a.quiet,
        };
        let r = train(&t, &mut std::io::sink())?;
        writeln!(
            out,
            "{:<40} test accuracy {:.4} ({:.1}s)",
            r.name, r.test_accuracy, r.seconds
        )
        .map_err(io)?;
        results.push(r);
    }
    let rows: Vec<(Row, &TrainResult)> = results
        .iter()
        .map(|r| (Row::from_info(&(find(&r.name).unwrap().info)()), r))
        .collect();
    writeln!(out).map_err(io)?;
    report::compare_table(&rows, out).map_err(io)?;
    report::compare_csv(&rows, &a.out.join("compare.csv"))?;
    crate::plot::compare_plot(&rows, &a.out, &a.hyper.data.to_string())?;
    writeln!(
        out,
        "\nwrote {0}/compare.csv, {0}/compare.png and {0}/compare.svg",
        a.out.display()
    )
    .map_err(io)?;
    Ok(results)
}
