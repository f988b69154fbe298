//! Writing records as zstd-compressed Parquet with bounded row groups, in the
//! column layout [`SchemaSpec::text`] / [`SchemaSpec::qa`] read back, plus
//! `id` and `source` columns for provenance.

use std::sync::Arc;

use arrow_array::builder::{ListBuilder, StringBuilder};
use arrow_array::{ArrayRef, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use crate::error::{DataError, Location, Result};
use crate::schema::Record;

/// Row-group and compression settings.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct WriterConfig {
    /// Rows per row group at most.
    pub row_group_rows: usize,
    /// Text bytes per row group at most (a row group closes once it reaches this).
    pub row_group_bytes: usize,
    /// Rows per file at most.
    pub file_rows: usize,
    /// zstd level (1..=22).
    pub zstd_level: i32,
}

impl Default for WriterConfig {
    fn default() -> Self {
        Self {
            row_group_rows: 256,
            row_group_bytes: 8 << 20,
            file_rows: 8192,
            zstd_level: 3,
        }
    }
}

/// A record with its provenance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourcedRecord {
    /// A stable id (e.g. `coqa/3qil.../2`).
    pub id: String,
    /// The source's name (e.g. `coqa`).
    pub source: String,
    /// The record.
    pub record: Record,
}

fn arrow_schema(qa: bool) -> Arc<Schema> {
    let mut fields = vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("source", DataType::Utf8, false),
    ];
    if qa {
        fields.push(Field::new("context", DataType::Utf8, false));
        fields.push(Field::new("question", DataType::Utf8, false));
        fields.push(Field::new(
            "answer",
            DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
            false,
        ));
    } else {
        fields.push(Field::new("text", DataType::Utf8, false));
    }
    Arc::new(Schema::new(fields))
}

fn to_batch(rows: &[SourcedRecord], schema: &Arc<Schema>, qa: bool) -> Result<RecordBatch> {
    let ids: ArrayRef = Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.id)));
    let srcs: ArrayRef = Arc::new(StringArray::from_iter_values(
        rows.iter().map(|r| &r.source),
    ));
    let mut cols = vec![ids, srcs];
    let mismatch = |r: &SourcedRecord| DataError::Source {
        path: r.id.clone(),
        reason: "text and QA records mixed in one Parquet file".into(),
    };
    if qa {
        let mut c = StringBuilder::new();
        let mut q = StringBuilder::new();
        let mut a = ListBuilder::new(StringBuilder::new());
        for r in rows {
            let Record::Qa {
                context,
                question,
                answers,
            } = &r.record
            else {
                return Err(mismatch(r));
            };
            c.append_value(context);
            q.append_value(question);
            for x in answers {
                a.values().append_value(x);
            }
            a.append(true);
        }
        cols.push(Arc::new(c.finish()));
        cols.push(Arc::new(q.finish()));
        cols.push(Arc::new(a.finish()));
    } else {
        let mut t = StringBuilder::new();
        for r in rows {
            let Record::Text { text } = &r.record else {
                return Err(mismatch(r));
            };
            t.append_value(text);
        }
        cols.push(Arc::new(t.finish()));
    }
    RecordBatch::try_new(schema.clone(), cols).map_err(|e| DataError::Arrow {
        location: Location::file("<writer>"),
        source: e,
    })
}

/// Encodes `rows` (all text or all QA) as one Parquet file in memory.
pub fn encode_parquet(rows: &[SourcedRecord], cfg: &WriterConfig) -> Result<Vec<u8>> {
    let qa = matches!(rows.first().map(|r| &r.record), Some(Record::Qa { .. }));
    let schema = arrow_schema(qa);
    let perr = |e: parquet::errors::ParquetError| DataError::Parquet {
        location: Location::file("<writer>"),
        source: e,
    };
    let level = ZstdLevel::try_new(cfg.zstd_level).map_err(perr)?;
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(level))
        .set_max_row_group_row_count(Some(cfg.row_group_rows.max(1)))
        .build();
    let mut buf = Vec::new();
    let mut w = ArrowWriter::try_new(&mut buf, schema.clone(), Some(props)).map_err(perr)?;
    let mut start = 0;
    while start < rows.len() {
        // A row group: up to row_group_rows rows or row_group_bytes of text.
        let mut end = start;
        let mut bytes = 0;
        while end < rows.len()
            && end - start < cfg.row_group_rows.max(1)
            && bytes < cfg.row_group_bytes
        {
            bytes += rows[end].record.text_bytes();
            end += 1;
        }
        w.write(&to_batch(&rows[start..end], &schema, qa)?)
            .map_err(perr)?;
        w.flush().map_err(perr)?;
        start = end;
    }
    w.close().map_err(perr)?;
    Ok(buf)
}
