//! Model configuration: one normalised struct for every supported family, read
//! from an HF `config.json` (transformers 4.x and 5.x layouts) or from GGUF metadata.

use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Supported decoder families.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Llama 2/3, SmolLM2 and other Llama-architecture models.
    Llama,
    /// Mistral (Llama layout, optional sliding window).
    Mistral,
    /// Qwen2 (biases on q, k and v).
    Qwen2,
    /// Gemma 3 text models (QK-norm, sandwich norms, GeGLU, local/global layers).
    Gemma3,
}

impl Arch {
    /// Short lowercase name (as in HF `model_type`).
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
            Arch::Gemma3 => "gemma3",
        }
    }

    /// Whether RMSNorm multiplies by `1 + w` (Gemma) instead of `w`.
    pub fn norm_plus_one(self) -> bool {
        self == Arch::Gemma3
    }
}

/// How rotary frequencies are rescaled for long contexts.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Position interpolation: every frequency divided by `factor`.
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// Llama 3.1's band-wise rescaling.
    Llama3 {
        /// Scale for low frequencies.
        factor: f64,
        /// Low-frequency boundary factor.
        low_freq_factor: f64,
        /// High-frequency boundary factor.
        high_freq_factor: f64,
        /// Context length of the original pre-training.
        original_max_position_embeddings: f64,
    },
    /// Per-frequency divisors, as llama.cpp stores Llama 3 scaling in GGUF
    /// (`rope_freqs.weight`, one factor per rotary pair).
    FreqFactors(Vec<f32>),
}

/// Rotary embedding parameters of one kind of layer.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    /// Base frequency.
    pub theta: f64,
    /// Rescaling.
    pub scaling: RopeScaling,
}

/// Attention span of a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    /// Causal attention over everything before.
    Full,
    /// Causal attention over the last `sliding_window` positions (this one included).
    Sliding,
}

/// MLP gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SiLU (SwiGLU MLP).
    Silu,
    /// GELU, tanh approximation (GeGLU MLP).
    GeluTanh,
}

