//! The paper's method options and the diagnosis's agreement check, on a tiny
//! random Llama (CPU):
//! - the training step's loss on an example equals the evaluation path's KL
//!   on the same answer tokens, ratio and selection, for every score feed;
//! - sinks are always kept; rsLoRA scaling; K/V adaptors at every position;
//! - the selection loss trains the scorer at positions it did not keep, and
//!   moves its choice toward the teacher's attention.

use kvd_tests::env::tiny_models;
use kvd_trainer::checkpoint::Checkpoint;
use kvd_trainer::distill::infer::{
    compress_contexts, compress_contexts_forcing, forced_scores, pad_rows, teacher_logprobs, Method,
};
use kvd_trainer::distill::student::Contexts;
use kvd_trainer::distill::{
    distill_step, Adaptor, Backward, DistillConfig, DistillExample, LoraConfig, ScoreFeed,
};
use kvd_trainer::model::{Model, Proj};
use tch::{Device, Kind, Tensor};

fn model() -> Model {
    Checkpoint::open(&tiny_models().join("llama"))
        .and_then(|c| c.load_model(Kind::Float, Device::Cpu))
        .expect("tiny llama")
}

fn tokens(n: usize, seed: u64) -> Vec<u32> {
    kvd_tests::tokens::lcg_tokens(n, seed, 3, 96)
}

/// An adaptor whose LoRA B matrices are non-zero, so the adaptor matters.
/// libtorch's global generator is shared by the tests running at the same
/// time: every draw from it here happens under this lock, so an adaptor's
/// initial values depend on its seed alone (interleaved draws made
/// `training_selects_with_train_span_pool_and_compression_with_span_pool`
/// flaky).
static GLOBAL_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A fresh adaptor from `seed` (under [`GLOBAL_RNG`]).
fn fresh(m: &Model, cfg: DistillConfig, seed: i64) -> Adaptor {
    let _draws = GLOBAL_RNG.lock().unwrap_or_else(|e| e.into_inner());
    Adaptor::new(m.config(), cfg, Device::Cpu, seed).expect("adaptor")
}

fn trained_like(m: &Model, cfg: DistillConfig, seed: i64) -> Adaptor {
    let _draws = GLOBAL_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let a = Adaptor::new(m.config(), cfg, Device::Cpu, seed).expect("adaptor");
    tch::no_grad(|| {
        for (name, mut v) in a.vs.variables() {
            if name.ends_with(".b") {
                v.copy_(&(Tensor::randn(v.size(), (Kind::Float, Device::Cpu)) * 0.05));
            }
        }
    });
    a
}

/// An adaptor of `cfg` with `src`'s weights (not a shared seed: tests running
/// at the same time draw from libtorch's global generator too).
fn copy_of(m: &Model, cfg: DistillConfig, src: &Adaptor) -> Adaptor {
    let a = fresh(m, cfg, 0);
    let weights = src.vs.variables();
    tch::no_grad(|| {
        for (name, mut v) in a.vs.variables() {
            v.copy_(&weights[&name]);
        }
    });
    a
}

fn base_cfg() -> DistillConfig {
    DistillConfig {
        scorer_layer: 1,
        lora: LoraConfig {
            targets: vec![Proj::Q, Proj::K, Proj::V, Proj::O],
            ..LoraConfig::default()
        },
        ..DistillConfig::default()
    }
}

