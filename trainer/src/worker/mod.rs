//! The worker: joins the job at the coordinator, forms the collective of its
//! membership epoch, trains its share of every global batch, checkpoints its
//! part, and starts over from the last committed checkpoint whenever the
//! membership changes (a peer died, the coordinator restarted).
//!
//! Control flow: `run_worker` loops over registrations (a fresh member id);
//! each registration loops over epochs (rendezvous -> collective -> session).
//! A session ends when the job is done, on STOP, on REBUILD (the same member
//! rendezvouses for the new epoch) or when the coordinator no longer knows the
//! member (it registers again). A heartbeat task runs beside each session and
//! aborts the collective when a rebuild is ordered, so a dead peer never
//! leaves a worker blocked in an all-reduce.
//!
//! SIGTERM or SIGINT: the worker finishes its current step (and the upload of
//! a checkpoint part in flight), tells the coordinator it leaves (its rank is
//! freed at once and the others rebuild) and ends with
//! [`ModelError::Interrupted`] (`kv-distill` exits 128 + the signal's number).
//! A second signal ends the process at once.

pub mod bench;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvd_data::SkipStats;
use kvd_proto::client::Client;
use kvd_proto::v1::{
    CheckpointBeginRequest, CheckpointCommitRequest, CheckpointFailedRequest, Command, DeviceKind,
    HeartbeatRequest, LeaveRequest, RegisterReply, RegisterRequest, RendezvousRequest,
    ReportStepRequest, ShutdownRequest,
};
use tokio::runtime::Runtime;
use tonic::{Code, Status};

use crate::chaos::{Chaos, Phase};
use crate::checkpointer::parts::{encode_part, load_checkpoint, put_url, write_options};
use crate::checkpointer::Checkpointer;
use crate::collective::nccl::{self, Nccl};
use crate::collective::tcp::{local_ip_towards, TcpEndpoint, TcpStar};
use crate::collective::Collective;
use crate::distill::checkpoint::{config_hash, save};
use crate::distill::{Adaptor, Trainer};
use crate::error::{ModelError, Result};
use crate::model::Model;
use crate::tokenizer::Tokenizer;
pub use crate::train_loop::job_hash;
use crate::train_loop::{
    fresh_state, job_builder, run, spawn_producer, validate_job, LoopConfig, LoopHooks,
    ProducerStart, StepDone, TrainJob, TrainState,
};

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Coordinator address (`host:port`).
    pub coordinator: String,
    /// The job token.
    pub token: String,
    /// Rank to ask for (e.g. the pod's completion index).
    pub requested_rank: Option<u32>,
    /// Name in the coordinator's logs.
    pub name: String,
    /// The training job (the same on every worker: its hash is checked).
    pub job: TrainJob,
    /// Checkpoint every this many steps (0: only the final step), when the
    /// coordinator has a checkpoint URL.
    pub checkpoint_every: usize,
    /// Where rank 0 writes the final adaptor (a path or an object URL).
    pub out: Option<String>,
    /// Longest wait in one collective.
    pub collective_timeout: Duration,
    /// How long the coordinator may stay unreachable before the worker gives up.
    pub coordinator_timeout: Duration,
    /// Append one JSON line per step (ids, loss) to this file (`{rank}` in
    /// the name is replaced by the rank).
    pub trace: Option<PathBuf>,
    /// Instead of training: time the all-reduce (raw on flat buffers of these
    /// sizes in float32 elements, and the bucketed gradient all-reduce of the
    /// adaptor), rank 0 writing JSON lines to this file.
    pub bench_allreduce: Option<(Vec<usize>, PathBuf)>,
    /// TLS to the coordinator, if it serves TLS.
    pub tls: Option<kvd_proto::client::ClientTls>,
    /// Show a progress bar on rank 0 (for terminals; clusters read the logs).
    pub progress: bool,
    /// A fault to inject (recovery tests).
    pub chaos: Option<Chaos>,
}

/// How a worker ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerOutcome {
    /// Trained to the final step.
    Finished {
        /// The final step.
        steps: u64,
    },
    /// Told to stop before the end.
    Stopped,
}

/// Why a session ended.
enum SessionEnd {
    Finished(u64),
    Stop,
    Rebuild,
    Rejoin,
    /// A signal asked the process to stop: leave the job.
    Leave,
}

/// The signal that asked this process to stop (0: none yet).
static SIGNALLED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    if SIGNALLED.swap(sig, Ordering::SeqCst) != 0 {
        // A second signal: stop at once (only async-signal-safe calls here).
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(128 + sig) };
    }
}

