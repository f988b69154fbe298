//! The `kv-distill` binary as a user runs it, on the real SmolLM2 GGUF fetched
//! by `scripts/setup.sh`.

mod common;
use common::{assets, smollm2};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_kv-distill");

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

const CONTEXT: &str = "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889.";

#[test]
fn compress_then_generate_from_the_cache_file() {
    let m = smollm2();
    let dir = tempfile::tempdir().expect("tempdir");
    let full = dir.path().join("full.safetensors");
    let snap = dir.path().join("snap.safetensors");
    let compress = |method: &str, ratio: &str, out: &std::path::Path| {
        run(&[
            "compress",
            "--model",
            &m,
            "--device",
            "cpu",
            "--method",
            method,
            "--ratio",
            ratio,
            "--context",
            CONTEXT,
            "--out",
            out.to_str().expect("utf-8"),
        ])
    };
    let o = compress("full", "1.0", &full);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let o = compress("snapkv", "0.25", &snap);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let said = text(&o.stdout);
    assert!(said.contains("with snapkv at r = 0.25"), "{said}");
    assert!(full.exists() && snap.exists());
    // The 25% cache is about a quarter of the full one on disk too.
    let (fs, ss) = (
        std::fs::metadata(&full).expect("full").len() as f64,
        std::fs::metadata(&snap).expect("snap").len() as f64,
    );
    assert!(ss / fs > 0.2 && ss / fs < 0.35, "{ss} / {fs}");
    // From the full cache, generation equals generating from the text itself.
    let ask = "\n\nQuestion: Who is the tower named after?\nAnswer:";
    let gen = |cache: Option<&std::path::Path>, prompt: String| {
        let mut args = vec![
            "generate".to_string(),
            "--model".into(),
            m.clone(),
            "--device".into(),
            "cpu".into(),
            "--prompt".into(),
            prompt,
            "--max-new-tokens".into(),
            "8".into(),
        ];
        if let Some(c) = cache {
            args.push("--cache".into());
            args.push(c.to_string_lossy().into_owned());
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = run(&refs);
        assert!(o.status.success(), "{}", text(&o.stderr));
        text(&o.stdout)
    };
    let from_cache = gen(Some(&full), ask.to_string());
    let from_text = gen(None, format!("{CONTEXT}{ask}"));
    assert_eq!(from_cache, from_text);
    assert!(from_cache.contains("Eiffel"), "{from_cache}");
    let _ = gen(Some(&snap), ask.to_string());
}

#[test]
fn compress_rejects_bad_input() {
    let m = smollm2();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("c.safetensors");
    let o_s = out.to_str().expect("utf-8");
    let fail = |args: &[&str], want: &str| {
        let o = run(args);
        assert!(!o.status.success(), "{args:?} succeeded");
        let e = text(&o.stderr);
        assert!(e.contains(want), "{args:?}: {e}");
    };
    let base = ["compress", "--model", &m, "--device", "cpu", "--out", o_s];
    let with = |extra: &[&'static str]| -> Vec<String> {
        base.iter()
            .map(|s| s.to_string())
            .chain(extra.iter().map(|s| s.to_string()))
            .collect()
    };
    for (extra, want) in [
        (
            &["--ratio", "0", "--context", CONTEXT][..],
            "outside (0, 1]",
        ),
        (
            &["--ratio", "1.5", "--context", CONTEXT][..],
            "outside (0, 1]",
        ),
        (&["--ratio", "0.5", "--context", ""][..], "empty"),
        (
            &["--ratio", "0.5", "--context", CONTEXT, "--method", "magic"][..],
            "magic",
        ),
        (
            &["--ratio", "0.5", "--context-file", "/nonexistent/ctx.txt"][..],
            "/nonexistent/ctx.txt",
        ),
    ] {
        let args = with(extra);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        fail(&refs, want);
    }
    // A context longer than SmolLM2's 8192-token window.
    let long = dir.path().join("long.txt");
    std::fs::write(&long, "word ".repeat(9000)).expect("write");
    let args = with(&["--ratio", "0.5", "--context-file"]);
    let mut refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let l = long.to_string_lossy().into_owned();
    refs.push(&l);
    fail(&refs, "longer than the model window");
    // A corrupt cache file given to generate.
    let bad = dir.path().join("bad.safetensors");
    std::fs::write(&bad, b"\x08\x00\x00\x00\x00\x00\x00\x00{}").expect("write");
    let b = bad.to_string_lossy().into_owned();
    fail(
        &[
            "generate", "--model", &m, "--device", "cpu", "--cache", &b, "--prompt", "x",
        ],
        "bad.safetensors",
    );
}

#[test]
fn bench_step_reports_throughput_flops_and_mfu() {
    let m = smollm2();
    // A small CPU step on SmolLM2, `iters` timed steps.
    let bench = |iters: &str| -> Command {
        let mut c = Command::new(BIN);
        c.args([
            "bench-step",
            "--model",
            &m,
            "--device",
            "cpu",
            "--span",
            "48",
            "--suffix",
            "8",
            "--iters",
            iters,
        ]);
        c
    };
    // Runs it; its one JSON line.
    let report = |c: &mut Command| -> serde_json::Value {
        let out = c.output().expect("start kv-distill");
        assert!(out.status.success(), "{}", text(&out.stderr));
        serde_json::from_str(text(&out.stdout).trim()).expect("one JSON line")
    };
    let line = report(&mut bench("1"));
    let median = line["median_s"].as_f64().unwrap();
    let tflop = line["step_tflop"].as_f64().unwrap();
    assert!(median > 0.0 && tflop > 0.0, "{line}");
    assert!((line["tokens_per_s"].as_f64().unwrap() - 56.0 / median).abs() < 1e-6 * 56.0 / median);
    assert!((line["mfu"].as_f64().unwrap() - tflop * 1e12 / median / 801e12).abs() < 1e-9);
    // Three steps ran (2 warm-up + 1 timed) and the loss is finite.
    let losses = line["losses"].as_array().unwrap();
    assert_eq!(losses.len(), 3);
    assert!(losses.iter().all(|l| l.as_f64().unwrap().is_finite()));
    // Without --step-phases there is no phase timing.
    assert_eq!(line["phases_s"], serde_json::json!({}), "{line}");
    // With it, every phase of the timed steps is reported, and they add up to
    // about the step (the marks cover it but for the host-side bookkeeping).
    let line = report(bench("2").arg("--step-phases"));
    let phases = line["phases_s"].as_object().expect("phases");
    let names: Vec<&str> = phases.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "all_reduce",
            "backward",
            "decoder",
            "encoder",
            "gather",
            "kl",
            "optimizer",
            "scorer",
            "teacher"
        ]
    );
    let sum: f64 = phases.values().map(|v| v.as_f64().unwrap()).sum();
    let median = line["median_s"].as_f64().unwrap();
    assert!(
        sum > 0.5 * median && sum < 1.5 * median,
        "phases {sum} s vs step {median} s"
    );
    // Turning the speed-ups off (the encoder's last layer in full, the teacher
    // on this thread, the loss read before the backward) changes no loss.
    let full = report(bench("1").args(["--ablate", "fill_cache,teacher_thread,deferred_loss"]));
    assert_eq!(full["losses"], serde_json::Value::Array(losses.clone()));
    // The same through the environment, and an unknown name is refused.
    let env = report(bench("1").env("KVD_ABLATE", "teacher_thread"));
    assert_eq!(env["losses"], serde_json::Value::Array(losses.clone()));
    let out = bench("1")
        .args(["--ablate", "warp_speed"])
        .output()
        .expect("start kv-distill");
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("`warp_speed`"),
        "{}",
        text(&out.stderr)
    );
    // `--method train` times the method `train` trains by default (LoRA on
    // q,k,v,o of rank 16, K/V at every position, the σ(s) feed, the selection
    // loss): more adaptor FLOPs than the reference's q,o of rank 8, another loss.
    let job = report(bench("1").args(["--method", "train"]));
    assert_eq!(
        (&line["method"], &job["method"]),
        (&"reference".into(), &"train".into())
    );
    let lora = |l: &serde_json::Value| l["step_tflop"].as_f64().unwrap();
    assert!(lora(&job) > lora(&full), "{job} vs {full}");
    assert_ne!(job["losses"][0], full["losses"][0], "{job}");
    assert!(job["losses"]
        .as_array()
        .unwrap()
        .iter()
        .all(|l| l.as_f64().unwrap().is_finite()));
    // Bad shapes are refused.
    let bad = run(&[
        "bench-step",
        "--model",
        &m,
        "--device",
        "cpu",
        "--suffix",
        "1",
    ]);
    assert!(!bad.status.success());
    assert!(
        text(&bad.stderr).contains("--suffix"),
        "{}",
        text(&bad.stderr)
    );
}

