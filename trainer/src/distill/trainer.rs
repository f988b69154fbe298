//! The optimizer step: AdamW on the adaptor, warmup + cosine learning rate,
//! gradient clipping and accumulation, and the data-parallel all-reduce.

use super::adamw::{AdamW, AdamWConfig};
use super::adaptor::Adaptor;
use super::step::{
    distill_step, select_step, supervised_positions, Backward, DistillExample, GradScale, StepStats,
};
use super::step_graph::StepGraphs;
use super::DistillConfig;
use crate::collective::DEFAULT_BUCKET_ELEMS;
use crate::collective::{all_reduce_values, Collective, FlatGrads, Single};
use crate::error::{ModelError, Result};
use crate::model::Model;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::time::Instant;
use tch::{Kind, Tensor};

/// Optimiser and schedule settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warmup steps.
    pub warmup_steps: usize,
    /// Total optimizer steps (cosine decays to `min_lr_ratio * lr` at the end).
    pub total_steps: usize,
    /// Final learning rate as a fraction of the peak.
    pub min_lr_ratio: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0: off).
    pub max_grad_norm: f64,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// The first this many optimizer steps train the scorer alone on the
    /// selection loss ([`super::step::select_step`]: the teacher's cost, no
    /// student pass); the LoRA trains from the step after. Needs the
    /// selection loss.
    #[serde(default)]
    pub select_warmup_steps: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            lr: 1e-3,
            warmup_steps: 10,
            total_steps: 1000,
            min_lr_ratio: 0.1,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            grad_accum: 1,
            select_warmup_steps: 0,
        }
    }
}

impl TrainConfig {
    /// Learning rate at optimizer step `step` (0-based).
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let t = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        let cos = 0.5 * (1.0 + (std::f64::consts::PI * t).cos());
        self.lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cos)
    }
}

/// Statistics of one optimizer step.
#[derive(Debug, Clone, Copy)]
pub struct OptStats {
    /// Mean loss over the supervised tokens of the global batch (NaN in a
    /// scorer-only step, [`TrainConfig::select_warmup_steps`]).
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Supervised tokens.
    pub tokens: usize,
    /// Supervised tokens of this rank's own examples.
    pub local_tokens: usize,
    /// Micro-batches over all ranks (0: every row of the step was skipped
    /// and nothing was updated; `loss` is NaN then).
    pub micro_batches: usize,
    /// Seconds of this rank's own forward and backward, the device drained.
    pub compute_s: f64,
    /// Seconds in the gradient all-reduce, waiting for the slowest rank included.
    pub comm_s: f64,
    /// The selection loss, weighted like `loss` (0 when it is off).
    pub select_loss: f64,
}

/// Owns the optimizer over an adaptor's variables.
pub struct Trainer {
    opt: AdamW,
    cfg: TrainConfig,
    step: usize,
    vars: Vec<Tensor>,
    bucket_elems: usize,
    /// The gradients as one flat buffer, made at the first step.
    grads: Option<FlatGrads>,
    /// Captured steps, when CUDA graphs are on.
    graphs: Option<StepGraphs>,
    /// Fault injection: the next step's first micro-batch asks, after its
    /// backward, for an allocation no device can give.
    fail_alloc: bool,
    /// How micro-batches backpropagate ([`Backward::Stored`] or [`Backward::Recompute`]).
    backward: Backward,
    /// Step inputs padded to a multiple of this many positions.
    pad_multiple: usize,
}

