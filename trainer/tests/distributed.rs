//! The distributed job as users run it: the `coordinator` binary and
//! `kv-distill worker` processes over loopback gRPC, the CPU (TCP) collective,
//! checkpoints in `file://`, on the real SmolLM2 GGUF with tiny shapes.
//!
//! Every run trains the same 6 steps of 3 examples (one micro-batch each),
//! with 1 libtorch thread per process, so the final adaptors can be compared
//! bit for bit: single process, 3 workers, 3 workers with a worker killed
//! mid-step or mid-upload, a coordinator restart, and a resume with 2 workers.
//! One more job runs 8 workers (4 steps of 8 examples) with a worker killed.

mod common;
use common::{qa_sources, smollm2};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use kvd_data::prepare::{read_squad, SquadContext};
use kvd_data::writer::WriterConfig;
use kvd_data::StoreOptions;

const BIN: &str = env!("CARGO_BIN_EXE_kv-distill");
const STEPS: &str = "6";
const TOKEN: &str = "test-token-123";

fn coordinator_bin() -> PathBuf {
    let p = Path::new(BIN).with_file_name("coordinator");
    assert!(
        p.exists(),
        "{} is missing: build it with `cargo build -p kvd-coordinator` (cargo test --workspace does)",
        p.display()
    );
    p
}

/// A small QA dataset (SQuAD-shifts new_wiki paragraphs), written once.
fn dataset() -> &'static str {
    static DATA: OnceLock<(tempfile::TempDir, String)> = OnceLock::new();
    &DATA
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("tempdir");
            let rows = read_squad(
                &qa_sources().join("squad_shifts/new_wiki_v1.0.json"),
                "new_wiki",
                SquadContext::Paragraph,
            )
            .expect("new_wiki");
            let url = format!("file://{}/qa", dir.path().display());
            tokio::runtime::Runtime::new()
                .expect("runtime")
                .block_on(kvd_data::prepare::write_dataset(
                    &url,
                    &StoreOptions::default(),
                    &rows[..40],
                    &WriterConfig {
                        row_group_rows: 8,
                        ..WriterConfig::default()
                    },
                    None,
                ))
                .expect("write dataset");
            (dir, url)
        })
        .1
}

/// The training flags shared by every run.
fn train_flags(out: &Path) -> Vec<String> {
    train_flags_sized(out, STEPS, "3")
}

/// The training flags with another length and global batch.
fn train_flags_sized(out: &Path, steps: &str, global_batch: &str) -> Vec<String> {
    [
        "--model",
        &smollm2(),
        "--device",
        "cpu",
        "--data",
        dataset(),
        "--steps",
        steps,
        "--global-batch",
        global_batch,
        "--micro-batch",
        "1",
        "--max-len",
        "80",
        "--text-suffix",
        "16",
        "--warmup",
        "2",
        "--seed",
        "3",
        "--skip-bad-rows",
        "--log-every",
        "1",
        "--out",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([out.to_string_lossy().into_owned()])
    .collect()
}

fn worker_command(out: &Path, extra: &[&str]) -> Vec<String> {
    worker_command_with(train_flags(out), extra)
}

fn worker_command_with(flags: Vec<String>, extra: &[&str]) -> Vec<String> {
    let mut v = vec![
        BIN.to_string(),
        "--threads".into(),
        "1".into(),
        "worker".into(),
    ];
    v.extend(flags);
    v.extend(["--checkpoint-every".into(), "2".into()]);
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A child process whose stdout and stderr go to files. A pipe that is read
/// only at exit fills up (64 KiB) and then blocks every writer: the process
/// and the workers it spawns, which inherit it, hang in a log line.
struct Proc {
    child: Child,
    logs: tempfile::TempDir,
}

impl Proc {
    /// Starts `cmd` with its output captured to files.
    fn spawn(cmd: &mut Command, what: &str) -> Self {
        let logs = tempfile::tempdir().expect("tempdir");
        let file = |name: &str| {
            Stdio::from(std::fs::File::create(logs.path().join(name)).expect("log file"))
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file("stdout"))
            .stderr(file("stderr"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        Self { child, logs }
    }

    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.logs.path().join(name)).unwrap_or_default()
    }
}

/// Runs a child to completion with a deadline.
fn wait_output(mut p: Proc, limit: Duration, what: &str) -> Output {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = p.child.try_wait().expect("poll") {
            return Output {
                status,
                stdout: p.read("stdout"),
                stderr: p.read("stderr"),
            };
        }
        if Instant::now() > deadline {
            let _ = p.child.kill();
            let _ = p.child.wait();
            panic!(
                "{what} did not finish in {limit:?}:\n{}",
                text(&p.read("stderr"))
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `coordinator ... --spawn-local -- <worker>`; returns its output.
fn spawn_local(
    workers: u32,
    ckpt: &Path,
    extra: &[&str],
    worker: Vec<String>,
    env: &[(&str, String)],
) -> Output {
    spawn_local_with(workers, 3, ckpt, extra, worker, env)
}

/// [`spawn_local`] with a heartbeat timeout of `heartbeat_s` seconds.
fn spawn_local_with(
    workers: u32,
    heartbeat_s: u32,
    ckpt: &Path,
    extra: &[&str],
    worker: Vec<String>,
    env: &[(&str, String)],
) -> Output {
    let mut cmd = Command::new(coordinator_bin());
    cmd.args([
        "--workers",
        &workers.to_string(),
        "--listen",
        "127.0.0.1:0",
        "--heartbeat-timeout-s",
        &heartbeat_s.to_string(),
    ])
    .args(["--checkpoint-url", &format!("file://{}", ckpt.display())])
    .args(extra)
    .arg("--spawn-local")
    .arg("--")
    .args(worker)
    .env("KVD_TOKEN", TOKEN)
    .env("RUST_BACKTRACE", "0");
    for (k, v) in env {
        cmd.env(k, v);
    }
    wait_output(
        Proc::spawn(&mut cmd, "the coordinator"),
        Duration::from_secs(600),
        "the job",
    )
}

fn tensors(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, v.data().to_vec()))
        .collect()
}

fn assert_same_adaptor(a: &Path, b: &Path) {
    let (ta, tb) = (tensors(a), tensors(b));
    assert_eq!(ta.keys().collect::<Vec<_>>(), tb.keys().collect::<Vec<_>>());
    for (name, bytes) in &ta {
        assert!(
            bytes == &tb[name],
            "tensor {name} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

/// The adaptors at `a` and `b` have the same float32 tensors to within
/// `rtol` relative to the largest magnitude of each tensor.
fn assert_close_adaptor(a: &Path, b: &Path, rtol: f32) {
    let (ta, tb) = (tensors(a), tensors(b));
    assert_eq!(ta.keys().collect::<Vec<_>>(), tb.keys().collect::<Vec<_>>());
    let floats = |bytes: &[u8]| -> Vec<f32> {
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect()
    };
    for (name, bytes) in &ta {
        let (x, y) = (floats(bytes), floats(&tb[name]));
        assert_eq!(x.len(), y.len(), "{name}");
        let scale = x.iter().fold(1e-12f32, |m, v| m.max(v.abs()));
        let worst = x
            .iter()
            .zip(&y)
            .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        assert!(
            worst <= rtol * scale,
            "tensor {name}: max difference {worst} (largest value {scale}) between {} and {}",
            a.display(),
            b.display()
        );
    }
}

/// The uninterrupted 3-worker run (adaptor, step trace), made once.
fn reference() -> &'static (tempfile::TempDir, PathBuf, PathBuf) {
    static REF: OnceLock<(tempfile::TempDir, PathBuf, PathBuf)> = OnceLock::new();
    REF.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("adaptor.safetensors");
        let trace = dir.path().join("trace-{rank}.jsonl");
        let ckpt = dir.path().join("ckpt");
        let worker = worker_command(&out, &["--trace", &trace.to_string_lossy()]);
        let o = spawn_local(3, &ckpt, &["--keep-last", "0"], worker, &[]);
        assert!(
            o.status.success(),
            "reference job failed:\n{}",
            text(&o.stderr)
        );
        std::fs::write(dir.path().join("job.log"), &o.stderr).expect("job log");
        (dir, out, ckpt)
    })
}

fn trace_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).expect("trace json"))
        .collect()
}