/// A decoder-only transformer's configuration, normalised across families.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Family.
    pub arch: Arch,
    /// Rows of the embedding matrix.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA when fewer than query heads).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE of full-attention layers.
    pub rope_full: RopeConfig,
    /// RoPE of sliding-window layers.
    pub rope_sliding: RopeConfig,
    /// Attention kind per layer.
    pub layer_kinds: Vec<LayerKind>,
    /// Window of sliding layers.
    pub sliding_window: Option<usize>,
    /// Biases on q, k, v projections.
    pub qkv_bias: bool,
    /// Bias on the output projection.
    pub o_bias: bool,
    /// Biases in the MLP.
    pub mlp_bias: bool,
    /// MLP activation.
    pub activation: Activation,
    /// Multiplier of q·k in attention.
    pub attn_scale: f64,
    /// LM head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Final logits soft-capping (`cap * tanh(x / cap)`).
    pub final_logit_softcapping: Option<f64>,
    /// Longest context the model was trained for.
    pub max_position_embeddings: usize,
    /// Beginning-of-sequence id.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence ids.
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// Reads an HF `config.json`.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let json: Value = serde_json::from_str(&text).map_err(|source| ModelError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_hf_json(&json, path)
    }

    /// Normalises a parsed HF config; `path` is used in error messages.
    pub fn from_hf_json(json: &Value, path: &Path) -> Result<Self> {
        let f = Fields {
            json,
            path: path.to_path_buf(),
        };
        let model_type = f.req_str("model_type")?;
        let arch = match model_type.as_str() {
            "llama" => Arch::Llama,
            "mistral" => Arch::Mistral,
            "qwen2" => Arch::Qwen2,
            "gemma3_text" => Arch::Gemma3,
            "gemma3" => {
                // Multimodal wrapper: the language model's config is nested.
                let text = json
                    .get("text_config")
                    .ok_or_else(|| ModelError::MissingField {
                        path: path.to_path_buf(),
                        field: "text_config".into(),
                    })?;
                let mut text = text.clone();
                if let Some(obj) = text.as_object_mut() {
                    obj.insert("model_type".into(), Value::from("gemma3_text"));
                }
                return Self::from_hf_json(&text, path);
            }
            other => {
                return Err(ModelError::UnknownArchitecture {
                    path: path.to_path_buf(),
                    arch: other.to_string(),
                })
            }
        };
        let gemma = arch == Arch::Gemma3;
        let hidden_size = f.req_usize("hidden_size")?;
        let num_heads = f.req_usize("num_attention_heads")?;
        let num_layers = f.req_usize("num_hidden_layers")?;
        let num_kv_heads = f.opt_usize("num_key_value_heads")?.unwrap_or(num_heads);
        let head_dim = match f.opt_usize("head_dim")? {
            Some(d) => d,
            None if gemma => 256,
            None => hidden_size / num_heads.max(1),
        };
        let sliding_window = f.opt_usize("sliding_window")?;
        let layer_kinds = match json.get("layer_types").and_then(Value::as_array) {
            Some(types) => types
                .iter()
                .map(|t| match t.as_str() {
                    Some("full_attention") => Ok(LayerKind::Full),
                    Some("sliding_attention") => Ok(LayerKind::Sliding),
                    _ => Err(f.bad("layer_types", format!("unknown layer type {t}"))),
                })
                .collect::<Result<Vec<_>>>()?,
            None => default_layer_kinds(&f, arch, num_layers, sliding_window)?,
        };
        if layer_kinds.len() != num_layers {
            return Err(f.bad(
                "layer_types",
                format!("{} entries for {num_layers} layers", layer_kinds.len()),
            ));
        }
        if layer_kinds.contains(&LayerKind::Sliding) && sliding_window.is_none() {
            return Err(f.bad("sliding_window", "sliding layers need a window".into()));
        }
        let (rope_full, rope_sliding) = parse_rope(&f, arch)?;
        let activation_name = f
            .opt_str("hidden_activation")?
            .or(f.opt_str("hidden_act")?)
            .unwrap_or_else(|| if gemma { "gelu_pytorch_tanh" } else { "silu" }.into());
        let activation = match activation_name.as_str() {
            "silu" | "swish" => Activation::Silu,
            "gelu_pytorch_tanh" | "gelu_tanh" => Activation::GeluTanh,
            other => return Err(f.bad("hidden_act", format!("unsupported activation `{other}`"))),
        };
        let attention_bias = f.opt_bool("attention_bias")?.unwrap_or(false);
        let attn_scale = match f.opt_f64("query_pre_attn_scalar")? {
            Some(s) if gemma => s.powf(-0.5),
            _ => (head_dim as f64).powf(-0.5),
        };
        let eos_token_ids = match json.get("eos_token_id") {
            Some(Value::Array(ids)) => ids
                .iter()
                .filter_map(Value::as_u64)
                .map(|i| i as u32)
                .collect(),
            Some(v) => v.as_u64().map(|i| vec![i as u32]).unwrap_or_default(),
            None => vec![],
        };
        Ok(ModelConfig {
            arch,
            vocab_size: f.req_usize("vocab_size")?,
            hidden_size,
            intermediate_size: f.req_usize("intermediate_size")?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: f.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope_full,
            rope_sliding,
            layer_kinds,
            sliding_window,
            qkv_bias: arch == Arch::Qwen2 || attention_bias,
            o_bias: arch != Arch::Qwen2 && attention_bias,
            mlp_bias: f.opt_bool("mlp_bias")?.unwrap_or(false),
            activation,
            attn_scale,
            tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(gemma),
            // `attn_logit_softcapping` is deliberately not read: transformers' Gemma 3
            // ignores it too (it was Gemma 2's; Gemma 3 checkpoints set it to null).
            final_logit_softcapping: f.opt_f64("final_logit_softcapping")?,
            max_position_embeddings: f.opt_usize("max_position_embeddings")?.unwrap_or(4096),
            bos_token_id: f.opt_usize("bos_token_id")?.map(|i| i as u32),
            eos_token_ids,
        })
        .and_then(|c| c.validated(path))
    }

    /// Derives the configuration from GGUF metadata (llama.cpp key names).
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let path = file.path().to_path_buf();
        let arch_name = file.get_str("general.architecture")?.to_string();
        let arch = match arch_name.as_str() {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "gemma3" => Arch::Gemma3,
            other => {
                return Err(ModelError::UnknownArchitecture {
                    path,
                    arch: other.to_string(),
                })
            }
        };
        let key = |k: &str| format!("{arch_name}.{k}");
        let req = |k: &str| -> Result<usize> { Ok(file.get_u64(&key(k))? as usize) };
        let opt_u = |k: &str| {
            file.get(&key(k))
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
        };
        let opt_f = |k: &str| file.get(&key(k)).and_then(|v| v.as_f64());
        let gemma = arch == Arch::Gemma3;
        let hidden_size = req("embedding_length")?;
        let num_heads = req("attention.head_count")?;
        let num_layers = req("block_count")?;
        let num_kv_heads = opt_u("attention.head_count_kv").unwrap_or(num_heads);
        let head_dim = opt_u("attention.key_length")
            .or(if gemma {
                None
            } else {
                opt_u("rope.dimension_count")
            })
            .unwrap_or(hidden_size / num_heads.max(1));
        // The embedding's rows are the model's vocabulary; the tokenizer is checked against it.
        let vocab_size = match file.tensor_info("token_embd.weight") {
            Some(t) => t.shape.first().copied().unwrap_or(0),
            None => match opt_u("vocab_size") {
                Some(v) => v,
                None => file.get_array("tokenizer.ggml.tokens")?.len(),
            },
        };
        let sliding_window = opt_u("attention.sliding_window");
        // llama.cpp's Gemma 3: five local layers, then one global.
        let layer_kinds = (0..num_layers)
            .map(|i| {
                if gemma && (i + 1) % 6 != 0 {
                    LayerKind::Sliding
                } else {
                    LayerKind::Full
                }
            })
            .collect();
        let scaling = match file.get(&key("rope.scaling.type")).and_then(|v| v.as_str()) {
            // llama.cpp stores Llama 3 scaling as per-frequency factors.
            _ if file.tensor_info("rope_freqs.weight").is_some() => {
                let (_, factors) = file.tensor_f32("rope_freqs.weight")?;
                if factors.len() != head_dim / 2 {
                    return Err(ModelError::WeightShape {
                        path,
                        name: "rope_freqs.weight".into(),
                        got: vec![factors.len() as i64],
                        expected: vec![head_dim as i64 / 2],
                    });
                }
                RopeScaling::FreqFactors(factors)
            }
            None | Some("none") => RopeScaling::None,
            Some("linear") => RopeScaling::Linear {
                factor: opt_f("rope.scaling.factor").unwrap_or(1.0),
            },
            Some(other) => {
                return Err(ModelError::BadField {
                    path,
                    field: key("rope.scaling.type"),
                    msg: format!("unsupported rope scaling `{other}`"),
                })
            }
        };
        let theta = opt_f("rope.freq_base").unwrap_or(if gemma { 1e6 } else { 1e4 });
        let rope_full = RopeConfig { theta, scaling };
        let rope_sliding = if gemma {
            RopeConfig {
                theta: 1e4,
                scaling: RopeScaling::None,
            }
        } else {
            rope_full.clone()
        };
        let has_output = file.tensors().iter().any(|t| t.name == "output.weight");
        let has_qkv_bias = file.tensors().iter().any(|t| t.name == "blk.0.attn_q.bias");
        let tok_id = |k: &str| file.get(k).and_then(|v| v.as_u64()).map(|v| v as u32);
        ModelConfig {
            arch,
            vocab_size,
            hidden_size,
            intermediate_size: req("feed_forward_length")?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: opt_f("attention.layer_norm_rms_epsilon").unwrap_or(1e-6),
            rope_full,
            rope_sliding,
            layer_kinds,
            sliding_window: if gemma { sliding_window } else { None },
            qkv_bias: has_qkv_bias,
            o_bias: false,
            mlp_bias: false,
            activation: if gemma {
                Activation::GeluTanh
            } else {
                Activation::Silu
            },
            attn_scale: (head_dim as f64).powf(-0.5),
            tie_word_embeddings: !has_output,
            final_logit_softcapping: opt_f("final_logit_softcapping"),
            max_position_embeddings: opt_u("context_length").unwrap_or(4096),
            bos_token_id: tok_id("tokenizer.ggml.bos_token_id"),
            eos_token_ids: tok_id("tokenizer.ggml.eos_token_id").into_iter().collect(),
        }
        .validated(file.path())
    }

    /// Checks the invariants the model code relies on.
    fn validated(self, path: &Path) -> Result<Self> {
        let bad = |field: &str, msg: String| ModelError::BadField {
            path: path.to_path_buf(),
            field: field.into(),
            msg,
        };
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
        ] {
            if v == 0 {
                return Err(bad(field, "must be positive".into()));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(bad(
                "num_key_value_heads",
                format!(
                    "{} does not divide {} query heads",
                    self.num_kv_heads, self.num_heads
                ),
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(bad(
                "head_dim",
                format!("{} is odd; RoPE needs pairs", self.head_dim),
            ));
        }
        Ok(self)
    }

    /// A Llama-3.2-1B-shaped configuration (16 layers, d 2048, 32/8 heads,
    /// vocab 128256), for benchmarks with random weights.
    pub fn llama_3_2_1b() -> Self {
        let rope = RopeConfig {
            theta: 500_000.0,
            scaling: RopeScaling::Llama3 {
                factor: 32.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192.0,
            },
        };
        ModelConfig {
            arch: Arch::Llama,
            vocab_size: 128_256,
            hidden_size: 2048,
            intermediate_size: 8192,
            num_layers: 16,
            num_heads: 32,
            num_kv_heads: 8,
            head_dim: 64,
            rms_norm_eps: 1e-5,
            rope_full: rope.clone(),
            rope_sliding: rope,
            layer_kinds: vec![LayerKind::Full; 16],
            sliding_window: None,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            activation: Activation::Silu,
            attn_scale: 64f64.powf(-0.5),
            tie_word_embeddings: true,
            final_logit_softcapping: None,
            max_position_embeddings: 131_072,
            bos_token_id: Some(128_000),
            eos_token_ids: vec![128_001, 128_008, 128_009],
        }
    }

    /// A SmolLM2-135M-shaped configuration (30 layers, d 576, 9/3 heads,
    /// vocab 49152), for benchmarks with random weights.
    pub fn smollm2_135m() -> Self {
        let rope = RopeConfig {
            theta: 100_000.0,
            scaling: RopeScaling::None,
        };
        ModelConfig {
            arch: Arch::Llama,
            vocab_size: 49_152,
            hidden_size: 576,
            intermediate_size: 1536,
            num_layers: 30,
            num_heads: 9,
            num_kv_heads: 3,
            head_dim: 64,
            rms_norm_eps: 1e-5,
            rope_full: rope.clone(),
            rope_sliding: rope,
            layer_kinds: vec![LayerKind::Full; 30],
            sliding_window: None,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            activation: Activation::Silu,
            attn_scale: 64f64.powf(-0.5),
            tie_word_embeddings: true,
            final_logit_softcapping: None,
            max_position_embeddings: 8192,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
        }
    }

    /// This configuration with every width (hidden, MLP, head, vocabulary)
    /// divided by `by` and the same layers and heads: the same operations as
    /// the full model on a fraction of the arithmetic, so a step's time is
    /// mostly its host-side dispatch (what bounds a GPU step at small shapes).
    pub fn narrowed(mut self, by: usize) -> Self {
        let by = by.max(1);
        // RoPE rotates pairs: an even head width.
        self.head_dim = ((self.head_dim / by).max(2) + 1) & !1;
        self.hidden_size = self.num_heads * self.head_dim;
        self.intermediate_size = (self.intermediate_size / by).max(2);
        self.vocab_size = (self.vocab_size / by).max(16);
        self.attn_scale = (self.head_dim as f64).powf(-0.5);
        self.bos_token_id = self.bos_token_id.map(|b| b.min(self.vocab_size as u32 - 1));
        self.eos_token_ids
            .retain(|&e| (e as usize) < self.vocab_size);
        self
    }

    /// RoPE parameters of layer `i`.
    pub fn rope_for(&self, kind: LayerKind) -> &RopeConfig {
        match kind {
            LayerKind::Full => &self.rope_full,
            LayerKind::Sliding => &self.rope_sliding,
        }
    }
}

/// Layer kinds when `layer_types` is absent (transformers 4.x configs).
fn default_layer_kinds(
    f: &Fields,
    arch: Arch,
    n: usize,
    window: Option<usize>,
) -> Result<Vec<LayerKind>> {
    Ok(match arch {
        Arch::Gemma3 => {
            let pattern = f.opt_usize("sliding_window_pattern")?.unwrap_or(6).max(1);
            (0..n)
                .map(|i| {
                    if (i + 1) % pattern != 0 {
                        LayerKind::Sliding
                    } else {
                        LayerKind::Full
                    }
                })
                .collect()
        }
        Arch::Mistral if window.is_some() => vec![LayerKind::Sliding; n],
        Arch::Qwen2 if f.opt_bool("use_sliding_window")?.unwrap_or(false) => {
            let first = f.opt_usize("max_window_layers")?.unwrap_or(n);
            (0..n)
                .map(|i| {
                    if i >= first {
                        LayerKind::Sliding
                    } else {
                        LayerKind::Full
                    }
                })
                .collect()
        }
        _ => vec![LayerKind::Full; n],
    })
}

/// Reads RoPE parameters from either `rope_parameters` (transformers 5.x, per layer
/// type for Gemma 3) or `rope_theta` + `rope_scaling` (4.x).
fn parse_rope(f: &Fields, arch: Arch) -> Result<(RopeConfig, RopeConfig)> {
    let gemma = arch == Arch::Gemma3;
    let (global_default, local_default) = if gemma { (1e6, 1e4) } else { (1e4, 1e4) };
    let params = f.json.get("rope_parameters").filter(|v| v.is_object());
    if let Some(p) = params {
        if gemma && (p.get("full_attention").is_some() || p.get("sliding_attention").is_some()) {
            let full = match p.get("full_attention") {
                Some(v) => rope_from_obj(f, "rope_parameters.full_attention", v, global_default)?,
                None => rope_plain(global_default),
            };
            let local = match p.get("sliding_attention") {
                Some(v) => rope_from_obj(f, "rope_parameters.sliding_attention", v, local_default)?,
                None => rope_plain(local_default),
            };
            return Ok((full, local));
        }
        let theta = f.opt_f64("rope_theta")?.unwrap_or(global_default);
        let rope = rope_from_obj(f, "rope_parameters", p, theta)?;
        return Ok((
            rope.clone(),
            if gemma {
                rope_plain(local_default)
            } else {
                rope
            },
        ));
    }
    let theta = f.opt_f64("rope_theta")?.unwrap_or(global_default);
    let scaling = match f.json.get("rope_scaling").filter(|v| v.is_object()) {
        Some(s) => rope_from_obj(f, "rope_scaling", s, theta)?.scaling,
        None => RopeScaling::None,
    };
    let full = RopeConfig { theta, scaling };
    let local = if gemma {
        rope_plain(f.opt_f64("rope_local_base_freq")?.unwrap_or(local_default))
    } else {
        full.clone()
    };
    Ok((full, local))
}

fn rope_plain(theta: f64) -> RopeConfig {
    RopeConfig {
        theta,
        scaling: RopeScaling::None,
    }
}

fn rope_from_obj(f: &Fields, field: &str, v: &Value, default_theta: f64) -> Result<RopeConfig> {
    let num = |k: &str| v.get(k).and_then(Value::as_f64);
    let theta = num("rope_theta").unwrap_or(default_theta);
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let need = |k: &str| {
        num(k).ok_or_else(|| ModelError::MissingField {
            path: f.path.clone(),
            field: format!("{field}.{k}"),
        })
    };
    let scaling = match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: need("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: need("factor")?,
            low_freq_factor: need("low_freq_factor")?,
            high_freq_factor: need("high_freq_factor")?,
            original_max_position_embeddings: need("original_max_position_embeddings")?,
        },
        other => {
            return Err(ModelError::BadField {
                path: f.path.clone(),
                field: format!("{field}.rope_type"),
                msg: format!(
                    "unsupported RoPE type `{other}` (supported: default, linear, llama3)"
                ),
            })
        }
    };
    Ok(RopeConfig { theta, scaling })
}

