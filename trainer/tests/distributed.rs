//! The distributed job as users run it: the `coordinator` binary and
//! `kv-distill worker` processes over loopback gRPC, the CPU (TCP) collective,
//! checkpoints in `file://`, on the real SmolLM2 GGUF with tiny shapes.
//!
//! Every run trains the same 6 steps of 3 examples (one micro-batch each),
//! with 1 libtorch thread per process, so the final adaptors can be compared
//! bit for bit: single process, 3 workers, 3 workers with a worker killed
//! mid-step or mid-upload, a coordinator restart, and a resume with 2 workers.

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

fn assets() -> PathBuf {
    if let Ok(a) = std::env::var("KVD_ASSETS") {
        return a.into();
    }
    let cache = std::env::var("KVD_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
                .join(".cache/kv-distill")
        });
    cache.join("assets")
}

fn smollm2() -> String {
    assets()
        .join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        .to_string_lossy()
        .into_owned()
}

/// A small QA dataset (SQuAD-shifts new_wiki paragraphs), written once.
fn dataset() -> &'static str {
    static DATA: OnceLock<(tempfile::TempDir, String)> = OnceLock::new();
    &DATA
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("tempdir");
            let rows = read_squad(
                &assets().join("bigbench/squad_shifts/new_wiki_v1.0.json"),
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
    [
        "--model",
        &smollm2(),
        "--device",
        "cpu",
        "--data",
        dataset(),
        "--steps",
        STEPS,
        "--global-batch",
        "3",
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
    let mut v = vec![
        BIN.to_string(),
        "--threads".into(),
        "1".into(),
        "worker".into(),
    ];
    v.extend(train_flags(out));
    v.extend(["--checkpoint-every".into(), "2".into()]);
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs a child to completion with a deadline.
fn wait_output(mut child: Child, limit: Duration, what: &str) -> Output {
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait().expect("poll").is_some() {
            return child.wait_with_output().expect("output");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!("{what} did not finish in {limit:?}:\n{}", text(&out.stderr));
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
    let mut cmd = Command::new(coordinator_bin());
    cmd.args([
        "--workers",
        &workers.to_string(),
        "--listen",
        "127.0.0.1:0",
        "--heartbeat-timeout-s",
        "3",
    ])
    .args(["--checkpoint-url", &format!("file://{}", ckpt.display())])
    .args(extra)
    .arg("--spawn-local")
    .arg("--")
    .args(worker)
    .env("KVD_TOKEN", TOKEN)
    .env("RUST_BACKTRACE", "0")
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    wait_output(
        cmd.spawn().expect("start coordinator"),
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

#[test]
fn three_workers_equal_the_single_process_trainer_bit_for_bit() {
    let (dir, dist, ckpt) = reference();
    let single = dir.path().join("single.safetensors");
    let mut args = vec!["--threads".to_string(), "1".into(), "train".into()];
    args.extend(train_flags(&single));
    let o = Command::new(BIN).args(&args).output().expect("train");
    assert!(
        o.status.success(),
        "single-process train failed:\n{}",
        text(&o.stderr)
    );
    assert_same_adaptor(&single, dist);
    // Checkpoints of steps 2, 4, 6 were committed, each with 3 parts.
    for step in [2, 4, 6] {
        let m = std::fs::read_to_string(ckpt.join(format!("step-{step:08}/manifest.json")))
            .expect("manifest");
        let m = kvd_proto::CheckpointManifest::from_json(&m).expect("manifest parses");
        assert_eq!((m.step, m.world_size, m.parts.len()), (step, 3, 3));
        assert!(m.data_cursor.is_some());
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
}
