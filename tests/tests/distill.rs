//! KV-Distill core on a tiny random Llama (CPU): gradients, the r = 1 identity,
//! selection and positions, cache size, chunked KL, and training.

use kvd_tests::env::tiny_models;
use kvd_tests::tokens::lcg_tokens;
use kvd_trainer::checkpoint::Checkpoint;
use kvd_trainer::distill::loss::kl_mix;
use kvd_trainer::distill::select::select;
use kvd_trainer::distill::student::{compress, Contexts};
use kvd_trainer::distill::{
    distill_step, kept_count, Adaptor, Backward, DistillConfig, DistillExample, TrainConfig,
    Trainer,
};
use kvd_trainer::model::{Input, Model};
use kvd_trainer::train_loop::{padded_tokens, split_by_tokens, split_micro_batches};
use tch::{Device, Kind, Tensor};

fn model() -> Model {
    Checkpoint::open(&tiny_models().join("llama"))
        .and_then(|c| c.load_model(Kind::Float, Device::Cpu))
        .expect("tiny llama")
}

fn cfg() -> DistillConfig {
    DistillConfig {
        scorer_layer: 1,
        ..DistillConfig::default()
    }
}

fn batch(ratio: f64) -> Vec<DistillExample> {
    vec![
        DistillExample {
            context: tokens(40, 1),
            spans: vec![(4, 32)],
            suffix: tokens(12, 2),
            ratio,
            answer: None,
            context_answers: Vec::new(),
        },
        DistillExample {
            context: tokens(28, 3),
            spans: vec![(2, 10), (16, 10)],
            suffix: tokens(9, 4),
            ratio,
            answer: None,
            context_answers: Vec::new(),
        },
    ]
}

#[test]
fn full_retention_with_fresh_lora_equals_teacher() {
    let m = model();
    let a = Adaptor::new(m.config(), cfg(), Device::Cpu, 0).expect("adaptor");
    let s = distill_step(&m, &a, &cfg(), &batch(1.0), 1.0, Backward::Off, None).expect("step");
    assert!(
        s.loss.abs() < 1e-6,
        "KL at r = 1 with zero LoRA: {}",
        s.loss
    );
    assert_eq!(s.tokens, 11 + 8);
}

#[test]
fn gradients_reach_scorer_and_lora_only() {
    let m = model();
    let a = Adaptor::new(m.config(), cfg(), Device::Cpu, 0).expect("adaptor");
    let mut t = Trainer::new(
        &a,
        TrainConfig {
            lr: 1e-2,
            warmup_steps: 1,
            ..TrainConfig::default()
        },
    )
    .expect("trainer");
    // Step 1 moves LoRA B off zero; step 2's gradients then reach every LoRA A too.
    t.train_step(&m, &a, &[batch(0.25)]).expect("step 1");
    t.train_step(&m, &a, &[batch(0.25)]).expect("step 2");
    for (name, v) in a.vs.variables() {
        let g = v.grad();
        assert!(g.defined(), "{name} got no gradient");
        let norm = g.norm().double_value(&[]);
        assert!(norm > 0.0, "{name} has a zero gradient");
    }
    for w in m.weights() {
        assert!(!w.requires_grad(), "a base weight requires grad");
        assert!(!w.grad().defined(), "a base weight received a gradient");
    }
}

#[test]
fn selection_keeps_outside_of_spans_and_top_k_inside() {
    let scores: Vec<f32> = (0..20).map(|i| ((i * 7) % 11) as f32).collect();
    let sel = select(&scores, 20, &[(5, 10)], 0.3).expect("select");
    let k = kept_count(10, 0.3);
    assert_eq!(k, 3);
    let inside: Vec<usize> = sel
        .kept
        .iter()
        .copied()
        .filter(|p| (5..15).contains(p))
        .collect();
    assert_eq!(inside.len(), k);
    for p in (0..5).chain(15..20) {
        assert!(
            sel.kept.contains(&p),
            "position {p} outside the span was dropped"
        );
    }
    let mut want: Vec<usize> = (5..15).collect();
    want.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let mut top: Vec<usize> = want[..k].to_vec();
    top.sort();
    assert_eq!(inside, top);
    assert!(
        sel.kept.windows(2).all(|w| w[0] < w[1]),
        "kept positions are in order"
    );
    for bad in [0.0, -0.1, 1.5, f64::NAN] {
        assert!(
            select(&scores, 20, &[(5, 10)], bad).is_err(),
            "ratio {bad} accepted"
        );
    }
    assert!(
        select(&scores, 20, &[(5, 0)], 0.5).is_err(),
        "empty span accepted"
    );
    assert!(
        select(&scores, 20, &[(15, 10)], 0.5).is_err(),
        "span beyond the context accepted"
    );
}

