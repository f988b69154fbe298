//! The manifest of a distributed checkpoint.

use serde::{Deserialize, Serialize};

/// Version of the [`CheckpointManifest`] layout; readers reject others.
pub const MANIFEST_FORMAT_VERSION: u32 = 1;

/// A complete distributed checkpoint: one part per rank plus the data cursor,
/// written as JSON next to the parts (`.../step-00000100/manifest.json`). A
/// checkpoint exists once its manifest does; parts without a manifest are
/// garbage from an interrupted attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointManifest {
    /// [`MANIFEST_FORMAT_VERSION`] of the writer.
    pub format_version: u32,
    /// The optimizer step the checkpoint was taken after; training resumes at `step + 1`.
    pub step: u64,
    /// Number of ranks that wrote it (one part each).
    pub world_size: u32,
    /// The parts, sorted by rank.
    pub parts: Vec<CheckpointPart>,
    /// The data loader cursor (the kvd-data cursor as JSON), if one was sent;
    /// global, so valid for any number of workers.
    pub data_cursor: Option<serde_json::Value>,
    /// The job configuration hash the checkpoint was trained under.
    pub config_hash: String,
    /// The model configuration hash the checkpoint belongs to.
    pub model_config_hash: String,
    /// Creation time, Unix seconds (UTC).
    pub created_unix_s: u64,
}

/// One rank's share of a [`CheckpointManifest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointPart {
    /// The rank that wrote it.
    pub rank: u32,
    /// Where it is: a file name relative to the manifest's directory (so a
    /// checkpoint directory can be copied or moved, also between stores), or
    /// an absolute URL (`file://`, `s3://`, ...; manifests written before).
    pub url: String,
}

impl CheckpointPart {
    /// The part's absolute URL, for a manifest read from `manifest_url`.
    pub fn resolve(&self, manifest_url: &str) -> String {
        if self.url.contains("://") {
            return self.url.clone();
        }
        match manifest_url.rsplit_once('/') {
            Some((dir, _)) => format!("{dir}/{}", self.url),
            None => self.url.clone(),
        }
    }

    /// `part_url` as stored in the manifest at `manifest_url`: relative to
    /// the manifest's directory when it lies inside it.
    pub fn relative(rank: u32, part_url: &str, manifest_url: &str) -> CheckpointPart {
        let url = manifest_url
            .rsplit_once('/')
            .and_then(|(dir, _)| part_url.strip_prefix(&format!("{dir}/")))
            .filter(|rest| !rest.contains('/'))
            .unwrap_or(part_url)
            .to_string();
        CheckpointPart { rank, url }
    }
}

/// Why a checkpoint manifest is refused.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Not a manifest's JSON.
    #[error("bad checkpoint manifest: {0}")]
    Json(#[from] serde_json::Error),
    /// Written by another format version.
    #[error("checkpoint manifest format {found} is not the supported {MANIFEST_FORMAT_VERSION}")]
    Format {
        /// The manifest's version.
        found: u32,
    },
    /// The parts do not cover ranks `0..world_size` once each, in order.
    #[error("checkpoint manifest for world size {world_size} has parts for ranks {ranks:?}")]
    Parts {
        /// The manifest's world size.
        world_size: u32,
        /// The ranks of its parts.
        ranks: Vec<u32>,
    },
}

impl CheckpointManifest {
    /// Serialises to pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a manifest always serialises")
    }

    /// Parses a manifest and checks its format version and parts.
    pub fn from_json(text: &str) -> Result<Self, ManifestError> {
        let m: Self = serde_json::from_str(text)?;
        if m.format_version != MANIFEST_FORMAT_VERSION {
            return Err(ManifestError::Format {
                found: m.format_version,
            });
        }
        let ranks: Vec<u32> = m.parts.iter().map(|p| p.rank).collect();
        if ranks != (0..m.world_size).collect::<Vec<_>>() {
            return Err(ManifestError::Parts {
                world_size: m.world_size,
                ranks,
            });
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> CheckpointManifest {
        CheckpointManifest {
            format_version: MANIFEST_FORMAT_VERSION,
            step: 100,
            world_size: 2,
            parts: (0..2)
                .map(|rank| CheckpointPart {
                    rank,
                    url: format!("file:///ckpt/step-00000100/rank-{rank:05}.safetensors"),
                })
                .collect(),
            data_cursor: Some(serde_json::json!({"epoch": 0, "sample_index": 800})),
            config_hash: "job".into(),
            model_config_hash: "model".into(),
            created_unix_s: 1_700_000_000,
        }
    }

    #[test]
    fn json_round_trip() {
        let m = manifest();
        assert_eq!(CheckpointManifest::from_json(&m.to_json()).unwrap(), m);
    }

    #[test]
    fn rejects_bad_manifests() {
        let mut m = manifest();
        m.format_version = 99;
        let e = CheckpointManifest::from_json(&m.to_json()).unwrap_err();
        assert!(matches!(e, ManifestError::Format { found: 99 }), "{e}");
        assert!(e.to_string().contains("99"), "{e}");
        let mut m = manifest();
        m.parts.pop();
        let e = CheckpointManifest::from_json(&m.to_json()).unwrap_err();
        assert!(
            matches!(&e, ManifestError::Parts { ranks, .. } if ranks == &[0]),
            "{e}"
        );
        assert!(e.to_string().contains("[0]"), "{e}");
        assert!(matches!(
            CheckpointManifest::from_json("{"),
            Err(ManifestError::Json(_))
        ));
    }

    #[test]
    fn parts_are_stored_relative_to_the_manifest_and_resolved_back() {
        let m = "s3://b/jobs/run1/step-00000004/manifest.json";
        let p = CheckpointPart::relative(
            1,
            "s3://b/jobs/run1/step-00000004/rank-00001-of-00002.safetensors",
            m,
        );
        assert_eq!(p.url, "rank-00001-of-00002.safetensors");
        assert_eq!(
            p.resolve("file:///moved/step-00000004/manifest.json"),
            "file:///moved/step-00000004/rank-00001-of-00002.safetensors"
        );
        // Elsewhere, or in a subfolder: kept absolute, resolved as is.
        let q = CheckpointPart::relative(0, "s3://other/x.safetensors", m);
        assert_eq!(q.url, "s3://other/x.safetensors");
        assert_eq!(q.resolve(m), "s3://other/x.safetensors");
    }
}
