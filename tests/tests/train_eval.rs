//! The training job and the evaluation harness end to end on CPU with the real
//! SmolLM2-135M-Instruct and real data: Parquet datasets written to `file://`,
//! a seeded run that is bit-reproducible, the adaptor reloaded, then the SQuAD
//! harness with KV-Distill and a baseline writing its table and plot.

use kvd_data::prepare::{read_squad, read_text_dir, SquadContext};
use kvd_data::writer::WriterConfig;
use kvd_data::{BuilderConfig, DatasetOptions, StoreOptions};
use kvd_tests::env::{assets, qa_sources, smollm2_gguf};
use kvd_trainer::checkpoint::Checkpoint;
use kvd_trainer::distill::checkpoint::load as load_adaptor;
use kvd_trainer::distill::{DistillConfig, TrainConfig};
use kvd_trainer::eval::load_squad;
use kvd_trainer::eval::run::{markdown, run_eval, write_report, ContextKind, EvalConfig};
use kvd_trainer::train_loop::{job_hash, mix_schedule, train, DataMix, LocalCheckpoints, TrainJob};
use std::path::Path;
use std::sync::Arc;
use tch::{Device, Kind};

fn write(url: &str, rows: &[kvd_data::writer::SourcedRecord]) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(kvd_data::prepare::write_dataset(
        url,
        &StoreOptions::default(),
        rows,
        &WriterConfig {
            row_group_rows: 4,
            ..WriterConfig::default()
        },
        None,
    ))
    .expect("write dataset");
}

fn job(dir: &Path, out: &str, steps: usize) -> TrainJob {
    TrainJob {
        data: vec![
            DataMix {
                url: format!("file://{}/qa", dir.display()),
                weight: 1,
            },
            DataMix {
                url: format!("file://{}/text", dir.display()),
                weight: 1,
            },
        ],
        dataset: DatasetOptions::default(),
        builder: BuilderConfig {
            max_len: 96,
            text_suffix_len: 16,
            ..BuilderConfig::default()
        },
        distill: DistillConfig::default(),
        train: TrainConfig {
            lr: 1e-3,
            warmup_steps: 1,
            total_steps: steps,
            ..TrainConfig::default()
        },
        global_batch: 2,
        micro_batch: 1,
        seed: 5,
        prefetch: 2,
        out: dir.join(out),
        save_every: 0,
        log_every: 1,
        base_model: "SmolLM2-135M-Instruct".into(),
        time_limit_s: None,
        bucket_by_length: false,
        micro_batch_tokens: None,
        recompute_encoder: false,
        pad_multiple: 1,
    }
}

#[test]
fn mix_schedule_follows_weights() {
    let s = mix_schedule(&[3, 1], 8);
    assert_eq!(s.iter().filter(|&&d| d == 0).count(), 6);
    assert_eq!(s.iter().filter(|&&d| d == 1).count(), 2);
    assert_eq!(&s[..4], &[0, 0, 1, 0]);
    assert_eq!(mix_schedule(&[1, 1], 4), vec![0, 1, 0, 1]);
}

