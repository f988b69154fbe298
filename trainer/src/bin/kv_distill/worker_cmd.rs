//! `kv-distill worker`: one process of a distributed job (see
//! `kvd_trainer::worker`), and the `--config job.toml` layering of its
//! flags.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use figment::providers::{Format, Toml};
use figment::Figment;
use kvd_trainer::worker::{run_worker, WorkerConfig, WorkerOutcome};

use super::distill_cmds::{build_job, TrainArgs};
use super::load;

/// Arguments of `worker`: the training flags of `train` plus these.
#[derive(Args, Debug)]
pub(crate) struct WorkerArgs {
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
    /// A job file whose `[worker]` table sets any of these flags (keys are the
    /// long flags with `_`): defaults < file < KVD_<KEY> < flags.
    #[arg(long, env = "KVD_CONFIG")]
    config: Option<PathBuf>,
    /// Print every setting with where it came from, and exit.
    #[arg(long)]
    print_config: bool,
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

/// Runs `worker` with its resolved `settings` (see [`resolve_config`]).
pub(crate) fn run_worker_cmd(a: WorkerArgs, settings: &Settings) -> Result<()> {
    if a.print_config {
        println!("{}", render(settings));
        return Ok(());
    }
    tracing::info!(settings = %render(settings).replace('\n', "; "), "worker configuration");
    let token = token(&a)?;
    let (model, tok) = load(&a.train.model)?;
    let job = build_job(&a.train, &model)?;
    a.train.set_process_options();
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
        chaos: a.train.chaos()?,
    };
    tracing::info!(job = %cfg.job.log_json(), coordinator = %cfg.coordinator, "worker starting");
    match run_worker(&model, Arc::new(tok), &cfg).map_err(super::distill_cmds::with_bad_row_hint)? {
        WorkerOutcome::Finished { steps } => tracing::info!(steps, "worker done"),
        WorkerOutcome::Stopped => tracing::info!("worker stopped by the coordinator"),
    }
    Ok(())
}

/// Where a worker setting came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// The built-in default.
    Default,
    /// The `[worker]` table of `--config FILE`.
    File,
    /// The `KVD_<KEY>` environment variable.
    Env,
    /// The command line.
    Flag,
}

/// One worker setting as resolved: its key (the long flag with `_`), its
/// values as the flag takes them (empty: unset, or a bare flag's `false`)
/// and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Setting {
    /// `max_len` for `--max-len`.
    pub key: String,
    /// The flag's values (a list flag has several; a bare flag that is on has `true`).
    pub values: Vec<String>,
    /// The layer that set it.
    pub origin: Origin,
}

/// The resolved settings of a `worker`, in flag order.
pub(crate) type Settings = Vec<Setting>;

/// Keys that configure the resolution itself or the help output.
const NOT_SETTINGS: [&str; 4] = ["help", "version", "config", "print-config"];

/// Resolves every `worker` setting through its layers, lowest first:
/// built-in defaults < the `[worker]` table of `--config FILE` (keys are the
/// long flags with `_`) < `KVD_<KEY>` environment variables < flags, and
/// returns the command line that carries the result (the file's and the
/// environment's values as flags, so clap types and checks every value the
/// same way whatever its layer) with each setting's origin. Other commands'
/// arguments pass through unchanged.
pub(crate) fn resolve_config(args: Vec<OsString>) -> Result<(Vec<OsString>, Settings)> {
    resolve_with(args, |k| std::env::var(k).ok())
}

