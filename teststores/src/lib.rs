//! Local object-store servers for tests, started from the binaries and
//! packages `scripts/setup.sh` puts in the cache: moto (S3), fake-gcs-server
//! (GCS) and Azurite (Azure Blob Storage). Each wrapper gives the
//! [`kvd_store::StoreOptions`] that reach it and stops the server when dropped.
//! Only tests depend on this crate.

pub mod azurite;
pub mod gcs_emulator;
mod local_server;
pub mod moto;

/// Why a test server could not be started or used.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The server is missing, did not start, or refused a request.
    #[error("{0}")]
    Config(String),
    /// A local file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

impl ServerError {
    /// A [`ServerError::Config`] with `msg`.
    pub(crate) fn config(msg: impl Into<String>) -> Self {
        ServerError::Config(msg.into())
    }
}

/// Results of this crate.
pub type Result<T, E = ServerError> = std::result::Result<T, E>;

/// The project's cache directory: `$KVD_CACHE`, else `~/.cache/kv-distill`
/// (where `scripts/setup.sh` puts the venv and the test servers).
pub(crate) fn cache_dir() -> std::path::PathBuf {
    std::env::var_os("KVD_CACHE")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache/kv-distill"))
        })
        .unwrap_or_default()
}