/// `kv-distill train` (one process, one thread) with `flags`.
fn train_single(flags: Vec<String>) {
    let mut args = vec!["--threads".to_string(), "1".into(), "train".into()];
    args.extend(flags);
    let o = Command::new(BIN).args(&args).output().expect("train");
    assert!(
        o.status.success(),
        "single-process train failed:\n{}",
        text(&o.stderr)
    );
}

/// `kv-distill train` (one process, one thread) with `flags`, which must fail
/// with status 1; its log without colours.
fn train_failing(flags: &[String]) -> String {
    let o = Command::new(BIN)
        .args(["--threads", "1", "train"])
        .args(flags)
        .output()
        .expect("train");
    let log = strip_ansi(&text(&o.stderr));
    assert_eq!(o.status.code(), Some(1), "{log}");
    log
}

/// The committed manifest of `step` in `ckpt` was written by `world` ranks,
/// one part each, with the data cursor.
fn assert_committed(ckpt: &Path, step: u64, world: u32) {
    let m = std::fs::read_to_string(ckpt.join(format!("step-{step:08}/manifest.json")))
        .expect("manifest");
    let m = kvd_proto::CheckpointManifest::from_json(&m).expect("manifest parses");
    assert_eq!(
        (m.step, m.world_size, m.parts.len()),
        (step, world, world as usize)
    );
    assert!(m.data_cursor.is_some());
}

#[test]
fn three_workers_equal_the_single_process_trainer_bit_for_bit() {
    let (dir, dist, ckpt) = reference();
    let single = dir.path().join("single.safetensors");
    train_single(train_flags(&single));
    assert_same_adaptor(&single, dist);
    // Checkpoints of steps 2, 4, 6 were committed, each with 3 parts.
    for step in [2, 4, 6] {
        assert_committed(ckpt, step, 3);
    }
    // Every rank trained its own slice of the same global batches.
    let t0 = trace_lines(&dir.path().join("trace-0.jsonl"));
    assert_eq!(t0.len(), 6);
    for r in 1..3 {
        let tr = trace_lines(&dir.path().join(format!("trace-{r}.jsonl")));
        for (a, b) in t0.iter().zip(&tr) {
            assert_eq!(a["global_ids"], b["global_ids"]);
            assert_eq!(a["loss"], b["loss"], "ranks disagree on the global loss");
            assert_ne!(a["ids"], b["ids"]);
        }
    }
    // Every rank's step log splits the step's time: waiting for data, its own
    // forward and backward, the all-reduce, the previous step's report.
    let log = strip_ansi(&std::fs::read_to_string(dir.path().join("job.log")).expect("job log"));
    let field = |line: &str, name: &str| -> f64 {
        let at = line
            .find(&format!(" {name}="))
            .unwrap_or_else(|| panic!("{name} in {line}"));
        let rest = &line[at + name.len() + 2..];
        rest.split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap_or_else(|e| panic!("{name}: {e} in {line}"))
    };
    let steps: Vec<&str> = log.lines().filter(|l| l.contains(" step rank=")).collect();
    assert_eq!(steps.len(), 3 * 6, "{log}");
    for l in steps {
        let seconds = field(l, "seconds");
        let (compute, comm) = (field(l, "compute_s"), field(l, "comm_s"));
        assert!(
            compute > 0.0 && comm > 0.0 && compute + comm <= seconds,
            "{l}"
        );
        assert!(
            field(l, "data_s") >= 0.0 && field(l, "report_s") >= 0.0,
            "{l}"
        );
    }
}

/// `s` without terminal colour codes (`ESC [ ... m`).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A job whose workers run under `chaos` (KVD_CHAOS), fired once.
fn chaos_run(name: &str, chaos: &str) -> (tempfile::TempDir, PathBuf, Output) {
    chaos_run_sized(name, chaos, 3, 3, STEPS, "3")
}

