//! Training jobs: what a job is ([`TrainJob`]), its data producer, the one
//! training loop ([`run`]) and the single-process job built on them
//! ([`train`]): a one-rank run with the identity collective and checkpoints
//! in a local directory, so it resumes like a distributed job.

mod producer;
mod run;

pub use producer::{mix_schedule, spawn_producer, Produced, ProducerStart};
pub use run::{run, LoopConfig, LoopHooks, RunOutcome, StepDone, TrainState};

use crate::chaos::Chaos;
use crate::checkpointer::{Checkpointer, LocalCheckpointer};
use crate::collective::Single;
use crate::distill::checkpoint::save;
use crate::distill::examples::{to_distill, ModelTokenizer};
use crate::distill::{Adaptor, DistillConfig, DistillExample, TrainConfig, Trainer};
use crate::error::{ModelError, Result};
use crate::model::Model;
use crate::tokenizer::Tokenizer;
use kvd_data::{BuilderConfig, Cursor, DatasetOptions, ExampleBuilder, RankBatch};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
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
    /// Order each rank's examples of a step by length before cutting them
    /// into micro-batches, so each pads less (the step is the same: its loss
    /// is the token-weighted mean over the whole batch).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bucket_by_length: bool,
    /// Cut each rank's examples of a step (ordered by length) into
    /// micro-batches by a budget of padded positions instead of a fixed
    /// count: many short examples per micro-batch, few long ones, at most
    /// `micro_batch` examples each ([`split_by_tokens`]). The same step;
    /// the budget also bounds a micro-batch's activation memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub micro_batch_tokens: Option<usize>,
    /// Recompute the student encoder's activations in the backward instead
    /// of keeping them ([`crate::distill::Backward::Recompute`]): the same
    /// step in much less memory, for one more encoder forward. A
    /// per-process setting: ranks and resumes may differ in it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub recompute_encoder: bool,
    /// Micro-batches padded to a multiple of this many positions
    /// ([`crate::distill::Trainer::pad_multiple`]; 1: to the longest). A
    /// per-process setting, like `recompute_encoder`.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub pad_multiple: usize,
}

fn one() -> usize {
    1
}

fn is_one(n: &usize) -> bool {
    *n == 1
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
    /// Supervised tokens seen (this process's share: all of them in `train`).
    pub tokens: usize,
    /// Tokens processed, context and suffix (this process's examples).
    #[serde(default)]
    pub total_tokens: usize,
    /// Examples trained on.
    pub examples: usize,
    /// Rows skipped by the bad-row policy, by kind (`none` when none).
    pub skipped: String,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Supervised tokens per second.
    #[serde(default)]
    pub tok_per_s: f64,
    /// Tokens (context and suffix) per second.
    #[serde(default)]
    pub total_tok_per_s: f64,
    /// Final data cursors, one per dataset.
    pub cursors: Vec<Cursor>,
}

