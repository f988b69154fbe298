//! Checkpoints of the training state ([`TrainState`]): the one interface the
//! training loop saves through, and its single-process implementation.
//!
//! Layout (the same as the coordinator's, so either reads the other's):
//! `DIR/step-NNNNNNNN/rank-RRRRR-of-WWWWW.safetensors` (the parts: adaptor
//! weights, AdamW moments, step, data cursors) and
//! `DIR/step-NNNNNNNN/manifest.json`, written last: a checkpoint exists once
//! its manifest does. A worker's implementation (parts uploaded to the
//! coordinator's store, the coordinator commits) is in [`crate::worker`].

use std::path::{Path, PathBuf};

use kvd_data::StoreOptions;
use kvd_proto::{CheckpointManifest, CheckpointPart, MANIFEST_FORMAT_VERSION};

use crate::config::ModelConfig;
pub mod parts;

use crate::distill::checkpoint::config_hash;
use crate::error::{ModelError, Result};
use crate::train_loop::TrainState;
use parts::{encode_part, load_checkpoint};

/// Saves the training state; the training loop's only way to persist it.
pub trait Checkpointer {
    /// Saves `state` as of `step` (steps done); may finish in the background.
    fn save(&mut self, state: &TrainState, step: u64) -> Result<()>;
    /// Waits until every save started is written (or has failed).
    fn flush(&mut self) -> Result<()>;
}

/// A checkpointer that keeps nothing (benchmarks, tests of the loop).
#[derive(Debug, Default)]
pub struct NoCheckpoints;

impl Checkpointer for NoCheckpoints {
    fn save(&mut self, _state: &TrainState, _step: u64) -> Result<()> {
        Ok(())
    }
    fn flush(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Checkpoints of a single-process run in a local directory; each save also
/// rewrites the adaptor file, so the newest adaptor is always usable.
pub struct LocalCheckpointer {
    dir: PathBuf,
    keep_last: usize,
    job_hash: String,
    model: ModelConfig,
    model_hash: String,
    /// The adaptor file and the base model's label recorded in it.
    adaptor: Option<(PathBuf, String)>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

impl LocalCheckpointer {
    /// Checkpoints under `dir` for a job of hash `job_hash` on a model of
    /// configuration `model`, keeping the newest `keep_last` (0: all).
    pub fn new(
        dir: impl Into<PathBuf>,
        keep_last: usize,
        job_hash: &str,
        model: &ModelConfig,
    ) -> Self {
        Self {
            dir: dir.into(),
            keep_last,
            job_hash: job_hash.into(),
            model: model.clone(),
            model_hash: config_hash(model),
            adaptor: None,
        }
    }

    /// Also writes the adaptor to `path` at every save.
    pub fn with_adaptor(mut self, path: &Path, base_model: &str) -> Self {
        self.adaptor = Some((path.to_path_buf(), base_model.into()));
        self
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn step_dir(&self, step: u64) -> PathBuf {
        self.dir.join(format!("step-{step:08}"))
    }

    /// Steps that have a directory, newest first.
    fn steps(&self) -> Result<Vec<u64>> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(&self.dir)(e)),
        };
        let mut steps: Vec<u64> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_prefix("step-"))
                    .and_then(|s| s.parse().ok())
            })
            .collect();
        steps.sort_unstable_by(|a, b| b.cmp(a));
        Ok(steps)
    }

    /// Restores the newest intact committed checkpoint into `state`, falling
    /// back over broken ones (each named in a warning with the reason).
    /// `Ok(None)` when the directory holds no checkpoint at all; an error
    /// when it holds some and none is intact, or one of another base model.
    pub fn restore_latest(&self, state: &mut TrainState) -> Result<Option<u64>> {
        let mut broken = Vec::new();
        for step in self.steps()? {
            let manifest = self.step_dir(step).join("manifest.json");
            if !manifest.exists() {
                tracing::warn!(step, dir = %self.step_dir(step).display(), "no manifest (an interrupted save): skipped");
                continue;
            }
            let url = format!("file://{}", manifest.display());
            match load_checkpoint_blocking(&url) {
                Ok((m, loaded)) => {
                    if !m.model_config_hash.is_empty() && m.model_config_hash != self.model_hash {
                        return Err(ModelError::Checkpoint(format!(
                            "{}: belongs to another base model (config hash {}, this model's {})",
                            manifest.display(),
                            m.model_config_hash,
                            self.model_hash
                        )));
                    }
                    if loaded.meta.job_hash != self.job_hash {
                        tracing::warn!(checkpoint = %manifest.display(), "written under another job configuration; resuming anyway");
                    }
                    loaded.restore(&state.adaptor, &mut state.trainer)?;
                    state.cursors = Some(loaded.meta.cursors.clone());
                    tracing::info!(checkpoint = %manifest.display(), step, skipped = broken.len(), "resumed");
                    return Ok(Some(step));
                }
                Err(e) => {
                    tracing::warn!(step, error = %e, "checkpoint not intact: falling back to an older one");
                    broken.push(format!("step {step}: {e}"));
                }
            }
        }
        if broken.is_empty() {
            Ok(None)
        } else {
            Err(ModelError::Checkpoint(format!(
                "{}: no intact checkpoint to resume from ({})",
                self.dir.display(),
                broken.join("; ")
            )))
        }
    }

    /// Removes all but the newest `keep_last` committed checkpoints, and
    /// interrupted saves older than the newest commit.
    fn purge(&self, newest: u64) -> Result<()> {
        if self.keep_last == 0 {
            return Ok(());
        }
        let mut kept = 0;
        for step in self.steps()? {
            let d = self.step_dir(step);
            let committed = d.join("manifest.json").exists();
            if step > newest {
                continue;
            }
            if committed && kept < self.keep_last {
                kept += 1;
                continue;
            }
            std::fs::remove_dir_all(&d).map_err(io(&d))?;
        }
        Ok(())
    }
}

