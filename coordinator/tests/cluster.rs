//! Starts the real `coordinator` binary on a free port and drives it with the
//! generated gRPC client, playing the workers from this process.

use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvd_proto::auth::BearerToken;
use kvd_proto::client::{connect, Client};
use kvd_proto::v1::coordinator_client::CoordinatorClient;
use kvd_proto::v1::{
    CheckpointBeginRequest, CheckpointCommitRequest, Command as Cmd, DeviceKind, HeartbeatRequest,
    RegisterReply, RegisterRequest, RendezvousRequest, ReportStepRequest, ShutdownRequest,
};
use kvd_proto::{CheckpointManifest, MAX_MESSAGE_BYTES, NCCL_UNIQUE_ID_BYTES, PROTOCOL_VERSION};
use tonic::Code;

const TOKEN: &str = "test-token-5f2a9c";

/// A running coordinator; killed on drop.
struct Coordinator {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Coordinator {
    /// Starts it with KVD_TOKEN set.
    fn start(args: &[&str]) -> Self {
        Self::start_with(args, &[("KVD_TOKEN", TOKEN)])
    }

    fn start_with(args: &[&str], env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port_file = dir.path().join("port");
        let log = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_coordinator"));
        cmd.args(["--listen", "127.0.0.1:0", "--bind-port-file"])
            .arg(&port_file)
            .args(args)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        for (key, _) in std::env::vars() {
            if key.starts_with("KVD_") || key == "RUST_LOG" {
                cmd.env_remove(key);
            }
        }
        cmd.envs(env.iter().copied());
        let mut child = cmd.spawn().expect("start the coordinator");
        let deadline = Instant::now() + Duration::from_secs(60);
        let port = loop {
            if let Ok(text) = std::fs::read_to_string(&port_file) {
                break text.trim().parse().expect("a port number");
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "the coordinator exited early ({status}):\n{}",
                    std::fs::read_to_string(dir.path().join("stderr.log")).unwrap()
                );
            }
            assert!(Instant::now() < deadline, "no port file after 60 s");
            std::thread::sleep(Duration::from_millis(20));
        };
        Self { child, port, dir }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    async fn client(&self) -> Client {
        connect(&self.addr(), TOKEN).await.expect("connect")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap()
    }