impl Trainer {
    /// AdamW over `adaptor`'s variables.
    pub fn new(adaptor: &Adaptor, cfg: TrainConfig) -> Result<Self> {
        if cfg.grad_accum == 0 || cfg.total_steps == 0 {
            return Err(ModelError::Input(
                "grad_accum and total_steps must be positive".into(),
            ));
        }
        if cfg.select_warmup_steps > 0 && adaptor.config().select_weight <= 0.0 {
            return Err(ModelError::Input(
                "scorer-only warm-up steps (--select-warmup-steps) train on the selection loss: \
                 give --select-weight above 0"
                    .into(),
            ));
        }
        let vars: Vec<Tensor> = adaptor
            .named_trainable()
            .into_iter()
            .map(|(_, t)| t)
            .collect();
        let opt = AdamW::new(
            &vars,
            AdamWConfig {
                weight_decay: cfg.weight_decay,
                ..AdamWConfig::default()
            },
        )?;
        Ok(Trainer {
            opt,
            cfg,
            step: 0,
            vars,
            bucket_elems: DEFAULT_BUCKET_ELEMS,
            grads: None,
            graphs: None,
            fail_alloc: false,
            backward: Backward::Stored,
            pad_multiple: 1,
        })
    }

    /// Runs each micro-batch's work after the selection as a CUDA graph,
    /// captured once per batch shape (at most `shapes` kept) on `device`. It
    /// pays off where shapes repeat (fixed-length or bucketed data): a new
    /// shape costs an eager step plus a capture.
    pub fn use_cuda_graphs(&mut self, device: tch::Device, shapes: usize) -> Result<()> {
        self.graphs = Some(StepGraphs::new(device, shapes)?);
        Ok(())
    }

    /// Recomputes the student encoder's activations in the backward instead
    /// of keeping them ([`Backward::Recompute`]): the same gradients in much
    /// less memory, for one more encoder forward per micro-batch.
    pub fn recompute_encoder(&mut self, on: bool) {
        self.backward = if on {
            Backward::Recompute
        } else {
            Backward::Stored
        };
    }

    /// Pads each micro-batch's contexts to a multiple of `m` positions (and
    /// suffixes to one of `min(m, 32)`; [`super::with_pad_multiple`]), so
    /// micro-batches of similar lengths share shapes. 1: to the longest.
    pub fn pad_multiple(&mut self, m: usize) -> Result<()> {
        if m == 0 {
            return Err(ModelError::Input(
                "the pad multiple must be at least 1".into(),
            ));
        }
        self.pad_multiple = m;
        Ok(())
    }

    /// The captured steps, when CUDA graphs are on.
    pub fn cuda_graphs(&self) -> Option<&StepGraphs> {
        self.graphs.as_ref()
    }

    /// Makes the next step's first micro-batch fail with a real allocation
    /// failure after its backward (fault injection for tests of the failure
    /// path: its gradients are then partly accumulated).
    pub fn fail_next_allocation(&mut self) {
        self.fail_alloc = true;
    }

    /// Optimizer steps taken.
    pub fn step(&self) -> usize {
        self.step
    }

    /// The optimizer (its moments go into checkpoints).
    pub fn optimizer(&self) -> &AdamW {
        &self.opt
    }

    /// Restores the optimizer state, the step count and the number of AdamW
    /// updates (fewer than steps when steps were skipped) of a checkpoint.
    pub fn restore(
        &mut self,
        step: usize,
        updates: u64,
        m: Vec<Tensor>,
        v: Vec<Tensor>,
    ) -> Result<()> {
        self.opt.restore(updates, &m, &v)?;
        self.step = step;
        Ok(())
    }

    /// One optimizer step over `micro_batches` in this process alone.
    pub fn train_step(
        &mut self,
        model: &Model,
        adaptor: &Adaptor,
        micro_batches: &[Vec<DistillExample>],
    ) -> Result<OptStats> {
        self.train_step_with(model, adaptor, micro_batches, &mut Single)
    }

