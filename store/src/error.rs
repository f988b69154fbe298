//! The crate's error type: every failure names the URL or object.

/// Errors of object-store access.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A URL that cannot be parsed or has an unsupported scheme.
    #[error("bad store URL `{url}`: {reason}")]
    Url {
        /// The URL as given.
        url: String,
        /// Why it was refused.
        reason: String,
    },
    /// An object-store operation failed (network, permissions, credentials).
    #[error("object store: {op} `{path}`: {source}")]
    Store {
        /// The operation (list, get, head, put, delete).
        op: &'static str,
        /// The object.
        path: String,
        /// The store's error.
        #[source]
        source: object_store::Error,
    },
    /// The bucket (S3, GCS) or container (Azure) of the URL does not exist,
    /// or these credentials cannot see it.
    #[error(
        "`{url}`: no bucket (container) named `{bucket}` (or these credentials cannot see it)"
    )]
    MissingBucket {
        /// The dataset URL.
        url: String,
        /// The bucket or container.
        bucket: String,
    },
    /// The object does not exist.
    #[error("{path}: no such object")]
    MissingObject {
        /// The object.
        path: String,
    },
    /// A local file-system operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Results of this crate.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;
