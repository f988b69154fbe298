//! The data producer of a training run: opens the datasets and builds each
//! step's batch on a background thread, `prefetch` steps ahead of the GPU.
//! Several datasets mix by step with integer weights (a fixed schedule, so
//! the sequence never depends on timing).

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

use kvd_data::{Cursor, Dataset, ExampleBuilder, Loader, LoaderConfig, RankBatch};

use super::TrainJob;
use crate::error::{ModelError, Result};

/// Dataset index of every step: smooth weighted round-robin over `weights`.
pub fn mix_schedule(weights: &[u32], steps: usize) -> Vec<usize> {
    let total: i64 = weights.iter().map(|&w| w as i64).sum();
    let mut current = vec![0i64; weights.len()];
    (0..steps)
        .map(|_| {
            for (c, &w) in current.iter_mut().zip(weights) {
                *c += w as i64;
            }
            let best = (0..weights.len())
                .max_by_key(|&i| (current[i], std::cmp::Reverse(i)))
                .unwrap_or(0);
            current[best] -= total;
            best
        })
        .collect()
}

/// A step's examples (this rank's share) and the cursors after it, built on
/// the producer thread.
pub type Produced = std::result::Result<(RankBatch, Vec<Cursor>), ModelError>;

/// Where a producer starts and which share it reads.
#[derive(Debug, Clone)]
pub struct ProducerStart {
    /// This rank.
    pub rank: usize,
    /// Number of ranks.
    pub world: usize,
    /// Steps already taken (the mixing schedule resumes after them).
    pub step: usize,
    /// Cursors to resume from, one per dataset (`None`: the start of epoch 0).
    pub cursors: Option<Vec<Cursor>>,
}

/// Starts the producer: opens the datasets and sends each remaining step's
/// batch for `start.rank`; dropping the receiver stops it.
pub fn spawn_producer(
    job: &TrainJob,
    builder: Arc<ExampleBuilder>,
    start: ProducerStart,
) -> Result<Receiver<Produced>> {
    let (tx, rx) = sync_channel::<Produced>(job.prefetch.max(1));
    let job = job.clone();
    std::thread::Builder::new()
        .name("kvd-data".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(ModelError::Input(format!(
                        "cannot start the data runtime: {e}"
                    ))));
                    return;
                }
            };
            rt.block_on(async move {
                let mut loaders = Vec::new();
                let mut cursors = Vec::new();
                for mix in &job.data {
                    let ds = match Dataset::open(&mix.url, job.dataset.clone()).await {
                        Ok(d) => Arc::new(d),
                        Err(e) => {
                            let _ = tx.send(Err(ModelError::Data(e)));
                            return;
                        }
                    };
                    let loader = Loader::new(
                        ds,
                        builder.clone(),
                        LoaderConfig {
                            global_batch: job.global_batch,
                            seed: job.seed,
                            ..LoaderConfig::default()
                        },
                    );
                    cursors.push(loader.cursor());
                    loaders.push(loader);
                }
                if let Some(saved) = start.cursors {
                    if saved.len() != cursors.len() {
                        let _ = tx.send(Err(ModelError::Input(format!(
                            "the checkpoint has {} data cursors for {} datasets",
                            saved.len(),
                            cursors.len()
                        ))));
                        return;
                    }
                    for (i, (c, fresh)) in saved.iter().zip(&cursors).enumerate() {
                        if c.manifest_hash != fresh.manifest_hash || c.seed != fresh.seed {
                            let _ = tx.send(Err(ModelError::Input(format!(
                                "the checkpoint's cursor of dataset {} ({}) is for another \
                                 dataset manifest or seed",
                                i, job.data[i].url
                            ))));
                            return;
                        }
                    }
                    cursors = saved;
                }
                let weights: Vec<u32> = job.data.iter().map(|m| m.weight).collect();
                let schedule = mix_schedule(&weights, job.train.total_steps);
                for &d in schedule.iter().skip(start.step) {
                    let batch = loaders[d]
                        .next(&mut cursors[d], start.rank, start.world)
                        .await;
                    let msg = batch
                        .map(|b| (b, cursors.clone()))
                        .map_err(ModelError::Data);
                    let failed = msg.is_err();
                    if tx.send(msg).is_err() || failed {
                        return;
                    }
                }
            });
        })
        .map_err(|e| ModelError::Input(format!("cannot start the data thread: {e}")))?;
    Ok(rx)
}
