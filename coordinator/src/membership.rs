//! Who is in the job: rank assignment, the NCCL rendezvous, liveness, progress
//! and checkpoints. A plain state machine (time is passed in), wrapped in a
//! mutex by the service; every error is the gRPC status the worker gets.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kvd_proto::v1::{
    CheckpointBeginReply, CheckpointCommitReply, CheckpointFailedReply, Command, DeviceKind,
    HeartbeatReply, RegisterReply, RegisterRequest, ReportStepReply,
};
use kvd_proto::{
    CheckpointManifest, CheckpointPart, MANIFEST_FORMAT_VERSION, NCCL_UNIQUE_ID_BYTES,
};
use tonic::Status;
use tracing::{info, warn};

/// The job parameters the membership enforces.
#[derive(Debug, Clone)]
pub struct JobParams {
    /// Number of ranks.
    pub world_size: u32,
    /// Last step of the job, if known.
    pub final_step: Option<u64>,
    /// Silence after which a member is dead.
    pub heartbeat_timeout: Duration,
    /// Most rebuilds after deaths (a member silent past the heartbeat
    /// timeout) before the job fails; members that leave on their own
    /// (SIGTERM: a drained node, a preempted pod) do not count.
    pub max_rebuilds: u32,
    /// Base URL of checkpoints.
    pub checkpoint_url: Option<String>,
    /// Checkpoint (manifest URL, step) a fresh job resumes from.
    pub resume: Option<(String, u64)>,
    /// Pause the job once this step's checkpoint is committed.
    pub stop_at: Option<u64>,
    /// Fail the job once this many checkpoints in a row could not be
    /// written (0: never).
    pub max_checkpoint_failures: u32,
}

/// How the job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Human-readable reason.
    pub reason: String,
    /// Whether it is a failure (non-zero exit).
    pub failed: bool,
    /// Whether a signal stopped the job before it finished (non-zero exit:
    /// an orchestrator that restarts failed coordinators resumes it).
    pub interrupted: bool,
}

#[derive(Debug)]
struct Member {
    id: u64,
    name: String,
    last_seen: Instant,
    /// Last step reported in the current epoch (the resume step after a rebuild).
    step: u64,
    /// Has been sent STOP after the job ended.
    told_stop: bool,
}

/// The configuration the first worker registered with; later ones must match.
#[derive(Debug)]
struct Reference {
    worker: String,
    model_config_hash: String,
    job_config_hash: String,
    /// The job configuration behind `job_config_hash`, when the worker sent it.
    job_config: Option<serde_json::Value>,
}

#[derive(Debug, Default)]
struct PendingCheckpoint {
    epoch: u64,
    parts: BTreeMap<u32, String>,
    data_cursor: Option<(u32, serde_json::Value)>,
}

#[derive(Debug, Default)]
struct StepTotals {
    ranks: u32,
    loss_sum: f64,
    tokens: u64,
    max_seconds: f64,
}

/// The membership of the job.
#[derive(Debug)]
pub struct Membership {
    params: JobParams,
    epoch: u64,
    slots: Vec<Option<Member>>,
    nccl_id: Option<Vec<u8>>,
    reference: Option<Reference>,
    next_member_id: u64,
    rebuilds: u32,
    /// (manifest URL, step) of the checkpoint to resume from.
    resume: Option<(String, u64)>,
    pending: BTreeMap<u64, PendingCheckpoint>,
    steps: BTreeMap<u64, StepTotals>,
    outcome: Option<Outcome>,
    /// Checkpoints that failed since the last committed one: step -> the
    /// first reason reported.
    failed_checkpoints: BTreeMap<u64, String>,
}

fn not_member(member_id: u64, rank: u32) -> Status {
    Status::not_found(format!(
        "member {member_id} (rank {rank}) is not in the job (declared dead or never \
         registered): register again"
    ))
}

fn check_nccl_id(id: &[u8]) -> Result<(), Status> {
    if id.len() != NCCL_UNIQUE_ID_BYTES {
        return Err(Status::invalid_argument(format!(
            "the NCCL unique id must be {NCCL_UNIQUE_ID_BYTES} bytes, got {}",
            id.len()
        )));
    }
    Ok(())
}

impl Membership {
    /// An empty job at epoch 0.
    pub fn new(params: JobParams) -> Self {
        let slots = (0..params.world_size).map(|_| None).collect();
        Self {
            resume: params.resume.clone(),
            params,
            epoch: 0,
            slots,
            nccl_id: None,
            reference: None,
            next_member_id: 1,
            rebuilds: 0,
            pending: BTreeMap::new(),
            steps: BTreeMap::new(),
            outcome: None,
            failed_checkpoints: BTreeMap::new(),
        }
    }

    /// The current membership epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// How the job ended, once it has.
    pub fn outcome(&self) -> Option<&Outcome> {
        self.outcome.as_ref()
    }

