//! The needle test and the diagnosis tools end to end on CPU with the real
//! SmolLM2-135M-Instruct and the real essays: needles built at the asked
//! depths and lengths with their answers located in the context; the harness
//! with an answer-forcing oracle (keeps every answer token) and the
//! question-aware reference; per-item results, heat maps; the containment
//! metric; and the straight-through gradient report.

use kvd_tests::env::{assets, qa_sources, smollm2_gguf};
use kvd_trainer::checkpoint::Checkpoint;
use kvd_trainer::distill::{Adaptor, DistillConfig};
use kvd_trainer::eval::needle::{build_needles, load_haystack, write_needle_report, NeedleConfig};
use kvd_trainer::eval::run::{contains_answer, gradient_report, run_eval, EvalConfig};
use std::sync::Arc;
use tch::{Device, Kind};

#[test]
fn needles_sit_at_their_depth_in_contexts_of_their_length() {
    let ck = Checkpoint::open(&smollm2_gguf()).expect("smollm2");
    let tok = ck.tokenizer().expect("tokenizer");
    let filler = load_haystack(&assets().join("essays")).expect("essays");
    let cfg = NeedleConfig {
        items: 12,
        lengths: vec![128, 512],
        depths: vec![0.0, 0.5, 1.0],
        seed: 3,
    };
    let (set, items) = build_needles(&filler, &tok, &cfg).expect("needles");
    assert_eq!(set.questions.len(), 12);
    for (q, it) in set.questions.iter().zip(&items) {
        let start = q.answer_starts[0];
        let chars: Vec<char> = q.context.chars().collect();
        let found: String = chars[start..start + q.answers[0].chars().count()]
            .iter()
            .collect();
        assert_eq!(found, q.answers[0], "{}", q.id);
        let n = tok.encode(&q.context, false).expect("encode").len();
        assert!(
            n <= it.length + 8 && n * 10 >= it.length * 7,
            "{}: {n} tokens for length {}",
            q.id,
            it.length
        );
        let rel = start as f64 / chars.len() as f64;
        assert!(
            (rel - it.depth).abs() < 0.2,
            "{}: fact at {rel:.2} of the context, depth {}",
            q.id,
            it.depth
        );
    }
    // Seeded: the same items again, others for another seed.
    let again = build_needles(&filler, &tok, &cfg).expect("again").0;
    assert_eq!(again.questions, set.questions);
    let other = build_needles(&filler, &tok, &NeedleConfig { seed: 4, ..cfg }).expect("other");
    assert_ne!(other.0.questions, set.questions);
}

#[test]
fn the_needle_harness_reports_kept_answers_oracles_and_heat_maps() {
    let ck = Checkpoint::open(&smollm2_gguf()).expect("smollm2");
    let (model, tok) = ck.load(Kind::Float, Device::Cpu).expect("load");
    let tok = Arc::new(tok);
    let filler = load_haystack(&assets().join("essays")).expect("essays");
    let (set, needle) = build_needles(
        &filler,
        &tok,
        &NeedleConfig {
            items: 4,
            lengths: vec![96, 160],
            depths: vec![0.0, 1.0],
            seed: 0,
        },
    )
    .expect("needles");
    let cfg = EvalConfig {
        questions: 4,
        ratios: vec![0.25],
        methods: vec![
            "random".into(),
            "random+answer".into(),
            "snapkv_question".into(),
            "tova".into(),
            "expected_attention".into(),
        ],
        batch: 4,
        max_new_tokens: 12,
        per_item: true,
        ..EvalConfig::default()
    };
    let mut report = run_eval(&model, tok.clone(), None, &set, &cfg, |_, _| {}).expect("eval");
    report.needle = needle;
    assert_eq!(report.rows.len(), 1 + 5);
    assert_eq!(report.items.len(), 4 * 6);
    let row = |m: &str| report.rows.iter().find(|r| r.method == m).expect(m);
    assert_eq!(row("full").answer_kept, Some(1.0));
    assert_eq!(
        row("random+answer").answer_kept,
        Some(1.0),
        "the oracle keeps the answer"
    );
    for m in ["random", "tova", "expected_attention", "snapkv_question"] {
        let k = row(m).answer_kept.expect("located");
        assert!((0.0..=1.0).contains(&k), "{m}: {k}");
        assert!(row(m).f1_se >= 0.0);
    }
    // Grouped by how much of the answer was kept: every question in one
    // group; the oracle's all in `all`, with the uncompressed model's scores
    // of the same questions beside.
    for m in ["random", "tova", "expected_attention", "snapkv_question"] {
        let n: usize = row(m).by_answer_kept.iter().map(|g| g.questions).sum();
        assert_eq!(n, 4, "{m}: {:?}", row(m).by_answer_kept);
    }
    let oracle = &row("random+answer").by_answer_kept;
    assert_eq!(oracle.len(), 1, "{oracle:?}");
    assert_eq!((oracle[0].kept.as_str(), oracle[0].questions), ("all", 4));
    assert!((oracle[0].full_f1 - row("full").f1).abs() < 1e-9);
    assert!((oracle[0].full_answer_nll - row("full").answer_nll).abs() < 1e-9);
    assert!((oracle[0].f1 - row("random+answer").f1).abs() < 1e-9);
    assert!(row("full").by_answer_kept.is_empty());
    // The question-aware reference sees the question: it keeps at least as
    // much of the answer as random selection on these items.
    assert!(row("snapkv_question").answer_kept >= row("random").answer_kept);
    let dir = tempfile::tempdir().expect("tempdir");
    let md = write_needle_report(&report, dir.path()).expect("report");
    assert!(md.contains("| random+answer | 0.25 |"), "{md}");
    let tables = kvd_trainer::eval::run::markdown(&report);
    assert!(
        tables.contains("| random+answer | 0.25 | all | 4 |"),
        "{tables}"
    );
    let png = std::fs::read(dir.path().join("needle_r0.25.png")).expect("heat map");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(png.len() > 5_000);
}

