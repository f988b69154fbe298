//! A local Azure Blob Storage server for tests: Azurite (Microsoft's storage
//! emulator), `azurite-blob` from the npm package `azurite`, pinned to
//! [`VERSION`] and installed by `scripts/setup.sh` into `$KVD_CACHE/azurite`.
//! Started on a free port with a fresh workspace directory, plain HTTP,
//! Shared Key authentication on (the well-known development account
//! [`ACCOUNT`] / [`ACCESS_KEY`]), killed on drop.
//!
//! `object_store`'s Azure client is pointed at it with the ordinary store keys
//! (see [`Azurite::options`]): `endpoint` = `http://127.0.0.1:PORT/devstoreaccount1`
//! (Azurite takes the account from the first path segment), `account_name`,
//! `access_key` and `allow_http`. Not `use_emulator`: with it `object_store`
//! ignores `endpoint` and reads the address from the process-wide variable
//! `AZURITE_BLOB_STORAGE_URL` (default port 10000), so servers on their own
//! ports could not run side by side in one test process. Both ways send the
//! same path-style requests and the same Shared Key signatures.
//!
//! Azurite serves everything `kvd_store::Source` does (list, `HEAD`, whole and
//! ranged `GET`, `PUT`, conditional `PUT`, `DELETE`), but a container must
//! exist first and `object_store` cannot create one, so [`Azurite::start`]
//! creates it with a Create Container request signed by `object_store`'s own
//! [`AzureAuthorizer`].

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use object_store::azure::{AzureAccessKey, AzureAuthorizer, AzureCredential};
use object_store::client::{HttpRequest, HttpRequestBody};

use crate::{Result, ServerError};
use kvd_store::StoreOptions;

/// The Azurite release `scripts/setup.sh` installs.
pub const VERSION: &str = "3.37.0";

/// The emulator's well-known development storage account.
pub const ACCOUNT: &str = "devstoreaccount1";

/// The well-known Shared Key of [`ACCOUNT`] (public, the same in every
/// Azurite and in the legacy Azure Storage Emulator).
pub const ACCESS_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// A running `azurite-blob`.
pub struct Azurite {
    child: Child,
    port: u16,
    /// Its workspace (`--location`), removed on drop.
    dir: PathBuf,
    /// `http://127.0.0.1:PORT/devstoreaccount1`: the store's `endpoint`.
    pub endpoint: String,
    /// The container created at start.
    pub container: String,
}

/// The server script: `$KVD_AZURITE_BLOB`, else
/// `$KVD_CACHE/azurite/node_modules/.bin/azurite-blob` (`KVD_CACHE` defaulting
/// to `~/.cache/kv-distill`). It runs with the `node` on `PATH`.
pub fn binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("KVD_AZURITE_BLOB") {
        return Ok(PathBuf::from(p));
    }
    let cache = crate::cache_dir();
    let p = cache.join("azurite/node_modules/.bin/azurite-blob");
    if p.exists() {
        Ok(p)
    } else {
        Err(ServerError::config(format!(
            "{} not found (npm package azurite@{VERSION}; run `make setup`)",
            p.display()
        )))
    }
}

impl Azurite {
    /// Starts the server in a fresh workspace and creates `container` (3 to
    /// 63 lowercase letters, digits and dashes, as Azure requires). A start
    /// whose first request is refused (two servers started at once can be
    /// handed the same free port; the second exits) is tried again on
    /// another port, three times in all.
    pub fn start(container: &str) -> Result<Self> {
        let mut started = Self::start_once(container);
        for _ in 1..3 {
            if started.is_ok() {
                break;
            }
            started = Self::start_once(container);
        }
        started
    }