#[test]
fn bench_step_profile_tables_the_timed_steps_by_operator() {
    // --profile: libtorch's profiler over the timed steps (not the two
    // warm-up steps), per step, as Markdown; on the CPU the operators.
    let dir = tempfile::tempdir().unwrap();
    let profile = |iters: &str| -> (String, serde_json::Value) {
        let path = dir.path().join(format!("profile-{iters}.md"));
        let o = run(&[
            "bench-step",
            "--preset",
            "smollm2-135m-narrow",
            "--device",
            "cpu",
            "--span",
            "24",
            "--suffix",
            "4",
            "--method",
            "train",
            "--iters",
            iters,
            "--count-ops",
            "--profile",
            path.to_str().unwrap(),
            // The CPU table sees the calling thread's operators: the teacher
            // on it, as the counter sees every thread's.
            "--ablate",
            "teacher_thread",
        ]);
        assert!(o.status.success(), "{}", text(&o.stderr));
        // Without a device, no failed GPU count in the log.
        assert!(
            !text(&o.stderr).contains("gpuGetDeviceCount"),
            "{}",
            text(&o.stderr)
        );
        let line = serde_json::from_str(text(&o.stdout).trim()).expect("one JSON line");
        (std::fs::read_to_string(&path).expect("the profile"), line)
    };
    // `name -> (calls per step, ms per step)` of the table's rows.
    let rows = |md: &str| -> Vec<(String, f64, f64)> {
        md.lines()
            .filter(|l| l.starts_with("| ") && !l.starts_with("| name"))
            .map(|l| {
                let f: Vec<&str> = l.trim_matches('|').split(" | ").map(str::trim).collect();
                (
                    f[0].to_string(),
                    f[1].parse().unwrap(),
                    f[2].parse().unwrap(),
                )
            })
            .collect()
    };
    let (one, line) = profile("1");
    let (two, _) = profile("2");
    assert!(
        one.contains("span 24 + suffix 4 x 1") && one.contains("1 timed steps"),
        "{one}"
    );
    assert!(one.contains("cpu: ") && !one.contains("cuda: "), "{one}");
    assert_eq!(line["profile_device_ms"], serde_json::Value::Null, "{line}");
    let (r1, r2) = (rows(&one), rows(&two));
    assert!(r1.len() > 20, "{one}");
    // Most time first.
    assert!(r1.windows(2).all(|w| w[0].2 >= w[1].2), "{one}");
    let calls = |r: &[(String, f64, f64)], op: &str| {
        r.iter()
            .find(|x| x.0 == op)
            .map(|x| x.1)
            .unwrap_or_else(|| panic!("{op} in {r:?}"))
    };
    // Per step: one timed step or two, the same calls of each operator.
    for op in ["aten::mm", "aten::scaled_dot_product_attention"] {
        assert_eq!(calls(&r1, op), calls(&r2, op), "{op}: {one}\n{two}");
    }
    // Every product the operator counter saw at the top level is in it
    // (the profiler also sees those called from inside other operators).
    let counted = line["top_ops"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n[0] == "aten::mm")
        .and_then(|n| n[1].as_f64())
        .expect("aten::mm counted");
    assert!(calls(&r1, "aten::mm") >= counted, "{counted}: {one}");
}

