//! Drawing calibration images from a data set.
use super::Dataset;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

impl Dataset {
    /// `n` images (all, if fewer) drawn evenly across classes — each class's images in a seeded
    /// random order, taken in turn class by class — for calibration sets that should not favour
    /// whichever classes come first in the files.
    pub fn stratified(&self, n: usize, seed: u64) -> Vec<usize> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); self.classes.max(1)];
        for (i, &l) in self.labels.iter().enumerate() {
            by_class[l.min(self.classes.max(1) - 1)].push(i);
        }
        by_class.iter_mut().for_each(|c| c.shuffle(&mut rng));
        let mut out = Vec::with_capacity(n.min(self.len()));
        for k in 0.. {
            if out.len() >= n.min(self.len()) {
                break;
            }
            for c in &by_class {
                if let Some(&i) = c.get(k) {
                    if out.len() < n {
                        out.push(i);
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use crate::data::{load, DataConfig, DataSpec};

    #[test]
    fn a_stratified_draw_takes_every_class_evenly() {
        let s = load(&DataSpec::Digits, &DataConfig::centred(8)).unwrap();
        // 50 images: 5 of each of the 10 digits, no image twice.
        let pick = s.train.stratified(50, 3);
        let mut per_class = [0; 10];
        pick.iter().for_each(|&i| per_class[s.train.labels[i]] += 1);
        assert_eq!(per_class, [5; 10]);
        let mut unique = pick.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), 50);
        // More than there are: all of them.
        assert_eq!(s.train.stratified(usize::MAX, 0).len(), s.train.len());
    }
}
