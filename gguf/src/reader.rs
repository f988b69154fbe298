//! [`GgufFile`]: a memory-mapped GGUF file with its metadata and tensor index.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::dequant::dequantize;
use super::error::GgufError;
use super::parse::{parse_header, RawTensorInfo};
use super::types::GgmlType;
use super::value::GgufValue;

/// Alignment of the data section and of each tensor when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// Where and how one tensor is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufTensorInfo {
    /// The tensor's name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions in PyTorch (row-major) order, i.e. ggml's `ne[]` reversed:
    /// the last dimension is the contiguous one.
    pub shape: Vec<usize>,
    /// Element type.
    pub dtype: GgmlType,
    /// Byte offset of the data, relative to the start of the data section.
    pub offset: u64,
}

impl GgufTensorInfo {
    /// Number of elements (product of the shape; 1 for a 0-dimensional tensor).
    pub fn n_elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes of data, or `None` if the type's layout is unknown.
    pub fn n_bytes(&self) -> Option<usize> {
        self.dtype.bytes_for(self.n_elements())
    }
}

/// An open GGUF file (version 2 or 3, little-endian).
///
/// The header is parsed and validated by [`GgufFile::open`]; tensor data stays
/// in the memory map and is read only when asked for.
pub struct GgufFile {
    path: PathBuf,
    mmap: Option<Mmap>,
    version: u32,
    alignment: u64,
    data_offset: u64,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensorInfo>,
    /// Absolute byte range of each tensor's data, parallel to `tensors`.
    spans: Vec<Range<usize>>,
    by_name: HashMap<String, usize>,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish_non_exhaustive()
    }
}

impl GgufFile {
    /// Opens, maps and validates a GGUF file.
    ///
    /// Checks the magic and version, every metadata entry and tensor info,
    /// `general.alignment`, and that each tensor's data lies inside the file
    /// (a cut-off file gives [`GgufError::Truncated`] naming the tensor).
    /// Tensors of an unknown type id give [`GgufError::UnsupportedTensorType`],
    /// since their size cannot be known; known types that cannot be
    /// dequantized (e.g. IQ2_XXS) are accepted here and fail in
    /// [`GgufFile::tensor_f32`].
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let path = path.as_ref().to_path_buf();
        let io = |source| GgufError::Io {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let mmap = if len == 0 {
            None
        } else {
            // SAFETY: the map is read-only. As with any mmap, the file must not
            // be truncated or modified by another process while it is open;
            // model files are not written in place.
            Some(unsafe { Mmap::map(&file) }.map_err(io)?)
        };
        let buf: &[u8] = mmap.as_deref().unwrap_or(&[]);
        let header = parse_header(&path, buf)?;

        let alignment = match header.metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a.is_power_of_two() => a,
                _ => {
                    return Err(GgufError::Malformed {
                        path,
                        what: format!(
                            "general.alignment must be a power of two, found {} {v}",
                            v.type_name()
                        ),
                    })
                }
            },
        };
        let data_offset = (header.infos_end as u64).next_multiple_of(alignment);

        let mut tensors = Vec::with_capacity(header.tensors.len());
        let mut spans = Vec::with_capacity(header.tensors.len());
        let mut by_name = HashMap::with_capacity(header.tensors.len());
        for raw in header.tensors {
            let (info, span) = check_tensor(&path, raw, data_offset, alignment, buf.len())?;
            if by_name.insert(info.name.clone(), tensors.len()).is_some() {
                return Err(GgufError::Malformed {
                    path,
                    what: format!("duplicate tensor name '{}'", info.name),
                });
            }
            tensors.push(info);
            spans.push(span);
        }

        tracing::debug!(
            path = %path.display(),
            version = header.version,
            metadata = header.metadata.len(),
            tensors = tensors.len(),
            "opened GGUF file"
        );
        Ok(GgufFile {
            path,
            mmap,
            version: header.version,
            alignment,
            data_offset,
            metadata: header.metadata,
            tensors,
            spans,
            by_name,
        })
    }

    /// The path the file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// GGUF format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Alignment of the tensor data (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute file offset of the data section (tensor offsets are relative to it).
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// All metadata entries, sorted by key.
    pub fn metadata(&self) -> &BTreeMap<String, GgufValue> {
        &self.metadata
    }

    /// The metadata value for `key`, if present.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    fn require(&self, key: &str) -> Result<&GgufValue, GgufError> {
        self.metadata.get(key).ok_or_else(|| GgufError::MissingKey {
            path: self.path.clone(),
            key: key.to_string(),
        })
    }

    fn wrong_type(&self, key: &str, expected: &'static str, v: &GgufValue) -> GgufError {
        GgufError::WrongType {
            path: self.path.clone(),
            key: key.to_string(),
            expected,
            found: describe(v),
        }
    }

    /// The value of `key` as u64 (see [`GgufValue::as_u64`]).
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        let v = self.require(key)?;
        v.as_u64()
            .ok_or_else(|| self.wrong_type(key, "a non-negative integer", v))
    }

    /// The value of `key` as i64 (see [`GgufValue::as_i64`]).
    pub fn get_i64(&self, key: &str) -> Result<i64, GgufError> {
        let v = self.require(key)?;
        v.as_i64()
            .ok_or_else(|| self.wrong_type(key, "an integer", v))
    }

    /// The value of `key` as f64 (see [`GgufValue::as_f64`]).
    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        let v = self.require(key)?;
        v.as_f64()
            .ok_or_else(|| self.wrong_type(key, "a number", v))
    }

    /// The value of `key`, which must be a bool.
    pub fn get_bool(&self, key: &str) -> Result<bool, GgufError> {
        let v = self.require(key)?;
        v.as_bool().ok_or_else(|| self.wrong_type(key, "a bool", v))
    }

    /// The value of `key`, which must be a string.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        let v = self.require(key)?;
        v.as_str()
            .ok_or_else(|| self.wrong_type(key, "a string", v))
    }

    /// The value of `key`, which must be an array.
    pub fn get_array(&self, key: &str) -> Result<&[GgufValue], GgufError> {
        let v = self.require(key)?;
        v.as_array()
            .ok_or_else(|| self.wrong_type(key, "an array", v))
    }

    /// All tensor infos, in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    /// The info of the tensor `name`, if present.
    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    fn index(&self, name: &str) -> Result<usize, GgufError> {
        self.by_name
            .get(name)
            .copied()
            .ok_or_else(|| GgufError::MissingTensor {
                path: self.path.clone(),
                name: name.to_string(),
            })
    }

    /// The raw (still quantized) bytes of tensor `name`, straight from the map.
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8], GgufError> {
        let i = self.index(name)?;
        let buf: &[u8] = self.mmap.as_deref().unwrap_or(&[]);
        // open() checked every span against the file length.
        buf.get(self.spans[i].clone())
            .ok_or_else(|| GgufError::Truncated {
                path: self.path.clone(),
                what: format!("data of tensor '{name}'"),
            })
    }

    /// Tensor `name` dequantized to f32, with its shape (as in [`GgufTensorInfo::shape`]).
    ///
    /// Fails with [`GgufError::UnsupportedTensorType`] for types that
    /// [`crate::dequantize`] does not handle.
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), GgufError> {
        let i = self.index(name)?;
        let info = &self.tensors[i];
        if !info.dtype.can_dequantize() {
            return Err(GgufError::UnsupportedTensorType {
                path: self.path.clone(),
                tensor: name.to_string(),
                dtype: info.dtype.to_string(),
            });
        }
        let data = self.tensor_bytes(name)?;
        let mut out = vec![0f32; info.n_elements()];
        dequantize(info.dtype, data, &mut out).map_err(|e| GgufError::Malformed {
            path: self.path.clone(),
            what: format!("tensor '{name}': {e}"),
        })?;
        Ok((info.shape.clone(), out))
    }
}

