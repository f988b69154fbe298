//! Locations the tests share with `scripts/setup.sh`: the Python venv that holds
//! the oracles (HF transformers, gguf-py) and the fetched real assets.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Root of the cache that `scripts/setup.sh` fills (`$KVD_CACHE`, default `~/.cache/kv-distill`).
pub fn cache_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("KVD_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    PathBuf::from(home).join(".cache/kv-distill")
}

/// The oracle's Python interpreter (`$KVD_PYTHON`, default the setup venv's).
pub fn python() -> PathBuf {
    std::env::var("KVD_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| cache_dir().join("venv/bin/python"))
}

/// The fetched models and data (`$KVD_ASSETS`, default `$KVD_CACHE/assets`).
pub fn assets() -> PathBuf {
    std::env::var("KVD_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| cache_dir().join("assets"))
}

/// The root of the QA sources (`assets/bigbench`, or where the registry no
/// longer serves it, `assets/qa-substitute`: [`kvd_data::prepare::qa_root`]).
pub fn qa_sources() -> PathBuf {
    qa_sources_kind().0
}

/// [`qa_sources`] and which of the two it is.
pub fn qa_sources_kind() -> (PathBuf, kvd_data::prepare::QaSources) {
    kvd_data::prepare::qa_root(&assets()).expect("QA sources: run scripts/setup.sh")
}

/// The real SmolLM2-135M-Instruct GGUF file.
pub fn smollm2_gguf() -> PathBuf {
    assets().join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// The real Gemma-3-270m GGUF file.
pub fn gemma3_gguf() -> PathBuf {
    assets().join("gemma3/gemma-3-270m-q4_k_m.gguf")
}

/// Path of an oracle script in `tests/oracle/`.
pub fn oracle_script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("oracle")
        .join(name)
}

/// Runs `tests/oracle/<script>` with the oracle Python and returns its stdout.
/// Panics with the script's stderr when it fails: a test cannot go on without its oracle.
pub fn run_oracle(script: &str, args: &[&str]) -> String {
    let out = Command::new(python())
        .arg(oracle_script(script))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_VERBOSITY", "error")
        .env("TOKENIZERS_PARALLELISM", "false")
        .output()
        .unwrap_or_else(|e| panic!("cannot start oracle python {:?}: {e}", python()));
    assert!(
        out.status.success(),
        "oracle {script} {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("oracle printed non-UTF-8")
}

/// Output of `tests/oracle/tiny_models.py` (tiny random HF checkpoints with
/// transformers' logits) plus `gguf/` from `tiny_gguf.py`, made once per test
/// binary. `KVD_TINY_ORACLE_DIR` reuses an existing directory (for debugging).
pub fn tiny_models() -> &'static Path {
    static DIR: OnceLock<(Option<tempfile::TempDir>, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        if let Ok(existing) = std::env::var("KVD_TINY_ORACLE_DIR") {
            return (None, PathBuf::from(existing));
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().to_path_buf();
        let p = path.to_str().expect("utf-8 temp path");
        run_oracle("tiny_models.py", &[p]);
        run_oracle(
            "tiny_gguf.py",
            &[p, path.join("gguf").to_str().expect("utf-8")],
        );
        (Some(dir), path)
    })
    .1
}

/// Runs `tests/oracle/<script> ARGS... OUT_DIR` once and keeps OUT_DIR (with the
/// script's stdout in `stdout.txt`) under `$KVD_CACHE/oracle/<key>`, where the key
/// is the sha256 of the script's bytes and the arguments. Later calls, and
/// `scripts/warm_oracles.sh` (which `make test` starts while cargo compiles),
/// reuse it. Returns the directory and the stdout.
pub fn cached_oracle(script: &str, args: &[&str]) -> (PathBuf, String) {
    use sha2::{Digest, Sha256};
    let body = std::fs::read(oracle_script(script)).expect("oracle script");
    let mut h = Sha256::new();
    h.update(&body);
    for a in args {
        h.update(b"\0");
        h.update(a.as_bytes());
    }
    let key: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    let root = cache_dir().join("oracle");
    std::fs::create_dir_all(&root).expect("oracle cache dir");
    let dir = root.join(&key);
    let done = dir.join("done");
    // Serialise with other test binaries and scripts/warm_oracles.sh (flock).
    let lock = std::fs::File::create(root.join(format!("{key}.lock"))).expect("oracle lock file");
    lock.lock().expect("lock oracle cache");
    if !done.exists() {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("oracle cache dir");
        let mut all: Vec<&str> = args.to_vec();
        let d = dir.to_str().expect("utf-8 cache path");
        all.push(d);
        let out = run_oracle(script, &all);
        std::fs::write(dir.join("stdout.txt"), out).expect("write oracle stdout");
        std::fs::write(&done, key.as_bytes()).expect("write oracle marker");
    }
    let stdout = std::fs::read_to_string(dir.join("stdout.txt")).expect("oracle stdout");
    drop(lock);
    (dir, stdout)
}
