//! Question-agnostic, training-free KV compression baselines (METHOD.md,
//! "Baselines") at the same budget as KV-Distill: each gives one score per
//! context position, and [`super::select::select`] keeps every position outside
//! the compressible spans plus the top-k of each span, k = max(1, ceil(r n)).
//!
//! Like KV-Distill, and unlike kvpress (which keeps a different set per layer and
//! KV head), a baseline keeps ONE set of positions per sequence, shared by all
//! layers and heads, because the compressed cache of this project holds one set
//! of positions per sequence ([`KvCache`]). Statistics of layers and heads are
//! therefore aggregated into a single score per position.
//!
//! [`baseline_scores`] runs one frozen forward over the contexts that both fills
//! the full cache (from which the caller gathers the kept positions) and, through
//! [`Hooks`], gathers what the method needs; nothing runs twice.

use super::select::{validate_spans, Span};
use super::student::{Compressed, Contexts};
use crate::config::LayerKind;
use crate::error::{ModelError, Result};
use crate::model::rope::Rope;
use crate::model::{Hooks, Input, KvCache, Model, NoHooks};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::str::FromStr;
use tch::{Device, Kind, Tensor};

/// A training-free scoring method. Higher scores are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "method")]
pub enum Baseline {
    /// Seeded uniform scores in [0, 1), a function of the seed, the example's
    /// context tokens and the position only: deterministic per seed and example,
    /// independent of batching and padding, different across examples.
    Random {
        /// The seed.
        #[serde(default)]
        seed: u64,
    },
    /// StreamingLLM: the first `sinks` positions of each span, then the most
    /// recent ones.
    StreamingLlm {
        /// Attention-sink positions at the start of each span (default 4).
        #[serde(default = "default_sinks")]
        sinks: usize,
    },
    /// Knorm: keys with a LOW L2 norm are kept; score = −(mean over layers and
    /// KV heads of ‖k‖₂ of the post-RoPE key).
    KeyNorm,
    /// H2O: attention mass each position receives from every real context query
    /// (causal), summed over heads and layers.
    H2o,
    /// SnapKV: attention each span position receives from the queries of the
    /// last `window` positions of its own span (the whole span when shorter),
    /// averaged over heads and summed over those queries, max-pooled over the
    /// span's positions with `kernel` (same padding, pooling never crosses the
    /// span's edges), summed over layers. Scores outside spans are 0.
    #[serde(rename = "snapkv")]
    SnapKv {
        /// Observation window, in positions (default 32).
        #[serde(default = "default_window")]
        window: usize,
        /// Odd max-pooling width (default 7; 1 disables pooling).
        #[serde(default = "default_kernel")]
        kernel: usize,
    },
    /// TOVA (one-shot, as in kvpress): the attention each span position
    /// receives from the span's last position, averaged over heads, summed
    /// over layers (SnapKV with a window of 1 and no pooling).
    Tova,
    /// Expected Attention (kvpress's `ExpectedAttentionPress`), one span at a
    /// time. In a span of n positions starting at s, of a context of length L,
    /// the first min(`sinks`, n) positions are sinks and the rest, P, are
    /// scored. Per layer and query head h:
    ///
    /// - μ, Σ: mean and covariance (divided by the count) of the pre-RoPE
    ///   queries (after the QK-norm, where the family has one) at P, or at the
    ///   last `window` positions of P when `window` > 0;
    /// - R̄: the layer's RoPE rotation averaged over the `future` positions
    ///   L, …, L + future − 1 after the context;
    /// - each key k at P (post-RoPE) gets the expected logit
    ///   a(k) = σ (R̄μ)·k + σ²/2 · kᵀ(R̄ΣR̄ᵀ)k (the second term only with
    ///   `covariance`), σ the model's q·k scale (1/√head_dim; Gemma 3:
    ///   query_pre_attn_scalar^−½, where kvpress uses 1/√head_dim), the
    ///   log of E[exp(σ q·k)] for q ~ N(R̄μ, R̄ΣR̄ᵀ);
    /// - softmax of a over P.
    ///
    /// The softmax is averaged over the query heads of each KV head, times
    /// ‖v‖₂ of the position's value in that KV head (with `vnorm`), then
    /// averaged over KV heads and summed over layers. Sinks score M + 1, M the
    /// span's largest score at P (0 when P is empty), so they are kept first
    /// (earlier first). Positions outside spans score 0. Sliding windows are
    /// ignored (as in kvpress).
    ExpectedAttention {
        /// Future query positions the RoPE rotation is averaged over (default 512).
        #[serde(default = "default_future")]
        future: usize,
        /// Sink positions at the start of each span, always kept (default 4).
        #[serde(default = "default_sinks")]
        sinks: usize,
        /// Query statistics from the span's last `window` scored positions
        /// only; 0 (the default, as kvpress) takes every scored position.
        #[serde(default)]
        window: usize,
        /// Use the queries' covariance (default true).
        #[serde(default = "default_true")]
        covariance: bool,
        /// Multiply by the values' L2 norms (default true).
        #[serde(default = "default_true")]
        vnorm: bool,
    },
}

fn default_sinks() -> usize {
    4
}

fn default_window() -> usize {
    32
}

