//! FiPS's rules: the rank a parameter budget allows, the parameters a FiPS model stores, and what
//! makes a plan (groups of blocks, budget, sparsity) valid.
use crate::{Field, RuleError};

/// Matrices per block that FiPS factorises (fc1ᵀ and fc2).
pub const MATRICES_PER_BLOCK: usize = 2;

/// The rank that keeps a fraction `budget` of a group's MLP weights when the V's have sparsity
/// `sparsity`: r = ⌊4·F·n·d²·p / (4·F·n·d·(1 − s) + d)⌋ with F = 2 matrices per block, n blocks
/// per group and h = 4d.
///
/// ```
/// // FiPS's DeiT-B example: d 768, groups of 4 blocks, half the MLP weights, 75 % sparse V's.
/// assert_eq!(spin_rules::fips::rank(768, 4, 0.5, 0.75), 1365);
/// ```
pub const fn rank(d: usize, n: usize, budget: f64, sparsity: f64) -> usize {
    let f = MATRICES_PER_BLOCK as f64;
    let (d, n) = (d as f64, n as f64);
    // `as usize` truncates, which is the floor for the non-negative values met here.
    (4.0 * f * n * d * d * budget / (4.0 * f * n * d * (1.0 - sparsity) + d)) as usize
}

/// Entries the magnitude masks keep out of `total` at `sparsity` (rounded to nearest).
pub const fn kept(total: usize, sparsity: f64) -> usize {
    ((1.0 - sparsity) * total as f64 + 0.5) as usize
}

/// Parameters a group stores: U densely, and the non-zeros of its 2n V's (pruned globally across
/// the group, so the count is rounded once per group).
pub const fn group_params(d: usize, hidden: usize, n: usize, r: usize, sparsity: f64) -> usize {
    d * r + kept(MATRICES_PER_BLOCK * n * r * hidden, sparsity)
}

/// Parameters of a FiPS ViT's MLPs: every group's U and V non-zeros, and the per-layer biases.
pub const fn mlp_params(
    dim: usize,
    hidden: usize,
    depth: usize,
    groups: usize,
    rank: usize,
    sparsity: f64,
) -> usize {
    let n = depth / groups;
    groups * group_params(dim, hidden, n, rank, sparsity) + depth * (hidden + dim)
}

/// The unique parameters of a FiPS ViT: the dense ViT's (`vit_params`) with its MLPs replaced by
/// FiPS's count.
pub const fn model_params(
    vit_params: usize,
    dim: usize,
    hidden: usize,
    depth: usize,
    groups: usize,
    rank: usize,
    sparsity: f64,
) -> usize {
    vit_params - depth * crate::counts::mlp_params(dim, hidden)
        + mlp_params(dim, hidden, depth, groups, rank, sparsity)
}

/// Bytes of the bit masks a FiPS ViT stores beside its factors.
pub const fn mask_bytes(depth: usize, rank: usize, hidden: usize) -> usize {
    MATRICES_PER_BLOCK * depth * rank * hidden.div_ceil(8)
}

/// Checks a plan for a ViT of `depth` blocks and width `dim`: groups that cover every block once,
/// all of one size (the rank depends on it), a budget in (0, 1], a sparsity in [0, 1), and a
/// non-zero rank. Returns the rank, or every rule the plan breaks.
///
/// ```
/// use spin_rules::fips::check_plan;
/// assert_eq!(check_plan(4, 64, &[vec![0, 1], vec![2, 3]], 0.5, 0.5), Ok(56));
/// let errors = check_plan(4, 64, &[vec![0, 1], vec![1, 4]], 1.5, 0.5).unwrap_err();
/// assert_eq!(errors.len(), 4); // block 1 twice, block 4, blocks 2 and 3 missing, the budget
/// ```
pub fn check_plan(
    depth: usize,
    dim: usize,
    groups: &[Vec<usize>],
    budget: f64,
    sparsity: f64,
) -> Result<usize, Vec<RuleError>> {
    let mut errors = Vec::new();
    let mut seen = vec![false; depth];
    for &b in groups.iter().flatten() {
        if b >= depth {
            errors.push(RuleError::new(
                Field::FipsGroups,
                format!("block {b} does not exist: the model has blocks 0..{depth}"),
            ));
        } else if std::mem::replace(&mut seen[b], true) {
            errors.push(RuleError::new(
                Field::FipsGroups,
                format!("block {b} is in two groups"),
            ));
        }
    }
    let missing: Vec<String> = (0..depth).filter(|&b| !seen[b]).map(|b| b.to_string()).collect();
    if !missing.is_empty() {
        errors.push(RuleError::new(
            Field::FipsGroups,
            format!("every block must be in a group; missing: {}", missing.join(", ")),
        ));
    }
    let n = groups.first().map_or(0, Vec::len);
    if groups.iter().any(|g| g.len() != n) {
        errors.push(RuleError::new(
            Field::FipsGroups,
            "groups must all have the same number of blocks (the rank follows from it)",
        ));
    }
    if !(budget > 0.0 && budget <= 1.0) {
        errors.push(RuleError::new(
            Field::Budget,
            format!("budget is the fraction of MLP weights kept: it must lie in (0, 1], got {budget}"),
        ));
    }
    if !(0.0..1.0).contains(&sparsity) {
        errors.push(RuleError::new(
            Field::Sparsity,
            format!("sparsity must lie in [0, 1), got {sparsity}"),
        ));
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    match rank(dim, n, budget, sparsity) {
        0 => Err(vec![RuleError::new(
            Field::Budget,
            format!(
                "budget {budget} at sparsity {sparsity} leaves rank 0 for groups of {n} blocks: \
                 raise the budget or the sparsity"
            ),
        )]),
        r => Ok(r),
    }
}

/// Consecutive groups of `size` blocks: `[[0, 1, 2, 3], [4, 5, 6, 7], …]`.
pub fn consecutive(depth: usize, size: usize) -> Result<Vec<Vec<usize>>, RuleError> {
    if size == 0 || !depth.is_multiple_of(size) {
        return Err(RuleError::new(
            Field::FipsGroups,
            format!("a group size of {size} does not divide the {depth} blocks"),
        ));
    }
    Ok((0..depth / size)
        .map(|g| (g * size..(g + 1) * size).collect())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_are_checked_with_every_reason() {
        let e = check_plan(4, 64, &[vec![0, 1, 2], vec![3]], 0.5, 0.0).unwrap_err();
        assert_eq!(e.len(), 1);
        assert!(e[0].message.contains("same number of blocks"));
        let e = check_plan(4, 64, &[vec![0, 1], vec![2, 3]], 0.5, 1.0).unwrap_err();
        assert_eq!(e[0].field, Field::Sparsity);
        let e = check_plan(4, 64, &[vec![0, 1], vec![2, 3]], 1e-9, 0.0).unwrap_err();
        assert!(e[0].message.contains("rank 0"));
        assert_eq!(consecutive(6, 3).unwrap(), [vec![0, 1, 2], vec![3, 4, 5]]);
        assert!(consecutive(6, 4).is_err());
    }
}
