//! The per-rank loader: cursor -> global batch -> this rank's slice ->
//! records -> examples, with the next batches' row groups prefetched in the
//! background (bounded by `prefetch_batches`).

use std::sync::Arc;

use crate::builder::{BuildItem, Example, ExampleBuilder};
use crate::cursor::Cursor;
use crate::dataset::Dataset;
use crate::error::Result;
use crate::shard::{balanced_range, ExampleId, GlobalBatcher};

/// Loader settings.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LoaderConfig {
    /// Samples per optimizer step over all ranks.
    pub global_batch: usize,
    /// Shuffle seed.
    pub seed: u64,
    /// Row groups per shuffle block (larger: better mixing, more memory).
    pub block_row_groups: usize,
    /// Global batches whose row groups are fetched ahead (0: none).
    pub prefetch_batches: usize,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        Self {
            global_batch: 32,
            seed: 0,
            block_row_groups: 16,
            prefetch_batches: 2,
        }
    }
}

/// One rank's share of a step.
#[derive(Debug, Clone)]
pub struct RankBatch {
    /// The whole global batch's ids (identical on every rank).
    pub global_ids: Vec<ExampleId>,
    /// This rank's examples (bad rows skipped by policy are absent).
    pub examples: Vec<Example>,
    /// Rows of this rank's slice skipped by policy.
    pub skipped: usize,
}

/// Loads the examples of one rank.
pub struct Loader {
    dataset: Arc<Dataset>,
    batcher: GlobalBatcher,
    builder: Arc<ExampleBuilder>,
    cfg: LoaderConfig,
}

impl Loader {
    /// A loader over `dataset` building examples with `builder`.
    pub fn new(dataset: Arc<Dataset>, builder: Arc<ExampleBuilder>, cfg: LoaderConfig) -> Self {
        let batcher = GlobalBatcher::new(dataset.manifest(), cfg.seed, cfg.block_row_groups);
        Self {
            dataset,
            batcher,
            builder,
            cfg,
        }
    }

    /// A cursor at the start of epoch 0.
    pub fn cursor(&self) -> Cursor {
        self.batcher.cursor()
    }

    /// The batcher.
    pub fn batcher(&self) -> &GlobalBatcher {
        &self.batcher
    }

    /// The builder (its [`crate::SkipStats`] hold the run's skip counts).
    pub fn builder(&self) -> &Arc<ExampleBuilder> {
        &self.builder
    }

    /// The next step for `rank` of `world`, advancing `cursor` by one global
    /// batch. With several ranks, every rank builds the whole global batch and
    /// keeps its [`balanced_range`] by tokens, so each rank's step does about
    /// the same work (the step waits for the slowest rank); the tokenizing is
    /// repeated on every rank, off the training thread.
    pub async fn next(
        &mut self,
        cursor: &mut Cursor,
        rank: usize,
        world: usize,
    ) -> Result<RankBatch> {
        let global_ids = self.batcher.next_batch(cursor, self.cfg.global_batch)?;
        if self.cfg.prefetch_batches > 0 {
            let mut ahead = cursor.clone();
            let mut upcoming = Vec::new();
            for _ in 0..self.cfg.prefetch_batches {
                let b = self.batcher.next_batch(&mut ahead, self.cfg.global_batch)?;
                upcoming.extend(b);
            }
            let ds = self.dataset.clone();
            tokio::spawn(async move {
                // Errors surface when the batch itself is read.
                let _ = ds.read(&upcoming).await;
            });
        }
        let rows = self.dataset.read(&global_ids).await?;
        let seed = self.cfg.seed;
        let items: Vec<BuildItem> = rows
            .into_iter()
            .map(|(id, record)| BuildItem {
                id: id.row,
                seed: id.seed(seed),
                record,
                location: self.dataset.location(&id),
            })
            .collect();
        let builder = self.builder.clone();
        let (examples, taken) = tokio::task::spawn_blocking(move || {
            let mut built = builder.try_build_many(&items);
            let costs: Vec<u64> = built
                .iter()
                .map(|b| b.as_ref().map_or(0, |e| e.tokens.len() as u64))
                .collect();
            let mine = balanced_range(&costs, rank, world);
            built.truncate(mine.end);
            built.drain(..mine.start);
            let n = built.len();
            let mut examples = Vec::with_capacity(n);
            for b in built {
                if let Some(e) = builder.keep(b)? {
                    examples.push(e);
                }
            }
            Ok::<_, crate::DataError>((examples, n))
        })
        .await
        .map_err(|e| crate::DataError::Tokenizer(format!("builder task failed: {e}")))??;
        Ok(RankBatch {
            skipped: taken - examples.len(),
            global_ids,
            examples,
        })
    }
}
