//! The coordinator's configuration: built-in defaults < `job.toml` (`--config`)
//! < `KVD_*` environment variables < command-line flags, resolved with figment.
//!
//! The job token is special: it comes from `--token-file`, else `KVD_TOKEN`,
//! else a `token_file` (from `KVD_TOKEN_FILE` or `job.toml`); it is never read
//! from `job.toml` itself and never printed.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

/// Command-line flags. Every flag is optional so that an unset flag does not
/// hide the value from `job.toml` or the environment.
#[derive(Parser, Debug, Default, Clone)]
#[command(
    version,
    about = "kv-distill job coordinator: worker membership, NCCL rendezvous, \
heartbeats, step and checkpoint control over gRPC (kvd.v1.Coordinator)"
)]
pub struct Cli {
    /// TOML job configuration (keys as the long flags with `_`: workers, listen, steps, ...).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Number of workers (world size) the job waits for [default: 1].
    #[arg(long)]
    pub workers: Option<u32>,
    /// Address to listen on; port 0 picks a free port (see --bind-port-file) [default: 127.0.0.1:50051].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Write the port actually listened on to this file once listening.
    #[arg(long, value_name = "FILE")]
    pub bind_port_file: Option<PathBuf>,
    /// File holding the job token (overrides KVD_TOKEN).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// A worker silent for this many seconds is declared dead [default: 10].
    #[arg(long, value_name = "SECONDS")]
    pub heartbeat_timeout_s: Option<f64>,
    /// The job's final step: once every worker reported it the coordinator exits 0.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Fail the job after this many membership rebuilds after worker deaths
    /// (workers leaving on SIGTERM do not count) [default: 10].
    #[arg(long)]
    pub max_rebuilds: Option<u32>,
    /// Base URL of the job's checkpoints (file://, s3://, gs://, az://).
    #[arg(long, value_name = "URL")]
    pub checkpoint_url: Option<String>,
    /// Serve over TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Pause the job once step N is checkpointed on every rank (exit 0);
    /// continue later with --resume.
    #[arg(long, value_name = "N")]
    pub stop_at: Option<u64>,
    /// Keep the newest N committed checkpoints, delete older ones [default: 3; 0 keeps all].
    #[arg(long, value_name = "N")]
    pub keep_last: Option<u32>,
    /// Fail the job (exit 1) once N checkpoints in a row could not be written
    /// [default: 3; 0 never fails the job for checkpoints].
    #[arg(long, value_name = "N")]
    pub max_checkpoint_failures: Option<u32>,
    /// Continue from the latest committed checkpoint under --checkpoint-url
    /// (a fresh start when there is none). Without it, a checkpoint URL that
    /// already holds checkpoints is refused.
    #[arg(long)]
    pub resume: bool,
    /// Continue from this checkpoint manifest (`.../step-NNNNNNNN/manifest.json`).
    #[arg(long, value_name = "URL", conflicts_with = "resume")]
    pub resume_from: Option<String>,
    /// Object-store option KEY=VALUE for the checkpoint store (as kv-distill's
    /// --store-opt); repeatable. Unset keys come from AWS_*/GOOGLE_*/AZURE_*.
    #[arg(long = "store-opt", value_name = "KEY=VALUE")]
    pub store_opt: Vec<String>,
    /// Launch the workers on this machine: the command after `--`, once per
    /// worker (rank in KVD_RANK, one GPU each when there are GPUs), restarted
    /// when one dies.
    #[arg(long)]
    pub spawn_local: bool,
    /// The worker command for --spawn-local, e.g. `-- kv-distill worker --model M --data D`.
    #[arg(last = true, value_name = "WORKER_COMMAND")]
    pub worker_command: Vec<String>,
    /// Log format [default: human].
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
}

/// How logs are written (to stderr).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Human,
    /// One JSON object per event.
    Json,
}

