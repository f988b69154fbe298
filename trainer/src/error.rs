//! Errors of model configuration, weight loading and inference.

use std::path::PathBuf;

/// Everything that can go wrong while loading or running a model. Every variant
/// that stems from a file names that file, and the field or tensor at fault.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
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
    /// A required configuration field is absent.
    #[error("{path}: required config field `{field}` is missing")]
    MissingField {
        /// The config file (config.json or GGUF).
        path: PathBuf,
        /// The field.
        field: String,
    },
    /// A configuration field has a value this crate cannot use.
    #[error("{path}: config field `{field}`: {msg}")]
    BadField {
        /// The config file.
        path: PathBuf,
        /// The field.
        field: String,
        /// What is wrong with it.
        msg: String,
    },
    /// The checkpoint's architecture is not implemented.
    #[error(
        "{path}: unsupported architecture `{arch}` (supported: llama, mistral, qwen2, gemma3)"
    )]
    UnknownArchitecture {
        /// The config file.
        path: PathBuf,
        /// The architecture it names.
        arch: String,
    },
    /// A weight the architecture needs is absent from the checkpoint.
    #[error("{path}: weight `{name}` is missing")]
    MissingWeight {
        /// The checkpoint (directory, index or GGUF file).
        path: PathBuf,
        /// The weight's (HF) name.
        name: String,
    },
    /// A weight has the wrong shape for the configuration.
    #[error("{path}: weight `{name}` has shape {got:?}, the config implies {expected:?}")]
    WeightShape {
        /// The file holding the weight.
        path: PathBuf,
        /// The weight's (HF) name.
        name: String,
        /// Its shape in the file.
        got: Vec<i64>,
        /// The shape the config implies.
        expected: Vec<i64>,
    },
    /// A safetensors file is malformed or truncated, or holds an unsupported dtype.
    #[error("{path}: {msg}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// The tokenizer knows ids the embedding matrix has no row for.
    #[error("vocab size mismatch: the tokenizer has {tokenizer} tokens but the embedding `{name}` in {path} has {embedding} rows")]
    VocabMismatch {
        /// The checkpoint.
        path: PathBuf,
        /// The embedding weight's name.
        name: String,
        /// Tokens in the tokenizer.
        tokenizer: usize,
        /// Rows of the embedding matrix.
        embedding: usize,
    },
    /// A GGUF-level failure (malformed file, unsupported tensor type, ...).
    #[error(transparent)]
    Gguf(#[from] crate::gguf::GgufError),
    /// A tokenizer failure.
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    /// A libtorch failure.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// A dataset failure (names the file, row and column).
    #[error(transparent)]
    Data(#[from] kvd_data::DataError),
    /// An evaluation-set or plotting failure (names the file and field).
    #[error(transparent)]
    Eval(#[from] crate::eval::EvalError),
    /// A caller passed inputs the model cannot take.
    #[error("invalid input: {0}")]
    Input(String),

    /// A collective (gradient all-reduce) failed: a peer died, timed out or
    /// the communicator was aborted by the coordinator's order.
    #[error(transparent)]
    Collective(#[from] crate::dist::CollectiveError),
}

/// Result alias for this crate's model code.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