/// [`chaos_run`] with `workers` workers, a heartbeat timeout of `heartbeat_s`
/// seconds, `steps` steps and global batch `batch`.
fn chaos_run_sized(
    name: &str,
    chaos: &str,
    workers: u32,
    heartbeat_s: u32,
    steps: &str,
    batch: &str,
) -> (tempfile::TempDir, PathBuf, Output) {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join(format!("{name}.safetensors"));
    let marker = dir.path().join("chaos-fired");
    let o = spawn_local_with(
        workers,
        heartbeat_s,
        &dir.path().join("ckpt"),
        &[],
        worker_command_with(train_flags_sized(&out, steps, batch), &[]),
        &[
            ("KVD_CHAOS", chaos.to_string()),
            ("KVD_CHAOS_ONCE", marker.to_string_lossy().into_owned()),
        ],
    );
    assert!(
        o.status.success(),
        "{name} job failed:\n{}",
        text(&o.stderr)
    );
    assert!(marker.exists(), "the fault never fired");
    (dir, out, o)
}

#[test]
fn a_worker_killed_mid_step_is_replaced_and_the_result_is_unchanged() {
    let (_, reference_out, _) = reference();
    let (_dir, out, o) = chaos_run("killed", "kill:rank=1:step=4:at=step");
    let log = text(&o.stderr);
    assert!(log.contains("declared dead"), "{log}");
    assert!(log.contains("worker died: starting it again"), "{log}");
    assert!(log.contains("resumed from checkpoint"), "{log}");
    assert_same_adaptor(&out, reference_out);
}

#[test]
fn a_kill_during_a_checkpoint_upload_keeps_the_previous_checkpoint() {
    let (_, reference_out, _) = reference();
    let (dir, out, o) = chaos_run("upload", "kill:rank=1:step=4:at=upload");
    let log = text(&o.stderr);
    // The step-4 checkpoint never committed: the job went back to step 2.
    let resumed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("resumed from checkpoint"))
        .collect();
    assert!(!resumed.is_empty(), "{log}");
    assert!(
        resumed.iter().all(|l| l.contains("step-00000002")),
        "{resumed:?}"
    );
    assert_same_adaptor(&out, reference_out);
    // After recovery the step-4 checkpoint was taken again and committed.
    assert!(dir.path().join("ckpt/step-00000004/manifest.json").exists());
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn start_coordinator(port: u16, ckpt: &Path, workers: u32, extra: &[&str]) -> Proc {
    let mut cmd = Command::new(coordinator_bin());
    cmd.args([
        "--workers",
        &workers.to_string(),
        "--listen",
        &format!("127.0.0.1:{port}"),
    ])
    .args(["--heartbeat-timeout-s", "3", "--resume"])
    .args(["--checkpoint-url", &format!("file://{}", ckpt.display())])
    .args(extra)
    .env("KVD_TOKEN", TOKEN);
    Proc::spawn(&mut cmd, "the coordinator")
}

fn start_worker(port: u16, rank: Option<u32>, token: &str, cmd: &[String]) -> Proc {
    let mut c = Command::new(&cmd[0]);
    c.args(&cmd[1..])
        .env("KVD_COORDINATOR", format!("127.0.0.1:{port}"))
        .env("KVD_TOKEN", token)
        .env("RUST_BACKTRACE", "0");
    if let Some(r) = rank {
        c.env("KVD_RANK", r.to_string());
    }
    Proc::spawn(&mut c, "a worker")
}

#[test]
fn a_restarted_coordinator_continues_the_job_from_object_storage() {
    let (_, reference_out, _) = reference();
    let dir = tempfile::tempdir().expect("tempdir");
    let ckpt = dir.path().join("ckpt");
    let out = dir.path().join("restart.safetensors");
    let port = free_port();
    let mut first = start_coordinator(port, &ckpt, 3, &[]);
    let cmd = worker_command(&out, &["--coordinator-timeout-s", "120"]);
    let workers: Vec<Proc> = (0..3)
        .map(|r| start_worker(port, Some(r), TOKEN, &cmd))
        .collect();
    let manifest = ckpt.join("step-00000002/manifest.json");
    let deadline = Instant::now() + Duration::from_secs(300);
    while !manifest.exists() {
        assert!(Instant::now() < deadline, "no checkpoint within 300 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    first.child.kill().expect("kill -9 the coordinator");
    let _ = first.child.wait();
    let second = start_coordinator(port, &ckpt, 3, &[]);
    for (r, w) in workers.into_iter().enumerate() {
        let o = wait_output(w, Duration::from_secs(600), "a worker");
        assert!(
            o.status.success(),
            "worker {r} failed:\n{}",
            text(&o.stderr)
        );
    }
    let o = wait_output(second, Duration::from_secs(60), "the restarted coordinator");
    let log = text(&o.stderr);
    assert!(o.status.success(), "{log}");
    assert!(
        log.contains("resuming from the latest committed checkpoint"),
        "{log}"
    );
    assert_same_adaptor(&out, reference_out);
}

#[test]
fn resuming_with_two_workers_continues_the_same_data_sequence() {
    let (ref_dir, reference_out, ref_ckpt) = reference();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("two.safetensors");
    let trace = dir.path().join("trace-{rank}.jsonl");
    let from = format!("file://{}/step-00000002/manifest.json", ref_ckpt.display());
    let o = spawn_local(
        2,
        &dir.path().join("ckpt"),
        &["--resume-from", &from],
        worker_command(&out, &["--trace", &trace.to_string_lossy()]),
        &[],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let reference_trace = trace_lines(&ref_dir.path().join("trace-0.jsonl"));
    let resumed = trace_lines(&dir.path().join("trace-0.jsonl"));
    assert_eq!(resumed.len(), 4, "steps 3..=6 only");
    for line in &resumed {
        let step = line["step"].as_u64().expect("step") as usize;
        assert_eq!(line["world"], 2);
        assert_eq!(
            line["global_ids"],
            reference_trace[step - 1]["global_ids"],
            "step {step}"
        );
        let (l, r) = (
            line["loss"].as_f64().expect("loss"),
            reference_trace[step - 1]["loss"].as_f64().expect("loss"),
        );
        assert!(
            (l - r).abs() <= 1e-5 * r.abs(),
            "step {step}: loss {l} vs {r}"
        );
    }
    // Same data, same math. The bits may differ: with 2 ranks one of them
    // holds two of a step's 3 examples, so the sum over ranks associates
    // differently than with 3 (float addition is not associative), and AdamW
    // normalizes the tiny differences of near-zero gradients.
    assert_close_adaptor(&out, reference_out, 1e-4);
}

#[test]
fn bad_workers_are_rejected_with_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ckpt = dir.path().join("ckpt");
    let out = dir.path().join("bad.safetensors");
    let port = free_port();
    let coord = start_coordinator(port, &ckpt, 2, &[]);
    let cmd = worker_command(&out, &["--coordinator-timeout-s", "15"]);
    let good = start_worker(port, Some(0), TOKEN, &cmd);

    // Wrong token.
    let o = wait_output(
        start_worker(port, None, "wrong-token", &cmd),
        Duration::from_secs(120),
        "bad token",
    );
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).to_lowercase().contains("token"),
        "{}",
        text(&o.stderr)
    );

    // Another job configuration (LoRA rank).
    let mut other = cmd.clone();
    other.extend(["--lora-rank".into(), "4".into()]);
    let o = wait_output(
        start_worker(port, None, TOKEN, &other),
        Duration::from_secs(120),
        "other config",
    );
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(err.contains("job config hash mismatch"), "{err}");
    // The key that differs, and what to do.
    assert!(
        err.contains("differing keys: distill.lora.rank (first 16, this 4)"),
        "{err}"
    );
    assert!(err.contains("same job flags"), "{err}");
    assert!(!err.contains("invalid input"), "{err}");

    // A rank that is taken.
    let o = wait_output(
        start_worker(port, Some(0), TOKEN, &cmd),
        Duration::from_secs(120),
        "dup rank",
    );
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("rank 0 is already taken"),
        "{}",
        text(&o.stderr)
    );

    // The job is still waiting for its second worker: a good one finishes it.
    let second = start_worker(port, Some(1), TOKEN, &cmd);
    for (w, name) in [(good, "rank 0"), (second, "rank 1")] {
        let o = wait_output(w, Duration::from_secs(600), name);
        assert!(o.status.success(), "{name}:\n{}", text(&o.stderr));
    }
    let o = wait_output(coord, Duration::from_secs(60), "coordinator");
    assert!(o.status.success(), "{}", text(&o.stderr));
}