/// The layered settings as figment extracts them (before validation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// World size.
    pub workers: u32,
    /// Listen address.
    pub listen: String,
    /// Where to write the bound port.
    pub bind_port_file: Option<PathBuf>,
    /// Heartbeat timeout in seconds.
    pub heartbeat_timeout_s: f64,
    /// Final step.
    pub steps: Option<u64>,
    /// Most rebuilds after worker deaths before the job fails.
    pub max_rebuilds: u32,
    /// Checkpoint base URL.
    pub checkpoint_url: Option<String>,
    /// Committed checkpoints to keep (0: all).
    pub keep_last: u32,
    /// Failed checkpoints in a row that fail the job (0: never).
    pub max_checkpoint_failures: u32,
    /// Pause after this step's checkpoint.
    pub stop_at: Option<u64>,
    /// TLS certificate chain (PEM file).
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM file).
    pub tls_key: Option<PathBuf>,
    /// Resume from the latest committed checkpoint.
    pub resume: bool,
    /// Resume from this manifest.
    pub resume_from: Option<String>,
    /// Object-store options of the checkpoint store.
    pub store_options: std::collections::BTreeMap<String, String>,
    /// Launch the workers locally.
    pub spawn_local: bool,
    /// Log format.
    pub log_format: LogFormat,
    /// File holding the token.
    pub token_file: Option<PathBuf>,
    /// Only here to reject a token written into job.toml; never used.
    #[serde(skip_serializing)]
    pub token: Option<IgnoredSecret>,
}

/// Deserialises anything and keeps nothing (a token found where it must not be).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(from = "figment::value::Value")]
pub struct IgnoredSecret;

impl From<figment::value::Value> for IgnoredSecret {
    fn from(_: figment::value::Value) -> Self {
        IgnoredSecret
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            workers: 1,
            listen: format!("127.0.0.1:{}", kvd_proto::DEFAULT_PORT),
            bind_port_file: None,
            heartbeat_timeout_s: 10.0,
            steps: None,
            max_rebuilds: 10,
            checkpoint_url: None,
            keep_last: 3,
            max_checkpoint_failures: 3,
            stop_at: None,
            tls_cert: None,
            tls_key: None,
            resume: false,
            resume_from: None,
            store_options: std::collections::BTreeMap::new(),
            spawn_local: false,
            log_format: LogFormat::Human,
            token_file: None,
            token: None,
        }
    }
}

/// The flags that were given, as a figment layer (unset ones are left out).
#[derive(Serialize)]
struct FlagLayer<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    workers: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    listen: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bind_port_file: Option<&'a Path>,
    #[serde(skip_serializing_if = "Option::is_none")]
    token_file: Option<&'a Path>,
    #[serde(skip_serializing_if = "Option::is_none")]
    heartbeat_timeout_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    steps: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_rebuilds: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    checkpoint_url: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    keep_last: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_checkpoint_failures: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stop_at: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_cert: Option<&'a Path>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_key: Option<&'a Path>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    resume: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    resume_from: Option<&'a str>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    spawn_local: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    log_format: Option<LogFormat>,
}

impl<'a> From<&'a Cli> for FlagLayer<'a> {
    fn from(c: &'a Cli) -> Self {
        Self {
            workers: c.workers,
            listen: c.listen.as_deref(),
            bind_port_file: c.bind_port_file.as_deref(),
            token_file: c.token_file.as_deref(),
            heartbeat_timeout_s: c.heartbeat_timeout_s,
            steps: c.steps,
            max_rebuilds: c.max_rebuilds,
            checkpoint_url: c.checkpoint_url.as_deref(),
            keep_last: c.keep_last,
            max_checkpoint_failures: c.max_checkpoint_failures,
            stop_at: c.stop_at,
            tls_cert: c.tls_cert.as_deref(),
            tls_key: c.tls_key.as_deref(),
            resume: c.resume,
            resume_from: c.resume_from.as_deref(),
            spawn_local: c.spawn_local,
            log_format: c.log_format,
        }
    }
}

/// A secret string: shown as `<redacted>` by `Debug` and `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Where a job starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// From scratch; the checkpoint URL must hold no committed checkpoint.
    Fresh,
    /// From the latest committed checkpoint under the checkpoint URL, if any.
    Latest,
    /// From this manifest.
    From(String),
}

/// The validated configuration the coordinator runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// `--config` file, if any.
    pub config_file: Option<PathBuf>,
    /// World size (>= 1).
    pub workers: u32,
    /// Listen address.
    pub listen: SocketAddr,
    /// Where to write the bound port.
    pub bind_port_file: Option<PathBuf>,
    /// A worker silent this long is declared dead.
    pub heartbeat_timeout: Duration,
    /// Final step, if the job has one.
    pub steps: Option<u64>,
    /// Most rebuilds after worker deaths before the job fails.
    pub max_rebuilds: u32,
    /// Checkpoint base URL (no trailing `/`).
    pub checkpoint_url: Option<String>,
    /// Where the job starts.
    pub resume: Resume,
    /// Committed checkpoints to keep (0: all).
    pub keep_last: u32,
    /// Fail the job once this many checkpoints in a row could not be written (0: never).
    pub max_checkpoint_failures: u32,
    /// Pause once this step is checkpointed.
    pub stop_at: Option<u64>,
    /// TLS (certificate PEM, key PEM) files, if serving over TLS.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Object-store options of the checkpoint store.
    pub store_options: std::collections::BTreeMap<String, String>,
    /// The worker command to launch locally (`--spawn-local`), if any.
    pub spawn_local: Option<Vec<String>>,
    /// Log format.
    pub log_format: LogFormat,
    /// The job token.
    pub token: Secret,
    /// Where the token came from (for the printed configuration).
    pub token_source: String,
}

