//! The `kvd.v1.Coordinator` gRPC service over the shared [`Membership`].

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvd_proto::v1::coordinator_server::Coordinator;
use kvd_proto::v1::{
    CheckpointBeginReply, CheckpointBeginRequest, CheckpointCommitReply, CheckpointCommitRequest,
    CheckpointFailedReply, CheckpointFailedRequest, HeartbeatReply, HeartbeatRequest, LeaveReply,
    LeaveRequest, RegisterReply, RegisterRequest, RendezvousRequest, ReportStepReply,
    ReportStepRequest, ShutdownReply, ShutdownRequest,
};
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::{debug, warn};

use crate::checkpoints::Checkpoints;
use crate::membership::Membership;

/// The membership behind a mutex, plus a change counter that wakes
/// rendezvous waiters and the supervisor.
#[derive(Clone)]
pub struct Shared {
    membership: Arc<Mutex<Membership>>,
    changed: watch::Sender<u64>,
}

impl Shared {
    /// Shares `membership`.
    pub fn new(membership: Membership) -> Self {
        Self {
            membership: Arc::new(Mutex::new(membership)),
            changed: watch::Sender::new(0),
        }
    }

    /// Runs `f` on the membership without waking anyone.
    pub fn read<R>(&self, f: impl FnOnce(&mut Membership) -> R) -> R {
        let mut guard = self
            .membership
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut guard)
    }

    /// Runs `f` on the membership and wakes the waiters.
    pub fn update<R>(&self, f: impl FnOnce(&mut Membership) -> R) -> R {
        let result = self.read(f);
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
        result
    }

    /// A receiver that sees every [`Shared::update`].
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

/// The gRPC service.
pub struct CoordinatorService {
    shared: Shared,
    max_wait: Duration,
    checkpoints: Option<Checkpoints>,
    keep_last: u32,
    /// Steps whose committed checkpoint was found broken at the start: their
    /// manifest is replaced when the step is checkpointed again.
    broken: Vec<u64>,
    /// The last Register rejection logged at WARN: a worker waiting for its
    /// rank retries twice a second, and each retry is not worth a warning.
    last_rejection: Mutex<Option<String>>,
}

impl CoordinatorService {
    /// Serves `shared`; a Rendezvous waits at most `max_wait`. Manifests go to
    /// `checkpoints`, which keeps the newest `keep_last`; the manifests of the
    /// `broken` steps (not intact at the start) are replaced, not kept.
    pub fn new(
        shared: Shared,
        max_wait: Duration,
        checkpoints: Option<Checkpoints>,
        keep_last: u32,
        broken: Vec<u64>,
    ) -> Self {
        Self {
            shared,
            max_wait,
            checkpoints,
            keep_last,
            broken,
            last_rejection: Mutex::new(None),
        }
    }

    /// [`logged`] for Register: a rejection repeated by a waiting worker (its
    /// rank still taken) is logged at WARN once, then at DEBUG.
    fn logged_register(
        &self,
        result: Result<RegisterReply, Status>,
    ) -> Result<Response<RegisterReply>, Status> {
        let mut last = self
            .last_rejection
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match result {
            Ok(reply) => {
                *last = None;
                Ok(Response::new(reply))
            }
            Err(status) => {
                if last.as_deref() == Some(status.message()) {
                    debug!(rpc = "Register", code = ?status.code(), message = status.message(), "request rejected again");
                } else {
                    warn!(rpc = "Register", code = ?status.code(), message = status.message(), "request rejected");
                    *last = Some(status.message().to_string());
                }
                Err(status)
            }
        }
    }
}

