//! `spin fips`: FiPS compression of a trained ViT from the command line.
use crate::args::FipsArgs;
use crate::find;
use crate::report::{self, FipsResult};
use crate::ui::{io, progress};
use indicatif::ProgressBar;
use spin_core::train::{self, Classifier, Event, TrainConfig};
use spin_core::Error;
use std::io::Write;
use std::time::Instant;

/// `--groups 0,1;2,3` as lists of blocks.
fn parse_groups(s: &str) -> Result<Vec<Vec<usize>>, Error> {
    s.split(';')
        .map(|g| {
            g.split(',')
                .map(|b| {
                    b.trim().parse::<usize>().map_err(|_| {
                        Error::Invalid(format!(
                            "--groups takes block numbers, e.g. `0,1,2,3;4,5,6,7`; `{}` is not one",
                            b.trim()
                        ))
                    })
                })
                .collect()
        })
        .collect()
}

/// `spin fips`: loads the dense ViT, compresses its MLPs (SVD init, gradual pruning, block-wise
/// reconstruction), optionally fine-tunes end to end, reports, and saves the FiPS checkpoint.
pub fn fips(a: &FipsArgs, out: &mut dyn Write) -> Result<FipsResult, Error> {
    let start = Instant::now();
    let member = find(&a.model)?;
    let info = (member.info)();
    let runner = member.fips.ok_or_else(|| {
        Error::Invalid(format!(
            "{} cannot be compressed by FiPS: it needs a dense ViT (FiPS shares MLP weights of ViT blocks)",
            info.name
        ))
    })?;
    let split = crate::ui::load_data(&a.calib, &info, false)?;
    crate::ui::need_training_images(&split, &a.calib)?;
    let mut dense = crate::build(&a.model, 0)?;
    dense.load_timm(&a.from)?;
    let (calib, kept) = split
        .train
        .gather(&split.train.stratified(a.calib_images, a.seed))?;
    let n = kept.len();
    if n == 0 {
        return Err(Error::Invalid(format!(
            "{}: no calibration image decodes",
            a.calib
        )));
    }
    let group_size = a.group_size.unwrap_or_else(|| {
        [4, 3, 2, 1]
            .into_iter()
            .find(|g| info.depth % g == 0)
            .unwrap_or(1)
    });
    let groups = a.groups.as_deref().map(parse_groups).transpose()?;
    let job = spin_core::fips::FipsJob {
        checkpoint: &a.from,
        groups,
        group_size,
        budget: a.budget,
        sparsity: a.sparsity,
        calib: &calib,
        calib_n: n,
        recon: spin_core::fips::ReconConfig {
            steps: a.steps,
            lr: a.lr,
            rows: a.rows,
            schedule: a.sparse_schedule,
            seed: a.seed,
            ..Default::default()
        },
    };
    let pb = progress(a.steps, format!("{} FiPS", info.name), a.quiet || a.json);
    let outcome = runner(&job, &mut |_, loss| {
        pb.inc(1);
        pb.set_message(format!("Σ block MSE {loss:.3e}"));
    })?;
    pb.finish_and_clear();
    let batch = 128;
    let acc = |m: &dyn Classifier| train::evaluate(m, &split.test, batch).map(|s| s.accuracy);
    let (dense_acc, one_shot_acc) = (acc(dense.as_ref())?, acc(outcome.init.as_ref())?);
    let mut model = outcome.model;
    let reconstructed_acc = acc(model.as_ref())?;
    let mut finetuned = None;
    if a.finetune_epochs > 0 {
        let cfg = TrainConfig {
            epochs: a.finetune_epochs,
            batch: 64,
            lr: a.finetune_lr,
            weight_decay: 0.0,
            label_smoothing: 0.1,
            clip: Some(1.0),
            seed: a.seed,
            ..TrainConfig::default()
        };
        let mut pb = ProgressBar::hidden();
        let stats = train::fine_tune(model.as_mut(), &split.train, &split.test, &cfg, &mut |event| {
            match event {
                Event::EpochStart { epoch, steps } => {
                    pb.finish_and_clear();
                    pb = progress(
                        steps,
                        format!("fine-tune {}/{}", epoch + 1, cfg.epochs),
                        a.quiet || a.json,
                    );
                }
                Event::Step { step, .. } => pb.set_position(step as u64),
                _ => {}
            }
            Ok(())
        })?;
        pb.finish_and_clear();
        finetuned = stats.last().map(|s| s.accuracy);
    }
    if let Some(dir) = a.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    model.save_timm(&a.out, a.save_dtype)?;
    let r = &outcome.report;
    crate::plot::fips_plot(
        &r.losses,
        &r.init_errors,
        &r.final_errors,
        &a.out.with_extension("png"),
    )?;
    let result = FipsResult {
        sparse_schedule: format!("{:?}", a.sparse_schedule).to_lowercase(),
        model: info.name.into(),
        groups: r.plan.groups.clone(),
        rank: r.plan.rank,
        budget: r.plan.budget,
        sparsity: r.sparsity,
        dense_params: info.params,
        fips_params: model.info().params,
        dense_mlp_params: r.dense_mlp_params,
        fips_mlp_params: r.fips_mlp_params,
        init_block_mse: r.init_errors.clone(),
        final_block_mse: r.final_errors.clone(),
        dense_accuracy: dense_acc,
        one_shot_accuracy: one_shot_acc,
        reconstructed_accuracy: reconstructed_acc,
        finetuned_accuracy: finetuned,
        seconds: start.elapsed().as_secs_f64(),
    };
    if a.json {
        writeln!(
            out,
            "{}",
            serde_json::to_string(&result).map_err(|e| Error::Invalid(e.to_string()))?
        )
        .map_err(io)?;
    } else {
        report::fips_table(&result, r.calib_rows, out).map_err(io)?;
        writeln!(
            out,
            "wrote {} and {}",
            a.out.display(),
            a.out.with_extension("png").display()
        )
        .map_err(io)?;
    }
    Ok(result)
}
