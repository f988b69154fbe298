//! `az://` against a real Azure Blob Storage server: Azurite (npm `azurite`,
//! pinned and installed by `scripts/setup.sh`), started on a free local port
//! with Shared Key authentication on (see `kvd_test_stores::azurite`). The store is
//! reached only through `Source::open("az://...")` with the user-facing
//! config keys `endpoint`, `account_name`, `access_key` and `allow_http`.
//!
//! Azurite accepts `object_store`'s block-blob `PUT`, so the datasets are
//! written with `prepare::write_dataset` straight to `az://` (and the same
//! rows to `file://` for comparison); list, HEAD, whole and ranged GET,
//! manifest build and load, verification, row reads, conditional puts and
//! deletes all go through `Source`/`Dataset` on `az://`.

mod common;

use std::path::Path;

use bytes::Bytes;
use kvd_data::prepare::write_dataset;
use kvd_data::writer::WriterConfig;
use kvd_data::{
    DataError, Dataset, DatasetOptions, GlobalBatcher, Manifest, SchemaSpec, Source, StoreError,
    StoreOptions,
};
use kvd_test_stores::azurite::{self, Azurite};

const CONTAINER: &str = "kvd-test";

/// 50 QA rows, at most 20 per file and 8 per row group: files of 20, 20, 10
/// rows with row groups [8, 8, 4], [8, 8, 4], [8, 2].
fn writer_config() -> WriterConfig {
    WriterConfig {
        row_group_rows: 8,
        file_rows: 20,
        ..WriterConfig::default()
    }
}

fn start() -> Azurite {
    Azurite::start(CONTAINER).expect("start azurite-blob (make setup)")
}

fn opts(emu: &Azurite) -> DatasetOptions {
    DatasetOptions {
        store: emu.options(),
        ..DatasetOptions::default()
    }
}

/// Writes the same 50 rows with `prepare::write_dataset` to `file://dir/ds`
/// and to `az://CONTAINER/ds` (which indexes the dataset on `az://` with
/// `Manifest::build` and stores that manifest beside the data). Returns the
/// file:// manifest and the az:// one.
async fn dataset_on_azure(emu: &Azurite, dir: &Path) -> (Manifest, Manifest) {
    let local = format!("file://{}", dir.join("ds").display());
    let rows: Vec<_> = (0..50).map(|i| common::qa_row(i, 40)).collect();
    let m_file = write_dataset(
        &local,
        &StoreOptions::default(),
        &rows,
        &writer_config(),
        None,
    )
    .await
    .expect("write_dataset to file://");
    let m_az = write_dataset(
        &emu.url("ds"),
        &emu.options(),
        &rows,
        &writer_config(),
        None,
    )
    .await
    .expect("write_dataset to az://");
    (m_file, m_az)
}