/// Catches SIGTERM and SIGINT: the first asks the worker to leave after its
/// current step, a second ends the process.
fn install_signal_handlers() -> Result<()> {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only touches an atomic and calls _exit.
        let old = unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
        if old == libc::SIG_ERR {
            return Err(ModelError::Input(format!(
                "cannot install the handler of signal {sig}: {}",
                std::io::Error::last_os_error()
            )));
        }
    }
    Ok(())
}

/// The signal received, if any, by name.
fn signalled() -> Option<(i32, &'static str)> {
    match SIGNALLED.load(Ordering::SeqCst) {
        0 => None,
        s if s == libc::SIGTERM => Some((s, "SIGTERM")),
        s if s == libc::SIGINT => Some((s, "SIGINT")),
        s => Some((s, "a signal")),
    }
}

/// The error a worker stopped by a signal ends with.
fn interrupted(what: &str) -> ModelError {
    let (signal, name) = signalled().unwrap_or((libc::SIGTERM, "a signal"));
    ModelError::Interrupted {
        signal,
        reason: format!("stopped by {name}: {what}"),
    }
}

/// An order from the heartbeat task to the training thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Order {
    /// The job ended or paused: stop.
    Stop = 1,
    /// The membership changed: rendezvous for the next epoch.
    Rebuild = 2,
    /// The coordinator no longer knows this member: register again.
    Rejoin = 3,
    /// The coordinator has been unreachable too long.
    Lost = 4,
}

impl Order {
    fn from_u8(v: u8) -> Option<Order> {
        [Order::Stop, Order::Rebuild, Order::Rejoin, Order::Lost]
            .into_iter()
            .find(|o| *o as u8 == v)
    }

    fn name(self) -> &'static str {
        match self {
            Order::Stop => "stop",
            Order::Rebuild => "rebuild",
            Order::Rejoin => "rejoin",
            Order::Lost => "coordinator lost",
        }
    }

    /// How the session ends on this order.
    fn end(self) -> Result<SessionEnd> {
        match self {
            Order::Stop => Ok(SessionEnd::Stop),
            Order::Rebuild => Ok(SessionEnd::Rebuild),
            Order::Rejoin => Ok(SessionEnd::Rejoin),
            Order::Lost => Err(ModelError::Coordinator(
                "the coordinator has been unreachable for longer than the coordinator timeout"
                    .into(),
            )),
        }
    }
}

/// What the heartbeat task tells the training thread.
struct Control {
    command: AtomicU8,
    abort: Arc<AtomicBool>,
    step: AtomicU64,
}

impl Control {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            command: AtomicU8::new(0),
            abort: Arc::new(AtomicBool::new(false)),
            step: AtomicU64::new(0),
        })
    }

    fn order(&self, order: Order) {
        // The first order wins (a STOP is never downgraded to a REBUILD).
        let _ = self
            .command
            .compare_exchange(0, order as u8, Ordering::SeqCst, Ordering::SeqCst);
        self.abort.store(true, Ordering::SeqCst);
    }

    fn pending(&self) -> Option<Order> {
        Order::from_u8(self.command.load(Ordering::SeqCst))
    }
}

/// A failed call to the coordinator (a refusal, or the transport failing)
/// as [`ModelError::Coordinator`]: never "invalid input".
fn rpc_err(what: &str, s: &Status) -> ModelError {
    let cause = std::error::Error::source(s)
        .map(|e| format!(": {}", kvd_proto::report::error_chain(e)))
        .unwrap_or_default();
    ModelError::Coordinator(format!(
        "the coordinator {what}: {}{cause} ({:?})",
        s.message(),
        s.code()
    ))
}

/// Everything a session needs that outlives it.
struct Ctx<'a> {
    model: &'a Model,
    tok: Arc<Tokenizer>,
    cfg: &'a WorkerConfig,
    rt: Runtime,
    client: Client,
    endpoint: Option<TcpEndpoint>,
    cuda: bool,
    job_hash: String,
    model_hash: String,
    chaos: Option<Chaos>,
    stats: SkipStats,
    /// Has been a member: its failures end the job (a rejected newcomer's do not).
    joined: bool,
    /// The last step this worker completed.
    last_step: AtomicU64,
}

