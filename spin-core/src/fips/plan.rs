//! A FiPS plan chosen at run time, and making a FiPS ViT's MLPs from a dense ViT's by it.
use super::factors::{init, magnitude_masks, rigl_update};
use crate::base::SpinDtype;
use crate::device::SpinDevice;
use crate::error::Error;
use crate::models::fips_mlps::{FipsDecl, FipsMlps};
use crate::models::vit::{DenseMlps, VitConfig};
use dfdx::prelude::*;
use spin_rules::fips::MATRICES_PER_BLOCK;

/// A FiPS compression chosen at run time: which blocks share a basis, the rank and the target
/// sparsity of the V's.
#[derive(Clone, Debug, PartialEq)]
pub struct FipsPlan {
    /// The blocks that share each basis.
    pub groups: Vec<Vec<usize>>,
    /// The fraction of the MLP weights kept.
    pub budget: f64,
    /// The fraction of the factors' entries pruned.
    pub sparsity: f64,
    /// The rank the budget allows.
    pub rank: usize,
}

impl FipsPlan {
    /// Checks that `groups` cover blocks `0..depth` once each with groups of one size (the rank
    /// formula depends on the size), and derives the rank from the budget.
    pub fn new(
        depth: usize,
        dim: usize,
        groups: Vec<Vec<usize>>,
        budget: f64,
        sparsity: f64,
    ) -> Result<Self, Error> {
        let rank = spin_rules::fips::check_plan(depth, dim, &groups, budget, sparsity).map_err(|errors| {
            let reasons: Vec<String> = errors.into_iter().map(|e| e.message).collect();
            Error::Invalid(format!("invalid FiPS plan: {}", reasons.join("; ")))
        })?;
        Ok(Self {
            groups,
            budget,
            sparsity,
            rank,
        })
    }

    /// Consecutive groups of `size` blocks: `[[0, 1, 2, 3], [4, 5, 6, 7], …]`.
    pub fn consecutive(depth: usize, size: usize) -> Result<Vec<Vec<usize>>, Error> {
        Ok(spin_rules::fips::consecutive(depth, size)?)
    }

    /// The plan a declaration fixes.
    pub fn declared(d: &FipsDecl) -> Self {
        Self {
            groups: d.groups.iter().map(|g| g.to_vec()).collect(),
            budget: d.budget,
            sparsity: d.sparsity,
            rank: d.rank,
        }
    }
}

impl<C: VitConfig, E: SpinDtype, D: SpinDevice<E>> FipsMlps<C, E, D> {
    /// SVD initialisation from a dense ViT's unshared MLPs (see [`super::factors::init`]), masks all ones:
    /// the sparsity is reached afterwards ([`Self::prune_to`]), at once or gradually.
    pub fn from_dense(dense: &DenseMlps<C, E, D>, plan: &FipsPlan) -> Result<Self, Error> {
        if dense.len() != C::DEPTH {
            return Err(Error::Invalid(format!(
                "FiPS starts from unshared MLPs; {} stores {} MLPs for {} blocks",
                C::NAME,
                dense.len(),
                C::DEPTH
            )));
        }
        let (d, h, r) = (C::Dim::SIZE, C::Hidden::SIZE, plan.rank);
        let dev = dense[0].fc1.weight.device().clone();
        let mut group_of = vec![0; C::DEPTH];
        for (g, blocks) in plan.groups.iter().enumerate() {
            for &b in blocks {
                group_of[b] = g;
            }
        }
        let mut out = Self::zeros(&dev, &group_of, plan.groups.len(), r);
        let f64s = |t: Vec<E>| t.into_iter().map(|x| x.as_f64()).collect::<Vec<f64>>();
        let mut bases = Vec::with_capacity(plan.groups.len() * d * r);
        for blocks in &plan.groups {
            let fc1: Vec<Vec<f64>> = blocks
                .iter()
                .map(|&b| f64s(dense[b].fc1.weight.as_vec()))
                .collect();
            let fc2: Vec<Vec<f64>> = blocks
                .iter()
                .map(|&b| f64s(dense[b].fc2.weight.as_vec()))
                .collect();
            let r1: Vec<&[f64]> = fc1.iter().map(Vec::as_slice).collect();
            let r2: Vec<&[f64]> = fc2.iter().map(Vec::as_slice).collect();
            let f = init(&r1, &r2, d, h, r)?;
            bases.extend(f.u.iter().map(|&x| E::cast(x)));
            for (k, &b) in blocks.iter().enumerate() {
                let cast = |v: &[f64]| v.iter().map(|&x| E::cast(x)).collect::<Vec<E>>();
                let l = &mut out.layers[b];
                l.v1.copy_from(&cast(&f.v[MATRICES_PER_BLOCK * k]));
                l.v2.copy_from(&cast(&f.v[MATRICES_PER_BLOCK * k + 1]));
                l.b1.copy_from(&dense[b].fc1.bias.as_vec());
                l.b2.copy_from(&dense[b].fc2.bias.as_vec());
            }
        }
        out.bases.copy_from(&bases);
        Ok(out)
    }