#[test]
fn a_worker_that_cannot_read_its_data_stops_the_job_with_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("x.safetensors");
    let mut cmd = worker_command(&out, &[]);
    let i = cmd.iter().position(|a| a == "--data").expect("--data") + 1;
    cmd[i] = format!("file://{}/no-such-dataset", dir.path().display());
    let o = spawn_local(2, &dir.path().join("ckpt"), &[], cmd, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    let log = text(&o.stderr);
    assert!(
        log.contains("job failed") && log.contains("no-such-dataset"),
        "{log}"
    );
}

#[test]
fn an_unreachable_checkpoint_store_is_a_clear_error() {
    let o = Command::new(coordinator_bin())
        .args(["--workers", "1", "--listen", "127.0.0.1:0", "--resume"])
        .args(["--checkpoint-url", "s3://kvd-bucket/ckpt"])
        .args([
            "--store-opt",
            "endpoint=http://127.0.0.1:9",
            "--store-opt",
            "allow_http=true",
        ])
        .args([
            "--store-opt",
            "access_key_id=x",
            "--store-opt",
            "secret_access_key=y",
        ])
        .args(["--store-opt", "region=us-east-1"])
        .env("KVD_TOKEN", TOKEN)
        .output()
        .expect("coordinator");
    assert_eq!(o.status.code(), Some(1));
    let log = text(&o.stderr);
    assert!(log.contains("s3://kvd-bucket/ckpt"), "{log}");
}

#[test]
fn spawn_local_without_a_worker_command_is_a_config_error() {
    let o = Command::new(coordinator_bin())
        .args(["--workers", "2", "--spawn-local"])
        .env("KVD_TOKEN", TOKEN)
        .output()
        .expect("coordinator");
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o.stderr).contains("worker command"),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn pausing_at_a_checkpoint_then_resuming_gives_the_same_adaptor() {
    let (_, reference_out, _) = reference();
    let dir = tempfile::tempdir().expect("tempdir");
    let ckpt = dir.path().join("ckpt");
    let out = dir.path().join("paused.safetensors");
    let o = spawn_local(
        3,
        &ckpt,
        &["--stop-at", "2"],
        worker_command(&out, &[]),
        &[],
    );
    let log = text(&o.stderr);
    assert!(o.status.success(), "{log}");
    assert!(log.contains("paused at step 2"), "{log}");
    // Workers already in step 3's collective are stopped by the order: a
    // planned pause, not a failure.
    assert!(
        !log.contains("collective failed"),
        "a pause looked like a failure:\n{log}"
    );
    assert!(ckpt.join("step-00000002/manifest.json").exists());
    assert!(!out.exists(), "a paused job wrote its final adaptor");
    // Without --resume the coordinator refuses to overwrite the job's checkpoints.
    let o = spawn_local(3, &ckpt, &[], worker_command(&out, &[]), &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("pass --resume"),
        "{}",
        text(&o.stderr)
    );
    let o = spawn_local(3, &ckpt, &["--resume"], worker_command(&out, &[]), &[]);
    let log = text(&o.stderr);
    assert!(o.status.success(), "{log}");
    assert!(
        log.contains("resuming from the latest committed checkpoint"),
        "{log}"
    );
    assert_same_adaptor(&out, reference_out);
}

