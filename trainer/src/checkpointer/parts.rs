//! The training state of a distributed checkpoint: adaptor weights, AdamW
//! moments, step and data cursors. The tensors are sharded over the ranks
//! (tensor `i` of the sorted list goes to rank `i % world`), so each rank
//! uploads a share and together they hold one copy; every part also carries
//! the small metadata (step, cursors, config). Loading reads the parts named
//! by the manifest, so a checkpoint restores with any number of workers.
//!
//! Randomness: training draws nothing from torch's RNG after the seeded
//! initialisation (LoRA dropout, when on, is reseeded from (seed, step, rank)
//! every step), and the data order and ratios derive from (seed, example id),
//! so step + cursors are the whole RNG state.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use kvd_data::{Cursor, Source, StoreOptions};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::distill::{Adaptor, Trainer};
use crate::error::{ModelError, Result};

/// Layout version of a part.
pub const PART_FORMAT: u32 = 1;
const META_KEY: &str = "kv_distill_train_state";

/// The metadata every part carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartMeta {
    /// [`PART_FORMAT`].
    pub format: u32,
    /// Optimizer steps taken.
    pub step: u64,
    /// AdamW updates applied (fewer than `step` when steps were skipped).
    pub updates: u64,
    /// Rank that wrote the part, and the world size then.
    pub rank: u32,
    /// World size when written.
    pub world_size: u32,
    /// Number of tensors over all parts.
    pub total_tensors: usize,
    /// Hash of the job configuration.
    pub job_hash: String,
    /// Hash of the base model configuration.
    pub model_hash: String,
    /// Data cursors after `step`, one per dataset.
    pub cursors: Vec<Cursor>,
}

fn err(what: &str, msg: impl std::fmt::Display) -> ModelError {
    ModelError::Checkpoint(format!("{what}: {msg}"))
}

/// All state tensors by name: `adaptor.<var>`, `adam.m.<var>`, `adam.v.<var>`.
fn state_tensors(adaptor: &Adaptor, trainer: &Trainer) -> Vec<(String, Tensor)> {
    let named = adaptor.named_trainable();
    let names: Vec<String> = named.iter().map(|(n, _)| n.clone()).collect();
    let mut all: Vec<(String, Tensor)> = named
        .into_iter()
        .map(|(n, t)| (format!("adaptor.{n}"), t))
        .collect();
    all.extend(trainer.optimizer().named_state(&names));
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all
}

