//! The one training loop of `train` and `worker`: batches from the producer,
//! a distillation step through a [`Collective`], the step log, checkpoints
//! through a [`Checkpointer`]; what differs between a single process and a
//! worker under the coordinator (progress bars, step reports, orders, time
//! limits) comes in through [`LoopHooks`].

use std::sync::mpsc::Receiver;
use std::time::Instant;

use kvd_data::{Cursor, RankBatch};

use super::{micro_batches, Produced, TrainJob, TrainSummary};
use crate::chaos::{Chaos, Phase};
use crate::checkpointer::Checkpointer;
use crate::collective::Collective;
use crate::distill::{Adaptor, OptStats, Trainer};
use crate::error::{ModelError, Result};
use crate::model::Model;

/// Everything a run changes: the adaptor, its optimizer (with the step
/// count) and where the data continues. A checkpoint holds exactly this.
pub struct TrainState {
    /// The trainable adaptor.
    pub adaptor: Adaptor,
    /// AdamW over the adaptor, with the optimizer step.
    pub trainer: Trainer,
    /// Data cursors after the last step, one per dataset (`None`: the start).
    pub cursors: Option<Vec<Cursor>>,
}

impl TrainState {
    /// Optimizer steps taken.
    pub fn step(&self) -> usize {
        self.trainer.step()
    }
}

/// One finished step, as the hooks see it.
pub struct StepDone<'a> {
    /// Steps done, this one included (1-based).
    pub step: u64,
    /// Whether it was the job's final step.
    pub is_last: bool,
    /// What the step computed.
    pub stats: &'a OptStats,
    /// This rank's examples of the step.
    pub batch: &'a RankBatch,
    /// Seconds of the step (after its data arrived).
    pub seconds: f64,
}

/// What differs between the callers of [`run`].
pub trait LoopHooks {
    /// Why a run stopped before the end.
    type Stop;
    /// Before step `step` (1-based) is taken: `Some` stops the run there.
    fn before_step(&mut self, _step: u64) -> Option<Self::Stop> {
        None
    }
    /// After a step and its checkpoint: `Some` stops the run.
    fn after_step(&mut self, state: &TrainState, done: &StepDone<'_>)
        -> Result<Option<Self::Stop>>;
    /// Whether stopping for `stop` takes a checkpoint first (a time limit
    /// does, so a resume continues exactly there; a coordinator's order does not).
    fn checkpoint_on_stop(&self, _stop: &Self::Stop) -> bool {
        false
    }
    /// A step failed with `error`; the state is as of the last completed step.
    fn on_failure(&mut self, _state: &TrainState, _step: u64, _error: &ModelError) {}
    /// Seconds of the previous step's report to the coordinator (logged).
    fn report_s(&self) -> f64 {
        0.0
    }
}

/// Where this process stands in the job.
pub struct LoopConfig<'a> {
    /// This rank.
    pub rank: usize,
    /// Number of ranks.
    pub world: usize,
    /// Checkpoint every this many steps (0: only the final step).
    pub checkpoint_every: usize,
    /// Planned fault (tests of recovery).
    pub chaos: Option<&'a Chaos>,
}

/// How a run ended.
pub struct RunOutcome<S> {
    /// What the run did (this process's share).
    pub summary: TrainSummary,
    /// `Some` when a hook stopped it before the final step.
    pub stopped: Option<S>,
}

