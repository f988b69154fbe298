//! Points where a caller can change a forward pass without copying the model:
//! extra terms on projections (LoRA), an additive attention bias on keys (the
//! KV-Distill score feed), and observing hidden states between layers,
//! queries, keys and values, and attention probabilities.

use crate::error::Result;
use serde::{Deserialize, Serialize};
use tch::Tensor;

/// The projections of a decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Proj {
    /// Attention query.
    Q,
    /// Attention key.
    K,
    /// Attention value.
    V,
    /// Attention output.
    O,
    /// MLP gate.
    Gate,
    /// MLP up.
    Up,
    /// MLP down.
    Down,
}

impl Proj {
    /// All projections, in layer order.
    pub const ALL: [Proj; 7] = [
        Proj::Q,
        Proj::K,
        Proj::V,
        Proj::O,
        Proj::Gate,
        Proj::Up,
        Proj::Down,
    ];

    /// HF-style short name (`q_proj`, ..., `down_proj`).
    pub fn name(self) -> &'static str {
        match self {
            Proj::Q => "q_proj",
            Proj::K => "k_proj",
            Proj::V => "v_proj",
            Proj::O => "o_proj",
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        }
    }

    /// Parses `q`, `q_proj`, ... (case-insensitive).
    pub fn parse(s: &str) -> Option<Proj> {
        let s = s.to_ascii_lowercase();
        let s = s.strip_suffix("_proj").unwrap_or(&s);
        Some(match s {
            "q" => Proj::Q,
            "k" => Proj::K,
            "v" => Proj::V,
            "o" => Proj::O,
            "gate" => Proj::Gate,
            "up" => Proj::Up,
            "down" => Proj::Down,
            _ => return None,
        })
    }
}

/// Caller-supplied changes to a forward pass. Every method defaults to "no change".
pub trait Hooks {
    /// The output of projection `proj` of layer `layer` for its input `x`,
    /// given the plain projection `y` (e.g. `y` plus a LoRA term).
    fn adjust_linear(&self, _layer: usize, _proj: Proj, _x: &Tensor, y: Tensor) -> Tensor {
        y
    }

    /// An additive bias `[batch, keys]` on layer `layer`'s attention logits, one value
    /// per key (cached keys first, then this call's). Forces the explicit attention path.
    fn attn_bias(&self, _layer: usize) -> Option<Tensor> {
        None
    }

    /// Called with the hidden state after layer `layer` (0-based).
    fn after_layer(&self, _layer: usize, _hidden: &Tensor) {}

    /// Receives layer `layer`'s queries `q` `[batch, heads, seq, head_dim]`
    /// before RoPE (after the QK-norm where the family has one), and this
    /// call's keys `k` (after RoPE) and values `v` `[batch, kv_heads, seq,
    /// head_dim]` as they enter the cache (not the previously cached ones), in
    /// the model's kind. The layer's output does not depend on it. Not called
    /// for the last layer of [`crate::model::Model::fill_cache`], which
    /// computes no queries.
    fn observe_qkv(&self, _layer: usize, _q: &Tensor, _k: &Tensor, _v: &Tensor) -> Result<()> {
        Ok(())
    }

    /// Whether [`Hooks::observe_attention`] wants layer `layer`'s attention
    /// probabilities. When false (the default) they are never computed.
    fn wants_attention(&self, _layer: usize) -> bool {
        false
    }

    /// The query positions `[batch, n]` (int64) whose attention probabilities
    /// [`Hooks::observe_attention`] wants at layer `layer`, when it wants only
    /// some: the probabilities are then computed for these rows alone, and
    /// `q_start` indexes into them. `None` (the default): every query, in order.
    fn attention_rows(&self, _layer: usize) -> Option<Tensor> {
        None
    }

    /// Receives layer `layer`'s attention probabilities for this call's queries
    /// `q_start .. q_start + q` (of [`Hooks::attention_rows`] when it names
    /// them): `[batch, heads, q, keys]` float32, keys as for
    /// [`Hooks::attn_bias`] (cached first, then this call's). They are the real
    /// attention's (same mask, scale and bias; masked keys exactly 0), delivered in
    /// query chunks in order; the layer's output does not depend on them.
    fn observe_attention(&self, _layer: usize, _q_start: i64, _probs: &Tensor) -> Result<()> {
        Ok(())
    }
}

/// A fixed additive bias `[batch, keys]` on every layer's attention logits
/// (the KV-Distill score feed on a compressed cache's kept entries).
#[derive(Debug)]
pub struct KeyBias(pub Tensor);

impl Hooks for KeyBias {
    fn attn_bias(&self, _layer: usize) -> Option<Tensor> {
        Some(self.0.shallow_clone())
    }
}

/// No hooks: the plain model.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHooks;

impl Hooks for NoHooks {}

/// Keeps the hidden states after the first `layers` layers of a forward
/// (what [`crate::model::Model::layer_states`] returns), so one pass that
/// also fills a cache serves both.
#[derive(Debug)]
pub struct StatesAfter {
    layers: usize,
    states: std::cell::RefCell<Option<Tensor>>,
}

impl StatesAfter {
    /// Watches for the states after `layers` layers (at least 1).
    pub fn new(layers: usize) -> Self {
        StatesAfter {
            layers,
            states: std::cell::RefCell::new(None),
        }
    }

    /// The states seen, if the forward ran that far and past it (a forward
    /// that fills a cache skips the last layer's output, so `layers` equal
    /// to the model's depth gives `None`).
    pub fn take(&self) -> Option<Tensor> {
        self.states.borrow_mut().take()
    }
}

impl Hooks for StatesAfter {
    fn after_layer(&self, layer: usize, hidden: &Tensor) {
        if layer + 1 == self.layers {
            *self.states.borrow_mut() = Some(hidden.shallow_clone());
        }
    }
}