    /// Whether every current member has been told to stop.
    pub fn all_told_stop(&self) -> bool {
        self.slots.iter().flatten().all(|m| m.told_stop)
    }

    /// The suggested heartbeat period: a quarter of the timeout.
    pub fn heartbeat_interval(&self) -> Duration {
        (self.params.heartbeat_timeout / 4).max(Duration::from_millis(10))
    }

    fn registered(&self) -> u32 {
        self.slots.iter().flatten().count() as u32
    }

    fn start_step(&self) -> u64 {
        self.resume.as_ref().map_or(0, |r| r.1)
    }

    /// The view of `rank`'s member.
    fn view(&self, rank: u32, member_id: u64) -> RegisterReply {
        let registered = self.registered();
        RegisterReply {
            rank,
            world_size: self.params.world_size,
            epoch: self.epoch,
            member_id,
            ready: registered == self.params.world_size && self.nccl_id.is_some(),
            registered,
            nccl_id: self.nccl_id.clone(),
            resume_checkpoint_url: self.resume.as_ref().map(|r| r.0.clone()),
            start_step: self.start_step(),
            heartbeat_interval_ms: self.heartbeat_interval().as_millis() as u64,
            final_step: self.params.final_step,
        }
    }

    fn member_mut(&mut self, member_id: u64, rank: u32) -> Result<&mut Member, Status> {
        match self.slots.get_mut(rank as usize) {
            Some(Some(m)) if m.id == member_id => Ok(m),
            _ => Err(not_member(member_id, rank)),
        }
    }

    /// Ends the job because a signal stopped the coordinator (unless it
    /// already ended): not a failure of the job, but not done either.
    pub fn interrupt(&mut self, reason: impl Into<String>) {
        if self.outcome.is_none() {
            let reason = reason.into();
            warn!(%reason, "job interrupted");
            self.outcome = Some(Outcome {
                reason,
                failed: false,
                interrupted: true,
            });
        }
    }

    /// Ends the job (the first outcome wins).
    pub fn finish(&mut self, reason: impl Into<String>, failed: bool) {
        if self.outcome.is_none() {
            let reason = reason.into();
            if failed {
                warn!(%reason, "job failed");
            } else {
                info!(%reason, "job ending");
            }
            self.outcome = Some(Outcome {
                reason,
                failed,
                interrupted: false,
            });
        }
    }

    fn over(&self) -> Option<Status> {
        self.outcome
            .as_ref()
            .map(|o| kvd_proto::status::job_over(&o.reason))
    }