/// Typed access to config.json fields with errors that name the file and field.
struct Fields<'a> {
    json: &'a Value,
    path: PathBuf,
}

impl Fields<'_> {
    fn bad(&self, field: &str, msg: String) -> ModelError {
        ModelError::BadField {
            path: self.path.clone(),
            field: field.into(),
            msg,
        }
    }

    fn present(&self, field: &str) -> Option<&Value> {
        self.json.get(field).filter(|v| !v.is_null())
    }

    fn req_str(&self, field: &str) -> Result<String> {
        self.opt_str(field)?
            .ok_or_else(|| ModelError::MissingField {
                path: self.path.clone(),
                field: field.into(),
            })
    }

    fn opt_str(&self, field: &str) -> Result<Option<String>> {
        match self.present(field) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(|s| Some(s.to_string()))
                .ok_or_else(|| self.bad(field, format!("expected a string, found {v}"))),
        }
    }

    fn req_usize(&self, field: &str) -> Result<usize> {
        self.opt_usize(field)?
            .ok_or_else(|| ModelError::MissingField {
                path: self.path.clone(),
                field: field.into(),
            })
    }

    fn opt_usize(&self, field: &str) -> Result<Option<usize>> {
        match self.present(field) {
            None => Ok(None),
            Some(v) => v.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
                self.bad(field, format!("expected a non-negative integer, found {v}"))
            }),
        }
    }

    fn opt_f64(&self, field: &str) -> Result<Option<f64>> {
        match self.present(field) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.bad(field, format!("expected a number, found {v}"))),
        }
    }

    fn opt_bool(&self, field: &str) -> Result<Option<bool>> {
        match self.present(field) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.bad(field, format!("expected true or false, found {v}"))),
        }
    }
}
