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
    /// Where it is (`file://`, `s3://`, ...).
    pub url: String,
}

impl CheckpointManifest {
    /// Serialises to pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a manifest always serialises")
    }

    /// Parses a manifest and checks its format version and parts.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let m: Self =
            serde_json::from_str(text).map_err(|e| format!("bad checkpoint manifest: {e}"))?;
        if m.format_version != MANIFEST_FORMAT_VERSION {
            return Err(format!(
                "checkpoint manifest format {} is not the supported {MANIFEST_FORMAT_VERSION}",
                m.format_version
            ));
        }
        let ranks: Vec<u32> = m.parts.iter().map(|p| p.rank).collect();
        if ranks != (0..m.world_size).collect::<Vec<_>>() {
            return Err(format!(
                "checkpoint manifest for world size {} has parts for ranks {ranks:?}",
                m.world_size
            ));
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
        assert!(CheckpointManifest::from_json(&m.to_json())
            .unwrap_err()
            .contains("99"));
        let mut m = manifest();
        m.parts.pop();
        assert!(CheckpointManifest::from_json(&m.to_json())
            .unwrap_err()
            .contains("[0]"));
        assert!(CheckpointManifest::from_json("{").is_err());
    }
}
