//! How alike a trained network's layers are, and which layers should share: linear CKA between
//! block outputs, cosine similarity between block weights, and the assignment of D layers to G
//! groups that keeps the most similar layers together — contiguous (dynamic programming over
//! segmentations, exact) or unrestricted (branch and bound over partitions, seeded by refined
//! agglomerative clustering).
//!
//! Both assignments minimise the same cost: the sum over groups of the dissimilarity
//! `1 − s(i, j)` of every pair of layers in the group. Singleton groups cost nothing and every
//! added member costs its dissimilarity to each other member, so the cost favours tight groups of
//! balanced size.
use nalgebra::DMatrix;

/// The centred Gram matrix `H·X·Xᵀ·H` of `n` examples whose representations are the rows of `x`
/// (row-major, `n × p`): the form in which linear CKA compares two layers.
pub fn centred_gram(x: &[f32], n: usize) -> DMatrix<f64> {
    let p = x.len() / n.max(1);
    let mut m = DMatrix::from_fn(n, p, |i, j| f64::from(x[i * p + j]));
    // Centring the features (each column's mean removed) is centring the Gram matrix.
    for mut col in m.column_iter_mut() {
        let mean = col.mean();
        col.add_scalar_mut(-mean);
    }
    &m * m.transpose()
}

/// Linear CKA (Kornblith et al., 2019) of two layers from their centred Gram matrices:
/// ⟨K, L⟩ / (‖K‖·‖L‖), in [0, 1]; 1 for representations equal up to an orthogonal transform and
/// an isotropic scaling. 0 when either representation is constant.
pub fn cka(k: &DMatrix<f64>, l: &DMatrix<f64>) -> f64 {
    let norms = k.norm() * l.norm();
    if norms == 0.0 {
        return 0.0;
    }
    k.dot(l) / norms
}

/// Every pair's CKA, from each layer's centred Gram matrix.
pub fn cka_matrix(grams: &[DMatrix<f64>]) -> Vec<Vec<f64>> {
    let n = grams.len();
    let mut s = vec![vec![1.0; n]; n];
    for i in 0..n {
        for j in i + 1..n {
            let v = cka(&grams[i], &grams[j]);
            s[i][j] = v;
            s[j][i] = v;
        }
    }
    s
}

/// The cosine of the angle between two flattened tensors (0 when either is zero).
pub fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norms = a.iter().map(|x| x * x).sum::<f64>().sqrt() * b.iter().map(|x| x * x).sum::<f64>().sqrt();
    if norms == 0.0 {
        0.0
    } else {
        dot / norms
    }
}

/// Every pair's cosine similarity.
pub fn cosine_matrix(layers: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let n = layers.len();
    let mut s = vec![vec![1.0; n]; n];
    for i in 0..n {
        for j in i + 1..n {
            let v = cosine(&layers[i], &layers[j]);
            s[i][j] = v;
            s[j][i] = v;
        }
    }
    s
}

/// The cost of an assignment (`schedule[i]` = layer i's group): Σ over pairs in one group of
/// `1 − sim[i][j]`.
pub fn grouping_cost(sim: &[Vec<f64>], schedule: &[usize]) -> f64 {
    let mut cost = 0.0;
    for i in 0..schedule.len() {
        for j in i + 1..schedule.len() {
            if schedule[i] == schedule[j] {
                cost += 1.0 - sim[i][j];
            }
        }
    }
    cost
}

/// Group indices renumbered by first use (layer 0 is in group 0, the next new group is 1, …), so
/// that equal partitions print equally.
pub fn canonical(schedule: &[usize]) -> Vec<usize> {
    let mut seen: Vec<usize> = Vec::new();
    schedule
        .iter()
        .map(|g| match seen.iter().position(|s| s == g) {
            Some(k) => k,
            None => {
                seen.push(*g);
                seen.len() - 1
            }
        })
        .collect()
}