#[test]
fn train_reproducibly_then_evaluate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bb = qa_sources().join("squad_shifts");
    let qa = read_squad(
        &bb.join("new_wiki_v1.0.json"),
        "new_wiki",
        SquadContext::Paragraph,
    )
    .expect("new_wiki");
    write(&format!("file://{}/qa", dir.path().display()), &qa[..8]);
    let text = read_text_dir(&assets().join("essays"), "essays").expect("essays");
    let long: Vec<_> = text
        .into_iter()
        .filter(|r| matches!(&r.record, kvd_data::Record::Text { text } if text.len() > 2000))
        .take(4)
        .collect();
    write(&format!("file://{}/text", dir.path().display()), &long);

    let ck = Checkpoint::open(&smollm2_gguf()).expect("smollm2");
    let (model, tok) = ck.load(Kind::Float, Device::Cpu).expect("load");
    let tok = Arc::new(tok);
    let before: Vec<tch::Tensor> = model.weights().iter().map(|w| w.copy()).collect();

    let mut seen = Vec::new();
    let (a1, s1) = train(
        &model,
        tok.clone(),
        &job(dir.path(), "a1.safetensors", 2),
        &LocalCheckpoints::beside(&dir.path().join("a1.safetensors")),
        None,
        |s, l, _| seen.push((s, l)),
    )
    .expect("train");
    assert_eq!(s1.steps, 2);
    assert_eq!(s1.examples, 4);
    // Context and suffix tokens, more than the supervised ones, and their rates.
    assert!(s1.total_tokens > s1.tokens && s1.tokens > 0, "{s1:?}");
    assert!(
        s1.total_tok_per_s > s1.tok_per_s && s1.tok_per_s > 0.0,
        "{s1:?}"
    );
    assert!(s1.first_loss.is_finite() && s1.first_loss > 0.0, "{s1:?}");
    assert_eq!(seen.len(), 2);
    assert_eq!(s1.cursors.len(), 2);
    assert_eq!(s1.cursors[0].sample_index, 2);
    assert!(s1.skipped.contains("0"), "{}", s1.skipped);
    // Only the adaptor trained: the base weights are bit-identical.
    for (w, b) in model.weights().iter().zip(&before) {
        assert!(w.equal(b), "a base weight changed");
    }

    // The same seed gives the same adaptor, bit for bit.
    let (a2, _) = train(
        &model,
        tok.clone(),
        &job(dir.path(), "a2.safetensors", 2),
        &LocalCheckpoints::beside(&dir.path().join("a2.safetensors")),
        None,
        |_, _, _| {},
    )
    .expect("train again");
    let v2 = a2.vs.variables();
    for (name, t) in a1.vs.variables() {
        assert!(t.equal(&v2[&name]), "{name} differs between identical runs");
    }

    // Recomputing the encoder (a per-process memory setting) trains the same
    // adaptor, and a checkpoint of one resumes with the other.
    let mut recomputing = job(dir.path(), "a3.safetensors", 2);
    recomputing.recompute_encoder = true;
    assert_eq!(
        job_hash(&recomputing),
        job_hash(&job(dir.path(), "a3.safetensors", 2))
    );
    let (a3, s3) = train(
        &model,
        tok.clone(),
        &recomputing,
        &LocalCheckpoints::beside(&dir.path().join("a3.safetensors")),
        None,
        |_, _, _| {},
    )
    .expect("train recomputing the encoder");
    assert!(
        (s3.first_loss - s1.first_loss).abs() <= 1e-6 * s1.first_loss,
        "{s3:?}"
    );
    let v3 = a3.vs.variables();
    for (name, t) in a1.vs.variables() {
        let diff = (&t - &v3[&name]).abs().max().double_value(&[]);
        assert!(diff <= 1e-6, "{name} differs by {diff} when recomputing");
    }

    // The checkpoint reloads with its step and settings.
    let (loaded, meta) = load_adaptor(
        &dir.path().join("a1.safetensors"),
        model.config(),
        Device::Cpu,
    )
    .expect("reload");
    assert_eq!(meta.step, 2);
    assert_eq!(meta.base_model, "SmolLM2-135M-Instruct");
    let lv = loaded.vs.variables();
    for (name, t) in a1.vs.variables() {
        assert!(t.equal(&lv[&name]), "{name} differs after reload");
    }

    // Evaluation on SQuAD v1.1 dev with the trained adaptor and one baseline.
    let set = load_squad(&bb.join("squaddev_v1.1.json")).expect("squad dev");
    let cfg = EvalConfig {
        questions: 2,
        seed: 1,
        context: ContextKind::Paragraph,
        ratios: vec![0.25],
        methods: vec![
            "kv_distill".into(),
            "kv_distill_select".into(),
            "streaming_llm".into(),
        ],
        batch: 2,
        max_new_tokens: 6,
        ..EvalConfig::default()
    };
    let mut ticks = Vec::new();
    let mut report = run_eval(&model, tok.clone(), Some(&loaded), &set, &cfg, |d, t| {
        ticks.push((d, t))
    })
    .expect("eval");
    report.model = "SmolLM2-135M-Instruct".into();
    // Progress counts (question, method x ratio) units: 2 x (full + 3).
    assert_eq!(ticks.last(), Some(&(8, 8)));
    assert_eq!(report.rows.len(), 4);
    let full = &report.rows[0];
    assert_eq!((full.method.as_str(), full.questions), ("full", 2));
    assert!((full.cache_fraction - 1.0).abs() < 1e-12);
    assert!(full.kl.abs() < 1e-6, "teacher vs itself: {}", full.kl);
    for r in &report.rows[1..] {
        assert!(
            r.cache_fraction > 0.2 && r.cache_fraction < 0.35,
            "{}: {}",
            r.method,
            r.cache_fraction
        );
        assert!(r.kl > 0.0 && r.answer_nll.is_finite(), "{r:?}");
        assert!((0.0..=100.0).contains(&r.f1) && r.f1 >= r.exact_match);
    }
    // The adaptor's selection read by the frozen model: the same positions
    // kept (so the same profile), another cache.
    let (kvd, select) = (&report.rows[1], &report.rows[2]);
    assert_eq!(select.method, "kv_distill_select");
    assert_eq!(select.kept_profile, kvd.kept_profile);
    assert_eq!(select.answer_kept, kvd.answer_kept);
    assert_ne!(select.answer_nll, kvd.answer_nll);
    // Where the kept tokens fall: StreamingLLM keeps the span's first tokens
    // (sinks) and its end, nothing in the middle.
    let stream = report
        .rows
        .iter()
        .find(|r| r.method == "streaming_llm")
        .expect("row");
    let tenths = &stream.kept_profile.as_ref().expect("profile").by_tenth;
    assert_eq!(tenths.len(), 10);
    assert_eq!(tenths[9], Some(1.0), "{tenths:?}");
    assert_eq!(tenths[4], Some(0.0), "{tenths:?}");
    assert!(tenths[0].is_some_and(|x| x > 0.0), "{tenths:?}");
    let full_profile = full.kept_profile.as_ref().expect("full's profile");
    assert_eq!(full_profile.words, Some(1.0), "full keeps everything");
    let out = dir.path().join("results");
    write_report(&report, &out).expect("report");
    let md = std::fs::read_to_string(out.join("results.md")).expect("md");
    assert!(
        md.contains("| kv_distill |") && md.contains("| streaming_llm |"),
        "{md}"
    );
    assert!(md.contains("by tenth of the span"), "{md}");
    assert_eq!(md, markdown(&report));
    let png = std::fs::read(out.join("f1_vs_ratio.png")).expect("png");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("results.json")).expect("json"))
            .expect("valid json");
    assert_eq!(json["rows"].as_array().map(Vec::len), Some(4));

    // A batch that runs out of memory is evaluated again in halves: the same
    // rows as batches of one; a single question that does not fit ends the
    // run with an error naming the batch and the fix.
    let one_method = EvalConfig {
        methods: vec!["streaming_llm".into()],
        per_item: true,
        ..cfg.clone()
    };
    let singles = EvalConfig {
        batch: 1,
        ..one_method.clone()
    };
    let halving = EvalConfig {
        inject_oom_above: Some(1),
        ..one_method.clone()
    };
    let want = run_eval(&model, tok.clone(), None, &set, &singles, |_, _| {}).expect("batch 1");
    let mut ticks = Vec::new();
    let got = run_eval(&model, tok.clone(), None, &set, &halving, |d, t| {
        ticks.push((d, t))
    })
    .expect("halved after the injected failure");
    assert_eq!(got.rows, want.rows);
    assert_eq!(got.items, want.items);
    assert_eq!(ticks.last(), Some(&(4, 4)));
    assert!(ticks.windows(2).all(|w| w[0].0 < w[1].0), "{ticks:?}");
    let never = EvalConfig {
        inject_oom_above: Some(0),
        ..one_method.clone()
    };
    let e = run_eval(&model, tok.clone(), None, &set, &never, |_, _| {})
        .map(|_| ())
        .expect_err("a single question out of memory")
        .to_string();
    assert!(
        e.starts_with("out of memory in an evaluation batch of 1 questions of up to 2048 tokens: "),
        "{e}"
    );
    assert!(e.contains("fix: a smaller --batch"), "{e}");

    // Bad harness settings are refused up front.
    let bad = EvalConfig {
        ratios: vec![0.0],
        ..cfg.clone()
    };
    let e = run_eval(&model, tok.clone(), Some(&loaded), &set, &bad, |_, _| {})
        .map(|_| ())
        .expect_err("r = 0")
        .to_string();
    assert!(e.contains("(0, 1]"), "{e}");
    let no_adaptor = run_eval(&model, tok, None, &set, &cfg, |_, _| {})
        .map(|_| ())
        .expect_err("kv_distill without adaptor")
        .to_string();
    assert!(no_adaptor.contains("needs an adaptor"), "{no_adaptor}");
}