/// `coordinator --workers 8 --spawn-local` on CPU (the 8-GPU issue's CPU run):
/// 8 workers, one example each per step, a worker killed with SIGKILL at step 3
/// and replaced; the final adaptor equals the single-process trainer's.
#[test]
fn eight_workers_with_a_killed_worker_equal_the_single_process_trainer() {
    let (steps, batch) = ("4", "8");
    let started = Instant::now();
    // 9 processes share the CI machine's cores: a longer heartbeat timeout.
    let (dir, out, o) = chaos_run_sized("eight", "kill:rank=5:step=3:at=step", 8, 10, steps, batch);
    let log = text(&o.stderr);
    assert!(log.contains("declared dead"), "{log}");
    // The survivors and the restarted worker form a new membership and resume
    // from the last committed checkpoint: step 2's, or (when its 8 uploads had
    // not all landed before the kill, as on a loaded machine) the start.
    assert!(log.contains("membership epoch bumped"), "{log}");
    assert!(
        log.contains("resumed from checkpoint") || log.contains("resume_step=0"),
        "{log}"
    );
    eprintln!("8 workers, 4 steps with a kill: {:?}", started.elapsed());
    assert_committed(&dir.path().join("ckpt"), 4, 8);

    let single = dir.path().join("single.safetensors");
    train_single(train_flags_sized(&single, steps, batch));
    assert_same_adaptor(&single, &out);
}

/// Issue: `--resume` on a finished job hung forever and never wrote `--out`.
/// Resumed from a checkpoint at the final step (with another worker count),
/// the job writes the final adaptor, equal to the original run's, and ends.
#[test]
fn resuming_a_finished_job_writes_its_adaptor_and_ends() {
    let (ref_dir, reference_out, ref_ckpt) = reference();
    let _ = ref_dir;
    let dir = tempfile::tempdir().expect("tempdir");
    let ckpt = dir.path().join("ckpt");
    copy_dir(ref_ckpt, &ckpt);
    let out = dir.path().join("again.safetensors");
    let started = Instant::now();
    let o = spawn_local(2, &ckpt, &["--resume"], worker_command(&out, &[]), &[]);
    let log = text(&o.stderr);
    assert!(o.status.success(), "{log}");
    assert!(log.contains("the checkpoint is at the final step"), "{log}");
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "took {:?}",
        started.elapsed()
    );
    assert_same_adaptor(&out, reference_out);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        let dst = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).expect("copy");
        }
    }
}

