//! Which layers of a trained model are alike: linear CKA between block outputs on calibration
//! images, cosine similarity between the blocks' weights, and the groupings they suggest (see
//! [`crate::sharing::similarity`]). What `spin analyze` prints, plots and writes.
use super::Classifier;
use crate::data::{Dataset, Loader};
use crate::error::Error;
use crate::sharing::similarity::{
    canonical, centred_gram, cka_matrix, clustered_groups, contiguous_groups, cosine_matrix, grouping_cost,
};
use crate::sharing::{Pattern, Schedule};
use serde::{Deserialize, Serialize};

/// Which similarity drives the grouping.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SimilarityKind {
    /// Linear CKA between block outputs.
    #[default]
    Cka,
    /// Cosine similarity between block weights.
    Weights,
}

impl std::str::FromStr for SimilarityKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "cka" => Ok(Self::Cka),
            "weights" => Ok(Self::Weights),
            _ => Err(Error::Invalid(format!(
                "unknown similarity `{s}`: use cka or weights"
            ))),
        }
    }
}

/// One grouping of the layers and its cost under the chosen similarity.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Grouping {
    /// How it was found: `contiguous`, `clustered`, or a built-in pattern's name.
    pub method: String,
    /// The group of every layer (groups numbered by first use).
    pub schedule: Vec<usize>,
    /// Σ over pairs of layers in one group of (1 − similarity): lower is better.
    pub cost: f64,
}

/// What `spin analyze` found, as it writes it to JSON.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Analysis {
    /// The analysed member.
    pub model: String,
    /// Calibration images used for CKA.
    pub images: usize,
    /// Linear CKA between every pair of block outputs.
    pub cka: Vec<Vec<f64>>,
    /// Cosine similarity between every pair of blocks' weights (all weight matrices of the
    /// block, flattened together).
    pub weight_cosine: Vec<Vec<f64>>,
    /// The similarity the groupings minimise the dissimilarity of.
    pub by: SimilarityKind,
    /// The number of groups.
    pub groups: usize,
    /// The best contiguous grouping, the best unrestricted one found, and the built-in
    /// sequential and strided patterns for comparison.
    pub groupings: Vec<Grouping>,
}

impl Analysis {
    /// The grouping found by `method` (`contiguous` or `clustered`).
    pub fn grouping(&self, method: &str) -> Option<&Grouping> {
        self.groupings.iter().find(|g| g.method == method)
    }
}

/// The cosine similarity of every pair of blocks' weights: each block's tensors of two or more
/// dimensions under `blocks.{i}.`, flattened in key order.
pub fn weight_similarity(model: &dyn Classifier) -> Vec<Vec<f64>> {
    let depth = model.info().depth;
    let tensors = model.state_tensors();
    let layers: Vec<Vec<f64>> = (0..depth)
        .map(|i| {
            let prefix = format!("blocks.{i}.");
            tensors
                .iter()
                .filter(|(k, (dims, _))| k.starts_with(&prefix) && dims.len() >= 2)
                .flat_map(|(_, (_, v))| v.iter().copied())
                .collect()
        })
        .collect();
    cosine_matrix(&layers)
}

/// Analyses an unshared model on `images` calibration images of `data` (stratified by class),
/// for an assignment to `groups` groups by `by`. `progress` is called after every batch with
/// the images done so far.
pub fn analyze(
    model: &dyn Classifier,
    data: &Dataset,
    images: usize,
    groups: usize,
    by: SimilarityKind,
    progress: &mut dyn FnMut(usize),
) -> Result<Analysis, Error> {
    let info = model.info();
    if info.share != "none" {
        return Err(Error::Invalid(format!(
            "{} shares its layers already; analyze the unshared model they come from",
            info.name
        )));
    }
    if groups == 0 || groups > info.depth {
        return Err(Error::Invalid(format!(
            "--groups must be between 1 and the depth ({}), got {groups}",
            info.depth
        )));
    }
    let idx = data.stratified(images, 0);
    if idx.len() < 2 {
        return Err(Error::Invalid("CKA needs at least 2 calibration images".into()));
    }
    // Each block's features for every image, gathered batch by batch.
    let mut features: Vec<Vec<f32>> = vec![Vec::new(); info.depth];
    let mut done = 0;
    Loader::default().run(data, &idx, 32, None, 0, &mut |_, b| {
        for (all, f) in features
            .iter_mut()
            .zip(model.block_features(&b.images, b.labels.len()))
        {
            all.extend(f);
        }
        done += b.labels.len();
        progress(done);
        Ok(())
    })?;
    if features.iter().all(Vec::is_empty) {
        return Err(Error::Invalid(format!(
            "{} does not expose its block outputs",
            info.name
        )));
    }
    let grams: Vec<_> = features.iter().map(|f| centred_gram(f, idx.len())).collect();
    let cka = cka_matrix(&grams);
    let weight_cosine = weight_similarity(model);
    let sim = match by {
        SimilarityKind::Cka => &cka,
        SimilarityKind::Weights => &weight_cosine,
    };
    let mut groupings = vec![
        grouping(sim, "contiguous", contiguous_groups(sim, groups)),
        grouping(sim, "clustered", clustered_groups(sim, groups)),
    ];
    for pattern in [Pattern::Sequential, Pattern::Strided] {
        if let Ok(s) = Schedule::new(info.depth, groups, &pattern) {
            groupings.push(grouping(sim, &pattern.name(), s.as_slice().to_vec()));
        }
    }
    Ok(Analysis {
        model: info.name.into(),
        images: idx.len(),
        cka,
        weight_cosine,
        by,
        groups,
        groupings,
    })
}

fn grouping(sim: &[Vec<f64>], method: &str, schedule: Vec<usize>) -> Grouping {
    let schedule = canonical(&schedule);
    Grouping {
        method: method.into(),
        cost: grouping_cost(sim, &schedule),
        schedule,
    }
}