fn default_kernel() -> usize {
    7
}

fn default_future() -> usize {
    512
}

fn default_true() -> bool {
    true
}

impl Baseline {
    /// Every baseline with its default parameters.
    pub fn all() -> [Baseline; 7] {
        [
            Baseline::Random { seed: 0 },
            Baseline::StreamingLlm {
                sinks: default_sinks(),
            },
            Baseline::KeyNorm,
            Baseline::H2o,
            Baseline::SnapKv {
                window: default_window(),
                kernel: default_kernel(),
            },
            Baseline::Tova,
            Baseline::ExpectedAttention {
                future: default_future(),
                sinks: default_sinks(),
                window: 0,
                covariance: true,
                vnorm: true,
            },
        ]
    }

    /// CLI name: `random`, `streaming_llm`, `key_norm`, `h2o`, `snapkv`,
    /// `tova` or `expected_attention`.
    pub fn name(&self) -> &'static str {
        match self {
            Baseline::Random { .. } => "random",
            Baseline::StreamingLlm { .. } => "streaming_llm",
            Baseline::KeyNorm => "key_norm",
            Baseline::H2o => "h2o",
            Baseline::SnapKv { .. } => "snapkv",
            Baseline::Tova => "tova",
            Baseline::ExpectedAttention { .. } => "expected_attention",
        }
    }

    /// Parses a CLI name, optionally with parameters after a colon:
    /// `random:seed=3`, `streaming_llm:sinks=2`, `snapkv:window=16,kernel=5`,
    /// `expected_attention:future=256,sinks=4,window=0,covariance=1,vnorm=0`
    /// (flags are 0 or 1). Omitted parameters take their defaults.
    pub fn parse(s: &str) -> Result<Baseline> {
        let (name, params) = s.split_once(':').unwrap_or((s, ""));
        let mut out = Baseline::all()
            .into_iter()
            .find(|b| b.name() == name.trim().to_ascii_lowercase().replace('-', "_"))
            .ok_or_else(|| {
                ModelError::Input(format!(
                    "unknown baseline `{name}` (known: random, streaming_llm, key_norm, h2o, snapkv, tova, expected_attention)"
                ))
            })?;
        for kv in params.split(',').filter(|p| !p.trim().is_empty()) {
            let (key, value) = kv.split_once('=').ok_or_else(|| {
                ModelError::Input(format!("baseline parameter `{kv}` is not k=v"))
            })?;
            let num = value.trim().parse::<u64>().map_err(|_| {
                ModelError::Input(format!("baseline parameter `{kv}`: not a number"))
            })?;
            let as_usize = || {
                usize::try_from(num)
                    .map_err(|_| ModelError::Input(format!("baseline parameter `{kv}` too large")))
            };
            let as_flag = || match num {
                0 => Ok(false),
                1 => Ok(true),
                _ => Err(ModelError::Input(format!(
                    "baseline parameter `{kv}`: a flag is 0 or 1"
                ))),
            };
            match (&mut out, key.trim()) {
                (Baseline::Random { seed }, "seed") => *seed = num,
                (Baseline::StreamingLlm { sinks }, "sinks") => *sinks = as_usize()?,
                (Baseline::SnapKv { window, .. }, "window") => *window = as_usize()?,
                (Baseline::SnapKv { kernel, .. }, "kernel") => *kernel = as_usize()?,
                (Baseline::ExpectedAttention { future, .. }, "future") => *future = as_usize()?,
                (Baseline::ExpectedAttention { sinks, .. }, "sinks") => *sinks = as_usize()?,
                (Baseline::ExpectedAttention { window, .. }, "window") => *window = as_usize()?,
                (Baseline::ExpectedAttention { covariance, .. }, "covariance") => {
                    *covariance = as_flag()?
                }
                (Baseline::ExpectedAttention { vnorm, .. }, "vnorm") => *vnorm = as_flag()?,
                (b, k) => {
                    return Err(ModelError::Input(format!(
                        "baseline `{}` has no parameter `{k}`",
                        b.name()
                    )))
                }
            }
        }
        out.check()?;
        Ok(out)
    }

    /// Whether the method's scores read attention (it observes a forward's
    /// attention probabilities or queries); the others score from the keys
    /// or positions alone, so a full cache made elsewhere serves them
    /// ([`baseline_scores_reusing`]).
    pub fn reads_attention(&self) -> bool {
        !matches!(
            self,
            Baseline::Random { .. } | Baseline::StreamingLlm { .. } | Baseline::KeyNorm
        )
    }

    /// Rejects parameters the method cannot use.
    fn check(&self) -> Result<()> {
        match *self {
            Baseline::SnapKv { window: 0, .. } => Err(ModelError::Input(
                "snapkv needs an observation window of at least 1".into(),
            )),
            Baseline::SnapKv { kernel, .. } if kernel % 2 == 0 => Err(ModelError::Input(format!(
                "snapkv pooling kernel must be odd, got {kernel}"
            ))),
            Baseline::ExpectedAttention { future: 0, .. } => Err(ModelError::Input(
                "expected_attention needs at least 1 future position".into(),
            )),
            _ => Ok(()),
        }
    }
}

