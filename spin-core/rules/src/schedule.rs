//! Which parameter group each layer uses: layer i of D uses group `schedule[i]` of G.
//!
//! The built-in patterns are computed by `const fn`s, so a declared model's `SCHEDULE` is a
//! compile-time constant made by exactly the code that builds schedules at run time.
use crate::{Field, RuleError};

/// A sharing pattern.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Pattern {
    /// Contiguous groups: layer i → i / (D/G), e.g. D=8, G=4 → `[0,0,1,1,2,2,3,3]`. Needs G | D.
    Sequential,
    /// Round robin: layer i → i mod G, e.g. `[0,1,2,3,0,1,2,3]`.
    Strided,
    /// Takase & Kiyono's CYCLE(REV): i mod G for the first D−G layers, then G−1 down to 0,
    /// e.g. D=6, G=3 → `[0,1,2,2,1,0]`.
    CycleRev,
    /// The sequential multiset in a seeded random order (SplitMix64 + Fisher–Yates, stable across
    /// platforms and releases). Needs G | D.
    Random {
        /// The shuffle's seed.
        seed: u64,
    },
    /// An explicit list of group indices, one per layer.
    List(Vec<usize>),
}

impl Pattern {
    /// The name used in model names and tables: `sequential`, `strided`, `cycle_rev`,
    /// `random<seed>`, `list`.
    pub fn name(&self) -> String {
        match self {
            Pattern::Sequential => "sequential".into(),
            Pattern::Strided => "strided".into(),
            Pattern::CycleRev => "cycle_rev".into(),
            Pattern::Random { seed } => format!("random{seed}"),
            Pattern::List(_) => "list".into(),
        }
    }

    /// Whether the pattern needs the depth to be a multiple of the group count.
    pub fn needs_divisible(&self) -> bool {
        matches!(self, Pattern::Sequential | Pattern::Random { .. })
    }
}

/// Fills `out` (one entry per layer) with the group of each layer. Callers check the arguments
/// first ([`check`] does); invalid arguments give an unspecified, in-range result.
pub const fn fill(out: &mut [usize], groups: usize, pattern: &Pattern) {
    let depth = out.len();
    let groups = if groups == 0 { 1 } else { groups };
    let per = if depth / groups == 0 { 1 } else { depth / groups };
    let mut i = 0;
    while i < depth {
        out[i] = match pattern {
            Pattern::Sequential | Pattern::Random { .. } => {
                let g = i / per;
                if g < groups {
                    g
                } else {
                    groups - 1
                }
            }
            Pattern::Strided => i % groups,
            Pattern::CycleRev => {
                if i + groups < depth || depth < groups {
                    i % groups
                } else {
                    depth - 1 - i
                }
            }
            Pattern::List(list) => {
                let list = list.as_slice();
                if i < list.len() && list[i] < groups {
                    list[i]
                } else {
                    0
                }
            }
        };
        i += 1;
    }
    if let Pattern::Random { seed } = pattern {
        // Fisher–Yates with SplitMix64.
        let mut state = *seed;
        let mut j = depth;
        while j > 1 {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let k = (z % j as u64) as usize;
            j -= 1;
            let t = out[j];
            out[j] = out[k];
            out[k] = t;
        }
    }
}

/// A built-in schedule as a fixed-size array, for `const` items.
pub const fn make<const N: usize>(groups: usize, pattern: &Pattern) -> [usize; N] {
    let mut out = [0; N];
    fill(&mut out, groups, pattern);
    out
}