/// [`resolve_config`] with the environment read through `env`.
fn resolve_with(
    args: Vec<OsString>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<(Vec<OsString>, Settings)> {
    let Some(at) = worker_position(&args) else {
        return Ok((args, Vec::new()));
    };
    let cmd = WorkerArgs::augment_args(clap::Command::new("worker"))
        .arg(clap::Arg::new("log_format").long("log-format"))
        .arg(clap::Arg::new("threads").long("threads"))
        .mut_args(|a| a.required(false))
        .ignore_errors(true);
    // `--help`, `--version` or a malformed line: nothing to layer; the real
    // parse prints the help or names the error.
    let Ok(given) = cmd.clone().try_get_matches_from(&args[at..]) else {
        return Ok((args, Vec::new()));
    };
    let file = match given.get_one::<PathBuf>("config") {
        Some(path) => read_table(path)?,
        None => std::collections::BTreeMap::new(),
    };
    let mut settings = Vec::new();
    let mut injected: Vec<OsString> = Vec::new();
    let mut known = std::collections::BTreeSet::new();
    for arg in cmd.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if NOT_SETTINGS.contains(&long) || matches!(long, "log-format" | "threads") {
            continue;
        }
        let key = long.replace('-', "_");
        known.insert(key.clone());
        let bare = !arg.get_action().takes_values();
        let list = matches!(arg.get_action(), clap::ArgAction::Append);
        let id = arg.get_id().as_str();
        let on_command_line =
            given.value_source(id) == Some(clap::parser::ValueSource::CommandLine);
        let (values, origin) = if on_command_line {
            let values = if bare {
                vec!["true".to_string()]
            } else {
                given
                    .get_raw(id)
                    .map(|v| v.map(|x| x.to_string_lossy().into_owned()).collect())
                    .unwrap_or_default()
            };
            (values, Origin::Flag)
        } else if let Some(v) = env(&format!("KVD_{}", key.to_uppercase())) {
            let values = if bare {
                match v.trim().to_ascii_lowercase().as_str() {
                    "" | "0" | "false" | "no" | "off" => vec![],
                    "1" | "true" | "yes" | "on" => vec!["true".to_string()],
                    other => bail!("KVD_{}: `{other}` is not true or false", key.to_uppercase()),
                }
            } else if list {
                v.split(',').map(str::to_string).collect()
            } else {
                vec![v]
            };
            (values, Origin::Env)
        } else if let Some(v) = file.get(&key) {
            let values = v
                .flag_values(&key)?
                .into_iter()
                .map(|x| x.unwrap_or_else(|| "true".to_string()))
                .collect();
            (values, Origin::File)
        } else {
            let values = arg
                .get_default_values()
                .iter()
                .map(|v| v.to_string_lossy().into_owned())
                .collect();
            (values, Origin::Default)
        };
        if matches!(origin, Origin::Env | Origin::File) {
            let flag = format!("--{long}");
            if bare {
                if !values.is_empty() {
                    injected.push(flag.into());
                }
            } else {
                for v in &values {
                    injected.push(flag.clone().into());
                    injected.push(v.into());
                }
            }
        }
        settings.push(Setting {
            key,
            values,
            origin,
        });
    }
    if let Some(unknown) = file.keys().find(|k| !known.contains(*k)) {
        let path = given
            .get_one::<PathBuf>("config")
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        bail!(
            "unknown key `{unknown}` in the [worker] table of {path} (keys are the worker's \
             long flags with `_`, see `kv-distill worker --help`)"
        );
    }
    let mut out: Vec<OsString> = args[..=at].to_vec();
    out.extend(injected);
    out.extend(args[at + 1..].iter().cloned());
    Ok((out, settings))
}

/// The index of the `worker` subcommand in `args` (after the global flags).
fn worker_position(args: &[OsString]) -> Option<usize> {
    let mut i = 1;
    while let Some(a) = args.get(i) {
        let a = a.to_string_lossy();
        match a.as_ref() {
            "worker" => return Some(i),
            "--log-format" | "--threads" => i += 2,
            _ if a.starts_with("--log-format=") || a.starts_with("--threads=") => i += 1,
            _ => return None,
        }
    }
    None
}

/// The `[worker]` table of a job file.
fn read_table(
    path: &std::path::Path,
) -> Result<std::collections::BTreeMap<String, toml_value::Value>> {
    if !path.is_file() {
        bail!("config file {} does not exist", path.display());
    }
    Figment::from(Toml::file_exact(path))
        .focus("worker")
        .extract()
        .with_context(|| format!("invalid [worker] table in {}", path.display()))
}