    /// A worker joins: checks its versions and hashes, assigns a rank.
    pub fn register(
        &mut self,
        req: RegisterRequest,
        now: Instant,
    ) -> Result<RegisterReply, Status> {
        if let Some(status) = self.over() {
            return Err(status);
        }
        let name = &req.worker_name;
        if req.protocol_version != kvd_proto::PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "worker {name:?} speaks protocol version {}, the coordinator {}",
                req.protocol_version,
                kvd_proto::PROTOCOL_VERSION
            )));
        }
        if req.model_config_hash.is_empty() || req.job_config_hash.is_empty() {
            return Err(Status::invalid_argument(
                "model_config_hash and job_config_hash must be set",
            ));
        }
        let job_config = req
            .job_config_json
            .as_deref()
            .and_then(|j| serde_json::from_str::<serde_json::Value>(j).ok());
        if let Some(r) = &self.reference {
            if req.model_config_hash != r.model_config_hash {
                return Err(Status::failed_precondition(format!(
                    "model config hash mismatch: worker {name:?} has {}, the job has {} (from \
                     the first worker, {:?}): every worker must load the same base model",
                    req.model_config_hash, r.model_config_hash, r.worker
                )));
            }
            if req.job_config_hash != r.job_config_hash {
                let keys = match (&r.job_config, &job_config) {
                    (Some(first), Some(this)) => {
                        let d = config_diff(first, this);
                        if d.is_empty() {
                            String::new()
                        } else {
                            format!("; differing keys: {}", d.join(", "))
                        }
                    }
                    _ => String::new(),
                };
                return Err(Status::failed_precondition(format!(
                    "job config hash mismatch: worker {name:?} has {}, the job has {} (from the \
                     first worker, {:?}){keys}; every worker must run with the same job flags",
                    req.job_config_hash, r.job_config_hash, r.worker
                )));
            }
        }
        if let Some(id) = &req.nccl_id {
            check_nccl_id(id)?;
        }
        match (self.params.final_step, req.final_step) {
            (Some(ours), Some(theirs)) if ours != theirs => {
                return Err(Status::failed_precondition(format!(
                    "worker {name:?} is configured for {theirs} steps, the job for {ours}"
                )))
            }
            (None, Some(theirs)) => {
                info!(
                    final_step = theirs,
                    "final step adopted from the first worker"
                );
                self.params.final_step = Some(theirs);
            }
            _ => {}
        }
        let rank = match req.requested_rank {
            Some(rank) if rank >= self.params.world_size => {
                return Err(Status::invalid_argument(format!(
                    "requested rank {rank} is out of range for world size {}",
                    self.params.world_size
                )))
            }
            Some(rank) => match &self.slots[rank as usize] {
                Some(holder) => {
                    return Err(Status::already_exists(format!(
                        "rank {rank} is already taken by worker {:?} (member {}) in epoch {}",
                        holder.name, holder.id, self.epoch
                    )))
                }
                None => rank,
            },
            None => match self.slots.iter().position(Option::is_none) {
                Some(rank) => rank as u32,
                None => {
                    return Err(Status::resource_exhausted(format!(
                        "all {} ranks of epoch {} are taken",
                        self.params.world_size, self.epoch
                    )))
                }
            },
        };
        if self.reference.is_none() {
            self.reference = Some(Reference {
                worker: req.worker_name.clone(),
                model_config_hash: req.model_config_hash.clone(),
                job_config_hash: req.job_config_hash.clone(),
                job_config,
            });
        }
        if rank == 0 {
            if let Some(id) = req.nccl_id {
                self.nccl_id = Some(id);
            }
        }
        let id = self.next_member_id;
        self.next_member_id += 1;
        self.slots[rank as usize] = Some(Member {
            id,
            name: req.worker_name.clone(),
            last_seen: now,
            step: self.start_step(),
            told_stop: false,
        });
        let reply = self.view(rank, id);
        info!(
            worker = %req.worker_name,
            host = %req.host,
            device = ?DeviceKind::try_from(req.device_kind).unwrap_or(DeviceKind::Unspecified),
            rank,
            member = id,
            epoch = self.epoch,
            registered = reply.registered,
            world_size = reply.world_size,
            "worker registered"
        );
        if reply.ready {
            info!(
                epoch = self.epoch,
                "membership complete, NCCL id known: ranks may rendezvous"
            );
        }
        Ok(reply)
    }

    /// A member's view for the rendezvous of `epoch`; rank 0 may set the NCCL id.
    pub fn rendezvous(
        &mut self,
        member_id: u64,
        rank: u32,
        epoch: u64,
        nccl_id: Option<Vec<u8>>,
        now: Instant,
    ) -> Result<RegisterReply, Status> {
        if let Some(status) = self.over() {
            return Err(status);
        }
        let current = self.epoch;
        if epoch > current {
            return Err(Status::invalid_argument(format!(
                "epoch {epoch} is in the future (the membership is at {current})"
            )));
        }
        self.member_mut(member_id, rank)?.last_seen = now;
        if let (Some(id), true) = (nccl_id, epoch == current) {
            if rank != 0 {
                return Err(Status::invalid_argument(
                    "only rank 0 hands out the NCCL unique id",
                ));
            }
            check_nccl_id(&id)?;
            match &self.nccl_id {
                Some(old) if *old != id => {
                    return Err(Status::failed_precondition(format!(
                        "the NCCL id of epoch {current} is already set to another value"
                    )))
                }
                Some(_) => {}
                None => {
                    self.nccl_id = Some(id);
                    if self.registered() == self.params.world_size {
                        info!(epoch = current, "NCCL id known, membership complete");
                    }
                }
            }
        }
        Ok(self.view(rank, member_id))
    }

    /// Liveness and the command for a member.
    pub fn heartbeat(
        &mut self,
        member_id: u64,
        rank: u32,
        epoch: u64,
        now: Instant,
    ) -> Result<HeartbeatReply, Status> {
        let world_size = self.params.world_size;
        let current = self.epoch;
        let command = self.command(member_id, rank, epoch, now)?;
        Ok(HeartbeatReply {
            command: command as i32,
            epoch: current,
            world_size,
        })
    }

    /// STOP once the job is over, REBUILD for a stale epoch, else CONTINUE;
    /// refreshes the member's liveness.
    fn command(
        &mut self,
        member_id: u64,
        rank: u32,
        epoch: u64,
        now: Instant,
    ) -> Result<Command, Status> {
        let over = self.outcome.is_some();
        let current = self.epoch;
        let member = match self.member_mut(member_id, rank) {
            Ok(m) => m,
            Err(_) if over => return Ok(Command::Stop),
            Err(e) => return Err(e),
        };
        member.last_seen = now;
        if over {
            member.told_stop = true;
            return Ok(Command::Stop);
        }
        if epoch > current {
            return Err(Status::invalid_argument(format!(
                "epoch {epoch} is in the future (the membership is at {current})"
            )));
        }
        Ok(if epoch < current {
            Command::Rebuild
        } else {
            Command::Continue
        })
    }

    /// Records a step of a member; ends the job once every rank has reached
    /// the final step.
    #[allow(clippy::too_many_arguments)]
    pub fn report_step(
        &mut self,
        member_id: u64,
        rank: u32,
        epoch: u64,
        step: u64,
        loss: f64,
        tokens: u64,
        seconds: f64,
        now: Instant,
    ) -> Result<ReportStepReply, Status> {
        let current = self.epoch;
        let command = self.command(member_id, rank, epoch, now)?;
        if command != Command::Continue {
            return Ok(ReportStepReply {
                command: command as i32,
                epoch: current,
            });
        }
        self.member_mut(member_id, rank)?.step = step;
        let totals = self.steps.entry(step).or_default();
        totals.ranks += 1;
        totals.loss_sum += loss;
        totals.tokens += tokens;
        totals.max_seconds = totals.max_seconds.max(seconds);
        if totals.ranks == self.params.world_size {
            let t = self.steps.remove(&step).unwrap_or_default();
            info!(
                step,
                loss = t.loss_sum / f64::from(t.ranks),
                tokens = t.tokens,
                tokens_per_s = t.tokens as f64 / t.max_seconds.max(1e-9),
                "step done on all ranks"
            );
            // Older steps can no longer complete (a rank skipped them).
            self.steps.retain(|s, _| *s > step);
        }
        let mut command = Command::Continue;
        if let Some(last) = self.params.final_step {
            let done = self
                .slots
                .iter()
                .all(|s| s.as_ref().is_some_and(|m| m.step >= last));
            if done {
                self.finish(
                    format!(
                        "all {} workers reported the final step {last}",
                        self.params.world_size
                    ),
                    false,
                );
                // Every rank has finished its last step: none needs telling.
                for m in self.slots.iter_mut().flatten() {
                    m.told_stop = true;
                }
                command = Command::Stop;
            }
        }
        Ok(ReportStepReply {
            command: command as i32,
            epoch: current,
        })
    }

    fn checkpoint_member(
        &mut self,
        member_id: u64,
        rank: u32,
        epoch: u64,
        now: Instant,
    ) -> Result<String, Status> {
        if let Some(status) = self.over() {
            return Err(status);
        }
        let current = self.epoch;
        self.member_mut(member_id, rank)?.last_seen = now;
        if epoch != current {
            return Err(Status::failed_precondition(format!(
                "stale epoch {epoch}: the membership is at epoch {current}; rebuild first"
            )));
        }
        self.params
            .checkpoint_url
            .clone()
            .ok_or_else(kvd_proto::status::no_checkpoints)
    }

    fn checkpoint_urls(&self, base: &str, step: u64, rank: u32) -> (String, String) {
        let dir = format!("{base}/step-{step:08}");
        (
            format!(
                "{dir}/rank-{rank:05}-of-{:05}.safetensors",
                self.params.world_size
            ),
            format!("{dir}/manifest.json"),
        )
    }

    /// Where `rank` writes its part of the checkpoint of `step`.
    pub fn checkpoint_begin(
        &mut self,
        member_id: u64,
        rank: u32,
        epoch: u64,
        step: u64,
        now: Instant,
    ) -> Result<CheckpointBeginReply, Status> {
        let base = self.checkpoint_member(member_id, rank, epoch, now)?;
        let (part_url, manifest_url) = self.checkpoint_urls(&base, step, rank);
        let pending = self.pending.entry(step).or_default();
        if pending.epoch != epoch {
            *pending = PendingCheckpoint {
                epoch,
                ..Default::default()
            };
        }
        Ok(CheckpointBeginReply {
            part_url,
            manifest_url,
        })
    }

    /// `rank`'s part of `step` is written; the last one completes the checkpoint.
    #[allow(clippy::too_many_arguments)]
    pub fn checkpoint_commit(
        &mut self,
        member_id: u64,
        rank: u32,
        epoch: u64,
        step: u64,
        part_url: String,
        data_cursor_json: Option<String>,
        now: Instant,
    ) -> Result<CheckpointCommitReply, Status> {
        let base = self.checkpoint_member(member_id, rank, epoch, now)?;
        if part_url.is_empty() {
            return Err(Status::invalid_argument("part_url is empty"));
        }
        let cursor = data_cursor_json
            .map(|text| {
                serde_json::from_str::<serde_json::Value>(&text).map_err(|e| {
                    Status::invalid_argument(format!("data_cursor_json is not JSON: {e}"))
                })
            })
            .transpose()?;
        let (_, manifest_url) = self.checkpoint_urls(&base, step, rank);
        let world_size = self.params.world_size;
        let pending = self.pending.entry(step).or_default();
        if pending.epoch != epoch {
            *pending = PendingCheckpoint {
                epoch,
                ..Default::default()
            };
        }
        pending.parts.insert(rank, part_url);
        if let Some(cursor) = cursor {
            // Rank 0's cursor wins; the cursor is global.
            if pending.data_cursor.as_ref().is_none_or(|(r, _)| rank <= *r) {
                pending.data_cursor = Some((rank, cursor));
            }
        }
        if pending.parts.len() < world_size as usize {
            return Ok(CheckpointCommitReply {
                complete: false,
                manifest_url,
                manifest_json: None,
            });
        }
        let pending = self.pending.remove(&step).unwrap_or_default();
        self.pending.retain(|s, _| *s > step);
        let reference = self.reference.as_ref();
        let manifest = CheckpointManifest {
            format_version: MANIFEST_FORMAT_VERSION,
            step,
            world_size,
            parts: pending
                .parts
                .into_iter()
                .map(|(rank, url)| CheckpointPart::relative(rank, &url, &manifest_url))
                .collect(),
            data_cursor: pending.data_cursor.map(|(_, c)| c),
            config_hash: reference.map_or_else(String::new, |r| r.job_config_hash.clone()),
            model_config_hash: reference.map_or_else(String::new, |r| r.model_config_hash.clone()),
            created_unix_s: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        info!(step, %manifest_url, "all ranks wrote their parts; writing the manifest");
        Ok(CheckpointCommitReply {
            complete: true,
            manifest_url,
            manifest_json: Some(manifest.to_json()),
        })
    }

    /// The manifest of `step`, taken in `epoch`, is written: it becomes the
    /// resume point, unless the membership moved on meanwhile (the ranks of
    /// the new epoch already resume from the previous one; the checkpoint is
    /// still valid for a later restart).
    pub fn committed(&mut self, manifest_url: String, step: u64, epoch: u64) {
        if epoch != self.epoch {
            warn!(
                step,
                epoch,
                current = self.epoch,
                "checkpoint committed after a rebuild: not the resume point of this epoch"
            );
            return;
        }
        info!(step, %manifest_url, "checkpoint committed: new resume point");
        self.failed_checkpoints.retain(|s, _| *s > step);
        if self.resume.as_ref().is_none_or(|r| r.1 <= step) {
            self.resume = Some((manifest_url, step));
        }
        if let Some(at) = self.params.stop_at {
            if step >= at {
                self.finish(
                    format!(
                        "paused at step {step} as asked (stop_at = {at}); continue with --resume"
                    ),
                    false,
                );
            }
        }
    }

    /// Declares members silent for longer than the timeout dead. When any is,
    /// bumps the epoch (the survivors are told to rebuild), forgets the NCCL id
    /// and rewinds progress to the resume checkpoint. Returns whether it did.
    pub fn reap(&mut self, now: Instant) -> bool {
        if self.outcome.is_some() {
            return false;
        }
        let timeout = self.params.heartbeat_timeout;
        let mut dead = Vec::new();
        for (rank, slot) in self.slots.iter_mut().enumerate() {
            if let Some(m) = slot {
                let silent = now.saturating_duration_since(m.last_seen);
                if silent > timeout {
                    warn!(
                        rank,
                        worker = %m.name,
                        member = m.id,
                        silent_s = silent.as_secs_f64(),
                        "worker missed its heartbeats: declared dead"
                    );
                    dead.push(rank);
                    *slot = None;
                }
            }
        }
        if dead.is_empty() {
            return false;
        }
        self.bump_epoch(&dead, true);
        true
    }

    /// A member leaves the job on its own (e.g. SIGTERM): its rank is freed
    /// at once and the survivors rebuild, as for a death but without waiting
    /// for the heartbeat timeout.
    pub fn leave(&mut self, member_id: u64, rank: u32, reason: &str) -> Result<(), Status> {
        if self.outcome.is_some() {
            // The job is over: nothing to rebuild.
            if let Some(slot) = self.slots.get_mut(rank as usize) {
                if slot.as_ref().is_some_and(|m| m.id == member_id) {
                    *slot = None;
                }
            }
            return Ok(());
        }
        let m = self.member_mut(member_id, rank)?;
        warn!(
            rank,
            worker = %m.name,
            member = member_id,
            %reason,
            "worker left the job: its rank is free"
        );
        self.slots[rank as usize] = None;
        self.bump_epoch(&[rank as usize], false);
        Ok(())
    }

    /// `rank` could not write its part of the checkpoint of `step`: logged,
    /// and counted; the job fails after `max_checkpoint_failures` failed
    /// checkpoints in a row (several ranks failing one step count once).
    pub fn checkpoint_failed(
        &mut self,
        member_id: u64,
        rank: u32,
        step: u64,
        reason: &str,
        now: Instant,
    ) -> Result<CheckpointFailedReply, Status> {
        if self.outcome.is_some() {
            return Ok(CheckpointFailedReply {
                command: Command::Stop as i32,
            });
        }
        self.member_mut(member_id, rank)?.last_seen = now;
        self.record_checkpoint_failure(step, &format!("rank {rank}: {reason}"));
        let command = if self.outcome.is_some() {
            Command::Stop
        } else {
            Command::Continue
        };
        Ok(CheckpointFailedReply {
            command: command as i32,
        })
    }

    /// Counts a failed checkpoint of `step` (a part or the manifest could not
    /// be written); fails the job after `max_checkpoint_failures` in a row.
    pub fn record_checkpoint_failure(&mut self, step: u64, reason: &str) {
        if self.outcome.is_some() {
            return;
        }
        if step <= self.start_step() {
            // A late report about a step older than the resume point.
            warn!(step, %reason, "checkpoint failed, but a later one is committed already");
            return;
        }
        let max = self.params.max_checkpoint_failures;
        let first_of_step = !self.failed_checkpoints.contains_key(&step);
        self.failed_checkpoints
            .entry(step)
            .or_insert_with(|| reason.to_string());
        let in_a_row = self.failed_checkpoints.len() as u32;
        warn!(
            step,
            %reason,
            failed_in_a_row = in_a_row,
            max_checkpoint_failures = max,
            "checkpoint failed (the previous committed one stays the resume point)"
        );
        if first_of_step && max > 0 && in_a_row >= max {
            let steps: Vec<u64> = self.failed_checkpoints.keys().copied().collect();
            self.finish(
                format!(
                    "{in_a_row} checkpoints in a row could not be written (steps {steps:?}; \
                     max_checkpoint_failures = {max}); last: step {step}, {reason}"
                ),
                true,
            );
        }
    }

    /// A new membership epoch without the ranks `dead`; `counts`: a
    /// rebuild after deaths, which counts toward `max_rebuilds`.
    fn bump_epoch(&mut self, dead: &[usize], counts: bool) {
        self.epoch += 1;
        if counts {
            self.rebuilds += 1;
        }
        self.nccl_id = None;
        self.pending.clear();
        self.steps.clear();
        let start = self.start_step();
        for m in self.slots.iter_mut().flatten() {
            m.step = start;
        }
        warn!(
            epoch = self.epoch,
            dead_ranks = ?dead,
            survivors = self.registered(),
            resume_step = start,
            "membership epoch bumped: survivors rebuild, waiting for {} workers again",
            self.params.world_size
        );
        if self.rebuilds > self.params.max_rebuilds {
            self.finish(
                format!(
                    "the membership was rebuilt {} times (max_rebuilds = {})",
                    self.rebuilds, self.params.max_rebuilds
                ),
                true,
            );
        }
    }
}