/// Runs a worker until the job ends.
pub fn run_worker(model: &Model, tok: Arc<Tokenizer>, cfg: &WorkerConfig) -> Result<WorkerOutcome> {
    validate_job(model, &cfg.job)?;
    install_signal_handlers()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| ModelError::Input(format!("cannot start the worker runtime: {e}")))?;
    let client = connect(&rt, cfg)?;
    let cuda = model.device().is_cuda();
    let endpoint = if cuda {
        None
    } else {
        Some(TcpEndpoint::bind(
            "0.0.0.0:0",
            local_ip_towards(&cfg.coordinator),
        )?)
    };
    let chaos = cfg.chaos.clone();
    let mut ctx = Ctx {
        model,
        stats: SkipStats::default(),
        tok,
        cfg,
        rt,
        client,
        endpoint,
        cuda,
        job_hash: job_hash(&cfg.job),
        model_hash: config_hash(model.config()),
        chaos,
        joined: false,
        last_step: AtomicU64::new(0),
    };
    let result = join_loop(&mut ctx);
    let left = matches!(result, Err(ModelError::Interrupted { .. }));
    if let (Err(e), true, false) = (&result, ctx.joined, left) {
        // Tell the coordinator why, so the job stops cleanly with the reason.
        let reason = format!("worker {}: {e}", cfg.name);
        let mut c = ctx.client.clone();
        let _ = ctx.rt.block_on(async {
            tokio::time::timeout(
                Duration::from_secs(5),
                c.shutdown(ShutdownRequest {
                    rank: None,
                    reason,
                    failed: true,
                }),
            )
            .await
        });
    }
    result
}

fn connect(rt: &Runtime, cfg: &WorkerConfig) -> Result<Client> {
    let deadline = Instant::now() + cfg.coordinator_timeout;
    loop {
        match rt.block_on(kvd_proto::client::connect_with(
            &cfg.coordinator,
            &cfg.token,
            cfg.tls.as_ref(),
        )) {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "coordinator not reachable yet");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(ModelError::Coordinator(kvd_proto::report::error_chain(&e))),
        }
    }
}

/// One call to the coordinator, as [`call`] takes it.
type Rpc<T> = std::pin::Pin<
    Box<dyn std::future::Future<Output = std::result::Result<tonic::Response<T>, Status>> + Send>,
>;

/// Calls `f` until it succeeds, retrying while the coordinator is unreachable
/// (up to the coordinator timeout).
fn call<T>(
    ctx: &Ctx<'_>,
    what: &str,
    mut f: impl FnMut(Client) -> Rpc<T>,
) -> std::result::Result<T, Status> {
    let deadline = Instant::now() + ctx.cfg.coordinator_timeout;
    loop {
        match ctx.rt.block_on(f(ctx.client.clone())) {
            Ok(r) => return Ok(r.into_inner()),
            Err(s) if s.code() == Code::Unavailable && Instant::now() < deadline => {
                tracing::debug!(rpc = what, "coordinator unavailable: retrying");
                std::thread::sleep(Duration::from_millis(250));
            }
            Err(s) => return Err(s),
        }
    }
}

fn fresh_id(ctx: &Ctx<'_>) -> Result<Vec<u8>> {
    Ok(match &ctx.endpoint {
        Some(ep) => ep.id().to_vec(),
        None => nccl::unique_id()?,
    })
}

fn join_loop(ctx: &mut Ctx<'_>) -> Result<WorkerOutcome> {
    loop {
        let req = RegisterRequest {
            worker_name: ctx.cfg.name.clone(),
            host: hostname(),
            device_kind: if ctx.cuda {
                DeviceKind::Cuda
            } else {
                DeviceKind::Cpu
            } as i32,
            model_config_hash: ctx.model_hash.clone(),
            job_config_hash: ctx.job_hash.clone(),
            protocol_version: kvd_proto::PROTOCOL_VERSION,
            requested_rank: ctx.cfg.requested_rank,
            nccl_id: Some(fresh_id(ctx)?),
            final_step: Some(ctx.cfg.job.train.total_steps as u64),
            job_config_json: job_config_json(&ctx.cfg.job, &ctx.job_hash),
        };
        let mut view = match register(ctx, req)? {
            Some(v) => v,
            None => return Ok(WorkerOutcome::Stopped),
        };
        ctx.joined = true;
        tracing::info!(
            rank = view.rank,
            world_size = view.world_size,
            epoch = view.epoch,
            member = view.member_id,
            "registered"
        );
        loop {
            view = match rendezvous(ctx, view.clone())? {
                Ok(v) => v,
                Err(SessionEnd::Stop) => return Ok(WorkerOutcome::Stopped),
                Err(SessionEnd::Leave) => return Err(leave(ctx, &view, "while waiting for peers")),
                Err(_) => break, // rejoin
            };
            match session(ctx, &view)? {
                SessionEnd::Finished(steps) => return Ok(WorkerOutcome::Finished { steps }),
                SessionEnd::Stop => return Ok(WorkerOutcome::Stopped),
                SessionEnd::Leave => {
                    let step = ctx.last_step.load(Ordering::SeqCst);
                    return Err(leave(ctx, &view, &format!("after step {step}")));
                }
                SessionEnd::Rebuild => {
                    tracing::warn!(rank = view.rank, "membership changed: rebuilding");
                    view.ready = false;
                    view.nccl_id = None;
                    view.epoch += 1;
                }
                SessionEnd::Rejoin => {
                    tracing::warn!(
                        rank = view.rank,
                        "the coordinator lost this member: registering again"
                    );
                    break;
                }
            }
        }
    }
}