impl Config {
    /// Resolves the configuration from `cli`, its `--config` file and the
    /// process environment.
    pub fn load(cli: &Cli) -> anyhow::Result<Self> {
        let (settings, token_file_origin) = Self::layered(cli)?;
        Self::validate(cli, settings, &token_file_origin)
    }

    /// The figment layers: defaults < job.toml < `KVD_*` < flags. Also returns
    /// the name of the layer the resolved `token_file` came from.
    fn layered(cli: &Cli) -> anyhow::Result<(Settings, String)> {
        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        if let Some(path) = &cli.config {
            if !path.is_file() {
                bail!("config file {} does not exist", path.display());
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        // KVD_TOKEN is read raw in resolve_token (figment would parse "0123" as a number).
        figment = figment
            .merge(Env::prefixed("KVD_").ignore(&["token"]))
            .merge(Serialized::defaults(FlagLayer::from(cli)));
        let settings: Settings = figment
            .extract()
            .context("invalid coordinator configuration")?;
        if settings.token.is_some() {
            bail!(
                "the job token must not be in the configuration; put it in a file \
                 (--token-file / token_file) or in KVD_TOKEN"
            );
        }
        let origin = figment
            .find_metadata("token_file")
            .map_or_else(String::new, |m| m.name.to_string());
        Ok((settings, origin))
    }

    fn validate(cli: &Cli, s: Settings, token_file_origin: &str) -> anyhow::Result<Self> {
        if s.workers == 0 {
            bail!("workers must be at least 1");
        }
        let listen: SocketAddr = s
            .listen
            .parse()
            .with_context(|| format!("listen address {:?} is not HOST:PORT", s.listen))?;
        if !(s.heartbeat_timeout_s.is_finite() && s.heartbeat_timeout_s > 0.0) {
            bail!(
                "heartbeat_timeout_s must be positive, got {}",
                s.heartbeat_timeout_s
            );
        }
        if s.stop_at.is_some() && s.checkpoint_url.is_none() {
            bail!("stop_at needs checkpoint_url (the job pauses at a checkpoint)");
        }
        if s.steps == Some(0) {
            bail!("steps must be at least 1");
        }
        let resume = match (s.resume, s.resume_from) {
            (true, Some(_)) => bail!("resume and resume_from exclude each other"),
            (true, None) if s.checkpoint_url.is_none() => {
                bail!("resume needs checkpoint_url (where to look for checkpoints)")
            }
            (true, None) => Resume::Latest,
            (false, Some(url)) => Resume::From(url),
            (false, None) => Resume::Fresh,
        };
        let tls = match (s.tls_cert, s.tls_key) {
            (Some(c), Some(k)) => {
                for f in [&c, &k] {
                    if !f.is_file() {
                        bail!("TLS file {} does not exist", f.display());
                    }
                }
                Some((c, k))
            }
            (None, None) => None,
            _ => bail!("tls_cert and tls_key go together"),
        };
        let mut store_options = s.store_options;
        for kv in &cli.store_opt {
            let (k, v) = kv
                .split_once('=')
                .with_context(|| format!("--store-opt `{kv}` is not KEY=VALUE"))?;
            store_options.insert(k.to_string(), v.to_string());
        }
        let spawn_local = match (s.spawn_local, cli.worker_command.is_empty()) {
            (true, true) => bail!(
                "--spawn-local needs the worker command after `--`, e.g. \
                 `coordinator --workers 2 --spawn-local -- kv-distill worker --model M --data D`"
            ),
            (true, false) => Some(cli.worker_command.clone()),
            (false, false) => bail!("a worker command after `--` needs --spawn-local"),
            (false, true) => None,
        };
        let (token, token_source) = resolve_token(cli, s.token_file.as_deref(), token_file_origin)?;
        Ok(Self {
            config_file: cli.config.clone(),
            workers: s.workers,
            listen,
            bind_port_file: s.bind_port_file,
            heartbeat_timeout: Duration::from_secs_f64(s.heartbeat_timeout_s),
            steps: s.steps,
            max_rebuilds: s.max_rebuilds,
            checkpoint_url: s
                .checkpoint_url
                .map(|u| u.trim_end_matches('/').to_string()),
            resume,
            keep_last: s.keep_last,
            max_checkpoint_failures: s.max_checkpoint_failures,
            stop_at: s.stop_at,
            tls,
            store_options,
            spawn_local,
            log_format: s.log_format,
            token,
            token_source,
        })
    }
}

/// `--token-file` > `KVD_TOKEN` > `token_file` (KVD_TOKEN_FILE or job.toml).
fn resolve_token(
    cli: &Cli,
    token_file: Option<&Path>,
    token_file_origin: &str,
) -> anyhow::Result<(Secret, String)> {
    let (token, source) = if let Some(path) = &cli.token_file {
        (
            read_token_file(path)?,
            format!("--token-file {}", path.display()),
        )
    } else if let Ok(token) = std::env::var("KVD_TOKEN") {
        (token, "KVD_TOKEN".to_string())
    } else if let Some(path) = token_file {
        (
            read_token_file(path)?,
            format!("token_file {} ({token_file_origin})", path.display()),
        )
    } else {
        bail!("no job token: pass --token-file FILE or set KVD_TOKEN");
    };
    let token = token.trim().to_string();
    if token.is_empty() {
        bail!("the job token from {source} is empty");
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        bail!("the job token from {source} must be printable ASCII without spaces");
    }
    Ok((Secret(token), source))
}

fn read_token_file(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the token file {}", path.display()))
}

/// The configuration as printed at start: one `key = value` per line, TOML
/// style, the token redacted.
impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn opt<T: fmt::Debug>(v: &Option<T>) -> String {
            v.as_ref().map_or("(none)".into(), |v| format!("{v:?}"))
        }
        writeln!(f, "config_file = {}", opt(&self.config_file))?;
        writeln!(f, "workers = {}", self.workers)?;
        writeln!(f, "listen = \"{}\"", self.listen)?;
        writeln!(f, "bind_port_file = {}", opt(&self.bind_port_file))?;
        writeln!(
            f,
            "heartbeat_timeout_s = {}",
            self.heartbeat_timeout.as_secs_f64()
        )?;
        writeln!(f, "steps = {}", opt(&self.steps))?;
        writeln!(f, "max_rebuilds = {}", self.max_rebuilds)?;
        writeln!(f, "checkpoint_url = {}", opt(&self.checkpoint_url))?;
        writeln!(f, "resume = {:?}", self.resume)?;
        writeln!(f, "keep_last = {}", self.keep_last)?;
        writeln!(
            f,
            "max_checkpoint_failures = {}",
            self.max_checkpoint_failures
        )?;
        writeln!(f, "stop_at = {}", opt(&self.stop_at))?;
        writeln!(f, "tls = {}", opt(&self.tls))?;
        let keys: Vec<&String> = self.store_options.keys().collect();
        writeln!(f, "store_options = {keys:?} (values not shown)")?;
        writeln!(f, "spawn_local = {}", opt(&self.spawn_local))?;
        writeln!(f, "log_format = {:?}", self.log_format)?;
        write!(f, "token = \"{}\" (from {})", self.token, self.token_source)
    }
}

