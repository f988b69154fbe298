//! A compressed context on disk: every layer's kept K/V, their original
//! positions and the next position, in a safetensors file whose `kv_distill_cache`
//! metadata names the base model (config hash), the method and ratio, and the
//! sizes that prove the compression (kept vs. source entries).

use super::checkpoint::{config_hash, read_with_meta};
use super::config::ScoreFeed;
use super::select::{Selection, Span};
use super::student::Compressed;
use crate::error::{ModelError, Result};
use crate::model::{KvCache, LayerKv, Model};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Metadata of a compressed-cache file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheMeta {
    /// Format version.
    pub format: u32,
    /// Base model name.
    pub base_model: String,
    /// sha256 of the base model's configuration ([`config_hash`]).
    pub base_config_hash: String,
    /// Compression method (`kv_distill`, `full`, or a baseline's name).
    pub method: String,
    /// The adaptor file and its training step, for `kv_distill`.
    pub adaptor: Option<String>,
    /// Retention ratio.
    pub ratio: f64,
    /// Tokens of the source context (the next position).
    pub context_len: usize,
    /// Compressed spans of the source context.
    pub spans: Vec<Span>,
    /// Entries kept per layer.
    pub kept: usize,
}

/// One compressed context, ready to be saved or continued.
#[derive(Debug)]
pub struct CompressedCache {
    /// Per-layer K/V of the kept positions (batch 1), original positions.
    pub cache: KvCache,
    /// What it is.
    pub meta: CacheMeta,
    /// The additive attention bias `[1, kept]` (float32) every later decoder
    /// pass puts on the kept entries, when the adaptor's score feed changes
    /// the forward pass (stored as tensor `feed_bias`).
    pub feed_bias: Option<Tensor>,
}

impl CompressedCache {
    /// Takes example 0 of a batch-1 [`Compressed`]; checks that it holds exactly
    /// the kept positions (everything outside the spans plus k per span).
    pub fn from_compressed(comp: Compressed, mut meta: CacheMeta) -> Result<Self> {
        let sel = match comp.selections.as_slice() {
            [s] => s,
            _ => {
                return Err(ModelError::Input(
                    "a cache file holds one compressed context".into(),
                ))
            }
        };
        let want = meta.context_len - meta.spans.iter().map(|s| s.1).sum::<usize>()
            + meta
                .spans
                .iter()
                .map(|s| super::config::kept_count(s.1, meta.ratio))
                .sum::<usize>();
        if sel.kept.len() != want || comp.cache.len() as usize != want {
            return Err(ModelError::Input(format!(
                "compressed cache holds {} entries, expected {want}",
                comp.cache.len()
            )));
        }
        meta.kept = want;
        let feed_bias = comp
            .feed_bias(None, 0)?
            .map(|b| b.detach().to_kind(Kind::Float));
        Ok(CompressedCache {
            cache: comp.cache,
            meta,
            feed_bias,
        })
    }

    /// Bytes of K/V held.
    pub fn memory_bytes(&self) -> usize {
        self.cache.memory_bytes()
    }

    /// Bytes the uncompressed context's K/V would take.
    pub fn full_memory_bytes(&self) -> usize {
        self.memory_bytes() / self.meta.kept.max(1) * self.meta.context_len
    }

    /// A batch-1 [`Compressed`] for [`super::infer::generate_batch`] and friends.
    pub fn into_compressed(self) -> Compressed {
        let n = self.cache.len();
        let device = self
            .cache
            .positions()
            .map(|p| p.device())
            .unwrap_or(Device::Cpu);
        Compressed {
            cache: self.cache,
            selections: vec![Selection {
                kept: Vec::new(),
                from_span: Vec::new(),
            }],
            // The stored bias is re-applied as a direct feed of itself.
            slot_scores: match &self.feed_bias {
                Some(b) => b.shallow_clone(),
                None => Tensor::zeros([1, n], (Kind::Float, device)),
            },
            span_slot: Tensor::ones([1, n], (Kind::Float, device)),
            ctx_len: vec![self.meta.context_len],
            feed: self.feed_bias.as_ref().map(|_| ScoreFeed::Direct),
        }
    }

