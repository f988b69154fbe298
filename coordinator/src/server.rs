//! Runs the coordinator: listens, serves, reaps dead workers, and stops when
//! the job is over or on SIGINT/SIGTERM.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use kvd_proto::auth::RequireToken;
use kvd_proto::v1::coordinator_server::CoordinatorServer;
use kvd_proto::MAX_MESSAGE_BYTES;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tracing::{info, warn};

use crate::checkpoints::Checkpoints;
use crate::config::Config;
use crate::membership::{JobParams, Membership, Outcome};
use crate::service::{CoordinatorService, Shared};
use crate::spawn::LocalWorkers;

/// SIGINT and SIGTERM, installed up front so that none is missed.
pub struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    /// Installs the handlers.
    pub fn install() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// The next signal's name.
    pub async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

fn write_port_file(path: &Path, port: u16) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{port}\n"))
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("cannot write the port file {}", path.display()))
}

/// Serves the job described by `config` until it is over; returns how it ended.
pub async fn run(config: &Config, mut signals: Signals) -> anyhow::Result<Outcome> {
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    if let Some(path) = &config.bind_port_file {
        write_port_file(path, addr.port())?;
    }

    let resume = crate::checkpoints::resolve_resume(config).await?;
    let checkpoints = match &config.checkpoint_url {
        Some(base) => Some(Checkpoints::open(base, &config.store_options)?),
        None => None,
    };
    let params = JobParams {
        world_size: config.workers,
        final_step: config.steps,
        heartbeat_timeout: config.heartbeat_timeout,
        max_rebuilds: config.max_rebuilds,
        checkpoint_url: config.checkpoint_url.clone(),
        resume: resume.intact,
        stop_at: config.stop_at,
        max_checkpoint_failures: config.max_checkpoint_failures,
    };
    let shared = Shared::new(Membership::new(params));
    let max_wait = (config.heartbeat_timeout / 2).min(Duration::from_secs(30));
    let service = CoordinatorServer::new(CoordinatorService::new(
        shared.clone(),
        max_wait,
        checkpoints,
        config.keep_last,
        resume.skipped.iter().map(|(step, _)| *step).collect(),
    ))
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let service = InterceptedService::new(service, RequireToken::new(config.token.expose()));

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut builder = Server::builder();
    if let Some((cert, key)) = &config.tls {
        let read = |p: &Path| {
            std::fs::read(p).with_context(|| format!("cannot read the TLS file {}", p.display()))
        };
        let identity = Identity::from_pem(read(cert)?, read(key)?);
        builder = builder
            .tls_config(ServerTlsConfig::new().identity(identity))
            .context("bad TLS certificate or key")?;
    }
    let mut server = tokio::spawn(builder.add_service(service).serve_with_incoming_shutdown(
        incoming,
        async {
            let _ = stop_rx.await;
        },
    ));
    info!(%addr, workers = config.workers, "listening; waiting for workers");
    let mut local = match &config.spawn_local {
        Some(cmd) => Some(LocalWorkers::start(
            cmd,
            config.workers,
            addr,
            config.token.expose(),
        )?),
        None => None,
    };

    let tick =
        (config.heartbeat_timeout / 4).clamp(Duration::from_millis(10), Duration::from_millis(500));
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut changes = shared.subscribe();
    let mut signalled = false;
    loop {
        if let Some(outcome) = shared.read(|m| m.outcome().cloned()) {
            // Give heartbeating workers a moment to hear STOP.
            let grace = Instant::now() + config.heartbeat_timeout / 2;
            while !signalled && Instant::now() < grace && !shared.read(|m| m.all_told_stop()) {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                    name = signals.next() => {
                        warn!(signal = name, "second signal: stopping now");
                        signalled = true;
                    }
                }
            }
            if let Some(local) = local.as_mut() {
                local
                    .shutdown(config.heartbeat_timeout.max(Duration::from_secs(5)))
                    .await;
            }
            let _ = stop_tx.send(());
            match tokio::time::timeout(Duration::from_secs(5), &mut server).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => warn!(error = %e, "server ended with an error"),
                Ok(Err(e)) => warn!(error = %e, "server task failed"),
                Err(_) => {
                    warn!("open connections did not close within 5 s; closing them");
                    server.abort();
                }
            }
            return Ok(outcome);
        }
        tokio::select! {
            _ = ticker.tick() => {
                shared.update(|m| m.reap(Instant::now()));
                if let Some(local) = local.as_mut() {
                    let over = shared.read(|m| m.outcome().is_some());
                    if let Err(e) = local.supervise(over) {
                        shared.update(|m| m.finish(format!("cannot restart a local worker: {e:#}"), true));
                    } else if local.restarts > config.max_rebuilds {
                        shared.update(|m| m.finish(format!("local workers restarted {} times (max_rebuilds = {})", local.restarts, config.max_rebuilds), true));
                    }
                }
            }
            _ = changes.changed() => {}
            name = signals.next() => {
                shared.update(|m| m.interrupt(format!(
                    "stopped by {name} before the job finished; the same command with --resume \
                     continues from the last committed checkpoint"
                )));
            }
            result = &mut server => {
                return match result {
                    Ok(Ok(())) => Err(anyhow::anyhow!("the gRPC server stopped unexpectedly")),
                    Ok(Err(e)) => Err(e).context("the gRPC server failed"),
                    Err(e) => Err(e).context("the gRPC server task failed"),
                };
            }
        }
    }
}
