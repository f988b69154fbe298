//! Adaptor checkpoints: the scorer and LoRA tensors in a safetensors file whose
//! header metadata says which base model they belong to (identity + config
//! hash), the method settings and the training step. Loading onto another base
//! model is refused.

use super::adaptor::Adaptor;
use super::config::DistillConfig;
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// What an adaptor was trained on and with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdaptorMeta {
    /// Format version.
    pub format: u32,
    /// Base model name (file or directory name, or a user label).
    pub base_model: String,
    /// sha256 of the base model's normalised configuration.
    pub base_config_hash: String,
    /// Method settings (scorer layer, LoRA targets/rank/alpha, ...).
    pub distill: DistillConfig,
    /// Optimizer steps taken.
    pub step: u64,
}

/// sha256 over the normalised model configuration (architecture and shapes).
pub fn config_hash(cfg: &ModelConfig) -> String {
    let digest = Sha256::digest(format!("{cfg:?}").as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `adaptor` to `path` with its metadata.
pub fn save(
    adaptor: &Adaptor,
    base_model: &str,
    base: &ModelConfig,
    step: u64,
    path: &Path,
) -> Result<()> {
    let meta = AdaptorMeta {
        format: 1,
        base_model: base_model.to_string(),
        base_config_hash: config_hash(base),
        distill: adaptor.config().clone(),
        step,
    };
    let meta_json = serde_json::to_string(&meta).map_err(|e| ModelError::Input(e.to_string()))?;
    let mut named: Vec<(String, Tensor)> = adaptor.vs.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let mut bufs = Vec::with_capacity(named.len());
    for (name, t) in &named {
        let t = t
            .detach()
            .to_device(Device::Cpu)
            .to_kind(Kind::Float)
            .contiguous();
        let n = t.numel();
        let mut bytes = vec![0u8; n * 4];
        t.f_copy_data_u8(&mut bytes, n)?;
        bufs.push((name.clone(), t.size(), bytes));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = bufs
        .iter()
        .map(|(name, shape, bytes)| {
            let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape, bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| ModelError::Safetensors {
                    path: path.to_path_buf(),
                    msg: format!("tensor `{name}`: {e}"),
                })
        })
        .collect::<Result<_>>()?;
    let metadata = HashMap::from([("kv_distill".to_string(), meta_json)]);
    safetensors::serialize_to_file(views, Some(metadata), path).map_err(|e| {
        ModelError::Safetensors {
            path: path.to_path_buf(),
            msg: format!("cannot write: {e}"),
        }
    })
}

/// Reads a safetensors file whose header metadata `key` holds `T` as JSON;
/// errors name the file (`what_missing` when the key is absent, `label` in a
/// parse error). Returns the file's bytes and the metadata.
pub(crate) fn read_with_meta<T: serde::de::DeserializeOwned>(
    path: &Path,
    key: &str,
    what_missing: &str,
    label: &str,
) -> Result<(Vec<u8>, T)> {
    let bad = |msg: String| ModelError::Safetensors {
        path: path.to_path_buf(),
        msg,
    };
    let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| bad(format!("not a safetensors file ({e})")))?;
    let json = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(key))
        .ok_or_else(|| bad(format!("no `{key}` metadata: {what_missing}")))?;
    let meta = serde_json::from_str(json).map_err(|e| bad(format!("bad {label} metadata: {e}")))?;
    Ok((bytes, meta))
}

/// Loads an adaptor for `base` from `path` onto `device`; refuses one trained
/// for a model with another configuration.
pub fn load(path: &Path, base: &ModelConfig, device: Device) -> Result<(Adaptor, AdaptorMeta)> {
    let bad = |msg: String| ModelError::Safetensors {
        path: path.to_path_buf(),
        msg,
    };
    let (bytes, meta): (_, AdaptorMeta) =
        read_with_meta(path, "kv_distill", "not a kv-distill adaptor", "adaptor")?;
    let want = config_hash(base);
    if meta.base_config_hash != want {
        return Err(bad(format!(
            "adaptor was trained for base model `{}` (config hash {}), not this one (config hash {want})",
            meta.base_model, meta.base_config_hash
        )));
    }
    let st =
        safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("corrupt: {e}")))?;
    let adaptor = Adaptor::new(base, meta.distill.clone(), device, 0)?;
    tch::no_grad(|| -> Result<()> {
        for (name, mut var) in adaptor.vs.variables() {
            let view = st
                .tensor(&name)
                .map_err(|_| bad(format!("tensor `{name}` is missing")))?;
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            if shape != var.size() || view.dtype() != safetensors::Dtype::F32 {
                return Err(bad(format!(
                    "tensor `{name}` is {:?} {shape:?}, expected F32 {:?}",
                    view.dtype(),
                    var.size()
                )));
            }
            let t = Tensor::f_from_data_size(view.data(), &shape, Kind::Float)?;
            var.f_copy_(&t.to_device(device))?;
        }
        Ok(())
    })?;
    Ok((adaptor, meta))
}
