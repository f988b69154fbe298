//! An opened dataset: source + manifest, with row-group reads through the
//! async Parquet reader (footers cached per file, decoded row groups in a
//! small LRU cache, bounded concurrent fetches).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use futures::{StreamExt, TryStreamExt};
use parquet::arrow::arrow_reader::ArrowReaderMetadata;
use parquet::arrow::{ParquetRecordBatchStreamBuilder, ProjectionMask};
use tokio::sync::OnceCell;

use crate::error::{DataError, Location, Result};
use crate::manifest::{load_metadata, parquet_err, Manifest};
use crate::schema::{batch_records, Record};
use crate::shard::ExampleId;
use kvd_store::{Source, StoreOptions};

/// How a dataset is opened and read.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DatasetOptions {
    /// Object-store settings (endpoint, credentials, ...).
    #[serde(default)]
    pub store: StoreOptions,
    /// Check every file against the manifest (HEAD) when opening (default true).
    #[serde(default = "yes")]
    pub verify: bool,
    /// Decoded row groups kept in memory (default 64).
    #[serde(default = "default_cache")]
    pub cache_row_groups: usize,
    /// Row groups fetched concurrently (default 4).
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
}

fn yes() -> bool {
    true
}
fn default_cache() -> usize {
    64
}
fn default_concurrency() -> usize {
    4
}

impl Default for DatasetOptions {
    fn default() -> Self {
        Self {
            store: StoreOptions::default(),
            verify: true,
            cache_row_groups: default_cache(),
            concurrency: default_concurrency(),
        }
    }
}

/// The decoded rows of one row group; each row is a record or its error.
pub type RowGroupRows = Vec<Result<Record>>;

type Key = (u32, u32);

struct Cache {
    map: HashMap<Key, Arc<OnceCell<Arc<RowGroupRows>>>>,
    order: VecDeque<Key>,
}

/// An opened dataset.
pub struct Dataset {
    source: Source,
    manifest: Manifest,
    options: DatasetOptions,
    footers: Mutex<HashMap<u32, Arc<OnceCell<ArrowReaderMetadata>>>>,
    cache: Mutex<Cache>,
}

impl std::fmt::Debug for Dataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataset")
            .field("url", &self.source.url())
            .field("files", &self.manifest.files.len())
            .field("rows", &self.manifest.num_rows())
            .finish()
    }
}

impl Dataset {
    /// Opens the dataset at `url`: reads its `manifest.json` and, unless
    /// `options.verify` is off, checks every file against the store.
    pub async fn open(url: &str, options: DatasetOptions) -> Result<Self> {
        let source = Source::open(url, &options.store)?;
        let manifest = Manifest::load(&source).await?;
        Self::from_parts(source, manifest, options).await
    }

