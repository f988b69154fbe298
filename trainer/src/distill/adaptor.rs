//! The trainable part of KV-Distill: the token scorer and the LoRA adaptors,
//! held in one `VarStore` (float32 master weights; cast to the model's kind at use).

use super::config::DistillConfig;
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::model::{Hooks, Proj};
use std::cell::RefCell;
use std::collections::BTreeMap;
use tch::nn::{Init, VarStore};
use tch::{Device, Kind, Tensor};

/// Added to the mean square of a state before the scorer's RMS norm.
const SCORER_NORM_EPS: f64 = 1e-6;

/// One LoRA pair: `delta = scale * (x Aᵀ) Bᵀ`.
#[derive(Debug)]
pub struct LoraPair {
    /// `[rank, in]`, random init.
    pub a: Tensor,
    /// `[out, rank]`, zero init (so a fresh adaptor changes nothing).
    pub b: Tensor,
}

/// Scorer + LoRA parameters for one base model.
pub struct Adaptor {
    /// The variables (names: `scorer.w1`, ..., `lora.{layer}.{proj}.a|b`).
    pub vs: VarStore,
    cfg: DistillConfig,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    lora: BTreeMap<(usize, Proj), LoraPair>,
}

impl std::fmt::Debug for Adaptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Adaptor")
            .field("cfg", &self.cfg)
            .field("lora_pairs", &self.lora.len())
            .finish()
    }
}

/// `(in, out)` features of projection `p` in a model of config `m`.
pub fn proj_dims(m: &ModelConfig, p: Proj) -> (i64, i64) {
    let d = m.hidden_size as i64;
    let q = (m.num_heads * m.head_dim) as i64;
    let kv = (m.num_kv_heads * m.head_dim) as i64;
    let ff = m.intermediate_size as i64;
    match p {
        Proj::Q => (d, q),
        Proj::K | Proj::V => (d, kv),
        Proj::O => (q, d),
        Proj::Gate | Proj::Up => (d, ff),
        Proj::Down => (ff, d),
    }
}

impl Adaptor {
    /// A fresh adaptor (LoRA B = 0, so the student starts as the frozen model),
    /// initialised from `seed`.
    pub fn new(model: &ModelConfig, cfg: DistillConfig, device: Device, seed: i64) -> Result<Self> {
        if cfg.scorer_layer > model.num_layers {
            return Err(ModelError::Input(format!(
                "scorer_layer {} exceeds the model's {} layers",
                cfg.scorer_layer, model.num_layers
            )));
        }
        if cfg.lora.rank <= 0 {
            return Err(ModelError::Input(format!(
                "LoRA rank must be positive, got {}",
                cfg.lora.rank
            )));
        }
        tch::manual_seed(seed);
        let vs = VarStore::new(device);
        let root = vs.root();
        let d = model.hidden_size as i64;
        let unif = |fan_in: i64| {
            let b = 1.0 / (fan_in as f64).sqrt();
            Init::Uniform { lo: -b, up: b }
        };
        let sc = root.sub("scorer");
        let w1 = sc.var("w1", &[d, d], unif(d));
        let b1 = sc.var("b1", &[d], unif(d));
        let w2 = sc.var("w2", &[1, d], unif(d));
        let b2 = sc.var("b2", &[1], unif(d));
        let mut lora = BTreeMap::new();
        let lr = root.sub("lora");
        for layer in 0..model.num_layers {
            for &p in &cfg.lora.targets {
                // Only K and V of the last layer reach the compressed cache; an
                // adaptor anywhere else in that layer could never be trained.
                if layer + 1 == model.num_layers && !matches!(p, Proj::K | Proj::V) {
                    continue;
                }
                let (inp, out) = proj_dims(model, p);
                let node = lr.sub(layer.to_string()).sub(p.name());
                let a = node.var("a", &[cfg.lora.rank, inp], unif(inp));
                let b = node.var("b", &[out, cfg.lora.rank], Init::Const(0.0));
                lora.insert((layer, p), LoraPair { a, b });
            }
        }
        Ok(Adaptor {
            vs,
            cfg,
            w1,
            b1,
            w2,
            b2,
            lora,
        })
    }

    /// The method settings this adaptor was built with.
    pub fn config(&self) -> &DistillConfig {
        &self.cfg
    }

