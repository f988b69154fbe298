//! Recomputing the student encoder in the backward (`Backward::Recompute`,
//! `train --recompute-encoder`) gives the gradients of the ordinary backward
//! through kept activations, on tiny random models of three families (CPU,
//! float32): Llama (GQA), Mistral (sliding window: explicit masks) and Gemma 3
//! (local/global layers, sandwich norms, QK-norm).

use kvd_tests::env::tiny_models;
use kvd_trainer::checkpoint::Checkpoint;
use kvd_trainer::distill::{
    distill_step, Adaptor, Backward, DistillConfig, DistillExample, LoraConfig, ScoreFeed,
    TrainConfig, Trainer,
};
use kvd_trainer::model::{Model, Proj};
use tch::{Device, Kind, Tensor};

fn model(family: &str) -> Model {
    Checkpoint::open(&tiny_models().join(family))
        .and_then(|c| c.load_model(Kind::Float, Device::Cpu))
        .unwrap_or_else(|e| panic!("tiny {family}: {e}"))
}

/// Every option that touches the encoder: LoRA on attention and MLP, K/V
/// adaptors at every position, sinks, the σ(s) feed, the selection loss.
fn cfg() -> DistillConfig {
    DistillConfig {
        scorer_layer: 1,
        lora: LoraConfig {
            targets: vec![Proj::Q, Proj::K, Proj::V, Proj::O, Proj::Up],
            kv_all_tokens: true,
            ..LoraConfig::default()
        },
        score_feed: ScoreFeed::LogSigmoid,
        sinks: 2,
        select_weight: 1.0,
        ..DistillConfig::default()
    }
}

/// An adaptor whose LoRA B matrices are non-zero, so every LoRA tensor gets a
/// gradient. Its values are a function of the names alone (other tests in
/// this process draw from the global generator at the same time).
fn adaptor(m: &Model, cfg: &DistillConfig) -> Adaptor {
    let a = Adaptor::new(m.config(), cfg.clone(), Device::Cpu, 7).expect("adaptor");
    tch::no_grad(|| {
        for (i, (name, mut v)) in a.named_trainable().into_iter().enumerate() {
            let n = v.numel() as i64;
            let wave = (Tensor::arange(n, (Kind::Float, Device::Cpu)) * 0.37 + i as f64).sin();
            let scale = if name.ends_with(".b") { 0.05 } else { 0.2 };
            v.copy_(&(wave * scale).view(v.size().as_slice()));
        }
    });
    a
}

/// Three examples of different lengths (so the batch is padded), two spans in one.
fn batch(vocab: u64) -> Vec<DistillExample> {
    let t = |n, seed| kvd_tests::tokens::lcg_tokens(n, seed, 3, vocab);
    vec![
        DistillExample {
            context: t(40, 1),
            spans: vec![(1, 39)],
            suffix: t(9, 2),
            ratio: 0.25,
            answer: None,
            context_answers: Vec::new(),
        },
        DistillExample {
            context: t(27, 3),
            spans: vec![(1, 12), (15, 12)],
            suffix: t(12, 4),
            ratio: 0.5,
            answer: None,
            context_answers: Vec::new(),
        },
        DistillExample {
            context: t(33, 5),
            spans: vec![(2, 31)],
            suffix: t(6, 6),
            ratio: 0.1,
            answer: None,
            context_answers: Vec::new(),
        },
    ]
}

/// The loss and every trainable tensor's gradient after one step.
fn step_grads(m: &Model, backward: Backward) -> (f64, Vec<(String, Tensor)>) {
    let cfg = cfg();
    let a = adaptor(m, &cfg);
    let b = batch(m.config().vocab_size as u64);
    let s = distill_step(m, &a, &cfg, &b, 0.5, backward, None).expect("step");
    let grads = a
        .named_trainable()
        .into_iter()
        .map(|(k, t)| {
            let g = t.grad();
            (k, if g.defined() { g.copy() } else { g })
        })
        .collect();
    (s.loss, grads)
}

#[test]
fn recomputing_the_encoder_gives_the_stored_backwards_gradients() {
    for family in ["llama", "mistral", "gemma3"] {
        let m = model(family);
        let (loss, stored) = step_grads(&m, Backward::Stored);
        let (loss_r, recomputed) = step_grads(&m, Backward::Recompute);
        assert_eq!(loss, loss_r, "{family}: the forward is the same");
        let mut lora_grads = 0;
        for ((name, g), (name_r, g_r)) in stored.iter().zip(&recomputed) {
            assert_eq!(name, name_r);
            assert!(g.defined() && g_r.defined(), "{family} {name}: no gradient");
            let scale = g.abs().max().double_value(&[]);
            let diff = (g - g_r).abs().max().double_value(&[]);
            assert!(
                diff <= 1e-5 * scale.max(1e-6),
                "{family} {name}: gradients differ by {diff} (largest {scale})"
            );
            if name.starts_with("lora") && scale > 0.0 {
                lora_grads += 1;
            }
        }
        assert!(
            lora_grads >= stored.len() / 2,
            "{family}: the LoRA tensors are trained ({lora_grads} of {})",
            stored.len()
        );
    }
}

#[test]
fn a_trainer_that_recomputes_takes_the_same_steps() {
    let m = model("llama");
    let run = |recompute: bool| {
        let cfg = cfg();
        let a = adaptor(&m, &cfg);
        let mut t = Trainer::new(
            &a,
            TrainConfig {
                total_steps: 3,
                warmup_steps: 1,
                grad_accum: 2,
                ..TrainConfig::default()
            },
        )
        .expect("trainer");
        t.recompute_encoder(recompute);
        let b = batch(m.config().vocab_size as u64);
        let micro = [b[..2].to_vec(), b[2..].to_vec()];
        let losses: Vec<f64> = (0..3)
            .map(|_| t.train_step(&m, &a, &micro).expect("step").loss)
            .collect();
        (losses, a.trainable())
    };
    let (losses, weights) = run(false);
    let (losses_r, weights_r) = run(true);
    for (l, r) in losses.iter().zip(&losses_r) {
        assert!(
            (l - r).abs() <= 1e-5 * l.abs(),
            "{losses:?} vs {losses_r:?}"
        );
    }
    assert!(losses[2] != losses[0], "the steps update the adaptor");
    for (w, r) in weights.iter().zip(&weights_r) {
        let diff = (w - r).abs().max().double_value(&[]);
        assert!(diff <= 1e-5, "weights differ by {diff}");
    }
}

#[test]
fn recomputing_refuses_lora_dropout() {
    let m = model("llama");
    let mut cfg = cfg();
    cfg.lora.dropout = 0.1;
    let a = adaptor(&m, &cfg);
    let b = batch(m.config().vocab_size as u64);
    let err = distill_step(&m, &a, &cfg, &b, 1.0, Backward::Recompute, None)
        .expect_err("dropout cannot be recomputed");
    assert!(err.to_string().contains("dropout"), "{err}");
}