/// Issue: after a coordinator `kill -9` with `--spawn-local`, its workers
/// lived on (~120 s, 1.1 GB each). They now die with it.
#[test]
fn spawned_workers_die_with_a_killed_coordinator() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("never.safetensors");
    let mut cmd = Command::new(coordinator_bin());
    cmd.args(["--workers", "2", "--listen", "127.0.0.1:0"])
        .args([
            "--checkpoint-url",
            &format!("file://{}", dir.path().join("ckpt").display()),
        ])
        .arg("--spawn-local")
        .arg("--")
        .args(worker_command_with(
            train_flags_sized(&out, "1000", "2"),
            &[],
        ))
        .env("KVD_TOKEN", TOKEN)
        .env("RUST_BACKTRACE", "0");
    let mut p = Proc::spawn(&mut cmd, "the coordinator");
    // The workers' pids, from the coordinator's log.
    let deadline = Instant::now() + Duration::from_secs(120);
    let pids: Vec<i32> = loop {
        let log = strip_ansi(&text(&p.read("stderr")));
        let pids: Vec<i32> = log
            .lines()
            .filter(|l| l.contains("worker started"))
            .filter_map(|l| l.split("pid=").nth(1))
            .filter_map(|s| {
                let digits: String = s
                    .trim_start_matches("Some(")
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                digits.parse().ok()
            })
            .collect();
        if pids.len() == 2 {
            break pids;
        }
        assert!(Instant::now() < deadline, "workers did not start:\n{log}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let alive = |pid: i32| {
        std::path::Path::new(&format!("/proc/{pid}")).exists() && {
            // A zombie (dead, not yet reaped) counts as gone.
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            !stat.split(") ").nth(1).is_some_and(|r| r.starts_with('Z'))
        }
    };
    assert!(pids.iter().all(|&pid| alive(pid)), "{pids:?}");
    p.child.kill().expect("kill -9 the coordinator");
    let _ = p.child.wait();
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|&pid| alive(pid)) {
        assert!(
            Instant::now() < deadline,
            "workers {pids:?} outlived their coordinator"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Issue: manifests held absolute part URLs, so a moved checkpoint directory
/// could not be resumed (and a copied one read the original's parts). Parts
/// are now named relative to their manifest.
#[test]
fn a_moved_checkpoint_directory_resumes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = dir.path().join("ckpt-a");
    let out = dir.path().join("moved.safetensors");
    let o = spawn_local(
        2,
        &first,
        &["--stop-at", "2"],
        worker_command(&out, &[]),
        &[],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let manifest =
        std::fs::read_to_string(first.join("step-00000002/manifest.json")).expect("manifest");
    assert!(
        !manifest.contains(&first.display().to_string()),
        "the manifest names its directory:\n{manifest}"
    );
    let moved = dir.path().join("elsewhere");
    std::fs::rename(&first, &moved).expect("move");
    let o = spawn_local(2, &moved, &["--resume"], worker_command(&out, &[]), &[]);
    let log = text(&o.stderr);
    assert!(o.status.success(), "{log}");
    assert!(
        log.contains("resuming from the latest committed checkpoint"),
        "{log}"
    );
    assert!(out.exists());
    assert_committed(&moved, STEPS.parse().expect("steps"), 2);
}

/// Issue: a missing checkpoint part read "object listed in the dataset
/// manifest is missing" behind "invalid input:". The error now names the
/// checkpoint, the rank and the part.
#[test]
fn a_missing_checkpoint_part_is_named() {
    let (_, _, ref_ckpt) = reference();
    let dir = tempfile::tempdir().expect("tempdir");
    let ckpt = dir.path().join("ckpt");
    copy_dir(ref_ckpt, &ckpt);
    let step = format!("step-{:08}", STEPS.parse::<u64>().expect("steps"));
    let part = ckpt.join(&step).join("rank-00001-of-00003.safetensors");
    std::fs::remove_file(&part).expect("remove a part");
    let out = dir.path().join("never.safetensors");
    // Named explicitly: `--resume` would fall back to an intact checkpoint.
    let from = format!("file://{}/{step}/manifest.json", ckpt.display());
    let o = spawn_local(
        2,
        &ckpt,
        &["--resume-from", &from],
        worker_command(&out, &[]),
        &[],
    );
    let log = strip_ansi(&text(&o.stderr));
    assert_eq!(o.status.code(), Some(1), "{log}");
    assert!(
        log.contains("the part of rank 1") && log.contains("is missing"),
        "{log}"
    );
    assert!(log.contains(&format!("{step}/manifest.json")), "{log}");
    assert!(!log.contains("dataset manifest"), "{log}");
    assert!(!out.exists());
}

/// `train` checkpoints its whole state (adaptor, AdamW moments, step, data
/// cursors) and `train --resume` continues a killed run to the same adaptor,
/// bit for bit, falling back over a broken newest checkpoint; the directory
/// has the coordinator's layout, so a distributed job resumes from it too.
#[test]
fn train_resume_continues_a_killed_run_bit_for_bit() {
    let (_, reference_out, _) = reference();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("single.safetensors");
    let ckpt = dir.path().join("single.ckpt");
    let mut flags = train_flags(&out);
    flags.extend(["--save-every", "2", "--keep-last", "0"].map(String::from));
    let train = |extra: &[&str], env: &[(&str, &str)]| {
        let mut c = Command::new(BIN);
        c.args(["--threads", "1", "train"]).args(&flags).args(extra);
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().expect("train")
    };
    // Killed (SIGKILL) during step 5: steps 2 and 4 are committed.
    let o = train(&[], &[("KVD_CHAOS", "kill:rank=0:step=5")]);
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&o.status),
        Some(9),
        "{}",
        text(&o.stderr)
    );
    assert_committed(&ckpt, 2, 1);
    assert_committed(&ckpt, 4, 1);
    assert!(!ckpt.join("step-00000006").exists());
    // Break the newest checkpoint: the resume falls back to step 2.
    let part = ckpt.join("step-00000004/rank-00000-of-00001.safetensors");
    let bytes = std::fs::read(&part).expect("part");
    std::fs::write(&part, &bytes[..bytes.len() / 2]).expect("truncate");
    let o = train(&["--resume"], &[]);
    let log = strip_ansi(&text(&o.stderr));
    assert!(o.status.success(), "{log}");
    assert!(
        log.contains("checkpoint not intact: falling back") && log.contains("step=4"),
        "{log}"
    );
    assert!(log.contains("resumed") && log.contains("step=2"), "{log}");
    assert_same_adaptor(&out, reference_out);
    assert_committed(&ckpt, 6, 1);

    // A distributed job of two workers resumes from the same directory (the
    // final step: it writes its adaptor and ends).
    let dist_out = dir.path().join("dist.safetensors");
    let o = spawn_local(2, &ckpt, &["--resume"], worker_command(&dist_out, &[]), &[]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_same_adaptor(&dist_out, reference_out);

    // Resuming a finished run trains nothing; more --steps train on.
    let o = train(&["--resume"], &[]);
    let log = strip_ansi(&text(&o.stderr));
    assert!(o.status.success(), "{log}");
    assert!(log.contains("nothing to train"), "{log}");
    assert_same_adaptor(&out, reference_out);
}

/// An allocation failure inside a step (injected: libtorch refuses a real
/// allocation) ends `train` with a typed out-of-memory error naming the
/// micro-batch and the fix, a non-zero status and no panic; the last
/// checkpoint is intact, and `--resume` finishes to the uninterrupted adaptor.
#[test]
fn an_allocation_failure_mid_step_is_named_and_keeps_the_checkpoint() {
    let (_, reference_out, _) = reference();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("oom.safetensors");
    let ckpt = dir.path().join("oom.ckpt");
    let mut flags = train_flags(&out);
    flags.extend(["--save-every", "2"].map(String::from));
    let o = Command::new(BIN)
        .args(["--threads", "1", "train"])
        .args(&flags)
        .env("KVD_CHAOS", "alloc:rank=0:step=3")
        .output()
        .expect("train");
    let log = strip_ansi(&text(&o.stderr));
    assert_eq!(o.status.code(), Some(1), "{log}");
    assert!(
        log.contains("out of memory in a micro-batch of 1 examples of up to")
            && log.contains("fix: a smaller --micro-batch"),
        "{log}"
    );
    assert!(
        !log.contains("panicked") && !log.contains("invalid input"),
        "{log}"
    );
    assert!(dir.path().join("oom.failed.safetensors").exists(), "{log}");
    assert_committed(&ckpt, 2, 1);
    let o = Command::new(BIN)
        .args(["--threads", "1", "train"])
        .args(&flags)
        .arg("--resume")
        .output()
        .expect("train --resume");
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_same_adaptor(&out, reference_out);
}

/// A micro-batch of several examples that runs out of memory (injected: a real
/// allocation failure) is run again as two halves: `train` warns and goes on,
/// with the partial gradients of the failed attempt dropped, so the adaptor
/// matches the reference (micro-batches of one) to float rounding.
#[test]
fn an_allocation_failure_in_a_larger_micro_batch_is_retried_in_halves() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Each step's (loss, gradient norm) from a JSON log.
    let steps = |log: &str| -> Vec<(f64, f64)> {
        log.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["fields"]["message"] == "step")
            .map(|v| {
                let f = &v["fields"];
                (
                    f["loss"].as_f64().unwrap(),
                    f["grad_norm"].as_f64().unwrap(),
                )
            })
            .collect()
    };
    let run = |name: &str, chaos: Option<&str>| {
        let mut flags = train_flags(&dir.path().join(name));
        let at = flags.iter().position(|f| f == "--micro-batch").unwrap();
        flags[at + 1] = "3".into();
        let mut cmd = Command::new(BIN);
        cmd.args(["--threads", "1", "--log-format", "json", "train"])
            .args(&flags);
        if let Some(c) = chaos {
            cmd.env("KVD_CHAOS", c);
        }
        let o = cmd.output().expect("train");
        let log = text(&o.stderr);
        assert!(o.status.success(), "{log}");
        log
    };
    let log = run("halves.safetensors", Some("alloc:rank=0:step=3"));
    assert_eq!(
        log.matches("out of memory in a micro-batch: running it again in two halves")
            .count(),
        1,
        "{log}"
    );
    assert!(log.contains(r#""examples":3"#), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    assert!(!dir.path().join("halves.failed.safetensors").exists());
    // The failure comes after the micro-batch's backward: without the
    // retry's restore its gradients would count twice and step 3's gradient
    // norm would be off. The same job without the failure differs only in
    // how step 3 is summed (each half's KL weighted by its share of the
    // supervised tokens, its selection loss by its share of the examples).
    let (got, want) = (steps(&log), steps(&run("clean.safetensors", None)));
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (g.0 - w.0).abs() <= 1e-4 * w.0.abs() && (g.1 - w.1).abs() <= 1e-4 * w.1.abs(),
            "step {}: (loss, grad norm) {g:?} vs {w:?}\n{got:?}\n{want:?}",
            i + 1
        );
    }
}

