//! Bad input: corrupt and truncated Parquet, wrong schema, empty and
//! non-UTF-8 text, over-long documents, objects changed since indexing. Each
//! is a clear error naming file/row/column, or (policy `skip`) a counted skip.

mod common;

use std::sync::Arc;

use arrow_array::{ArrayRef, BinaryArray, RecordBatch, StringArray};
use arrow_schema::{Field, Schema};
use kvd_data::writer::{encode_parquet, SourcedRecord, WriterConfig};
use kvd_data::{
    BadInputKind, BadInputPolicy, BuilderConfig, DataError, Dataset, DatasetOptions,
    ExampleBuilder, Loader, LoaderConfig, Manifest, Record, SchemaSpec, Source,
};
use parquet::arrow::ArrowWriter;

fn parquet_of(cols: Vec<(&str, ArrayRef)>) -> Vec<u8> {
    let schema = Arc::new(Schema::new(
        cols.iter()
            .map(|(n, a)| Field::new(*n, a.data_type().clone(), true))
            .collect::<Vec<_>>(),
    ));
    let batch = RecordBatch::try_new(schema.clone(), cols.into_iter().map(|(_, a)| a).collect())
        .expect("batch");
    let mut buf = Vec::new();
    let mut w = ArrowWriter::try_new(&mut buf, schema, None).expect("writer");
    w.write(&batch).expect("write");
    w.close().expect("close");
    buf
}

fn text_rows(texts: &[&str]) -> Vec<SourcedRecord> {
    texts
        .iter()
        .enumerate()
        .map(|(i, t)| SourcedRecord {
            id: i.to_string(),
            source: "t".into(),
            record: Record::Text {
                text: t.to_string(),
            },
        })
        .collect()
}