/// Checks depth, groups and pattern; the error names the argument at fault and says what would
/// be valid.
pub fn check(depth: usize, groups: usize, pattern: &Pattern) -> Result<(), RuleError> {
    if depth == 0 {
        return Err(RuleError::new(Field::Depth, "`depth` must be at least 1"));
    }
    if groups == 0 {
        return Err(RuleError::new(Field::Groups, "`groups` must be at least 1"));
    }
    if groups > depth {
        return Err(RuleError::new(
            Field::Groups,
            format!("groups ({groups}) must be at most depth ({depth})"),
        ));
    }
    if pattern.needs_divisible() && !depth.is_multiple_of(groups) {
        let valid: Vec<String> = (1..=depth)
            .filter(|g| depth.is_multiple_of(*g))
            .map(|g| g.to_string())
            .collect();
        return Err(RuleError::new(
            Field::Groups,
            format!(
                "pattern `{}` needs depth ({depth}) to be a multiple of groups ({groups}); \
                 valid group counts: {}, or use pattern = strided or cycle_rev",
                pattern.name(),
                valid.join(", ")
            ),
        ));
    }
    if let Pattern::List(list) = pattern {
        if list.len() != depth {
            return Err(RuleError::new(
                Field::Pattern,
                format!(
                    "the pattern list has {} entries but depth is {depth}: give one group per layer",
                    list.len()
                ),
            ));
        }
        if let Some((layer, g)) = list.iter().enumerate().find(|(_, &g)| g >= groups) {
            return Err(RuleError::new(
                Field::Pattern,
                format!(
                    "layer {layer} uses group {g}, but groups = {groups}: entries must be in 0..{groups}"
                ),
            ));
        }
        let unused: Vec<String> = (0..groups)
            .filter(|g| !list.contains(g))
            .map(|g| g.to_string())
            .collect();
        if !unused.is_empty() {
            return Err(RuleError::new(
                Field::Pattern,
                format!(
                    "group(s) {} are used by no layer; every group must appear in the list",
                    unused.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

/// A checked schedule: D layers, G groups, every group used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    groups: usize,
    map: Vec<usize>,
}

impl Schedule {
    /// Builds and checks a schedule.
    ///
    /// ```
    /// use spin_rules::{Pattern, Schedule};
    /// let s = Schedule::new(6, 3, &Pattern::CycleRev).unwrap();
    /// assert_eq!(s.as_slice(), &[0, 1, 2, 2, 1, 0]);
    /// assert!(Schedule::new(6, 4, &Pattern::Sequential).is_err());
    /// ```
    pub fn new(depth: usize, groups: usize, pattern: &Pattern) -> Result<Self, RuleError> {
        check(depth, groups, pattern)?;
        let mut map = vec![0; depth];
        fill(&mut map, groups, pattern);
        Ok(Self { groups, map })
    }

    /// Checks an explicit list: its length is the depth, every entry is below `groups`, and every
    /// group is used by some layer.
    pub fn from_list(map: Vec<usize>, groups: usize) -> Result<Self, RuleError> {
        Self::new(map.len(), groups, &Pattern::List(map))
    }

    /// The number of layers.
    pub fn depth(&self) -> usize {
        self.map.len()
    }
    /// The number of parameter groups.
    pub fn groups(&self) -> usize {
        self.groups
    }
    /// The group of every layer.
    pub fn as_slice(&self) -> &[usize] {
        &self.map
    }
    /// The layers that use group `g`, in order: fusion's notion of a group for every pattern.
    pub fn members(&self, g: usize) -> Vec<usize> {
        (0..self.map.len()).filter(|&i| self.map[i] == g).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_their_definitions() {
        let s = |d, g, p: Pattern| Schedule::new(d, g, &p).unwrap().as_slice().to_vec();
        assert_eq!(s(8, 4, Pattern::Sequential), [0, 0, 1, 1, 2, 2, 3, 3]);
        assert_eq!(s(8, 4, Pattern::Strided), [0, 1, 2, 3, 0, 1, 2, 3]);
        assert_eq!(s(6, 3, Pattern::CycleRev), [0, 1, 2, 2, 1, 0]);
        assert_eq!(s(7, 3, Pattern::CycleRev), [0, 1, 2, 0, 2, 1, 0]);
        assert_eq!(s(5, 3, Pattern::Strided), [0, 1, 2, 0, 1]);
        assert_eq!(s(4, 4, Pattern::Sequential), [0, 1, 2, 3]);
        assert_eq!(s(3, 1, Pattern::CycleRev), [0, 0, 0]);
        assert_eq!(s(4, 2, Pattern::List(vec![1, 0, 0, 1])), [1, 0, 0, 1]);
    }

    #[test]
    fn random_is_a_seeded_permutation_of_sequential() {
        let a = Schedule::new(32, 8, &Pattern::Random { seed: 7 }).unwrap();
        let b = Schedule::new(32, 8, &Pattern::Random { seed: 7 }).unwrap();
        let c = Schedule::new(32, 8, &Pattern::Random { seed: 8 }).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mut sorted = a.as_slice().to_vec();
        sorted.sort();
        assert_eq!(
            sorted,
            Schedule::new(32, 8, &Pattern::Sequential).unwrap().as_slice()
        );
        assert_ne!(a.as_slice(), sorted.as_slice());
        // The const form agrees with the runtime form.
        const R: [usize; 32] = make::<32>(8, &Pattern::Random { seed: 7 });
        assert_eq!(&R[..], a.as_slice());
    }

    #[test]
    fn bad_schedules_are_rejected_with_reasons() {
        let err = |r: Result<Schedule, RuleError>| r.unwrap_err();
        let e = err(Schedule::new(4, 5, &Pattern::Strided));
        assert!(e.message.contains("at most depth") && e.field == Field::Groups);
        assert!(err(Schedule::new(6, 4, &Pattern::Sequential))
            .message
            .contains("multiple of groups"));
        let e = err(Schedule::new(3, 2, &Pattern::List(vec![0, 1])));
        assert!(e.message.contains("2 entries") && e.field == Field::Pattern);
        assert!(err(Schedule::new(3, 2, &Pattern::List(vec![0, 1, 2])))
            .message
            .contains("uses group 2"));
        assert!(err(Schedule::new(3, 3, &Pattern::List(vec![0, 1, 1])))
            .message
            .contains("group(s) 2 are used by no layer"));
        assert_eq!(err(Schedule::new(0, 1, &Pattern::Strided)).field, Field::Depth);
        assert_eq!(
            Schedule::new(4, 2, &Pattern::Sequential).unwrap().members(1),
            [2, 3]
        );
    }
}