impl TrainSummary {
    /// The summary of a run that has not trained yet, at `state`'s step.
    pub fn at_start(state: &TrainState) -> TrainSummary {
        TrainSummary {
            steps: state.step(),
            first_loss: f64::NAN,
            final_loss: f64::NAN,
            tokens: 0,
            total_tokens: 0,
            examples: 0,
            skipped: String::new(),
            seconds: 0.0,
            tok_per_s: 0.0,
            total_tok_per_s: 0.0,
            cursors: state.cursors.clone().unwrap_or_default(),
        }
    }
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

/// A fresh training state: the adaptor initialised from the job's seed (the
/// same on every rank), its optimizer, the data at the start.
pub fn fresh_state(model: &Model, job: &TrainJob) -> Result<TrainState> {
    tch::manual_seed(job.seed as i64);
    let adaptor = Adaptor::new(
        model.config(),
        job.distill.clone(),
        model.device(),
        job.seed as i64,
    )?;
    let trainer = Trainer::new(&adaptor, job.train.clone())?;
    Ok(TrainState {
        adaptor,
        trainer,
        cursors: None,
    })
}

impl TrainJob {
    /// The job as one JSON line for logs, with the object-store credentials
    /// redacted ([`kvd_data::StoreOptions::redacted`]).
    pub fn log_json(&self) -> String {
        let mut j = self.clone();
        j.dataset.store = j.dataset.store.redacted();
        serde_json::to_string(&j).unwrap_or_else(|e| format!("(unprintable job: {e})"))
    }
}

/// Hash of what must agree across the ranks of a job and between a
/// checkpoint and its resume: the job without per-process settings (output
/// path, logging, prefetch, save interval, time limit, builder threads,
/// encoder recomputation).
pub fn job_hash(job: &TrainJob) -> String {
    sha256_hex(&hashed_json(job).unwrap_or_default())
}

/// The JSON that [`job_hash`] digests: the job with its per-process
/// settings cleared.
pub(crate) fn hashed_json(job: &TrainJob) -> Option<String> {
    let mut j = job.clone();
    j.out = PathBuf::new();
    j.log_every = 0;
    j.prefetch = 0;
    j.save_every = 0;
    j.time_limit_s = None;
    j.builder.threads = 0;
    j.recompute_encoder = false;
    j.pad_multiple = 1;
    serde_json::to_string(&j).ok()
}

/// Lower-case hex SHA-256 of `text`.
pub(crate) fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The example builder of a job.
pub fn job_builder(tok: Arc<Tokenizer>, job: &TrainJob) -> Result<Arc<ExampleBuilder>> {
    Ok(Arc::new(ExampleBuilder::new(
        Arc::new(ModelTokenizer(tok)),
        job.builder.clone(),
    )?))
}

/// This rank's examples of a step, split into the job's micro-batches: of at
/// most `micro_batch` examples ([`split_micro_batches`]), and with
/// `micro_batch_tokens` of at most that many padded positions
/// ([`split_by_tokens`]).
pub fn micro_batches(batch: &RankBatch, job: &TrainJob) -> Vec<Vec<DistillExample>> {
    let exs = batch.examples.iter().map(to_distill).collect();
    match job.micro_batch_tokens {
        Some(budget) => split_by_tokens(exs, job.micro_batch, budget),
        None => split_micro_batches(exs, job.micro_batch, job.bucket_by_length),
    }
}

/// `exs` ordered by context + suffix length (stable) and cut greedily into
/// micro-batches of at most `max_examples` examples whose padded positions
/// (examples × (longest context + longest suffix)) stay within `budget`; an
/// example longer than the budget forms a micro-batch of its own.
pub fn split_by_tokens(
    mut exs: Vec<DistillExample>,
    max_examples: usize,
    budget: usize,
) -> Vec<Vec<DistillExample>> {
    exs.sort_by_key(|e| e.context.len() + e.suffix.len());
    let mut out: Vec<Vec<DistillExample>> = Vec::new();
    let (mut ctx, mut suf) = (0, 0);
    for e in exs {
        let (c, s) = (ctx.max(e.context.len()), suf.max(e.suffix.len()));
        match out.last_mut() {
            Some(mb) if mb.len() < max_examples.max(1) && (mb.len() + 1) * (c + s) <= budget => {
                mb.push(e);
                (ctx, suf) = (c, s);
            }
            _ => {
                (ctx, suf) = (e.context.len(), e.suffix.len());
                out.push(vec![e]);
            }
        }
    }
    out
}

/// `exs` cut into micro-batches of at most `size`, in order; with
/// `by_length` ordered first by context + suffix length (stable: ties keep
/// the data order), so each micro-batch holds similar lengths.
pub fn split_micro_batches(
    mut exs: Vec<DistillExample>,
    size: usize,
    by_length: bool,
) -> Vec<Vec<DistillExample>> {
    if by_length {
        exs.sort_by_key(|e| e.context.len() + e.suffix.len());
    }
    exs.chunks(size.max(1)).map(<[_]>::to_vec).collect()
}

/// Context and suffix positions the micro-batches process, each padded to
/// its micro-batch's longest context and longest suffix.
pub fn padded_tokens(micro: &[Vec<DistillExample>]) -> usize {
    micro
        .iter()
        .map(|mb| {
            let ctx = mb.iter().map(|e| e.context.len()).max().unwrap_or(0);
            let suf = mb.iter().map(|e| e.suffix.len()).max().unwrap_or(0);
            mb.len() * (ctx + suf)
        })
        .sum()
}

/// Writes the adaptor to `path` through a temporary file and a rename, so an
/// interrupted write never leaves a half file under the final name.
pub fn save_adaptor_file(
    adaptor: &Adaptor,
    base_model: &str,
    base: &crate::config::ModelConfig,
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
    save(adaptor, base_model, base, step, &tmp)?;
    std::fs::rename(&tmp, path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Where a single-process run keeps its checkpoints, and whether it resumes.
#[derive(Debug, Clone)]
pub struct LocalCheckpoints {
    /// The checkpoint directory.
    pub dir: PathBuf,
    /// Newest checkpoints kept (0: all).
    pub keep_last: usize,
    /// Continue from the newest intact checkpoint in `dir` (a fresh start
    /// when there is none).
    pub resume: bool,
}

impl LocalCheckpoints {
    /// Beside the adaptor (`NAME.ckpt/` for `NAME.safetensors`), the newest
    /// two kept, no resume.
    pub fn beside(out: &Path) -> Self {
        Self {
            dir: crate::checkpointer::default_dir(out),
            keep_last: 2,
            resume: false,
        }
    }
}

/// Why a single-process run stopped early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalStop {
    /// `time_limit_s` passed.
    TimeLimit,
}

/// The hooks of a single-process run: progress, time limit, the adaptor
/// kept on failure.
struct LocalHooks<'a, F> {
    on_step: F,
    started: Instant,
    time_limit_s: Option<f64>,
    failed_out: PathBuf,
    base_model: &'a str,
    model: &'a Model,
}

impl<F: FnMut(usize, f64, f64)> LoopHooks for LocalHooks<'_, F> {
    type Stop = LocalStop;