/// A short description of a value for error messages.
fn describe(v: &GgufValue) -> String {
    match v {
        GgufValue::String(s) => format!("a string of {} bytes", s.len()),
        GgufValue::Array(a) => format!("an array of {} elements", a.len()),
        other => format!("{} {other}", other.type_name()),
    }
}

/// Validates one tensor info against the file and converts it.
fn check_tensor(
    path: &Path,
    raw: RawTensorInfo,
    data_offset: u64,
    alignment: u64,
    file_len: usize,
) -> Result<(GgufTensorInfo, Range<usize>), GgufError> {
    let name = raw.name;
    let malformed = |what: String| GgufError::Malformed {
        path: path.to_path_buf(),
        what: format!("tensor '{name}': {what}"),
    };
    let dtype = GgmlType::from_id(raw.type_id);
    let (Some(bs), Some(ts)) = (dtype.block_size(), dtype.type_size()) else {
        return Err(GgufError::UnsupportedTensorType {
            path: path.to_path_buf(),
            tensor: name,
            dtype: dtype.to_string(),
        });
    };
    let ne0 = raw.ne.first().copied().unwrap_or(1);
    if !ne0.is_multiple_of(bs as u64) {
        return Err(malformed(format!(
            "row length {ne0} is not a multiple of the {dtype} block size {bs}"
        )));
    }
    let n_elements = raw
        .ne
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= i64::MAX as u64)
        .ok_or_else(|| malformed(format!("element count of shape {:?} overflows", raw.ne)))?;
    let n_bytes = (n_elements / bs as u64)
        .checked_mul(ts as u64)
        .ok_or_else(|| malformed("byte size overflows".into()))?;
    if !raw.offset.is_multiple_of(alignment) {
        return Err(malformed(format!(
            "data offset {} is not a multiple of the alignment {alignment}",
            raw.offset
        )));
    }
    let start = data_offset.checked_add(raw.offset);
    let end = start.and_then(|s| s.checked_add(n_bytes));
    let (Some(start), Some(end)) = (start, end) else {
        return Err(malformed(format!("data offset {} overflows", raw.offset)));
    };
    if end > file_len as u64 {
        return Err(GgufError::Truncated {
            path: path.to_path_buf(),
            what: format!(
                "data of tensor '{name}' ({dtype}, bytes {start}..{end}) extends past the end of the file ({file_len} bytes)"
            ),
        });
    }
    // start and end are at most file_len, and each dimension at most
    // i64::MAX, so on 64-bit targets these conversions cannot fail.
    let to_usize =
        |v: u64| usize::try_from(v).map_err(|_| malformed(format!("{v} does not fit in usize")));
    let shape = raw
        .ne
        .iter()
        .rev()
        .map(|&d| to_usize(d))
        .collect::<Result<Vec<_>, _>>()?;
    let span = to_usize(start)?..to_usize(end)?;
    Ok((
        GgufTensorInfo {
            name,
            shape,
            dtype,
            offset: raw.offset,
        },
        span,
    ))
}