/// Tells the coordinator this member leaves (so it frees the rank at once);
/// returns the error the worker ends with.
fn leave(ctx: &Ctx<'_>, view: &RegisterReply, when: &str) -> ModelError {
    let (_, name) = signalled().unwrap_or((0, "a signal"));
    let req = LeaveRequest {
        member_id: view.member_id,
        rank: view.rank,
        epoch: view.epoch,
        reason: format!("{name} {when}"),
    };
    let mut c = ctx.client.clone();
    let told = ctx
        .rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(5), c.leave(req)).await });
    let told = match told {
        Ok(Ok(_)) => format!("rank {} freed at the coordinator", view.rank),
        Ok(Err(s)) => format!("the coordinator did not take the leave: {}", s.message()),
        Err(_) => "the coordinator did not answer the leave within 5 s".into(),
    };
    tracing::warn!(rank = view.rank, signal = name, when, %told, "left the job");
    interrupted(&format!(
        "worker of rank {} left the job {when} ({told})",
        view.rank
    ))
}

/// The job configuration behind `job_hash`, as JSON, for the coordinator
/// to name the keys that differ between workers; `None` if it does not hash
/// to `job_hash` (then it would mislead).
fn job_config_json(job: &TrainJob, job_hash: &str) -> Option<String> {
    let json = crate::train_loop::hashed_json(job)?;
    (crate::train_loop::sha256_hex(&json) == job_hash).then_some(json)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Registers; `None` when the job is over. A taken rank (our previous self
/// not yet declared dead) is retried until the coordinator frees it.
fn register(ctx: &Ctx<'_>, req: RegisterRequest) -> Result<Option<RegisterReply>> {
    let deadline = Instant::now() + ctx.cfg.coordinator_timeout;
    loop {
        if signalled().is_some() {
            return Err(interrupted("left before joining the job"));
        }
        let r = req.clone();
        match call(ctx, "Register", move |mut c| {
            let r = r.clone();
            Box::pin(async move { c.register(r).await })
        }) {
            Ok(v) => return Ok(Some(v)),
            Err(s)
                if matches!(s.code(), Code::AlreadyExists | Code::ResourceExhausted)
                    && Instant::now() < deadline =>
            {
                tracing::info!(reason = s.message(), "rank not free yet: waiting");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(s) if kvd_proto::status::is_job_over(&s) => return Ok(None),
            Err(s) => return Err(rpc_err("rejected the registration", &s)),
        }
    }
}

/// Waits until the epoch's membership is complete; rank 0 supplies the id.
fn rendezvous(
    ctx: &Ctx<'_>,
    mut view: RegisterReply,
) -> Result<std::result::Result<RegisterReply, SessionEnd>> {
    let mut supplied: Option<u64> = None;
    loop {
        if signalled().is_some() {
            return Ok(Err(SessionEnd::Leave));
        }
        if view.ready {
            return Ok(Ok(view));
        }
        let nccl_id = if view.rank == 0 && view.nccl_id.is_none() && supplied != Some(view.epoch) {
            supplied = Some(view.epoch);
            Some(fresh_id(ctx)?)
        } else {
            None
        };
        let req = RendezvousRequest {
            member_id: view.member_id,
            rank: view.rank,
            epoch: view.epoch,
            nccl_id,
            wait_ms: 1_000,
        };
        match call(ctx, "Rendezvous", move |mut c| {
            let r = req.clone();
            Box::pin(async move { c.rendezvous(r).await })
        }) {
            Ok(v) => {
                if v.epoch != view.epoch {
                    supplied = None;
                }
                view = v;
            }
            Err(s) if s.code() == Code::NotFound => return Ok(Err(SessionEnd::Rejoin)),
            Err(s) if kvd_proto::status::is_job_over(&s) => return Ok(Err(SessionEnd::Stop)),
            Err(s) => return Err(rpc_err("rendezvous failed", &s)),
        }
    }
}

/// Beats every `interval` and turns the replies into orders.
fn spawn_heartbeat(
    ctx: &Ctx<'_>,
    view: &RegisterReply,
    control: Arc<Control>,
) -> tokio::task::JoinHandle<()> {
    let mut client = ctx.client.clone();
    let (member_id, rank, epoch) = (view.member_id, view.rank, view.epoch);
    let interval = Duration::from_millis(view.heartbeat_interval_ms.max(50));
    let lost_after = ctx.cfg.coordinator_timeout;
    ctx.rt.spawn(async move {
        let mut last_ok = Instant::now();
        loop {
            tokio::time::sleep(interval).await;
            let req = HeartbeatRequest {
                member_id,
                rank,
                epoch,
                step: control.step.load(Ordering::SeqCst),
            };
            match client.heartbeat(req).await {
                Ok(r) => {
                    last_ok = Instant::now();
                    match Command::try_from(r.into_inner().command) {
                        Ok(Command::Stop) => control.order(Order::Stop),
                        Ok(Command::Rebuild) => control.order(Order::Rebuild),
                        _ => {}
                    }
                }
                Err(s) if s.code() == Code::NotFound => control.order(Order::Rejoin),
                Err(s) if kvd_proto::status::is_job_over(&s) => control.order(Order::Stop),
                Err(s) => {
                    tracing::debug!(error = %s.message(), "heartbeat failed");
                    if last_ok.elapsed() > lost_after {
                        control.order(Order::Lost);
                    }
                }
            }
        }
    })
}

/// Why a checkpoint part was not written.
#[derive(Debug, thiserror::Error)]
enum UploadError {
    /// A checkpoint RPC failed.
    #[error("{call}: {}", .status.message())]
    Rpc {
        /// The call.
        call: &'static str,
        /// Its status.
        status: tonic::Status,
    },
    /// The part could not be stored.
    #[error("{0}")]
    Store(String),
}

/// A pending checkpoint upload (off the training thread).
type Upload = tokio::task::JoinHandle<std::result::Result<(), UploadError>>;

fn session(ctx: &mut Ctx<'_>, view: &RegisterReply) -> Result<SessionEnd> {
    let control = Control::new();
    control.step.store(view.start_step, Ordering::SeqCst);
    let beat = spawn_heartbeat(ctx, view, control.clone());
    let result = session_inner(ctx, view, &control);
    beat.abort();
    match result {
        Err(ModelError::Collective(e)) if control.pending().is_some() => {
            // The heartbeat aborted the collective on the coordinator's order
            // (a pause at --stop-at, a job end, a rebuild): expected.
            let order = control.pending().unwrap_or(Order::Stop);
            tracing::info!(order = order.name(), reason = %e, "collective ended by the coordinator's order");
            order.end()
        }
        Err(ModelError::Collective(e)) => {
            // A peer failed mid-collective: the coordinator will order a
            // rebuild once it notices; wait for that order.
            tracing::warn!(error = %e, "collective failed: waiting for the coordinator");
            let deadline = Instant::now() + ctx.cfg.coordinator_timeout;
            let beat = spawn_heartbeat(ctx, view, control.clone());
            while control.pending().is_none() && Instant::now() < deadline && signalled().is_none()
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            beat.abort();
            match control.pending() {
                None if signalled().is_some() => Ok(SessionEnd::Leave),
                None => Err(ModelError::Collective(e)),
                Some(order) => order.end(),
            }
        }
        other => other,
    }
}

fn session_inner(
    ctx: &mut Ctx<'_>,
    view: &RegisterReply,
    control: &Arc<Control>,
) -> Result<SessionEnd> {
    let (rank, world) = (view.rank as usize, view.world_size as usize);
    let job = &ctx.cfg.job;
    let mut coll = connect_collective(ctx, view, control)?;

    let mut state = fresh_state(ctx.model, job)?;
    if let Some(url) = &view.resume_checkpoint_url {
        restore(ctx, url, &mut state)?;
    }
    if let Some((sizes, out)) = &ctx.cfg.bench_allreduce {
        bench::allreduce(coll.as_mut(), &state.adaptor, sizes, out)?;
        return report_final(ctx, view, job.train.total_steps as u64);
    }
    let start = state.step();
    if start as u64 != view.start_step {
        return Err(ModelError::Checkpoint(format!(
            "the checkpoint is at step {start}, the coordinator says {}",
            view.start_step
        )));
    }
    if start >= job.train.total_steps {
        // Resumed from the final checkpoint (a finished job run again, or a
        // retry after the final adaptor could not be written): nothing to
        // train; write the adaptor and report the final step.
        tracing::info!(
            rank,
            step = start,
            "the checkpoint is at the final step: writing the final adaptor"
        );
        if rank == 0 {
            if let Some(out) = &ctx.cfg.out {
                write_adaptor(ctx, &state.adaptor, &state.trainer, out)?;
            }
        }
        return report_final(ctx, view, job.train.total_steps as u64);
    }
    let builder = job_builder(ctx.tok.clone(), job)?;
    ctx.stats = builder.stats().clone();
    let rx = spawn_producer(
        job,
        builder,
        ProducerStart {
            rank,
            world,
            step: start,
            cursors: state.cursors.clone(),
        },
    )?;
    let ctx: &Ctx<'_> = ctx;
    let total = job.train.total_steps;
    let bar = (ctx.cfg.progress && rank == 0).then(|| progress_bar(total, start));
    let trace = open_trace(ctx, rank)?;
    let mut hooks = WorkerHooks {
        ctx,
        view,
        control,
        bar,
        trace,
        last_report_s: 0.0,
        world,
    };
    let mut saver = CoordinatorCheckpointer {
        ctx,
        view,
        upload: None,
    };
    let at = LoopConfig {
        rank,
        world,
        checkpoint_every: ctx.cfg.checkpoint_every,
        chaos: ctx.chaos.as_ref(),
    };
    let outcome = run(
        ctx.model,
        job,
        &at,
        &mut state,
        coll.as_mut(),
        &mut saver,
        &rx,
        &mut hooks,
    )?;
    if let Some(end) = outcome.stopped {
        return end;
    }
    tracing::info!(rank, steps = total, skipped = %ctx.stats.summary(), "training finished");
    Ok(SessionEnd::Finished(total as u64))
}

/// The collective of this membership: NCCL on CUDA, else the TCP star.
fn connect_collective(
    ctx: &Ctx<'_>,
    view: &RegisterReply,
    control: &Arc<Control>,
) -> Result<Box<dyn Collective>> {
    let (rank, world) = (view.rank as usize, view.world_size as usize);
    let id = view.nccl_id.clone().ok_or_else(|| {
        ModelError::Coordinator("the coordinator sent a ready view without an NCCL id".into())
    })?;
    let coll: Box<dyn Collective> = match &ctx.endpoint {
        Some(ep) => Box::new(TcpStar::connect(
            ep,
            &id,
            rank,
            world,
            view.epoch,
            control.abort.clone(),
            ctx.cfg.collective_timeout,
        )?),
        None => Box::new(Nccl::connect(
            &id,
            rank,
            world,
            control.abort.clone(),
            ctx.cfg.collective_timeout,
        )?),
    };
    tracing::info!(
        rank,
        world,
        epoch = view.epoch,
        backend = coll.backend(),
        start_step = view.start_step,
        "collective ready"
    );

    Ok(coll)
}

/// Restores `state` from the checkpoint at `url`, refusing one of another
/// base model (and warning when its job flags differ).
fn restore(ctx: &Ctx<'_>, url: &str, state: &mut TrainState) -> Result<()> {
    let job = &ctx.cfg.job;
    let (manifest, loaded) = ctx.rt.block_on(load_checkpoint(url, &job.dataset.store))?;
    if manifest.model_config_hash != ctx.model_hash && !manifest.model_config_hash.is_empty() {
        return Err(ModelError::Checkpoint(format!(
            "{url} belongs to another base model: its model config hash is {}, this \
             worker's model has {}; resume with the --model the job was started with",
            manifest.model_config_hash, ctx.model_hash
        )));
    }
    if loaded.meta.job_hash != ctx.job_hash {
        tracing::warn!(
            %url,
            checkpoint_job_hash = %loaded.meta.job_hash,
            worker_job_hash = %ctx.job_hash,
            "checkpoint was written under other job flags (the job config hashes differ); \
             resuming anyway"
        );
    }
    loaded.restore(&state.adaptor, &mut state.trainer)?;
    state.cursors = Some(loaded.meta.cursors.clone());
    tracing::info!(%url, step = loaded.meta.step, written_by = manifest.world_size, "resumed from checkpoint");
    Ok(())
}

/// Rank 0's progress bar on a terminal.
fn progress_bar(total: usize, start: usize) -> indicatif::ProgressBar {
    let b = indicatif::ProgressBar::new(total as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps {msg} [{elapsed} < {eta}]",
        )
        .expect("static template"),
    );
    b.set_position(start as u64);
    b
}

/// The `--trace` file of this rank (`{rank}` in its name), opened to append.
fn open_trace(ctx: &Ctx<'_>, rank: usize) -> Result<Option<std::fs::File>> {
    Ok(match &ctx.cfg.trace {
        Some(p) => {
            let p = PathBuf::from(p.to_string_lossy().replace("{rank}", &rank.to_string()));
            Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&p)
                    .map_err(|source| ModelError::Io {
                        path: p.clone(),
                        source,
                    })?,
            )
        }
        None => None,
    })
}