    /// Writes the cache (K/V in their own dtype) and its metadata to `path`.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut named: Vec<(String, Tensor)> = Vec::new();
        for i in 0..self.cache.num_layers() {
            let l = self
                .cache
                .layer(i)
                .ok_or_else(|| ModelError::Input(format!("layer {i} of the cache is empty")))?;
            named.push((format!("layers.{i}.k"), l.k.shallow_clone()));
            named.push((format!("layers.{i}.v"), l.v.shallow_clone()));
        }
        let positions = self
            .cache
            .positions()
            .ok_or_else(|| ModelError::Input("cannot save an empty cache".into()))?;
        named.push(("positions".into(), positions.shallow_clone()));
        if let Some(b) = &self.feed_bias {
            named.push(("feed_bias".into(), b.shallow_clone()));
        }
        let mut bufs = Vec::with_capacity(named.len());
        for (name, t) in &named {
            let t = t.detach().to_device(Device::Cpu).contiguous();
            let dtype = match t.kind() {
                Kind::Float => safetensors::Dtype::F32,
                Kind::BFloat16 => safetensors::Dtype::BF16,
                Kind::Half => safetensors::Dtype::F16,
                Kind::Int64 => safetensors::Dtype::I64,
                k => return Err(ModelError::Input(format!("cannot store {k:?} tensors"))),
            };
            let n = t.numel();
            let mut bytes = vec![0u8; n * t.kind().elt_size_in_bytes()];
            t.f_copy_data_u8(&mut bytes, n)?;
            let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
            bufs.push((name.clone(), dtype, shape, bytes));
        }
        let views = bufs
            .iter()
            .map(|(name, dtype, shape, bytes)| {
                safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
                    .map(|v| (name.clone(), v))
                    .map_err(|e| ModelError::Safetensors {
                        path: path.to_path_buf(),
                        msg: format!("tensor `{name}`: {e}"),
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let meta =
            serde_json::to_string(&self.meta).map_err(|e| ModelError::Input(e.to_string()))?;
        let metadata = HashMap::from([("kv_distill_cache".to_string(), meta)]);
        safetensors::serialize_to_file(views, Some(metadata), path).map_err(|e| {
            ModelError::Safetensors {
                path: path.to_path_buf(),
                msg: format!("cannot write: {e}"),
            }
        })
    }

    /// Reads a cache file for `model` (refusing one made with another base
    /// model, or whose tensors do not fit it) onto the model's device and kind.
    pub fn load(path: &Path, model: &Model) -> Result<Self> {
        let bad = |msg: String| ModelError::Safetensors {
            path: path.to_path_buf(),
            msg,
        };
        let (bytes, meta): (_, CacheMeta) =
            read_with_meta(path, "kv_distill_cache", "not a compressed cache", "cache")?;
        let cfg = model.config();
        let want = config_hash(cfg);
        if meta.base_config_hash != want {
            return Err(bad(format!(
                "cache was made with base model `{}` (config hash {}), not this one ({want})",
                meta.base_model, meta.base_config_hash
            )));
        }
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| bad(format!("corrupt: {e}")))?;
        let device = model.device();
        let read = |name: &str, shape: &[i64]| -> Result<Tensor> {
            let view = st
                .tensor(name)
                .map_err(|_| bad(format!("tensor `{name}` is missing")))?;
            let got: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            let kind = match view.dtype() {
                safetensors::Dtype::F32 => Kind::Float,
                safetensors::Dtype::BF16 => Kind::BFloat16,
                safetensors::Dtype::F16 => Kind::Half,
                safetensors::Dtype::I64 => Kind::Int64,
                d => return Err(bad(format!("tensor `{name}` has unsupported dtype {d:?}"))),
            };
            if got != shape {
                return Err(bad(format!(
                    "tensor `{name}` has shape {got:?}, expected {shape:?}"
                )));
            }
            Ok(Tensor::f_from_data_size(view.data(), shape, kind)?.to_device(device))
        };
        let n = meta.kept as i64;
        let positions = read("positions", &[1, n])?;
        if positions.kind() != Kind::Int64 {
            return Err(bad("tensor `positions` must be I64".into()));
        }
        let host = Vec::<i64>::try_from(positions.to_device(Device::Cpu).flatten(0, -1))?;
        if host.windows(2).any(|w| w[0] >= w[1])
            || host
                .iter()
                .any(|&p| p < 0 || p as usize >= meta.context_len)
        {
            return Err(bad(format!(
                "positions are not ascending within the {}-token context",
                meta.context_len
            )));
        }
        let kv_shape = [1, cfg.num_kv_heads as i64, n, cfg.head_dim as i64];
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let k = read(&format!("layers.{i}.k"), &kv_shape)?;
            let v = read(&format!("layers.{i}.v"), &kv_shape)?;
            if !k.is_floating_point() || k.kind() != v.kind() {
                return Err(bad(format!("layer {i}: K/V must be floats of one dtype")));
            }
            layers.push(LayerKv {
                k: k.to_kind(model.kind()),
                v: v.to_kind(model.kind()),
            });
        }
        let next = Tensor::from_slice(&[meta.context_len as i64]).to_device(device);
        let cache = KvCache::from_parts(layers, positions, None, Some(next))?;
        let feed_bias = match st.tensor("feed_bias") {
            Ok(_) => {
                let b = read("feed_bias", &[1, n])?;
                if b.kind() != Kind::Float {
                    return Err(bad("tensor `feed_bias` must be F32".into()));
                }
                Some(b)
            }
            Err(_) => None,
        };
        Ok(CompressedCache {
            cache,
            meta,
            feed_bias,
        })
    }
}
