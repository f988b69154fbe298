//! `kv-distill worker`: one process of a distributed job (see
//! `kvd_trainer::dist::worker`), and the `--config job.toml` layering of its
//! flags.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use figment::providers::{Format, Toml};
use figment::Figment;
use kvd_trainer::dist::worker::{run_worker, WorkerConfig, WorkerOutcome};

use super::distill_cmds::{build_job, TrainArgs};
use super::load;

/// Arguments of `worker`: the training flags of `train` plus these.
#[derive(Args, Debug)]
pub struct WorkerArgs {
    #[command(flatten)]
    train: TrainArgs,
    /// Coordinator address, HOST:PORT.
    #[arg(long, env = "KVD_COORDINATOR")]
    coordinator: String,
    /// Rank to ask for (e.g. the pod's completion index); any free rank when unset.
    #[arg(long, env = "KVD_RANK")]
    rank: Option<u32>,
    /// File holding the job token (else the token itself in KVD_TOKEN).
    #[arg(long, env = "KVD_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Talk TLS to the coordinator, trusting this CA certificate (PEM; the
    /// coordinator's own certificate if self-signed).
    #[arg(long, env = "KVD_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Name the coordinator's certificate must carry [default: the address's host].
    #[arg(long, env = "KVD_TLS_DOMAIN", requires = "tls_ca")]
    tls_domain: Option<String>,
    /// Name in the coordinator's logs [default: HOST-PID].
    #[arg(long)]
    name: Option<String>,
    /// Checkpoint every N steps (0: only the final step); the coordinator's
    /// --checkpoint-url says where.
    #[arg(long, default_value_t = 0, env = "KVD_CHECKPOINT_EVERY")]
    checkpoint_every: usize,
    /// Give up a collective after this many seconds.
    #[arg(long, default_value_t = 600.0)]
    collective_timeout_s: f64,
    /// Give up when the coordinator is unreachable this long.
    #[arg(long, default_value_t = 120.0)]
    coordinator_timeout_s: f64,
    /// Append one JSON line per step (global batch ids, this rank's ids,
    /// loss); `{rank}` in the name becomes the rank.
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Benchmark instead of training: time the all-reduce on flat float32
    /// buffers of these sizes (elements) and on the adaptor's gradients;
    /// rank 0 writes JSON lines to --bench-out.
    #[arg(long, value_delimiter = ',', requires = "bench_out")]
    bench_allreduce: Vec<usize>,
    /// Where --bench-allreduce writes its results.
    #[arg(long)]
    bench_out: Option<PathBuf>,
}

fn token(a: &WorkerArgs) -> Result<String> {
    let (token, source) = match (&a.token_file, std::env::var("KVD_TOKEN")) {
        (Some(p), _) => (
            std::fs::read_to_string(p)
                .with_context(|| format!("cannot read the token file {}", p.display()))?,
            p.display().to_string(),
        ),
        (None, Ok(t)) => (t, "KVD_TOKEN".into()),
        (None, Err(_)) => bail!("no job token: pass --token-file FILE or set KVD_TOKEN"),
    };
    let token = token.trim().to_string();
    if token.is_empty() {
        bail!("the job token from {source} is empty");
    }
    Ok(token)
}