/// The worker's side of the training loop: progress, the step trace, the
/// final adaptor, the step report and the coordinator's orders.
struct WorkerHooks<'c, 'a> {
    ctx: &'c Ctx<'a>,
    view: &'c RegisterReply,
    control: &'c Arc<Control>,
    bar: Option<indicatif::ProgressBar>,
    trace: Option<std::fs::File>,
    /// The previous step's ReportStep round trip (logged with the next step).
    last_report_s: f64,
    world: usize,
}

impl LoopHooks for WorkerHooks<'_, '_> {
    type Stop = Result<SessionEnd>;

    fn before_step(&mut self, _step: u64) -> Option<Result<SessionEnd>> {
        match self.control.pending() {
            None if signalled().is_some() => Some(Ok(SessionEnd::Leave)),
            None => None,
            Some(order) => Some(order.end()),
        }
    }

    fn after_step(
        &mut self,
        state: &TrainState,
        done: &StepDone<'_>,
    ) -> Result<Option<Result<SessionEnd>>> {
        let (ctx, view) = (self.ctx, self.view);
        let rank = view.rank as usize;
        let s = done.stats;
        self.control.step.store(done.step, Ordering::SeqCst);
        ctx.last_step.store(done.step, Ordering::SeqCst);
        if let Some(b) = &self.bar {
            b.set_position(done.step);
            b.set_message(format!("loss {:.4} world {}", s.loss, self.world));
        }
        if let Some(f) = self.trace.as_mut() {
            use std::io::Write;
            let line = serde_json::json!({
                "step": done.step, "rank": rank, "world": self.world, "loss": s.loss,
                "global_ids": done.batch.global_ids.iter().map(|g| g.row).collect::<Vec<_>>(),
                "ids": done.batch.examples.iter().map(|e| e.id).collect::<Vec<_>>(),
            });
            let _ = writeln!(f, "{line}");
        }
        if done.is_last && rank == 0 {
            if let Some(out) = &ctx.cfg.out {
                write_adaptor(ctx, &state.adaptor, &state.trainer, out)?;
            }
        }
        let req = ReportStepRequest {
            member_id: view.member_id,
            rank: view.rank,
            epoch: view.epoch,
            step: done.step,
            loss: s.loss,
            tokens: s.local_tokens as u64,
            seconds: done.seconds,
        };
        let reporting = Instant::now();
        let reply = call(ctx, "ReportStep", move |mut c| {
            let r = req;
            Box::pin(async move { c.report_step(r).await })
        });
        self.last_report_s = reporting.elapsed().as_secs_f64();
        Ok(match reply {
            Ok(r) => match Command::try_from(r.command) {
                Ok(Command::Stop) if done.is_last => None,
                Ok(Command::Stop) => Some(Ok(SessionEnd::Stop)),
                Ok(Command::Rebuild) => Some(Ok(SessionEnd::Rebuild)),
                _ => None,
            },
            Err(s) if s.code() == Code::NotFound => Some(Ok(SessionEnd::Rejoin)),
            Err(s) if kvd_proto::status::is_job_over(&s) => {
                (!done.is_last).then_some(Ok(SessionEnd::Stop))
            }
            Err(s) => return Err(rpc_err("rejected a step report", &s)),
        })
    }