fn logged<T>(what: &str, result: Result<T, Status>) -> Result<Response<T>, Status> {
    match result {
        Ok(reply) => Ok(Response::new(reply)),
        Err(status) => {
            warn!(rpc = what, code = ?status.code(), message = status.message(), "request rejected");
            Err(status)
        }
    }
}

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterReply>, Status> {
        let peer = request.remote_addr();
        debug!(?peer, "register");
        let req = request.into_inner();
        self.logged_register(self.shared.update(|m| m.register(req, Instant::now())))
    }

    async fn rendezvous(
        &self,
        request: Request<RendezvousRequest>,
    ) -> Result<Response<RegisterReply>, Status> {
        let req = request.into_inner();
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(req.wait_ms).min(self.max_wait);
        let mut changes = self.shared.subscribe();
        let mut nccl_id = req.nccl_id;
        loop {
            changes.borrow_and_update();
            let sets_id = nccl_id.is_some();
            let id = nccl_id.take();
            let call = |m: &mut Membership| {
                m.rendezvous(req.member_id, req.rank, req.epoch, id, Instant::now())
            };
            // Setting the NCCL id wakes the other waiters (and this one, once).
            let view = if sets_id {
                self.shared.update(call)
            } else {
                self.shared.read(call)
            };
            let view = match view {
                Ok(view) => view,
                Err(status) => return logged("Rendezvous", Err(status)),
            };
            if view.ready || view.epoch != req.epoch {
                return Ok(Response::new(view));
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => continue,
                _ => return Ok(Response::new(view)),
            }
        }
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        let r = request.into_inner();
        logged(
            "Heartbeat",
            self.shared
                .read(|m| m.heartbeat(r.member_id, r.rank, r.epoch, Instant::now())),
        )
    }

    async fn report_step(
        &self,
        request: Request<ReportStepRequest>,
    ) -> Result<Response<ReportStepReply>, Status> {
        let r = request.into_inner();
        logged(
            "ReportStep",
            self.shared.update(|m| {
                m.report_step(
                    r.member_id,
                    r.rank,
                    r.epoch,
                    r.step,
                    r.loss,
                    r.tokens,
                    r.seconds,
                    Instant::now(),
                )
            }),
        )
    }

    async fn checkpoint_begin(
        &self,
        request: Request<CheckpointBeginRequest>,
    ) -> Result<Response<CheckpointBeginReply>, Status> {
        let r = request.into_inner();
        logged(
            "CheckpointBegin",
            self.shared.update(|m| {
                m.checkpoint_begin(r.member_id, r.rank, r.epoch, r.step, Instant::now())
            }),
        )
    }

    async fn checkpoint_commit(
        &self,
        request: Request<CheckpointCommitRequest>,
    ) -> Result<Response<CheckpointCommitReply>, Status> {
        let r = request.into_inner();
        let (epoch, step) = (r.epoch, r.step);
        let reply = self.shared.update(|m| {
            m.checkpoint_commit(
                r.member_id,
                r.rank,
                r.epoch,
                r.step,
                r.part_url,
                r.data_cursor_json,
                Instant::now(),
            )
        });
        let reply = match reply {
            Ok(reply) if reply.complete => reply,
            other => return logged("CheckpointCommit", other),
        };
        let Some(store) = &self.checkpoints else {
            return logged(
                "CheckpointCommit",
                Err(Status::failed_precondition("no checkpoint store")),
            );
        };
        let json = reply.manifest_json.clone().unwrap_or_default();
        match store.commit(step, &json, self.broken.contains(&step)).await {
            Ok(true) => {}
            Ok(false) => warn!(
                step,
                url = %reply.manifest_url,
                "a manifest for this step exists already: kept (checkpoints are deterministic)"
            ),
            Err(e) => {
                let reason = format!("{e:#}");
                self.shared.update(|m| {
                    m.record_checkpoint_failure(
                        step,
                        &format!("the coordinator cannot write the manifest: {reason}"),
                    )
                });
                return logged("CheckpointCommit", Err(Status::unavailable(reason)));
            }
        }
        self.shared
            .update(|m| m.committed(reply.manifest_url.clone(), step, epoch));
        let (store, keep) = (store.clone(), self.keep_last);
        tokio::spawn(async move {
            if let Err(e) = store.retain(keep).await {
                warn!(error = %format!("{e:#}"), "checkpoint retention failed");
            }
        });
        Ok(Response::new(reply))
    }

    async fn checkpoint_failed(
        &self,
        request: Request<CheckpointFailedRequest>,
    ) -> Result<Response<CheckpointFailedReply>, Status> {
        let r = request.into_inner();
        logged(
            "CheckpointFailed",
            self.shared.update(|m| {
                m.checkpoint_failed(r.member_id, r.rank, r.step, &r.reason, Instant::now())
            }),
        )
    }

    async fn leave(&self, request: Request<LeaveRequest>) -> Result<Response<LeaveReply>, Status> {
        let r = request.into_inner();
        let reason = if r.reason.is_empty() {
            "no reason given".to_string()
        } else {
            r.reason
        };
        logged(
            "Leave",
            self.shared
                .update(|m| m.leave(r.member_id, r.rank, &reason))
                .map(|()| LeaveReply {}),
        )
    }

    async fn shutdown(
        &self,
        request: Request<ShutdownRequest>,
    ) -> Result<Response<ShutdownReply>, Status> {
        let r = request.into_inner();
        let who = r
            .rank
            .map_or("a client".to_string(), |rank| format!("rank {rank}"));
        let reason = if r.reason.is_empty() {
            "no reason given".to_string()
        } else {
            r.reason
        };
        self.shared
            .update(|m| m.finish(format!("shutdown requested by {who}: {reason}"), r.failed));
        Ok(Response::new(ShutdownReply {}))
    }
}