    fn after_step(
        &mut self,
        _state: &TrainState,
        done: &StepDone<'_>,
    ) -> Result<Option<LocalStop>> {
        (self.on_step)(done.step as usize, done.stats.loss, done.stats.lr);
        let over = self
            .time_limit_s
            .is_some_and(|t| self.started.elapsed().as_secs_f64() > t);
        Ok((over && !done.is_last).then_some(LocalStop::TimeLimit))
    }

    fn checkpoint_on_stop(&self, _stop: &LocalStop) -> bool {
        true
    }

    fn on_failure(&mut self, state: &TrainState, step: u64, error: &ModelError) {
        // Keep the work: the adaptor as of the last completed step.
        let saved = save_adaptor_file(
            &state.adaptor,
            self.base_model,
            self.model.config(),
            state.step() as u64,
            &self.failed_out,
        );
        let note = match saved {
            Ok(()) => format!(
                "the adaptor after step {} is in {}",
                step - 1,
                self.failed_out.display()
            ),
            Err(s) => format!("the adaptor could not be saved: {s}"),
        };
        tracing::error!(step, error = %error, "{note}");
    }
}

/// Runs the job on `model` in this process, checkpointing to `ckpt.dir`
/// every `job.save_every` steps and at the end (each save also rewrites the
/// adaptor at `job.out`); `on_step(step, loss, lr)` is called after every
/// optimizer step (for progress bars). With `ckpt.resume` it continues from
/// the newest intact checkpoint: a run killed and resumed ends with the same
/// adaptor, bit for bit, as one that was never interrupted. `chaos` injects
/// a fault (recovery tests).
pub fn train(
    model: &Model,
    tok: Arc<Tokenizer>,
    job: &TrainJob,
    ckpt: &LocalCheckpoints,
    chaos: Option<&Chaos>,
    on_step: impl FnMut(usize, f64, f64),
) -> Result<(Adaptor, TrainSummary)> {
    validate_job(model, job)?;
    let mut state = fresh_state(model, job)?;
    let mut saver =
        LocalCheckpointer::new(&ckpt.dir, ckpt.keep_last, &job_hash(job), model.config())
            .with_adaptor(&job.out, &job.base_model);
    if ckpt.resume {
        match saver.restore_latest(&mut state)? {
            Some(step) => tracing::info!(step, dir = %ckpt.dir.display(), "resuming"),
            None => tracing::info!(dir = %ckpt.dir.display(), "no checkpoint yet: starting fresh"),
        }
    }
    let builder = job_builder(tok, job)?;
    let stats = builder.stats().clone();
    let start_step = state.step();
    let rx = spawn_producer(
        job,
        builder,
        ProducerStart {
            rank: 0,
            world: 1,
            step: start_step,
            cursors: state.cursors.clone(),
        },
    )?;
    let mut hooks = LocalHooks {
        on_step,
        started: Instant::now(),
        time_limit_s: job.time_limit_s,
        failed_out: job.out.with_extension("failed.safetensors"),
        base_model: &job.base_model,
        model,
    };
    let at = LoopConfig {
        rank: 0,
        world: 1,
        checkpoint_every: job.save_every,
        chaos,
    };
    let outcome = if start_step >= job.train.total_steps {
        tracing::info!(
            step = start_step,
            "the checkpoint is at the final step: nothing to train"
        );
        RunOutcome {
            summary: TrainSummary::at_start(&state),
            stopped: None,
        }
    } else {
        run(
            model,
            job,
            &at,
            &mut state,
            &mut Single,
            &mut saver,
            &rx,
            &mut hooks,
        )?
    };
    if outcome.stopped == Some(LocalStop::TimeLimit) {
        tracing::warn!(
            step = state.step(),
            "time limit reached: stopped (resume with --resume)"
        );
    }
    // The adaptor of the last step (the final checkpoint wrote it already
    // unless nothing was trained in this process).
    save_adaptor_file(
        &state.adaptor,
        &job.base_model,
        model.config(),
        state.step() as u64,
        &job.out,
    )?;
    saver.flush()?;
    let mut summary = outcome.summary;
    summary.skipped = stats.summary();
    Ok((state.adaptor, summary))
}