    fn report_s(&self) -> f64 {
        self.last_report_s
    }
}

/// Checkpoints through the coordinator: each rank uploads its part of the
/// state to the store the coordinator names (off the training thread, one
/// upload in flight) and commits it; the coordinator writes the manifest
/// once every rank has.
struct CoordinatorCheckpointer<'c, 'a> {
    ctx: &'c Ctx<'a>,
    view: &'c RegisterReply,
    upload: Option<Upload>,
}

impl Checkpointer for CoordinatorCheckpointer<'_, '_> {
    fn save(&mut self, state: &TrainState, step: u64) -> Result<()> {
        self.flush()?;
        let (rank, world) = (self.view.rank as usize, self.view.world_size as usize);
        let cursors = state.cursors.clone().unwrap_or_default();
        let bytes = encode_part(
            &state.adaptor,
            &state.trainer,
            rank,
            world,
            &self.ctx.job_hash,
            &self.ctx.model_hash,
            &cursors,
        )?;
        let cursor_json = (rank == 0).then(|| serde_json::to_string(&cursors).unwrap_or_default());
        self.upload = start_upload(self.ctx, self.view, step, bytes, cursor_json);
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        match self.upload.take() {
            Some(u) => finish_upload(self.ctx, u),
            None => Ok(()),
        }
    }
}