/// A training-free method scores a batch's contexts once for all its ratios:
/// every row and item of an evaluation at two ratios equals that of the
/// evaluations at each ratio alone (the shared scores and full cache are
/// not changed by the first ratio's compression), oracles included.
#[test]
fn one_scoring_pass_serves_every_ratio() {
    let ck = Checkpoint::open(&smollm2_gguf()).expect("smollm2");
    let (model, tok) = ck.load(Kind::Float, Device::Cpu).expect("load");
    let tok = Arc::new(tok);
    let filler = load_haystack(&assets().join("essays")).expect("essays");
    let (set, _) = build_needles(
        &filler,
        &tok,
        &NeedleConfig {
            items: 3,
            lengths: vec![96, 128],
            depths: vec![0.5],
            seed: 1,
        },
    )
    .expect("needles");
    let cfg = |ratios: Vec<f64>| EvalConfig {
        questions: 3,
        ratios,
        methods: vec!["snapkv".into(), "key_norm".into(), "random+answer".into()],
        batch: 3,
        max_new_tokens: 8,
        per_item: true,
        ..EvalConfig::default()
    };
    let run = |ratios: Vec<f64>| {
        run_eval(&model, tok.clone(), None, &set, &cfg(ratios), |_, _| {}).expect("eval")
    };
    let both = run(vec![0.5, 0.25]);
    let mut rows = Vec::new();
    let mut items = Vec::new();
    for r in [0.5, 0.25] {
        let alone = run(vec![r]);
        rows.extend(alone.rows.into_iter().filter(|row| row.method != "full"));
        items.extend(alone.items.into_iter().filter(|it| it.method != "full"));
    }
    let key = |m: &str, r: f64| (m.to_string(), (r * 1000.0) as i64);
    let mut got: Vec<_> = both
        .rows
        .iter()
        .filter(|row| row.method != "full")
        .collect();
    got.sort_by_key(|row| key(&row.method, row.ratio));
    rows.sort_by_key(|row| key(&row.method, row.ratio));
    assert_eq!(got.len(), 6);
    assert_eq!(got, rows.iter().collect::<Vec<_>>());
    let mut got: Vec<_> = both.items.iter().filter(|it| it.method != "full").collect();
    let item_key = |it: &&kvd_trainer::eval::run::ItemResult| {
        (it.id.clone(), it.method.clone(), (it.ratio * 1000.0) as i64)
    };
    got.sort_by_key(item_key);
    let mut want: Vec<_> = items.iter().collect();
    want.sort_by_key(item_key);
    assert_eq!(got.len(), 18);
    assert_eq!(got, want);
}

#[test]
fn containment_is_the_normalised_answer_inside_the_generation() {
    assert!(contains_answer(
        "The code is ABC-1234, I think.",
        &["abc-1234"]
    ));
    assert!(contains_answer("It was The Beatles", &["Beatles"]));
    assert!(!contains_answer("The answer is 123456", &["12345"]));
    assert!(!contains_answer("nothing here", &["", "x"]));
}

#[test]
fn the_gradient_report_covers_the_forced_answer_slots() {
    let ck = Checkpoint::open(&smollm2_gguf()).expect("smollm2");
    let (model, tok) = ck.load(Kind::Float, Device::Cpu).expect("load");
    let set = kvd_trainer::eval::load_squad(&qa_sources().join("squad_shifts/new_wiki_v1.0.json"))
        .expect("new_wiki");
    let adaptor =
        Adaptor::new(model.config(), DistillConfig::default(), Device::Cpu, 0).expect("adaptor");
    let r = gradient_report(&model, Arc::new(tok), &adaptor, &set, 3, 0.25, 3).expect("report");
    assert!(r.questions >= 2, "{r:?}");
    assert!(
        r.answer_slots >= r.questions && r.other_slots > r.answer_slots,
        "{r:?}"
    );
    assert!((0.0..=1.0).contains(&r.answer_rank), "{r:?}");
    assert!(
        r.answer_mean_grad.is_finite() && r.other_mean_grad.abs() > 0.0,
        "{r:?}"
    );
}