#[test]
fn bench_step_presets_time_smollm2_shapes_without_a_model_file() {
    // Runs a 1-step bench of `model` (--preset NAME or --model FILE) with
    // `extra` flags; its JSON line.
    let bench_of = |model: &[&str], extra: &[&str]| -> serde_json::Value {
        let mut args = vec!["bench-step"];
        args.extend(model);
        args.extend([
            "--device", "cpu", "--span", "24", "--suffix", "4", "--iters", "1", "--method", "train",
        ]);
        args.extend(extra);
        let o = run(&args);
        assert!(o.status.success(), "{}", text(&o.stderr));
        serde_json::from_str(text(&o.stdout).trim()).expect("one JSON line")
    };
    let bench = |preset: &str, extra: &[&str]| bench_of(&["--preset", preset], extra);
    let full = bench("smollm2-135m", &[]);
    let narrow = bench("smollm2-135m-narrow", &[]);
    assert_eq!(narrow["model"], "random smollm2-135m-narrow", "{narrow}");
    assert_eq!(
        narrow["ops"],
        serde_json::Value::Null,
        "counted only when asked"
    );
    // --count-ops: the operators one step dispatches, per phase with
    // --step-phases; the narrow model dispatches what the full one does.
    let counted = |preset: &str| bench(preset, &["--count-ops", "--step-phases"]);
    let (a, b) = (counted("smollm2-135m-narrow"), counted("smollm2-135m"));
    let top = a["ops"]["top_level"].as_u64().unwrap();
    // (Up to data-dependent branches, e.g. gradient clipping in the optimizer.)
    let top_b = b["ops"]["top_level"].as_u64().unwrap();
    assert!(top.abs_diff(top_b) * 200 < top, "{a} vs {b}");
    assert_eq!(
        a["phase_ops"]["encoder"], b["phase_ops"]["encoder"],
        "{a} vs {b}"
    );
    let nodes = a["ops"]["backward"].as_u64().unwrap();
    // Thousands: 30 layers of teacher, encoder and decoder, and their backward.
    assert!(top > 3000 && nodes > 1000, "{a}");
    let phases = a["phase_ops"].as_object().expect("per phase");
    assert_eq!(phases.len(), a["phases_s"].as_object().unwrap().len());
    let in_phases: u64 = phases
        .values()
        .map(|p| p["top_level"].as_u64().unwrap())
        .sum();
    assert!(
        in_phases <= top && in_phases > top * 9 / 10,
        "{in_phases} of {top}"
    );
    assert_eq!(phases["backward"]["backward"].as_u64(), Some(nodes));
    assert!(
        phases["teacher"]["top_level"].as_u64().unwrap() > 500,
        "{a}"
    );
    let names = a["top_ops"].as_array().expect("top operators");
    // The projections take `[batch * seq, hidden]` and call `mm` on a
    // transposed view of their weight: no `aten::linear` (a transpose and a
    // `matmul` around the product on every call), no reshape and view around
    // the product, nor those views' backward nodes (a 3-D input gives each
    // product an UnsafeViewBackward0).
    assert!(names.iter().any(|n| n[0] == "aten::mm"), "{a}");
    assert!(!names.iter().any(|n| n[0] == "aten::linear"), "{a}");
    let named = |op: &str| {
        names
            .iter()
            .find(|n| n[0] == op)
            .and_then(|n| n[1].as_u64())
            .unwrap_or(0)
    };
    let (views, products) = (named("UnsafeViewBackward0"), named("MmBackward0"));
    assert!(
        products > 200 && views * 4 < products,
        "{views} / {products}: {a}"
    );
    // SmolLM2's shape: the same step FLOPs as the real model's file.
    let m = smollm2();
    let real = bench_of(&["--model", &m], &[]);
    assert_eq!(full["step_tflop"], real["step_tflop"], "{full} vs {real}");
    // The narrow one: the same layers and operations on 1/8 of the widths,
    // so a small fraction of the arithmetic (the widths' squares: ~1/64).
    let flop = |l: &serde_json::Value| l["step_tflop"].as_f64().unwrap();
    assert!(flop(&narrow) < flop(&full) / 30.0, "{narrow} vs {full}");
    assert!(narrow["losses"]
        .as_array()
        .unwrap()
        .iter()
        .all(|l| l.as_f64().unwrap().is_finite()));
    let o = run(&[
        "bench-step",
        "--preset",
        "smollm2-135m-narrow",
        "--device",
        "cpu",
        "--batch",
        "2",
        "--micro-batches",
        "3",
    ]);
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("--micro-batches must lie in 1..=--batch (2)"),
        "{}",
        text(&o.stderr)
    );
    let o = run(&["bench-step", "--preset", "smollm2-2t", "--device", "cpu"]);
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("smollm2-135m-narrow"),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn inspect_shows_the_kept_tokens_of_each_method() {
    let m = smollm2();
    let dir = tempfile::tempdir().expect("tempdir");
    let html = dir.path().join("kept.html");
    let o = run(&[
        "inspect",
        "--model",
        &m,
        "--device",
        "cpu",
        "--methods",
        "streaming_llm,snapkv",
        "--ratio",
        "0.25",
        "--context",
        CONTEXT,
        "--html",
        html.to_str().expect("utf-8"),
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let said = text(&o.stdout);
    assert!(
        said.contains("== streaming_llm (") && said.contains("== snapkv ("),
        "{said}"
    );
    // Kept tokens are bracketed in the terminal view: BOS + ceil(r * n) of them
    // (BOS is not shown).
    let page = std::fs::read_to_string(&html).expect("html");
    let sections: Vec<&str> = page.split("<h2>").skip(1).collect();
    assert_eq!(sections.len(), 2, "{page}");
    for s in sections {
        let kept: usize = s
            .split(" kept)")
            .next()
            .and_then(|h| h.rsplit('(').next())
            .and_then(|n| n.trim().parse().ok())
            .expect("kept count in the heading");
        assert_eq!(s.matches("<span class=k>").count() + 1, kept, "{s}");
        assert!(s.matches("<span class=d>").count() > 2 * kept, "{s}");
    }
    // StreamingLLM keeps the recent end: the context's last word is kept.
    let streaming = page.split("<h2>").nth(1).expect("first method");
    let last = streaming.rsplit("<span").next().expect("last token");
    assert!(last.starts_with(" class=k>"), "{last}");
}

/// Every worker setting resolves defaults < `[worker]` of job.toml <
/// `KVD_<KEY>` < flags (the case: `max_len = 96` in the file and
/// `KVD_MAX_LEN=80` gave the built-in 1024), and `--print-config` shows each
/// value with its origin without loading a model or reaching a coordinator.
#[test]
fn worker_settings_layer_file_env_flags() {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = dir.path().join("job.toml");
    std::fs::write(
        &job,
        "[worker]\nmodel = \"/models/m.gguf\"\ndata = [\"s3://b/qa\", \"s3://b/text\"]\n\
         max_len = 96\nskip_bad_rows = true\ncoordinator = \"file-host:1\"\n",
    )
    .expect("job.toml");
    let print = |env: &[(&str, &str)], flags: &[&str]| {
        let mut c = Command::new(BIN);
        c.args([
            "worker",
            "--config",
            &job.to_string_lossy(),
            "--print-config",
        ])
        .args(flags)
        .env_remove("KVD_COORDINATOR")
        .env_remove("KVD_MAX_LEN");
        for (k, v) in env {
            c.env(k, v);
        }
        let o = c.output().expect("worker");
        assert!(o.status.success(), "{}", text(&o.stderr));
        text(&o.stdout)
    };
    let line = |out: &str, key: &str| {
        out.lines()
            .find(|l| l.starts_with(&format!("{key} = ")))
            .unwrap_or_else(|| panic!("no {key} in\n{out}"))
            .to_string()
    };
    let out = print(&[], &[]);
    assert_eq!(line(&out, "max_len"), "max_len = 96  # file");
    assert_eq!(
        line(&out, "data"),
        "data = [\"s3://b/qa\", \"s3://b/text\"]  # file"
    );
    assert_eq!(line(&out, "skip_bad_rows"), "skip_bad_rows = true  # file");
    assert_eq!(line(&out, "global_batch"), "global_batch = 16  # default");
    let out = print(
        &[("KVD_MAX_LEN", "80"), ("KVD_COORDINATOR", "env-host:2")],
        &[],
    );
    assert_eq!(line(&out, "max_len"), "max_len = 80  # env KVD_MAX_LEN");
    assert_eq!(
        line(&out, "coordinator"),
        "coordinator = \"env-host:2\"  # env KVD_COORDINATOR"
    );
    let out = print(&[("KVD_MAX_LEN", "80")], &["--max-len", "64"]);
    assert_eq!(line(&out, "max_len"), "max_len = 64  # flag");
    // A value clap refuses is refused whatever its layer, naming the flag.
    let o = Command::new(BIN)
        .args([
            "worker",
            "--config",
            &job.to_string_lossy(),
            "--print-config",
        ])
        .env("KVD_MAX_LEN", "lots")
        .output()
        .expect("worker");
    assert!(!o.status.success());
    assert!(text(&o.stderr).contains("--max-len"), "{}", text(&o.stderr));
}

#[test]
fn eval_phases_time_each_stage_into_the_report() {
    // `eval --phases`: seconds per stage in results.json and results.md; the
    // stages lie inside the run's wall time.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ev");
    let m = smollm2();
    let essays = assets().join("essays");
    let o = run(&[
        "eval",
        "--model",
        &m,
        "--device",
        "cpu",
        "--task",
        "needle",
        "--haystack",
        essays.to_str().unwrap(),
        "--needle-lengths",
        "256",
        "--questions",
        "2",
        "--ratios",
        "0.25",
        "--methods",
        "random",
        "--max-new-tokens",
        "4",
        "--phases",
        "--out-dir",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let phases = report["phases_s"].as_object().expect("phases_s");
    let stages = [
        "eval prepare",
        "eval teacher",
        "eval compress",
        "eval forced",
        "eval generate",
        "eval metrics",
    ];
    for s in stages {
        assert!(phases[s].as_f64().unwrap() > 0.0, "{s}: {report}");
    }
    assert_eq!(phases.len(), stages.len(), "{phases:?}");
    let sum: f64 = phases.values().map(|v| v.as_f64().unwrap()).sum();
    let wall = report["seconds"].as_f64().unwrap();
    assert!(sum <= wall && sum > 0.5 * wall, "{sum} of {wall}");
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(
        md.contains("Seconds by stage") && md.contains("generate "),
        "{md}"
    );
}
