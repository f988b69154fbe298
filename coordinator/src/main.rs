//! `coordinator`: drives a distributed KV-Distill job (see `kvd_coordinator`).
//!
//! Exit status: 0 when every worker reported the final step, when paused
//! (`--stop-at`) and on a Shutdown request that is not a failure; 1 when the
//! job failed (the reason is logged); 2 for a bad configuration; 3 when
//! SIGINT/SIGTERM stopped the job before it finished (resume with `--resume`).

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use kvd_coordinator::config::{Cli, Config, LogFormat};
use kvd_coordinator::server::{run, Signals};
use kvd_proto::report::error_chain;
use tracing::{error, info};
use tracing_subscriber::EnvFilter;

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(&cli) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("coordinator: {}", error_chain(e.as_ref()));
            return ExitCode::from(2);
        }
    };
    init_logging(config.log_format);
    match config.log_format {
        LogFormat::Human => info!("resolved configuration:\n{config}"),
        LogFormat::Json => info!(config = %config, "resolved configuration"),
    }
    let signals = match Signals::install() {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "cannot install the signal handlers");
            return ExitCode::FAILURE;
        }
    };
    match run(&config, signals).await {
        Ok(outcome) if outcome.interrupted => {
            error!(reason = %outcome.reason, "job interrupted");
            ExitCode::from(3)
        }
        Ok(outcome) if !outcome.failed => {
            info!(reason = %outcome.reason, "coordinator done");
            ExitCode::SUCCESS
        }
        Ok(outcome) => {
            error!(reason = %outcome.reason, "job failed");
            ExitCode::FAILURE
        }
        Err(e) => {
            error!("coordinator failed: {}", error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}
