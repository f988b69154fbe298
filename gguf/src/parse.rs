//! Parsing of the GGUF header: magic, version, metadata and tensor infos.
//!
//! Layout (little-endian; see ggml's docs/gguf.md):
//! `"GGUF" u32:version u64:n_tensors u64:n_kv`, then `n_kv` entries
//! `string:key u32:value_type value`, then `n_tensors` infos
//! `string:name u32:n_dims u64:ne[n_dims] u32:ggml_type u64:offset`, then
//! padding to `general.alignment`, then the tensor data. A string is
//! `u64:len` followed by `len` bytes of UTF-8; an array value is
//! `u32:elem_type u64:count` followed by the elements.
//!
//! Every count and length is checked against the bytes left before anything
//! is allocated, so a corrupt header cannot make the reader allocate more than
//! a small multiple of the file size or recurse without bound. Anything that
//! runs past the end of the file is reported as [`GgufError::Truncated`]
//! (whether the file was cut or the count is garbage cannot be told apart);
//! invalid values (unknown types, bad UTF-8 in names, too many dimensions,
//! duplicate keys) as [`GgufError::Malformed`].

use std::collections::BTreeMap;
use std::path::Path;

use super::error::GgufError;
use super::value::GgufValue;

/// `"GGUF"` as it appears in the first four bytes.
pub(crate) const MAGIC: [u8; 4] = *b"GGUF";
/// ggml's `GGML_MAX_DIMS`: tensors have at most this many dimensions.
pub(crate) const MAX_DIMS: u32 = 4;
/// How deep arrays of arrays may nest (ggml itself allows no nesting).
const MAX_ARRAY_DEPTH: u32 = 8;
/// Most array elements reserved up front (a real vocabulary has ~256k).
const MAX_ARRAY_PREALLOC: u64 = 1 << 20;
/// Smallest possible metadata entry: empty key (8) + type (4) + a u8 value (1).
const MIN_KV_BYTES: u64 = 13;
/// Smallest possible tensor info: empty name (8) + n_dims (4) + type (4) + offset (8).
const MIN_TENSOR_INFO_BYTES: u64 = 24;

/// A tensor info record as stored in the file.
#[derive(Debug)]
pub(crate) struct RawTensorInfo {
    pub name: String,
    /// ggml order: `ne[0]` (the contiguous dimension) first.
    pub ne: Vec<u64>,
    pub type_id: u32,
    pub offset: u64,
}

/// Everything before the data section.
#[derive(Debug)]
pub(crate) struct Header {
    pub version: u32,
    pub metadata: BTreeMap<String, GgufValue>,
    pub tensors: Vec<RawTensorInfo>,
    /// Byte position just after the last tensor info (before alignment padding).
    pub infos_end: usize,
}

/// A parse failure before context (which item, which file) is attached.
enum RawErr {
    /// The buffer ended.
    Eof,
    /// A count or length runs past the end of the buffer; the message says how far.
    Short(String),
    /// The bytes are invalid; the message says how.
    Bad(String),
}

type Raw<T> = Result<T, RawErr>;

/// Attaches the file and the item being read to a [`RawErr`].
fn at<T>(r: Raw<T>, path: &Path, what: impl FnOnce() -> String) -> Result<T, GgufError> {
    r.map_err(|e| match e {
        RawErr::Eof => GgufError::Truncated {
            path: path.to_path_buf(),
            what: format!("file ends inside {}", what()),
        },
        RawErr::Short(msg) => GgufError::Truncated {
            path: path.to_path_buf(),
            what: format!("file ends inside {}: {msg}", what()),
        },
        RawErr::Bad(msg) => GgufError::Malformed {
            path: path.to_path_buf(),
            what: format!("{}: {msg}", what()),
        },
    })
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Raw<&'a [u8]> {
        if n > self.remaining() {
            return Err(RawErr::Eof);
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Raw<[u8; N]> {
        let s = self.take(N)?;
        <[u8; N]>::try_from(s).map_err(|_| RawErr::Eof)
    }

    fn u8(&mut self) -> Raw<u8> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Raw<u32> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Raw<u64> {
        self.array().map(u64::from_le_bytes)
    }

    /// Checks that `count` items of at least `min_size` bytes each can follow,
    /// before anything is allocated for them.
    fn check_fits(&self, count: u64, min_size: u64, what: &str) -> Raw<()> {
        match count.checked_mul(min_size) {
            Some(n) if n <= self.remaining() as u64 => Ok(()),
            need => Err(RawErr::Short(format!(
                "{what} count {count} needs at least {} bytes, only {} left",
                need.map_or_else(|| "2^64".to_string(), |n| n.to_string()),
                self.remaining()
            ))),
        }
    }

    /// The bytes of a GGUF string (u64 length + bytes).
    fn string_bytes(&mut self) -> Raw<&'a [u8]> {
        let len = self.u64()?;
        self.check_fits(len, 1, "string length")?;
        // check_fits guarantees len <= remaining, which is a usize.
        self.take(len as usize)
    }

    /// A string that must be valid UTF-8 (keys, tensor names).
    fn strict_string(&mut self) -> Raw<String> {
        let b = self.string_bytes()?;
        String::from_utf8(b.to_vec()).map_err(|e| RawErr::Bad(format!("invalid UTF-8: {e}")))
    }

    fn value(&mut self, vtype: u32, depth: u32) -> Raw<GgufValue> {
        Ok(match vtype {
            0 => GgufValue::U8(self.u8()?),
            1 => GgufValue::I8(i8::from_le_bytes(self.array()?)),
            2 => GgufValue::U16(u16::from_le_bytes(self.array()?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array()?)),
            4 => GgufValue::U32(self.u32()?),
            5 => GgufValue::I32(i32::from_le_bytes(self.array()?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array()?)),
            // Like gguf-py (a numpy bool view), any non-zero byte is true.
            7 => GgufValue::Bool(self.u8()? != 0),
            // Values are kept even if not valid UTF-8 (llama.cpp does not check);
            // invalid sequences become U+FFFD.
            8 => GgufValue::String(String::from_utf8_lossy(self.string_bytes()?).into_owned()),
            9 => self.array_value(depth)?,
            10 => GgufValue::U64(self.u64()?),
            11 => GgufValue::I64(i64::from_le_bytes(self.array()?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array()?)),
            other => return Err(RawErr::Bad(format!("unknown value type {other}"))),
        })
    }

    fn array_value(&mut self, depth: u32) -> Raw<GgufValue> {
        if depth >= MAX_ARRAY_DEPTH {
            return Err(RawErr::Bad(format!(
                "arrays nested more than {MAX_ARRAY_DEPTH} deep"
            )));
        }
        let etype = self.u32()?;
        let count = self.u64()?;
        let min_size = min_value_size(etype)
            .ok_or_else(|| RawErr::Bad(format!("unknown array element type {etype}")))?;
        self.check_fits(count, min_size, "array element")?;
        // check_fits bounds count by the bytes left; the pre-allocation is
        // capped further, anything longer grows only as elements are read.
        let mut items = Vec::with_capacity(count.min(MAX_ARRAY_PREALLOC) as usize);
        for _ in 0..count {
            items.push(self.value(etype, depth + 1)?);
        }
        Ok(GgufValue::Array(items))
    }
}