impl FromStr for Baseline {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self> {
        Baseline::parse(s)
    }
}

/// Scores every context position with `method` and returns them with the frozen
/// model's full cache over the contexts.
///
/// `ids` `[batch, lc]` are right-padded contexts of lengths `len`, with the
/// compressible `spans` of each. Returns scores `[batch, lc]` float32 on the CPU
/// (higher = keep; padding positions are −∞) for [`super::select::select`], and
/// the cache (no validity mask: entries at padding positions are garbage) from
/// which the caller gathers the kept positions ([`KvCache::gather`] +
/// [`KvCache::and_valid`]). Padding never affects the scores of real positions.
pub fn baseline_scores(
    model: &Model,
    method: &Baseline,
    ids: &Tensor,
    len: &[usize],
    spans: &[Vec<Span>],
) -> Result<(Tensor, KvCache)> {
    baseline_scores_reusing(model, method, ids, len, spans, None)
}

/// [`baseline_scores`], taking the frozen model's full cache over the same
/// `ids` from `full` when given (e.g. the one the evaluation's teacher
/// made; [`crate::model::Model::fill_cache`]) where the method reads no
/// attention (random, StreamingLLM, key norm): those then run no forward.
/// Methods that observe attention run their own forward regardless.
pub fn baseline_scores_reusing(
    model: &Model,
    method: &Baseline,
    ids: &Tensor,
    len: &[usize],
    spans: &[Vec<Span>],
    full: Option<&KvCache>,
) -> Result<(Tensor, KvCache)> {
    method.check()?;
    let method = &match *method {
        Baseline::Tova => Baseline::SnapKv {
            window: 1,
            kernel: 1,
        },
        m => m,
    };
    let (b, lc) = ids.size2().map_err(|_| {
        ModelError::Input(format!(
            "context ids must be [batch, len], got {:?}",
            ids.size()
        ))
    })?;
    let (bu, lcu) = (b as usize, lc as usize);
    if len.len() != bu || spans.len() != bu {
        return Err(ModelError::Input(format!(
            "{} lengths and {} span lists for a batch of {b}",
            len.len(),
            spans.len()
        )));
    }
    for (i, (&n, s)) in len.iter().zip(spans).enumerate() {
        if n == 0 || n > lcu {
            return Err(ModelError::Input(format!(
                "context {i} has length {n}, outside [1, {lc}]"
            )));
        }
        validate_spans(s, n)?;
    }
    let device = model.device();
    let ids = ids.to_device(device);
    let observer = match *method {
        Baseline::H2o => Some(Observer::h2o(len, lc, model.config().num_layers, device)),
        Baseline::SnapKv { window, .. } => Some(Observer::snapkv(
            spans,
            window,
            lc,
            model.config().num_layers,
            device,
        )),
        _ => None,
    };
    let expected = match *method {
        Baseline::ExpectedAttention {
            future,
            sinks,
            window,
            covariance,
            vnorm,
        } => Some(ExpectedAttention::new(
            model,
            len,
            spans,
            lc,
            ExpectedParams {
                future,
                sinks,
                window,
                covariance,
                vnorm,
            },
        )?),
        _ => None,
    };
    let hooks: &dyn Hooks = match (&observer, &expected) {
        (Some(o), _) => o,
        (None, Some(e)) => e,
        (None, None) => &NoHooks,
    };
    let cache = match (full, !method.reads_attention()) {
        (Some(full), true) => {
            let layer0 = full.layer(0);
            if full.len() != lc || layer0.is_none_or(|l| l.k.size()[0] != b) {
                return Err(ModelError::Input(format!(
                    "the reused cache holds {} positions of {:?} rows, not [{b}, {lc}]",
                    full.len(),
                    layer0.map(|l| l.k.size()[0])
                )));
            }
            full.shallow_clone()
        }
        _ => {
            let mut cache = model.new_cache();
            let _ = tch::no_grad(|| {
                model.forward_hidden_with(Input::new(&ids), Some(&mut cache), hooks)
            })?;
            cache
        }
    };

    let scores = tch::no_grad(|| -> Result<Tensor> {
        Ok(match *method {
            Baseline::Random { seed } => {
                let host = Vec::<i64>::try_from(
                    ids.to_device(Device::Cpu)
                        .to_kind(Kind::Int64)
                        .flatten(0, -1),
                )?;
                host_scores(bu, lcu, |i, row| {
                    random_row(seed, &host[i * lcu..i * lcu + len[i]], row)
                })
            }
            Baseline::StreamingLlm { sinks } => {
                host_scores(bu, lcu, |i, row| streaming_row(&spans[i], sinks, row))
            }
            Baseline::KeyNorm => key_norm(&cache, b, lc)?,
            Baseline::H2o => {
                let layers = observer.map(Observer::into_layers).unwrap_or_default();
                let mut total = Tensor::zeros([b, lc], (Kind::Float, Device::Cpu));
                for l in layers {
                    total += l.to_device(Device::Cpu);
                }
                total
            }
            Baseline::SnapKv { kernel, .. } => {
                let layers = observer.map(Observer::into_layers).unwrap_or_default();
                snapkv_pool(layers, spans, kernel, b, lc)?
            }
            Baseline::ExpectedAttention { .. } => match expected {
                Some(e) => e.finish()?,
                None => unreachable!("made above for this method"),
            },
            Baseline::Tova => unreachable!("mapped to SnapKv above"),
        })
    })?;
    Ok((mask_padding(&scores, len)?, cache))
}