#[test]
fn the_logged_job_hides_store_credentials() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut j = job(dir.path(), "a.safetensors", 1);
    j.dataset.store = StoreOptions::default()
        .with("endpoint", "http://127.0.0.1:9000")
        .with("access_key_id", "AKIDEXAMPLE")
        .with("secret_access_key", "wJalrXUtnFEMI")
        .with("google_bearer_token", "ya29.token")
        .with("AZURE_STORAGE_SAS_TOKEN", "sv=2024&sig=abc");
    let line = j.log_json();
    for secret in ["AKIDEXAMPLE", "wJalrXUtnFEMI", "ya29.token", "sig=abc"] {
        assert!(!line.contains(secret), "{secret} logged: {line}");
    }
    assert!(line.contains("http://127.0.0.1:9000"), "{line}");
    assert!(
        line.contains("secret_access_key"),
        "the key's name stays: {line}"
    );
    // The job itself keeps its credentials.
    assert_eq!(j.dataset.store.config["secret_access_key"], "wJalrXUtnFEMI");
}

/// Job JSON written by older versions, with settings since removed (the
/// `launch_threads` of side-by-side micro-batches), still reads, as the
/// same job (the same hash).
#[test]
fn job_json_with_removed_settings_still_reads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let j = job(dir.path(), "a.safetensors", 1);
    let mut old = serde_json::to_value(&j).expect("json");
    old["launch_threads"] = serde_json::json!(2);
    let read: TrainJob = serde_json::from_value(old).expect("old job JSON reads");
    assert_eq!(job_hash(&read), job_hash(&j));
}