fn load_checkpoint_blocking(url: &str) -> Result<(CheckpointManifest, parts::LoadedState)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ModelError::Checkpoint(format!("cannot start a runtime: {e}")))?;
    rt.block_on(load_checkpoint(url, &StoreOptions::default()))
}

impl Checkpointer for LocalCheckpointer {
    fn save(&mut self, state: &TrainState, step: u64) -> Result<()> {
        let dir = self.step_dir(step);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let cursors = state.cursors.clone().unwrap_or_default();
        let bytes = encode_part(
            &state.adaptor,
            &state.trainer,
            0,
            1,
            &self.job_hash,
            &self.model_hash,
            &cursors,
        )?;
        let name = "rank-00000-of-00001.safetensors";
        write_atomic(&dir.join(name), &bytes)?;
        let manifest = CheckpointManifest {
            format_version: MANIFEST_FORMAT_VERSION,
            step,
            world_size: 1,
            parts: vec![CheckpointPart {
                rank: 0,
                url: name.into(),
            }],
            data_cursor: serde_json::to_value(&cursors).ok(),
            config_hash: self.job_hash.clone(),
            model_config_hash: self.model_hash.clone(),
            created_unix_s: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        write_atomic(&dir.join("manifest.json"), manifest.to_json().as_bytes())?;
        if let Some((path, base)) = &self.adaptor {
            crate::train_loop::save_adaptor_file(&state.adaptor, base, &self.model, step, path)?;
        }
        tracing::info!(step, dir = %dir.display(), "checkpoint written");
        self.purge(step)
    }

    fn flush(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Where a single-process run keeps its checkpoints by default: beside the
/// adaptor, `NAME.ckpt/` for `NAME.safetensors`.
pub fn default_dir(out: &Path) -> PathBuf {
    out.with_extension("ckpt")
}
