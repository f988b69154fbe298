//! ggml tensor element types (`enum ggml_type` in ggml.h) and their block layout.

use std::fmt;

/// Number of elements in a "k-quant" super-block (`QK_K` in ggml).
pub const QK_K: usize = 256;

/// A ggml tensor element type, as stored in a GGUF tensor info record.
///
/// The ids match `enum ggml_type` in ggml.h (and `GGMLQuantizationType` in
/// gguf-py). Ids that this crate does not know are kept as [`GgmlType::Other`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    /// 32-bit IEEE float (id 0).
    F32,
    /// 16-bit IEEE half float (id 1).
    F16,
    /// 4-bit, blocks of 32 with one f16 scale (id 2).
    Q4_0,
    /// 4-bit, blocks of 32 with f16 scale and minimum (id 3).
    Q4_1,
    /// 5-bit, blocks of 32 with one f16 scale (id 6).
    Q5_0,
    /// 5-bit, blocks of 32 with f16 scale and minimum (id 7).
    Q5_1,
    /// 8-bit, blocks of 32 with one f16 scale (id 8).
    Q8_0,
    /// 8-bit, blocks of 32 with f16 scale and f16 sum (id 9; an activation format).
    Q8_1,
    /// 2-bit k-quant, super-blocks of 256 (id 10).
    Q2K,
    /// 3-bit k-quant, super-blocks of 256 (id 11).
    Q3K,
    /// 4-bit k-quant, super-blocks of 256 (id 12).
    Q4K,
    /// 5-bit k-quant, super-blocks of 256 (id 13).
    Q5K,
    /// 6-bit k-quant, super-blocks of 256 (id 14).
    Q6K,
    /// 8-bit k-quant with f32 scale, super-blocks of 256 (id 15).
    Q8K,
    /// Importance-matrix 2-bit quant `IQ2_XXS` (id 16).
    IQ2XXS,
    /// `IQ2_XS` (id 17).
    IQ2XS,
    /// `IQ3_XXS` (id 18).
    IQ3XXS,
    /// `IQ1_S` (id 19).
    IQ1S,
    /// `IQ4_NL` (id 20).
    IQ4NL,
    /// `IQ3_S` (id 21).
    IQ3S,
    /// `IQ2_S` (id 22).
    IQ2S,
    /// `IQ4_XS` (id 23).
    IQ4XS,
    /// 8-bit signed integer (id 24).
    I8,
    /// 16-bit signed integer (id 25).
    I16,
    /// 32-bit signed integer (id 26).
    I32,
    /// 64-bit signed integer (id 27).
    I64,
    /// 64-bit IEEE float (id 28).
    F64,
    /// `IQ1_M` (id 29).
    IQ1M,
    /// bfloat16 (id 30).
    BF16,
    /// Ternary quant `TQ1_0` (id 34).
    TQ1_0,
    /// Ternary quant `TQ2_0` (id 35).
    TQ2_0,
    /// Microscaling FP4 `MXFP4` (id 39).
    MXFP4,
    /// A type id this crate does not know; its block layout is unknown.
    Other(u32),
}

/// (id, type, ggml name, block size, type size) for every known type.
const TABLE: &[(u32, GgmlType, &str, usize, usize)] = &[
    (0, GgmlType::F32, "F32", 1, 4),
    (1, GgmlType::F16, "F16", 1, 2),
    (2, GgmlType::Q4_0, "Q4_0", 32, 2 + 16),
    (3, GgmlType::Q4_1, "Q4_1", 32, 2 + 2 + 16),
    (6, GgmlType::Q5_0, "Q5_0", 32, 2 + 4 + 16),
    (7, GgmlType::Q5_1, "Q5_1", 32, 2 + 2 + 4 + 16),
    (8, GgmlType::Q8_0, "Q8_0", 32, 2 + 32),
    (9, GgmlType::Q8_1, "Q8_1", 32, 4 + 32),
    (
        10,
        GgmlType::Q2K,
        "Q2_K",
        QK_K,
        2 + 2 + QK_K / 16 + QK_K / 4,
    ),
    (
        11,
        GgmlType::Q3K,
        "Q3_K",
        QK_K,
        2 + QK_K / 4 + QK_K / 8 + 12,
    ),
    (12, GgmlType::Q4K, "Q4_K", QK_K, 2 + 2 + QK_K / 2 + 12),
    (
        13,
        GgmlType::Q5K,
        "Q5_K",
        QK_K,
        2 + 2 + QK_K / 2 + QK_K / 8 + 12,
    ),
    (
        14,
        GgmlType::Q6K,
        "Q6_K",
        QK_K,
        2 + QK_K / 2 + QK_K / 4 + QK_K / 16,
    ),
    (15, GgmlType::Q8K, "Q8_K", QK_K, 4 + QK_K + QK_K / 8),
    (16, GgmlType::IQ2XXS, "IQ2_XXS", QK_K, 2 + QK_K / 4),
    (
        17,
        GgmlType::IQ2XS,
        "IQ2_XS",
        QK_K,
        2 + QK_K / 4 + QK_K / 32,
    ),
    (
        18,
        GgmlType::IQ3XXS,
        "IQ3_XXS",
        QK_K,
        2 + QK_K / 4 + QK_K / 8,
    ),
    (19, GgmlType::IQ1S, "IQ1_S", QK_K, 2 + QK_K / 8 + QK_K / 16),
    (20, GgmlType::IQ4NL, "IQ4_NL", 32, 2 + 16),
    (
        21,
        GgmlType::IQ3S,
        "IQ3_S",
        QK_K,
        2 + QK_K / 4 + QK_K / 8 + QK_K / 32 + 4,
    ),
    (22, GgmlType::IQ2S, "IQ2_S", QK_K, 2 + QK_K / 4 + QK_K / 16),
    (
        23,
        GgmlType::IQ4XS,
        "IQ4_XS",
        QK_K,
        2 + 2 + QK_K / 2 + QK_K / 64,
    ),
    (24, GgmlType::I8, "I8", 1, 1),
    (25, GgmlType::I16, "I16", 1, 2),
    (26, GgmlType::I32, "I32", 1, 4),
    (27, GgmlType::I64, "I64", 1, 8),
    (28, GgmlType::F64, "F64", 1, 8),
    (
        29,
        GgmlType::IQ1M,
        "IQ1_M",
        QK_K,
        QK_K / 8 + QK_K / 16 + QK_K / 32,
    ),
    (30, GgmlType::BF16, "BF16", 1, 2),
    (34, GgmlType::TQ1_0, "TQ1_0", QK_K, 2 + 4 * 13),
    (35, GgmlType::TQ2_0, "TQ2_0", QK_K, 2 + 64),
    (39, GgmlType::MXFP4, "MXFP4", 32, 1 + 16),
];

