//! The job's checkpoints on object storage, from the coordinator's side: the
//! manifest (the commit marker, written last and never overwritten), the
//! latest committed checkpoint (where a restarted coordinator continues),
//! and keep-last-N retention. Layout under the checkpoint URL:
//! `step-NNNNNNNN/rank-RRRRR-of-WWWWW.safetensors` and `step-NNNNNNNN/manifest.json`.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{bail, Context};
use bytes::Bytes;
use kvd_proto::CheckpointManifest;
use kvd_store::{Source, StoreOptions};
use tracing::{info, warn};

/// The checkpoint store of one job.
#[derive(Debug, Clone)]
pub struct Checkpoints {
    source: Source,
    base: String,
}

fn step_of_dir(dir: &str) -> Option<u64> {
    dir.strip_prefix("step-")?.parse().ok()
}

fn options(map: &BTreeMap<String, String>) -> StoreOptions {
    map.iter()
        .fold(StoreOptions::default(), |o, (k, v)| o.with(k, v))
}

/// Reads and checks the manifest at `url`.
pub async fn read_manifest(
    url: &str,
    store: &BTreeMap<String, String>,
) -> anyhow::Result<CheckpointManifest> {
    let (dir, name) = url
        .rsplit_once('/')
        .with_context(|| format!("{url} is not a manifest URL"))?;
    let src = Source::open(dir, &options(store))?;
    let bytes = src
        .get(name)
        .await
        .with_context(|| format!("cannot read the checkpoint manifest {url}"))?;
    let text = std::str::from_utf8(&bytes).with_context(|| format!("{url} is not UTF-8"))?;
    CheckpointManifest::from_json(text).map_err(|e| anyhow::anyhow!("{url}: {e}"))
}

impl Checkpoints {
    /// The store under `base` (the job's checkpoint URL).
    pub fn open(base: &str, store: &BTreeMap<String, String>) -> anyhow::Result<Self> {
        let source = Source::open(base, &options(store))
            .with_context(|| format!("cannot open the checkpoint store {base}"))?;
        Ok(Self {
            source,
            base: base.trim_end_matches('/').to_string(),
        })
    }

    /// The URL of step `step`'s manifest.
    pub fn manifest_url(&self, step: u64) -> String {
        format!("{}/step-{step:08}/manifest.json", self.base)
    }

    /// Steps with a manifest, and steps with only parts (interrupted).
    async fn scan(&self) -> anyhow::Result<(BTreeSet<u64>, BTreeSet<u64>)> {
        let objects = self
            .source
            .list()
            .await
            .with_context(|| format!("cannot list the checkpoint store {}", self.base))?;
        let (mut committed, mut partial) = (BTreeSet::new(), BTreeSet::new());
        for o in objects {
            let Some((dir, name)) = o.rel.split_once('/') else {
                continue;
            };
            let Some(step) = step_of_dir(dir) else {
                continue;
            };
            if name == "manifest.json" {
                committed.insert(step);
            } else {
                partial.insert(step);
            }
        }
        partial.retain(|s| !committed.contains(s));
        Ok((committed, partial))
    }

    /// The newest checkpoint whose manifest parses: (manifest URL, step).
    pub async fn latest(
        &self,
        store: &BTreeMap<String, String>,
    ) -> anyhow::Result<Option<(String, u64)>> {
        let (committed, _) = self.scan().await?;
        for &step in committed.iter().rev() {
            let url = self.manifest_url(step);
            match read_manifest(&url, store).await {
                Ok(m) if m.step == step => return Ok(Some((url, step))),
                Ok(m) => warn!(%url, step = m.step, "manifest of another step: skipped"),
                Err(e) => warn!(%url, error = %format!("{e:#}"), "unreadable manifest: skipped"),
            }
        }
        Ok(None)
    }

    /// The newest committed checkpoint that is intact (its manifest parses
    /// and every part it names is there, whole), and the newer committed ones
    /// that are not, each with why (logged at WARN as they are skipped).
    pub async fn latest_intact(&self, store: &BTreeMap<String, String>) -> anyhow::Result<Scan> {
        let (committed, _) = self.scan().await?;
        let mut found = Scan::default();
        for &step in committed.iter().rev() {
            let url = self.manifest_url(step);
            let why = match read_manifest(&url, store).await {
                Ok(m) if m.step != step => format!("the manifest is of step {}", m.step),
                Ok(m) => match check_parts(&m, &url, store).await {
                    Ok(()) => {
                        found.intact = Some((url, step));
                        return Ok(found);
                    }
                    Err(e) => format!("{e:#}"),
                },
                Err(e) => format!("{e:#}"),
            };
            warn!(
                step,
                manifest = %url,
                reason = %why,
                "checkpoint not intact: skipped, falling back to an older one"
            );
            found.skipped.push((step, why));
        }
        Ok(found)
    }

    /// Writes the manifest of `step` unless one exists (the commit). Returns
    /// false when a manifest was there already. With `replace`, an existing
    /// manifest is overwritten (one found broken at the start of the job).
    pub async fn commit(&self, step: u64, json: &str, replace: bool) -> anyhow::Result<bool> {
        let rel = format!("step-{step:08}/manifest.json");
        let bytes = Bytes::from(json.to_string());
        let written = if replace {
            self.source.put(&rel, bytes).await.map(|()| true)
        } else {
            self.source.put_new(&rel, bytes).await
        };
        written.with_context(|| {
            format!(
                "cannot write the checkpoint manifest {}",
                self.manifest_url(step)
            )
        })
    }

