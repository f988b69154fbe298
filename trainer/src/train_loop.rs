//! The single-process training job: Parquet datasets (any object store) ->
//! example builder -> distillation steps -> adaptor checkpoint. Batches are
//! built on a background thread, `prefetch` steps ahead of the GPU. Several
//! datasets mix by step with integer weights (a fixed, seeded-free schedule, so
//! the sequence never depends on timing).

use crate::distill::checkpoint::save;
use crate::distill::examples::{to_distill, ModelTokenizer};
use crate::distill::{Adaptor, DistillConfig, DistillExample, TrainConfig, Trainer};
use crate::error::{ModelError, Result};
use crate::model::Model;
use crate::tokenizer::Tokenizer;
use kvd_data::{
    BuilderConfig, Cursor, Dataset, DatasetOptions, ExampleBuilder, Loader, LoaderConfig,
    RankBatch, SkipStats,
};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::time::Instant;

/// One training dataset and its share of the steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataMix {
    /// Dataset URL (`file://`, `s3://`, `gs://`, `az://`, or a path).
    pub url: String,
    /// Steps taken from this dataset per cycle of the schedule (>= 1).
    pub weight: u32,
}

/// Everything a training run needs besides the model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainJob {
    /// Datasets and weights.
    pub data: Vec<DataMix>,
    /// Object-store options and verification for every dataset.
    pub dataset: DatasetOptions,
    /// Example builder (window, ratios, templates, bad-row policy).
    pub builder: BuilderConfig,
    /// Method settings.
    pub distill: DistillConfig,
    /// Optimizer and schedule; `total_steps` is the run length.
    pub train: TrainConfig,
    /// Examples per optimizer step.
    pub global_batch: usize,
    /// Examples per forward/backward (gradient accumulation over the rest).
    pub micro_batch: usize,
    /// Data order and initialisation seed.
    pub seed: u64,
    /// Steps whose batches are built ahead.
    pub prefetch: usize,
    /// Where the adaptor goes.
    pub out: PathBuf,
    /// Also write the adaptor every this many steps (0: only at the end).
    pub save_every: usize,
    /// Log a line every this many steps.
    pub log_every: usize,
    /// Base model label recorded in the adaptor.
    pub base_model: String,
    /// Stop (and save) after this many seconds even if steps remain.
    #[serde(default)]
    pub time_limit_s: Option<f64>,
}