/// Reports `step` as done without training (benchmarks), ending the job.
fn report_final(ctx: &Ctx<'_>, view: &RegisterReply, step: u64) -> Result<SessionEnd> {
    let req = ReportStepRequest {
        member_id: view.member_id,
        rank: view.rank,
        epoch: view.epoch,
        step,
        loss: 0.0,
        tokens: 0,
        seconds: 0.0,
    };
    call(ctx, "ReportStep", move |mut c| {
        let r = req;
        Box::pin(async move { c.report_step(r).await })
    })
    .map_err(|s| rpc_err("rejected a step report", &s))?;
    Ok(SessionEnd::Finished(step))
}

/// Writes this rank's part and commits it, on the runtime (off the training
/// thread). `None` when the coordinator keeps no checkpoints.
fn start_upload(
    ctx: &Ctx<'_>,
    view: &RegisterReply,
    step: u64,
    bytes: Vec<u8>,
    cursor_json: Option<String>,
) -> Option<Upload> {
    let mut client = ctx.client.clone();
    let (member_id, rank, epoch) = (view.member_id, view.rank, view.epoch);
    let store = write_options(&ctx.cfg.job.dataset.store);
    let chaos = ctx.chaos.clone();
    Some(ctx.rt.spawn(async move {
        let begin = client
            .checkpoint_begin(CheckpointBeginRequest { member_id, rank, epoch, step })
            .await;
        let begin = match begin {
            Ok(b) => b.into_inner(),
            Err(s) if kvd_proto::status::is_no_checkpoints(&s) => return Ok(()),
            Err(status) => return Err(UploadError::Rpc { call: "CheckpointBegin", status }),
        };
        let t0 = Instant::now();
        let n = bytes.len();
        if let Err(e) = put_url(&begin.part_url, bytes, &store).await {
            // A job-level event: the coordinator counts failed checkpoints.
            let reason = e.to_string();
            let told = client
                .checkpoint_failed(CheckpointFailedRequest {
                    member_id,
                    rank,
                    epoch,
                    step,
                    reason: reason.clone(),
                })
                .await;
            if let Err(s) = told {
                tracing::warn!(rank, step, error = s.message(), "cannot report the failed checkpoint to the coordinator");
            }
            return Err(UploadError::Store(reason));
        }
        if let Some(ch) = &chaos {
            ch.maybe_kill(rank as usize, step, Phase::Upload);
        }
        let reply = client
            .checkpoint_commit(CheckpointCommitRequest {
                member_id,
                rank,
                epoch,
                step,
                part_url: begin.part_url.clone(),
                data_cursor_json: cursor_json,
            })
            .await
            .map_err(|status| UploadError::Rpc { call: "CheckpointCommit", status })?
            .into_inner();
        tracing::info!(rank, step, bytes = n, seconds = t0.elapsed().as_secs_f64(), part = %begin.part_url, complete = reply.complete, "checkpoint part written");
        Ok(())
    }))
}

