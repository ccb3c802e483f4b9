//! FiPS's math on plain `f64` matrices: the SVD initialisation, global magnitude masks, the
//! cubic sparsity schedule and RigL's prune-and-regrow update.
use crate::error::Error;
use spin_rules::fips::{kept, MATRICES_PER_BLOCK};

/// Gradual pruning (Zhu & Gupta's cubic schedule): sparsity at `step` of `total`, from `initial`
/// to `target`, reached at `total` and held after.
pub fn cubic_sparsity(step: usize, total: usize, initial: f64, target: f64) -> f64 {
    let t = (step as f64 / total.max(1) as f64).min(1.0);
    target + (initial - target) * (1.0 - t).powi(3)
}

/// A group's factors: U (d × r, row-major) and one V (r × h, row-major) per matrix, in the order
/// fc1ᵀ of block 0, fc2 of block 0, fc1ᵀ of block 1, ….
#[derive(Clone, Debug, PartialEq)]
pub struct Factors {
    /// Rows of U: the model width.
    pub d: usize,
    /// Columns of each V: the MLP hidden width.
    pub hidden: usize,
    /// The rank.
    pub r: usize,
    /// The shared basis U, `(d, r)` row-major.
    pub u: Vec<f64>,
    /// One V per matrix, `(r, hidden)` row-major.
    pub v: Vec<Vec<f64>>,
}

impl Factors {
    /// The reconstructed matrix `U·V_i` (d × h).
    pub fn product(&self, i: usize) -> Vec<f64> {
        let (d, h, r) = (self.d, self.hidden, self.r);
        let mut out = vec![0.0; d * h];
        for a in 0..d {
            for k in 0..r {
                let u = self.u[a * r + k];
                if u != 0.0 {
                    for (o, &v) in out[a * h..(a + 1) * h]
                        .iter_mut()
                        .zip(&self.v[i][k * h..(k + 1) * h])
                    {
                        *o += u * v;
                    }
                }
            }
        }
        out
    }
}

/// SVD initialisation. `fc1` are the group's fc1 weights (h × d, PyTorch layout) and `fc2` its
/// fc2 weights (d × h). They are concatenated along the hidden axis into M = [fc1₀ᵀ fc2₀ fc1₁ᵀ …]
/// (d × 2nh); U holds the first r left singular vectors and V the first r rows of diag(S)·Vᵀ,
/// sliced per matrix.
///
/// When r > d the basis is over-complete: U gets r − d zero columns, and the extra rows of each V
/// are copies of its first rows scaled by 1e-2. The product U·V is unchanged (the zero columns
/// meet them), while neither factor of the extra rank is zero, so both receive gradient when the
/// factors are trained.
pub fn init(fc1: &[&[f64]], fc2: &[&[f64]], d: usize, hidden: usize, r: usize) -> Result<Factors, Error> {
    let n = fc1.len();
    if n == 0 || fc2.len() != n || r == 0 {
        return Err(Error::Invalid(
            "FiPS needs one fc1 and one fc2 per block, at least one block, rank ≥ 1".into(),
        ));
    }
    if fc1.iter().chain(fc2).any(|m| m.len() != d * hidden) {
        return Err(Error::Invalid(format!(
            "every MLP matrix must hold {d} × {hidden} values"
        )));
    }
    let cols = MATRICES_PER_BLOCK * n * hidden;
    let m = nalgebra::DMatrix::<f64>::from_fn(d, cols, |a, c| {
        let (mat, j) = (c / hidden, c % hidden);
        let blk = mat / MATRICES_PER_BLOCK;
        if mat % MATRICES_PER_BLOCK == 0 {
            fc1[blk][j * d + a] // fc1ᵀ[a, j] = fc1[j, a]
        } else {
            fc2[blk][a * hidden + j]
        }
    });
    let svd = m.svd(true, true);
    let (u, vt) = (svd.u.unwrap(), svd.v_t.unwrap());
    let s = svd.singular_values;
    // nalgebra does not promise an order: rank the singular values, largest first.
    let mut order: Vec<usize> = (0..s.len()).collect();
    order.sort_by(|&a, &b| s[b].total_cmp(&s[a]));
    let kept = r.min(order.len());
    let mut uf = vec![0.0; d * r];
    for a in 0..d {
        for (k, &o) in order.iter().take(kept).enumerate() {
            uf[a * r + k] = u[(a, o)];
        }
    }
    let mut v = vec![vec![0.0; r * hidden]; MATRICES_PER_BLOCK * n];
    for (i, vi) in v.iter_mut().enumerate() {
        for k in 0..r {
            // Rows beyond the SVD's rank copy an earlier row, scaled (see above).
            let (src, scale) = if k < kept { (k, 1.0) } else { (k % kept, 1e-2) };
            let o = order[src];
            for j in 0..hidden {
                vi[k * hidden + j] = scale * s[o] * vt[(o, i * hidden + j)];
            }
        }
    }
    Ok(Factors {
        d,
        hidden,
        r,
        u: uf,
        v,
    })
}

