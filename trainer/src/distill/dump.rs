//! The inputs of a training run written for the PyTorch reference
//! (`bench/kvdistill_ref.py`): the adaptor's initial tensors and the batch
//! with the method and optimizer settings.

use super::checkpoint::save;
use super::{Adaptor, DistillConfig, DistillExample, TrainConfig};
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use std::path::Path;

/// Writes `dir/adaptor.safetensors` (the adaptor as it is now, for base model
/// `base_model` of config `cfg`) and `dir/batch.json` (`batch`, `distill`,
/// `train`), creating `dir`.
pub fn write_step_inputs(
    dir: &Path,
    base_model: &str,
    cfg: &ModelConfig,
    adaptor: &Adaptor,
    distill: &DistillConfig,
    train: &TrainConfig,
    batch: &[DistillExample],
) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ModelError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    save(
        adaptor,
        base_model,
        cfg,
        0,
        &dir.join("adaptor.safetensors"),
    )?;
    let examples: Vec<serde_json::Value> = batch
        .iter()
        .map(|e| {
            serde_json::json!({
                "context": e.context, "spans": e.spans, "suffix": e.suffix, "ratio": e.ratio,
            })
        })
        .collect();
    let spec = serde_json::json!({ "batch": examples, "distill": distill, "train": train });
    let path = dir.join("batch.json");
    std::fs::write(&path, spec.to_string()).map_err(io(&path))
}
