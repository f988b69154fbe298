//! Object-store access: a root given by URL (`file://`, a plain local path,
//! `s3://`, `gs://`, `az://`, `memory://`), listing, whole-object and ranged
//! reads, writes and conditional puts. Datasets (`kvd-data`), checkpoints
//! (the trainer, the coordinator) and adaptors all go through [`Source`];
//! this crate has no Parquet and no tokenizers, so the coordinator links it
//! alone.

mod error;

pub use error::{Result, StoreError};

use std::collections::BTreeMap;
use std::sync::{Arc, Once};
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{BackoffConfig, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};

/// Connection settings for a dataset's object store.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct StoreOptions {
    /// Store configuration keys, passed to the builder as they are: for S3
    /// e.g. `endpoint`, `region`, `access_key_id`, `secret_access_key`,
    /// `allow_http`; for GCS `service_account`, `google_base_url` (an
    /// emulator), `google_bearer_token`; for Azure `account_name`,
    /// `access_key`, `endpoint` (an emulator: the account's URL, e.g.
    /// `http://127.0.0.1:10000/devstoreaccount1`, with `allow_http`). Unset
    /// keys come from the standard environment
    /// (`AWS_*`, `GOOGLE_*`, `AZURE_*`).
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    /// Retries of a failed request (default 3; 0 disables).
    #[serde(default)]
    pub max_retries: Option<usize>,
    /// First wait before a retry, in milliseconds (default 100); each later
    /// wait is drawn between it and twice the previous one (at most 30 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_backoff_ms: Option<u64>,
}

impl StoreOptions {
    /// Sets one configuration key.
    pub fn with(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.insert(key.into(), value.into());
        self
    }

    /// These options with the values of credential keys (names holding
    /// `key`, `secret`, `token`, `password`, `sas`, `credential` or
    /// `service_account`) replaced by `<redacted>`: what may be logged.
    pub fn redacted(&self) -> StoreOptions {
        const SECRET: [&str; 7] = [
            "key",
            "secret",
            "token",
            "password",
            "sas",
            "credential",
            "service_account",
        ];
        let mut out = self.clone();
        for (k, v) in out.config.iter_mut() {
            let k = k.to_ascii_lowercase();
            if SECRET.iter().any(|s| k.contains(s)) {
                *v = "<redacted>".into();
            }
        }
        out
    }
}

/// Metadata of one object as the store reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Path relative to the dataset root.
    pub rel: String,
    /// Size in bytes.
    pub size: u64,
    /// The store's entity tag, if it has one.
    pub etag: Option<String>,
}

/// A dataset root on some object store.
#[derive(Debug, Clone)]
pub struct Source {
    store: Arc<dyn ObjectStore>,
    root: Path,
    url: String,
    /// The bucket or container (empty for files).
    bucket: String,
    /// GCS and Azure: etags in the quoted form of RFC 7232 (see [`quoted_etag`]).
    quote_etags: bool,
}

static CRYPTO: Once = Once::new();