fn long_text(words: usize) -> String {
    (0..words)
        .map(|i| format!("w{i}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::test]
async fn corrupt_and_truncated_files_name_the_file() {
    let src = common::memory();
    let good =
        encode_parquet(&text_rows(&[&long_text(300)]), &WriterConfig::default()).expect("enc");
    let mut corrupt = good.clone();
    let n = corrupt.len();
    // Garble the footer length / metadata.
    for b in &mut corrupt[n - 40..n - 4] {
        *b ^= 0x5a;
    }
    src.put("corrupt.parquet", corrupt.into())
        .await
        .expect("put");
    let e = Manifest::build(&src, &SchemaSpec::text())
        .await
        .expect_err("corrupt");
    assert!(matches!(e, DataError::Parquet { .. }), "{e}");
    assert!(e.to_string().contains("corrupt.parquet"), "{e}");

    let src = common::memory();
    src.put("trunc.parquet", good[..good.len() / 2].to_vec().into())
        .await
        .expect("put");
    let e = Manifest::build(&src, &SchemaSpec::text())
        .await
        .expect_err("truncated");
    assert!(e.to_string().contains("trunc.parquet"), "{e}");

    let src = common::memory();
    src.put(
        "notparquet.parquet",
        b"hello world, not parquet at all".to_vec().into(),
    )
    .await
    .expect("put");
    let e = Manifest::build(&src, &SchemaSpec::text())
        .await
        .expect_err("garbage");
    assert!(e.to_string().contains("notparquet.parquet"), "{e}");
}

#[tokio::test]
async fn wrong_schema_names_file_and_column() {
    let src = common::memory();
    let ints: ArrayRef = Arc::new(arrow_array::Int64Array::from(vec![1, 2]));
    src.put("a.parquet", parquet_of(vec![("body", ints.clone())]).into())
        .await
        .expect("put");
    let e = Manifest::build(&src, &SchemaSpec::text())
        .await
        .expect_err("missing column");
    let s = e.to_string();
    assert!(
        s.contains("a.parquet") && s.contains("`text`") && s.contains("body"),
        "{s}"
    );

    let src = common::memory();
    src.put("b.parquet", parquet_of(vec![("text", ints)]).into())
        .await
        .expect("put");
    let e = Manifest::build(&src, &SchemaSpec::text())
        .await
        .expect_err("wrong type");
    let s = e.to_string();
    assert!(
        s.contains("b.parquet") && s.contains("`text`") && s.contains("Int64"),
        "{s}"
    );
    // Configurable column names: the same file as QA with renamed columns is fine.
    let src = common::memory();
    let s1: ArrayRef = Arc::new(StringArray::from(vec!["c"]));
    let s2: ArrayRef = Arc::new(StringArray::from(vec!["q"]));
    let s3: ArrayRef = Arc::new(StringArray::from(vec!["a"]));
    src.put(
        "c.parquet",
        parquet_of(vec![("passage", s1), ("query", s2), ("target", s3)]).into(),
    )
    .await
    .expect("put");
    let spec = SchemaSpec::Qa {
        context: "passage".into(),
        question: "query".into(),
        answer: "target".into(),
    };
    assert_eq!(
        Manifest::build(&src, &spec)
            .await
            .expect("renamed")
            .num_rows(),
        1
    );
}

/// A text dataset with a binary column holding: good, empty, non-UTF-8, good, over-long.
async fn bad_rows_dataset() -> (Arc<Dataset>, Manifest) {
    let src = common::memory();
    let good = long_text(200);
    let huge = long_text(5000);
    let vals: Vec<&[u8]> = vec![
        good.as_bytes(),
        b"   ",
        b"ok \xff\xfe bytes",
        good.as_bytes(),
        huge.as_bytes(),
    ];
    let bin: ArrayRef = Arc::new(BinaryArray::from(vals));
    src.put("rows.parquet", parquet_of(vec![("text", bin)]).into())
        .await
        .expect("put");
    let m = Manifest::build(&src, &SchemaSpec::text())
        .await
        .expect("manifest");
    let ds = Dataset::from_parts(src, m.clone(), DatasetOptions::default())
        .await
        .expect("open");
    (Arc::new(ds), m)
}

fn builder(policy: BadInputPolicy) -> Arc<ExampleBuilder> {
    Arc::new(
        ExampleBuilder::new(
            Arc::new(common::WordTok),
            BuilderConfig {
                max_len: 256,
                max_document_bytes: 20_000,
                policy,
                ..BuilderConfig::default()
            },
        )
        .expect("builder"),
    )
}

#[tokio::test]
async fn bad_rows_error_by_default_with_file_row_column() {
    let (ds, m) = bad_rows_dataset().await;
    let ids = kvd_data::GlobalBatcher::new(&m, 0, 1)
        .next_batch(&mut kvd_data::GlobalBatcher::new(&m, 0, 1).cursor(), 5)
        .expect("ids");
    let rows = ds.read(&ids).await.expect("read");
    let mut errors = Vec::new();
    for (id, r) in &rows {
        match r {
            Err(DataError::BadRow { location, kind, .. }) => {
                assert!(location.file.ends_with("rows.parquet"));
                assert_eq!(location.row, Some(id.row));
                assert_eq!(location.column.as_deref(), Some("text"));
                errors.push((id.row, *kind));
            }
            Err(e) => panic!("unexpected {e}"),
            Ok(_) => {}
        }
    }
    errors.sort();
    assert_eq!(
        errors,
        vec![(1, BadInputKind::Empty), (2, BadInputKind::NotUtf8)]
    );
    // The loader stops at the first bad row with the default policy.
    let mut loader = Loader::new(
        ds.clone(),
        builder(BadInputPolicy::Error),
        LoaderConfig {
            global_batch: 5,
            ..LoaderConfig::default()
        },
    );
    let mut c = loader.cursor();
    let e = loader
        .next(&mut c, 0, 1)
        .await
        .expect_err("bad rows are errors by default");
    let s = e.to_string();
    assert!(s.contains("rows.parquet row"), "{s}");
    // The over-long document alone is an error naming it.
    let b = builder(BadInputPolicy::Error);
    let (_, rec) = rows.iter().find(|(id, _)| id.row == 4).expect("row 4");
    let e = b
        .build(
            rec.as_ref().expect("utf8"),
            4,
            0,
            &ds.location(&rows.iter().find(|(i, _)| i.row == 4).expect("r").0),
        )
        .expect_err("too long");
    assert!(
        matches!(
            e,
            DataError::BadRow {
                kind: BadInputKind::TooLong,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("rows.parquet row 4"), "{e}");
}

#[tokio::test]
async fn skip_policy_counts_every_skip() {
    let (ds, _m) = bad_rows_dataset().await;
    let b = builder(BadInputPolicy::Skip);
    let mut loader = Loader::new(
        ds,
        b.clone(),
        LoaderConfig {
            global_batch: 5,
            ..LoaderConfig::default()
        },
    );
    let mut c = loader.cursor();
    let out = loader.next(&mut c, 0, 1).await.expect("skips");
    let mut ids: Vec<u64> = out.examples.iter().map(|e| e.id).collect();
    ids.sort();
    assert_eq!(ids, vec![0, 3]);
    assert_eq!(out.skipped, 3);
    let counts = b.stats().counts();
    assert_eq!(counts.get(&BadInputKind::Empty), Some(&1));
    assert_eq!(counts.get(&BadInputKind::NotUtf8), Some(&1));
    assert_eq!(counts.get(&BadInputKind::TooLong), Some(&1));
    assert_eq!(
        b.stats().summary(),
        "skipped 3 rows (empty 1, not UTF-8 1, too long 1)"
    );
}

#[tokio::test]
async fn object_changed_or_missing_after_indexing() {
    let dir = tempfile::tempdir().expect("tmp");
    let url = dir.path().to_string_lossy().to_string();
    let src = Source::open(&url, &Default::default()).expect("src");
    common::write_qa_dataset(&src, &[10, 10], 4).await;
    Dataset::open(&url, DatasetOptions::default())
        .await
        .expect("opens when unchanged");
    // Rewrite one file with other content.
    let other = encode_parquet(
        &(0..12).map(|i| common::qa_row(i, 10)).collect::<Vec<_>>(),
        &WriterConfig::default(),
    )
    .expect("enc");
    std::fs::write(dir.path().join("part-001.parquet"), other).expect("rewrite");
    let e = Dataset::open(&url, DatasetOptions::default())
        .await
        .expect_err("changed");
    assert!(matches!(e, DataError::ObjectChanged { .. }), "{e}");
    assert!(e.to_string().contains("part-001.parquet"), "{e}");
    // Without the up-front check, the read itself detects it.
    let ds = Dataset::open(
        &url,
        DatasetOptions {
            verify: false,
            ..DatasetOptions::default()
        },
    )
    .await
    .expect("open");
    let e = ds.row_group(1, 0).await.expect_err("changed at read");
    assert!(e.to_string().contains("part-001.parquet"), "{e}");
    // Re-indexing accepts the new content; then a deleted file.
    let src = Source::open(&url, &Default::default()).expect("src");
    Manifest::build(&src, &SchemaSpec::qa())
        .await
        .expect("reindex")
        .save(&src)
        .await
        .expect("save");
    Dataset::open(&url, DatasetOptions::default())
        .await
        .expect("opens after re-indexing");
    std::fs::remove_file(dir.path().join("part-000.parquet")).expect("rm");
    let e = Dataset::open(&url, DatasetOptions::default())
        .await
        .expect_err("missing");
    assert!(matches!(e, DataError::MissingObject { .. }), "{e}");
    assert!(e.to_string().contains("part-000.parquet"), "{e}");
}
