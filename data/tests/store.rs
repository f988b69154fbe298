//! Object-store access against `file://` and a real S3-protocol server
//! (`moto_server` from the setup venv, authentication on): listing, reading,
//! ranged row-group reads, a missing object, wrong credentials.

mod common;

use std::path::Path;

use kvd_data::{Dataset, DatasetOptions, Manifest, Source, StoreError, StoreOptions};
use kvd_test_stores::moto::MotoServer;

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
}

/// The checks shared by both stores.
async fn exercise(url: &str, opts: StoreOptions) {
    let src = Source::open(url, &opts).expect("open source");
    let m = common::write_qa_dataset(&src, &[20, 30], 8).await;
    // Listing: both files, sorted, with sizes.
    let listed = src.list_parquet().await.expect("list");
    assert_eq!(
        listed.iter().map(|o| o.rel.as_str()).collect::<Vec<_>>(),
        vec!["part-000.parquet", "part-001.parquet"]
    );
    assert!(listed.iter().all(|o| o.size > 100));
    assert_eq!(m.files[0].row_groups, vec![8, 8, 4]);
    assert_eq!(m.files[1].row_groups, vec![8, 8, 8, 6]);
    // Whole and ranged reads agree.
    let whole = src.get("part-000.parquet").await.expect("get");
    assert_eq!(whole.len() as u64, listed[0].size);
    let tail = src
        .get_range(
            "part-000.parquet",
            whole.len() as u64 - 4..whole.len() as u64,
        )
        .await
        .expect("range");
    assert_eq!(&tail[..], b"PAR1");
    // Open from the stored manifest; row-group reads return the right rows.
    let ds = Dataset::open(
        url,
        DatasetOptions {
            store: opts.clone(),
            ..DatasetOptions::default()
        },
    )
    .await
    .expect("open dataset");
    assert_eq!(ds.manifest(), &m);
    let rows = ds.row_group(1, 2).await.expect("row group");
    let nums: Vec<usize> = rows
        .iter()
        .map(|r| common::row_number(r.as_ref().expect("row")))
        .collect();
    assert_eq!(
        nums,
        (36..44).collect::<Vec<_>>(),
        "file 1 starts at row 20; group 2 = rows 16..24 of it"
    );
    // A missing object.
    let e = src.get("nope.parquet").await.expect_err("missing");
    assert!(matches!(e, StoreError::MissingObject { .. }), "{e}");
    assert!(e.to_string().contains("nope.parquet"), "{e}");
}

#[tokio::test]
async fn file_store() {
    let dir = tempfile::tempdir().expect("tmp");
    let url = format!("file://{}", dir.path().join("ds").display());
    exercise(&url, StoreOptions::default()).await;
    // A plain path works too and sees the same manifest.
    let src = Source::open(
        &dir.path().join("ds").to_string_lossy(),
        &StoreOptions::default(),
    )
    .expect("path");
    assert_eq!(Manifest::load(&src).await.expect("load").num_rows(), 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_store_with_moto() {
    let moto = MotoServer::start(repo_root(), "kvd-test").expect("start moto_server (make setup)");
    exercise(&moto.url("ds"), moto.options()).await;

    // Wrong secret: the server rejects the signature.
    let bad = Source::open(
        &moto.url("ds"),
        &moto.options_with(&moto.access_key, "wrong-secret"),
    )
    .expect("open");
    let e = bad
        .list_parquet()
        .await
        .expect_err("wrong secret must fail");
    let s = e.to_string();
    assert!(matches!(e, StoreError::Store { .. }), "{s}");
    assert!(
        s.contains("SignatureDoesNotMatch") || s.contains("403"),
        "{s}"
    );
    // Unknown key id.
    let bad = Source::open(
        &moto.url("ds"),
        &moto.options_with("AKIANOTAKEY000000000", "x"),
    )
    .expect("open");
    let e = bad
        .get("manifest.json")
        .await
        .expect_err("unknown key must fail");
    assert!(
        e.to_string().contains("InvalidAccessKeyId") || e.to_string().contains("403"),
        "{e}"
    );
    // Opening a dataset with wrong credentials fails up front, naming the object.
    let e = Dataset::open(
        &moto.url("ds"),
        DatasetOptions {
            store: moto.options_with("AKIANOTAKEY000000000", "x"),
            ..DatasetOptions::default()
        },
    )
    .await
    .expect_err("open with wrong key");
    assert!(e.to_string().contains("manifest.json"), "{e}");
    // A bucket that does not exist: the error names the bucket and says so.
    let e = Dataset::open(
        "s3://no-such-bucket-kvd/ds",
        DatasetOptions {
            store: moto.options(),
            ..DatasetOptions::default()
        },
    )
    .await
    .expect_err("open in a missing bucket");
    let s = e.to_string();
    assert!(
        s.contains("no bucket (container) named `no-such-bucket-kvd`"),
        "{s}"
    );
    assert!(!s.contains("kvd-data index"), "not a missing manifest: {s}");
}