    /// One data-parallel optimizer step: this rank's `micro_batches` (possibly
    /// none), gradients of the mean loss over the supervised tokens of all
    /// ranks' micro-batches, summed over the ranks of `coll`, then clipping
    /// and AdamW. Every rank ends with the same adaptor.
    pub fn train_step_with(
        &mut self,
        model: &Model,
        adaptor: &Adaptor,
        micro_batches: &[Vec<DistillExample>],
        coll: &mut dyn Collective,
    ) -> Result<OptStats> {
        if self.grads.is_none() {
            self.grads = Some(FlatGrads::new(&self.vars, 4)?);
        }
        let flat = self.grads.as_ref().expect("made above");
        flat.zero()?;
        // Each micro-batch's KL gradient is weighted by its share of the
        // global batch's supervised tokens, its selection loss's by its share
        // of the examples: the update is the gradient of the means over all
        // of them, however the batch is split into ranks and micro-batches (a
        // mean of per-micro-batch means would weight a token by the size of
        // the micro-batch it landed in).
        let cfg = adaptor.config();
        let counts: Vec<f64> = micro_batches
            .iter()
            .map(|mb| {
                mb.iter()
                    .map(|e| supervised_positions(e, cfg).count() as f64)
                    .sum()
            })
            .collect();
        let counted = Instant::now();
        let local_examples = micro_batches.iter().map(Vec::len).sum::<usize>() as f64;
        let global = all_reduce_values(
            coll,
            &[counts.iter().sum::<f64>(), local_examples],
            model.device(),
        )?;
        let (global_tokens, global_examples) = (global[0], global[1]);
        let mut comm_s = counted.elapsed().as_secs_f64();
        let started = Instant::now();
        let mut local = [micro_batches.len() as f64, 0.0, 0.0, 0.0];
        let mut fail_alloc = std::mem::take(&mut self.fail_alloc);
        let select_only = self.step < self.cfg.select_warmup_steps;
        // A micro-batch that runs out of device memory is run again as two
        // halves (each weighted by its own shares of the tokens and examples,
        // so the update is the same), its partial gradients dropped; one
        // example that does not fit ends the step with an error naming it.
        let mut queue: VecDeque<(&[DistillExample], f64)> = micro_batches
            .iter()
            .zip(&counts)
            .map(|(mb, &count)| (mb.as_slice(), count))
            .collect();
        let scale = |mb: &[DistillExample], count: f64| GradScale {
            kl: count / global_tokens,
            select: mb.len() as f64 / global_examples,
        };
        let work = MicroStep {
            model,
            adaptor,
            cfg,
            backward: self.backward,
            select_only,
            pad_multiple: self.pad_multiple,
        };
        while let Some((mb, count)) = queue.pop_front() {
            let weight = scale(mb, count);
            let shape = || micro_batch_shape(mb);
            let before = if mb.len() > 1 {
                Some(flat.snapshot()?)
            } else {
                None
            };
            let graphs = self.graphs.as_mut();
            let fail = std::mem::take(&mut fail_alloc);
            let r = crate::error::catch_panic(shape, || work.one(mb, weight, graphs, fail));
            let s: StepStats = match (r, before) {
                (Ok(s), _) => s,
                (Err(e), Some(before)) if e.is_out_of_memory() => {
                    tracing::warn!(
                        examples = mb.len(),
                        "out of memory in a micro-batch: running it again in two halves \
                         (a smaller --micro-batch avoids the retry)"
                    );
                    flat.restore(&before)?;
                    let (a, b) = mb.split_at(mb.len() / 2);
                    let first: f64 = a
                        .iter()
                        .map(|e| supervised_positions(e, cfg).count() as f64)
                        .sum();
                    queue.push_front((b, count - first));
                    queue.push_front((a, first));
                    continue;
                }
                (Err(e), _) => return Err(e.with_oom_context(shape, crate::error::TRAIN_OOM_FIX)),
            };
            add_stats(&mut local, &s, weight);
        }
        // The all-reduce needs the gradients anyway; draining here splits the
        // step into own work and waiting for the others.
        crate::device::synchronize(model.device());
        let compute_s = started.elapsed().as_secs_f64();
        let mut timer = super::phases::PhaseTimer::start(model.device());
        let total = flat.all_reduce(&local, coll, self.bucket_elems)?;
        comm_s += started.elapsed().as_secs_f64() - compute_s;
        timer.mark("all_reduce");
        let n = total[0];
        if n < 1.0 || global_tokens < 1.0 {
            // Every row of the global batch was skipped (bad-row policy): the
            // step passes without an update, identically on every rank.
            let lr = self.cfg.lr_at(self.step);
            self.step += 1;
            return Ok(OptStats {
                loss: f64::NAN,
                lr,
                grad_norm: 0.0,
                tokens: 0,
                local_tokens: 0,
                micro_batches: 0,
                compute_s,
                comm_s,
                select_loss: 0.0,
            });
        }
        let mut grads = flat.grads();
        let grad_norm = tch::no_grad(|| -> Result<f64> {
            Ok(grads
                .f_pow_tensor_scalar(2)?
                .f_sum(Kind::Double)?
                .double_value(&[])
                .sqrt())
        })?;
        if !grad_norm.is_finite() {
            return Err(ModelError::Input(format!(
                "non-finite gradient norm {grad_norm} (loss {})",
                total[1]
            )));
        }
        if self.cfg.max_grad_norm > 0.0 && grad_norm > self.cfg.max_grad_norm {
            let c = self.cfg.max_grad_norm / (grad_norm + 1e-6);
            let _ = tch::no_grad(|| grads.f_mul_scalar_(c))?;
        }
        let lr = self.cfg.lr_at(self.step);
        self.opt.step(&grads, lr)?;
        timer.mark("optimizer");
        self.step += 1;
        Ok(OptStats {
            loss: total[1],
            lr,
            grad_norm,
            tokens: total[2].round() as usize,
            local_tokens: local[2] as usize,
            micro_batches: n.round() as usize,
            compute_s,
            comm_s,
            select_loss: total[3],
        })
    }
}

