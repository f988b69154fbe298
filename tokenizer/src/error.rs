//! Errors of the tokenizer layer. Every message names the file the
//! tokenizer came from (a GGUF file, or a file of an HF tokenizer directory)
//! and, where one is involved, the metadata key or JSON field.

use std::path::PathBuf;

/// The error type of [`crate`]: loading a tokenizer, encoding,
/// decoding and rendering chat templates.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A file could not be read (missing, unreadable, not a directory...).
    #[error("{}: cannot read: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },

    /// A JSON file is not valid JSON.
    #[error("{}: invalid JSON: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },

    /// A required metadata key or JSON field is absent.
    #[error("{}: {key} missing", path.display())]
    Missing {
        /// The file.
        path: PathBuf,
        /// The metadata key or JSON field.
        key: String,
    },

    /// A metadata key or JSON field holds a value of the wrong type or an
    /// out-of-range value.
    #[error("{}: {key}: {reason}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The metadata key or JSON field.
        key: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The file describes a tokenizer this crate cannot build.
    #[error("{}: {key} = {value:?} is not supported (supported: {supported})", path.display())]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// The metadata key naming the tokenizer kind.
        key: String,
        /// Its value.
        value: String,
        /// What is supported instead.
        supported: String,
    },

    /// The `tokenizers` library refused to build or load a component.
    #[error("{}: cannot build tokenizer ({what}): {source}", path.display())]
    Build {
        /// The file the tokenizer comes from.
        path: PathBuf,
        /// Which component (BPE model, post-processor, tokenizer.json...).
        what: String,
        /// The library's error.
        #[source]
        source: tokenizers::Error,
    },

    /// Encoding a text failed.
    #[error("{}: encoding failed: {source}", path.display())]
    Encode {
        /// The file the tokenizer comes from.
        path: PathBuf,
        /// The library's error.
        #[source]
        source: tokenizers::Error,
    },

    /// Decoding token ids failed.
    #[error("{}: decoding failed: {source}", path.display())]
    Decode {
        /// The file the tokenizer comes from.
        path: PathBuf,
        /// The library's error.
        #[source]
        source: tokenizers::Error,
    },

    /// The tokenizer has no chat template (no `tokenizer.chat_template` key in
    /// the GGUF file, no `chat_template` in `tokenizer_config.json` and no
    /// `chat_template.jinja`).
    #[error("{}: no chat template (tokenizer.chat_template / chat_template absent)", path.display())]
    NoChatTemplate {
        /// The file the tokenizer comes from.
        path: PathBuf,
    },

    /// The chat template failed to compile or render (including a template's
    /// own `raise_exception(...)`).
    #[error("{}: chat template: {message}", path.display())]
    Template {
        /// The file the template comes from.
        path: PathBuf,
        /// The template engine's message, with its cause chain.
        message: String,
        /// The template engine's error.
        #[source]
        source: minijinja::Error,
    },

    /// Reading the GGUF metadata failed.
    #[error(transparent)]
    Gguf(#[from] kvd_gguf::GgufError),
}