/// The question-aware SnapKV reference: `rows` are each context followed by
/// its question prompt; `queries[i]` = (start, len) of row i's prompt, whose
/// positions observe the attention to every span position of `ctx` (pooled
/// with `kernel`, summed over layers). Keeps the top-k of each span like the
/// question-agnostic methods, from the same forward's cache.
pub fn question_aware_compress(
    model: &Model,
    rows: &[Vec<u32>],
    ctx: Contexts,
    queries: &[(usize, usize)],
    kernel: usize,
) -> Result<Compressed> {
    let device = model.device();
    let (ids, _) = super::infer::pad_rows(rows, model.config().vocab_size, device)?;
    let (b, l) = ids.size2()?;
    let lu = l as usize;
    let mut query = vec![-2i64; rows.len() * lu];
    let mut key = vec![-1i64; rows.len() * lu];
    for (i, &(s, n)) in queries.iter().enumerate() {
        query[i * lu + s..i * lu + s + n].fill(0);
        for &(ks, kn) in &ctx.spans[i] {
            key[i * lu + ks..i * lu + ks + kn].fill(0);
        }
    }
    let observer = Observer {
        query: Tensor::from_slice(&query).view([b, l]).to_device(device),
        key_span: Some(Tensor::from_slice(&key).view([b, l]).to_device(device)),
        rows: None,
        lc: l,
        acc: RefCell::new((0..model.config().num_layers).map(|_| None).collect()),
    };
    let mut cache = model.new_cache();
    tch::no_grad(|| -> Result<Compressed> {
        let _ = model.forward_hidden_with(Input::new(&ids), Some(&mut cache), &observer)?;
        let scores = snapkv_pool(observer.into_layers(), ctx.spans, kernel, b, l)?;
        let scores = mask_padding(&scores, ctx.len)?;
        let host = Vec::<f32>::try_from(scores.flatten(0, -1))?;
        super::infer::keep_top(&cache, &host, l, ctx, device)
    })
}

/// Scores `[batch, lc]` filled row by row on the host.
fn host_scores(b: usize, lc: usize, mut fill: impl FnMut(usize, &mut [f32])) -> Tensor {
    let mut out = vec![0f32; b * lc];
    for (i, row) in out.chunks_mut(lc.max(1)).enumerate() {
        fill(i, row);
    }
    Tensor::from_slice(&out).view([b as i64, lc as i64])
}

/// Sets positions at or past each context's length to −∞.
fn mask_padding(scores: &Tensor, len: &[usize]) -> Result<Tensor> {
    let (b, lc) = scores.size2()?;
    let pad: Vec<bool> = len
        .iter()
        .flat_map(|&n| (0..lc as usize).map(move |p| p >= n))
        .collect();
    let pad = Tensor::from_slice(&pad).view([b, lc]);
    Ok(scores
        .to_device(Device::Cpu)
        .to_kind(Kind::Float)
        .f_masked_fill(&pad, f64::NEG_INFINITY)?)
}