/// The leaves of `first` and `this` that differ, as `path (first X, this Y)`
/// (values under a `store` key, which may hold credentials, are not shown);
/// at most 8.
pub fn config_diff(first: &serde_json::Value, this: &serde_json::Value) -> Vec<String> {
    fn flatten(v: &serde_json::Value, path: String, out: &mut BTreeMap<String, String>) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    flatten(v, p, out);
                }
            }
            other => {
                out.insert(path, other.to_string());
            }
        }
    }
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    flatten(first, String::new(), &mut a);
    flatten(this, String::new(), &mut b);
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let mut out = Vec::new();
    for k in keys {
        let (x, y) = (a.get(k), b.get(k));
        if x == y {
            continue;
        }
        let secret = k.split('.').any(|p| p == "store");
        let show = |v: Option<&String>| match v {
            None => "unset".to_string(),
            Some(_) if secret => "(not shown)".to_string(),
            Some(v) => v.clone(),
        };
        out.push(format!("{k} (first {}, this {})", show(x), show(y)));
    }
    if out.len() > 8 {
        let more = out.len() - 8;
        out.truncate(8);
        out.push(format!("and {more} more"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(world_size: u32) -> JobParams {
        JobParams {
            world_size,
            final_step: Some(2),
            heartbeat_timeout: Duration::from_secs(1),
            max_rebuilds: 1,
            checkpoint_url: Some("file:///ckpt".into()),
            stop_at: None,
            resume: None,
            max_checkpoint_failures: 2,
        }
    }

    fn req(name: &str, rank: Option<u32>, nccl: Option<u8>) -> RegisterRequest {
        RegisterRequest {
            worker_name: name.into(),
            host: "localhost".into(),
            device_kind: DeviceKind::Cpu as i32,
            model_config_hash: "m".into(),
            job_config_hash: "j".into(),
            protocol_version: kvd_proto::PROTOCOL_VERSION,
            requested_rank: rank,
            nccl_id: nccl.map(|b| vec![b; NCCL_UNIQUE_ID_BYTES]),
            final_step: None,
            job_config_json: None,
        }
    }

    #[test]
    fn ready_needs_all_ranks_and_the_nccl_id() {
        let t = Instant::now();
        let mut m = Membership::new(params(2));
        let r1 = m.register(req("b", Some(1), None), t).unwrap();
        assert_eq!((r1.rank, r1.ready, r1.nccl_id.clone()), (1, false, None));
        let r0 = m.register(req("a", None, None), t).unwrap();
        assert_eq!((r0.rank, r0.ready), (0, false));
        // Only rank 0 may set it, and only with the right size.
        let err = m
            .rendezvous(r1.member_id, 1, 0, Some(vec![1; 128]), t)
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        let err = m
            .rendezvous(r0.member_id, 0, 0, Some(vec![1; 5]), t)
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        let v = m
            .rendezvous(r0.member_id, 0, 0, Some(vec![1; 128]), t)
            .unwrap();
        assert!(v.ready);
        let v = m.rendezvous(r1.member_id, 1, 0, None, t).unwrap();
        assert_eq!(v.nccl_id, Some(vec![1; 128]));
        let err = m
            .rendezvous(r0.member_id, 0, 0, Some(vec![2; 128]), t)
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        let err = m.register(req("c", None, None), t).unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    }

    #[test]
    fn death_bumps_epoch_and_rewinds_to_checkpoint() {
        let t = Instant::now();
        let mut m = Membership::new(params(2));
        let a = m.register(req("a", None, Some(7)), t).unwrap();
        let b = m.register(req("b", None, None), t).unwrap();
        for (r, id) in [(0, a.member_id), (1, b.member_id)] {
            m.checkpoint_begin(id, r, 0, 1, t).unwrap();
            let c = m
                .checkpoint_commit(id, r, 0, 1, format!("p{r}"), None, t)
                .unwrap();
            assert_eq!(c.complete, r == 1);
            if c.complete {
                m.committed(c.manifest_url.clone(), 1, 0);
            }
        }
        let t1 = t + Duration::from_millis(900);
        m.heartbeat(a.member_id, 0, 0, t1).unwrap();
        assert!(!m.reap(t1));
        let t2 = t + Duration::from_millis(1500);
        assert!(m.reap(t2)); // b silent for 1.5 s
        assert_eq!(m.epoch(), 1);
        let hb = m.heartbeat(a.member_id, 0, 0, t2).unwrap();
        assert_eq!((hb.command, hb.epoch), (Command::Rebuild as i32, 1));
        let err = m.heartbeat(b.member_id, 1, 0, t2).unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound);
        let c = m.register(req("c", None, None), t2).unwrap();
        assert_eq!((c.rank, c.epoch, c.ready, c.start_step), (1, 1, false, 1));
        assert_eq!(
            c.resume_checkpoint_url.as_deref(),
            Some("file:///ckpt/step-00000001/manifest.json")
        );
        // A second death exceeds max_rebuilds = 1.
        assert!(m.reap(t2 + Duration::from_secs(2)));
        assert!(m.outcome().unwrap().failed);
    }

    #[test]
    fn final_step_on_all_ranks_ends_the_job() {
        let t = Instant::now();
        let mut m = Membership::new(params(2));
        let a = m.register(req("a", None, Some(7)), t).unwrap();
        let b = m.register(req("b", None, None), t).unwrap();
        let step = |m: &mut Membership, id, r, s| {
            m.report_step(id, r, 0, s, 1.0, 10, 0.1, t).unwrap().command
        };
        assert_eq!(step(&mut m, a.member_id, 0, 1), Command::Continue as i32);
        assert_eq!(step(&mut m, b.member_id, 1, 1), Command::Continue as i32);
        assert_eq!(step(&mut m, a.member_id, 0, 2), Command::Continue as i32);
        assert!(m.outcome().is_none());
        assert_eq!(step(&mut m, b.member_id, 1, 2), Command::Stop as i32);
        assert!(!m.outcome().unwrap().failed);
        // Every rank finished: nobody waits for a STOP, the coordinator may exit.
        assert!(m.all_told_stop());
        let hb = m.heartbeat(a.member_id, 0, 0, t).unwrap();
        assert_eq!(hb.command, Command::Stop as i32);
    }

    #[test]
    fn failed_checkpoints_in_a_row_fail_the_job_and_a_commit_resets_the_count() {
        let t = Instant::now();
        let mut m = Membership::new(params(2));
        let a = m.register(req("a", None, Some(7)), t).unwrap();
        let b = m.register(req("b", None, None), t).unwrap();
        // Two ranks failing one step count once.
        m.checkpoint_failed(a.member_id, 0, 2, "disk full", t)
            .unwrap();
        m.checkpoint_failed(b.member_id, 1, 2, "disk full", t)
            .unwrap();
        assert!(m.outcome().is_none());
        // A commit resets the count.
        for (r, id) in [(0, a.member_id), (1, b.member_id)] {
            m.checkpoint_begin(id, r, 0, 4, t).unwrap();
            let c = m
                .checkpoint_commit(id, r, 0, 4, format!("p{r}"), None, t)
                .unwrap();
            if c.complete {
                m.committed(c.manifest_url, 4, 0);
            }
        }
        // A late report about an older step does not count.
        m.checkpoint_failed(a.member_id, 0, 2, "late", t).unwrap();
        let r = m
            .checkpoint_failed(a.member_id, 0, 6, "disk full", t)
            .unwrap();
        assert_eq!(r.command, Command::Continue as i32);
        assert!(m.outcome().is_none());
        let r = m
            .checkpoint_failed(b.member_id, 1, 8, "bucket gone", t)
            .unwrap();
        assert_eq!(r.command, Command::Stop as i32);
        let o = m.outcome().unwrap();
        assert!(o.failed);
        assert!(
            o.reason.contains("2 checkpoints in a row")
                && o.reason.contains("[6, 8]")
                && o.reason.contains("rank 1: bucket gone"),
            "{}",
            o.reason
        );
    }

    #[test]
    fn no_limit_never_fails_the_job_for_checkpoints() {
        let t = Instant::now();
        let mut m = Membership::new(JobParams {
            max_checkpoint_failures: 0,
            ..params(1)
        });
        let a = m.register(req("a", None, Some(7)), t).unwrap();
        for step in 1..20 {
            m.checkpoint_failed(a.member_id, 0, step, "x", t).unwrap();
        }
        assert!(m.outcome().is_none());
    }

    #[test]
    fn a_member_that_leaves_frees_its_rank_at_once() {
        let t = Instant::now();
        let mut m = Membership::new(params(2));
        let a = m.register(req("a", None, Some(7)), t).unwrap();
        let b = m.register(req("b", Some(1), None), t).unwrap();
        let err = m.register(req("b2", Some(1), None), t).unwrap_err();
        assert_eq!(err.code(), tonic::Code::AlreadyExists);
        m.leave(b.member_id, 1, "SIGTERM").unwrap();
        assert_eq!(m.epoch(), 1);
        let hb = m.heartbeat(a.member_id, 0, 0, t).unwrap();
        assert_eq!(hb.command, Command::Rebuild as i32);
        let c = m.register(req("b2", Some(1), None), t).unwrap();
        assert_eq!((c.rank, c.epoch), (1, 1));
        // Leaving does not count toward max_rebuilds = 1: two more leaves
        // and the job still runs; a death after them is the first rebuild.
        m.leave(c.member_id, 1, "SIGTERM").unwrap();
        let d = m.register(req("b3", Some(1), None), t).unwrap();
        m.leave(d.member_id, 1, "SIGTERM").unwrap();
        assert_eq!(m.epoch(), 3);
        assert!(m.outcome().is_none(), "leaves do not fail the job");
        let e = m.register(req("b4", Some(1), None), t).unwrap();
        let t1 = t + Duration::from_millis(1500);
        m.heartbeat(e.member_id, 1, 0, t1).unwrap();
        assert!(m.reap(t1)); // a, silent for 1.5 s
        assert!(
            m.outcome().is_none(),
            "one death is within max_rebuilds = 1"
        );
        let f = m.register(req("a2", Some(0), None), t1).unwrap();
        m.heartbeat(f.member_id, 0, 0, t1 + Duration::from_millis(1400))
            .unwrap();
        assert!(m.reap(t1 + Duration::from_millis(1600))); // b4 silent
        assert!(m.outcome().unwrap().failed, "a second death exceeds it");
    }

    #[test]
    fn a_job_config_mismatch_names_the_differing_keys() {
        let t = Instant::now();
        let mut m = Membership::new(params(2));
        let with = |name: &str, hash: &str, json: &str| RegisterRequest {
            job_config_hash: hash.into(),
            job_config_json: Some(json.into()),
            ..req(name, None, None)
        };
        m.register(
            with(
                "a",
                "h1",
                r#"{"distill":{"lora":{"rank":8}},"dataset":{"store":{"secret":"s1"}},"seed":3}"#,
            ),
            t,
        )
        .unwrap();
        let err = m
            .register(
                with(
                    "b",
                    "h2",
                    r#"{"distill":{"lora":{"rank":4}},"dataset":{"store":{"secret":"s2"}},"seed":3}"#,
                ),
                t,
            )
            .unwrap_err();
        let msg = err.message();
        assert!(msg.contains("job config hash mismatch"), "{msg}");
        assert!(msg.contains("distill.lora.rank (first 8, this 4)"), "{msg}");
        assert!(msg.contains("dataset.store.secret"), "{msg}");
        assert!(!msg.contains("s1") && !msg.contains("s2"), "{msg}");
        assert!(!msg.contains("seed"), "{msg}");
        assert!(msg.contains("same job flags"), "{msg}");
    }
}