/// `what` of a micro-batch's errors: its examples and longest row.
fn micro_batch_shape(mb: &[DistillExample]) -> String {
    let longest = mb
        .iter()
        .map(|e| e.context.len() + e.suffix.len())
        .max()
        .unwrap_or(0);
    format!(
        "in a micro-batch of {} examples of up to {longest} tokens",
        mb.len()
    )
}

/// Adds a micro-batch's `s`, weighted by its `w`, to a step's local sums
/// (micro-batches, loss, supervised tokens, selection loss).
fn add_stats(local: &mut [f64; 4], s: &StepStats, w: GradScale) {
    local[1] += s.loss * w.kl;
    local[2] += s.tokens as f64;
    local[3] += s.select_loss * w.select;
}

/// What each micro-batch's step of an optimizer step needs.
struct MicroStep<'a> {
    model: &'a Model,
    adaptor: &'a Adaptor,
    cfg: &'a DistillConfig,
    backward: Backward,
    select_only: bool,
    /// [`Trainer::pad_multiple`].
    pad_multiple: usize,
}

impl MicroStep<'_> {
    /// One micro-batch's step (the scorer alone in warm-up steps). With
    /// `fail` (fault injection), an allocation no device can give after its
    /// backward, so the gradients already hold this micro-batch's part.
    fn one(
        &self,
        mb: &[DistillExample],
        weight: GradScale,
        graphs: Option<&mut StepGraphs>,
        fail: bool,
    ) -> Result<StepStats> {
        let (model, adaptor, cfg) = (self.model, self.adaptor, self.cfg);
        let s = super::with_pad_multiple(self.pad_multiple, || {
            if self.select_only {
                select_step(model, adaptor, cfg, mb, weight)
            } else {
                distill_step(model, adaptor, cfg, mb, weight, self.backward, graphs)
            }
        })?;
        if fail {
            // 2^46 float32 elements (256 TiB): refused by any allocator.
            let _ = Tensor::f_empty([1i64 << 46], (Kind::Float, model.device()))?;
        }
        Ok(s)
    }
}
