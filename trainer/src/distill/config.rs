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
    /// `log σ(s)`: the sigmoid of the score multiplies the kept entries'
    /// unnormalised attention weights (the KV-Distill paper's form). Unlike the
    /// straight-through feed it changes the forward pass, so inference applies
    /// it too.
    LogSigmoid,
}

impl ScoreFeed {
    /// CLI name: `straight_through`, `direct` or `log_sigmoid`.
    pub fn parse(s: &str) -> Option<ScoreFeed> {
        Some(match s.to_ascii_lowercase().replace('-', "_").as_str() {
            "straight_through" | "st" => ScoreFeed::StraightThrough,
            "direct" => ScoreFeed::Direct,
            "log_sigmoid" | "sigmoid" => ScoreFeed::LogSigmoid,
            _ => return None,
        })
    }

    /// Whether the feed changes the decoder's forward pass (and so must be
    /// applied at inference as well as in training).
    pub fn in_forward(self) -> bool {
        !matches!(self, ScoreFeed::StraightThrough)
    }
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
    /// Rank-stabilised scaling `alpha / sqrt(rank)` instead of `alpha / rank`.
    #[serde(default)]
    pub rslora: bool,
    /// K and V adaptors act at every context position, Q/O (and MLP) ones
    /// only at the kept positions (the paper: dropped tokens can still shape
    /// what the kept ones carry). Off: every adaptor acts at kept positions only.
    #[serde(default)]
    pub kv_all_tokens: bool,
}

impl LoraConfig {
    /// The multiplier of `B A x`.
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            targets: vec![Proj::Q, Proj::O],
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            rslora: false,
            kv_all_tokens: false,
        }
    }
}

/// Elements of one chunk of the KL's `[rows x vocab]` float32 temporaries
/// when [`DistillConfig::kl_chunk_rows`] is 0 (2^24: 64 MiB each, about
/// ten of them at once).
pub const KL_CHUNK_ELEMS: i64 = 1 << 24;

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
    /// Rows of `[tokens x vocab]` processed at once in the KL (memory bound);
    /// 0: as many as fit [`KL_CHUNK_ELEMS`] elements ([`DistillConfig::kl_rows_per_chunk`]).
    pub kl_chunk_rows: i64,
    /// The first this many positions of each span are always kept (attention
    /// sinks), within the span's budget of k positions.
    #[serde(default)]
    pub sinks: usize,
    /// Weight of the selection loss: the cross-entropy between the teacher's
    /// attention from the suffix onto each span position (summed over layers
    /// after the scorer's, heads and suffix queries; normalised over the span)
    /// and the softmax of the scorer's scores over the span. It trains the
    /// scorer on every span position, kept or not, to predict what a
    /// question-aware method would keep. 0 turns it off.
    #[serde(default)]
    pub select_weight: f64,
    /// Weight of the answer's location in the selection loss's target: the
    /// target becomes the teacher's attention (normalised over the span)
    /// plus this times the positions where the answer's text occurs in the
    /// context (normalised too), for examples that know them
    /// ([`super::DistillExample::context_answers`]). The scorer then learns
    /// what questions ask about, beyond where the teacher looked. 0: off.
    #[serde(default)]
    pub select_answer_weight: f64,
    /// Half-width of the span-local average pool applied to the scores
    /// before top-k ([`super::select::span_mean_pool`]) when the adaptor
    /// compresses (inference, evaluation, cache files), so runs of
    /// high-scoring tokens are kept whole; 0 ranks by the raw scores.
    #[serde(default)]
    pub span_pool: usize,
    /// The same pool in the training step's selection (0: raw scores). Kept
    /// apart from [`DistillConfig::span_pool`] so an adaptor trained on raw
    /// scores can compress with the pool, the configuration measured best.
    #[serde(default)]
    pub train_span_pool: usize,
    /// The scorer reads each token's state divided by its root mean square
    /// (a parameter-free RMS norm), so its scores do not scale with the
    /// model's residual stream (Gemma 3's states after layer 6 have an RMS
    /// near 140, SmolLM2's near 4). Off (adaptors written before it): the
    /// raw states.
    #[serde(default)]
    pub scorer_norm: bool,
}

impl DistillConfig {
    /// Rows per chunk of the KL for a vocabulary of `vocab`: `kl_chunk_rows`,
    /// or with 0 as many rows as fit [`KL_CHUNK_ELEMS`] (at least 64). Each
    /// chunk's kernels are dispatched once, so few large chunks cost the host
    /// less than many small ones: 341 rows for SmolLM2's 49,152 tokens.
    pub fn kl_rows_per_chunk(&self, vocab: usize) -> i64 {
        if self.kl_chunk_rows > 0 {
            return self.kl_chunk_rows;
        }
        (KL_CHUNK_ELEMS / vocab.max(1) as i64).max(64)
    }
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
            kl_chunk_rows: 0,
            sinks: 0,
            select_weight: 0.0,
            select_answer_weight: 0.0,
            span_pool: 0,
            train_span_pool: 0,
            scorer_norm: false,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_chunks_fit_the_element_budget_unless_given() {
        let auto = DistillConfig::default();
        assert_eq!(auto.kl_chunk_rows, 0);
        // SmolLM2 (49,152 tokens), Gemma 3 (262,144), and a vocabulary so
        // large that the floor of 64 rows applies.
        assert_eq!(auto.kl_rows_per_chunk(49_152), 341);
        assert_eq!(auto.kl_rows_per_chunk(262_144), 64);
        assert_eq!(auto.kl_rows_per_chunk(4_000_000), 64);
        for vocab in [1usize, 49_152, 262_144] {
            let rows = auto.kl_rows_per_chunk(vocab);
            assert!(rows >= 64 && (rows == 64 || rows * vocab as i64 <= KL_CHUNK_ELEMS));
        }
        let given = DistillConfig {
            kl_chunk_rows: 16,
            ..DistillConfig::default()
        };
        assert_eq!(given.kl_rows_per_chunk(49_152), 16);
    }
}