    /// Magnitude pruning of every group's V's, globally within the group, to `sparsity`; pruned
    /// entries are zeroed. Entries already pruned are zero, so they stay pruned.
    pub fn prune_to(&mut self, sparsity: f64) {
        for blocks in self.groups() {
            let mut vs = Vec::with_capacity(blocks.len() * MATRICES_PER_BLOCK);
            for &b in &blocks {
                let l = &self.layers[b];
                for (v, m) in [(&l.v1, &l.m1), (&l.v2, &l.m2)] {
                    vs.push(
                        v.as_vec()
                            .iter()
                            .zip(m.as_vec())
                            .map(|(x, m)| x.as_f64() * m.as_f64())
                            .collect::<Vec<f64>>(),
                    );
                }
            }
            let masks = magnitude_masks(&vs, sparsity);
            self.set_group(&blocks, &masks, &vs);
        }
    }

    /// Writes a group's masks and its V's, kept entries from `values` and pruned ones zero;
    /// both lists hold fc1's then fc2's of each block in `blocks`, in order.
    fn set_group(&mut self, blocks: &[usize], masks: &[Vec<bool>], values: &[Vec<f64>]) {
        let as_e = |keep: bool, x: f64| E::cast(if keep { x } else { 0.0 });
        for (k, &b) in blocks.iter().enumerate() {
            let l = &mut self.layers[b];
            for (j, (v, m)) in [(&mut l.v1, &mut l.m1), (&mut l.v2, &mut l.m2)]
                .into_iter()
                .enumerate()
            {
                let (mask, vals) = (
                    &masks[MATRICES_PER_BLOCK * k + j],
                    &values[MATRICES_PER_BLOCK * k + j],
                );
                m.copy_from(&mask.iter().map(|&keep| as_e(keep, 1.0)).collect::<Vec<E>>());
                v.copy_from(
                    &vals
                        .iter()
                        .zip(mask)
                        .map(|(&x, &keep)| as_e(keep, x))
                        .collect::<Vec<E>>(),
                );
            }
        }
    }

    /// Opens every mask so that the next backward pass gives the dense gradient of every V entry
    /// (pruned entries are zero, so the forward pass is unchanged). Returns the masks, to give
    /// back to [`Self::rigl_step`].
    pub fn open_masks(&mut self) -> Vec<[Vec<E>; 2]> {
        self.layers
            .iter_mut()
            .map(|l| {
                let saved = [l.m1.as_vec(), l.m2.as_vec()];
                l.m1.fill_with_ones();
                l.m2.fill_with_ones();
                saved
            })
            .collect()
    }

    /// One RigL update with the masks [`Self::open_masks`] returned and the dense gradient of that
    /// backward pass ([`rigl_update`], per group): the masks move, the number kept does not,
    /// dropped entries are zeroed and regrown ones start at zero. Returns the entries moved.
    pub fn rigl_step(&mut self, saved: Vec<[Vec<E>; 2]>, grads: &Gradients<E, D>, fraction: f64) -> usize {
        let mut moved = 0;
        for blocks in self.groups() {
            let (mut values, mut masks, mut dense) = (Vec::new(), Vec::new(), Vec::new());
            for &b in &blocks {
                let l = &self.layers[b];
                for (j, v) in [&l.v1, &l.v2].into_iter().enumerate() {
                    values.push(v.as_vec().iter().map(|x| x.as_f64()).collect::<Vec<f64>>());
                    masks.push(
                        saved[b][j]
                            .iter()
                            .map(|m| m.as_f64() != 0.0)
                            .collect::<Vec<bool>>(),
                    );
                    dense.push(
                        grads
                            .get(v)
                            .as_vec()
                            .iter()
                            .map(|x| x.as_f64())
                            .collect::<Vec<f64>>(),
                    );
                }
            }
            let (new_masks, regrown) = rigl_update(&values, &masks, &dense, fraction);
            moved += regrown.iter().map(Vec::len).sum::<usize>();
            // Entries pruned before this update are zero in `values`, so regrown ones start at
            // zero; dropped ones are zeroed by their new mask.
            self.set_group(&blocks, &new_masks, &values);
        }
        moved
    }
}