/// The best split of the layers into `groups` contiguous runs (exact: dynamic programming over
/// the end of the last run). Needs 1 ≤ groups ≤ layers.
pub fn contiguous_groups(sim: &[Vec<f64>], groups: usize) -> Vec<usize> {
    let d = sim.len();
    assert!(groups >= 1 && groups <= d, "need 1 ≤ groups ≤ layers");
    // run[a][b]: the cost of layers a..b (exclusive) as one group.
    let mut run = vec![vec![0.0; d + 1]; d + 1];
    for (a, row) in run.iter_mut().enumerate().take(d) {
        for b in a + 1..=d {
            let added: f64 = (a..b - 1).map(|i| 1.0 - sim[i][b - 1]).sum();
            row[b] = row[b - 1] + added;
        }
    }
    // best[k][b]: the cost of layers 0..b in k runs; from[k][b]: where the last run starts.
    let mut best = vec![vec![f64::INFINITY; d + 1]; groups + 1];
    let mut from = vec![vec![0; d + 1]; groups + 1];
    best[0][0] = 0.0;
    for k in 1..=groups {
        for b in k..=d {
            for a in k - 1..b {
                let c = best[k - 1][a] + run[a][b];
                if c < best[k][b] {
                    best[k][b] = c;
                    from[k][b] = a;
                }
            }
        }
    }
    let mut schedule = vec![0; d];
    let mut b = d;
    for k in (1..=groups).rev() {
        let a = from[k][b];
        schedule[a..b].fill(k - 1);
        b = a;
    }
    schedule
}

/// The best unrestricted assignment to exactly `groups` groups: a branch-and-bound search over
/// all partitions (layers in order, each joining a group in use or opening the next one), cut off
/// where the cost so far already reaches the best found, and seeded with the best of three
/// refined starts — average-linkage agglomerative clustering, the contiguous optimum and the
/// strided pattern. Exact unless the search visits more than `NODES` partial assignments (deep
/// networks with many groups); then the best found so far, never worse than the contiguous one.
pub fn clustered_groups(sim: &[Vec<f64>], groups: usize) -> Vec<usize> {
    let d = sim.len();
    assert!(groups >= 1 && groups <= d, "need 1 ≤ groups ≤ layers");
    let strided: Vec<usize> = (0..d).map(|i| i % groups).collect();
    let mut best = [
        agglomerative(sim, groups),
        contiguous_groups(sim, groups),
        strided,
    ]
    .map(|s| refine(sim, s, groups))
    .into_iter()
    .min_by(|a, b| grouping_cost(sim, a).total_cmp(&grouping_cost(sim, b)))
    .expect("three starts");
    let mut best_cost = grouping_cost(sim, &best);
    let mut search = Search {
        sim,
        groups,
        current: Vec::with_capacity(d),
        nodes: 0,
    };
    search.descend(0, 0.0, &mut best, &mut best_cost);
    canonical(&best)
}

/// How many partial assignments the exact search may visit.
const NODES: usize = 5_000_000;

struct Search<'a> {
    sim: &'a [Vec<f64>],
    groups: usize,
    current: Vec<usize>,
    nodes: usize,
}

impl Search<'_> {
    /// Places layer `current.len()`, whose predecessors use `used` groups at `cost` so far.
    fn descend(&mut self, used: usize, cost: f64, best: &mut Vec<usize>, best_cost: &mut f64) {
        let (d, i) = (self.sim.len(), self.current.len());
        if i == d {
            if used == self.groups && cost < *best_cost - 1e-12 {
                *best_cost = cost;
                best.clone_from(&self.current);
            }
            return;
        }
        // Too few layers left to open the groups still unused, or out of budget.
        if d - i < self.groups - used || self.nodes >= NODES {
            return;
        }
        self.nodes += 1;
        for g in 0..(used + 1).min(self.groups) {
            let added: f64 = (0..i)
                .filter(|&j| self.current[j] == g)
                .map(|j| 1.0 - self.sim[i][j])
                .sum();
            if cost + added >= *best_cost - 1e-12 {
                continue;
            }
            self.current.push(g);
            self.descend(used.max(g + 1), cost + added, best, best_cost);
            self.current.pop();
        }
    }
}