    fn start_once(container: &str) -> Result<Self> {
        let port = crate::local_server::free_port()?;
        let bin = binary()?;
        let dir = std::env::temp_dir().join(format!("kvd-azurite-{}-{port}", std::process::id()));
        let io_err = |e| ServerError::Io {
            path: dir.display().to_string(),
            source: e,
        };
        // A leftover of an earlier process with the same id would hold its
        // containers: start empty.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(io_err)?;
        let log = std::fs::File::create(dir.join("stderr.log")).map_err(io_err)?;
        // `--skipApiVersionCheck`: accept the `x-ms-version` `object_store`
        // sends even where it is newer than this release knows; `--loose`:
        // ignore headers and parameters Azurite does not implement.
        let spawned = Command::new(&bin)
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
            .arg("--location")
            .arg(&dir)
            .args(["--silent", "--skipApiVersionCheck", "--loose"])
            .arg("--disableTelemetry")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn();
        let child = match spawned {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(ServerError::config(format!(
                    "cannot start {}: {e} (needs `node` on PATH; run `make setup`)",
                    bin.display()
                )));
            }
        };
        let mut server = Self {
            child,
            port,
            dir,
            endpoint: format!("http://127.0.0.1:{port}/{ACCOUNT}"),
            container: container.to_string(),
        };
        let log = server.dir.join("stderr.log");
        crate::local_server::wait_listening(
            "azurite-blob",
            &mut server.child,
            port,
            Duration::from_secs(30),
            || {
                std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .trim()
                    .to_string()
            },
        )?;
        server.create_container(container)?;
        Ok(server)
    }

    /// `az://container/prefix`.
    pub fn url(&self, prefix: &str) -> String {
        format!("az://{}/{}", self.container, prefix.trim_start_matches('/'))
    }

    /// Store options for this server with the given account and Shared Key:
    /// `endpoint` (the account's URL on this server), `account_name`,
    /// `access_key` and `allow_http`.
    pub fn options_with(&self, account: &str, access_key: &str) -> StoreOptions {
        StoreOptions::default()
            .with("endpoint", &self.endpoint)
            .with("account_name", account)
            .with("access_key", access_key)
            .with("allow_http", "true")
    }

    /// Store options with the development account and its key.
    pub fn options(&self) -> StoreOptions {
        self.options_with(ACCOUNT, ACCESS_KEY)
    }

    /// Creates container `name` (Create Container, signed with the
    /// development account's Shared Key).
    pub fn create_container(&self, name: &str) -> Result<()> {
        let (status, body) = self.signed("PUT", &format!("/{name}?restype=container"))?;
        if status == 201 {
            Ok(())
        } else {
            Err(ServerError::config(format!(
                "azurite: create container `{name}` -> {status}: {body}"
            )))
        }
    }

    /// One request without a body to `path_query` (relative to the account),
    /// signed by `object_store`'s [`AzureAuthorizer`] (it adds `x-ms-date`,
    /// `x-ms-version` and `Authorization`) and sent over HTTP/1.1 (connection
    /// closed after it): status and body.
    fn signed(&self, method: &str, path_query: &str) -> Result<(u16, String)> {
        let what = format!("azurite {method} {path_query}");
        let mut req = HttpRequest::new(HttpRequestBody::empty());
        *req.method_mut() = method
            .parse()
            .map_err(|e| ServerError::config(format!("{what}: {e}")))?;
        *req.uri_mut() = format!("{}{path_query}", self.endpoint)
            .parse()
            .map_err(|e| ServerError::config(format!("{what}: {e}")))?;
        let key = AzureAccessKey::try_new(ACCESS_KEY)
            .map_err(|e| ServerError::config(format!("{what}: access key: {e}")))?;
        let cred = AzureCredential::AccessKey(key);
        AzureAuthorizer::new(&cred, ACCOUNT)
            .try_authorize(&mut req)
            .map_err(|e| ServerError::config(format!("{what}: signing: {e}")))?;

        let err = |e: std::io::Error| ServerError::config(format!("{what}: {e}"));
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).map_err(err)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(err)?;
        let target = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let mut head = format!(
            "{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\n\
             Connection: close\r\n",
            self.port
        );
        for (k, v) in req.headers() {
            let v = v
                .to_str()
                .map_err(|e| ServerError::config(format!("{what}: header {k}: {e}")))?;
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes()).map_err(err)?;
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).map_err(err)?;
        let text = String::from_utf8_lossy(&resp).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| ServerError::config(format!("{what}: bad response")))?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, body))
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