/// On real QA rows (SQuAD-shifts new_wiki, the SmolLM2 tokenizer), the
/// example builder locates nearly every answer's text in the context tokens,
/// and each located run decodes to the answer.
#[test]
fn qa_examples_locate_real_answers_in_their_context() {
    use kvd_data::{ExampleBuilder, Location, Record};
    use kvd_trainer::distill::examples::ModelTokenizer;
    let ck = Checkpoint::open(&smollm2_gguf()).expect("smollm2");
    let tok = Arc::new(ck.tokenizer().expect("tokenizer"));
    let rows = read_squad(
        &qa_sources().join("squad_shifts/new_wiki_v1.0.json"),
        "new_wiki",
        SquadContext::Paragraph,
    )
    .expect("new_wiki");
    let builder = ExampleBuilder::new(
        Arc::new(ModelTokenizer(tok.clone())),
        BuilderConfig {
            max_len: 1024,
            ..BuilderConfig::default()
        },
    )
    .expect("builder");
    let (mut qa, mut located) = (0, 0);
    for (i, row) in rows.iter().take(300).enumerate() {
        let Record::Qa { answers, .. } = &row.record else {
            continue;
        };
        let ex = builder
            .build(
                &row.record,
                i as u64,
                1,
                &Location::cell("new_wiki", i as u64, "context"),
            )
            .expect("build");
        qa += 1;
        located += usize::from(!ex.context_answers.is_empty());
        for &(s, n) in &ex.context_answers {
            assert!(s >= ex.prefix_len && s + n <= ex.prefix_len + ex.span_len);
            let text = tok.decode(&ex.tokens[s..s + n], false).expect("decode");
            assert!(
                answers.iter().any(|a| text.trim() == a.trim()),
                "row {i}: {text:?} is none of {answers:?}"
            );
        }
    }
    eprintln!("answers located in {located} of {qa} QA rows");
    assert!(qa >= 250, "{qa} QA rows");
    assert!(located * 10 >= qa * 9, "located {located} of {qa}");
}
