//! Errors of the GGUF reader. Every variant that concerns a file names it,
//! and the tensor or metadata key involved.

use std::path::PathBuf;

/// An error reading or decoding a GGUF file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file could not be opened, stat'ed or mapped.
    #[error("{}: cannot read GGUF file: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },

    /// The file does not start with the `GGUF` magic.
    #[error("{}: not a GGUF file (bad magic)", path.display())]
    BadMagic {
        /// The file.
        path: PathBuf,
    },

    /// The GGUF version is not 2 or 3.
    #[error("{}: unsupported GGUF version {version} (supported: 2, 3)", path.display())]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version in the header.
        version: u32,
    },

    /// The file ends before `what` is complete.
    #[error("{}: truncated GGUF file: {what}", path.display())]
    Truncated {
        /// The file.
        path: PathBuf,
        /// What is cut off (header, a metadata entry, a tensor's data, ...).
        what: String,
    },

    /// A required metadata key is absent.
    #[error("{}: missing GGUF metadata key '{key}'", path.display())]
    MissingKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
    },

    /// A metadata value has a type other than the one asked for.
    #[error("{}: GGUF metadata key '{key}' is {found}, expected {expected}", path.display())]
    WrongType {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// What was asked for (e.g. "an unsigned integer").
        expected: &'static str,
        /// What the file holds (e.g. "string").
        found: String,
    },

    /// No tensor of that name exists.
    #[error("{}: no tensor named '{name}' in GGUF file", path.display())]
    MissingTensor {
        /// The file.
        path: PathBuf,
        /// The tensor name asked for.
        name: String,
    },

    /// The tensor's ggml type cannot be decoded (by this reader, or at all if unknown).
    #[error("{}: tensor '{tensor}' has ggml type {dtype}, which is not supported", path.display())]
    UnsupportedTensorType {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The type's ggml name, or `type#<id>` for an unknown id.
        dtype: String,
    },

    /// The file is structurally invalid (not merely cut short).
    #[error("{}: malformed GGUF file: {what}", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the metadata key or tensor.
        what: String,
    },

    /// [`crate::dequantize`] was asked for a type it cannot decode.
    #[error("cannot dequantize ggml type {dtype}")]
    UnsupportedType {
        /// The type's ggml name.
        dtype: String,
    },

    /// [`crate::dequantize`] got a data or output length that does not
    /// fit the type's block layout.
    #[error("cannot dequantize {dtype}: {what}")]
    LengthMismatch {
        /// The type's ggml name.
        dtype: String,
        /// The lengths involved.
        what: String,
    },
}