/// Fewest bytes a value of GGUF type `vtype` can take; `None` for unknown types.
fn min_value_size(vtype: u32) -> Option<u64> {
    Some(match vtype {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 12,
        _ => return None,
    })
}

/// Parses the header of the GGUF file `path` whose bytes are `buf`.
pub(crate) fn parse_header(path: &Path, buf: &[u8]) -> Result<Header, GgufError> {
    let mut c = Cursor { buf, pos: 0 };
    let file_desc = || format!("the header (file is {} bytes)", buf.len());

    // Magic: a file shorter than 4 bytes that could still be the start of
    // "GGUF" is truncated, anything else not starting with it is not GGUF.
    if buf.len() < 4 {
        if MAGIC.starts_with(buf) {
            return at(Err(RawErr::Eof), path, file_desc);
        }
        return Err(GgufError::BadMagic {
            path: path.to_path_buf(),
        });
    }
    if at(c.array::<4>(), path, file_desc)? != MAGIC {
        return Err(GgufError::BadMagic {
            path: path.to_path_buf(),
        });
    }

    let version = at(c.u32(), path, file_desc)?;
    if version.swap_bytes() == 2 || version.swap_bytes() == 3 {
        return Err(GgufError::Malformed {
            path: path.to_path_buf(),
            what: format!(
                "big-endian GGUF (version {}) is not supported",
                version.swap_bytes()
            ),
        });
    }
    if version != 2 && version != 3 {
        return Err(GgufError::UnsupportedVersion {
            path: path.to_path_buf(),
            version,
        });
    }

    let n_tensors = at(c.u64(), path, file_desc)?;
    let n_kv = at(c.u64(), path, file_desc)?;
    at(
        c.check_fits(n_kv, MIN_KV_BYTES, "metadata entry"),
        path,
        || "the header".into(),
    )?;

    let mut metadata = BTreeMap::new();
    for i in 0..n_kv {
        let key = at(c.strict_string(), path, || {
            format!("the key of metadata entry #{i}")
        })?;
        let what = || format!("metadata key '{key}'");
        let vtype = at(c.u32(), path, what)?;
        let value = at(c.value(vtype, 0), path, what)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(GgufError::Malformed {
                path: path.to_path_buf(),
                what: format!("duplicate metadata key '{key}'"),
            });
        }
    }

    at(
        c.check_fits(n_tensors, MIN_TENSOR_INFO_BYTES, "tensor"),
        path,
        || "the tensor infos".into(),
    )?;
    // Bounded by check_fits: at most file_size / 24 entries.
    let mut tensors = Vec::with_capacity(n_tensors as usize);
    for i in 0..n_tensors {
        let name = at(c.strict_string(), path, || {
            format!("the name of tensor info #{i}")
        })?;
        let what = || format!("the info of tensor '{name}'");
        let n_dims = at(c.u32(), path, what)?;
        if n_dims > MAX_DIMS {
            return at(
                Err(RawErr::Bad(format!(
                    "{n_dims} dimensions (at most {MAX_DIMS})"
                ))),
                path,
                what,
            );
        }
        let mut ne = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            let d = at(c.u64(), path, what)?;
            if d > i64::MAX as u64 {
                return at(
                    Err(RawErr::Bad(format!("dimension {d} out of range"))),
                    path,
                    what,
                );
            }
            ne.push(d);
        }
        let type_id = at(c.u32(), path, what)?;
        let offset = at(c.u64(), path, what)?;
        tensors.push(RawTensorInfo {
            name,
            ne,
            type_id,
            offset,
        });
    }

    Ok(Header {
        version,
        metadata,
        tensors,
        infos_end: c.pos,
    })
}