/// Average-linkage agglomerative clustering down to `groups` clusters.
fn agglomerative(sim: &[Vec<f64>], groups: usize) -> Vec<usize> {
    let d = sim.len();
    let mut clusters: Vec<Vec<usize>> = (0..d).map(|i| vec![i]).collect();
    while clusters.len() > groups {
        let mut best = (f64::NEG_INFINITY, 0, 1);
        for a in 0..clusters.len() {
            for b in a + 1..clusters.len() {
                let pairs = (clusters[a].len() * clusters[b].len()) as f64;
                let link: f64 = clusters[a]
                    .iter()
                    .flat_map(|&i| clusters[b].iter().map(move |&j| (i, j)))
                    .map(|(i, j)| sim[i][j])
                    .sum::<f64>()
                    / pairs;
                if link > best.0 {
                    best = (link, a, b);
                }
            }
        }
        let merged = clusters.remove(best.2);
        clusters[best.1].extend(merged);
    }
    let mut schedule = vec![0; d];
    for (g, c) in clusters.iter().enumerate() {
        for &i in c {
            schedule[i] = g;
        }
    }
    schedule
}

/// Moves single layers to other groups while a move lowers the cost and leaves no group empty.
fn refine(sim: &[Vec<f64>], mut schedule: Vec<usize>, groups: usize) -> Vec<usize> {
    let d = schedule.len();
    loop {
        let mut improved = false;
        for i in 0..d {
            let from = schedule[i];
            if schedule.iter().filter(|&&g| g == from).count() == 1 {
                continue;
            }
            // The cost of layer i in group g: its dissimilarity to g's other members.
            let cost_in = |g: usize, s: &[usize]| -> f64 {
                (0..d)
                    .filter(|&j| j != i && s[j] == g)
                    .map(|j| 1.0 - sim[i][j])
                    .sum()
            };
            let here = cost_in(from, &schedule);
            let (best, to) = (0..groups)
                .filter(|&g| g != from)
                .map(|g| (cost_in(g, &schedule), g))
                .fold((f64::INFINITY, from), |a, b| if b.0 < a.0 { b } else { a });
            if best < here - 1e-12 {
                schedule[i] = to;
                improved = true;
            }
        }
        if !improved {
            return schedule;
        }
    }
}

