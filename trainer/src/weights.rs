//! Where weights come from: HF safetensors checkpoints (single file or sharded
//! with an index) and GGUF files. Both present weights under HF names.

use crate::config::Arch;
use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use memmap2::Mmap;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// A checkpoint that yields CPU tensors by their HF name.
pub trait WeightSource {
    /// The checkpoint's path (for messages).
    fn path(&self) -> &Path;
    /// The file holding `name` (for messages; defaults to the checkpoint's path).
    fn location(&self, _name: &str) -> PathBuf {
        self.path().to_path_buf()
    }
    /// Whether the checkpoint has this weight.
    fn contains(&self, name: &str) -> bool;
    /// Loads a weight as a CPU tensor in its stored (or dequantised) float kind.
    /// `shape` is what the model expects (the caller checks it; generated
    /// sources use it). `Ok(None)` when the checkpoint does not have it.
    fn load(&self, name: &str, shape: &[i64]) -> Result<Option<Tensor>>;
}

/// An HF safetensors checkpoint: `model.safetensors`, or shards listed by
/// `model.safetensors.index.json`. Files are memory-mapped.
pub struct SafetensorsDir {
    dir: PathBuf,
    files: Vec<(PathBuf, Mmap)>,
    /// Weight name -> (index into `files`).
    index: BTreeMap<String, usize>,
}

impl SafetensorsDir {
    /// Opens the checkpoint in `dir` and reads every file's header.
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let names: Vec<PathBuf> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|source| ModelError::Io {
                path: index_path.clone(),
                source,
            })?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|source| ModelError::Json {
                    path: index_path.clone(),
                    source,
                })?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::MissingField {
                    path: index_path.clone(),
                    field: "weight_map".into(),
                })?;
            let mut files: Vec<PathBuf> = map
                .values()
                .filter_map(|v| v.as_str())
                .map(|f| dir.join(f))
                .collect();
            files.sort();
            files.dedup();
            files
        } else if single.exists() {
            vec![single]
        } else {
            return Err(ModelError::MissingWeight {
                path: dir.to_path_buf(),
                name: "model.safetensors (or model.safetensors.index.json)".into(),
            });
        };
        let mut files = Vec::with_capacity(names.len());
        let mut index = BTreeMap::new();
        for path in names {
            let file = File::open(&path).map_err(|source| ModelError::Io {
                path: path.clone(),
                source,
            })?;
            // SAFETY: the file is opened read-only; the map lives as long as `self`.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|source| ModelError::Io {
                path: path.clone(),
                source,
            })?;
            let st = safetensors::SafeTensors::deserialize(&mmap).map_err(|e| {
                ModelError::Safetensors {
                    path: path.clone(),
                    msg: format!("not a valid safetensors file ({e})"),
                }
            })?;
            for name in st.names() {
                index.insert(name.to_string(), files.len());
            }
            files.push((path, mmap));
        }
        Ok(SafetensorsDir {
            dir: dir.to_path_buf(),
            files,
            index,
        })
    }
}

impl WeightSource for SafetensorsDir {
    fn path(&self) -> &Path {
        &self.dir
    }

    fn location(&self, name: &str) -> PathBuf {
        match self.index.get(name) {
            Some(&i) => self.files[i].0.clone(),
            None => self.dir.clone(),
        }
    }

    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn load(&self, name: &str, _shape: &[i64]) -> Result<Option<Tensor>> {
        let Some(&i) = self.index.get(name) else {
            return Ok(None);
        };
        let (path, mmap) = &self.files[i];
        let bad = |msg: String| ModelError::Safetensors {
            path: path.clone(),
            msg,
        };
        let st = safetensors::SafeTensors::deserialize(mmap)
            .map_err(|e| bad(format!("not a valid safetensors file ({e})")))?;
        let view = st
            .tensor(name)
            .map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
        use safetensors::Dtype;
        let kind = match view.dtype() {
            Dtype::F32 => Kind::Float,
            Dtype::F16 => Kind::Half,
            Dtype::BF16 => Kind::BFloat16,
            Dtype::F64 => Kind::Double,
            other => {
                return Err(bad(format!(
                    "tensor `{name}` has unsupported dtype {other:?}"
                )))
            }
        };
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        Ok(Some(Tensor::f_from_data_size(view.data(), &shape, kind)?))
    }
}

/// A GGUF file, with llama.cpp's tensor names and layout conventions undone
/// (Q/K row permutation for Llama, `+1` on Gemma norms).
pub struct GgufWeights<'a> {
    file: &'a GgufFile,
    arch: Arch,
    num_heads: usize,
    num_kv_heads: usize,
}

