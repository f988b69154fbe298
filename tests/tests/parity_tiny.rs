//! Parity against HF transformers on tiny random checkpoints of every supported
//! family: full forward, incremental decoding with the KV cache, and padding.

use kvd_tests::env::tiny_models;
use kvd_trainer::checkpoint::Checkpoint;
use kvd_trainer::model::{Input, Model, NoHooks};
use tch::{Device, Kind, Tensor};

struct Case {
    model: Model,
    ids: Tensor,
    logits: Tensor,
}

fn oracle(dir: &std::path::Path) -> (Tensor, Tensor) {
    let tensors = Tensor::read_safetensors(dir.join("oracle.safetensors")).expect("oracle file");
    let get = |n: &str| {
        tensors
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, t)| t.shallow_clone())
            .expect("oracle tensor")
    };
    (get("input_ids"), get("logits"))
}

fn case(name: &str) -> Case {
    let dir = tiny_models().join(name);
    let model = Checkpoint::open(&dir)
        .and_then(|c| c.load_model(Kind::Float, Device::Cpu))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let (ids, logits) = oracle(&dir);
    Case { model, ids, logits }
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

/// Full forward equals transformers' logits.
fn full_forward(name: &str) {
    let c = case(name);
    let out = tch::no_grad(|| c.model.forward(Input::new(&c.ids), None)).expect("forward");
    let d = max_diff(&out, &c.logits);
    assert!(d < 1e-4, "{name}: full forward max abs diff {d}");
}

/// Prefill + one-token steps + a chunk through the cache equals the full forward.
fn incremental(name: &str) {
    let c = case(name);
    let t = c.ids.size()[1];
    let mut cache = c.model.new_cache();
    let mut pieces = Vec::new();
    let mut start = 0;
    for len in [5, 1, 1, 1, 7] {
        let ids = c.ids.narrow(1, start, len);
        pieces.push(
            tch::no_grad(|| c.model.forward(Input::new(&ids), Some(&mut cache))).expect("step"),
        );
        start += len;
    }
    while start < t {
        let ids = c.ids.narrow(1, start, 1);
        pieces.push(
            tch::no_grad(|| c.model.forward(Input::new(&ids), Some(&mut cache))).expect("step"),
        );
        start += 1;
    }
    assert_eq!(cache.len(), t);
    let out = Tensor::cat(&pieces, 1);
    let d = max_diff(&out, &c.logits);
    assert!(d < 1e-4, "{name}: incremental decoding max abs diff {d}");
}

/// Left padding with a validity mask and explicit positions leaves the real tokens' logits unchanged.
fn left_padding(name: &str) {
    let c = case(name);
    let pad = 3;
    let row = c.ids.narrow(0, 0, 1);
    let t = row.size()[1];
    let ids = Tensor::cat(
        &[Tensor::zeros([1, pad], (Kind::Int64, Device::Cpu)), row],
        1,
    );
    let valid = Tensor::cat(
        &[
            Tensor::zeros([1, pad], (Kind::Bool, Device::Cpu)),
            Tensor::ones([1, t], (Kind::Bool, Device::Cpu)),
        ],
        1,
    );
    let positions = (Tensor::arange(t + pad, (Kind::Int64, Device::Cpu)) - pad)
        .clamp_min(0)
        .unsqueeze(0);
    let out = tch::no_grad(|| {
        c.model.forward(
            Input::new(&ids)
                .with_positions(&positions)
                .with_valid(&valid),
            None,
        )
    })
    .expect("forward");
    let d = max_diff(&out.narrow(1, pad, t), &c.logits.narrow(0, 0, 1));
    assert!(d < 1e-4, "{name}: left-padded max abs diff {d}");
}

/// `fill_cache` (the last layer computes only its K/V) leaves the same cache
/// as a full forward, bit for bit, and decoding on it gives the same logits.
fn cache_only(name: &str) {
    let c = case(name);
    let t = c.ids.size()[1];
    let prefix = c.ids.narrow(1, 0, t - 4);
    let (mut full, mut filled) = (c.model.new_cache(), c.model.new_cache());
    tch::no_grad(|| {
        let _ = c
            .model
            .forward(Input::new(&prefix), Some(&mut full))
            .expect("forward");
        c.model
            .fill_cache(Input::new(&prefix), &mut filled, &NoHooks)
            .expect("fill_cache");
    });
    assert_eq!(filled.len(), full.len());
    for i in 0..filled.num_layers() {
        let (a, b) = (
            full.layer(i).expect("layer"),
            filled.layer(i).expect("layer"),
        );
        assert!(
            a.k.equal(&b.k) && a.v.equal(&b.v),
            "{name}: layer {i} K/V differ"
        );
    }
    let rest = c.ids.narrow(1, t - 4, 4);
    let out =
        tch::no_grad(|| c.model.forward(Input::new(&rest), Some(&mut filled))).expect("decode");
    let d = max_diff(&out, &c.logits.narrow(1, t - 4, 4));
    assert!(
        d < 1e-4,
        "{name}: decoding on the filled cache max abs diff {d}"
    );
}

/// `layer_states` then `resume_hidden` from the same layer computes what one
/// `forward_hidden` does, bit for bit, wherever the split falls.
fn resumed(name: &str) {
    let c = case(name);
    let layers = c.model.config().num_layers;
    let input = || Input::new(&c.ids);
    let whole = tch::no_grad(|| c.model.forward_hidden(input(), None)).expect("forward");
    for at in [0, 1, layers] {
        let out = tch::no_grad(|| {
            let states = c.model.layer_states(input(), at)?;
            c.model.resume_hidden(input(), &states, at)
        })
        .expect("resume");
        assert!(
            out.equal(&whole),
            "{name}: resuming after layer {at} differs"
        );
    }
    let states = tch::no_grad(|| c.model.layer_states(input(), 1)).expect("states");
    let err = c
        .model
        .resume_hidden(input(), &states.narrow(1, 0, 1), 1)
        .expect_err("wrong shape");
    assert!(err.to_string().contains("cannot resume"), "{err}");
    assert!(c.model.resume_hidden(input(), &states, layers + 1).is_err());
}

macro_rules! family {
    ($m:ident, $name:literal) => {
        mod $m {
            #[test]
            fn full_forward_matches_transformers() {
                super::full_forward($name);
            }
            #[test]
            fn incremental_decoding_matches_transformers() {
                super::incremental($name);
            }
            #[test]
            fn left_padding_keeps_logits() {
                super::left_padding($name);
            }
            #[test]
            fn fill_cache_equals_the_full_forward_cache() {
                super::cache_only($name);
            }
            #[test]
            fn resuming_after_any_layer_equals_the_full_forward() {
                super::resumed($name);
            }
        }
    };
}

family!(llama, "llama");
family!(qwen2, "qwen2");
family!(mistral, "mistral");
family!(gemma3, "gemma3");

/// The tiny Llama written as llama.cpp writes GGUF (permuted Q/K rows, Llama 3
/// RoPE as `rope_freqs.weight`) loads to the same logits as transformers'.
#[test]
fn llama_gguf_matches_transformers() {
    let model = Checkpoint::open(&tiny_models().join("gguf/llama.gguf"))
        .and_then(|c| c.load_model(Kind::Float, Device::Cpu))
        .unwrap_or_else(|e| panic!("{e}"));
    let (ids, logits) = oracle(&tiny_models().join("llama"));
    let out = tch::no_grad(|| model.forward(Input::new(&ids), None)).expect("forward");
    let d = max_diff(&out, &logits);
    assert!(d < 1e-4, "GGUF llama: max abs diff {d}");
}
