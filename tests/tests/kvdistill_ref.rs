//! Parity of the Rust KV-Distill training step with its plain-PyTorch reference
//! (`bench/kvdistill_ref.py`, HF transformers' Llama): same tiny random
//! checkpoint, same adaptor initialisation and batch, same losses over three
//! optimizer steps (CPU, float32), for today's reference and its fast form
//! (`--impl fast`).

use kvd_tests::env::python;
use kvd_tests::tokens::lcg_tokens;
use kvd_trainer::checkpoint::Checkpoint;
use kvd_trainer::distill::dump::write_step_inputs;
use kvd_trainer::distill::{Adaptor, DistillConfig, DistillExample, TrainConfig, Trainer};
use std::process::Command;
use tch::{Device, Kind};

/// Runs `tests/oracle/kvdistill_ref.py` (which runs `bench/kvdistill_ref.py`)
/// and returns its stdout. The script is located from this test's own manifest
/// directory (not the shared helper's), so a target directory shared between
/// two checkouts cannot point it at the other one.
fn run_oracle(args: &[&str]) -> String {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("oracle/kvdistill_ref.py");
    let out = Command::new(python())
        .arg(&script)
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_VERBOSITY", "error")
        .output()
        .unwrap_or_else(|e| panic!("cannot start oracle python {:?}: {e}", python()));
    assert!(
        out.status.success(),
        "oracle {script:?} {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("oracle printed non-UTF-8")
}

#[test]
fn rust_step_matches_pytorch_reference() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().expect("tempdir");
    let model_dir = dir.path().join("model");
    let dump = dir.path().join("dump");
    let md = model_dir.to_str().expect("utf-8 path");
    run_oracle(&["--make-tiny", md]);

    let model = Checkpoint::open(&model_dir)
        .and_then(|c| c.load_model(Kind::Float, Device::Cpu))
        .expect("tiny llama");
    let vocab = model.config().vocab_size as u64;
    let span = 64;
    let mut context = vec![1u32];
    context.extend(lcg_tokens(span, 1, 3, vocab));
    let batch = vec![DistillExample {
        context,
        spans: vec![(1, span)],
        suffix: lcg_tokens(16, 2, 3, vocab),
        ratio: 0.25,
        answer: None,
        context_answers: Vec::new(),
    }];
    let distill = DistillConfig::default();
    let train = TrainConfig {
        total_steps: 3,
        warmup_steps: 1,
        ..TrainConfig::default()
    };
    let adaptor = Adaptor::new(model.config(), distill.clone(), Device::Cpu, 0).expect("adaptor");
    write_step_inputs(
        &dump,
        "tiny",
        model.config(),
        &adaptor,
        &distill,
        &train,
        &batch,
    )
    .expect("write the reference's inputs");

    let mut trainer = Trainer::new(&adaptor, train.clone()).expect("trainer");
    let micro = [batch];
    let rust: Vec<f64> = (0..train.total_steps)
        .map(|_| {
            trainer
                .train_step(&model, &adaptor, &micro)
                .expect("step")
                .loss
        })
        .collect();

    let dd = dump.to_str().expect("utf-8 path");
    // Today's reference and the fast one of the benchmarks (device-side
    // selection, LoRA wrappers, fused AdamW), eager.
    for variant in [&[][..], &["--impl", "fast"][..]] {
        let mut args = vec![
            "--model",
            md,
            "--dump",
            dd,
            "--steps",
            "3",
            "--device",
            "cpu",
            "--dtype",
            "f32",
            "--threads",
            "1",
        ];
        args.extend_from_slice(variant);
        let out = run_oracle(&args);
        let line: serde_json::Value =
            serde_json::from_str(out.lines().last().expect("a JSON line")).expect("JSON");
        let py: Vec<f64> = line["losses"]
            .as_array()
            .expect("losses")
            .iter()
            .map(|v| v.as_f64().expect("a number"))
            .collect();
        assert_eq!(
            py.len(),
            rust.len(),
            "{variant:?}: rust {rust:?} python {py:?}"
        );
        assert!(rust[0] > 1e-3, "the loss is too small to compare: {rust:?}");
        for (i, (r, p)) in rust.iter().zip(&py).enumerate() {
            let rel = (r - p).abs() / r.abs().max(1e-12);
            assert!(
                rel < 1e-4,
                "{variant:?} step {i}: rust {r} python {p} (relative {rel:e}); rust {rust:?} python {py:?}"
            );
        }
    }
}