/// Runs `worker`.
pub fn run_worker_cmd(a: WorkerArgs) -> Result<()> {
    let token = token(&a)?;
    let (model, tok) = load(&a.train.model)?;
    let job = build_job(&a.train, &model)?;
    let name = a.name.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });
    let tls = match &a.tls_ca {
        Some(p) => Some(kvd_proto::client::ClientTls {
            ca_pem: std::fs::read(p)
                .with_context(|| format!("cannot read the TLS CA file {}", p.display()))?,
            domain: a.tls_domain.clone(),
        }),
        None => None,
    };
    let cfg = WorkerConfig {
        tls,
        coordinator: a.coordinator.clone(),
        token,
        requested_rank: a.rank,
        name,
        job,
        checkpoint_every: a.checkpoint_every,
        out: a.train.out.clone(),
        collective_timeout: Duration::from_secs_f64(a.collective_timeout_s.max(1.0)),
        coordinator_timeout: Duration::from_secs_f64(a.coordinator_timeout_s.max(1.0)),
        trace: a.trace.clone(),
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        bench_allreduce: a
            .bench_out
            .clone()
            .map(|out| (a.bench_allreduce.clone(), out)),
    };
    tracing::info!(job = %serde_json::to_string(&cfg.job)?, coordinator = %cfg.coordinator, "worker starting");
    match run_worker(&model, Arc::new(tok), &cfg)? {
        WorkerOutcome::Finished { steps } => tracing::info!(steps, "worker done"),
        WorkerOutcome::Stopped => tracing::info!("worker stopped by the coordinator"),
    }
    Ok(())
}

/// For `worker --config FILE`: the keys of FILE's `[worker]` table become
/// flags (`key_name = v` -> `--key-name v`; arrays repeat the flag, `true`
/// is a bare flag), placed before the given flags, and skipped when the flag
/// is given or its `KVD_*` variable is set: job.toml < environment < flags.
/// Other commands' arguments pass through unchanged.
pub fn expand_config(args: Vec<OsString>) -> Result<Vec<OsString>> {
    if args.get(1).is_none_or(|a| a != "worker") {
        return Ok(args);
    }
    let Some(pos) = args.iter().position(|a| a == "--config") else {
        return Ok(args);
    };
    let path = args.get(pos + 1).context("--config needs a file")?.clone();
    if !std::path::Path::new(&path).is_file() {
        bail!("config file {} does not exist", path.to_string_lossy());
    }
    let table: std::collections::BTreeMap<String, toml_value::Value> =
        Figment::from(Toml::file_exact(&path))
            .focus("worker")
            .extract()
            .with_context(|| format!("invalid [worker] table in {}", path.to_string_lossy()))?;
    let given: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let mut injected: Vec<OsString> = Vec::new();
    for (key, value) in table {
        let flag = format!("--{}", key.replace('_', "-"));
        let env = format!("KVD_{}", key.to_uppercase());
        if given
            .iter()
            .any(|g| g == &flag || g.starts_with(&format!("{flag}=")))
            || std::env::var_os(&env).is_some()
        {
            continue;
        }
        for v in value.flag_values(&key)? {
            match v {
                None => injected.push(flag.clone().into()),
                Some(v) => {
                    injected.push(flag.clone().into());
                    injected.push(v.into());
                }
            }
        }
    }
    let mut out: Vec<OsString> = args[..2].to_vec();
    out.extend(injected);
    out.extend(args[2..pos].iter().cloned());
    out.extend(args[pos + 2..].iter().cloned());
    Ok(out)
}

/// The TOML values a flag can take.
mod toml_value {
    use anyhow::{bail, Result};
    use serde::Deserialize;

    /// A scalar or a list of scalars.
    #[derive(Debug, Deserialize)]
    #[serde(untagged)]
    pub enum Value {
        Bool(bool),
        Int(i64),
        Float(f64),
        Str(String),
        List(Vec<Value>),
    }

    impl Value {
        /// Flag values: `None` for a bare flag; one entry per repetition.
        pub fn flag_values(&self, key: &str) -> Result<Vec<Option<String>>> {
            Ok(match self {
                Value::Bool(true) => vec![None],
                Value::Bool(false) => vec![],
                Value::Int(i) => vec![Some(i.to_string())],
                Value::Float(f) => vec![Some(f.to_string())],
                Value::Str(s) => vec![Some(s.clone())],
                Value::List(items) => {
                    let mut out = Vec::new();
                    for i in items {
                        match i {
                            Value::List(_) => bail!("[worker] {key}: nested lists are not flags"),
                            v => out.extend(v.flag_values(key)?),
                        }
                    }
                    out
                }
            })
        }
    }
}