/// Installs rustls' ring provider for the HTTP clients (once per process).
fn install_crypto() {
    CRYPTO.call_once(|| {
        // Err means another provider is installed already: that one is used.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

fn retry(opts: &StoreOptions) -> RetryConfig {
    let mut backoff = BackoffConfig::default();
    if let Some(ms) = opts.retry_backoff_ms {
        backoff.init_backoff = Duration::from_millis(ms);
        backoff.max_backoff = Duration::from_secs(30).max(backoff.init_backoff);
    }
    RetryConfig {
        backoff,
        max_retries: opts.max_retries.unwrap_or(3),
        retry_timeout: Duration::from_secs(120),
    }
}

/// `e` in the quoted form of RFC 7232 (`"..."`, or `W/"..."` for a weak tag).
/// GCS and Azure etags are normalised to it because those servers may send
/// them quoted in `ETag` headers but bare in XML listings (fake-gcs-server
/// does; Azure Blob Storage and Azurite always list `<Etag>0x8D...</Etag>`),
/// and a manifest built from a listing is verified with `HEAD`. An etag that
/// is quoted already is kept as it is, so manifests holding quoted etags stay
/// valid.
fn quoted_etag(e: String) -> String {
    let bare = e.strip_prefix("W/").unwrap_or(&e);
    if bare.len() >= 2 && bare.starts_with('"') && bare.ends_with('"') {
        e
    } else {
        format!("\"{e}\"")
    }
}

/// Whether a not-found error is about the bucket or container rather than an
/// object in it (the servers' error codes: S3 `NoSuchBucket`, Azure
/// `ContainerNotFound`, GCS "The specified bucket does not exist").
fn names_missing_bucket(e: &object_store::Error) -> bool {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(&s.to_string());
        source = s.source();
    }
    ["NoSuchBucket", "ContainerNotFound", "bucket does not exist"]
        .iter()
        .any(|code| text.contains(code))
}

fn url_err(url: &str, reason: impl Into<String>) -> StoreError {
    StoreError::Url {
        url: url.to_string(),
        reason: reason.into(),
    }
}

impl Source {
    /// Opens the dataset root at `url`.
    pub fn open(url: &str, opts: &StoreOptions) -> Result<Self> {
        let (scheme, rest) = match url.split_once("://") {
            Some((s, r)) => (s, r),
            None => ("file", url),
        };
        let (bucket, prefix) = match rest.split_once('/') {
            Some((b, p)) => (b, p.trim_end_matches('/')),
            None => (rest, ""),
        };
        let store: Arc<dyn ObjectStore> = match scheme {
            "file" => {
                let dir = if url.contains("://") { rest } else { url };
                if !dir.starts_with('/') {
                    let abs = std::env::current_dir()
                        .map_err(|e| url_err(url, e.to_string()))?
                        .join(dir);
                    return Self::open(&abs.to_string_lossy(), opts).map(|mut s| {
                        s.url = url.to_string();
                        s
                    });
                }
                std::fs::create_dir_all(dir).map_err(|e| StoreError::Io {
                    path: dir.to_string(),
                    source: e,
                })?;
                let fs = object_store::local::LocalFileSystem::new_with_prefix(dir)
                    .map_err(|e| url_err(url, e.to_string()))?;
                return Ok(Self {
                    store: Arc::new(fs),
                    root: Path::default(),
                    url: url.to_string(),
                    bucket: String::new(),
                    quote_etags: false,
                });
            }
            "memory" => Arc::new(object_store::memory::InMemory::new()),
            "s3" => {
                install_crypto();
                let mut b = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_retry(retry(opts));
                for (k, v) in &opts.config {
                    let key = k
                        .parse()
                        .map_err(|e| url_err(url, format!("option `{k}`: {e}")))?;
                    b = b.with_config(key, v);
                }
                Arc::new(b.build().map_err(|e| url_err(url, e.to_string()))?)
            }
            "gs" => {
                install_crypto();
                let mut b = object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_bucket_name(bucket)
                    .with_retry(retry(opts));
                for (k, v) in &opts.config {
                    let key = k
                        .parse()
                        .map_err(|e| url_err(url, format!("option `{k}`: {e}")))?;
                    b = b.with_config(key, v);
                }
                Arc::new(b.build().map_err(|e| url_err(url, e.to_string()))?)
            }
            "az" | "azure" | "abfs" => {
                install_crypto();
                let mut b = object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_container_name(bucket)
                    .with_retry(retry(opts));
                for (k, v) in &opts.config {
                    let key = k
                        .parse()
                        .map_err(|e| url_err(url, format!("option `{k}`: {e}")))?;
                    b = b.with_config(key, v);
                }
                Arc::new(b.build().map_err(|e| url_err(url, e.to_string()))?)
            }
            other => {
                return Err(url_err(
                    url,
                    format!("unsupported scheme `{other}` (file, s3, gs, az, memory)"),
                ))
            }
        };
        Ok(Self {
            store,
            root: Path::from(prefix),
            url: url.to_string(),
            bucket: bucket.to_string(),
            quote_etags: matches!(scheme, "gs" | "az" | "azure" | "abfs"),
        })
    }

    /// Wraps an existing store (e.g. a shared `InMemory` in tests).
    pub fn from_store(store: Arc<dyn ObjectStore>, root: &str, label: &str) -> Self {
        Self {
            store,
            root: Path::from(root),
            url: label.to_string(),
            bucket: String::new(),
            quote_etags: false,
        }
    }

    /// The URL this source was opened with.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The underlying store.
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The full store path of `rel` (relative to the dataset root).
    pub fn path(&self, rel: &str) -> Path {
        let mut p = self.root.clone();
        for part in rel.split('/').filter(|s| !s.is_empty()) {
            p = p.join(part);
        }
        p
    }

    fn rel_of(&self, p: &Path) -> String {
        match p.prefix_match(&self.root) {
            Some(parts) => parts
                .map(|x| x.as_ref().to_string())
                .collect::<Vec<_>>()
                .join("/"),
            None => p.to_string(),
        }
    }

    fn etag(&self, e: Option<String>) -> Option<String> {
        match e {
            Some(e) if self.quote_etags => Some(quoted_etag(e)),
            e => e,
        }
    }

    fn store_err(&self, op: &'static str, rel: &str, e: object_store::Error) -> StoreError {
        match e {
            object_store::Error::NotFound { .. } if names_missing_bucket(&e) => {
                StoreError::MissingBucket {
                    url: self.url.clone(),
                    bucket: self.bucket.clone(),
                }
            }
            object_store::Error::NotFound { .. } => StoreError::MissingObject {
                path: self.display(rel),
            },
            source => StoreError::Store {
                op,
                path: self.display(rel),
                source,
            },
        }
    }

    /// `rel` as shown in messages: the URL joined with the relative path.
    pub fn display(&self, rel: &str) -> String {
        format!("{}/{}", self.url.trim_end_matches('/'), rel)
    }

    /// Every `*.parquet` object under the root, sorted by path.
    pub async fn list_parquet(&self) -> Result<Vec<ObjectInfo>> {
        let mut all = self.list().await?;
        all.retain(|o| o.rel.ends_with(".parquet"));
        Ok(all)
    }

    /// Every object under the root, sorted by path.
    pub async fn list(&self) -> Result<Vec<ObjectInfo>> {
        let prefix = if self.root.as_ref().is_empty() {
            None
        } else {
            Some(&self.root)
        };
        let metas: Vec<_> = self
            .store
            .list(prefix)
            .try_collect()
            .await
            .map_err(|e| self.store_err("list", "", e))?;
        let mut out: Vec<ObjectInfo> = metas
            .into_iter()
            .map(|m| ObjectInfo {
                rel: self.rel_of(&m.location),
                size: m.size,
                etag: self.etag(m.e_tag),
            })
            .collect();
        out.sort_by(|a, b| a.rel.cmp(&b.rel));
        Ok(out)
    }

    /// The store's metadata for `rel`; a missing object is [`StoreError::MissingObject`].
    pub async fn head(&self, rel: &str) -> Result<ObjectInfo> {
        let m = self
            .store
            .head(&self.path(rel))
            .await
            .map_err(|e| self.store_err("head", rel, e))?;
        Ok(ObjectInfo {
            rel: rel.to_string(),
            size: m.size,
            etag: self.etag(m.e_tag),
        })
    }

    /// The whole object `rel`.
    pub async fn get(&self, rel: &str) -> Result<Bytes> {
        let r = self
            .store
            .get(&self.path(rel))
            .await
            .map_err(|e| self.store_err("get", rel, e))?;
        r.bytes().await.map_err(|e| self.store_err("get", rel, e))
    }

    /// The byte range `range` of `rel`.
    pub async fn get_range(&self, rel: &str, range: std::ops::Range<u64>) -> Result<Bytes> {
        self.store
            .get_range(&self.path(rel), range)
            .await
            .map_err(|e| self.store_err("get", rel, e))
    }

    /// Writes `data` to `rel` (whole object).
    pub async fn put(&self, rel: &str, data: Bytes) -> Result<()> {
        self.store
            .put(&self.path(rel), PutPayload::from(data))
            .await
            .map_err(|e| self.store_err("put", rel, e))?;
        Ok(())
    }

    /// Writes `data` to `rel` only if no object is there (a conditional put
    /// where the store supports one; otherwise a check then a put). Returns
    /// false, writing nothing, when the object exists.
    pub async fn put_new(&self, rel: &str, data: Bytes) -> Result<bool> {
        let opts = object_store::PutOptions {
            mode: object_store::PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&self.path(rel), PutPayload::from(data.clone()), opts)
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(object_store::Error::NotImplemented { .. })
            | Err(object_store::Error::NotSupported { .. }) => {
                if self.head(rel).await.is_ok() {
                    return Ok(false);
                }
                self.put(rel, data).await.map(|()| true)
            }
            Err(e) => Err(self.store_err("put", rel, e)),
        }
    }

    /// Deletes `rel` (a missing object is not an error).
    pub async fn delete(&self, rel: &str) -> Result<()> {
        match self.store.delete(&self.path(rel)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.store_err("delete", rel, e)),
        }
    }
}
