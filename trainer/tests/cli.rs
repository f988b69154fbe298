//! The `kv-distill` binary as a user runs it, on the real SmolLM2 GGUF fetched
//! by `scripts/setup.sh`.

use std::path::PathBuf;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_kv-distill");

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

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("start kv-distill")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn generate_chat_answers_paris() {
    let m = smollm2();
    let out = run(&[
        "generate",
        "--model",
        &m,
        "--device",
        "cpu",
        "--chat",
        "--prompt",
        "What is the capital of France?",
        "--max-new-tokens",
        "24",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("Paris"),
        "stdout: {}",
        text(&out.stdout)
    );
    assert!(
        text(&out.stderr).contains("generation done"),
        "stderr: {}",
        text(&out.stderr)
    );
}

#[test]
fn perplexity_and_info_run() {
    let m = smollm2();
    let essay = assets().join("essays/worked.txt");
    let out = run(&[
        "perplexity",
        "--model",
        &m,
        "--device",
        "cpu",
        "--file",
        essay.to_str().expect("utf-8"),
        "--max-tokens",
        "128",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    let ppl: f64 = s
        .split_whitespace()
        .find_map(|w| w.strip_prefix("perplexity="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no perplexity in {s}"));
    assert!(ppl > 1.0 && ppl < 200.0, "implausible perplexity {ppl}");
    let info = run(&["info", "--model", &m]);
    assert!(info.status.success());
    let s = text(&info.stdout);
    assert!(s.contains("Llama") && s.contains("num_layers: 30"), "{s}");
}

#[test]
fn missing_model_is_a_clear_error() {
    let out = run(&[
        "generate",
        "--model",
        "/no/such/model.gguf",
        "--prompt",
        "hi",
    ]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("/no/such/model.gguf"), "stderr: {err}");
    assert!(!err.contains("panicked"), "stderr: {err}");
}