#[test]
fn compressed_cache_has_k_entries_at_original_positions() {
    let m = model();
    let a = Adaptor::new(m.config(), cfg(), Device::Cpu, 0).expect("adaptor");
    let ctx = tokens(40, 9);
    let ids = Tensor::from_slice(&ctx.iter().map(|&t| t as i64).collect::<Vec<_>>()).unsqueeze(0);
    let feats = m.layer_states(Input::new(&ids), 1).expect("features");
    let (span, r) = ((8usize, 30usize), 0.1);
    let spans = [vec![span]];
    let ctx = Contexts {
        ids: &ids,
        len: &[40],
        spans: &spans,
        ratios: &[r],
    };
    let comp = tch::no_grad(|| compress(&m, &a, ctx, &feats, false)).expect("compress");
    let k = kept_count(30, r);
    let entries = 8 + k + 2; // prefix + kept + the two tokens after the span
    assert_eq!(comp.cache.len(), entries as i64);
    for layer in 0..m.config().num_layers {
        let kv = comp.cache.layer(layer).expect("layer");
        assert_eq!(kv.k.size()[2], entries as i64, "layer {layer} keys");
        assert_eq!(kv.v.size()[2], entries as i64, "layer {layer} values");
    }
    let pos = Vec::<i64>::try_from(comp.cache.positions().expect("positions").flatten(0, -1))
        .expect("pos");
    let kept: Vec<i64> = comp.selections[0].kept.iter().map(|&p| p as i64).collect();
    assert_eq!(pos, kept, "positions are the original ones");
    assert_eq!(&pos[..8], &[0, 1, 2, 3, 4, 5, 6, 7], "prefix untouched");
    assert_eq!(
        &pos[pos.len() - 2..],
        &[38, 39],
        "text after the span untouched"
    );
    let next = comp.cache.next_positions().expect("next").int64_value(&[0]);
    assert_eq!(next, 40, "decoding continues at the original next position");
    // The K/V of kept positions equal the full cache's where LoRA is inactive (prefix).
    let mut full = m.new_cache();
    let _ = tch::no_grad(|| m.forward_hidden(Input::new(&ids), Some(&mut full))).expect("full");
    let full_k = &full.layer(0).expect("l0").k;
    let comp_k = &comp.cache.layer(0).expect("l0").k;
    let d = (full_k.narrow(2, 0, 8) - comp_k.narrow(2, 0, 8))
        .abs()
        .max()
        .double_value(&[]);
    assert!(d < 1e-6, "prefix keys changed by {d}");
    // Memory is (entries / 40) of the full cache's.
    let ratio = comp.cache.memory_bytes() as f64 / full.memory_bytes() as f64;
    assert!(
        (ratio - entries as f64 / 40.0).abs() < 1e-9,
        "memory ratio {ratio}"
    );
}

#[test]
fn chunked_kl_equals_unchunked_autograd() {
    tch::manual_seed(3);
    let t = Tensor::randn([13, 50], (Kind::Float, Device::Cpu)) * 3.0;
    let s0 = Tensor::randn([13, 50], (Kind::Float, Device::Cpu)) * 3.0;
    let (a, tau) = (0.3, 1.7);
    let out = kl_mix(&t, &s0, a, tau, 4).expect("chunked");
    let v = out.values().expect("values");
    let s = s0.detach().set_requires_grad(true);
    let logp = (&t / tau).log_softmax(-1, Kind::Float);
    let logq = (&s / tau).log_softmax(-1, Kind::Float);
    let fkl = (logp.exp() * (&logp - &logq)).sum_dim_intlist(-1, false, Kind::Float);
    let rkl = (logq.exp() * (&logq - &logp)).sum_dim_intlist(-1, false, Kind::Float);
    let loss = (fkl * a + rkl * (1.0 - a)).mean(Kind::Float);
    loss.backward();
    let want = loss.double_value(&[]);
    assert!(
        (v.loss - want).abs() < 1e-5 * want.abs().max(1.0),
        "loss {} vs {want}",
        v.loss
    );
    let gd = (&out.grad - s.grad()).abs().max().double_value(&[]);
    assert!(gd < 1e-6, "gradient differs by {gd}");
}

