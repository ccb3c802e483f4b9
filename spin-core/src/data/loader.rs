//! Batches made on a bounded pool of threads: each worker decodes, augments and mixes whole
//! batches and hands them over through a channel of `prefetch` slots, so at most
//! `workers × (prefetch + 1)` batches exist at once, whatever the data set's size.
use super::augment::{mix_batch, Augment, Mix};
use super::Dataset;
use crate::error::Error;
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::sync::mpsc::sync_channel;

/// One batch: images at the model's size, normalised, NCHW.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    /// The images, NCHW.
    pub images: Vec<f32>,
    /// Their labels (files that did not decode are left out of both).
    pub labels: Vec<usize>,
    /// How the batch was mixed, when mixup or cutmix is on.
    pub mix: Option<Mix>,
}

/// How many threads make batches and how far ahead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loader {
    /// Threads decoding and augmenting (each makes whole batches).
    pub workers: usize,
    /// Finished batches each worker may hold ahead of the consumer.
    pub prefetch: usize,
}

impl Default for Loader {
    /// Up to four workers (fewer on smaller machines), each holding one finished batch while it
    /// makes the next.
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self {
            workers: cores.clamp(1, 4),
            prefetch: 1,
        }
    }
}

/// The RNG of one image or batch: a function of the run seed, the epoch and the position only.
pub(crate) fn rng_for(seed: u64, batch: usize, slot: usize) -> StdRng {
    let mut h = seed ^ 0x5851_F42D_4C95_7F2D;
    for v in [batch as u64, slot as u64] {
        h = (h ^ v).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29);
    }
    StdRng::seed_from_u64(h)
}

impl Loader {
    /// Calls `consume(k, batch)` for the k-th batch of `order` (chunks of `batch`), in order.
    /// With `augment`, images get the training transform and batches may be mixed; random
    /// choices depend only on `seed` and positions, so they do not depend on the thread count.
    /// An error from `consume` or from decoding (strict data) stops the workers and is returned.
    pub fn run(
        &self,
        data: &Dataset,
        order: &[usize],
        batch: usize,
        augment: Option<&Augment>,
        seed: u64,
        consume: &mut dyn FnMut(usize, Batch) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let chunks: Vec<&[usize]> = order.chunks(batch.max(1)).collect();
        let workers = self.workers.clamp(1, chunks.len().max(1));
        std::thread::scope(|scope| {
            let mut slots = Vec::with_capacity(workers);
            for w in 0..workers {
                let (tx, rx) = sync_channel(self.prefetch.max(1));
                slots.push(rx);
                let chunks = &chunks;
                scope.spawn(move || {
                    for k in (w..chunks.len()).step_by(workers) {
                        // A closed channel means the consumer stopped: so does this worker.
                        if tx.send(make_batch(data, chunks[k], augment, seed, k)).is_err() {
                            return;
                        }
                    }
                });
            }
            for k in 0..chunks.len() {
                let made = slots[k % workers]
                    .recv()
                    .map_err(|_| Error::Invalid("a data loader thread stopped unexpectedly".into()))?;
                consume(k, made?)?;
            }
            Ok(())
        })
    }
}

fn make_batch(
    data: &Dataset,
    idx: &[usize],
    augment: Option<&Augment>,
    seed: u64,
    k: usize,
) -> Result<Batch, Error> {
    let per_image = augment.filter(|a| a.per_image());
    let mut out = Batch {
        images: Vec::with_capacity(idx.len() * 3 * data.image() * data.image()),
        labels: Vec::with_capacity(idx.len()),
        mix: None,
    };
    for (slot, &i) in idx.iter().enumerate() {
        let mut rng = rng_for(seed, k, slot);
        if let Some(x) = data.try_item(i, per_image.map(|a| (a, &mut rng)))? {
            out.images.extend(x);
            out.labels.push(data.labels[i]);
        }
    }
    if let Some(aug) = augment {
        let mut rng = rng_for(seed, k, usize::MAX);
        out.mix = mix_batch(&mut out.images, &out.labels, data.image(), aug, &mut rng);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{load, DataConfig, DataSpec};

    #[test]
    fn batches_come_in_order_and_do_not_depend_on_the_thread_count() {
        let split = load(&DataSpec::Digits, &DataConfig::centred(8)).unwrap();
        let order: Vec<usize> = (0..100).rev().collect();
        let aug = Augment {
            rand_ops: 2,
            mixup: 0.2,
            ..Augment::crop_flip(0.5)
        };
        let collect = |workers: usize| {
            let mut got = vec![];
            let loader = Loader { workers, prefetch: 1 };
            loader
                .run(&split.train, &order, 16, Some(&aug), 7, &mut |k, b| {
                    got.push((k, b.labels, b.images, b.mix));
                    Ok(())
                })
                .unwrap();
            got
        };
        let one = collect(1);
        assert_eq!(one.len(), 7);
        assert!(one.iter().enumerate().all(|(i, b)| b.0 == i));
        assert_eq!(
            one[0].1,
            order[..16]
                .iter()
                .map(|&i| split.train.labels[i])
                .collect::<Vec<_>>()
        );
        assert_eq!(one, collect(3));
        // Augmentation changes images: the eval transform's batch differs.
        let (eval, _) = split.train.gather(&order[..16]).unwrap();
        assert_ne!(eval, one[0].2);
    }

    #[test]
    fn a_consumer_error_stops_the_workers() {
        let split = load(&DataSpec::Digits, &DataConfig::centred(8)).unwrap();
        let order: Vec<usize> = (0..split.train.len()).collect();
        let mut seen = 0;
        let err = Loader {
            workers: 2,
            prefetch: 1,
        }
        .run(&split.train, &order, 8, None, 0, &mut |k, _| {
            seen += 1;
            if k == 3 {
                Err(Error::Invalid("stop".into()))
            } else {
                Ok(())
            }
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "stop");
        assert_eq!(seen, 4);
    }
}
