//! A local S3-protocol server (`moto_server` from the setup venv) for tests
//! and the benchmark: started on a free port with authentication on, a
//! bucket and an access key created, killed on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{Result, ServerError};
use kvd_store::StoreOptions;

/// A running `moto_server`.
pub struct MotoServer {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// The bucket created at start.
    pub bucket: String,
    /// A valid access key id.
    pub access_key: String,
    /// Its secret.
    pub secret_key: String,
}

fn venv_bin(name: &str) -> PathBuf {
    let cache = crate::cache_dir();
    let p = cache.join("venv/bin").join(name);
    if p.exists() {
        p
    } else {
        PathBuf::from(name)
    }
}

impl MotoServer {
    /// Starts the server, creates `bucket` and an IAM user with full access
    /// (script `tests/oracle/data_moto_setup.py` under `repo_root`).
    pub fn start(repo_root: &std::path::Path, bucket: &str) -> Result<Self> {
        let port = crate::local_server::free_port()?;
        let bin = venv_bin("moto_server");
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .env("INITIAL_NO_AUTH_ACTION_COUNT", "4")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                ServerError::config(format!(
                    "cannot start {}: {e} (run `make setup`)",
                    bin.display()
                ))
            })?;
        let endpoint = format!("http://127.0.0.1:{port}");
        let mut server = Self {
            child,
            endpoint,
            bucket: bucket.to_string(),
            access_key: String::new(),
            secret_key: String::new(),
        };
        crate::local_server::wait_listening(
            "moto_server",
            &mut server.child,
            port,
            Duration::from_secs(60),
            String::new,
        )?;
        let script = repo_root.join("tests/oracle/data_moto_setup.py");
        let out = Command::new(venv_bin("python"))
            .arg(&script)
            .args([&server.endpoint, bucket])
            .output()
            .map_err(|e| ServerError::config(format!("{}: {e}", script.display())))?;
        if !out.status.success() {
            return Err(ServerError::config(format!(
                "moto setup failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let mut parts = text.split_whitespace();
        server.access_key = parts.next().unwrap_or_default().to_string();
        server.secret_key = parts.next().unwrap_or_default().to_string();
        if server.secret_key.is_empty() {
            return Err(ServerError::config(format!(
                "moto setup printed no key: {text}"
            )));
        }
        Ok(server)
    }

    /// `s3://bucket/prefix`.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{}", self.bucket, prefix.trim_start_matches('/'))
    }

    /// Store options with the given key pair for this server.
    pub fn options_with(&self, access_key: &str, secret_key: &str) -> StoreOptions {
        StoreOptions::default()
            .with("endpoint", &self.endpoint)
            .with("allow_http", "true")
            .with("region", "us-east-1")
            .with("access_key_id", access_key)
            .with("secret_access_key", secret_key)
    }

    /// Store options with the valid key.
    pub fn options(&self) -> StoreOptions {
        self.options_with(&self.access_key, &self.secret_key)
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
