//! The decoder-only transformer (Llama, Mistral, Qwen2, Gemma 3) on libtorch.
//!
//! [`Model::forward`] takes token ids, optional explicit positions and padding
//! validity, and an optional [`KvCache`]; masks are derived from positions, so
//! the same code serves full forwards, incremental decoding and decoding from a
//! cache that holds only a subset of a context's positions.

pub mod attention;
pub mod cache;
pub mod hooks;
pub mod layer;
pub mod linear;
pub mod load;
pub mod mlp;
pub mod norm;
pub mod rope;

use crate::config::{Arch, LayerKind, ModelConfig};
use crate::error::{ModelError, Result};
use crate::weights::WeightSource;
use attention::{AttnInputs, AttnMask};
pub use cache::{KvCache, LayerKv};
pub use hooks::{Hooks, KeyBias, NoHooks, Proj, StatesAfter};
use layer::DecoderLayer;
use load::Loader;
use norm::RmsNorm;
use rope::Rope;
use tch::{Device, Kind, Tensor};

/// One forward call's inputs.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    /// Token ids `[batch, seq]` int64.
    pub ids: &'a Tensor,
    /// Absolute positions `[batch, seq]` int64; default: continue after the cache
    /// (or start at 0), contiguously.
    pub positions: Option<&'a Tensor>,
    /// `[batch, seq]` bool, false at padding; default: all valid.
    pub valid: Option<&'a Tensor>,
    /// The caller has checked on the host that every id is within the
    /// vocabulary, so the forward skips its device-side check (which waits for
    /// the device and so stalls the queue of launched work).
    pub vocab_checked: bool,
}

impl<'a> Input<'a> {
    /// Inputs with default positions and no padding.
    pub fn new(ids: &'a Tensor) -> Self {
        Input {
            ids,
            positions: None,
            valid: None,
            vocab_checked: false,
        }
    }

    /// Marks the ids as checked against the vocabulary on the host
    /// (e.g. by [`crate::distill::infer::pad_rows`]).
    pub fn vocab_checked(mut self) -> Self {
        self.vocab_checked = true;
        self
    }

    /// Sets explicit positions.
    pub fn with_positions(mut self, positions: &'a Tensor) -> Self {
        self.positions = Some(positions);
        self
    }

    /// Sets the padding validity mask.
    pub fn with_valid(mut self, valid: &'a Tensor) -> Self {
        self.valid = Some(valid);
        self
    }
}

/// Where a forward pass ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// Every layer and the final norm.
    All,
    /// After this many layers, without the final norm.
    After(usize),
    /// Every layer's K/V into the cache; the last layer computes nothing else.
    CacheOnly,
}

/// What every layer of one forward shares: the queries' positions and each
/// attention kind's RoPE tables and mask.
#[derive(Debug)]
struct Setup {
    positions: Tensor,
    full: AttnInputs,
    sliding: Option<AttnInputs>,
}

impl Setup {
    /// The attention inputs of `layer`'s kind.
    fn for_layer(&self, layer: &DecoderLayer) -> &AttnInputs {
        match (layer.kind, &self.sliding) {
            (LayerKind::Sliding, Some(s)) => s,
            _ => &self.full,
        }
    }
}

/// A context's K/V whose activations were not kept: each layer's input, to
/// recompute that layer when the gradients of the K/V are known
/// ([`Model::fill_cache_recomputable`], [`Model::backward_recomputed`]).
#[derive(Debug)]
pub struct Recomputable {
    setup: Setup,
    /// The input of every layer `[batch, seq, hidden]`, without gradient.
    layer_inputs: Vec<Tensor>,
}

/// A loaded decoder-only language model.
#[derive(Debug)]
pub struct Model {
    cfg: ModelConfig,
    embed: Tensor,
    /// The embedding scale as a 0-dim tensor in the model's kind, on its device
    /// (made once: a host-to-device copy per forward would stall the queue and
    /// cannot be captured in a CUDA graph).
    embed_scale: Option<Tensor>,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Tensor,
    rope_full: Rope,
    rope_sliding: Rope,
    kind: Kind,
    device: Device,
}