impl<'a> GgufWeights<'a> {
    /// Wraps an open GGUF file.
    pub fn new(file: &'a GgufFile, arch: Arch, num_heads: usize, num_kv_heads: usize) -> Self {
        GgufWeights {
            file,
            arch,
            num_heads,
            num_kv_heads,
        }
    }

    /// The GGUF tensor name of an HF weight name.
    fn gguf_name(&self, hf: &str) -> Option<String> {
        let gemma = self.arch == Arch::Gemma3;
        match hf {
            "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
            "model.norm.weight" => return Some("output_norm.weight".into()),
            "lm_head.weight" => return Some("output.weight".into()),
            _ => {}
        }
        let rest = hf.strip_prefix("model.layers.")?;
        let (layer, rest) = rest.split_once('.')?;
        let (module, suffix) = rest.rsplit_once('.')?;
        let gg = match module {
            "input_layernorm" => "attn_norm",
            "self_attn.q_proj" => "attn_q",
            "self_attn.k_proj" => "attn_k",
            "self_attn.v_proj" => "attn_v",
            "self_attn.o_proj" => "attn_output",
            "self_attn.q_norm" => "attn_q_norm",
            "self_attn.k_norm" => "attn_k_norm",
            "post_attention_layernorm" if gemma => "post_attention_norm",
            "post_attention_layernorm" => "ffn_norm",
            "pre_feedforward_layernorm" => "ffn_norm",
            "post_feedforward_layernorm" => "post_ffw_norm",
            "mlp.gate_proj" => "ffn_gate",
            "mlp.up_proj" => "ffn_up",
            "mlp.down_proj" => "ffn_down",
            _ => return None,
        };
        Some(format!("blk.{layer}.{gg}.{suffix}"))
    }
}

impl WeightSource for GgufWeights<'_> {
    fn path(&self) -> &Path {
        self.file.path()
    }

    fn contains(&self, name: &str) -> bool {
        self.gguf_name(name)
            .is_some_and(|g| self.file.tensor_info(&g).is_some())
    }

    fn load(&self, name: &str, _shape: &[i64]) -> Result<Option<Tensor>> {
        let Some(gg) = self.gguf_name(name) else {
            return Ok(None);
        };
        if self.file.tensor_info(&gg).is_none() {
            return Ok(None);
        }
        let (shape, data) = self.file.tensor_f32(&gg)?;
        let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        let mut t = Tensor::f_from_slice(&data)?.f_view(shape.as_slice())?;
        if self.arch == Arch::Llama && (gg.contains(".attn_q.") || gg.contains(".attn_k.")) {
            let heads = if gg.contains(".attn_q.") {
                self.num_heads
            } else {
                self.num_kv_heads
            };
            t = unpermute_rows(&t, heads as i64)?;
        }
        if self.arch == Arch::Gemma3 && gg.ends_with("norm.weight") {
            t -= 1.0;
        }
        Ok(Some(t))
    }
}

/// Undoes llama.cpp's interleaving of the rotary halves in Q/K rows:
/// rows `[h, d/2, 2]` become `[h, 2, d/2]`.
fn unpermute_rows(t: &Tensor, heads: i64) -> Result<Tensor> {
    let shape = t.size();
    let rows = shape[0];
    let half = rows / heads / 2;
    let mut view = vec![heads, half, 2];
    view.extend_from_slice(&shape[1..]);
    Ok(t.f_reshape(view.as_slice())?
        .transpose(1, 2)
        .f_reshape(shape.as_slice())?)
}

/// Random weights of any shape the model asks for: N(0, 0.02) matrices, unit
/// norms (zero for Gemma's `1 + w` norms), zero biases. For benchmarks at
/// realistic shapes without a checkpoint; deterministic for a given seed.
pub struct RandomWeights {
    arch: Arch,
    seed: i64,
}

impl RandomWeights {
    /// Random weights for an `arch` model, seeded.
    pub fn new(arch: Arch, seed: i64) -> Self {
        RandomWeights { arch, seed }
    }
}

impl WeightSource for RandomWeights {
    fn path(&self) -> &Path {
        Path::new("<random weights>")
    }

    fn contains(&self, _name: &str) -> bool {
        true
    }

    fn load(&self, name: &str, shape: &[i64]) -> Result<Option<Tensor>> {
        let opts = (Kind::Float, tch::Device::Cpu);
        let t = if name.ends_with(".bias") {
            Tensor::zeros(shape, opts)
        } else if shape.len() == 1 {
            if self.arch.norm_plus_one() {
                Tensor::zeros(shape, opts)
            } else {
                Tensor::ones(shape, opts)
            }
        } else {
            let _guard = tch::no_grad_guard();
            tch::manual_seed(self.seed.wrapping_add(name.len() as i64 * 7919));
            Tensor::randn(shape, opts) * 0.02
        };
        Ok(Some(t))
    }
}
