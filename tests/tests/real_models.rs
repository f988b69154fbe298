//! The real SmolLM2-135M-Instruct and Gemma-3-270m GGUF files against
//! transformers' own GGUF loading: logits, perplexity, and a chat answer.

use kvd_tests::env::{assets, cached_oracle, gemma3_gguf, smollm2_gguf};
use kvd_trainer::checkpoint::Checkpoint;
use kvd_trainer::generate::{generate, mean_nll, GenerateOptions, Sampling};
use kvd_trainer::model::{Input, Model};
use kvd_trainer::tokenizer::{ChatMessage, Tokenizer};
use std::path::Path;
use std::sync::{Mutex, MutexGuard, OnceLock};
use tch::{Device, Kind, Tensor};

/// The essay whose first 1024 tokens are scored.
fn essay() -> std::path::PathBuf {
    assets().join("essays/worked.txt")
}

/// A model, its tokenizer and transformers' reference outputs.
struct Real {
    model: Model,
    tok: Tokenizer,
    prompt: String,
    prompt_ids: Tensor,
    prompt_logits: Tensor,
    essay_ids: Tensor,
    ref_nll: f64,
}

fn load(gguf: &Path) -> Real {
    let (dir, out) = cached_oracle(
        "gguf_reference.py",
        &[
            gguf.to_str().expect("utf-8"),
            essay().to_str().expect("utf-8"),
        ],
    );
    let json: serde_json::Value =
        serde_json::from_str(out.lines().last().unwrap_or("")).expect("oracle JSON");
    let tensors = Tensor::read_safetensors(dir.join("reference.safetensors")).expect("reference");
    let get = |n: &str| {
        tensors
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, t)| t.shallow_clone())
            .expect("reference tensor")
    };
    let (model, tok) = Checkpoint::open(gguf)
        .and_then(|c| c.load(Kind::Float, Device::Cpu))
        .unwrap_or_else(|e| panic!("{e}"));
    Real {
        model,
        tok,
        prompt: json["prompt"].as_str().expect("prompt").to_string(),
        prompt_ids: get("prompt_ids"),
        prompt_logits: get("prompt_logits"),
        essay_ids: get("essay_ids"),
        ref_nll: json["nll"].as_f64().expect("nll"),
    }
}

fn smollm2() -> MutexGuard<'static, Real> {
    static R: OnceLock<Mutex<Real>> = OnceLock::new();
    R.get_or_init(|| Mutex::new(load(&smollm2_gguf())))
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

fn gemma3() -> MutexGuard<'static, Real> {
    static R: OnceLock<Mutex<Real>> = OnceLock::new();
    R.get_or_init(|| Mutex::new(load(&gemma3_gguf())))
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

fn ids_vec(t: &Tensor) -> Vec<u32> {
    Vec::<i64>::try_from(t.flatten(0, -1))
        .expect("ids")
        .into_iter()
        .map(|i| i as u32)
        .collect()
}

fn check_logits(r: &Real, name: &str) {
    let ids = r.tok.encode(&r.prompt, true).expect("encode");
    assert_eq!(
        ids,
        ids_vec(&r.prompt_ids),
        "{name}: prompt token ids differ from transformers'"
    );
    let logits =
        tch::no_grad(|| r.model.forward(Input::new(&r.prompt_ids), None)).expect("forward");
    let d = (logits - &r.prompt_logits).abs().max().double_value(&[]);
    assert!(d < 1e-3, "{name}: logits max abs diff {d} vs transformers");
}

fn check_perplexity(r: &Real, name: &str) {
    let text = std::fs::read_to_string(essay()).expect("essay");
    let mut ids = r.tok.encode(&text, true).expect("encode");
    ids.truncate(1024);
    assert_eq!(
        ids,
        ids_vec(&r.essay_ids),
        "{name}: essay token ids differ from transformers'"
    );
    let nll = mean_nll(&r.model, &ids).expect("nll");
    let (ppl, ref_ppl) = (nll.exp(), r.ref_nll.exp());
    let rel = (ppl - ref_ppl).abs() / ref_ppl;
    assert!(
        rel < 0.01,
        "{name}: perplexity {ppl:.4} vs transformers {ref_ppl:.4} ({:.3}% off)",
        rel * 100.0
    );
}

#[test]
fn smollm2_logits_match_transformers_gguf() {
    check_logits(&smollm2(), "SmolLM2");
}

#[test]
fn smollm2_perplexity_matches_transformers() {
    check_perplexity(&smollm2(), "SmolLM2");
}

#[test]
fn smollm2_chat_answers_paris() {
    let r = smollm2();
    let prompt = r
        .tok
        .apply_chat_template(
            &[ChatMessage {
                role: "user".into(),
                content: "What is the capital of France?".into(),
            }],
            true,
        )
        .expect("chat template");
    let ids = r.tok.encode(&prompt, false).expect("encode");
    let opts = GenerateOptions {
        max_new_tokens: 24,
        sampling: Sampling::Greedy,
        stop_tokens: r.tok.stop_token_ids().to_vec(),
    };
    let out = generate(&r.model, &ids, None, &opts, |_| {}).expect("generate");
    let answer = r.tok.decode(&out, true).expect("decode");
    assert!(answer.contains("Paris"), "answer was {answer:?}");
}

#[test]
fn gemma3_logits_match_transformers_gguf() {
    check_logits(&gemma3(), "Gemma-3-270m");
}

#[test]
fn gemma3_perplexity_matches_transformers() {
    check_perplexity(&gemma3(), "Gemma-3-270m");
}