/// A row that cannot become an example stops `train` with an error that names
/// the file, row and column, and says how to get past it.
#[test]
fn a_bad_row_names_the_row_and_the_fix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("bad.safetensors");
    let mut flags: Vec<String> = train_flags(&out)
        .into_iter()
        .filter(|f| f != "--skip-bad-rows")
        .collect();
    // 40 tokens leave no room for a span beside most questions and answers.
    let at = flags.iter().position(|f| f == "--max-len").unwrap();
    flags[at + 1] = "40".into();
    let log = train_failing(&flags);
    assert!(
        log.contains("no room for span") && log.contains(".parquet") && log.contains("row "),
        "{log}"
    );
    assert!(
        log.contains("fix: a larger --max-len, or --skip-bad-rows"),
        "{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
}

/// `--select-answer-weight` adds to the selection loss's target, so it needs
/// `--select-weight` above 0: refused before any training, with both flags named.
#[test]
fn the_answer_weight_without_a_selection_loss_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut flags = train_flags(&dir.path().join("x.safetensors"));
    flags.extend(["--select-weight", "0", "--select-answer-weight", "1"].map(String::from));
    let log = train_failing(&flags);
    assert!(
        log.contains("--select-answer-weight 1") && log.contains("--select-weight above 0"),
        "{log}"
    );
    assert!(!dir.path().join("x.safetensors").exists());
    // Likewise scorer-only warm-up steps, which train on the selection loss alone.
    let mut flags = train_flags(&dir.path().join("y.safetensors"));
    flags.extend(["--select-weight", "0", "--select-warmup-steps", "3"].map(String::from));
    let log = train_failing(&flags);
    assert!(
        log.contains("--select-warmup-steps") && log.contains("--select-weight above 0"),
        "{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
}

/// A run of scorer-only warm-up steps alone trains, logs no KL, and says so
/// in its summary: no first or final loss (null), the selection loss logged.
#[test]
fn a_warm_up_only_run_reports_no_kl() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("warm.safetensors");
    let mut flags = train_flags_sized(&out, "2", "2");
    flags.extend(
        [
            "--select-weight",
            "1",
            "--select-warmup-steps",
            "2",
            "--checkpoint-dir",
        ]
        .map(String::from),
    );
    flags.push(dir.path().join("ckpt").to_string_lossy().into_owned());
    let o = Command::new(BIN)
        .args(["--threads", "1", "--log-format", "json", "train"])
        .args(&flags)
        .output()
        .expect("train");
    let log = text(&o.stderr);
    assert!(o.status.success(), "{log}");
    assert!(out.exists());
    let summary: serde_json::Value = serde_json::from_str(
        text(&o.stdout)
            .split("adaptor written")
            .next()
            .expect("summary")
            .trim(),
    )
    .expect("the summary is JSON");
    assert_eq!(summary["steps"], 2, "{summary}");
    assert!(summary["first_loss"].is_null(), "{summary}");
    assert!(summary["final_loss"].is_null(), "{summary}");
    let steps: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "step")
        .collect();
    assert_eq!(steps.len(), 2, "{log}");
    for s in &steps {
        assert!(s["fields"]["loss"].is_null(), "{s}");
        assert!(s["fields"]["select_loss"].as_f64().unwrap() > 0.0, "{s}");
    }
}

/// `train --step-phases` logs, at every log line, the mean seconds per step
/// of each phase of the step (what a job's time goes to, on the device where
/// a benchmark's shapes differ from the job's), and trains the same adaptor.
#[test]
fn train_step_phases_are_logged_and_change_nothing() {
    let (_, reference_out, _) = reference();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("phases.safetensors");
    let o = Command::new(BIN)
        .args([
            "--threads",
            "1",
            "--log-format",
            "json",
            "train",
            "--step-phases",
        ])
        .args(train_flags(&out))
        .output()
        .expect("train");
    let log = text(&o.stderr);
    assert!(o.status.success(), "{log}");
    let events: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .collect();
    let of = |m: &str| -> Vec<&serde_json::Value> {
        events
            .iter()
            .filter(|v| v["fields"]["message"] == m)
            .collect()
    };
    let phases = of("step phases");
    assert_eq!(phases.len(), STEPS.parse::<usize>().unwrap(), "{log}");
    assert_eq!(of("step").len(), phases.len(), "one per logged step: {log}");
    for (i, p) in phases.iter().enumerate() {
        assert_eq!(p["fields"]["step"], i as u64 + 1, "{p}");
        let per_step: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(p["fields"]["phases_s"].as_str().expect("phases_s"))
                .expect("phases_s is a JSON object");
        for name in [
            "teacher",
            "scorer",
            "encoder",
            "decoder",
            "kl",
            "backward",
            "optimizer",
        ] {
            let t = per_step.get(name).and_then(|v| v.as_f64());
            assert!(t.is_some_and(|t| t > 0.0), "{name} missing or zero: {p}");
        }
    }
    assert_same_adaptor(&out, reference_out);
}

/// A checkpoint directory in which no checkpoint can be written: a plain
/// file stands where each step's directory would go (even root cannot create
/// a directory there, and the local store does not retry).
fn unwritable_checkpoints(ckpt: &Path, steps: &[u64]) {
    std::fs::create_dir_all(ckpt).expect("mkdir");
    for step in steps {
        std::fs::write(ckpt.join(format!("step-{step:08}")), b"in the way").expect("blocker");
    }
}