    /// Deletes every checkpoint older than the newest `keep` committed ones,
    /// committed or not (0 keeps everything).
    pub async fn retain(&self, keep: u32) -> anyhow::Result<()> {
        if keep == 0 {
            return Ok(());
        }
        let (committed, partial) = self.scan().await?;
        let Some(&oldest_kept) = committed.iter().rev().nth(keep as usize - 1) else {
            return Ok(());
        };
        let doomed: BTreeSet<u64> = committed
            .iter()
            .chain(&partial)
            .copied()
            .filter(|&s| s < oldest_kept)
            .collect();
        if doomed.is_empty() {
            return Ok(());
        }
        for o in self.source.list().await? {
            let dir = o.rel.split('/').next().unwrap_or("");
            if step_of_dir(dir).is_some_and(|s| doomed.contains(&s)) {
                // Manifest first: a half-deleted checkpoint is then never loaded.
                if o.rel.ends_with("manifest.json") {
                    self.source.delete(&o.rel).await?;
                }
            }
        }
        for o in self.source.list().await? {
            let dir = o.rel.split('/').next().unwrap_or("");
            if step_of_dir(dir).is_some_and(|s| doomed.contains(&s)) {
                self.source.delete(&o.rel).await?;
            }
        }
        info!(deleted_steps = ?doomed, keep, "old checkpoints deleted");
        Ok(())
    }
}

/// The committed checkpoints found under a checkpoint URL, newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scan {
    /// The newest intact one: (manifest URL, step).
    pub intact: Option<(String, u64)>,
    /// Newer ones that are not intact: (step, why).
    pub skipped: Vec<(u64, String)>,
}

/// Whether every part `m` names is there and whole: a safetensors part is
/// its 8-byte header length, the JSON header and the tensor data, whose end
/// the header states; a shorter object was truncated.
pub async fn check_parts(
    m: &CheckpointManifest,
    manifest_url: &str,
    store: &BTreeMap<String, String>,
) -> anyhow::Result<()> {
    for p in &m.parts {
        let url = p.resolve(manifest_url);
        let what = || format!("the part of rank {} ({url})", p.rank);
        let (dir, name) = url
            .rsplit_once('/')
            .with_context(|| format!("{} is not an object URL", what()))?;
        let src = Source::open(dir, &options(store))?;
        let size = match src.head(name).await {
            Ok(info) => info.size,
            Err(kvd_store::StoreError::MissingObject { .. }) => bail!("{} is missing", what()),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", what())),
        };
        if size < 8 {
            bail!("{} is truncated: {size} bytes", what());
        }
        let len = src
            .get_range(name, 0..8)
            .await
            .with_context(|| format!("cannot read {}", what()))?;
        let header_len = u64::from_le_bytes(len[..8].try_into().expect("8 bytes"));
        if 8 + header_len > size {
            bail!(
                "{} is truncated: {size} bytes, its header alone needs {}",
                what(),
                8 + header_len
            );
        }
        let header = src
            .get_range(name, 8..8 + header_len)
            .await
            .with_context(|| format!("cannot read {}", what()))?;
        let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
            .with_context(|| format!("{} has no safetensors header", what()))?;
        let data_end = header
            .values()
            .filter_map(|t| t.get("data_offsets")?.get(1)?.as_u64())
            .max()
            .unwrap_or(0);
        let needed = 8 + header_len + data_end;
        if size != needed {
            bail!(
                "{} is {}: {size} bytes, its header says {needed}",
                what(),
                if size < needed {
                    "truncated"
                } else {
                    "too long"
                }
            );
        }
    }
    Ok(())
}

/// Where the job starts, from the configuration: the checkpoint to resume
/// from, and (for `--resume`) the newer committed checkpoints skipped as not
/// intact.
pub async fn resolve_resume(config: &crate::config::Config) -> anyhow::Result<Scan> {
    use crate::config::Resume;
    match &config.resume {
        Resume::From(url) => {
            let m = read_manifest(url, &config.store_options).await?;
            info!(%url, step = m.step, "resuming from the given checkpoint");
            Ok(Scan {
                intact: Some((url.clone(), m.step)),
                skipped: Vec::new(),
            })
        }
        Resume::Latest => {
            let base = config
                .checkpoint_url
                .as_deref()
                .context("resume needs checkpoint_url")?;
            let found = Checkpoints::open(base, &config.store_options)?
                .latest_intact(&config.store_options)
                .await?;
            match (&found.intact, found.skipped.is_empty()) {
                (Some((url, step)), _) => {
                    info!(%url, step, skipped = found.skipped.len(), "resuming from the latest committed checkpoint")
                }
                (None, true) => info!(base, "no committed checkpoint yet: starting fresh"),
                (None, false) => {
                    let why: Vec<String> = found
                        .skipped
                        .iter()
                        .map(|(step, why)| format!("step {step}: {why}"))
                        .collect();
                    bail!(
                        "{base} holds committed checkpoints but none is intact ({}); \
                         repair one, pass --resume-from, or use another --checkpoint-url",
                        why.join("; ")
                    );
                }
            }
            Ok(found)
        }
        Resume::Fresh => {
            if let Some(base) = &config.checkpoint_url {
                let found = Checkpoints::open(base, &config.store_options)?
                    .latest(&config.store_options)
                    .await?;
                if let Some((url, _)) = found {
                    bail!(
                        "{base} already holds committed checkpoints ({url}); pass --resume to \
                         continue that job, or use another --checkpoint-url"
                    );
                }
            }
            Ok(Scan::default())
        }
    }
}
