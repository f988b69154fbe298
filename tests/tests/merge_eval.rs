//! `bench/merge_eval.py` on real `kv-distill eval` reports (the crate's own
//! `EvalReport`, serialised as `eval` writes it): one adaptor's run and a
//! baselines' run merge into one JSON (`full` once, F1 standard errors from
//! the items), and the paired table gives each adaptor method's F1 minus the
//! closest question-agnostic baseline's, over the same questions, with the
//! standard error of the paired difference; question-aware methods and
//! oracles are not compared.

use kvd_tests::env::python;
use kvd_trainer::eval::run::{EvalConfig, EvalReport, EvalRow, ItemResult};
use std::path::Path;
use std::process::Command;

fn row(method: &str, ratio: f64, f1: &[f64]) -> EvalRow {
    EvalRow {
        method: method.into(),
        ratio,
        questions: f1.len(),
        exact_match: 0.0,
        f1: f1.iter().sum::<f64>() / f1.len() as f64,
        f1_se: 0.0,
        answer_nll: 2.0,
        kl: 0.5,
        cache_fraction: ratio,
        contains: 50.0,
        answer_kept: Some(0.5),
        kept_profile: None,
        by_answer_kept: Vec::new(),
    }
}

fn items(method: &str, ratio: f64, f1: &[f64]) -> Vec<ItemResult> {
    f1.iter()
        .enumerate()
        .map(|(i, &f)| ItemResult {
            id: format!("q{i}"),
            method: method.into(),
            ratio,
            f1: f,
            contains: f > 50.0,
            answer_nll: 2.0,
            answer_kept: Some(0.5),
        })
        .collect()
}

fn report(runs: &[(&str, f64, &[f64])]) -> EvalReport {
    EvalReport {
        config: EvalConfig::default(),
        dataset: "squad.json".into(),
        model: "m".into(),
        adaptor: None,
        rows: runs.iter().map(|(m, r, f)| row(m, *r, f)).collect(),
        samples: Vec::new(),
        items: runs.iter().flat_map(|(m, r, f)| items(m, *r, f)).collect(),
        needle: Vec::new(),
        seconds: 1.0,
        phases_s: Default::default(),
    }
}

fn write(dir: &Path, name: &str, r: &EvalReport) -> String {
    let p = dir.join(name);
    std::fs::write(&p, serde_json::to_vec(r).expect("json")).expect("write");
    p.to_string_lossy().into_owned()
}

#[test]
fn merged_reports_compare_methods_over_the_same_questions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let full: &[f64] = &[100.0, 50.0, 0.0, 100.0];
    let ours: &[f64] = &[100.0, 50.0, 0.0, 50.0];
    let random: &[f64] = &[0.0, 50.0, 0.0, 0.0];
    let streaming: &[f64] = &[100.0, 0.0, 0.0, 50.0];
    let aware: &[f64] = &[100.0, 50.0, 100.0, 100.0];
    let a = write(
        dir.path(),
        "a.json",
        &report(&[("full", 1.0, full), ("kv_distill", 0.25, ours)]),
    );
    let b = write(
        dir.path(),
        "b.json",
        &report(&[
            ("full", 1.0, full),
            ("random", 0.25, random),
            ("streaming_llm", 0.25, streaming),
            ("snapkv_question", 0.25, aware),
        ]),
    );
    let merged = dir.path().join("merged.json");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/merge_eval.py");
    let out = Command::new(python())
        .arg(&script)
        .arg(&merged)
        .arg(format!("ours={a}"))
        .arg(format!("none={b}"))
        .output()
        .expect("python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&merged).expect("merged")).expect("json");
    let methods: Vec<&str> = m["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| r["method"].as_str().expect("method"))
        .collect();
    assert_eq!(
        methods,
        [
            "full",
            "kv_distill",
            "random",
            "streaming_llm",
            "snapkv_question"
        ]
    );
    // The standard error of kv_distill's mean F1, from its items.
    let mean = ours.iter().sum::<f64>() / 4.0;
    let var = ours.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 3.0;
    let se = m["rows"][1]["f1_se"].as_f64().expect("f1_se");
    assert!((se - (var / 4.0).sqrt()).abs() < 1e-9, "{se}");

    // Paired: kv_distill - streaming_llm = [0, 50, 0, 0] (mean 12.5, SE
    // 12.5); - random = [100, 0, 0, 50] (mean 37.5, SE 23.9): streaming_llm is
    // the closer in standard errors. snapkv_question sees the question.
    assert!(
        stdout.contains("| kv_distill | 0.25 | streaming_llm +12.5 ± 12.5 (+1.0 SE) | 2 |"),
        "{stdout}"
    );
}