/// What a run did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainSummary {
    /// Optimizer steps.
    pub steps: usize,
    /// Loss of the first step.
    pub first_loss: f64,
    /// Mean loss of the last `log_every` steps.
    pub final_loss: f64,
    /// Supervised tokens seen.
    pub tokens: usize,
    /// Examples trained on.
    pub examples: usize,
    /// Rows skipped by the bad-row policy, by kind (`none` when none).
    pub skipped: String,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Final data cursors, one per dataset.
    pub cursors: Vec<Cursor>,
}

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
pub type Produced = std::result::Result<(RankBatch, Vec<Cursor>), String>;

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
                    let _ = tx.send(Err(format!("cannot start the data runtime: {e}")));
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
                            let _ = tx.send(Err(e.to_string()));
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
                        let _ = tx.send(Err(format!(
                            "the checkpoint has {} data cursors for {} datasets",
                            saved.len(),
                            cursors.len()
                        )));
                        return;
                    }
                    for (i, (c, fresh)) in saved.iter().zip(&cursors).enumerate() {
                        if c.manifest_hash != fresh.manifest_hash || c.seed != fresh.seed {
                            let _ = tx.send(Err(format!(
                                "the checkpoint's cursor of dataset {} ({}) is for another \
                                 dataset manifest or seed",
                                i, job.data[i].url
                            )));
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
                        .map_err(|e| e.to_string());
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

/// Checks a job's shape against the model before anything runs.
pub fn validate_job(model: &Model, job: &TrainJob) -> Result<()> {
    if job.data.is_empty() || job.data.iter().any(|m| m.weight == 0) {
        return Err(ModelError::Input(
            "training needs at least one dataset, each with weight >= 1".into(),
        ));
    }
    if job.global_batch == 0 || job.micro_batch == 0 {
        return Err(ModelError::Input(
            "global_batch and micro_batch must be positive".into(),
        ));
    }
    if job.distill.scorer_layer > model.config().num_layers {
        return Err(ModelError::Input(format!(
            "scorer_layer {} exceeds the model's {} layers",
            job.distill.scorer_layer,
            model.config().num_layers
        )));
    }
    Ok(())
}

/// A fresh adaptor and its optimizer, initialised from the job's seed (the
/// same on every rank).
pub fn fresh_state(model: &Model, job: &TrainJob) -> Result<(Adaptor, Trainer)> {
    tch::manual_seed(job.seed as i64);
    let adaptor = Adaptor::new(
        model.config(),
        job.distill.clone(),
        model.device(),
        job.seed as i64,
    )?;
    let trainer = Trainer::new(&adaptor, job.train.clone())?;
    Ok((adaptor, trainer))
}

/// The example builder of a job.
pub fn job_builder(tok: Arc<Tokenizer>, job: &TrainJob) -> Result<Arc<ExampleBuilder>> {
    Ok(Arc::new(ExampleBuilder::new(
        Arc::new(ModelTokenizer(tok)),
        job.builder.clone(),
    )?))
}

/// This rank's examples of a step, split into micro-batches.
pub fn micro_batches(batch: &RankBatch, micro_batch: usize) -> Vec<Vec<DistillExample>> {
    let exs: Vec<DistillExample> = batch.examples.iter().map(to_distill).collect();
    exs.chunks(micro_batch.max(1)).map(<[_]>::to_vec).collect()
}

/// Writes the adaptor to `path` through a temporary file and a rename, so an
/// interrupted write never leaves a half file under the final name.
pub fn save_atomic(
    adaptor: &Adaptor,
    base_model: &str,
    model: &Model,
    step: u64,
    path: &Path,
) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| ModelError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    let tmp = path.with_extension("safetensors.tmp");
    save(adaptor, base_model, model.config(), step, &tmp)?;
    std::fs::rename(&tmp, path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Runs the job on `model`; `on_step(step, loss, lr)` is called after every
/// optimizer step (for progress bars).
pub fn train(
    model: &Model,
    tok: Arc<Tokenizer>,
    job: &TrainJob,
    mut on_step: impl FnMut(usize, f64, f64),
) -> Result<(Adaptor, TrainSummary)> {
    validate_job(model, job)?;
    let (adaptor, mut trainer) = fresh_state(model, job)?;
    let builder = job_builder(tok, job)?;
    let stats: SkipStats = builder.stats().clone();
    let rx = spawn_producer(
        job,
        builder,
        ProducerStart {
            rank: 0,
            world: 1,
            step: 0,
            cursors: None,
        },
    )?;
    let start = Instant::now();
    let (mut first_loss, mut recent) = (f64::NAN, Vec::new());
    let (mut tokens, mut examples) = (0usize, 0usize);
    let mut cursors = Vec::new();
    for step in 0..job.train.total_steps {
        let (batch, cur) = rx
            .recv()
            .map_err(|_| ModelError::Input("the data thread stopped".into()))?
            .map_err(ModelError::Input)?;
        cursors = cur;
        let micro = micro_batches(&batch, job.micro_batch);
        let n_examples: usize = micro.iter().map(Vec::len).sum();
        let s = match trainer.train_step(model, &adaptor, &micro) {
            Ok(s) => s,
            Err(e) => {
                // Keep the work: the adaptor as of the last completed step.
                let kept = job.out.with_extension("failed.safetensors");
                let saved = save_atomic(
                    &adaptor,
                    &job.base_model,
                    model,
                    trainer.step() as u64,
                    &kept,
                );
                let note = match saved {
                    Ok(()) => format!("the adaptor after step {step} is in {}", kept.display()),
                    Err(s) => format!("the adaptor could not be saved: {s}"),
                };
                tracing::error!(step = step + 1, error = %e, "{note}");
                return Err(if e.is_out_of_memory() {
                    e
                } else {
                    let ids: Vec<u64> = batch.examples.iter().map(|e| e.id).collect();
                    ModelError::Input(format!("step {step} (rows {ids:?}): {e}"))
                });
            }
        };
        if s.micro_batches == 0 {
            tracing::warn!(
                step = step + 1,
                "every row of this step was skipped: no update"
            );
        } else {
            if first_loss.is_nan() {
                first_loss = s.loss;
            }
            recent.push(s.loss);
            if recent.len() > job.log_every.max(1) {
                recent.remove(0);
            }
        }
        tokens += s.tokens;
        examples += n_examples;
        on_step(step + 1, s.loss, s.lr);
        if job.log_every > 0 && (step + 1) % job.log_every == 0 {
            tracing::info!(
                step = step + 1,
                loss = s.loss,
                select_loss = s.select_loss,
                lr = s.lr,
                grad_norm = s.grad_norm,
                tokens,
                tok_per_s = tokens as f64 / start.elapsed().as_secs_f64(),
                "train"
            );
        }
        if job.save_every > 0 && (step + 1) % job.save_every == 0 {
            save_atomic(
                &adaptor,
                &job.base_model,
                model,
                (step + 1) as u64,
                &job.out,
            )?;
        }
        if job
            .time_limit_s
            .is_some_and(|t| start.elapsed().as_secs_f64() > t)
        {
            tracing::warn!(step = step + 1, "time limit reached: stopping early");
            break;
        }
    }
    save_atomic(
        &adaptor,
        &job.base_model,
        model,
        trainer.step() as u64,
        &job.out,
    )?;
    let summary = TrainSummary {
        steps: trainer.step(),
        first_loss,
        final_loss: recent.iter().sum::<f64>() / recent.len().max(1) as f64,
        tokens,
        examples,
        skipped: stats.summary(),
        seconds: start.elapsed().as_secs_f64(),
        cursors,
    };
    Ok((adaptor, summary))
}