/// Global magnitude pruning across the group's V's: keeps the largest (1 − sparsity) fraction of
/// all entries (ties keep the earlier entry). `true` = kept.
pub fn magnitude_masks(v: &[Vec<f64>], sparsity: f64) -> Vec<Vec<bool>> {
    let total: usize = v.iter().map(Vec::len).sum();
    let keep = kept(total, sparsity.clamp(0.0, 1.0));
    let mut all: Vec<(f64, usize, usize)> = v
        .iter()
        .enumerate()
        .flat_map(|(i, vi)| vi.iter().enumerate().map(move |(j, x)| (x.abs(), i, j)))
        .collect();
    all.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let mut masks: Vec<Vec<bool>> = v.iter().map(|vi| vec![false; vi.len()]).collect();
    for &(_, i, j) in all.iter().take(keep) {
        masks[i][j] = true;
    }
    masks
}

/// RigL's fraction of kept entries to move at `step`: `initial` decayed by a cosine to zero at
/// `until` (no updates after it).
pub fn rigl_fraction(step: usize, until: usize, initial: f64) -> f64 {
    if step >= until {
        return 0.0;
    }
    initial * 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / until.max(1) as f64).cos())
}

/// One RigL update of a group's masks (Evci et al., 2020), global over the group's matrices:
/// drop the `fraction` of kept entries with the smallest magnitude, then regrow as many among the
/// entries that were pruned before this update, where the dense gradient is largest. The number
/// kept is unchanged. Returns the new masks and, per matrix, the regrown entries (whose values
/// the caller sets to zero, as RigL starts them).
pub fn rigl_update(
    values: &[Vec<f64>],
    masks: &[Vec<bool>],
    grads: &[Vec<f64>],
    fraction: f64,
) -> (Vec<Vec<bool>>, Vec<Vec<usize>>) {
    let kept: Vec<(usize, usize)> = entries(masks, true);
    let mut pruned: Vec<(usize, usize)> = entries(masks, false);
    let moves = ((fraction.clamp(0.0, 1.0) * kept.len() as f64).round() as usize).min(pruned.len());
    let mut new_masks = masks.to_vec();
    let mut regrown = vec![Vec::new(); masks.len()];
    if moves == 0 {
        return (new_masks, regrown);
    }
    let mut by_magnitude = kept;
    by_magnitude.sort_by(|a, b| {
        values[a.0][a.1]
            .abs()
            .total_cmp(&values[b.0][b.1].abs())
            .then(a.cmp(b))
    });
    for &(i, j) in by_magnitude.iter().take(moves) {
        new_masks[i][j] = false;
    }
    pruned.sort_by(|a, b| {
        grads[b.0][b.1]
            .abs()
            .total_cmp(&grads[a.0][a.1].abs())
            .then(a.cmp(b))
    });
    for &(i, j) in pruned.iter().take(moves) {
        new_masks[i][j] = true;
        regrown[i].push(j);
    }
    (new_masks, regrown)
}

/// Every (matrix, index) whose mask is `kept`.
fn entries(masks: &[Vec<bool>], kept: bool) -> Vec<(usize, usize)> {
    masks
        .iter()
        .enumerate()
        .flat_map(|(i, m)| {
            m.iter()
                .enumerate()
                .filter(move |(_, &k)| k == kept)
                .map(move |(j, _)| (i, j))
        })
        .collect()
}

