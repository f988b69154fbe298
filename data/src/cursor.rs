//! The resumable cursor: a small, global position in the sample stream.

/// Where the global sample stream stands. It depends on nothing per worker,
/// so a run can resume with any number of workers. Store it in every checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Cursor {
    /// The epoch being read (0-based).
    pub epoch: u64,
    /// How many samples of this epoch's permutation have been handed out.
    pub sample_index: u64,
    /// The shuffle seed.
    pub seed: u64,
    /// [`crate::Manifest::hash`] of the dataset this cursor walks.
    pub manifest_hash: String,
}

impl Cursor {
    /// The start of epoch 0.
    pub fn new(seed: u64, manifest_hash: impl Into<String>) -> Self {
        Self {
            epoch: 0,
            sample_index: 0,
            seed,
            manifest_hash: manifest_hash.into(),
        }
    }
}