#[test]
fn training_halves_the_kl_and_leaves_base_weights_bit_identical() {
    let m = model();
    let before: Vec<Tensor> = m.weights().iter().map(|w| w.copy()).collect();
    let template = Adaptor::new(m.config(), cfg(), Device::Cpu, 7).expect("adaptor");
    let run = || {
        let a = copy_of(&m, &template);
        let tc = TrainConfig {
            lr: 5e-3,
            warmup_steps: 5,
            total_steps: 80,
            ..TrainConfig::default()
        };
        let mut t = Trainer::new(&a, tc).expect("trainer");
        let b = batch(0.2);
        let first = distill_step(&m, &a, &cfg(), &b, 1.0, Backward::Off, None)
            .expect("eval")
            .loss;
        let mut losses = Vec::new();
        for _ in 0..80 {
            losses.push(
                t.train_step(&m, &a, std::slice::from_ref(&b))
                    .expect("train")
                    .loss,
            );
        }
        let last = distill_step(&m, &a, &cfg(), &b, 1.0, Backward::Off, None)
            .expect("eval")
            .loss;
        (first, last, losses)
    };
    let (first, last, losses) = run();
    assert!(last < 0.5 * first, "KL went from {first} to {last}");
    let (_, last2, losses2) = run();
    assert_eq!(losses, losses2, "training is not deterministic on CPU");
    assert_eq!(last, last2);
    for (w, b) in m.weights().iter().zip(&before) {
        assert!(w.equal(b), "a base weight changed during training");
    }
}

