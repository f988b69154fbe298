//! GGUF file reading and ggml dequantization, in pure Rust.
//!
//! [`GgufFile::open`] memory-maps a GGUF (v2 or v3, little-endian) file,
//! validates its header and the placement of every tensor, and exposes the
//! metadata ([`GgufValue`]) and tensor index ([`GgufTensorInfo`]). Tensor data
//! is read lazily: [`GgufFile::tensor_bytes`] returns the raw bytes from the
//! map, [`GgufFile::tensor_f32`] decodes them with [`dequantize`], which
//! reproduces ggml's `dequantize_row_*` bit for bit.
//!
//! ```no_run
//! use kvd_gguf::GgufFile;
//! let f = GgufFile::open("model.gguf")?;
//! let arch = f.get_str("general.architecture")?;
//! let (shape, values) = f.tensor_f32("token_embd.weight")?;
//! # Ok::<(), kvd_gguf::GgufError>(())
//! ```

mod dequant;
mod error;
mod parse;
mod reader;
mod types;
mod value;

pub use dequant::dequantize;
pub use error::GgufError;
pub use reader::{GgufFile, GgufTensorInfo, DEFAULT_ALIGNMENT};
pub use types::{GgmlType, QK_K};
pub use value::GgufValue;
