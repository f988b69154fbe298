//! The crate's error type. Every input-dependent failure names the object
//! (file), and where it applies the row and the column.

use std::fmt;

/// Where in a dataset a problem is: the file and, where known, row and column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The object's path (relative to the dataset root) or URL.
    pub file: String,
    /// Row index within the file, if the problem is in one row.
    pub row: Option<u64>,
    /// Column name, if the problem is in one column.
    pub column: Option<String>,
}

impl Location {
    /// A location naming only a file.
    pub fn file(file: impl Into<String>) -> Self {
        Self {
            file: file.into(),
            row: None,
            column: None,
        }
    }

    /// A location naming a file, row and column.
    pub fn cell(file: impl Into<String>, row: u64, column: impl Into<String>) -> Self {
        Self {
            file: file.into(),
            row: Some(row),
            column: Some(column.into()),
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(r) = self.row {
            write!(f, " row {r}")?;
        }
        if let Some(c) = &self.column {
            write!(f, " column `{c}`")?;
        }
        Ok(())
    }
}

/// Errors of the data pipeline.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A dataset URL that cannot be parsed or has an unsupported scheme.
    #[error("bad dataset URL `{url}`: {reason}")]
    Url {
        /// The URL as given.
        url: String,
        /// Why it was refused.
        reason: String,
    },
    /// An object-store operation failed (network, permissions, credentials).
    #[error("object store: {op} `{path}`: {source}")]
    Store {
        /// The operation (list, get, head, put).
        op: &'static str,
        /// The object path.
        path: String,
        /// The store's error.
        #[source]
        source: object_store::Error,
    },
    /// The URL's bucket (or container) does not exist, or the credentials
    /// cannot see it.
    #[error(
        "`{url}`: no bucket (container) named `{bucket}` (or these credentials cannot see it)"
    )]
    MissingBucket {
        /// The dataset URL.
        url: String,
        /// The bucket or container.
        bucket: String,
    },
    /// An object named in the manifest is missing from the store.
    #[error("{path}: object listed in the dataset manifest is missing")]
    MissingObject {
        /// The object path.
        path: String,
    },
    /// An object differs from what the manifest recorded.
    #[error("{path}: object changed since indexing ({what}: manifest {expected}, store {found}); re-run `kvd-data index`")]
    ObjectChanged {
        /// The object path.
        path: String,
        /// Which property differs (size, etag).
        what: &'static str,
        /// The manifest's value.
        expected: String,
        /// The store's value.
        found: String,
    },
    /// The Parquet reader failed (corrupt or truncated file, bad footer, ...).
    #[error("{location}: Parquet read failed (corrupt, truncated or unreadable): {source}")]
    Parquet {
        /// Where.
        location: Location,
        /// The reader's error.
        #[source]
        source: parquet::errors::ParquetError,
    },
    /// An Arrow-level failure decoding a batch.
    #[error("{location}: {source}")]
    Arrow {
        /// Where.
        location: Location,
        /// The Arrow error.
        #[source]
        source: arrow_schema::ArrowError,
    },
    /// The file's columns do not match the configured schema.
    #[error("{location}: schema mismatch: {reason}")]
    Schema {
        /// Where (file and column).
        location: Location,
        /// What is wrong.
        reason: String,
    },
    /// A row's value is unusable (empty, not UTF-8, too long, ...).
    #[error("{location}: bad input ({kind}): {detail}")]
    BadRow {
        /// Where (file, row, column).
        location: Location,
        /// The kind of problem.
        kind: BadInputKind,
        /// Details.
        detail: String,
    },
    /// The manifest file is missing, unreadable or inconsistent.
    #[error("manifest `{path}`: {reason}")]
    Manifest {
        /// The manifest's path.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// A cursor does not belong to this dataset/configuration.
    #[error("cursor mismatch: {0}")]
    Cursor(String),
    /// Tokenisation failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A source file for `prepare` is unreadable or malformed.
    #[error("source `{path}`: {reason}")]
    Source {
        /// The source file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// A configuration value is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Local I/O.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// The kinds of bad rows a [`crate::BadInputPolicy`] can skip.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BadInputKind {
    /// Null or empty (whitespace-only) text.
    Empty,
    /// Bytes that are not valid UTF-8.
    NotUtf8,
    /// A document longer than the configured limit.
    TooLong,
    /// The question and answer leave no room for a span in the window.
    NoRoomForSpan,
}

impl fmt::Display for BadInputKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Empty => "empty",
            Self::NotUtf8 => "not UTF-8",
            Self::TooLong => "too long",
            Self::NoRoomForSpan => "no room for span",
        })
    }
}

/// The crate's result type.
pub type Result<T, E = DataError> = std::result::Result<T, E>;

impl From<kvd_store::StoreError> for DataError {
    fn from(e: kvd_store::StoreError) -> Self {
        use kvd_store::StoreError as S;
        match e {
            S::Url { url, reason } => DataError::Url { url, reason },
            S::Store { op, path, source } => DataError::Store { op, path, source },
            S::MissingObject { path } => DataError::MissingObject { path },
            S::MissingBucket { url, bucket } => DataError::MissingBucket { url, bucket },
            S::Io { path, source } => DataError::Io { path, source },
        }
    }
}