#[test]
fn adaptor_checkpoint_reloads_identically_and_refuses_other_bases() {
    use kvd_trainer::distill::checkpoint::{load, save};
    let m = model();
    let a = Adaptor::new(m.config(), cfg(), Device::Cpu, 5).expect("adaptor");
    let mut t = Trainer::new(
        &a,
        TrainConfig {
            lr: 1e-2,
            warmup_steps: 1,
            ..TrainConfig::default()
        },
    )
    .expect("trainer");
    for _ in 0..3 {
        t.train_step(&m, &a, &[batch(0.3)]).expect("train");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("adaptor.safetensors");
    save(&a, "tiny-llama", m.config(), t.step() as u64, &path).expect("save");
    let (b, meta) = load(&path, m.config(), Device::Cpu).expect("load");
    assert_eq!(meta.step, 3);
    assert_eq!(meta.base_model, "tiny-llama");
    assert_eq!(meta.distill, cfg());
    let la = distill_step(&m, &a, &cfg(), &batch(0.3), 1.0, Backward::Off, None)
        .expect("a")
        .loss;
    let lb = distill_step(&m, &b, &cfg(), &batch(0.3), 1.0, Backward::Off, None)
        .expect("b")
        .loss;
    assert_eq!(la, lb, "reloaded adaptor gives different outputs");
    // Another base model (the tiny Qwen2) is refused with a clear error.
    let other = Checkpoint::open(&tiny_models().join("qwen2"))
        .and_then(|c| c.config())
        .expect("qwen2 config");
    let err = load(&path, &other, Device::Cpu).expect_err("other base accepted");
    let msg = err.to_string();
    assert!(
        msg.contains("tiny-llama") && msg.contains("adaptor.safetensors"),
        "{msg}"
    );
    // A corrupt file is an error naming the file.
    let bytes = std::fs::read(&path).expect("read");
    std::fs::write(&path, &bytes[..bytes.len() / 3]).expect("truncate");
    let err = load(&path, m.config(), Device::Cpu).expect_err("corrupt accepted");
    assert!(err.to_string().contains("adaptor.safetensors"), "{err}");
}

/// Deterministic pseudo-random tokens below the tiny vocabulary (96).
fn tokens(n: usize, seed: u64) -> Vec<u32> {
    lcg_tokens(n, seed, 0, 96)
}

/// A step's update is the gradient of the mean loss over the global batch's
/// supervised tokens, however the batch is cut into micro-batches: both
/// examples (11 and 8 supervised tokens) in one micro-batch or one each give
/// the same loss and gradient norm. A mean of per-micro-batch means would
/// weight the shorter example's tokens more.
#[test]
fn micro_batching_does_not_change_the_step() {
    let m = model();
    let template = Adaptor::new(m.config(), cfg(), Device::Cpu, 7).expect("adaptor");
    let fresh = || copy_of(&m, &template);
    let run = |micro: &[Vec<DistillExample>]| {
        let a = fresh();
        let mut t = Trainer::new(&a, TrainConfig::default()).expect("trainer");
        t.train_step(&m, &a, micro).expect("step")
    };
    let b = batch(0.25);
    let whole = run(std::slice::from_ref(&b));
    let split = run(&[vec![b[0].clone()], vec![b[1].clone()]]);
    let close = |x: f64, y: f64| (x - y).abs() <= 1e-5 * x.abs().max(y.abs());
    assert_eq!((whole.tokens, split.tokens), (19, 19));
    assert!(
        close(whole.loss, split.loss),
        "{} vs {}",
        whole.loss,
        split.loss
    );
    assert!(
        close(whole.grad_norm, split.grad_norm),
        "{} vs {}",
        whole.grad_norm,
        split.grad_norm
    );
    // The per-example losses: the token-weighted mean is the step's loss and
    // differs from the plain mean of the two.
    let a = fresh();
    let l: Vec<f64> = b
        .iter()
        .map(|e| {
            distill_step(
                &m,
                &a,
                &cfg(),
                std::slice::from_ref(e),
                1.0,
                Backward::Off,
                None,
            )
            .expect("loss")
            .loss
        })
        .collect();
    let weighted = (11.0 * l[0] + 8.0 * l[1]) / 19.0;
    assert!(close(split.loss, weighted), "{} vs {weighted}", split.loss);
    assert!(
        !close((l[0] + l[1]) / 2.0, weighted),
        "{l:?}: the test cannot tell the weightings apart"
    );
}

/// With the selection loss on, cutting the batch into micro-batches, or
/// padding them to multiples of 64 positions (`Trainer::pad_multiple`), is
/// still the same step: the selection loss
/// counts each micro-batch by its share of the examples (by its share of the
/// supervised tokens, as the KL, the split step's gradient differed). So is
/// a micro-batch that runs out of memory and runs again in two halves.
#[test]
fn micro_batches_split_or_padded_with_the_selection_loss_are_the_same_step() {
    let m = model();
    let c = DistillConfig {
        select_weight: 4.0,
        ..cfg()
    };
    let template = Adaptor::new(m.config(), c.clone(), Device::Cpu, 7).expect("adaptor");
    let run_padded = |micro: &[Vec<DistillExample>], pad: usize| {
        let a = copy_with(&m, &template, c.clone());
        let mut t = Trainer::new(&a, TrainConfig::default()).expect("trainer");
        t.pad_multiple(pad).expect("pad");
        t.train_step(&m, &a, micro).expect("step")
    };
    let run = |micro: &[Vec<DistillExample>]| run_padded(micro, 1);
    let b = batch(0.25);
    let whole = run(std::slice::from_ref(&b));
    let split = [vec![b[0].clone()], vec![b[1].clone()]];
    assert!(whole.select_loss > 0.0, "{whole:?}");
    assert_same_step(&whole, &run(&split));
    // Padded to multiples of 64 positions (masked): the same step too.
    assert_same_step(&whole, &run_padded(std::slice::from_ref(&b), 64));
    assert_same_step(&whole, &run_padded(&split, 64));
    // The whole batch runs out of memory after its backward: its partial
    // gradients are dropped and its two halves run one after the other.
    let a = copy_with(&m, &template, c.clone());
    let mut t = Trainer::new(&a, TrainConfig::default()).expect("trainer");
    t.fail_next_allocation();
    let retried = t
        .train_step(&m, &a, std::slice::from_ref(&b))
        .expect("retried");
    assert_same_step(&whole, &retried);
    assert!(Trainer::new(&template, TrainConfig::default())
        .expect("trainer")
        .pad_multiple(0)
        .is_err());
}

/// A fresh adaptor holding `src`'s values. Two runs that must start alike
/// copy one adaptor: `Adaptor::new` seeds libtorch's global generator and
/// draws from it while other tests in this process may draw too.
fn copy_of(m: &Model, src: &Adaptor) -> Adaptor {
    copy_with(m, src, cfg())
}

/// [`copy_of`] for an adaptor of the settings `c`.
fn copy_with(m: &Model, src: &Adaptor, c: DistillConfig) -> Adaptor {
    let a = Adaptor::new(m.config(), c, Device::Cpu, 0).expect("adaptor");
    tch::no_grad(|| {
        for ((_, mut v), (_, w)) in a.named_trainable().into_iter().zip(src.named_trainable()) {
            v.copy_(&w);
        }
    });
    a
}

/// Two optimizer steps over the same examples, cut differently, are the
/// same step: supervised tokens, loss and gradient norm (to rounding).
fn assert_same_step(a: &kvd_trainer::distill::OptStats, b: &kvd_trainer::distill::OptStats) {
    let close = |x: f64, y: f64| (x - y).abs() <= 1e-5 * x.abs().max(y.abs());
    assert_eq!(a.tokens, b.tokens);
    assert!(close(a.loss, b.loss), "{} vs {}", a.loss, b.loss);
    assert!(
        close(a.grad_norm, b.grad_norm),
        "{} vs {}",
        a.grad_norm,
        b.grad_norm
    );
}

/// A context of `n` tokens, one span after its first, a 9-token suffix, r = 0.25.
fn span_example(n: usize, seed: u64) -> DistillExample {
    DistillExample {
        context: tokens(n, seed),
        spans: vec![(1, n - 1)],
        suffix: tokens(9, seed + 100),
        ratio: 0.25,
        answer: None,
        context_answers: Vec::new(),
    }
}

/// Ordering a step's examples by length before cutting micro-batches
/// (`--bucket-by-length`) keeps every example once, pads fewer positions and
/// gives the same step.
#[test]
fn bucketing_by_length_pads_less_and_keeps_the_step() {
    let m = model();
    let exs = vec![
        span_example(40, 1),
        span_example(10, 2),
        span_example(38, 3),
        span_example(12, 4),
    ];
    let plain = split_micro_batches(exs.clone(), 2, false);
    let sorted = split_micro_batches(exs.clone(), 2, true);
    // 2 * (40 + 9) + 2 * (38 + 9) positions against 2 * (12 + 9) + 2 * (40 + 9).
    assert_eq!((padded_tokens(&plain), padded_tokens(&sorted)), (192, 140));
    let lens = |mbs: &[Vec<DistillExample>]| -> Vec<usize> {
        mbs.iter().flatten().map(|e| e.context.len()).collect()
    };
    assert_eq!(lens(&plain), [40, 10, 38, 12]);
    assert_eq!(lens(&sorted), [10, 12, 38, 40]);
    let template = Adaptor::new(m.config(), cfg(), Device::Cpu, 7).expect("adaptor");
    let run = |micro: &[Vec<DistillExample>]| {
        let a = copy_of(&m, &template);
        let mut t = Trainer::new(&a, TrainConfig::default()).expect("trainer");
        t.train_step(&m, &a, micro).expect("step")
    };
    assert_same_step(&run(&plain), &run(&sorted));
}

/// Cutting micro-batches by a budget of padded positions
/// (`--micro-batch-tokens`) puts many short examples together and few long
/// ones, keeps every example once, respects the budget and the example cap,
/// and gives the same step.
#[test]
fn a_token_budget_packs_short_examples_and_keeps_the_step() {
    let m = model();
    let lens = [40, 10, 10, 38, 10, 12, 10, 10];
    let exs: Vec<DistillExample> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| span_example(n, i as u64 + 1))
        .collect();
    let fixed = split_micro_batches(exs.clone(), 2, true);
    // The budget of two of the longest examples.
    let budget = 2 * (40 + 9);
    let packed = split_by_tokens(exs.clone(), 8, budget);
    let sizes =
        |mbs: &[Vec<DistillExample>]| -> Vec<usize> { mbs.iter().map(|mb| mb.len()).collect() };
    assert_eq!(sizes(&fixed), [2, 2, 2, 2]);
    assert_eq!(sizes(&packed), [5, 2, 1], "five short ones at once");
    for mb in &packed {
        assert!(padded_tokens(std::slice::from_ref(mb)) <= budget);
    }
    let mut seen: Vec<usize> = packed.iter().flatten().map(|e| e.context.len()).collect();
    seen.sort_unstable();
    let mut want = lens.to_vec();
    want.sort_unstable();
    assert_eq!(seen, want, "every example once");
    // The example cap, and an example over the budget alone.
    assert_eq!(sizes(&split_by_tokens(exs.clone(), 3, budget)), [3, 3, 2]);
    assert_eq!(
        sizes(&split_by_tokens(exs.clone(), 8, 30)),
        [1, 1, 1, 1, 1, 1, 1, 1]
    );
    let template = Adaptor::new(m.config(), cfg(), Device::Cpu, 7).expect("adaptor");
    let run = |micro: &[Vec<DistillExample>]| {
        let a = copy_of(&m, &template);
        let mut t = Trainer::new(&a, TrainConfig::default()).expect("trainer");
        t.train_step(&m, &a, micro).expect("step")
    };
    let (f, p) = (run(&fixed), run(&packed));
    assert_eq!((f.micro_batches, p.micro_batches), (4, 3));
    assert_same_step(&f, &p);
}