    /// A dataset from an opened source and a manifest (verified if configured).
    pub async fn from_parts(
        source: Source,
        manifest: Manifest,
        options: DatasetOptions,
    ) -> Result<Self> {
        if options.verify {
            manifest.verify(&source).await?;
        }
        Ok(Self {
            source,
            manifest,
            options,
            footers: Mutex::new(HashMap::new()),
            cache: Mutex::new(Cache {
                map: HashMap::new(),
                order: VecDeque::new(),
            }),
        })
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The source.
    pub fn source(&self) -> &Source {
        &self.source
    }

    fn entry(&self, file: u32) -> Result<&crate::manifest::FileEntry> {
        self.manifest
            .files
            .get(file as usize)
            .ok_or_else(|| DataError::Config(format!("file index {file} outside the manifest")))
    }

    async fn footer(&self, file: u32) -> Result<ArrowReaderMetadata> {
        let cell = {
            let mut m = self.footers.lock().unwrap_or_else(|p| p.into_inner());
            m.entry(file).or_default().clone()
        };
        let e = self.entry(file)?;
        let meta = cell
            .get_or_try_init(|| async {
                let meta = load_metadata(&self.source, &e.path, e.size).await?;
                let groups: Vec<u64> = meta
                    .metadata()
                    .row_groups()
                    .iter()
                    .map(|g| g.num_rows().max(0) as u64)
                    .collect();
                if groups != e.row_groups {
                    return Err(DataError::ObjectChanged {
                        path: self.source.display(&e.path),
                        what: "row groups",
                        expected: format!("{:?}", e.row_groups),
                        found: format!("{groups:?}"),
                    });
                }
                self.manifest
                    .schema
                    .validate(&self.source.display(&e.path), meta.schema())?;
                Ok::<_, DataError>(meta)
            })
            .await?;
        Ok(meta.clone())
    }

    async fn decode_row_group(&self, file: u32, group: u32) -> Result<RowGroupRows> {
        let e = self.entry(file)?;
        let display = self.source.display(&e.path);
        let meta = self.footer(file).await?;
        let names = self.manifest.schema.columns();
        let schema = meta.schema().clone();
        let indices: Vec<usize> = names
            .iter()
            .filter_map(|n| schema.index_of(n).ok())
            .collect();
        let mask = ProjectionMask::roots(meta.parquet_schema(), indices);
        let reader = crate::reader::parquet_reader(&self.source, &e.path, e.size);
        let stream = ParquetRecordBatchStreamBuilder::new_with_metadata(reader, meta)
            .with_row_groups(vec![group as usize])
            .with_projection(mask)
            .build()
            .map_err(|err| parquet_err(&self.source, &e.path, err))?;
        let batches: Vec<_> = stream
            .try_collect()
            .await
            .map_err(|err| parquet_err(&self.source, &e.path, err))?;
        let mut first_row: u64 = e.row_groups[..group as usize].iter().sum();
        let mut rows = Vec::new();
        for b in &batches {
            rows.extend(batch_records(
                &self.manifest.schema,
                &display,
                first_row,
                b,
            )?);
            first_row += b.num_rows() as u64;
        }
        let expected = e.row_groups.get(group as usize).copied().unwrap_or(0);
        if rows.len() as u64 != expected {
            return Err(DataError::ObjectChanged {
                path: display,
                what: "rows in row group",
                expected: expected.to_string(),
                found: rows.len().to_string(),
            });
        }
        Ok(rows)
    }

    /// The decoded rows of one row group (cached).
    pub async fn row_group(&self, file: u32, group: u32) -> Result<Arc<RowGroupRows>> {
        let cell = {
            let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            let key = (file, group);
            if let Some(cell) = c.map.get(&key) {
                let cell = cell.clone();
                // Move to the back (most recently used).
                if let Some(pos) = c.order.iter().position(|k| *k == key) {
                    c.order.remove(pos);
                }
                c.order.push_back(key);
                cell
            } else {
                let cell: Arc<OnceCell<Arc<RowGroupRows>>> = Arc::default();
                c.map.insert(key, cell.clone());
                c.order.push_back(key);
                while c.order.len() > self.options.cache_row_groups.max(1) {
                    if let Some(old) = c.order.pop_front() {
                        c.map.remove(&old);
                    }
                }
                cell
            }
        };
        let rows = cell
            .get_or_try_init(|| async { self.decode_row_group(file, group).await.map(Arc::new) })
            .await?;
        Ok(rows.clone())
    }

    /// The records of `ids`, in order; each a record or that row's error.
    /// The distinct row groups are fetched concurrently (bounded).
    pub async fn read(&self, ids: &[ExampleId]) -> Result<Vec<(ExampleId, Result<Record>)>> {
        let mut groups: Vec<Key> = ids.iter().map(|i| (i.file, i.row_group)).collect();
        groups.sort_unstable();
        groups.dedup();
        let loaded: HashMap<Key, Arc<RowGroupRows>> = futures::stream::iter(groups)
            .map(|k| async move { self.row_group(k.0, k.1).await.map(|r| (k, r)) })
            .buffer_unordered(self.options.concurrency.max(1))
            .try_collect()
            .await?;
        ids.iter()
            .map(|id| {
                let rows = loaded
                    .get(&(id.file, id.row_group))
                    .ok_or_else(|| DataError::Config("row group not loaded".into()))?;
                let r = rows.get(id.row_in_group as usize).ok_or_else(|| {
                    DataError::Config(format!(
                        "row {} outside row group {} of file {}",
                        id.row_in_group, id.row_group, id.file
                    ))
                })?;
                Ok((*id, clone_row(r)))
            })
            .collect()
    }

    /// Where a sample lives, for messages.
    pub fn location(&self, id: &ExampleId) -> Location {
        let file = self
            .manifest
            .files
            .get(id.file as usize)
            .map(|f| self.source.display(&f.path))
            .unwrap_or_default();
        let first: u64 = self
            .manifest
            .files
            .get(id.file as usize)
            .map(|f| f.row_groups.iter().take(id.row_group as usize).sum())
            .unwrap_or(0);
        Location {
            file,
            row: Some(first + id.row_in_group as u64),
            column: None,
        }
    }
}

/// Row results are shared through the cache; errors are rebuilt as values.
fn clone_row(r: &Result<Record>) -> Result<Record> {
    match r {
        Ok(rec) => Ok(rec.clone()),
        Err(DataError::BadRow {
            location,
            kind,
            detail,
        }) => Err(DataError::BadRow {
            location: location.clone(),
            kind: *kind,
            detail: detail.clone(),
        }),
        Err(e) => Err(DataError::Config(e.to_string())),
    }
}