/// Trains `state` from its step to the job's final step on the batches of
/// `batches` (made by [`super::spawn_producer`] from the state's step and
/// cursors), checkpointing through `ckpt`.
#[allow(clippy::too_many_arguments)]
pub fn run<H: LoopHooks>(
    model: &Model,
    job: &TrainJob,
    at: &LoopConfig<'_>,
    state: &mut TrainState,
    coll: &mut dyn Collective,
    ckpt: &mut dyn Checkpointer,
    batches: &Receiver<Produced>,
    hooks: &mut H,
) -> Result<RunOutcome<H::Stop>> {
    let start = Instant::now();
    state.trainer.recompute_encoder(job.recompute_encoder);
    state.trainer.pad_multiple(job.pad_multiple)?;
    let total = job.train.total_steps;
    let mut summary = TrainSummary::at_start(state);
    let mut recent: Vec<f64> = Vec::new();
    let mut saved_at = None;
    let mut stopped = None;
    for step in state.step()..total {
        let done = (step + 1) as u64;
        if let Some(s) = hooks.before_step(done) {
            stopped = Some(s);
            break;
        }
        let waited = Instant::now();
        let (batch, cursors_after) = batches
            .recv()
            .map_err(|_| ModelError::Input("the data thread stopped".into()))??;
        let data_s = waited.elapsed().as_secs_f64();
        let t0 = Instant::now();
        if job.distill.lora.dropout > 0.0 {
            // Dropout masks from (seed, step, rank) alone, so a resumed run
            // draws the same ones.
            tch::manual_seed((job.seed ^ (done << 20) ^ at.rank as u64) as i64);
        }
        let micro = micro_batches(&batch, job);
        if let Some(ch) = at.chaos {
            ch.maybe_kill(at.rank, done, Phase::Step);
            if ch.fails_alloc(at.rank, done) {
                state.trainer.fail_next_allocation();
            }
        }
        let s = match state
            .trainer
            .train_step_with(model, &state.adaptor, &micro, coll)
        {
            Ok(s) => s,
            Err(e) => {
                hooks.on_failure(state, done, &e);
                return Err(match e {
                    ModelError::Collective(_) => e,
                    e if e.is_out_of_memory() => e,
                    e => {
                        let ids: Vec<u64> = batch.examples.iter().map(|e| e.id).collect();
                        ModelError::Input(format!("step {done} (rows {ids:?}): {e}"))
                    }
                });
            }
        };
        let seconds = t0.elapsed().as_secs_f64();
        summary.tokens += s.tokens;
        summary.total_tokens += micro
            .iter()
            .flatten()
            .map(|e| e.context.len() + e.suffix.len())
            .sum::<usize>();
        summary.examples += micro.iter().map(Vec::len).sum::<usize>();
        summary.steps = done as usize;
        summary.cursors = cursors_after.clone();
        state.cursors = Some(cursors_after);
        if s.micro_batches == 0 {
            tracing::warn!(
                rank = at.rank,
                step = done,
                "every row of this step was skipped: no update"
            );
        } else {
            // Scorer-only warm-up steps have no KL (NaN): the summary's losses
            // are the full steps'.
            if s.loss.is_finite() {
                if summary.first_loss.is_nan() {
                    summary.first_loss = s.loss;
                }
                recent.push(s.loss);
                if recent.len() > job.log_every.max(1) {
                    recent.remove(0);
                }
            }
            if job.log_every > 0 && done.is_multiple_of(job.log_every as u64) {
                tracing::info!(
                    rank = at.rank,
                    step = done,
                    loss = s.loss,
                    select_loss = s.select_loss,
                    lr = s.lr,
                    grad_norm = s.grad_norm,
                    tokens = s.tokens,
                    tok_per_s = summary.tokens as f64 / start.elapsed().as_secs_f64(),
                    total_tok_per_s = summary.total_tokens as f64 / start.elapsed().as_secs_f64(),
                    seconds,
                    data_s,
                    compute_s = s.compute_s,
                    comm_s = s.comm_s,
                    report_s = hooks.report_s(),
                    "step"
                );
                if crate::distill::phases::enabled() {
                    // Mean seconds per step of each phase since the last log line.
                    let per_step: std::collections::BTreeMap<&str, f64> =
                        crate::distill::phases::take()
                            .into_iter()
                            .map(|(k, v)| (k, v / job.log_every as f64))
                            .collect();
                    tracing::info!(
                        rank = at.rank,
                        step = done,
                        phases_s = %serde_json::json!(per_step),
                        "step phases"
                    );
                }
            }
        }
        let is_last = done == total as u64;
        if is_last || (at.checkpoint_every > 0 && done.is_multiple_of(at.checkpoint_every as u64)) {
            ckpt.save(state, done)?;
            if is_last {
                ckpt.flush()?;
            }
            saved_at = Some(done);
        }
        let info = StepDone {
            step: done,
            is_last,
            stats: &s,
            batch: &batch,
            seconds,
        };
        if let Some(stop) = hooks.after_step(state, &info)? {
            if hooks.checkpoint_on_stop(&stop) && saved_at != Some(done) {
                ckpt.save(state, done)?;
            }
            stopped = Some(stop);
            break;
        }
    }
    ckpt.flush()?;
    // NaN (null in the summary) when no step had a KL (all scorer-only).
    summary.final_loss = if recent.is_empty() {
        f64::NAN
    } else {
        recent.iter().sum::<f64>() / recent.len() as f64
    };
    summary.seconds = start.elapsed().as_secs_f64();
    summary.tok_per_s = summary.tokens as f64 / summary.seconds.max(1e-9);
    summary.total_tok_per_s = summary.total_tokens as f64 / summary.seconds.max(1e-9);
    Ok(RunOutcome { summary, stopped })
}