impl GgmlType {
    /// The type for a ggml type id; unknown ids become [`GgmlType::Other`].
    pub fn from_id(id: u32) -> Self {
        TABLE
            .iter()
            .find(|row| row.0 == id)
            .map_or(GgmlType::Other(id), |row| row.1)
    }

    fn row(self) -> Option<&'static (u32, GgmlType, &'static str, usize, usize)> {
        TABLE.iter().find(|row| row.1 == self)
    }

    /// The ggml type id (the value stored in GGUF tensor infos).
    pub fn id(self) -> u32 {
        match self {
            GgmlType::Other(id) => id,
            known => known.row().map_or(u32::MAX, |row| row.0),
        }
    }

    /// ggml's name of the type (`ggml_type_name`), e.g. `"Q4_K"`; `"unknown"` for [`GgmlType::Other`].
    pub fn name(self) -> &'static str {
        self.row().map_or("unknown", |row| row.2)
    }

    /// Elements per block (1 for plain types, 32 or 256 for quantized ones);
    /// `None` for [`GgmlType::Other`].
    pub fn block_size(self) -> Option<usize> {
        self.row().map(|row| row.3)
    }

    /// Bytes per block; `None` for [`GgmlType::Other`].
    pub fn type_size(self) -> Option<usize> {
        self.row().map(|row| row.4)
    }

    /// Whether [`crate::dequantize`] can convert this type to f32.
    pub fn can_dequantize(self) -> bool {
        matches!(
            self,
            GgmlType::F32
                | GgmlType::F16
                | GgmlType::BF16
                | GgmlType::Q4_0
                | GgmlType::Q4_1
                | GgmlType::Q5_0
                | GgmlType::Q5_1
                | GgmlType::Q8_0
                | GgmlType::Q2K
                | GgmlType::Q3K
                | GgmlType::Q4K
                | GgmlType::Q5K
                | GgmlType::Q6K
                | GgmlType::Q8K
        )
    }

    /// Bytes taken by `n_elements` elements, or `None` if the type is unknown,
    /// `n_elements` is not a whole number of blocks, or the size overflows.
    pub fn bytes_for(self, n_elements: usize) -> Option<usize> {
        let (bs, ts) = (self.block_size()?, self.type_size()?);
        if !n_elements.is_multiple_of(bs) {
            return None;
        }
        (n_elements / bs).checked_mul(ts)
    }
}

impl fmt::Display for GgmlType {
    /// ggml's name, or `type#<id>` for an unknown id.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GgmlType::Other(id) => write!(f, "type#{id}"),
            known => f.write_str(known.name()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_names_are_unique() {
        for row in TABLE {
            assert_eq!(GgmlType::from_id(row.0), row.1);
            assert_eq!(row.1.id(), row.0);
            assert_eq!(TABLE.iter().filter(|r| r.2 == row.2).count(), 1);
        }
        assert_eq!(GgmlType::from_id(99), GgmlType::Other(99));
        assert_eq!(GgmlType::Other(99).id(), 99);
        assert_eq!(GgmlType::Other(99).to_string(), "type#99");
        assert_eq!(GgmlType::Q4K.to_string(), "Q4_K");
        assert_eq!(GgmlType::Q4K.bytes_for(512), Some(288));
        assert_eq!(GgmlType::Q4K.bytes_for(100), None);
    }
}
