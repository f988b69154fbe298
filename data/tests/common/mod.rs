//! Shared test helpers: synthetic datasets and a toy tokenizer.
#![allow(dead_code)]

use std::sync::Arc;

use kvd_data::writer::{encode_parquet, SourcedRecord, WriterConfig};
use kvd_data::{DataError, Manifest, Record, SchemaSpec, Source, TextTokenizer};

/// Whitespace tokenizer: each word's id is a hash; BOS 1, EOS 2.
pub(crate) struct WordTok;

impl TextTokenizer for WordTok {
    fn encode(&self, text: &str) -> kvd_data::Result<Vec<u32>> {
        Ok(text
            .split_whitespace()
            .map(|w| {
                10 + (w
                    .bytes()
                    .fold(7u32, |h, b| h.wrapping_mul(31).wrapping_add(b as u32))
                    % 1000)
            })
            .collect())
    }
    fn bos_id(&self) -> Option<u32> {
        Some(1)
    }
    fn eos_id(&self) -> Option<u32> {
        Some(2)
    }
}

/// A QA row whose context names its number.
pub(crate) fn qa_row(i: usize, words: usize) -> SourcedRecord {
    let ctx = (0..words)
        .map(|w| format!("w{}", (i + w) % 97))
        .collect::<Vec<_>>()
        .join(" ");
    SourcedRecord {
        id: format!("t/{i}"),
        source: "t".into(),
        record: Record::Qa {
            context: format!("row{i} {ctx}"),
            question: format!("what is row {i}?"),
            answers: vec![format!("row{i}"), "alt".into()],
        },
    }
}

/// Writes `files` Parquet files of QA rows (row counts given) with small row
/// groups into `source`, builds and saves the manifest.
pub(crate) async fn write_qa_dataset(
    source: &Source,
    rows_per_file: &[usize],
    rg_rows: usize,
) -> Manifest {
    let cfg = WriterConfig {
        row_group_rows: rg_rows,
        ..WriterConfig::default()
    };
    let mut next = 0;
    for (f, &n) in rows_per_file.iter().enumerate() {
        let rows: Vec<_> = (next..next + n).map(|i| qa_row(i, 40)).collect();
        next += n;
        let bytes = encode_parquet(&rows, &cfg).expect("encode");
        source
            .put(&format!("part-{f:03}.parquet"), bytes.into())
            .await
            .expect("put");
    }
    let m = Manifest::build(source, &SchemaSpec::qa())
        .await
        .expect("manifest");
    m.save(source).await.expect("save");
    m
}

/// The row number written into a record's context (`row{i} ...`).
pub(crate) fn row_number(r: &Record) -> usize {
    match r {
        Record::Qa { context, .. } => context
            .split_whitespace()
            .next()
            .and_then(|w| w.strip_prefix("row"))
            .and_then(|n| n.parse().ok())
            .expect("row marker"),
        Record::Text { .. } => panic!("text record"),
    }
}

/// A fresh in-memory source.
pub(crate) fn memory() -> Source {
    Source::from_store(
        Arc::new(object_store::memory::InMemory::new()),
        "ds",
        "memory://test/ds",
    )
}

/// Renders an error for assertions.
pub(crate) fn msg(e: &DataError) -> String {
    e.to_string()
}

/// Keeps a source and its runtime alive for a test.
pub(crate) struct Source2(pub Source, pub tokio::runtime::Runtime);