/// The settings as TOML lines with their origin, for `--print-config` and
/// the start-up log.
pub(crate) fn render(settings: &Settings) -> String {
    settings
        .iter()
        .map(|s| {
            let value = match s.values.as_slice() {
                [] => "# unset".to_string(),
                [one] => toml_scalar(one),
                many => format!(
                    "[{}]",
                    many.iter()
                        .map(|v| toml_scalar(v))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
            let origin = match s.origin {
                Origin::Default => "default".to_string(),
                Origin::File => "file".to_string(),
                Origin::Env => format!("env KVD_{}", s.key.to_uppercase()),
                Origin::Flag => "flag".to_string(),
            };
            if s.values.is_empty() {
                format!("# {} unset ({origin})", s.key)
            } else {
                format!("{} = {value}  # {origin}", s.key)
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `v` as a TOML scalar: numbers and booleans bare, anything else quoted.
fn toml_scalar(v: &str) -> String {
    if v == "true" || v == "false" || v.parse::<f64>().is_ok() {
        v.to_string()
    } else {
        format!("{v:?}")
    }
}
/// The TOML values a flag can take.
mod toml_value {
    use anyhow::{bail, Result};
    use serde::Deserialize;

    /// A scalar or a list of scalars.
    #[derive(Debug, Deserialize)]
    #[serde(untagged)]
    pub(super) enum Value {
        Bool(bool),
        Int(i64),
        Float(f64),
        Str(String),
        List(Vec<Value>),
    }

    impl Value {
        /// Flag values: `None` for a bare flag; one entry per repetition.
        pub(super) fn flag_values(&self, key: &str) -> Result<Vec<Option<String>>> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn help_passes_through_unresolved_and_odd_lines_do_not_panic() {
        let line = |extra: &[&str]| -> Vec<OsString> {
            let mut args: Vec<OsString> = vec!["kv-distill".into(), "worker".into()];
            args.extend(extra.iter().map(OsString::from));
            args
        };
        for help in ["--help", "-h"] {
            let (out, settings) = resolve_with(line(&[help]), |_| None).expect("help");
            assert_eq!(out, line(&[help]));
            assert!(settings.is_empty());
        }
        // Left for the real parse to name; resolving them must not panic.
        for odd in [&["--no-such-flag"][..], &["--max-len"], &["--max-len", "x"]] {
            resolve_with(line(odd), |_| None).expect("resolves");
        }
    }

    /// Every worker key with a value its flag accepts.
    fn keys() -> Vec<(String, String, bool)> {
        let cmd = WorkerArgs::augment_args(clap::Command::new("worker"));
        cmd.get_arguments()
            .filter_map(|a| {
                let long = a.get_long()?;
                if NOT_SETTINGS.contains(&long) {
                    return None;
                }
                let value = a
                    .get_possible_values()
                    .first()
                    .map(|p| p.get_name().to_string())
                    .unwrap_or_else(|| "7".into());
                Some((long.to_string(), value, !a.get_action().takes_values()))
            })
            .collect()
    }

    fn argv(flags: &[String]) -> Vec<OsString> {
        ["kv-distill", "worker"]
            .iter()
            .map(OsString::from)
            .chain(flags.iter().map(OsString::from))
            .collect()
    }

    /// Each key in every layer at once, then one layer fewer at a time: the
    /// highest layer present wins, for every key of the worker.
    #[test]
    fn every_key_follows_defaults_file_env_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("job.toml");
        let mut toml = String::from("[worker]\n");
        for (long, value, bare) in keys() {
            let key = long.replace('-', "_");
            if bare {
                toml.push_str(&format!("{key} = true\n"));
            } else {
                toml.push_str(&format!("{key} = \"{value}\"\n"));
            }
        }
        std::fs::write(&file, toml).unwrap();
        let config = vec!["--config".to_string(), file.display().to_string()];
        let flags: Vec<String> = keys()
            .into_iter()
            .flat_map(|(long, value, bare)| {
                let f = format!("--{long}");
                if bare {
                    vec![f]
                } else {
                    vec![f, value]
                }
            })
            .collect();
        let env: BTreeMap<String, String> = keys()
            .into_iter()
            .map(|(long, value, bare)| {
                let k = format!("KVD_{}", long.replace('-', "_").to_uppercase());
                (k, if bare { "true".into() } else { value })
            })
            .collect();
        let with_env = |k: &str| env.get(k).cloned();
        let no_env = |_: &str| None;
        let cases: [(Vec<String>, bool, Origin); 4] = [
            ([config.clone(), flags.clone()].concat(), true, Origin::Flag),
            (config.clone(), true, Origin::Env),
            (config.clone(), false, Origin::File),
            (vec![], false, Origin::Default),
        ];
        for (args, use_env, want) in cases {
            let (_, settings) = if use_env {
                resolve_with(argv(&args), with_env)
            } else {
                resolve_with(argv(&args), no_env)
            }
            .unwrap();
            assert_eq!(settings.len(), keys().len());
            for s in &settings {
                assert_eq!(s.origin, want, "{}: {s:?}", s.key);
            }
        }
    }

    /// The case: `max_len = 96` in job.toml, `KVD_MAX_LEN=80`.
    #[test]
    fn the_environment_beats_the_file_and_a_flag_beats_both() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("job.toml");
        std::fs::write(&file, "[worker]\nmax_len = 96\nratios = [0.1, 0.5]\n").unwrap();
        let base = vec!["--config".to_string(), file.display().to_string()];
        let max_len = |args: Vec<String>, env: Option<&str>| {
            let (argv, settings) = resolve_with(argv(&args), |k| {
                (k == "KVD_MAX_LEN")
                    .then_some(env)
                    .flatten()
                    .map(String::from)
            })
            .unwrap();
            let s = settings.into_iter().find(|s| s.key == "max_len").unwrap();
            (s.values, s.origin, argv)
        };
        let (v, o, argv_env) = max_len(base.clone(), Some("80"));
        assert_eq!((v, o), (vec!["80".to_string()], Origin::Env));
        assert!(argv_env
            .windows(2)
            .any(|w| w[0] == "--max-len" && w[1] == "80"));
        let (v, o, _) = max_len(base.clone(), None);
        assert_eq!((v, o), (vec!["96".to_string()], Origin::File));
        let (v, o, _) = max_len(
            [base, vec!["--max-len".into(), "70".into()]].concat(),
            Some("80"),
        );
        assert_eq!((v, o), (vec!["70".to_string()], Origin::Flag));
        let (v, o, _) = max_len(vec![], None);
        assert_eq!((v, o), (vec!["1024".to_string()], Origin::Default));
    }

    #[test]
    fn unknown_file_keys_and_bad_booleans_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("job.toml");
        std::fs::write(&file, "[worker]\nmax_lenn = 96\n").unwrap();
        let args = vec!["--config".to_string(), file.display().to_string()];
        let e = resolve_with(argv(&args), |_| None).unwrap_err().to_string();
        assert!(
            e.contains("unknown key `max_lenn`") && e.contains("job.toml"),
            "{e}"
        );
        let e = resolve_with(argv(&[]), |k| {
            (k == "KVD_SKIP_BAD_ROWS").then(|| "maybe".into())
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("KVD_SKIP_BAD_ROWS") && e.contains("maybe"),
            "{e}"
        );
    }

    #[test]
    fn global_flags_before_the_subcommand_are_skipped() {
        let args: Vec<OsString> = [
            "kv-distill",
            "--log-format",
            "json",
            "--threads=2",
            "worker",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        assert_eq!(worker_position(&args), Some(4));
        let other: Vec<OsString> = ["kv-distill", "train"].iter().map(OsString::from).collect();
        assert_eq!(worker_position(&other), None);
    }
}