impl Model {
    /// SmolLM2's layers at 1/16 of its widths, `layers` of them, with random
    /// weights drawn from `seed`, in float32 on the CPU (unit tests).
    #[cfg(test)]
    pub(crate) fn tiny_random(layers: usize, seed: i64) -> Model {
        let mut cfg = ModelConfig::smollm2_135m().narrowed(16);
        cfg.num_layers = layers;
        cfg.layer_kinds.truncate(layers);
        let src = crate::weights::RandomWeights::new(cfg.arch, seed);
        Model::load(cfg, &src, Kind::Float, Device::Cpu).expect("a tiny random model")
    }

    /// Builds the model from a checkpoint in HF naming, in `kind` on `device`.
    pub fn load(
        cfg: ModelConfig,
        src: &dyn WeightSource,
        kind: Kind,
        device: Device,
    ) -> Result<Self> {
        let root = Loader::new(src, "", kind, device);
        let prefix = ["model.", "model.language_model.", "language_model.model."]
            .into_iter()
            .find(|p| root.with_prefix(p).contains("embed_tokens.weight"))
            .ok_or_else(|| ModelError::MissingWeight {
                path: src.path().to_path_buf(),
                name: "model.embed_tokens.weight".into(),
            })?;
        let ld = root.with_prefix(prefix);
        let (v, d) = (cfg.vocab_size as i64, cfg.hidden_size as i64);
        let embed = ld.weight("embed_tokens.weight", &[v, d])?;
        let layers = (0..cfg.num_layers)
            .map(|i| DecoderLayer::load(&ld, &cfg, i))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(
            ld.weight("norm.weight", &[d])?,
            cfg.rms_norm_eps,
            cfg.arch.norm_plus_one(),
        );
        let lm_head = if cfg.tie_word_embeddings {
            embed.shallow_clone()
        } else {
            let head_prefix = if prefix == "language_model.model." {
                "language_model."
            } else {
                ""
            };
            root.with_prefix(head_prefix)
                .weight("lm_head.weight", &[v, d])?
        };
        // Like transformers: the scale is rounded to the model's dtype first.
        let embed_scale = (cfg.arch == Arch::Gemma3).then(|| {
            Tensor::from((cfg.hidden_size as f64).sqrt() as f32)
                .to_kind(kind)
                .to_device(device)
        });
        Ok(Model {
            rope_full: Rope::new(&cfg.rope_full, cfg.head_dim, device),
            rope_sliding: Rope::new(&cfg.rope_sliding, cfg.head_dim, device),
            cfg,
            embed,
            embed_scale,
            layers,
            norm,
            lm_head,
            kind,
            device,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Device the weights live on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Floating-point kind of weights and activations.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Every weight tensor of the model (shared storage, not copies).
    pub fn weights(&self) -> Vec<&Tensor> {
        let mut out = vec![&self.embed, &self.lm_head, self.norm.weight()];
        for l in &self.layers {
            out.extend(l.weights());
        }
        out
    }

    /// A fresh, empty cache for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.cfg.num_layers)
    }

    /// Logits `[batch, seq, vocab]` (model kind) for `input`, appending to `cache` when given.
    pub fn forward(&self, input: Input, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let h = self.forward_hidden(input, cache)?;
        Ok(self.logits(&h))
    }

    /// Final-norm hidden states `[batch, seq, hidden]` for `input`.
    pub fn forward_hidden(&self, input: Input, cache: Option<&mut KvCache>) -> Result<Tensor> {
        self.run(input, cache, &NoHooks, Stop::All, None)
    }

    /// [`Model::forward_hidden`] with caller hooks (LoRA terms, attention bias, observers).
    pub fn forward_hidden_with(
        &self,
        input: Input,
        cache: Option<&mut KvCache>,
        hooks: &dyn Hooks,
    ) -> Result<Tensor> {
        self.run(input, cache, hooks, Stop::All, None)
    }

    /// Appends every layer's K/V for `input` to `cache`, doing only the work
    /// they need: the last layer's attention output and MLP and the final norm
    /// are skipped (so `hooks.after_layer` is not called for the last layer).
    pub fn fill_cache(&self, input: Input, cache: &mut KvCache, hooks: &dyn Hooks) -> Result<()> {
        self.run(input, Some(cache), hooks, Stop::CacheOnly, None)
            .map(|_| ())
    }

    /// [`Model::fill_cache`] into an empty `cache`, keeping no activations:
    /// the layers run without autograd, each layer's input is kept, and the
    /// cached K/V become leaves that collect their gradients. Once a loss
    /// over them has been backpropagated, [`Model::backward_recomputed`]
    /// carries those gradients through the layers into the parameters the
    /// `hooks` add (a LoRA adaptor), one layer at a time: the memory of one
    /// layer's activations instead of all of them, for one more forward.
    pub fn fill_cache_recomputable(
        &self,
        input: Input,
        cache: &mut KvCache,
        hooks: &dyn Hooks,
    ) -> Result<Recomputable> {
        if !cache.is_empty() || cache.num_layers() != self.cfg.num_layers {
            return Err(ModelError::Input(format!(
                "a recomputable fill needs an empty {}-layer cache",
                self.cfg.num_layers
            )));
        }
        self.check_input(input)?;
        let setup = self.setup(input, None)?;
        let last = self.layers.len() - 1;
        let layer_inputs = tch::no_grad(|| -> Result<Vec<Tensor>> {
            let mut x = self.embed(input.ids)?;
            let mut kept = Vec::with_capacity(self.layers.len());
            for (i, layer) in self.layers.iter().enumerate() {
                kept.push(x.shallow_clone());
                let inputs = setup.for_layer(layer);
                if i == last {
                    layer.append_kv(&x, inputs, cache, i, hooks)?;
                } else {
                    x = layer.forward(&x, inputs, Some(cache), i, hooks)?;
                }
            }
            Ok(kept)
        })?;
        cache.append_positions(&setup.positions, input.valid)?;
        cache.make_leaves()?;
        Ok(Recomputable {
            setup,
            layer_inputs,
        })
    }

    /// Backpropagates the gradients that reached `cache`'s K/V (filled by
    /// [`Model::fill_cache_recomputable`] with the same `hooks`) through the
    /// layers, last to first, recomputing each from its kept input; the
    /// gradients accumulate in the hooks' parameters as a backward through
    /// kept activations would leave them. The hooks must compute the same
    /// function as in the fill (no dropout).
    pub fn backward_recomputed(
        &self,
        saved: Recomputable,
        cache: &KvCache,
        hooks: &dyn Hooks,
    ) -> Result<()> {
        let last = self.layers.len() - 1;
        // The gradient of the loss with respect to the output of the layer
        // being recomputed (the next layer's input).
        let mut grad_out: Option<Tensor> = None;
        for (i, layer) in self.layers.iter().enumerate().rev() {
            let kv = cache
                .layer(i)
                .ok_or_else(|| ModelError::Input(format!("layer {i} of the cache is empty")))?;
            let (gk, gv) = (kv.k.grad(), kv.v.grad());
            if !gk.defined() && !gv.defined() && grad_out.is_none() {
                continue;
            }
            let x = saved.layer_inputs[i].detach().set_requires_grad(i > 0);
            let mut fresh = KvCache::new(self.cfg.num_layers);
            let inputs = saved.setup.for_layer(layer);
            let out = if i == last {
                layer.append_kv(&x, inputs, &mut fresh, i, hooks)?;
                None
            } else {
                Some(layer.forward(&x, inputs, Some(&mut fresh), i, hooks)?)
            };
            let new = fresh
                .layer(i)
                .ok_or_else(|| ModelError::Input(format!("layer {i} made no K/V")))?;
            let mut terms = Vec::new();
            for (t, g) in [(&new.k, &gk), (&new.v, &gv)] {
                if g.defined() {
                    terms.push(t.f_mul(g)?.f_sum(Kind::Float)?);
                }
            }
            if let (Some(o), Some(g)) = (&out, &grad_out) {
                terms.push(o.f_mul(g)?.f_sum(Kind::Float)?);
            }
            let Some(first) = terms.pop() else { continue };
            let total = terms.iter().try_fold(first, |acc, t| acc.f_add(t))?;
            if !total.requires_grad() {
                // Nothing below this layer is trained.
                break;
            }
            total.f_backward()?;
            grad_out = (i > 0).then(|| x.grad()).filter(Tensor::defined);
        }
        Ok(())
    }

    /// Hidden states after the first `layers` layers (no final norm; 0 gives the
    /// embeddings), running only those layers.
    pub fn layer_states(&self, input: Input, layers: usize) -> Result<Tensor> {
        if layers > self.cfg.num_layers {
            return Err(ModelError::Input(format!(
                "asked for the state after layer {layers} of a {}-layer model",
                self.cfg.num_layers
            )));
        }
        self.run(input, None, &NoHooks, Stop::After(layers), None)
    }

    /// Final-norm hidden states for `input`, continuing from `states`, the
    /// hidden states after its first `layers` layers ([`Model::layer_states`]):
    /// the two calls together compute what [`Model::forward_hidden`] does.
    pub fn resume_hidden(&self, input: Input, states: &Tensor, layers: usize) -> Result<Tensor> {
        self.resume_hidden_with(input, states, layers, &NoHooks)
    }

    /// [`Model::resume_hidden`] with caller hooks (observers of the remaining layers).
    pub fn resume_hidden_with(
        &self,
        input: Input,
        states: &Tensor,
        layers: usize,
        hooks: &dyn Hooks,
    ) -> Result<Tensor> {
        let ids = input.ids.size();
        let want = [
            ids[0],
            ids.get(1).copied().unwrap_or(0),
            self.cfg.hidden_size as i64,
        ];
        if layers > self.cfg.num_layers || states.size() != want {
            return Err(ModelError::Input(format!(
                "cannot resume a {}-layer model after layer {layers} from states of shape {:?} (expected {want:?})",
                self.cfg.num_layers,
                states.size()
            )));
        }
        self.run(input, None, hooks, Stop::All, Some((layers, states)))
    }

    /// The forward pass: embeddings (or `from`'s states after its first layers),
    /// layers up to `stop`, and the final norm when all layers ran.
    fn run(
        &self,
        input: Input,
        mut cache: Option<&mut KvCache>,
        hooks: &dyn Hooks,
        stop: Stop,
        from: Option<(usize, &Tensor)>,
    ) -> Result<Tensor> {
        self.check_input(input)?;
        if let Some(c) = cache.as_deref() {
            if c.num_layers() != self.cfg.num_layers {
                return Err(ModelError::Input(format!(
                    "cache has {} layers, the model {}",
                    c.num_layers(),
                    self.cfg.num_layers
                )));
            }
        }
        let history = cache.as_deref().filter(|c| !c.is_empty());
        let setup = self.setup(input, history)?;
        let (skip, mut x) = match from {
            Some((done, states)) => (done, states.shallow_clone()),
            None => (0, self.embed(input.ids)?),
        };
        let n = match stop {
            Stop::After(n) => n,
            Stop::All | Stop::CacheOnly => self.layers.len(),
        };
        for (i, layer) in self.layers.iter().enumerate().take(n).skip(skip) {
            let inputs = setup.for_layer(layer);
            if let (Stop::CacheOnly, Some(c)) = (stop, cache.as_deref_mut()) {
                if i + 1 == n {
                    layer.append_kv(&x, inputs, c, i, hooks)?;
                    break;
                }
            }
            x = layer.forward(&x, inputs, cache.as_deref_mut(), i, hooks)?;
            hooks.after_layer(i, &x);
        }
        if let Some(c) = cache {
            c.append_positions(&setup.positions, input.valid)?;
        }
        if stop != Stop::All {
            return Ok(x);
        }
        Ok(self.norm.forward(&x))
    }

    /// The positions, RoPE tables and masks of a forward over `input` after
    /// the entries of `history` (a non-empty cache), shared by every layer.
    fn setup(&self, input: Input, history: Option<&KvCache>) -> Result<Setup> {
        let (b, t) = input.ids.size2()?;
        let positions = match (input.positions, history) {
            (Some(p), _) => {
                if p.size() != [b, t] {
                    return Err(ModelError::Input(format!(
                        "positions have shape {:?}, ids {:?}",
                        p.size(),
                        [b, t]
                    )));
                }
                p.shallow_clone()
            }
            (None, None) => Tensor::arange(t, (Kind::Int64, self.device))
                .unsqueeze(0)
                .expand([b, t], false),
            (None, Some(c)) => {
                let next = c
                    .next_positions()
                    .unwrap_or_else(|| Tensor::zeros([b], (Kind::Int64, self.device)));
                next.unsqueeze(1) + Tensor::arange(t, (Kind::Int64, self.device)).unsqueeze(0)
            }
        };
        let fast_causal = history.is_none() && input.positions.is_none() && input.valid.is_none();
        let (k_pos, k_valid) = match history {
            Some(c) => {
                let k_pos = Tensor::f_cat(&[c.positions().unwrap_or(&positions), &positions], 1)?;
                let k_valid = match (c.valid(), input.valid) {
                    (None, None) => None,
                    (old, new) => {
                        let old = old.map(|o| o.shallow_clone()).unwrap_or_else(|| {
                            Tensor::ones([b, c.len()], (Kind::Bool, self.device))
                        });
                        let new = new
                            .map(|n| n.shallow_clone())
                            .unwrap_or_else(|| Tensor::ones([b, t], (Kind::Bool, self.device)));
                        Some(Tensor::f_cat(&[old, new], 1)?)
                    }
                };
                (k_pos, k_valid)
            }
            None => (
                positions.shallow_clone(),
                input.valid.map(|v| v.shallow_clone()),
            ),
        };
        let full = self.attn_inputs(
            &self.rope_full,
            &positions,
            &k_pos,
            k_valid.as_ref(),
            None,
            fast_causal,
        )?;
        let sliding = if self.cfg.layer_kinds.contains(&LayerKind::Sliding) {
            let window = self.cfg.sliding_window;
            let fast = fast_causal && window.is_none_or(|w| w as i64 >= t);
            Some(self.attn_inputs(
                &self.rope_sliding,
                &positions,
                &k_pos,
                k_valid.as_ref(),
                window,
                fast,
            )?)
        } else {
            None
        };
        Ok(Setup {
            positions,
            full,
            sliding,
        })
    }

    /// Refuses ids that are not `[batch, seq]` with `seq > 0`, or outside the
    /// vocabulary (unless the caller checked them).
    fn check_input(&self, input: Input) -> Result<()> {
        let ids = input.ids;
        let (_, t) = ids.size2().map_err(|_| {
            ModelError::Input(format!(
                "token ids must be [batch, seq], got {:?}",
                ids.size()
            ))
        })?;
        if t == 0 {
            return Err(ModelError::Input("empty sequence".into()));
        }
        if input.vocab_checked {
            return Ok(());
        }
        let (lo, hi) = (ids.min().int64_value(&[]), ids.max().int64_value(&[]));
        if lo < 0 || hi >= self.cfg.vocab_size as i64 {
            return Err(ModelError::Input(format!(
                "token id {} outside the vocabulary [0, {})",
                if lo < 0 { lo } else { hi },
                self.cfg.vocab_size
            )));
        }
        Ok(())
    }

    /// Token embeddings (scaled where the family scales them).
    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let embedded = Tensor::f_embedding(&self.embed, ids, -1, false, false)?;
        Ok(match &self.embed_scale {
            Some(s) => embedded * s,
            None => embedded,
        })
    }

    /// LM-head logits for hidden states `[.., hidden]`.
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        let logits = hidden.linear::<&Tensor>(&self.lm_head, None);
        match self.cfg.final_logit_softcapping {
            Some(cap) => (logits / cap).tanh() * cap,
            None => logits,
        }
    }

    /// RoPE tables and mask for one attention kind.
    fn attn_inputs(
        &self,
        rope: &Rope,
        q_pos: &Tensor,
        k_pos: &Tensor,
        k_valid: Option<&Tensor>,
        window: Option<usize>,
        fast_causal: bool,
    ) -> Result<AttnInputs> {
        let (cos, sin) = rope.cos_sin(q_pos, self.kind)?;
        let mask = if fast_causal {
            AttnMask::Causal
        } else {
            let q = q_pos.unsqueeze(2);
            let k = k_pos.unsqueeze(1);
            let mut allowed = k.le_tensor(&q);
            if let Some(w) = window {
                allowed = allowed.logical_and(&(&q - &k).lt(w as i64));
            }
            if let Some(v) = k_valid {
                allowed = allowed.logical_and(&v.unsqueeze(1));
            }
            // A query that may see nothing (e.g. left padding) attends everywhere
            // instead of producing NaN; such rows are padding and never used.
            let none = allowed.any_dim(-1, true).logical_not();
            AttnMask::Explicit(allowed.logical_or(&none).unsqueeze(1))
        };
        Ok(AttnInputs::new(cos, sin, mask))
    }
}