#[test]
fn training_loss_equals_the_evaluation_kl_on_the_same_tokens_and_selection() {
    let m = model();
    let (ctx_len, span) = (48usize, (1usize, 47usize));
    let context = tokens(ctx_len, 11);
    let suffix = tokens(12, 12);
    let answer = (5usize, 6usize);
    for (feed, kv_all, sinks) in [
        (ScoreFeed::StraightThrough, false, 0),
        (ScoreFeed::LogSigmoid, true, 4),
        (ScoreFeed::Direct, false, 2),
    ] {
        let mut cfg = base_cfg();
        cfg.score_feed = feed;
        cfg.lora.kv_all_tokens = kv_all;
        cfg.sinks = sinks;
        // KL(teacher || student) on the answer only: what the evaluation reports.
        cfg.kl_forward_weight = 1.0;
        cfg.answer_only = true;
        let a = trained_like(&m, cfg.clone(), 5);
        let ex = DistillExample {
            context: context.clone(),
            spans: vec![span],
            suffix: suffix.clone(),
            ratio: 0.25,
            answer: Some(answer),
            context_answers: Vec::new(),
        };
        let step = distill_step(&m, &a, &cfg, &[ex], 1.0, Backward::Off, None).expect("step");
        assert_eq!(step.tokens, answer.1);

        let (ids, len) = pad_rows(std::slice::from_ref(&context), 96, Device::Cpu).expect("pad");
        let ctx = Contexts {
            ids: &ids,
            len: &len,
            spans: &[vec![span]],
            ratios: &[0.25],
        };
        let full = compress_contexts(&m, Method::Full, ctx).expect("full");
        let teacher = teacher_logprobs(
            &m,
            &mut full.shallow_clone(),
            std::slice::from_ref(&suffix),
            &[answer],
        )
        .expect("teacher");
        let mut comp = compress_contexts(&m, Method::kv_distill(&a), ctx).expect("compress");
        assert_eq!(comp.feed.is_some(), feed.in_forward(), "{feed:?}");
        let kept = comp.selections[0].kept.clone();
        assert_eq!(kept.len(), 1 + 12, "BOS + ceil(0.25 * 47)");
        assert!(
            (1..1 + sinks).all(|p| kept.contains(&p)),
            "sinks kept: {kept:?}"
        );
        let f = forced_scores(
            &m,
            &mut comp,
            std::slice::from_ref(&suffix),
            &[answer],
            Some(&teacher),
        )
        .expect("scores");
        let (train, eval) = (step.forward_kl, f[0].kl);
        assert!(
            train > 1e-4,
            "the adaptor changes the answer distribution: {train}"
        );
        assert!(
            (train - eval).abs() <= 1e-4 * train.max(1.0),
            "{feed:?}: training KL {train} vs evaluation KL {eval}"
        );
    }
}

#[test]
fn rslora_scales_by_the_square_root_of_the_rank() {
    let mut l = LoraConfig {
        rank: 16,
        alpha: 8.0,
        ..LoraConfig::default()
    };
    assert_eq!(l.scale(), 0.5);
    l.rslora = true;
    assert_eq!(l.scale(), 2.0);
}

#[test]
fn kv_adaptors_at_every_position_change_dropped_positions_keys() {
    // With K/V adaptors on every position, a kept position's cache entry at
    // layer >= 1 depends on the adaptor's effect on dropped positions too:
    // compare the same kept set with the option on and off.
    let m = model();
    let context = tokens(40, 21);
    let (ids, len) = pad_rows(&[context], 96, Device::Cpu).expect("pad");
    let ctx = Contexts {
        ids: &ids,
        len: &len,
        spans: &[vec![(1, 39)]],
        ratios: &[0.25],
    };
    let mut cfg = base_cfg();
    let off = trained_like(&m, cfg.clone(), 9);
    cfg.lora.kv_all_tokens = true;
    let on = copy_of(&m, cfg, &off);
    let a = compress_contexts(&m, Method::kv_distill(&off), ctx).expect("off");
    let b = compress_contexts(&m, Method::kv_distill(&on), ctx).expect("on");
    assert_eq!(a.selections, b.selections, "same scorer, same selection");
    let layer = |c: &kvd_trainer::distill::student::Compressed, i| {
        c.cache.layer(i).expect("layer").k.shallow_clone()
    };
    let diff = (layer(&a, 1) - layer(&b, 1)).abs().max().double_value(&[]);
    assert!(diff > 1e-6, "K at kept positions unchanged: {diff}");
}