fn finish_upload(ctx: &Ctx<'_>, upload: Upload) -> Result<()> {
    match ctx.rt.block_on(upload) {
        Ok(Ok(())) => Ok(()),
        // A lost checkpoint is not fatal: the previous one stays the resume point.
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "checkpoint not written (the previous one stays the resume point)");
            Ok(())
        }
        Err(e) => Err(ModelError::Checkpoint(format!("upload task failed: {e}"))),
    }
}

fn write_adaptor(ctx: &Ctx<'_>, adaptor: &Adaptor, trainer: &Trainer, out: &str) -> Result<()> {
    let job = &ctx.cfg.job;
    let step = trainer.step() as u64;
    if out.contains("://") {
        let tmp = tempfile::NamedTempFile::new().map_err(|source| ModelError::Io {
            path: std::env::temp_dir(),
            source,
        })?;
        save(
            adaptor,
            &job.base_model,
            ctx.model.config(),
            step,
            tmp.path(),
        )?;
        let bytes = std::fs::read(tmp.path()).map_err(|source| ModelError::Io {
            path: tmp.path().to_path_buf(),
            source,
        })?;
        ctx.rt
            .block_on(put_url(out, bytes, &write_options(&job.dataset.store)))?;
    } else {
        crate::train_loop::save_adaptor_file(
            adaptor,
            &job.base_model,
            ctx.model.config(),
            step,
            std::path::Path::new(out),
        )?;
    }
    tracing::info!(out, step, "adaptor written");
    Ok(())
}