/// Issue 19 #2: checkpoints that could not be written were only worker
/// warnings; the job trained on and exited 0 with nothing saved. Each failed
/// checkpoint is now reported to the coordinator, which logs it (step, rank,
/// reason) and fails the job after --max-checkpoint-failures in a row.
#[test]
fn failed_checkpoints_in_a_row_fail_the_job() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ckpt = dir.path().join("ckpt");
    unwritable_checkpoints(&ckpt, &[2, 4, 6]);
    let out = dir.path().join("x.safetensors");
    let o = spawn_local(
        2,
        &ckpt,
        &["--max-checkpoint-failures", "2"],
        worker_command(&out, &[]),
        &[],
    );
    let log = strip_ansi(&text(&o.stderr));
    assert_eq!(o.status.code(), Some(1), "{log}");
    // Each failure is logged by the coordinator with its step, rank and reason.
    for step in [2, 4] {
        assert!(
            log.lines().any(|l| l.contains("checkpoint failed")
                && l.contains(&format!("step={step}"))
                && (l.contains("rank 0:") || l.contains("rank 1:"))
                && l.contains(&format!("step-{step:08}"))),
            "step {step}:\n{log}"
        );
    }
    assert!(
        log.contains("job failed")
            && log.contains("2 checkpoints in a row could not be written")
            && log.contains("max_checkpoint_failures = 2"),
        "{log}"
    );
    // It stopped at the second failure, before the final step.
    assert!(
        !log.lines()
            .any(|l| l.contains(" step rank=") && l.contains(" step=6 ")),
        "{log}"
    );
    assert!(!out.exists());
}

/// Issue 19 #7: a SIGTERM'd worker died without a word; its rank was freed
/// only after the heartbeat timeout, while its replacement was refused twice
/// a second. It now finishes its step, leaves (the coordinator frees the rank
/// at once) and exits 143; the job goes on and ends as if uninterrupted.
#[test]
fn a_worker_stopped_by_sigterm_leaves_and_its_rank_is_freed_at_once() {
    let (_, reference_out, _) = reference();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("term.safetensors");
    let marker = dir.path().join("chaos-fired");
    // A heartbeat timeout longer than the rest of the job: only a leave frees
    // the rank in time.
    let o = spawn_local_with(
        3,
        20,
        &dir.path().join("ckpt"),
        &[],
        worker_command(&out, &[]),
        &[
            ("KVD_CHAOS", "term:rank=1:step=3:at=step".to_string()),
            ("KVD_CHAOS_ONCE", marker.to_string_lossy().into_owned()),
        ],
    );
    let log = strip_ansi(&text(&o.stderr));
    assert!(o.status.success(), "{log}");
    assert!(marker.exists(), "the signal was never sent");
    assert!(
        log.contains("worker left the job") && log.contains("SIGTERM after step 3"),
        "{log}"
    );
    assert!(!log.contains("declared dead"), "{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("worker died: starting it again") && l.contains("143")),
        "{log}"
    );
    let refused = log
        .lines()
        .filter(|l| l.contains("rpc=\"Register\"") && l.contains("WARN"))
        .count();
    assert!(refused <= 1, "{refused} registration warnings:\n{log}");
    assert!(log.contains("resumed from checkpoint"), "{log}");
    assert_same_adaptor(&out, reference_out);
}

/// Issue 19 #8: transport failures read "invalid input: ..." and errors
/// printed a "Caused by:" block repeating the message.
#[test]
fn an_unreachable_coordinator_is_a_transport_error_in_one_block() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let cmd = worker_command(
        &dir.path().join("x.safetensors"),
        &["--coordinator-timeout-s", "1"],
    );
    let o = wait_output(
        start_worker(port, Some(0), TOKEN, &cmd),
        Duration::from_secs(120),
        "a worker without a coordinator",
    );
    let err = strip_ansi(&text(&o.stderr));
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "Error: cannot connect to the coordinator at 127.0.0.1:{port}"
        )),
        "{err}"
    );
    assert!(err.to_lowercase().contains("connection refused"), "{err}");
    assert!(!err.contains("invalid input"), "{err}");
    assert!(!err.contains("Caused by"), "{err}");
}

/// Issue 19 #9: a newest checkpoint with a truncated part stopped `--resume`
/// although an older intact one was kept. The coordinator now skips it,
/// saying which and why, and the job continues from the older one to the
/// same adaptor as the uninterrupted run.
#[test]
fn resume_falls_back_over_a_truncated_newest_checkpoint() {
    let (_, reference_out, ref_ckpt) = reference();
    let dir = tempfile::tempdir().expect("tempdir");
    let ckpt = dir.path().join("ckpt");
    copy_dir(ref_ckpt, &ckpt);
    // Keep steps 2 and 4; truncate a part of step 4, the newest.
    std::fs::remove_dir_all(ckpt.join("step-00000006")).expect("rm step 6");
    let part = ckpt.join("step-00000004/rank-00001-of-00003.safetensors");
    let bytes = std::fs::read(&part).expect("part");
    std::fs::write(&part, &bytes[..bytes.len() - 100]).expect("truncate");
    let out = dir.path().join("fallback.safetensors");
    let o = spawn_local(3, &ckpt, &["--resume"], worker_command(&out, &[]), &[]);
    let log = strip_ansi(&text(&o.stderr));
    assert!(o.status.success(), "{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("checkpoint not intact: skipped")
                && l.contains("step=4")
                && l.contains("the part of rank 1")
                && l.contains("is truncated")),
        "{log}"
    );
    assert!(
        log.lines().any(
            |l| l.contains("resuming from the latest committed checkpoint")
                && l.contains("step-00000002/manifest.json")
        ),
        "{log}"
    );
    assert_same_adaptor(&out, reference_out);
    // Step 4 was checkpointed again over the broken one.
    assert_committed(&ckpt, 4, 3);
    let again = std::fs::read(&part).expect("part");
    assert_eq!(again.len(), bytes.len());
}