#[test]
fn forcing_keeps_the_given_positions_within_the_budget() {
    let m = model();
    let context = tokens(40, 31);
    let (ids, len) = pad_rows(&[context], 96, Device::Cpu).expect("pad");
    let ctx = Contexts {
        ids: &ids,
        len: &len,
        spans: &[vec![(1, 39)]],
        ratios: &[0.1],
    };
    let a = trained_like(&m, base_cfg(), 3);
    let force = vec![vec![17usize, 18, 30]];
    for method in [
        Method::kv_distill(&a),
        Method::Baseline(kvd_trainer::distill::Baseline::Random { seed: 1 }),
    ] {
        let c = compress_contexts_forcing(&m, method, ctx, Some(&force)).expect("forced");
        let kept = &c.selections[0].kept;
        assert_eq!(
            kept.len(),
            1 + 4,
            "{}: the budget is unchanged",
            method.name()
        );
        for p in &force[0] {
            assert!(
                kept.contains(p),
                "{}: {p} not kept in {kept:?}",
                method.name()
            );
        }
    }
}

#[test]
fn the_selection_loss_reaches_every_choosable_position_and_ranks_like_its_target() {
    use kvd_trainer::distill::step::selection_loss;
    // Two examples of 8 positions; position 0 is not choosable (a sink or
    // the prefix), nor are example 1's last two (padding).
    let choosable = Tensor::from_slice(&[
        0f32, 1., 1., 1., 1., 1., 1., 1., //
        0., 1., 1., 1., 1., 1., 0., 0.,
    ])
    .view([2, 8]);
    let target = Tensor::from_slice(&[
        9f32, 0.1, 0.2, 3.0, 0.1, 0.1, 1.0, 0.1, //
        9., 0.2, 0.1, 0.1, 0.1, 2.0, 5.0, 5.0,
    ])
    .view([2, 8]);
    let scores = Tensor::zeros([2, 8], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let first = selection_loss(&scores, &target, &choosable).expect("loss");
    first.backward();
    let g = scores.grad();
    let on = Vec::<f32>::try_from(g.abs().flatten(0, -1)).expect("grad");
    let mask = Vec::<f32>::try_from(choosable.flatten(0, -1)).expect("mask");
    for (i, (&x, &m)) in on.iter().zip(&mask).enumerate() {
        assert_eq!(
            x > 0.0,
            m > 0.0,
            "position {i}: gradient {x}, choosable {m}"
        );
    }
    // Gradient descent on the scores ranks the positions as the target does.
    let s = Tensor::zeros([2, 8], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let mut last = f64::INFINITY;
    for _ in 0..200 {
        let l = selection_loss(&s, &target, &choosable).expect("loss");
        last = l.double_value(&[]);
        l.backward();
        tch::no_grad(|| {
            let step = s.grad() * 2.0;
            let _ = s.shallow_clone().f_sub_(&step).expect("update");
            let _ = s.grad().zero_();
        });
    }
    assert!(last < first.double_value(&[]) - 0.3, "{last}");
    let best = |row: i64| s.get(row).narrow(0, 1, 5).argmax(0, false).int64_value(&[]) + 1;
    assert_eq!(best(0), 3);
    assert_eq!(best(1), 5);
}

#[test]
fn the_step_adds_the_selection_loss_to_the_scorers_gradient() {
    let m = model();
    let batch: Vec<DistillExample> = (0..3)
        .map(|i| DistillExample {
            context: tokens(40, 40 + i),
            spans: vec![(1, 39)],
            suffix: tokens(10, 50 + i),
            ratio: 0.1,
            answer: None,
            context_answers: Vec::new(),
        })
        .collect();
    // One initialisation for both runs (`Adaptor::new` draws from the global
    // generator, which other tests in this process use at the same time).
    let template = fresh(&m, base_cfg(), 2);
    let grad_of = |w: f64| {
        let mut cfg = base_cfg();
        cfg.select_weight = w;
        let a = copy_of(&m, cfg.clone(), &template);
        let s = distill_step(&m, &a, &cfg, &batch, 1.0, Backward::Stored, None).expect("step");
        let g = a
            .named_trainable()
            .into_iter()
            .find(|(k, _)| k == "scorer.w1")
            .map(|(_, t)| t.grad().copy())
            .expect("w1");
        (s, g)
    };
    let (off, g0) = grad_of(0.0);
    let (on, g1) = grad_of(1.0);
    assert_eq!(off.select_loss, 0.0);
    assert!(on.select_loss > 0.0);
    assert_eq!(
        off.loss, on.loss,
        "the KL does not depend on the selection loss"
    );
    let diff = (&g1 - &g0).abs().max().double_value(&[]);
    assert!(
        diff > 0.0,
        "the selection loss changes the scorer's gradient"
    );
}

#[test]
fn the_answer_target_is_the_attention_plus_the_answers_positions() {
    use kvd_trainer::distill::step::with_answers;
    let choosable = Tensor::from_slice(&[0f32, 1., 1., 1., 0., 1., 1., 1.]).view([2, 4]);
    let attention = Tensor::from_slice(&[5f32, 1., 3., 0., 5., 2., 2., 0.]).view([2, 4]);
    let answers = Tensor::from_slice(&[0f32, 0., 0., 1., 0., 0., 0., 0.]).view([2, 4]);
    let t = with_answers(&attention, &answers, &choosable, 2.0).expect("target");
    let got = Vec::<f32>::try_from(t.flatten(0, -1)).expect("values");
    // Row 0: attention over the choosable positions (1, 3, 0)/4, plus 2 x the
    // answer's one position; row 1 knows no answer: its attention alone.
    assert_eq!(got, [0.0, 0.25, 0.75, 2.0, 0.0, 0.5, 0.5, 0.0]);
    // Weight 0 leaves the attention as it is.
    let same = with_answers(&attention, &answers, &choosable, 0.0).expect("target");
    assert!(same.equal(&attention));
}

/// A random context with the three marker tokens 90, 91, 92 (the "answer")
/// at `at`, whose location the example names.
fn marker_example(seed: u64, at: usize) -> DistillExample {
    let mut context = tokens(40, seed);
    context[at..at + 3].copy_from_slice(&[90, 91, 92]);
    DistillExample {
        context,
        spans: vec![(1, 39)],
        suffix: tokens(10, seed + 100),
        ratio: 0.1,
        answer: None,
        context_answers: vec![(at, 3)],
    }
}

/// A batch of four marker examples, the answer at a different place in each.
fn marker_batch() -> Vec<DistillExample> {
    (0..4)
        .map(|i| marker_example(60 + i, 8 + 7 * i as usize))
        .collect()
}

/// Marker tokens `a` keeps at r = 0.1 (4 of 39 span positions) in four
/// unseen contexts (of 12).
fn marker_tokens_kept(m: &Model, a: &Adaptor) -> usize {
    (0..4u64)
        .map(|i| {
            let at = 5 + 8 * i as usize;
            let ex = marker_example(200 + i, at);
            let (ids, len) = pad_rows(&[ex.context], 96, Device::Cpu).expect("pad");
            let ctx = Contexts {
                ids: &ids,
                len: &len,
                spans: &[vec![(1, 39)]],
                ratios: &[0.1],
            };
            let c = compress_contexts(m, Method::kv_distill(a), ctx).expect("compress");
            (at..at + 3)
                .filter(|p| c.selections[0].kept.contains(p))
                .count()
        })
        .sum()
}

#[test]
fn the_answer_target_teaches_the_scorer_to_keep_what_questions_ask_about() {
    use kvd_trainer::distill::{TrainConfig, Trainer};
    let m = model();
    let batch = marker_batch();
    let template = fresh(&m, base_cfg(), 4);
    // Answer tokens kept after 40 steps, with the answer's weight `w` in the
    // selection target.
    let kept_after = |w: f64| -> usize {
        let cfg = DistillConfig {
            select_weight: 1.0,
            select_answer_weight: w,
            ..base_cfg()
        };
        let a = copy_of(&m, cfg, &template);
        let mut t = Trainer::new(
            &a,
            TrainConfig {
                lr: 1e-2,
                warmup_steps: 1,
                ..TrainConfig::default()
            },
        )
        .expect("trainer");
        for _ in 0..40 {
            t.train_step(&m, &a, std::slice::from_ref(&batch))
                .expect("step");
        }
        marker_tokens_kept(&m, &a)
    };
    let without = kept_after(0.0);
    let with = kept_after(4.0);
    eprintln!("answer tokens kept of 12: {with} with the answer target, {without} without");
    assert!(
        with >= 8 && with > without,
        "answer tokens kept of 12: {with} with the answer target, {without} without"
    );
}

#[test]
fn scorer_only_warm_up_steps_train_the_scorer_and_leave_the_lora() {
    use kvd_trainer::distill::{TrainConfig, Trainer};
    let m = model();
    let batch = marker_batch();
    let cfg = DistillConfig {
        select_weight: 1.0,
        select_answer_weight: 4.0,
        ..base_cfg()
    };
    let template = fresh(&m, base_cfg(), 4);
    let a = copy_of(&m, cfg.clone(), &template);
    let snapshot = |a: &Adaptor, part: &str| -> Vec<Tensor> {
        a.named_trainable()
            .into_iter()
            .filter(|(k, _)| k.starts_with(part))
            .map(|(_, t)| t.detach().copy())
            .collect()
    };
    let same = |x: &[Tensor], y: &[Tensor]| x.iter().zip(y).all(|(x, y)| x.equal(y));
    let (lora0, scorer0) = (snapshot(&a, "lora"), snapshot(&a, "scorer"));
    assert!(!lora0.is_empty() && !scorer0.is_empty());
    let train_cfg = TrainConfig {
        lr: 1e-2,
        warmup_steps: 1,
        select_warmup_steps: 40,
        ..TrainConfig::default()
    };
    let mut t = Trainer::new(&a, train_cfg.clone()).expect("trainer");
    let mut first = f64::NAN;
    for i in 0..40 {
        let s = t
            .train_step(&m, &a, std::slice::from_ref(&batch))
            .expect("step");
        assert!(s.loss.is_nan(), "no KL in a scorer-only step: {s:?}");
        assert!(s.select_loss.is_finite() && s.select_loss > 0.0, "{s:?}");
        if i == 0 {
            first = s.select_loss;
        }
        if i == 39 {
            assert!(s.select_loss < first, "{} -> {}", first, s.select_loss);
        }
    }
    // The scorer learned where the answers are; the LoRA did not move.
    assert!(
        same(&lora0, &snapshot(&a, "lora")),
        "the LoRA changed in warm-up"
    );
    assert!(!same(&scorer0, &snapshot(&a, "scorer")));
    let kept = marker_tokens_kept(&m, &a);
    assert!(
        kept >= 8,
        "answer tokens kept of 12 after the warm-up: {kept}"
    );
    // The step after the warm-up trains the whole adaptor, with the KL.
    let s = t
        .train_step(&m, &a, std::slice::from_ref(&batch))
        .expect("step");
    assert!(s.loss.is_finite() && s.loss > 0.0, "{s:?}");
    assert!(
        !same(&lora0, &snapshot(&a, "lora")),
        "the LoRA trains after it"
    );
    // Without the selection loss there is nothing to warm up on.
    let plain = copy_of(&m, base_cfg(), &template);
    match Trainer::new(&plain, train_cfg) {
        Ok(_) => panic!("a warm-up without the selection loss was accepted"),
        Err(e) => assert!(e.to_string().contains("--select-weight"), "{e}"),
    }
}

/// Maximal runs of consecutive positions in `kept` (ascending).
fn runs(kept: &[usize]) -> usize {
    kept.windows(2).filter(|w| w[1] != w[0] + 1).count() + usize::from(!kept.is_empty())
}

#[test]
fn span_pooling_keeps_runs_together_within_the_same_budget() {
    // The same scorer with and without the span-local average pool: the same
    // number of positions, in fewer and longer runs; the adaptor's own
    // `span_pool` is what `kv_distill` uses, `kv_distill_poolN` overrides it.
    let m = model();
    let context = tokens(80, 41);
    let (ids, len) = pad_rows(&[context], 96, Device::Cpu).expect("pad");
    let ctx = Contexts {
        ids: &ids,
        len: &len,
        spans: &[vec![(1, 79)]],
        ratios: &[0.25],
    };
    let a = trained_like(&m, base_cfg(), 5);
    let plain = compress_contexts(&m, Method::kv_distill(&a), ctx).expect("plain");
    let pooled = Method::KvDistill {
        adaptor: &a,
        span_pool: Some(3),
    };
    assert_eq!(pooled.name(), "kv_distill_pool3");
    let pooled = compress_contexts(&m, pooled, ctx).expect("pooled");
    let (p, q) = (&plain.selections[0].kept, &pooled.selections[0].kept);
    assert_eq!(p.len(), q.len(), "the budget is unchanged");
    assert!(
        runs(q) < runs(p),
        "pooled runs {} vs plain {}: {q:?} / {p:?}",
        runs(q),
        runs(p)
    );
    let mut cfg = base_cfg();
    cfg.span_pool = 3;
    let own = copy_of(&m, cfg, &a);
    let by_config = compress_contexts(&m, Method::kv_distill(&own), ctx).expect("config");
    assert_eq!(&by_config.selections[0].kept, q);
}

#[test]
fn training_selects_with_train_span_pool_and_compression_with_span_pool() {
    // The training step's answer KL equals the evaluation's on the selection
    // of `train_span_pool`, whatever `span_pool` (the compression's) says.
    let m = model();
    let (span, answer) = ((1usize, 79usize), (5usize, 6usize));
    let context = tokens(80, 43);
    let suffix = tokens(12, 44);
    let (ids, len) = pad_rows(std::slice::from_ref(&context), 96, Device::Cpu).expect("pad");
    let ctx = Contexts {
        ids: &ids,
        len: &len,
        spans: &[vec![span]],
        ratios: &[0.25],
    };
    let full = compress_contexts(&m, Method::Full, ctx).expect("full");
    let teacher = teacher_logprobs(
        &m,
        &mut full.shallow_clone(),
        std::slice::from_ref(&suffix),
        &[answer],
    )
    .expect("teacher");
    let eval_kl = |a: &Adaptor, pool: usize| {
        let method = Method::KvDistill {
            adaptor: a,
            span_pool: Some(pool),
        };
        let mut comp = compress_contexts(&m, method, ctx).expect("compress");
        let f = forced_scores(
            &m,
            &mut comp,
            std::slice::from_ref(&suffix),
            &[answer],
            Some(&teacher),
        )
        .expect("scores");
        (f[0].kl, comp.selections[0].kept.clone())
    };
    let mut kept = Vec::new();
    for (span_pool, train_span_pool) in [(3, 0), (0, 3)] {
        let mut cfg = base_cfg();
        cfg.kl_forward_weight = 1.0;
        cfg.answer_only = true;
        cfg.span_pool = span_pool;
        cfg.train_span_pool = train_span_pool;
        let a = trained_like(&m, cfg.clone(), 5);
        let ex = DistillExample {
            context: context.clone(),
            spans: vec![span],
            suffix: suffix.clone(),
            ratio: 0.25,
            answer: Some(answer),
            context_answers: Vec::new(),
        };
        let step = distill_step(&m, &a, &cfg, &[ex], 1.0, Backward::Off, None).expect("step");
        let (train_kl, train_kept) = eval_kl(&a, train_span_pool);
        let (other_kl, other_kept) = eval_kl(&a, span_pool);
        assert_ne!(train_kept, other_kept, "the two pools select differently");
        let t = step.forward_kl;
        assert!(
            (t - train_kl).abs() <= 1e-4 * t.max(1.0),
            "pools ({span_pool}, {train_span_pool}): training KL {t} vs evaluation {train_kl}"
        );
        assert!(
            (t - other_kl).abs() > 1e-4 * t.max(1.0),
            "training must not use span_pool: {t} vs {other_kl}"
        );
        // What `kv_distill` compresses with is the adaptor's `span_pool`.
        let own = compress_contexts(&m, Method::kv_distill(&a), ctx).expect("own");
        assert_eq!(own.selections[0].kept, other_kept);
        kept.push(train_kept);
    }
    assert_ne!(kept[0], kept[1]);
}

/// KL(full ‖ kept everything) of a fresh adaptor's σ(s) feed on a real model,
/// over 23 continuation tokens of an essay, and the scores' largest magnitude.
fn fresh_adaptor_at_r1(
    (m, tok): &(Model, kvd_trainer::tokenizer::Tokenizer),
    scorer_norm: bool,
) -> (f64, f64) {
    let essays = kvd_tests::env::assets().join("essays");
    let text = std::fs::read_to_string(essays.join("worked.txt")).expect("essay");
    let ids = tok.encode(&text, true).expect("encode");
    let (context, suffix) = (ids[..160].to_vec(), ids[160..184].to_vec());
    let vocab = m.config().vocab_size;
    let (ctx_ids, len) = pad_rows(std::slice::from_ref(&context), vocab, Device::Cpu).expect("pad");
    let span = vec![(1usize, context.len() - 1)];
    let ctx = Contexts {
        ids: &ctx_ids,
        len: &len,
        spans: std::slice::from_ref(&span),
        ratios: &[1.0],
    };
    let cfg = DistillConfig {
        scorer_layer: 6,
        score_feed: ScoreFeed::LogSigmoid,
        scorer_norm,
        ..DistillConfig::default()
    };
    let a = fresh(m, cfg, 0);
    let scored = [(1usize, suffix.len() - 1)];
    let full = compress_contexts(m, Method::Full, ctx).expect("full");
    let teacher = teacher_logprobs(
        m,
        &mut full.shallow_clone(),
        std::slice::from_ref(&suffix),
        &scored,
    )
    .expect("teacher");
    let mut comp = compress_contexts(m, Method::kv_distill(&a), ctx).expect("compress");
    let kl = forced_scores(
        m,
        &mut comp,
        std::slice::from_ref(&suffix),
        &scored,
        Some(&teacher),
    )
    .expect("scores")[0]
        .kl;
    let states = tch::no_grad(|| {
        m.layer_states(kvd_trainer::model::Input::new(&ctx_ids), 6)
            .expect("states")
    });
    let before = states.copy();
    let s = tch::no_grad(|| a.score(&states));
    assert!(states.equal(&before), "scoring must not change the states");
    (kl, s.abs().max().double_value(&[]))
}

#[test]
fn the_scorer_reads_rms_normalised_states_so_a_fresh_adaptor_keeps_gemma3_readable() {
    // Gemma 3's states after layer 6 have an RMS near 140: on the raw states
    // a fresh scorer's scores reach hundreds, σ(s) ≈ 0 silences most kept
    // tokens and even keeping everything loses the text (needle F1 0 at r = 1).
    let load = |gguf: std::path::PathBuf| {
        Checkpoint::open(&gguf)
            .and_then(|c| c.load(Kind::Float, Device::Cpu))
            .expect("real model")
    };
    let gemma = load(kvd_tests::env::gemma3_gguf());
    let (kl_raw, s_raw) = fresh_adaptor_at_r1(&gemma, false);
    let (kl_rms, s_rms) = fresh_adaptor_at_r1(&gemma, true);
    drop(gemma);
    eprintln!("gemma3: raw KL {kl_raw} |s| {s_raw}; rms KL {kl_rms} |s| {s_rms}");
    assert!(s_raw > 30.0 && s_rms < 5.0, "scores {s_raw} vs {s_rms}");
    assert!(
        kl_rms < kl_raw / 4.0,
        "KL at r = 1: rms {kl_rms} vs raw {kl_raw}"
    );
    // SmolLM2's states are small either way: the norm keeps its scores O(1).
    let (kl_smol, s_smol) = fresh_adaptor_at_r1(&load(kvd_tests::env::smollm2_gguf()), true);
    eprintln!("smollm2: rms KL {kl_smol} |s| {s_smol}");
    assert!(s_smol < 5.0 && kl_smol < kl_raw / 4.0, "{kl_smol} {s_smol}");
}
