//! `spin analyze`: which layers of a trained model are alike, and the groupings that follow;
//! and the check `spin fuse --groups` makes against them.
use crate::args::AnalyzeArgs;
use crate::ui::{io, progress};
use spin_core::data::DataSpec;
use spin_core::sharing::similarity::{canonical, pattern_literal};
use spin_core::train::{self, Analysis, SimilarityKind};
use spin_core::{Error, ModelInfo};
use std::io::Write;
use std::path::Path;

/// Runs the analysis of `weights` (an unshared member's checkpoint) on `data`.
pub fn run_analysis(
    model: Option<&str>,
    weights: &Path,
    data: &DataSpec,
    images: usize,
    groups: Option<usize>,
    by: SimilarityKind,
    quiet: bool,
) -> Result<Analysis, Error> {
    let m = crate::load(&crate::member_name(model, weights)?, weights)?;
    let info = m.info();
    let split = crate::ui::load_data(data, &info, false)?;
    crate::ui::need_training_images(&split, data)?;
    let groups = groups.unwrap_or((info.depth / 2).max(1));
    let bar = progress(images.min(split.train.len()), format!("{} CKA", info.name), quiet);
    let analysis = train::analyze(m.as_ref(), &split.train, images, groups, by, &mut |n| {
        bar.set_position(n as u64)
    })?;
    bar.finish_and_clear();
    Ok(analysis)
}

/// `spin analyze`: prints both similarity matrices and the groupings, writes `analysis.json` and
/// the heatmaps to `--out`.
pub fn analyze(a: &AnalyzeArgs, out: &mut dyn Write) -> Result<Analysis, Error> {
    let an = run_analysis(
        a.model.as_deref(),
        &a.from,
        &a.data,
        a.images,
        a.groups,
        a.by,
        a.quiet,
    )?;
    std::fs::create_dir_all(&a.out).map_err(|e| Error::io(&a.out, e))?;
    let json = a.out.join("analysis.json");
    let text = serde_json::to_string_pretty(&an).map_err(|e| io(e.into()))?;
    std::fs::write(&json, text + "\n").map_err(|e| Error::io(&json, e))?;
    let chosen = an
        .grouping("contiguous")
        .map(|g| g.schedule.clone())
        .unwrap_or_default();
    let figures = crate::plot::similarity_plot(
        &[
            ("linear CKA of block outputs", &an.cka),
            ("cosine similarity of block weights", &an.weight_cosine),
        ],
        &chosen,
        &a.out,
    )?;
    let w = |out: &mut dyn Write, s: String| writeln!(out, "{s}").map_err(io);
    w(
        out,
        format!(
            "{}: {} layers, CKA on {} images",
            an.model,
            an.cka.len(),
            an.images
        ),
    )?;
    for (title, m) in [("CKA", &an.cka), ("weight cosine", &an.weight_cosine)] {
        w(out, format!("{title}:"))?;
        for row in m.iter() {
            let cells: Vec<String> = row.iter().map(|v| format!("{v:5.2}")).collect();
            w(out, format!("  {}", cells.join(" ")))?;
        }
    }
    let by = match an.by {
        SimilarityKind::Cka => "CKA",
        SimilarityKind::Weights => "weight cosine",
    };
    w(
        out,
        format!(
            "{} groups by {by} (cost: Σ 1 − similarity within groups, lower is better):",
            an.groups
        ),
    )?;
    for g in &an.groupings {
        w(
            out,
            format!(
                "  {:<11} {:7.3}  {}",
                g.method,
                g.cost,
                pattern_literal(&g.schedule)
            ),
        )?;
    }
    w(
        out,
        format!(
            "wrote {}, {}",
            json.display(),
            figures
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    )?;
    Ok(an)
}

/// Checks that the shared member `info` is declared with one of the analysis's groupings (as a
/// `pattern = [...]` list); the error says what to declare.
pub fn check_member_uses(info: &ModelInfo, an: &Analysis) -> Result<&'static str, Error> {
    let schedule = canonical(&info.schedule);
    for method in ["contiguous", "clustered"] {
        if an.grouping(method).is_some_and(|g| g.schedule == schedule) {
            return Ok(if method == "contiguous" {
                "contiguous"
            } else {
                "clustered"
            });
        }
    }
    let wanted: Vec<String> = ["contiguous", "clustered"]
        .iter()
        .filter_map(|m| an.grouping(m))
        .map(|g| format!("{} ({})", pattern_literal(&g.schedule), g.method))
        .collect();
    Err(Error::Invalid(format!(
        "{} is declared with {}, not with the analysis's grouping into {} groups; declare a member with \
         #[shared_blocks(depth = {}, groups = {}, {})] and fuse into it",
        info.name,
        pattern_literal(&info.schedule),
        an.groups,
        an.cka.len(),
        an.groups,
        wanted.join(" or ")
    )))
}