/// A non-finite loss fails the step with a message that gives its parts (it
/// is read after the backward is launched, and still before the optimizer),
/// and leaves the trainer usable: a healthy adaptor then trains normally.
#[test]
fn a_non_finite_loss_fails_the_step_with_its_values() {
    let m = model();
    let a = Adaptor::new(m.config(), cfg(), Device::Cpu, 0).expect("adaptor");
    let mut t = Trainer::new(&a, TrainConfig::default()).expect("trainer");
    let saved: Vec<(String, Tensor)> =
        a.vs.variables()
            .into_iter()
            .map(|(n, v)| (n, v.detach().copy()))
            .collect();
    // LoRA B of NaN: the student's logits, hence the loss, are NaN.
    tch::no_grad(|| {
        for (name, mut v) in a.vs.variables() {
            if name.starts_with("lora.") && name.ends_with(".b") {
                let _ = v.fill_(f64::NAN);
            }
        }
    });
    let err = t
        .train_step(&m, &a, &[batch(0.25)])
        .expect_err("a NaN loss must fail the step");
    let msg = err.to_string();
    assert!(
        msg.contains("non-finite loss NaN") && msg.contains("forward KL"),
        "{msg}"
    );
    tch::no_grad(|| {
        for (name, mut v) in a.vs.variables() {
            let (_, s) = saved.iter().find(|(n, _)| *n == name).expect("saved");
            v.copy_(s);
        }
    });
    let ok = t.train_step(&m, &a, &[batch(0.25)]).expect("healthy step");
    assert!(ok.loss.is_finite() && ok.grad_norm.is_finite(), "{ok:?}");
}

#[test]
fn cuda_graphs_are_built_in_and_refuse_the_cpu() {
    // The setup's libtorch has CUDA, so the graph shim must have been built;
    // without it `bench-step --cuda-graphs` would fail on the GPU.
    assert!(
        kvd_trainer::cuda_graph::available(),
        "the CUDA graph shim was not built (trainer/build.rs found no CUDA headers)"
    );
    let err = kvd_trainer::distill::StepGraphs::new(Device::Cpu, 1).expect_err("cpu graphs");
    assert!(
        err.to_string().contains("CUDA graphs need a CUDA device"),
        "{err}"
    );
    let m = model();
    let a = Adaptor::new(m.config(), cfg(), Device::Cpu, 0).expect("adaptor");
    let mut t = Trainer::new(&a, TrainConfig::default()).expect("trainer");
    assert!(t.use_cuda_graphs(Device::Cpu, 1).is_err());
    assert!(t.cuda_graphs().is_none());
}
