//! GGUF metadata values (`gguf_type` in gguf.h).

use std::fmt;

/// One GGUF metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// `GGUF_TYPE_UINT8` (0).
    U8(u8),
    /// `GGUF_TYPE_INT8` (1).
    I8(i8),
    /// `GGUF_TYPE_UINT16` (2).
    U16(u16),
    /// `GGUF_TYPE_INT16` (3).
    I16(i16),
    /// `GGUF_TYPE_UINT32` (4).
    U32(u32),
    /// `GGUF_TYPE_INT32` (5).
    I32(i32),
    /// `GGUF_TYPE_UINT64` (10).
    U64(u64),
    /// `GGUF_TYPE_INT64` (11).
    I64(i64),
    /// `GGUF_TYPE_FLOAT32` (6).
    F32(f32),
    /// `GGUF_TYPE_FLOAT64` (12).
    F64(f64),
    /// `GGUF_TYPE_BOOL` (7).
    Bool(bool),
    /// `GGUF_TYPE_STRING` (8).
    String(String),
    /// `GGUF_TYPE_ARRAY` (9); GGUF arrays are homogeneous.
    Array(Vec<GgufValue>),
}

/// 2^64 as f64, the first float that does not fit in u64.
const TWO_POW_64: f64 = 18_446_744_073_709_551_616.0;
/// 2^63 as f64, the first float that does not fit in i64.
const TWO_POW_63: f64 = 9_223_372_036_854_775_808.0;

impl GgufValue {
    /// The value as u64: any non-negative integer, or a float that is a
    /// non-negative whole number below 2^64. `None` otherwise.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            GgufValue::F32(v) => float_to_u64(v.into()),
            GgufValue::F64(v) => float_to_u64(v),
            _ => None,
        }
    }

    /// The value as i64: any integer in range, or a float that is a whole
    /// number in range. `None` otherwise.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => i64::try_from(v).ok(),
            GgufValue::I8(v) => Some(v.into()),
            GgufValue::I16(v) => Some(v.into()),
            GgufValue::I32(v) => Some(v.into()),
            GgufValue::I64(v) => Some(v),
            GgufValue::F32(v) => float_to_i64(v.into()),
            GgufValue::F64(v) => float_to_i64(v),
            _ => None,
        }
    }

    /// The value as f64: any float or integer (64-bit integers above 2^53 are
    /// rounded to the nearest f64). `None` for bools, strings and arrays.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v as f64),
            GgufValue::I8(v) => Some(v.into()),
            GgufValue::I16(v) => Some(v.into()),
            GgufValue::I32(v) => Some(v.into()),
            GgufValue::I64(v) => Some(v as f64),
            GgufValue::F32(v) => Some(v.into()),
            GgufValue::F64(v) => Some(v),
            _ => None,
        }
    }

    /// The string, if this is a string value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The bool, if this is a bool value.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The elements, if this is an array value.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(items) => Some(items),
            _ => None,
        }
    }

    /// The GGUF name of the value's type (`"u32"`, `"string"`, `"array"`, ...).
    pub fn type_name(&self) -> &'static str {
        match self {
            GgufValue::U8(_) => "u8",
            GgufValue::I8(_) => "i8",
            GgufValue::U16(_) => "u16",
            GgufValue::I16(_) => "i16",
            GgufValue::U32(_) => "u32",
            GgufValue::I32(_) => "i32",
            GgufValue::U64(_) => "u64",
            GgufValue::I64(_) => "i64",
            GgufValue::F32(_) => "f32",
            GgufValue::F64(_) => "f64",
            GgufValue::Bool(_) => "bool",
            GgufValue::String(_) => "string",
            GgufValue::Array(_) => "array",
        }
    }
}

fn float_to_u64(v: f64) -> Option<u64> {
    // The range check also rejects NaN.
    (v.fract() == 0.0 && (0.0..TWO_POW_64).contains(&v)).then_some(v as u64)
}

fn float_to_i64(v: f64) -> Option<i64> {
    (v.fract() == 0.0 && (-TWO_POW_63..TWO_POW_63).contains(&v)).then_some(v as i64)
}

impl fmt::Display for GgufValue {
    /// Scalars print plainly, strings quoted (Rust `Debug` escaping), arrays as
    /// `[a, b, ...]` with at most 8 elements shown followed by the total length.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GgufValue::U8(v) => write!(f, "{v}"),
            GgufValue::I8(v) => write!(f, "{v}"),
            GgufValue::U16(v) => write!(f, "{v}"),
            GgufValue::I16(v) => write!(f, "{v}"),
            GgufValue::U32(v) => write!(f, "{v}"),
            GgufValue::I32(v) => write!(f, "{v}"),
            GgufValue::U64(v) => write!(f, "{v}"),
            GgufValue::I64(v) => write!(f, "{v}"),
            GgufValue::F32(v) => write!(f, "{v}"),
            GgufValue::F64(v) => write!(f, "{v}"),
            GgufValue::Bool(v) => write!(f, "{v}"),
            GgufValue::String(s) => write!(f, "{s:?}"),
            GgufValue::Array(items) => {
                const SHOWN: usize = 8;
                f.write_str("[")?;
                for (i, item) in items.iter().take(SHOWN).enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{item}")?;
                }
                if items.len() > SHOWN {
                    write!(f, ", ... ({} elements)", items.len())?;
                }
                f.write_str("]")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::GgufValue as V;

    #[test]
    fn numeric_coercions() {
        assert_eq!(V::U8(7).as_u64(), Some(7));
        assert_eq!(V::I32(-1).as_u64(), None);
        assert_eq!(V::I32(-1).as_i64(), Some(-1));
        assert_eq!(V::U64(u64::MAX).as_i64(), None);
        assert_eq!(V::F32(3.0).as_u64(), Some(3));
        assert_eq!(V::F32(3.5).as_u64(), None);
        assert_eq!(V::F64(f64::NAN).as_i64(), None);
        assert_eq!(V::F64(1e30).as_u64(), None);
        assert_eq!(V::F64(-2.0).as_i64(), Some(-2));
        assert_eq!(V::U32(5).as_f64(), Some(5.0));
        assert_eq!(V::F32(0.1).as_f64(), Some(f64::from(0.1f32)));
        assert_eq!(V::String("x".into()).as_u64(), None);
        assert_eq!(V::Bool(true).as_u64(), None);
        assert_eq!(V::Bool(true).as_bool(), Some(true));
        assert_eq!(V::U8(1).as_bool(), None);
        assert_eq!(V::String("x".into()).as_str(), Some("x"));
        let arr = V::Array(vec![V::U8(1), V::U8(2)]);
        assert_eq!(arr.as_array().map(<[V]>::len), Some(2));
        assert_eq!(arr.to_string(), "[1, 2]");
        let long = V::Array((0..10).map(V::I32).collect());
        assert_eq!(
            long.to_string(),
            "[0, 1, 2, 3, 4, 5, 6, 7, ... (10 elements)]"
        );
    }
}
