//! The commands that run a trained checkpoint: `spin eval`, `spin predict` and `spin import`.
use crate::args::{EvalArgs, ImportArgs, PredictArgs};
use crate::data_config;
use crate::ui::{io, progress};
use spin_core::checkpoint::{write_file, StorageDtype, TensorMap};
use spin_core::data::{self, Dataset};
use spin_core::models::{Plan, PLAN_KEY};
use spin_core::train::{self, Classifier};
use spin_core::Error;
use std::io::Write;
use std::path::Path;

/// What `spin eval --json` prints.
#[derive(serde::Serialize)]
struct EvalResult<'a> {
    model: &'a str,
    data: String,
    images: usize,
    accuracy: f32,
    top5: f32,
    loss: f32,
}

pub fn eval(a: &EvalArgs, out: &mut dyn Write) -> Result<(), Error> {
    let m = crate::load(&crate::member_name(a.model.as_deref(), &a.weights)?, &a.weights)?;
    let info = m.info();
    let split = crate::ui::load_data(&a.data, &info, a.strict)?;
    let pb = progress(split.test.len(), format!("{} eval", info.name), a.json);
    let s = train::evaluate_with(
        m.as_ref(),
        &split.test,
        a.batch,
        &data::Loader::default(),
        &mut |done| pb.set_position(done as u64),
    )?;
    pb.finish_and_clear();
    crate::ui::warn_skipped(&[&split.test]);
    if let Some(path) = &a.dump_logits {
        dump_logits(m.as_ref(), &split.test, a.batch, path)?;
    }
    if a.json {
        let r = EvalResult {
            model: info.name,
            data: a.data.to_string(),
            images: s.images,
            accuracy: s.accuracy,
            top5: s.top5,
            loss: s.loss,
        };
        let json = serde_json::to_string(&r).map_err(|e| io(e.into()))?;
        return writeln!(out, "{json}").map_err(io);
    }
    writeln!(
        out,
        "{}: test accuracy {:.4} (top-5 {:.4}), loss {:.4} on {} images of {}",
        info.name, s.accuracy, s.top5, s.loss, s.images, a.data
    )
    .map_err(io)
}

/// Writes the images a model was evaluated on (`images`, NCHW, as fed to it), their `labels`
/// and the model's `logits` as safetensors, with the model's plan in the metadata: what another
/// implementation (spin-torch) needs to check it computes the same.
fn dump_logits(m: &dyn Classifier, data: &Dataset, batch: usize, path: &Path) -> Result<(), Error> {
    let img = data.image();
    let (mut images, mut labels, mut logits) = (Vec::new(), Vec::new(), Vec::new());
    let idx: Vec<usize> = (0..data.len()).collect();
    data::Loader::default().run(data, &idx, batch, None, 0, &mut |_, b| {
        logits.extend(m.predict(&b.images, b.labels.len()));
        images.extend(b.images.iter().map(|&x| x as f64));
        labels.extend(b.labels.iter().map(|&l| l as f64));
        Ok(())
    })?;
    let n = labels.len();
    let tensors = TensorMap::from([
        ("images".to_string(), (vec![n, 3, img, img], images)),
        ("labels".to_string(), (vec![n], labels)),
        (
            "logits".to_string(),
            (
                vec![n, logits.len() / n.max(1)],
                logits.iter().map(|&x| x as f64).collect(),
            ),
        ),
    ]);
    let meta =
        std::collections::BTreeMap::from([(PLAN_KEY.to_string(), Plan::from_info(&m.info()).to_json())]);
    write_file(path, &tensors, StorageDtype::F32, &meta)
}

/// One image's top classes, as `spin predict --json` prints them.
#[derive(serde::Serialize)]
struct Prediction {
    image: String,
    classes: Vec<usize>,
    names: Vec<String>,
    probabilities: Vec<f32>,
}

/// The files `predict` classifies: files as given, directories as their image files (sorted).
fn image_files(paths: &[std::path::PathBuf]) -> Result<Vec<std::path::PathBuf>, Error> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut files: Vec<_> = std::fs::read_dir(p)
                .map_err(|e| Error::io(p, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| data::is_image_file(f))
                .collect();
            if files.is_empty() {
                return Err(Error::Invalid(format!(
                    "{}: no image files in this directory",
                    p.display()
                )));
            }
            files.sort();
            out.extend(files);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

pub fn predict(a: &PredictArgs, out: &mut dyn Write) -> Result<(), Error> {
    let m = crate::load(&crate::member_name(a.model.as_deref(), &a.weights)?, &a.weights)?;
    let cfg = data_config(&m.info());
    let imagenet = (m.info().classes == 1000).then(data::imagenet_classes);
    let name = |c: usize| match &imagenet {
        Some(names) => names[c].1.to_string(),
        None => format!("class {c}"),
    };
    for path in image_files(&a.images)? {
        let img = data::decode(&path)?;
        let logits = m.predict(&data::preprocess(&img, &cfg), 1);
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let z: f32 = logits.iter().map(|v| (v - max).exp()).sum();
        let mut ranked: Vec<(usize, f32)> = logits.iter().map(|v| (v - max).exp() / z).enumerate().collect();
        ranked.sort_by(|x, y| y.1.total_cmp(&x.1));
        ranked.truncate(a.top.max(1));
        if a.json {
            let p = Prediction {
                image: path.display().to_string(),
                classes: ranked.iter().map(|r| r.0).collect(),
                names: ranked.iter().map(|r| name(r.0)).collect(),
                probabilities: ranked.iter().map(|r| r.1).collect(),
            };
            let json = serde_json::to_string(&p).map_err(|e| io(e.into()))?;
            writeln!(out, "{json}").map_err(io)?;
            continue;
        }
        let top: Vec<String> = ranked
            .iter()
            .map(|&(c, p)| format!("{} ({:.1}%)", name(c), p * 100.0))
            .collect();
        writeln!(out, "{}: {}", path.display(), top.join(", ")).map_err(io)?;
    }
    Ok(())
}

/// `spin import`: any checkpoint of a member, written as spin's safetensors with its plan.
pub fn import(a: &ImportArgs, out: &mut dyn Write) -> Result<(), Error> {
    let mut m = crate::build(&a.model, 0)?;
    let report = m.load_checkpoint(&a.from)?;
    if a.layout != "auto" && a.layout != report.layout.name() {
        return Err(Error::Invalid(format!(
            "{}: the keys are in {} layout, not {} (--layout auto reads either)",
            a.from.display(),
            report.layout.name(),
            a.layout
        )));
    }
    m.save_timm(&a.out, a.save_dtype)?;
    let found = match &report.torch {
        None => format!(
            "{}, {} layout, {} tensors",
            report.format,
            report.layout.name(),
            report.tensors
        ),
        Some(t) => {
            let dtypes: Vec<String> = t.dtypes.iter().map(|(d, n)| format!("{n} {d}")).collect();
            format!(
                "PyTorch, {} layout, state dict {}, {} tensors ({}), {} integer buffers skipped",
                report.layout.name(),
                t.nested_under
                    .as_deref()
                    .map_or("at the top".into(), |k| format!("under `{k}`")),
                t.tensors,
                dtypes.join(", "),
                t.skipped.len()
            )
        }
    };
    writeln!(
        out,
        "{}: read {} ({found}); wrote {} ({} params)",
        a.model,
        a.from.display(),
        a.out.display(),
        m.num_params()
    )
    .map_err(io)
}