/// Zeroes the pruned entries (masks are applied after every optimiser step and in the forward
/// pass, so pruned entries stay zero).
pub fn apply_masks(v: &mut [Vec<f64>], masks: &[Vec<bool>]) {
    for (vi, mi) in v.iter_mut().zip(masks) {
        for (x, &keep) in vi.iter_mut().zip(mi) {
            if !keep {
                *x = 0.0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rigl_moves_the_smallest_kept_entries_to_the_largest_gradients() {
        let values = vec![vec![0.9, 0.0, -0.1, 0.5], vec![0.0, 0.3, 0.0, -0.05]];
        let masks = vec![vec![true, false, true, true], vec![false, true, false, true]];
        let grads = vec![vec![0.0, 2.0, 0.0, 0.0], vec![-5.0, 0.0, 0.1, 0.0]];
        // 5 kept; a fraction of 0.4 moves 2: drop −0.05 and −0.1, regrow where |g| is 5 and 2.
        let (m, regrown) = rigl_update(&values, &masks, &grads, 0.4);
        assert_eq!(
            m,
            vec![vec![true, true, false, true], vec![true, true, false, false]]
        );
        assert_eq!(regrown, vec![vec![1], vec![0]]);
        // The same count kept, whatever the fraction.
        for f in [0.0, 0.1, 0.5, 1.0] {
            let (m, _) = rigl_update(&values, &masks, &grads, f);
            assert_eq!(m.iter().flatten().filter(|&&k| k).count(), 5, "fraction {f}");
        }
        assert_eq!(rigl_fraction(0, 100, 0.3), 0.3);
        assert!((rigl_fraction(50, 100, 0.3) - 0.15).abs() < 1e-12);
        assert_eq!(rigl_fraction(100, 100, 0.3), 0.0);
    }
    use spin_rules::fips::{group_params, rank};

    fn lcg(seed: u64, n: usize) -> Vec<f64> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64) - 0.5
            })
            .collect()
    }

    #[test]
    fn rank_formula_matches_the_paper_example() {
        assert_eq!(rank(768, 4, 0.5, 0.75), 1365);
        // Budget 1 and no sparsity allow more than the dense rank (the formula's d term).
        assert_eq!(
            rank(8, 1, 1.0, 0.0),
            (4.0 * 2.0 * 64.0 / (4.0 * 2.0 * 8.0 + 8.0)) as usize
        );
        let r = rank(768, 4, 0.5, 0.75);
        let kept = group_params(768, 3072, 4, r, 0.75) as f64;
        let dense = (2 * 4 * 768 * 3072) as f64;
        assert!((kept / dense - 0.5).abs() < 0.001, "{}", kept / dense);
    }

    #[test]
    fn full_rank_without_sparsity_reproduces_every_matrix() {
        let (d, h, n) = (6, 24, 2);
        let fc1: Vec<Vec<f64>> = (0..n).map(|i| lcg(i as u64 + 1, h * d)).collect();
        let fc2: Vec<Vec<f64>> = (0..n).map(|i| lcg(i as u64 + 10, d * h)).collect();
        let refs1: Vec<&[f64]> = fc1.iter().map(Vec::as_slice).collect();
        let refs2: Vec<&[f64]> = fc2.iter().map(Vec::as_slice).collect();
        for r in [d, d + 3] {
            let f = init(&refs1, &refs2, d, h, r).unwrap();
            for b in 0..n {
                let p1 = f.product(2 * b); // fc1ᵀ
                let p2 = f.product(2 * b + 1); // fc2
                for a in 0..d {
                    for j in 0..h {
                        assert!((p1[a * h + j] - fc1[b][j * d + a]).abs() < 1e-10, "r={r}");
                        assert!((p2[a * h + j] - fc2[b][a * h + j]).abs() < 1e-10, "r={r}");
                    }
                }
            }
            if r > d {
                // Over-complete: zero columns in U, non-zero extra rows in V.
                assert!((0..d).all(|a| f.u[a * r + d..(a + 1) * r].iter().all(|&x| x == 0.0)));
                assert!(f.v[0][d * h..].iter().any(|&x| x != 0.0));
            }
        }
        // A lower rank is the best rank-r approximation: the error shrinks as r grows.
        let err = |r: usize| {
            let f = init(&refs1, &refs2, d, h, r).unwrap();
            let p = f.product(1);
            p.iter().zip(&fc2[0]).map(|(a, b)| (a - b).powi(2)).sum::<f64>()
        };
        assert!(err(2) > err(4) && err(4) > err(6) && err(6) < 1e-18);
    }

    #[test]
    fn masks_keep_the_largest_entries_globally_and_stay_applied() {
        let mut v = vec![vec![0.1, -5.0, 0.3, 2.0], vec![-0.2, 0.05, 4.0, -1.0]];
        let m = magnitude_masks(&v, 0.5);
        assert_eq!(
            m,
            vec![vec![false, true, false, true], vec![false, false, true, true]]
        );
        apply_masks(&mut v, &m);
        assert_eq!(v, vec![vec![0.0, -5.0, 0.0, 2.0], vec![0.0, 0.0, 4.0, -1.0]]);
        assert!((cubic_sparsity(0, 100, 0.05, 0.75) - 0.05).abs() < 1e-12);
        assert!((cubic_sparsity(50, 100, 0.05, 0.75) - (0.75 - 0.7 * 0.125)).abs() < 1e-12);
        assert_eq!(cubic_sparsity(100, 100, 0.05, 0.75), 0.75);
        assert_eq!(cubic_sparsity(500, 100, 0.05, 0.75), 0.75);
    }
}
