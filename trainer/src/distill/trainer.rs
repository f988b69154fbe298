//! Single-process training loop pieces: AdamW on the adaptor, warmup + cosine
//! learning rate, gradient clipping and accumulation.

use super::adaptor::Adaptor;
use super::step::{distill_step, DistillExample, StepStats};
use crate::error::{ModelError, Result};
use crate::model::Model;
use serde::{Deserialize, Serialize};
use tch::nn::{self, OptimizerConfig};
use tch::Kind;

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
    /// Mean loss over the micro-batches.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Supervised tokens.
    pub tokens: usize,
}

/// Owns the optimizer over an adaptor's variables.
pub struct Trainer {
    opt: nn::Optimizer,
    cfg: TrainConfig,
    step: usize,
}

impl Trainer {
    /// AdamW over `adaptor`'s variables.
    pub fn new(adaptor: &Adaptor, cfg: TrainConfig) -> Result<Self> {
        if cfg.grad_accum == 0 || cfg.total_steps == 0 {
            return Err(ModelError::Input(
                "grad_accum and total_steps must be positive".into(),
            ));
        }
        let opt = nn::AdamW {
            wd: cfg.weight_decay,
            ..Default::default()
        }
        .build(&adaptor.vs, cfg.lr)?;
        Ok(Trainer { opt, cfg, step: 0 })
    }

    /// Optimizer steps taken.
    pub fn step(&self) -> usize {
        self.step
    }

    /// One optimizer step over `micro_batches` (gradient accumulation over them).
    pub fn train_step(
        &mut self,
        model: &Model,
        adaptor: &Adaptor,
        micro_batches: &[Vec<DistillExample>],
    ) -> Result<OptStats> {
        if micro_batches.is_empty() {
            return Err(ModelError::Input("no micro-batches".into()));
        }
        self.opt.zero_grad();
        let scale = 1.0 / micro_batches.len() as f64;
        let mut stats: Vec<StepStats> = Vec::with_capacity(micro_batches.len());
        for mb in micro_batches {
            stats.push(distill_step(
                model,
                adaptor,
                adaptor.config(),
                mb,
                scale,
                true,
            )?);
        }
        let grad_norm = tch::no_grad(|| {
            let sq: f64 = adaptor
                .trainable()
                .iter()
                .map(|v| v.grad())
                .filter(|g| g.defined())
                .map(|g| g.pow_tensor_scalar(2).sum(Kind::Double).double_value(&[]))
                .sum();
            sq.sqrt()
        });
        if !grad_norm.is_finite() {
            return Err(ModelError::Input(format!(
                "non-finite gradient norm {grad_norm}"
            )));
        }
        if self.cfg.max_grad_norm > 0.0 && grad_norm > self.cfg.max_grad_norm {
            let c = self.cfg.max_grad_norm / (grad_norm + 1e-6);
            tch::no_grad(|| {
                for v in adaptor.trainable() {
                    let mut g = v.grad();
                    if g.defined() {
                        let _ = g.f_mul_(&tch::Tensor::from(c));
                    }
                }
            });
        }
        let lr = self.cfg.lr_at(self.step);
        self.opt.set_lr(lr);
        self.opt.step();
        self.step += 1;
        Ok(OptStats {
            loss: stats.iter().map(|s| s.loss).sum::<f64>() * scale,
            lr,
            grad_norm,
            tokens: stats.iter().map(|s| s.tokens).sum(),
        })
    }
}