    /// Token scores `[batch, seq]` (float32) from layer-l hidden states
    /// `[batch, seq, d]` (RMS-normalised first with [`DistillConfig::scorer_norm`]).
    pub fn score(&self, hidden: &Tensor) -> Tensor {
        // Out of place: `to_kind` returns `hidden` itself when it is float32
        // already, and the caller's states must not change.
        let h = hidden.to_kind(Kind::Float);
        let h = if self.cfg.scorer_norm {
            let ms = h.square().mean_dim([-1i64].as_slice(), true, Kind::Float);
            &h * (ms + SCORER_NORM_EPS).rsqrt()
        } else {
            h
        };
        let z = h.linear(&self.w1, Some(&self.b1)).relu();
        z.linear(&self.w2, Some(&self.b2)).squeeze_dim(-1)
    }

    /// Hooks that add the LoRA terms at `rows`, flat indices into the
    /// `[batch * seq]` positions: only those rows are computed. `train`
    /// enables the LoRA dropout.
    pub fn lora_hooks(&self, rows: Tensor, train: bool) -> LoraHooks<'_> {
        LoraHooks {
            adaptor: self,
            rows,
            train,
            gathered: RefCell::new(None),
        }
    }

    /// All trainable tensors, in name order.
    pub fn trainable(&self) -> Vec<Tensor> {
        self.named_trainable().into_iter().map(|(_, t)| t).collect()
    }

    /// The trainable tensors with their names, sorted by name: the same order
    /// in every process (the all-reduce buckets and checkpoints rely on it).
    pub fn named_trainable(&self) -> Vec<(String, Tensor)> {
        let mut named: Vec<(String, Tensor)> = self
            .vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        named
    }

    /// Number of trainable scalars.
    pub fn num_params(&self) -> i64 {
        self.trainable().iter().map(|t| t.numel() as i64).sum()
    }
}

/// LoRA routed to selected positions: `y + scale * (x A^T) B^T` at those rows
/// of the flattened `[batch * seq]` positions, `y` elsewhere (K and V at every
/// position with [`super::config::LoraConfig::kv_all_tokens`]).
pub struct LoraHooks<'a> {
    adaptor: &'a Adaptor,
    /// Flat indices of the routed positions.
    rows: Tensor,
    train: bool,
    /// The last input and its routed rows: q/k/v (and gate/up) share an
    /// input, so its rows are gathered once. Holding the input keeps its
    /// memory, so a later tensor cannot reuse the address.
    gathered: RefCell<Option<(Tensor, Tensor)>>,
}

impl LoraHooks<'_> {
    /// The routed rows of `x` `[.., d]` as `[rows, d]`.
    fn rows_of(&self, x: &Tensor) -> Tensor {
        let mut memo = self.gathered.borrow_mut();
        if let Some((input, rows)) = memo.as_ref() {
            if input.data_ptr() == x.data_ptr() && input.size() == x.size() {
                return rows.shallow_clone();
            }
        }
        let rows = x.flatten(0, -2).index_select(0, &self.rows);
        *memo = Some((x.shallow_clone(), rows.shallow_clone()));
        rows
    }
}

impl Hooks for LoraHooks<'_> {
    fn adjust_linear(&self, layer: usize, proj: Proj, x: &Tensor, y: Tensor) -> Tensor {
        let Some(pair) = self.adaptor.lora.get(&(layer, proj)) else {
            return y;
        };
        let cfg = &self.adaptor.cfg.lora;
        let kind = x.kind();
        // `scale Bᵀ` `[rank, out]`: the scale folded into the small matrix,
        // so no pass over the `[rows, out]` product multiplies it.
        let b_t = (pair.b.to_kind(kind) * cfg.scale()).tr();
        // `x Aᵀ` `[rows, rank]` of the 2-D rows the projections see (a
        // transpose and a product, what `linear` does without its dispatches).
        let down = |xs: Tensor| {
            let xs = if self.train && cfg.dropout > 0.0 {
                xs.dropout(cfg.dropout, true)
            } else {
                xs
            };
            match xs.dim() {
                2 => xs.mm(&pair.a.to_kind(kind).tr()),
                _ => xs.linear::<&Tensor>(&pair.a.to_kind(kind), None),
            }
        };
        if cfg.kv_all_tokens && matches!(proj, Proj::K | Proj::V) {
            // Every position, kept or not: `y + (x Aᵀ)(scale Bᵀ)` as one
            // product that accumulates onto `y`.
            let xa = down(x.shallow_clone());
            return match xa.dim() {
                2 => y.addmm(&xa, &b_t),
                _ => y + xa.matmul(&b_t),
            };
        }
        if self.rows.numel() == 0 {
            return y;
        }
        let delta = down(self.rows_of(x)).mm(&b_t);
        let size = y.size();
        y.flatten(0, -2)
            .index_add(0, &self.rows, &delta)
            .view(size.as_slice())
    }
}