/// SplitMix64's finaliser: a well-mixed 64-bit function of `z`.
fn mix(z: u64) -> u64 {
    let mut z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Uniform [0, 1) scores for the context `tokens`.
fn random_row(seed: u64, tokens: &[i64], out: &mut [f32]) {
    let mut h = mix(mix(seed) ^ tokens.len() as u64);
    for &t in tokens {
        h = mix(h ^ t as u64);
    }
    for (p, o) in out.iter_mut().enumerate() {
        // 24 random bits: exactly representable in f32.
        *o = (mix(h ^ p as u64) >> 40) as f32 / (1u32 << 24) as f32;
    }
}

/// StreamingLLM scores: in a span of n positions the first `sinks` score above
/// n (earlier higher), the rest their offset (later higher); 0 outside spans.
fn streaming_row(spans: &[Span], sinks: usize, out: &mut [f32]) {
    for &(s, n) in spans {
        for j in 0..n {
            out[s + j] = if j < sinks {
                (n + sinks - j) as f32
            } else {
                j as f32
            };
        }
    }
}

/// −(mean over layers and KV heads of the post-RoPE key's L2 norm) `[b, lc]`.
fn key_norm(cache: &KvCache, b: i64, lc: i64) -> Result<Tensor> {
    let layers = cache.num_layers();
    let mut total = Tensor::zeros([b, lc], (Kind::Float, Device::Cpu));
    for i in 0..layers {
        let kv = cache
            .layer(i)
            .ok_or_else(|| ModelError::Input(format!("layer {i} of the cache is empty")))?;
        let norms =
            kv.k.to_kind(Kind::Float)
                .f_norm_scalaropt_dim(2, [-1].as_slice(), false)?
                .f_mean_dim([1].as_slice(), false, Kind::Float)?;
        total += norms.narrow(1, 0, lc).to_device(Device::Cpu);
    }
    Ok(-(total / layers.max(1) as f64))
}

/// Sums per-layer SnapKV statistics after max-pooling each within its spans.
fn snapkv_pool(
    layers: Vec<Tensor>,
    spans: &[Vec<Span>],
    kernel: usize,
    b: i64,
    lc: i64,
) -> Result<Tensor> {
    let k = kernel as i64;
    let out = Tensor::zeros([b, lc], (Kind::Float, Device::Cpu));
    for layer in layers {
        let layer = layer.to_device(Device::Cpu);
        for (i, row) in spans.iter().enumerate() {
            for &(s, n) in row {
                let (s, n) = (s as i64, n as i64);
                let raw = layer.get(i as i64).narrow(0, s, n).view([1, 1, n]);
                let pooled = raw.f_max_pool1d([k], [1], [k / 2], [1], false)?.view([n]);
                let mut dst = out.get(i as i64).narrow(0, s, n);
                dst += pooled;
            }
        }
    }
    Ok(out)
}

/// Gathers H2O or SnapKV statistics (or any weighted sum of query rows) from
/// observed attention probabilities, one `[batch, lc]` float32 tensor per layer.
pub(crate) struct Observer {
    /// Per query `[batch, lc]`. H2O: 1.0 at real queries, else 0 (float32).
    /// SnapKV: the index of the span whose window holds the query, else −2 (int64).
    query: Tensor,
    /// SnapKV only: the span index of each key position (−1 outside spans).
    key_span: Option<Tensor>,
    /// The query positions `[batch, n]` that `query` weighs (then `[batch,
    /// n]` too), when only some are observed ([`Hooks::attention_rows`]).
    rows: Option<Tensor>,
    /// Context length (keys per query).
    lc: i64,
    /// Per layer, the statistic so far.
    acc: RefCell<Vec<Option<Tensor>>>,
}

impl Observer {
    /// H2O: every real query counts.
    fn h2o(len: &[usize], lc: i64, layers: usize, device: Device) -> Observer {
        let real: Vec<f32> = len
            .iter()
            .flat_map(|&n| (0..lc as usize).map(move |p| if p < n { 1.0 } else { 0.0 }))
            .collect();
        Observer::weighted(
            Tensor::from_slice(&real)
                .view([len.len() as i64, lc])
                .to_device(device),
            layers,
        )
    }

    /// The head-summed attention mass each key receives from the queries
    /// weighted by `query` `[batch, len]` (float32, one weight per position of
    /// the observed pass, which attends over `len` keys).
    pub(crate) fn weighted(query: Tensor, layers: usize) -> Observer {
        let lc = query.size()[1];
        Observer {
            query,
            key_span: None,
            rows: None,
            lc,
            acc: RefCell::new((0..layers).map(|_| None).collect()),
        }
    }

    /// [`Observer::weighted`] with the weights `weights` `[batch, n]` of the
    /// queries at positions `rows` `[batch, n]` (int64; the other queries
    /// weigh 0) of a pass over `keys` positions: the attention is computed
    /// for those rows alone, a fraction of every query's when they are few.
    pub(crate) fn weighted_rows(
        rows: Tensor,
        weights: Tensor,
        keys: i64,
        layers: usize,
    ) -> Observer {
        Observer {
            query: weights,
            key_span: None,
            rows: Some(rows),
            lc: keys,
            acc: RefCell::new((0..layers).map(|_| None).collect()),
        }
    }

    /// The sum over observed layers `[batch, keys]` (zeros when none was observed).
    pub(crate) fn total(self) -> Tensor {
        let b = self.query.size()[0];
        let zeros = Tensor::zeros([b, self.lc], (Kind::Float, self.query.device()));
        self.acc
            .into_inner()
            .into_iter()
            .flatten()
            .fold(zeros, |acc, t| acc + t)
    }

    /// SnapKV: the last `window` queries of each span count, for that span's keys.
    fn snapkv(
        spans: &[Vec<Span>],
        window: usize,
        lc: i64,
        layers: usize,
        device: Device,
    ) -> Observer {
        let lcu = lc as usize;
        let mut query = vec![-2i64; spans.len() * lcu];
        let mut key = vec![-1i64; spans.len() * lcu];
        for (i, row) in spans.iter().enumerate() {
            for (j, &(s, n)) in row.iter().enumerate() {
                let base = i * lcu;
                key[base + s..base + s + n].fill(j as i64);
                query[base + s + n - window.min(n)..base + s + n].fill(j as i64);
            }
        }
        let shape = [spans.len() as i64, lc];
        Observer {
            query: Tensor::from_slice(&query).view(shape).to_device(device),
            key_span: Some(Tensor::from_slice(&key).view(shape).to_device(device)),
            rows: None,
            lc,
            acc: RefCell::new((0..layers).map(|_| None).collect()),
        }
    }

    /// The per-layer statistics (zeros for a layer never observed).
    fn into_layers(self) -> Vec<Tensor> {
        let zeros = || Tensor::zeros_like(&self.query).to_kind(Kind::Float);
        self.acc
            .into_inner()
            .into_iter()
            .map(|t| t.unwrap_or_else(zeros))
            .collect()
    }
}

impl Hooks for Observer {
    fn wants_attention(&self, _layer: usize) -> bool {
        true
    }

    fn attention_rows(&self, _layer: usize) -> Option<Tensor> {
        self.rows.as_ref().map(Tensor::shallow_clone)
    }

    fn observe_attention(&self, layer: usize, q_start: i64, probs: &Tensor) -> Result<()> {
        let (_, _, n, keys) = probs.size4()?;
        if keys != self.lc {
            return Err(ModelError::Input(format!(
                "observed attention over {keys} keys, expected the {} context positions",
                self.lc
            )));
        }
        let query = self.query.narrow(1, q_start, n);
        let got =
            match &self.key_span {
                // [b, 1, n] x [b, n, keys]: head-summed mass from real queries.
                None => query
                    .unsqueeze(1)
                    .f_matmul(&probs.f_sum_dim_intlist([1].as_slice(), false, Kind::Float)?)?
                    .squeeze_dim(1),
                Some(key_span) => {
                    let own = query
                        .unsqueeze(2)
                        .f_eq_tensor(&key_span.unsqueeze(1))?
                        .to_kind(Kind::Float);
                    (probs.f_mean_dim([1].as_slice(), false, Kind::Float)? * own)
                        .f_sum_dim_intlist([1].as_slice(), false, Kind::Float)?
                }
            };
        let mut acc = self.acc.borrow_mut();
        let slot = acc
            .get_mut(layer)
            .ok_or_else(|| ModelError::Input(format!("no layer {layer} to observe")))?;
        *slot = Some(match slot.take() {
            Some(a) => a + got,
            None => got,
        });
        Ok(())
    }
}

/// The parameters of [`Baseline::ExpectedAttention`].
#[derive(Debug, Clone, Copy)]
struct ExpectedParams {
    future: usize,
    sinks: usize,
    window: usize,
    covariance: bool,
    vnorm: bool,
}

/// One span as [`Baseline::ExpectedAttention`] sees it.
#[derive(Debug, Clone, Copy)]
struct ScoredSpan {
    /// First position.
    start: usize,
    /// Positions.
    n: usize,
    /// Sinks at its start, min(sinks, n); the rest are scored.
    sinks: usize,
    /// Queries of the statistics: the last `queries` scored positions.
    queries: usize,
}

/// [`Baseline::ExpectedAttention`]: the scores, accumulated layer by layer from
/// what the forward hands to [`Hooks::observe_qkv`].
struct ExpectedAttention {
    params: ExpectedParams,
    /// Per row, its spans.
    spans: Vec<Vec<ScoredSpan>>,
    /// Per layer, its RoPE's cos and signed sin averaged over each row's
    /// future positions, `[batch, 1, 1, head_dim]` float32 (see [`rotate`]).
    rotation: Vec<(Tensor, Tensor)>,
    /// The model's q·k scale σ.
    scale: f64,
    /// The scores so far `[batch, lc]` float32, on the model's device
    /// (updated in place, through views).
    acc: Tensor,
}

impl ExpectedAttention {
    fn new(
        model: &Model,
        len: &[usize],
        spans: &[Vec<Span>],
        lc: i64,
        params: ExpectedParams,
    ) -> Result<Self> {
        let cfg = model.config();
        let device = model.device();
        let future: Vec<i64> = len
            .iter()
            .flat_map(|&n| (n..n + params.future).map(|p| p as i64))
            .collect();
        let future = Tensor::from_slice(&future)
            .f_view([len.len() as i64, params.future as i64])?
            .f_to_device(device)?;
        let mut per_kind: Vec<(LayerKind, Tensor, Tensor)> = Vec::new();
        let mut rotation = Vec::with_capacity(cfg.num_layers);
        for layer in 0..cfg.num_layers {
            let kind = *cfg.layer_kinds.get(layer).ok_or_else(|| {
                ModelError::Input(format!("the configuration has no kind for layer {layer}"))
            })?;
            if !per_kind.iter().any(|(k, _, _)| *k == kind) {
                let rope = Rope::new(cfg.rope_for(kind), cfg.head_dim, device);
                let (cos, sin) = rope.cos_sin(&future, Kind::Float)?;
                per_kind.push((
                    kind,
                    cos.f_mean_dim([2].as_slice(), true, Kind::Float)?,
                    sin.f_mean_dim([2].as_slice(), true, Kind::Float)?,
                ));
            }
            if let Some((_, cos, sin)) = per_kind.iter().find(|(k, _, _)| *k == kind) {
                rotation.push((cos.shallow_clone(), sin.shallow_clone()));
            }
        }
        let spans = spans
            .iter()
            .map(|row| {
                row.iter()
                    .map(|&(start, n)| {
                        let sinks = params.sinks.min(n);
                        let scored = n - sinks;
                        let queries = match params.window {
                            0 => scored,
                            w => w.min(scored),
                        };
                        ScoredSpan {
                            start,
                            n,
                            sinks,
                            queries,
                        }
                    })
                    .collect()
            })
            .collect();
        Ok(ExpectedAttention {
            params,
            spans,
            rotation,
            scale: cfg.attn_scale,
            acc: Tensor::zeros([len.len() as i64, lc], (Kind::Float, device)),
        })
    }

    /// The scores `[batch, lc]` on the CPU, sinks set.
    fn finish(self) -> Result<Tensor> {
        let acc = self.acc.f_to_device(Device::Cpu)?;
        for (i, row) in self.spans.iter().enumerate() {
            for sp in row.iter().filter(|sp| sp.sinks > 0) {
                let span = acc
                    .f_get(i as i64)?
                    .f_narrow(0, sp.start as i64, sp.n as i64)?;
                let top = if sp.n > sp.sinks {
                    span.f_narrow(0, sp.sinks as i64, (sp.n - sp.sinks) as i64)?
                        .f_max()?
                        .f_double_value(&[])?
                } else {
                    0.0
                };
                let _ = span.f_narrow(0, 0, sp.sinks as i64)?.f_fill_(top + 1.0)?;
            }
        }
        Ok(acc)
    }
}

/// `x` `[.., head_dim]` through the averaged RoPE rotation R̄ whose cos and
/// signed sin are `cos`, `sin` (broadcast against `x`): R̄x = x ⊙ cos +
/// roll(x, head_dim / 2) ⊙ sin, the rotation of [`crate::model::rope::apply`]
/// with the tables averaged (it is linear in them).
fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.size().last().copied().unwrap_or(0) / 2;
    Ok(x.f_mul(cos)?.f_add(&x.f_roll([half], [-1])?.f_mul(sin)?)?)
}

