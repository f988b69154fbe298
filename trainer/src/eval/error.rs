//! Errors of the evaluation helpers (dataset loading, plotting).

use std::path::PathBuf;

/// Everything that can go wrong while loading an evaluation set or writing a
/// plot. Every variant names the file at fault, and where it applies the field.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A file could not be read.
    #[error("{path}: cannot read: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A JSON file did not parse.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        source: serde_json::Error,
    },
    /// A required field is absent.
    #[error("{path}: required field `{field}` is missing")]
    MissingField {
        /// The file.
        path: PathBuf,
        /// The field, as a JSON path such as `data[3].paragraphs[0].qas[7].question`.
        field: String,
    },
    /// A field is present but its value cannot be used.
    #[error("{path}: field `{field}`: {msg}")]
    BadField {
        /// The file.
        path: PathBuf,
        /// The field, as a JSON path such as `data[3].paragraphs[0].qas[7].id`.
        field: String,
        /// What is wrong with it.
        msg: String,
    },
    /// A plot could not be drawn or written.
    #[error("{path}: cannot plot: {msg}")]
    Plot {
        /// The image file.
        path: PathBuf,
        /// What went wrong.
        msg: String,
    },
}

/// Result alias for the evaluation helpers.
pub type Result<T, E = EvalError> = std::result::Result<T, E>;
