//! KV-Distill options. Every choice METHOD.md marks as ours is a field here.

use crate::model::Proj;
use serde::{Deserialize, Serialize};

/// How the kept tokens' scores enter the decoder's attention logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScoreFeed {
    /// `s - stopgrad(s)`: zero forward, identity gradient (Nugget's default).
    StraightThrough,
    /// `s` itself (Dodo's form).
    Direct,
}

/// LoRA adaptor settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// Projections that get an adaptor in every layer.
    pub targets: Vec<Proj>,
    /// Rank.
    pub rank: i64,
    /// Scale numerator: the update is `alpha / rank * B A x`.
    pub alpha: f64,
    /// Dropout on the adaptor's input during training.
    pub dropout: f64,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            targets: vec![Proj::Q, Proj::O],
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
        }
    }
}

/// The method's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DistillConfig {
    /// The scorer reads the frozen model's hidden state after this many layers.
    pub scorer_layer: usize,
    /// The adaptor.
    pub lora: LoraConfig,
    /// Weight `a` of forward KL(p_T || p_S); reverse KL gets `1 - a`.
    pub kl_forward_weight: f64,
    /// Softmax temperature of both distributions.
    pub temperature: f64,
    /// Score feed form.
    pub score_feed: ScoreFeed,
    /// Loss only on answer tokens (when the example marks an answer).
    pub answer_only: bool,
    /// Rows of `[tokens x vocab]` processed at once in the KL (memory bound).
    pub kl_chunk_rows: i64,
}

impl Default for DistillConfig {
    fn default() -> Self {
        DistillConfig {
            scorer_layer: 3,
            lora: LoraConfig::default(),
            kl_forward_weight: 0.5,
            temperature: 1.0,
            score_feed: ScoreFeed::StraightThrough,
            answer_only: false,
            kl_chunk_rows: 64,
        }
    }
}

/// `k = max(1, ceil(r * n))` kept tokens of a span of `n` at retention ratio `r`.
pub fn kept_count(n: usize, r: f64) -> usize {
    if n == 0 {
        return 0;
    }
    ((r * n as f64).ceil() as usize).clamp(1, n)
}
