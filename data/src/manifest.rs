//! The dataset manifest: every Parquet file with its size, etag, row count and
//! row-group sizes, plus the schema. Built once (`kvd-data index`/`prepare`),
//! stored beside the data as `manifest.json`, and checked against the store
//! when a dataset is opened, so a changed or missing file is detected.

use futures::{StreamExt, TryStreamExt};
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions};
use sha2::{Digest, Sha256};

use crate::error::{DataError, Location, Result};
use crate::schema::SchemaSpec;
use kvd_store::Source;

/// One Parquet file of a dataset.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileEntry {
    /// Path relative to the dataset root.
    pub path: String,
    /// Size in bytes when indexed.
    pub size: u64,
    /// The store's etag when indexed (none on stores without etags).
    pub etag: Option<String>,
    /// Rows in the file.
    pub num_rows: u64,
    /// Rows of each row group, in file order.
    pub row_groups: Vec<u64>,
}

/// The manifest of a dataset.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    /// Format version (currently 1).
    pub version: u32,
    /// The record schema every file satisfies.
    pub schema: SchemaSpec,
    /// The files, sorted by path.
    pub files: Vec<FileEntry>,
}

/// Concurrent footer reads while indexing.
const INDEX_CONCURRENCY: usize = 8;

impl Manifest {
    /// The manifest's object name beside the data.
    pub const FILE_NAME: &'static str = "manifest.json";

    /// Lists every `*.parquet` under `source`, reads each footer, validates the
    /// schema, and records sizes, etags and row groups.
    pub async fn build(source: &Source, schema: &SchemaSpec) -> Result<Self> {
        let objects = source.list_parquet().await?;
        let files: Vec<FileEntry> = futures::stream::iter(objects)
            .map(|o| async move {
                let meta = load_metadata(source, &o.rel, o.size).await?;
                schema.validate(&source.display(&o.rel), meta.schema())?;
                let row_groups: Vec<u64> = meta
                    .metadata()
                    .row_groups()
                    .iter()
                    .map(|rg| rg.num_rows().max(0) as u64)
                    .collect();
                Ok::<_, DataError>(FileEntry {
                    path: o.rel,
                    size: o.size,
                    etag: o.etag,
                    num_rows: row_groups.iter().sum(),
                    row_groups,
                })
            })
            .buffered(INDEX_CONCURRENCY)
            .try_collect()
            .await?;
        Ok(Self {
            version: 1,
            schema: schema.clone(),
            files,
        })
    }

    /// Rows in the dataset.
    pub fn num_rows(&self) -> u64 {
        self.files.iter().map(|f| f.num_rows).sum()
    }

    /// A stable hash of the manifest (sha256 of its JSON, hex): a cursor is
    /// valid only for the manifest with this hash.
    pub fn hash(&self) -> String {
        // Serialising plain structs cannot fail.
        let json = serde_json::to_vec(self).unwrap_or_default();
        let d = Sha256::digest(&json);
        d.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Reads `manifest.json` from the dataset root.
    pub async fn load(source: &Source) -> Result<Self> {
        let path = source.display(Self::FILE_NAME);
        let bytes = source.get(Self::FILE_NAME).await.map_err(|e| match e {
            kvd_store::StoreError::MissingObject { .. } => DataError::Manifest {
                path: path.clone(),
                reason: "not found; build it with `kvd-data index`".into(),
            },
            e => e.into(),
        })?;
        let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| DataError::Manifest {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if m.version != 1 {
            return Err(DataError::Manifest {
                path,
                reason: format!("unsupported version {}", m.version),
            });
        }
        Ok(m)
    }

    /// Writes `manifest.json` to the dataset root.
    pub async fn save(&self, source: &Source) -> Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(|e| DataError::Manifest {
            path: source.display(Self::FILE_NAME),
            reason: e.to_string(),
        })?;
        Ok(source.put(Self::FILE_NAME, json.into()).await?)
    }

    /// Checks every file against the store (HEAD): a missing object or a
    /// different size or etag is an error. Files added since indexing are
    /// ignored with a warning.
    pub async fn verify(&self, source: &Source) -> Result<()> {
        futures::stream::iter(&self.files)
            .map(|f| async move {
                let o = source.head(&f.path).await?;
                if o.size != f.size {
                    return Err(DataError::ObjectChanged {
                        path: source.display(&f.path),
                        what: "size",
                        expected: f.size.to_string(),
                        found: o.size.to_string(),
                    });
                }
                if f.etag.is_some() && o.etag != f.etag {
                    return Err(DataError::ObjectChanged {
                        path: source.display(&f.path),
                        what: "etag",
                        expected: f.etag.clone().unwrap_or_default(),
                        found: o.etag.unwrap_or_default(),
                    });
                }
                Ok(())
            })
            .buffer_unordered(INDEX_CONCURRENCY * 2)
            .try_collect::<Vec<()>>()
            .await?;
        let listed = source.list_parquet().await?;
        let extra = listed
            .iter()
            .filter(|o| !self.files.iter().any(|f| f.path == o.rel))
            .count();
        if extra > 0 {
            tracing::warn!(
                dataset = source.url(),
                extra,
                "Parquet files not in the manifest are ignored; re-run `kvd-data index` to include them"
            );
        }
        Ok(())
    }
}

/// Reads a file's Parquet footer (and Arrow schema).
pub(crate) async fn load_metadata(
    source: &Source,
    rel: &str,
    size: u64,
) -> Result<ArrowReaderMetadata> {
    let mut reader = crate::reader::parquet_reader(source, rel, size);
    ArrowReaderMetadata::load_async(&mut reader, ArrowReaderOptions::new())
        .await
        .map_err(|e| parquet_err(source, rel, e))
}

/// A Parquet error naming the file; a store error inside it keeps its cause.
pub(crate) fn parquet_err(
    source: &Source,
    rel: &str,
    e: parquet::errors::ParquetError,
) -> DataError {
    DataError::Parquet {
        location: Location::file(source.display(rel)),
        source: e,
    }
}