/// The manifest without etags (they differ between stores by design).
fn shape(m: &Manifest) -> Manifest {
    let mut m = m.clone();
    for f in &mut m.files {
        f.etag = None;
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_listing_manifest_and_rows_match_file_store() {
    let emu = start();
    let dir = tempfile::tempdir().expect("tmp");
    let (m_file, m_az) = dataset_on_azure(&emu, dir.path()).await;
    let src = Source::open(&emu.url("ds"), &emu.options()).expect("open");

    // Listing: the three parts (not the manifest), sorted, sizes as written.
    let listed = src.list_parquet().await.expect("list");
    assert_eq!(
        listed.iter().map(|o| o.rel.as_str()).collect::<Vec<_>>(),
        vec![
            "part-00000.parquet",
            "part-00001.parquet",
            "part-00002.parquet"
        ]
    );
    for (o, f) in listed.iter().zip(&m_file.files) {
        assert_eq!(o.size, f.size, "{}", o.rel);
        // Azure lists etags bare (`0x8D...`) but sends them quoted in `ETag`
        // headers; `Source` quotes both, so a manifest built from a listing
        // verifies against `HEAD`.
        let etag = o.etag.clone().expect("Azure lists etags");
        assert!(etag.starts_with("\"0x") && etag.ends_with('"'), "{etag}");
        assert_eq!(src.head(&o.rel).await.expect("head").etag, Some(etag));
    }

    // The az:// index equals the file:// one but for etags, and every file has
    // one; indexing again gives the same manifest; the stored one loads.
    assert_eq!(shape(&m_az), shape(&m_file));
    assert_eq!(m_az.files[0].row_groups, vec![8, 8, 4]);
    assert_eq!(m_az.files[2].row_groups, vec![8, 2]);
    assert!(m_az.files.iter().all(|f| f.etag.is_some()));
    assert_eq!(
        Manifest::build(&src, &SchemaSpec::qa())
            .await
            .expect("Manifest::build on az://"),
        m_az
    );
    assert_eq!(Manifest::load(&src).await.expect("load"), m_az);

    // Whole and ranged reads return the bytes the writer wrote to file://.
    let local = std::fs::read(dir.path().join("ds/part-00001.parquet")).expect("local");
    let whole = src.get("part-00001.parquet").await.expect("get");
    assert_eq!(&whole[..], &local[..]);
    let mid = src
        .get_range("part-00001.parquet", 100..612)
        .await
        .expect("range");
    assert_eq!(&mid[..], &local[100..612]);
    let n = local.len() as u64;
    let tail = src
        .get_range("part-00001.parquet", n - 4..n)
        .await
        .expect("tail");
    assert_eq!(&tail[..], b"PAR1");

    // Open from the stored manifest (verified against the store with HEAD).
    let az = Dataset::open(&emu.url("ds"), opts(&emu))
        .await
        .expect("open az:// dataset");
    assert_eq!(az.manifest(), &m_az);
    let file = Dataset::open(
        &format!("file://{}", dir.path().join("ds").display()),
        DatasetOptions::default(),
    )
    .await
    .expect("open file:// dataset");

    // A ranged row-group read: file 1 starts at row 20; its group 1 is rows 8..16.
    let rows = az.row_group(1, 1).await.expect("row group");
    let nums: Vec<usize> = rows
        .iter()
        .map(|r| common::row_number(r.as_ref().expect("row")))
        .collect();
    assert_eq!(nums, (28..36).collect::<Vec<_>>());

    // One shuffled epoch: the same ids on both stores, and identical records.
    let mut b_az = GlobalBatcher::new(az.manifest(), 7, 2);
    let mut b_file = GlobalBatcher::new(file.manifest(), 7, 2);
    let (mut c_az, mut c_file) = (b_az.cursor(), b_file.cursor());
    let mut seen = Vec::new();
    while c_az.epoch == 0 && seen.len() < 50 {
        let ids = b_az.next_batch(&mut c_az, 16).expect("batch");
        let ids_file = b_file.next_batch(&mut c_file, 16).expect("batch");
        assert_eq!(ids, ids_file);
        let got = az.read(&ids).await.expect("read az://");
        let want = file.read(&ids).await.expect("read file://");
        assert_eq!(got.len(), ids.len());
        for ((id_a, r_a), (id_f, r_f)) in got.iter().zip(&want) {
            assert_eq!(id_a, id_f);
            let r_a = r_a.as_ref().expect("az:// row");
            assert_eq!(r_a, r_f.as_ref().expect("file:// row"));
            assert_eq!(common::row_number(r_a) as u64, id_a.row);
            seen.push(id_a.row);
        }
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..50).collect::<Vec<u64>>(), "every row once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_missing_object_is_named() {
    let emu = start();
    let dir = tempfile::tempdir().expect("tmp");
    dataset_on_azure(&emu, dir.path()).await;
    let src = Source::open(&emu.url("ds"), &emu.options()).expect("open");

    let e = src.get("nope.parquet").await.expect_err("missing");
    assert!(matches!(e, StoreError::MissingObject { .. }), "{e}");
    assert!(
        e.to_string().contains("az://kvd-test/ds/nope.parquet"),
        "{e}"
    );
    let e = src.head("nope.parquet").await.expect_err("missing");
    assert!(matches!(e, StoreError::MissingObject { .. }), "{e}");

    // A file of the manifest deleted after indexing: opening fails, naming it.
    src.delete("part-00001.parquet").await.expect("delete");
    let e = Dataset::open(&emu.url("ds"), opts(&emu))
        .await
        .expect_err("open with a missing file");
    assert!(matches!(e, DataError::MissingObject { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("az://kvd-test/ds/part-00001.parquet"),
        "{e}"
    );
    // Unverified, the other files still read; the missing one fails by name.
    let ds = Dataset::open(
        &emu.url("ds"),
        DatasetOptions {
            verify: false,
            ..opts(&emu)
        },
    )
    .await
    .expect("open unverified");
    assert_eq!(ds.row_group(0, 0).await.expect("file 0").len(), 8);
    let e = ds.row_group(1, 0).await.expect_err("deleted file");
    assert!(e.to_string().contains("part-00001.parquet"), "{e}");

    // No manifest at all.
    src.delete("manifest.json").await.expect("delete manifest");
    let e = Dataset::open(&emu.url("ds"), opts(&emu))
        .await
        .expect_err("no manifest");
    assert!(matches!(e, DataError::Manifest { .. }), "{e}");
    assert!(
        e.to_string().contains("az://kvd-test/ds/manifest.json"),
        "{e}"
    );

    // A container that does not exist: the error names it and says so.
    let other = Source::open("az://no-such-container/ds", &emu.options()).expect("open");
    let e = other.get("manifest.json").await.expect_err("no container");
    assert!(
        e.to_string().contains(
            "`az://no-such-container/ds`: no bucket (container) named `no-such-container`"
        ),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_object_changed_since_indexing_is_detected() {
    let emu = start();
    let dir = tempfile::tempdir().expect("tmp");
    let (_, m) = dataset_on_azure(&emu, dir.path()).await;
    let src = Source::open(&emu.url("ds"), &emu.options()).expect("open");
    Dataset::open(&emu.url("ds"), opts(&emu))
        .await
        .expect("unchanged dataset opens");

    // Same size, different bytes: only the etag tells.
    let mut bytes = std::fs::read(dir.path().join("ds/part-00000.parquet")).expect("local");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    src.put("part-00000.parquet", Bytes::from(bytes))
        .await
        .expect("rewrite");
    let e = Dataset::open(&emu.url("ds"), opts(&emu))
        .await
        .expect_err("changed bytes");
    match &e {
        DataError::ObjectChanged {
            path,
            what,
            expected,
            found,
        } => {
            assert_eq!(path, "az://kvd-test/ds/part-00000.parquet");
            assert_eq!(*what, "etag");
            assert_eq!(Some(expected), m.files[0].etag.as_ref());
            assert_ne!(expected, found);
        }
        other => panic!("expected ObjectChanged, got {other}"),
    }

    // Another size: reported as such.
    let other = std::fs::read(dir.path().join("ds/part-00002.parquet")).expect("local");
    src.put("part-00000.parquet", Bytes::from(other))
        .await
        .expect("replace");
    let e = Dataset::open(&emu.url("ds"), opts(&emu))
        .await
        .expect_err("changed size");
    assert!(
        matches!(&e, DataError::ObjectChanged { what: "size", .. }),
        "{e}"
    );
    assert!(e.to_string().contains("part-00000.parquet"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_wrong_credentials_are_rejected() {
    let emu = start();
    let dir = tempfile::tempdir().expect("tmp");
    dataset_on_azure(&emu, dir.path()).await;

    // A well-formed key that is not the account's: the signature is refused.
    let wrong_key =
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA==";
    let bad = Source::open(
        &emu.url("ds"),
        &emu.options_with(azurite::ACCOUNT, wrong_key),
    )
    .expect("open");
    let e = bad.list_parquet().await.expect_err("wrong key must fail");
    let s = e.to_string();
    assert!(matches!(e, StoreError::Store { op: "list", .. }), "{s}");
    assert!(s.contains("az://kvd-test/ds"), "{s}");
    assert!(
        s.contains("403") || s.contains("AuthorizationFailure"),
        "{s}"
    );
    let e = bad
        .get("part-00000.parquet")
        .await
        .expect_err("wrong key must fail");
    let s = e.to_string();
    assert!(matches!(e, StoreError::Store { op: "get", .. }), "{s}");
    assert!(s.contains("az://kvd-test/ds/part-00000.parquet"), "{s}");
    assert!(s.contains("403"), "{s}");
    // Writes are refused too, and nothing is written.
    let e = bad
        .put("intruder.parquet", Bytes::from_static(b"x"))
        .await
        .expect_err("wrong key must not write");
    assert!(e.to_string().contains("403"), "{e}");
    let good = Source::open(&emu.url("ds"), &emu.options()).expect("open");
    assert!(matches!(
        good.head("intruder.parquet").await,
        Err(StoreError::MissingObject { .. })
    ));

    // Opening a dataset with the wrong key fails up front, naming the object.
    let e = Dataset::open(
        &emu.url("ds"),
        DatasetOptions {
            store: emu.options_with(azurite::ACCOUNT, wrong_key),
            ..DatasetOptions::default()
        },
    )
    .await
    .expect_err("open with wrong key");
    assert!(e.to_string().contains("manifest.json"), "{e}");
    assert!(e.to_string().contains("403"), "{e}");

    // A key that is not base64 is refused when the store is opened.
    let e = Source::open(
        &emu.url("ds"),
        &emu.options_with(azurite::ACCOUNT, "not base64!"),
    )
    .expect_err("malformed key");
    assert!(matches!(e, StoreError::Url { .. }), "{e}");
    assert!(e.to_string().contains("az://kvd-test/ds"), "{e}");
}

/// `put_new` (used for manifests and checkpoints written once) is a real
/// conditional write on Azure (`If-None-Match: *`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_put_new_does_not_overwrite() {
    let emu = start();
    let src = Source::open(&emu.url("once"), &emu.options()).expect("open");
    assert!(src
        .put_new("a.json", Bytes::from_static(b"first"))
        .await
        .expect("first put_new"));
    assert!(!src
        .put_new("a.json", Bytes::from_static(b"second"))
        .await
        .expect("second put_new"));
    assert_eq!(&src.get("a.json").await.expect("get")[..], b"first");
    assert_eq!(
        src.list().await.expect("list")[0].rel,
        "a.json",
        "the object is listed under the prefix"
    );
}

#[test]
fn azure_unknown_option_is_refused() {
    let e = Source::open(
        "az://c/p",
        &StoreOptions::default().with("azure_no_such_key", "1"),
    )
    .expect_err("unknown key");
    assert!(e.to_string().contains("azure_no_such_key"), "{e}");
}