/// The assignment as a `#[shared_blocks]` argument: `pattern = [0, 0, 1, 1]`.
pub fn pattern_literal(schedule: &[usize]) -> String {
    let items: Vec<String> = schedule.iter().map(usize::to_string).collect();
    format!("pattern = [{}]", items.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random(n: usize, p: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n * p).map(|_| rng.gen_range(-1.0..1.0)).collect()
    }

    #[test]
    fn cka_of_a_layer_with_itself_is_one() {
        let x = random(20, 7, 1);
        let k = centred_gram(&x, 20);
        assert!((cka(&k, &k) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling() {
        let (n, p) = (30, 6);
        let x = random(n, p, 2);
        // A random orthogonal matrix: Q of a QR decomposition.
        let a = DMatrix::from_vec(p, p, random(p, p, 3).iter().map(|&v| f64::from(v)).collect());
        let q = a.qr().q();
        let xm = DMatrix::from_fn(n, p, |i, j| f64::from(x[i * p + j]));
        let y = (&xm * &q) * 3.5;
        let y: Vec<f32> = (0..n)
            .flat_map(|i| (0..p).map(move |j| (i, j)))
            .map(|(i, j)| y[(i, j)] as f32)
            .collect();
        let other = random(n, p, 4);
        let (kx, ky, ko) = (centred_gram(&x, n), centred_gram(&y, n), centred_gram(&other, n));
        assert!((cka(&kx, &ky) - 1.0).abs() < 1e-6, "{}", cka(&kx, &ky));
        assert!((cka(&kx, &ko) - cka(&ky, &ko)).abs() < 1e-6);
        // And unrelated representations are far from 1.
        assert!(cka(&kx, &ko) < 0.7, "{}", cka(&kx, &ko));
    }

    /// Every assignment of `d` layers to contiguous runs of `groups`, by brute force.
    fn all_contiguous(d: usize, groups: usize) -> Vec<Vec<usize>> {
        (0u32..1 << (d - 1))
            .filter(|cuts| cuts.count_ones() as usize == groups - 1)
            .map(|cuts| {
                let mut g = 0;
                (0..d)
                    .map(|i| {
                        if i > 0 && cuts & (1 << (i - 1)) != 0 {
                            g += 1;
                        }
                        g
                    })
                    .collect()
            })
            .collect()
    }

    #[allow(clippy::needless_range_loop)]
    fn random_sim(d: usize, seed: u64) -> Vec<Vec<f64>> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut s = vec![vec![1.0; d]; d];
        for i in 0..d {
            for j in i + 1..d {
                let v = rng.gen_range(0.0..1.0);
                s[i][j] = v;
                s[j][i] = v;
            }
        }
        s
    }

    #[test]
    fn the_contiguous_grouping_is_optimal_by_brute_force() {
        for seed in 0..20 {
            let (d, groups) = (8, 3);
            let sim = random_sim(d, seed);
            let ours = contiguous_groups(&sim, groups);
            let best = all_contiguous(d, groups)
                .iter()
                .map(|s| grouping_cost(&sim, s))
                .fold(f64::INFINITY, f64::min);
            assert!((grouping_cost(&sim, &ours) - best).abs() < 1e-12, "seed {seed}");
            // Contiguous, and every group used.
            assert!(ours.windows(2).all(|w| w[1] == w[0] || w[1] == w[0] + 1) && ours[d - 1] == groups - 1);
        }
    }

    /// Every assignment of `d` layers to exactly `groups` groups, by brute force.
    fn all_partitions(d: usize, groups: usize) -> Vec<Vec<usize>> {
        (0..groups.pow(d as u32))
            .map(|mut code| {
                (0..d)
                    .map(|_| {
                        let g = code % groups;
                        code /= groups;
                        g
                    })
                    .collect::<Vec<usize>>()
            })
            .filter(|s| (0..groups).all(|g| s.contains(&g)))
            .collect()
    }

    #[test]
    fn the_unrestricted_grouping_is_optimal_by_brute_force() {
        for seed in 0..10 {
            let (d, groups) = (7, 3);
            let sim = random_sim(d, 100 + seed);
            let ours = clustered_groups(&sim, groups);
            let best = all_partitions(d, groups)
                .iter()
                .map(|s| grouping_cost(&sim, s))
                .fold(f64::INFINITY, f64::min);
            assert!((grouping_cost(&sim, &ours) - best).abs() < 1e-12, "seed {seed}");
        }
    }

    #[test]
    fn clustering_finds_blocks_of_alike_layers_and_beats_contiguous_runs() {
        // Layers 0, 2, 4 alike, and 1, 3, 5: the strided grouping, which no contiguous one is.
        let d = 6;
        let sim: Vec<Vec<f64>> = (0..d)
            .map(|i| (0..d).map(|j| if i % 2 == j % 2 { 0.9 } else { 0.1 }).collect())
            .collect();
        assert_eq!(clustered_groups(&sim, 2), vec![0, 1, 0, 1, 0, 1]);
        for seed in 0..10 {
            let sim = random_sim(9, seed);
            let c = clustered_groups(&sim, 3);
            assert!(grouping_cost(&sim, &c) <= grouping_cost(&sim, &contiguous_groups(&sim, 3)) + 1e-12);
            assert_eq!(c.iter().max(), Some(&2));
        }
    }

    #[test]
    fn patterns_print_as_a_declaration_takes_them() {
        assert_eq!(canonical(&[2, 2, 0, 1]), vec![0, 0, 1, 2]);
        assert_eq!(pattern_literal(&[0, 0, 1]), "pattern = [0, 0, 1]");
    }
}