#[cfg(test)]
// figment's Jail closures return figment::Result, whose error is large.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    fn cli(args: &[&str]) -> Cli {
        Cli::parse_from(std::iter::once("coordinator").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_toml_env_flags_precedence() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.create_file(
                "job.toml",
                r#"
                workers = 4
                listen = "127.0.0.1:7000"
                heartbeat_timeout_s = 3.5
                steps = 100
                max_rebuilds = 2
                [trainer]
                lr = 1e-4
                "#,
            )?;
            jail.set_env("KVD_TOKEN", "0123");

            // defaults < toml
            let c = Config::load(&cli(&["--config", "job.toml"])).unwrap();
            assert_eq!(c.workers, 4);
            assert_eq!(c.listen, "127.0.0.1:7000".parse().unwrap());
            assert_eq!(c.heartbeat_timeout, Duration::from_millis(3500));
            assert_eq!(c.steps, Some(100));
            assert_eq!(c.max_rebuilds, 2);
            assert_eq!(c.log_format, LogFormat::Human); // default kept
            assert_eq!(c.token.expose(), "0123"); // raw, not parsed as a number

            // toml < env
            jail.set_env("KVD_WORKERS", "8");
            jail.set_env("KVD_STEPS", "50");
            jail.set_env("KVD_LOG_FORMAT", "json");
            let c = Config::load(&cli(&["--config", "job.toml"])).unwrap();
            assert_eq!(c.workers, 8);
            assert_eq!(c.steps, Some(50));
            assert_eq!(c.log_format, LogFormat::Json);
            assert_eq!(c.listen, "127.0.0.1:7000".parse().unwrap()); // toml kept

            // env < flags
            let c = Config::load(&cli(&[
                "--config",
                "job.toml",
                "--workers",
                "3",
                "--listen",
                "127.0.0.1:0",
                "--heartbeat-timeout-s",
                "1",
            ]))
            .unwrap();
            assert_eq!(c.workers, 3);
            assert_eq!(c.listen, "127.0.0.1:0".parse().unwrap());
            assert_eq!(c.heartbeat_timeout, Duration::from_secs(1));
            assert_eq!(c.steps, Some(50)); // env kept
            assert_eq!(c.max_rebuilds, 2); // toml kept

            // no toml: defaults, env on top
            let c = Config::load(&cli(&[])).unwrap();
            assert_eq!(c.workers, 8);
            assert_eq!(c.heartbeat_timeout, Duration::from_secs(10));
            assert_eq!(c.listen.port(), kvd_proto::DEFAULT_PORT);
            Ok(())
        });
    }

    #[test]
    fn token_precedence_and_redaction() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.create_file("flag.token", "from-flag-file\n")?;
            jail.create_file("toml.token", "from-toml-file")?;
            jail.create_file("job.toml", "token_file = \"toml.token\"")?;

            let c = Config::load(&cli(&["--config", "job.toml"])).unwrap();
            assert_eq!(c.token.expose(), "from-toml-file");
            assert!(c.token_source.contains("TOML"), "{}", c.token_source);

            jail.set_env("KVD_TOKEN", "from-env");
            let c = Config::load(&cli(&["--config", "job.toml"])).unwrap();
            assert_eq!(c.token.expose(), "from-env");

            let c = Config::load(&cli(&[
                "--config",
                "job.toml",
                "--token-file",
                "flag.token",
            ]))
            .unwrap();
            assert_eq!(c.token.expose(), "from-flag-file");

            let printed = c.to_string();
            let debugged = format!("{c:?}");
            for text in [&printed, &debugged] {
                assert!(!text.contains("from-flag-file"), "{text}");
                assert!(text.contains("<redacted>"), "{text}");
            }
            assert!(printed.contains("token = \"<redacted>\" (from --token-file flag.token)"));
            assert!(printed.contains("workers = 1"), "{printed}");
            Ok(())
        });
    }

    #[test]
    fn bad_configurations_are_errors() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            let err = Config::load(&cli(&[])).unwrap_err().to_string();
            assert!(err.contains("no job token"), "{err}");

            jail.set_env("KVD_TOKEN", "t");
            let err = format!("{:#}", Config::load(&cli(&["--workers", "0"])).unwrap_err());
            assert!(err.contains("workers must be at least 1"), "{err}");
            let err = format!(
                "{:#}",
                Config::load(&cli(&["--listen", "nowhere"])).unwrap_err()
            );
            assert!(err.contains("nowhere"), "{err}");
            let err = format!(
                "{:#}",
                Config::load(&cli(&["--heartbeat-timeout-s", "0"])).unwrap_err()
            );
            assert!(err.contains("heartbeat_timeout_s"), "{err}");
            let err = format!(
                "{:#}",
                Config::load(&cli(&["--config", "nope.toml"])).unwrap_err()
            );
            assert!(err.contains("nope.toml"), "{err}");

            jail.create_file("secret.toml", "token = \"hunter2\"")?;
            let err = format!(
                "{:#}",
                Config::load(&cli(&["--config", "secret.toml"])).unwrap_err()
            );
            assert!(err.contains("must not be in the configuration"), "{err}");
            assert!(!err.contains("hunter2"), "{err}");

            jail.create_file("typo.toml", "workers = \"many\"")?;
            let err = format!(
                "{:#}",
                Config::load(&cli(&["--config", "typo.toml"])).unwrap_err()
            );
            assert!(err.contains("workers"), "{err}");
            Ok(())
        });
    }
}