    /// Waits for the process to exit.
    async fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the coordinator did not exit within {timeout:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nccl_id(seed: u8) -> Vec<u8> {
    (0..NCCL_UNIQUE_ID_BYTES)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn worker(name: &str) -> RegisterRequest {
    RegisterRequest {
        worker_name: name.into(),
        host: "localhost".into(),
        device_kind: DeviceKind::Cpu as i32,
        model_config_hash: "model-hash-aaa".into(),
        job_config_hash: "job-hash-111".into(),
        protocol_version: PROTOCOL_VERSION,
        requested_rank: None,
        nccl_id: None,
        final_step: None,
        job_config_json: None,
    }
}

async fn register(client: &mut Client, req: RegisterRequest) -> RegisterReply {
    client.register(req).await.expect("register").into_inner()
}

async fn heartbeat(
    client: &mut Client,
    r: &RegisterReply,
    epoch: u64,
) -> tonic::Result<(i32, u64)> {
    let reply = client
        .heartbeat(HeartbeatRequest {
            member_id: r.member_id,
            rank: r.rank,
            epoch,
            step: 0,
        })
        .await?
        .into_inner();
    Ok((reply.command, reply.epoch))
}

async fn rendezvous(
    client: &mut Client,
    r: &RegisterReply,
    epoch: u64,
    nccl: Option<Vec<u8>>,
    wait_ms: u64,
) -> RegisterReply {
    client
        .rendezvous(RendezvousRequest {
            member_id: r.member_id,
            rank: r.rank,
            epoch,
            nccl_id: nccl,
            wait_ms,
        })
        .await
        .expect("rendezvous")
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_get_distinct_ranks_and_rank0_nccl_id() {
    let coord = Coordinator::start(&["--workers", "3"]);
    let mut c = coord.client().await;
    let id = nccl_id(1);

    let r0 = register(
        &mut c,
        RegisterRequest {
            nccl_id: Some(id.clone()),
            ..worker("w0")
        },
    )
    .await;
    let r1 = register(&mut c, worker("w1")).await;
    let r2 = register(&mut c, worker("w2")).await;
    assert_eq!([r0.rank, r1.rank, r2.rank], [0, 1, 2]);
    for r in [&r0, &r1, &r2] {
        assert_eq!((r.world_size, r.epoch), (3, 0));
        assert_eq!(r.nccl_id.as_ref(), Some(&id), "rank {}", r.rank);
        assert!(r.heartbeat_interval_ms > 0);
    }
    assert_eq!([r0.ready, r1.ready, r2.ready], [false, false, true]);
    assert_eq!(r2.registered, 3);
    let ids = [r0.member_id, r1.member_id, r2.member_id];
    assert!(ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2]);

    // The earlier ones learn readiness through Rendezvous.
    let v = rendezvous(&mut c, &r0, 0, None, 1000).await;
    assert!(v.ready);
    assert_eq!(v.nccl_id, Some(id));

    let err = c.register(worker("w3")).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");

    let log = coord.log();
    assert!(log.contains("resolved configuration"), "{log}");
    assert!(log.contains("<redacted>"), "{log}");
    assert!(
        !log.contains(TOKEN),
        "the token leaked into the log:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranks_above_zero_wait_for_rank0_nccl_id() {
    // A long heartbeat timeout allows a long poll (half of it), so "woken early"
    // is far from "timed out" even on a loaded machine.
    let coord = Coordinator::start(&["--workers", "2", "--heartbeat-timeout-s", "60"]);
    let mut c = coord.client().await;
    let r1 = register(
        &mut c,
        RegisterRequest {
            requested_rank: Some(1),
            ..worker("w1")
        },
    )
    .await;
    assert_eq!((r1.rank, r1.ready, r1.nccl_id.clone()), (1, false, None));

    let mut c1 = c.clone();
    let r1c = r1.clone();
    let started = Instant::now();
    let waiter = tokio::spawn(async move { rendezvous(&mut c1, &r1c, 0, None, 20000).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiter.is_finished(),
        "rendezvous returned before rank 0 registered"
    );

    let id = nccl_id(9);
    let r0 = register(
        &mut c,
        RegisterRequest {
            nccl_id: Some(id.clone()),
            ..worker("w0")
        },
    )
    .await;
    assert_eq!(r0.rank, 0);
    assert!(r0.ready);
    let v = waiter.await.unwrap();
    assert!(v.ready, "{v:?}");
    assert_eq!(v.nccl_id, Some(id));
    assert!(
        started.elapsed() < Duration::from_millis(15000),
        "the waiter was not woken"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_or_missing_token_is_unauthenticated() {
    let coord = Coordinator::start(&["--workers", "1"]);
    let mut bad = connect(&coord.addr(), "not-the-token").await.unwrap();
    let err = bad.register(worker("w0")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

    let mut none = CoordinatorClient::connect(format!("http://{}", coord.addr()))
        .await
        .unwrap();
    let err = none.register(worker("w0")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

    let mut good = coord.client().await;
    assert_eq!(register(&mut good, worker("w0")).await.rank, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mismatched_hashes_and_protocol_are_rejected() {
    let coord = Coordinator::start(&["--workers", "3"]);
    let mut c = coord.client().await;
    register(&mut c, worker("w0")).await;

    let err = c
        .register(RegisterRequest {
            job_config_hash: "job-hash-222".into(),
            ..worker("w1")
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    for part in ["job config hash", "job-hash-222", "job-hash-111"] {
        assert!(
            err.message().contains(part),
            "{:?} lacks {part}",
            err.message()
        );
    }
    let err = c
        .register(RegisterRequest {
            model_config_hash: "model-hash-bbb".into(),
            ..worker("w1")
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    for part in ["model config hash", "model-hash-bbb", "model-hash-aaa"] {
        assert!(
            err.message().contains(part),
            "{:?} lacks {part}",
            err.message()
        );
    }
    let err = c
        .register(RegisterRequest {
            protocol_version: PROTOCOL_VERSION + 1,
            ..worker("w1")
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("protocol version"),
        "{}",
        err.message()
    );

    // The rejected ones took no rank.
    assert_eq!(register(&mut c, worker("w1")).await.rank, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicated_requested_rank_is_rejected() {
    let coord = Coordinator::start(&["--workers", "3"]);
    let mut c = coord.client().await;
    let a = register(
        &mut c,
        RegisterRequest {
            requested_rank: Some(1),
            ..worker("a")
        },
    )
    .await;
    assert_eq!(a.rank, 1);
    let err = c
        .register(RegisterRequest {
            requested_rank: Some(1),
            ..worker("b")
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert!(
        err.message()
            .contains("rank 1 is already taken by worker \"a\""),
        "{}",
        err.message()
    );
    let err = c
        .register(RegisterRequest {
            requested_rank: Some(3),
            ..worker("b")
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    // Unrequested ranks fill the gaps.
    assert_eq!(register(&mut c, worker("b")).await.rank, 0);
    assert_eq!(register(&mut c, worker("c")).await.rank, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_message_is_rejected() {
    let coord = Coordinator::start(&["--workers", "2"]);
    let huge = RegisterRequest {
        worker_name: "x".repeat(MAX_MESSAGE_BYTES + 1024),
        ..worker("w0")
    };

    // A client without the limit: the coordinator refuses to decode it.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", coord.addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut raw = CoordinatorClient::with_interceptor(channel, BearerToken::new(TOKEN).unwrap())
        .max_encoding_message_size(64 << 20);
    let err = raw.register(huge.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(err.message().contains("too large"), "{}", err.message());

    // The helper's client refuses to send it. tonic reports a client-side
    // encode error as a reset of the HTTP/2 stream (Internal), not always as
    // the encoder's OutOfRange.
    let mut c = coord.client().await;
    let err = c.register(huge).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::OutOfRange | Code::Internal),
        "{err:?}"
    );

    // Under the limit passes, on both sides; the rejected ones took no rank.
    let big = RegisterRequest {
        worker_name: "y".repeat(MAX_MESSAGE_BYTES - 1024),
        ..worker("w0")
    };
    assert_eq!(register(&mut c, big).await.rank, 0);
    assert_eq!(register(&mut c, worker("w1")).await.rank, 1);
}

/// A heartbeat reply as seen by a worker: (rank, command, epoch, when).
type Seen = (u32, i32, u64, Instant);

/// Heartbeats for a set of members every 100 ms and records the replies.
#[derive(Clone)]
struct Beats {
    members: Arc<Mutex<Vec<(RegisterReply, u64)>>>,
    /// Every reply.
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Beats {
    fn spawn(client: Client) -> Self {
        let beats = Self {
            members: Arc::default(),
            seen: Arc::default(),
        };
        let b = beats.clone();
        tokio::spawn(async move {
            let mut client = client;
            loop {
                let members = b.members.lock().unwrap().clone();
                for (r, epoch) in members {
                    if let Ok((command, current)) = heartbeat(&mut client, &r, epoch).await {
                        b.seen
                            .lock()
                            .unwrap()
                            .push((r.rank, command, current, Instant::now()));
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        beats
    }

    fn set(&self, members: Vec<(RegisterReply, u64)>) {
        *self.members.lock().unwrap() = members;
    }

    fn first_rebuild(&self, rank: u32) -> Option<(u64, Instant)> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .find(|s| s.0 == rank && s.1 == Cmd::Rebuild as i32)
            .map(|s| (s.2, s.3))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_worker_is_detected_and_survivors_rebuild() {
    let coord = Coordinator::start(&["--workers", "3", "--heartbeat-timeout-s", "2"]);
    let mut c = coord.client().await;
    let r0 = register(
        &mut c,
        RegisterRequest {
            nccl_id: Some(nccl_id(1)),
            ..worker("w0")
        },
    )
    .await;
    let r1 = register(&mut c, worker("w1")).await;
    let r2 = register(&mut c, worker("w2")).await;
    assert!(r2.ready);

    let beats = Beats::spawn(c.clone());
    beats.set(vec![(r0.clone(), 0), (r2.clone(), 0)]);
    // w1 heartbeats once more, then goes silent.
    let (command, _) = heartbeat(&mut c, &r1, 0).await.unwrap();
    assert_eq!(command, Cmd::Continue as i32);
    let silent_since = Instant::now();

    let deadline = silent_since + Duration::from_secs(12);
    let (epoch0, at0) = loop {
        if let (Some(a), Some(_)) = (beats.first_rebuild(0), beats.first_rebuild(2)) {
            break a;
        }
        assert!(
            Instant::now() < deadline,
            "no rebuild within 12 s:\n{}",
            coord.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let detected = at0.duration_since(silent_since);
    assert_eq!(epoch0, 1);
    assert_eq!(beats.first_rebuild(2).unwrap().0, 1);
    assert!(
        detected >= Duration::from_millis(1950),
        "declared dead too early: {detected:?}"
    );
    assert!(
        // Generous: CI machines are loaded; the point is "detected, not never".
        detected < Duration::from_millis(8000),
        "detected too late: {detected:?}"
    );
    assert!(coord.log().contains("declared dead"), "{}", coord.log());

    // The dead member is out; its heartbeat says so.
    let err = heartbeat(&mut c, &r1, 0).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    // A restarted worker gets the free rank in the new epoch.
    let r3 = register(&mut c, worker("w1-restarted")).await;
    assert_eq!((r3.rank, r3.epoch, r3.world_size), (1, 1, 3));
    assert!(!r3.ready, "the old NCCL id must not be reused");
    assert_eq!(r3.nccl_id, None);
    beats.set(vec![(r0.clone(), 0), (r2.clone(), 0), (r3.clone(), 1)]);

    // Rank 0 hands a fresh NCCL id for epoch 1; everyone sees it.
    let fresh = nccl_id(2);
    let v0 = rendezvous(&mut c, &r0, 1, Some(fresh.clone()), 1000).await;
    assert!(v0.ready);
    let v2 = rendezvous(&mut c, &r2, 1, None, 1000).await;
    let v3 = rendezvous(&mut c, &r3, 1, None, 1000).await;
    for v in [&v0, &v2, &v3] {
        assert_eq!((v.epoch, v.ready), (1, true));
        assert_eq!(v.nccl_id.as_ref(), Some(&fresh));
    }
    beats.set(vec![(r0.clone(), 1), (r2.clone(), 1), (r3.clone(), 1)]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (command, epoch) = heartbeat(&mut c, &r2, 1).await.unwrap();
    assert_eq!((command, epoch), (Cmd::Continue as i32, 1));
}

async fn report(c: &mut Client, r: &RegisterReply, step: u64) -> i32 {
    c.report_step(ReportStepRequest {
        member_id: r.member_id,
        rank: r.rank,
        epoch: r.epoch,
        step,
        loss: 2.5,
        tokens: 1000,
        seconds: 0.5,
    })
    .await
    .expect("report step")
    .into_inner()
    .command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exits_zero_after_every_worker_reports_the_final_step() {
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("job.toml");
    std::fs::write(&job, "workers = 2\nsteps = 3\n[trainer]\nlr = 1e-4\n").unwrap();
    let mut coord = Coordinator::start(&["--config", job.to_str().unwrap()]);
    let mut c = coord.client().await;
    let a = register(
        &mut c,
        RegisterRequest {
            nccl_id: Some(nccl_id(3)),
            ..worker("a")
        },
    )
    .await;
    let b = register(&mut c, worker("b")).await;
    assert_eq!((b.world_size, b.final_step), (2, Some(3)));
    for step in 1..=2 {
        assert_eq!(report(&mut c, &a, step).await, Cmd::Continue as i32);
        assert_eq!(report(&mut c, &b, step).await, Cmd::Continue as i32);
    }
    assert_eq!(report(&mut c, &a, 3).await, Cmd::Continue as i32);
    assert!(
        coord.child.try_wait().unwrap().is_none(),
        "exited before all reported"
    );
    assert_eq!(report(&mut c, &b, 3).await, Cmd::Stop as i32);
    // Every rank is done, so nobody has to be told: the coordinator exits at
    // once; a late heartbeat hears STOP or finds it gone.
    if let Ok((command, _)) = heartbeat(&mut c, &a, 0).await {
        assert_eq!(command, Cmd::Stop as i32);
    }

    let status = coord.wait(Duration::from_secs(15)).await;
    let log = coord.log();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(
        log.contains("all 2 workers reported the final step 3"),
        "{log}"
    );
    assert!(log.contains("step done on all ranks"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_an_unfinished_job_with_status_3_token_file_and_json_logs() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let mut coord = Coordinator::start_with(
        &[
            "--workers",
            "2",
            "--log-format",
            "json",
            "--token-file",
            token_file.to_str().unwrap(),
        ],
        &[],
    );
    let mut c = coord.client().await;
    let a = register(&mut c, worker("a")).await;
    let b = register(&mut c, worker("b")).await;
    let beats = Beats::spawn(c.clone());
    beats.set(vec![(a, 0), (b, 0)]);

    let pid = coord.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = coord.wait(Duration::from_secs(15)).await;
    let log = coord.log();
    // Stopped before the job finished: not "done" (exit 3), and the log says
    // how to continue.
    assert_eq!(status.code(), Some(3), "{log}");
    assert!(log.contains("stopped by SIGTERM"), "{log}");
    assert!(log.contains("with --resume"), "{log}");
    assert!(!log.contains(TOKEN), "{log}");
    for line in log.lines() {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
    }
    // The heartbeating workers were told to stop before it went away.
    let stops = beats
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.1 == Cmd::Stop as i32)
        .count();
    assert!(stops >= 2, "{stops} STOP replies");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_shutdown_exits_nonzero_with_the_reason() {
    let mut coord = Coordinator::start(&["--workers", "2"]);
    let mut c = coord.client().await;
    c.shutdown(ShutdownRequest {
        rank: Some(0),
        reason: "object store unreachable".into(),
        failed: true,
    })
    .await
    .unwrap();
    let status = coord.wait(Duration::from_secs(15)).await;
    let log = coord.log();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("job failed"), "{log}");
    assert!(log.contains("object store unreachable"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_commit_builds_the_manifest_and_resume_point() {
    let store = tempfile::tempdir().unwrap();
    let base = format!("file://{}/job", store.path().display());
    let coord = Coordinator::start(&["--workers", "2", "--checkpoint-url", &format!("{base}/")]);
    let mut c = coord.client().await;
    let a = register(
        &mut c,
        RegisterRequest {
            nccl_id: Some(nccl_id(4)),
            ..worker("a")
        },
    )
    .await;
    let b = register(&mut c, worker("b")).await;
    assert_eq!((a.start_step, a.resume_checkpoint_url.clone()), (0, None));

    let mut parts = Vec::new();
    for r in [&a, &b] {
        let begin = c
            .checkpoint_begin(CheckpointBeginRequest {
                member_id: r.member_id,
                rank: r.rank,
                epoch: 0,
                step: 7,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            begin.manifest_url,
            format!("{base}/step-00000007/manifest.json")
        );
        parts.push(begin.part_url);
    }
    assert_eq!(
        parts[0],
        format!("{base}/step-00000007/rank-00000-of-00002.safetensors")
    );
    assert_ne!(parts[0], parts[1]);

    let commit = |r: &RegisterReply, url: &str, cursor: Option<&str>| CheckpointCommitRequest {
        member_id: r.member_id,
        rank: r.rank,
        epoch: 0,
        step: 7,
        part_url: url.into(),
        data_cursor_json: cursor.map(str::to_string),
    };
    let bad = c
        .checkpoint_commit(commit(&a, &parts[0], Some("{nope")))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    let first = c
        .checkpoint_commit(commit(
            &a,
            &parts[0],
            Some(r#"{"epoch":0,"sample_index":56}"#),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!first.complete);
    let last = c
        .checkpoint_commit(commit(&b, &parts[1], None))
        .await
        .unwrap()
        .into_inner();
    assert!(last.complete);
    let manifest = CheckpointManifest::from_json(&last.manifest_json.unwrap()).unwrap();
    assert_eq!((manifest.step, manifest.world_size), (7, 2));
    // Parts are named relative to the manifest, and resolve to where they were written.
    assert_eq!(manifest.parts[1].url, "rank-00001-of-00002.safetensors");
    assert_eq!(manifest.parts[1].resolve(&last.manifest_url), parts[1]);
    assert_eq!(manifest.data_cursor.as_ref().unwrap()["sample_index"], 56);
    assert_eq!(manifest.config_hash, "job-hash-111");
    // The coordinator wrote the manifest (the commit marker) before replying.
    let written = std::fs::read_to_string(store.path().join("job/step-00000007/manifest.json"))
        .expect("manifest written");
    assert_eq!(CheckpointManifest::from_json(&written).unwrap(), manifest);

    let v = rendezvous(&mut c, &a, 0, None, 0).await;
    assert_eq!(v.start_step, 7);
    assert_eq!(
        v.resume_checkpoint_url.as_deref(),
        Some(last.manifest_url.as_str())
    );
}

#[test]
fn bad_configuration_exits_2_with_the_reason() {
    let bin = env!("CARGO_BIN_EXE_coordinator");
    let run = |args: &[&str], token: bool| {
        let mut cmd = Command::new(bin);
        cmd.args(args);
        for (key, _) in std::env::vars() {
            if key.starts_with("KVD_") {
                cmd.env_remove(key);
            }
        }
        if token {
            cmd.env("KVD_TOKEN", TOKEN);
        }
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&["--workers", "0"], true);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("workers must be at least 1"), "{err}");
    let (code, err) = run(&["--workers", "2"], false);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("no job token"), "{err}");

    // A port already in use is a runtime failure.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, err) = run(&["--listen", &addr], true);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("cannot listen"), "{err}");
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and a certificate it signed for `localhost` / 127.0.0.1 (openssl
/// CLI): (CA certificate, server certificate, server key).
fn certificates(dir: &std::path::Path, name: &str) -> [std::path::PathBuf; 3] {
    let p = |f: &str| dir.join(format!("{name}-{f}"));
    let s = |f: &str| p(f).to_string_lossy().into_owned();
    let subject = format!("/CN={name} test CA");
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        &subject,
        "-keyout",
        &s("ca.key"),
        "-out",
        &s("ca.pem"),
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        &s("server.key"),
        "-out",
        &s("server.csr"),
    ]);
    std::fs::write(
        p("ext.cnf"),
        "basicConstraints=CA:FALSE\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        &s("server.csr"),
        "-CA",
        &s("ca.pem"),
        "-CAkey",
        &s("ca.key"),
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        &s("ext.cnf"),
        "-out",
        &s("server.pem"),
    ]);
    [p("ca.pem"), p("server.pem"), p("server.key")]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_admits_only_clients_that_trust_the_certificate() {
    let certs = tempfile::tempdir().unwrap();
    let [ca, cert, key] = certificates(certs.path(), "coordinator");
    let [other, _, _] = certificates(certs.path(), "other");
    let coord = Coordinator::start(&[
        "--workers",
        "1",
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    let addr = format!("localhost:{}", coord.addr().rsplit(':').next().unwrap());
    let tls = |pem: &std::path::Path| kvd_proto::client::ClientTls {
        ca_pem: std::fs::read(pem).unwrap(),
        domain: None,
    };
    let mut c = kvd_proto::client::connect_with(&addr, TOKEN, Some(&tls(&ca)))
        .await
        .expect("TLS connect");
    let r = register(&mut c, worker("tls")).await;
    assert_eq!((r.rank, r.world_size), (0, 1));
    // A client trusting another certificate cannot talk to it...
    let wrong = match kvd_proto::client::connect_with(&addr, TOKEN, Some(&tls(&other))).await {
        Err(_) => true,
        Ok(mut c) => c.register(worker("mitm")).await.is_err(),
    };
    assert!(wrong, "a client with the wrong CA got through");
    // ...nor can a plaintext one.
    let plain = match connect(&addr, TOKEN).await {
        Err(_) => true,
        Ok(mut c) => c.register(worker("plain")).await.is_err(),
    };
    assert!(plain, "a plaintext client got through");
}