/// This rank's part as safetensors bytes.
pub fn encode_part(
    adaptor: &Adaptor,
    trainer: &Trainer,
    rank: usize,
    world: usize,
    job_hash: &str,
    model_hash: &str,
    cursors: &[Cursor],
) -> Result<Vec<u8>> {
    let all = state_tensors(adaptor, trainer);
    let meta = PartMeta {
        format: PART_FORMAT,
        step: trainer.step() as u64,
        updates: trainer.optimizer().steps,
        rank: rank as u32,
        world_size: world as u32,
        total_tensors: all.len(),
        job_hash: job_hash.into(),
        model_hash: model_hash.into(),
        cursors: cursors.to_vec(),
    };
    let mut bufs = Vec::new();
    for (i, (name, t)) in all.iter().enumerate() {
        if i % world != rank {
            continue;
        }
        let t = t
            .detach()
            .f_to_device(Device::Cpu)?
            .f_to_kind(Kind::Float)?
            .contiguous();
        let n = t.numel();
        let mut bytes = vec![0u8; n * 4];
        t.f_copy_data_u8(&mut bytes, n)?;
        bufs.push((name.clone(), t.size(), bytes));
    }
    let views = bufs
        .iter()
        .map(|(name, shape, bytes)| {
            let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape, bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| err("encode", format!("tensor `{name}`: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let json = serde_json::to_string(&meta).map_err(|e| err("encode", e))?;
    safetensors::serialize(views, Some(HashMap::from([(META_KEY.to_string(), json)])))
        .map_err(|e| err("encode", e))
}

/// A checkpoint's state, merged from its parts.
pub struct LoadedState {
    /// Metadata of part 0.
    pub meta: PartMeta,
    tensors: BTreeMap<String, (Vec<i64>, Vec<u8>)>,
}

/// Merges the parts (`(url, bytes)`, any order); checks they belong together
/// and hold every tensor exactly once.
pub fn decode_parts(parts: &[(String, Bytes)]) -> Result<LoadedState> {
    let mut tensors = BTreeMap::new();
    let mut first: Option<PartMeta> = None;
    for (url, bytes) in parts {
        let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| err(url, format!("not a safetensors part ({e})")))?;
        let json = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(META_KEY))
            .ok_or_else(|| err(url, "not a kv-distill training-state part"))?;
        let meta: PartMeta = serde_json::from_str(json).map_err(|e| err(url, e))?;
        if meta.format != PART_FORMAT {
            return Err(err(
                url,
                format!("part format {} is not {PART_FORMAT}", meta.format),
            ));
        }
        if let Some(f) = &first {
            if (f.step, f.world_size, &f.job_hash, f.total_tensors)
                != (
                    meta.step,
                    meta.world_size,
                    &meta.job_hash,
                    meta.total_tensors,
                )
            {
                return Err(err(
                    url,
                    "part does not belong to the same checkpoint as the others",
                ));
            }
        }
        let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| err(url, e))?;
        for (name, view) in st.tensors() {
            let shape = view.shape().iter().map(|&d| d as i64).collect();
            if tensors
                .insert(name.clone(), (shape, view.data().to_vec()))
                .is_some()
            {
                return Err(err(url, format!("tensor `{name}` appears in two parts")));
            }
        }
        if first.as_ref().is_none_or(|f| meta.rank < f.rank) {
            first = Some(meta);
        }
    }
    let meta = first.ok_or_else(|| err("load", "no parts"))?;
    if tensors.len() != meta.total_tensors {
        return Err(err(
            "load",
            format!(
                "parts hold {} tensors, the checkpoint has {}",
                tensors.len(),
                meta.total_tensors
            ),
        ));
    }
    Ok(LoadedState { meta, tensors })
}

impl LoadedState {
    fn take(&self, name: &str, like: &Tensor) -> Result<Tensor> {
        let (shape, data) = self
            .tensors
            .get(name)
            .ok_or_else(|| err("load", format!("tensor `{name}` is missing")))?;
        if *shape != like.size() {
            return Err(err(
                "load",
                format!("tensor `{name}` is {shape:?}, expected {:?}", like.size()),
            ));
        }
        Ok(Tensor::f_from_data_size(data, shape, Kind::Float)?.f_to_device(like.device())?)
    }

    /// Copies the state into `adaptor` and `trainer`.
    pub fn restore(&self, adaptor: &Adaptor, trainer: &mut Trainer) -> Result<()> {
        let named = adaptor.named_trainable();
        let (mut m, mut v) = (Vec::new(), Vec::new());
        tch::no_grad(|| -> Result<()> {
            for (n, var) in &named {
                let mut var = var.shallow_clone();
                var.f_copy_(&self.take(&format!("adaptor.{n}"), &var)?)?;
                m.push(self.take(&format!("adam.m.{n}"), &var)?);
                v.push(self.take(&format!("adam.v.{n}"), &var)?);
            }
            Ok(())
        })?;
        trainer.restore(self.meta.step as usize, self.meta.updates, m, v)
    }
}

/// Splits an object URL into its directory URL and object name.
pub fn split_url(url: &str) -> Result<(&str, &str)> {
    url.rsplit_once('/')
        .filter(|(d, n)| !d.is_empty() && !n.is_empty())
        .ok_or_else(|| err(url, "not an object URL"))
}

/// Retries of a checkpoint write unless the store options set them: an
/// object store that is briefly unavailable (a restart, throttling) gets
/// tens of seconds, not the half second of the data reads' default.
pub const CHECKPOINT_WRITE_RETRIES: usize = 6;
/// First wait before retrying a checkpoint write, in milliseconds, unless
/// the store options set it; the waits grow from there (about 25 s in all
/// over [`CHECKPOINT_WRITE_RETRIES`] retries, bounded by the store's 120 s).
pub const CHECKPOINT_WRITE_BACKOFF_MS: u64 = 2_000;

/// The store options for writing checkpoints and adaptors: `opts` with the
/// longer retry budget where it leaves the retries unset.
pub fn write_options(opts: &StoreOptions) -> StoreOptions {
    let mut o = opts.clone();
    o.max_retries.get_or_insert(CHECKPOINT_WRITE_RETRIES);
    o.retry_backoff_ms
        .get_or_insert(CHECKPOINT_WRITE_BACKOFF_MS);
    o
}

/// Writes `bytes` to the object at `url`.
pub async fn put_url(url: &str, bytes: Vec<u8>, opts: &StoreOptions) -> Result<()> {
    let (dir, name) = split_url(url)?;
    let src = Source::open(dir, opts).map_err(|e| storage(url, e))?;
    src.put(name, Bytes::from(bytes))
        .await
        .map_err(|e| storage(url, e))
}

/// A failed write of `url` as [`ModelError::Storage`], naming the URL; a
/// missing bucket or container says so.
fn storage(url: &str, e: kvd_data::StoreError) -> ModelError {
    match e {
        kvd_data::StoreError::MissingObject { .. } => ModelError::Storage(format!(
            "cannot write {url}: its bucket, container or directory does not exist"
        )),
        kvd_data::StoreError::MissingBucket { bucket, .. } => ModelError::Storage(format!(
            "cannot write {url}: its bucket (container) `{bucket}` does not exist \
             (or these credentials cannot see it)"
        )),
        e => ModelError::Storage(format!(
            "cannot write {url}: {}",
            kvd_proto::report::error_chain(&e)
        )),
    }
}

/// Reads the object at `url`.
pub async fn get_url(url: &str, opts: &StoreOptions) -> Result<Bytes> {
    let (dir, name) = split_url(url)?;
    let src = Source::open(dir, opts)?;
    Ok(src.get(name).await?)
}

/// Reads a committed checkpoint: its manifest at `manifest_url`, then every part.
pub async fn load_checkpoint(
    manifest_url: &str,
    opts: &StoreOptions,
) -> Result<(kvd_proto::CheckpointManifest, LoadedState)> {
    let text = get_url(manifest_url, opts).await.map_err(|e| match e {
        ModelError::Data(kvd_data::DataError::MissingObject { .. }) => {
            err(manifest_url, "the manifest does not exist")
        }
        e => err(manifest_url, e),
    })?;
    let text = std::str::from_utf8(&text).map_err(|e| err(manifest_url, e))?;
    let manifest =
        kvd_proto::CheckpointManifest::from_json(text).map_err(|e| err(manifest_url, e))?;
    let mut parts = Vec::new();
    for p in &manifest.parts {
        let url = p.resolve(manifest_url);
        let bytes = get_url(&url, opts).await.map_err(|e| match e {
            ModelError::Data(kvd_data::DataError::MissingObject { .. }) => err(
                manifest_url,
                format!("the part of rank {} ({url}) is missing", p.rank),
            ),
            e => err(
                manifest_url,
                format!("the part of rank {} ({url}): {e}", p.rank),
            ),
        })?;
        parts.push((url, bytes));
    }
    let state = decode_parts(&parts)?;
    if state.meta.step != manifest.step {
        return Err(err(
            manifest_url,
            format!(
                "parts are of step {}, the manifest says {}",
                state.meta.step, manifest.step
            ),
        ));
    }
    Ok((manifest, state))
}