impl Hooks for ExpectedAttention {
    fn observe_qkv(&self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<()> {
        let (cos, sin) = self
            .rotation
            .get(layer)
            .ok_or_else(|| ModelError::Input(format!("no layer {layer} to observe")))?;
        let (_, heads, _, d) = q.size4()?;
        let kv_heads = k.size4()?.1;
        let group = heads / kv_heads;
        let f = Kind::Float;
        for (i, row) in self.spans.iter().enumerate() {
            let i = i as i64;
            let (qi, ki, vi) = (q.f_get(i)?, k.f_get(i)?, v.f_get(i)?);
            let (cos, sin) = (cos.f_get(i)?, sin.f_get(i)?);
            for sp in row.iter().filter(|sp| sp.n > sp.sinks) {
                let (first, m) = ((sp.start + sp.sinks) as i64, (sp.n - sp.sinks) as i64);
                // Statistics of the queries `[heads, count, d]`.
                let count = sp.queries as i64;
                let queries = qi
                    .f_narrow(1, (sp.start + sp.n) as i64 - count, count)?
                    .f_to_kind(f)?;
                let mean = queries.f_mean_dim([1].as_slice(), true, f)?;
                // [kv, 1, m, d]: each key against the heads of its group.
                let keys = ki.f_narrow(1, first, m)?.f_to_kind(f)?.f_unsqueeze(1)?;
                let mut logits = rotate(&mean, &cos, &sin)?
                    .f_view([kv_heads, group, 1, d])?
                    .f_matmul(&keys.f_transpose(2, 3)?)?
                    .f_squeeze_dim(2)?
                    .f_mul_scalar(self.scale)?;
                if self.params.covariance {
                    let centered = queries.f_sub(&mean)?;
                    let cov = centered
                        .f_transpose(1, 2)?
                        .f_matmul(&centered)?
                        .f_div_scalar(count as f64)?;
                    // R̄ Σ R̄ᵀ: rows rotated (Σ R̄ᵀ), transposed (R̄ Σ), rows rotated.
                    let cov = rotate(&rotate(&cov, &cos, &sin)?.f_transpose(1, 2)?, &cos, &sin)?;
                    let quad = keys
                        .f_matmul(&cov.f_view([kv_heads, group, d, d])?)?
                        .f_mul(&keys)?
                        .f_sum_dim_intlist([-1].as_slice(), false, f)?;
                    logits = logits.f_add(&quad.f_mul_scalar(self.scale * self.scale / 2.0)?)?;
                }
                // [kv, m]: softmax over the span's keys, mean over the group.
                let mut score = logits
                    .f_softmax(-1, f)?
                    .f_mean_dim([1].as_slice(), false, f)?;
                if self.params.vnorm {
                    let norms = vi
                        .f_narrow(1, first, m)?
                        .f_to_kind(f)?
                        .f_norm_scalaropt_dim(2, [-1].as_slice(), false)?;
                    score = score.f_mul(&norms)?;
                }
                let score = score.f_mean_dim([0].as_slice(), false, f)?;
                let _ = self.acc.f_get(i)?.f_narrow(0, first, m)?.f_add_(&score)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{RopeConfig, RopeScaling};

    /// cos and signed sin `[1, 1, future, d]` of positions `start ..`.
    fn tables(d: usize, start: i64, future: i64) -> (Tensor, Tensor) {
        let cfg = RopeConfig {
            theta: 10_000.0,
            scaling: RopeScaling::None,
        };
        let pos = Tensor::arange_start(start, start + future, (Kind::Int64, Device::Cpu));
        Rope::new(&cfg, d, Device::Cpu)
            .cos_sin(&pos.unsqueeze(0), Kind::Float)
            .unwrap()
    }

    #[test]
    fn averaged_rotation_is_kvpress_mean_rope_matrix() {
        let (d, future) = (8i64, 37);
        let (cos, sin) = tables(d as usize, 11, future);
        // kvpress: R_t = cos_t I + sin_t P, P = [[0, -I], [I, 0]], averaged over t.
        let half = d / 2;
        let p = Tensor::zeros([d, d], (Kind::Float, Device::Cpu));
        p.narrow(0, half, half)
            .narrow(1, 0, half)
            .copy_(&Tensor::eye(half, (Kind::Float, Device::Cpu)));
        p.narrow(0, 0, half)
            .narrow(1, half, half)
            .copy_(&(-Tensor::eye(half, (Kind::Float, Device::Cpu))));
        let (c, s) = (cos.view([future, d]), sin.view([future, d]));
        // The signed sin is [-sin, sin]: its second half, twice, is sin_t.
        let unsigned = s.narrow(1, half, half).repeat([1, 2]);
        let eye = Tensor::eye(d, (Kind::Float, Device::Cpu));
        let r = (c.unsqueeze(2) * &eye + unsigned.unsqueeze(2) * p.unsqueeze(0)).mean_dim(
            [0].as_slice(),
            false,
            Kind::Float,
        );
        let x = Tensor::randn([3, 5, d], (Kind::Float, Device::Cpu));
        let want = x.matmul(&r.transpose(0, 1));
        let (cm, sm) = (
            cos.mean_dim([2].as_slice(), true, Kind::Float).view([d]),
            sin.mean_dim([2].as_slice(), true, Kind::Float).view([d]),
        );
        let got = rotate(&x, &cm, &sm).unwrap();
        assert!(got.allclose(&want, 1e-5, 1e-6, false));
        // R Σ Rᵀ as rows rotated, transposed, rows rotated.
        let sigma = x.get(0).transpose(0, 1).matmul(&x.get(0));
        let want = r.matmul(&sigma).matmul(&r.transpose(0, 1));
        let got = rotate(&rotate(&sigma, &cm, &sm).unwrap().transpose(0, 1), &cm, &sm).unwrap();
        assert!(got.allclose(&want, 1e-5, 1e-5, false));
    }

    /// The target of the selection loss computed from the chosen query rows
    /// alone equals the one from every query's attention weighted 0/1, under
    /// the causal fast path and under an explicit mask (given positions).
    #[test]
    fn observing_only_the_weighted_rows_gives_the_same_statistic() {
        let model = crate::model::Model::tiny_random(3, 3);
        // Three right-padded rows; the queries of row i are its last `sufs[i]` tokens.
        let (lens, sufs, l) = ([11usize, 7, 9], [3usize, 2, 4], 11i64);
        let ids = Tensor::randint_low(3, 200, [3, l], (Kind::Int64, Device::Cpu));
        let lx = *sufs.iter().max().unwrap();
        let mut dense = vec![0f32; 3 * l as usize];
        let (mut rows, mut weights) = (vec![0i64; 3 * lx], vec![0f32; 3 * lx]);
        for i in 0..3 {
            let first = lens[i] - sufs[i];
            dense[i * l as usize + first..i * l as usize + lens[i]].fill(1.0);
            for j in 0..lx {
                rows[i * lx + j] = (first + j.min(sufs[i] - 1)) as i64;
                weights[i * lx + j] = if j < sufs[i] { 1.0 } else { 0.0 };
            }
        }
        let layers = 3;
        let dense = Tensor::from_slice(&dense).view([3, l]);
        let (rows, weights) = (
            Tensor::from_slice(&rows).view([3, lx as i64]),
            Tensor::from_slice(&weights).view([3, lx as i64]),
        );
        let positions = Tensor::arange(l, (Kind::Int64, Device::Cpu))
            .unsqueeze(0)
            .repeat([3, 1]);
        for explicit in [false, true] {
            let input = || {
                let input = Input::new(&ids);
                if explicit {
                    input.with_positions(&positions)
                } else {
                    input
                }
            };
            let all = Observer::weighted(dense.shallow_clone(), layers);
            let some =
                Observer::weighted_rows(rows.shallow_clone(), weights.shallow_clone(), l, layers);
            tch::no_grad(|| {
                let _ = model.forward_hidden_with(input(), None, &all).unwrap();
                let _ = model.forward_hidden_with(input(), None, &some).unwrap();
            });
            let (want, got) = (all.total(), some.total());
            assert_eq!(got.size(), [3, l]);
            // Every weighted query spreads mass 1 per head over its keys.
            let mass = want.sum(Kind::Float).double_value(&[]);
            let per_query = (layers * model.config().num_heads) as f64;
            assert!((mass - per_query * 9.0).abs() < 1e-3, "mass {mass}");
            assert!(
                got.allclose(&want, 1e-5, 1e-6, false),
                "explicit mask: {explicit}"
            );
        }
    }

    #[test]
    fn one_future_position_is_plain_rope() {
        let (cos, sin) = tables(16, 42, 1);
        let x = Tensor::randn([2, 3, 1, 16], (Kind::Float, Device::Cpu));
        let got = rotate(&x, &cos, &sin).unwrap();
        assert!(got.equal(&crate::model::rope::apply(&x, &cos, &sin)));
    }
}
