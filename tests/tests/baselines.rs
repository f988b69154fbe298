//! Training-free KV compression baselines on tiny random checkpoints (CPU):
//! H2O, SnapKV, key-norm and Expected Attention scores against transformers'
//! own attention probabilities, queries, keys and values, StreamingLLM and
//! random selections, the budget, and that observing attention changes nothing.

use kvd_tests::env::{run_oracle, tiny_models};
use kvd_tests::tokens::lcg_tokens;
use kvd_trainer::checkpoint::Checkpoint;
use kvd_trainer::distill::select::{select, Span};
use kvd_trainer::distill::{baseline_scores, kept_count, Baseline};
use kvd_trainer::error::Result as ModelResult;
use kvd_trainer::model::{Hooks, Input, Model};
use std::cell::Cell;
use tch::{Device, Kind, Tensor};

fn model(name: &str) -> Model {
    Checkpoint::open(&tiny_models().join(name))
        .and_then(|c| c.load_model(Kind::Float, Device::Cpu))
        .unwrap_or_else(|e| panic!("tiny {name}: {e}"))
}

/// A right-padded batch: rows of random tokens, each `lc` long; positions at or
/// past a row's length hold padding drawn with `pad_seed`.
struct Batch {
    rows: Vec<Vec<i64>>,
    len: Vec<usize>,
    spans: Vec<Vec<Span>>,
}

impl Batch {
    fn new(lc: usize, len: Vec<usize>, spans: Vec<Vec<Span>>, pad_seed: u64) -> Batch {
        let rows = len
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let mut row = tokens(n, 100 + i as u64);
                row.extend(tokens(lc - n, pad_seed + i as u64));
                row
            })
            .collect();
        Batch { rows, len, spans }
    }

    /// Two rows of 300 tokens (the second 271 real): longer than the sliding
    /// window (8) and than one observation chunk (256 queries).
    fn long(pad_seed: u64) -> Batch {
        Batch::new(
            300,
            vec![300, 271],
            vec![
                vec![(3, 20), (26, 4), (40, 230), (280, 15)],
                vec![(0, 100), (120, 150)],
            ],
            pad_seed,
        )
    }

    /// Two rows of 40 tokens (the second 29 real).
    fn short(pad_seed: u64) -> Batch {
        Batch::new(
            40,
            vec![40, 29],
            vec![vec![(3, 20), (26, 4), (31, 9)], vec![(2, 10), (15, 12)]],
            pad_seed,
        )
    }

    fn ids(&self) -> Tensor {
        let flat: Vec<i64> = self.rows.concat();
        Tensor::from_slice(&flat).view([self.rows.len() as i64, self.rows[0].len() as i64])
    }

    fn scores(&self, m: &Model, method: &Baseline) -> Vec<Vec<f32>> {
        let (s, _) =
            baseline_scores(m, method, &self.ids(), &self.len, &self.spans).expect("scores");
        rows(&s)
    }
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    let lc = t.size()[1] as usize;
    let flat = Vec::<f32>::try_from(t.flatten(0, -1)).expect("f32 scores");
    flat.chunks(lc).map(<[f32]>::to_vec).collect()
}

/// Scores `[batch][lc]`.
type Table = Vec<Vec<f32>>;

/// Expected Attention with its defaults and two variants that exercise every
/// parameter (no sinks, a short future, a query window, no covariance, no
/// value norms).
fn expected_variants() -> [Baseline; 3] {
    [
        Baseline::parse("expected_attention").expect("defaults"),
        Baseline::parse("expected_attention:future=7,sinks=0,window=16,vnorm=0").expect("parse"),
        Baseline::parse("expected_attention:future=64,sinks=2,covariance=0").expect("parse"),
    ]
}

/// Scores of transformers for `batch` on `name`: (h2o, snapkv, key_norm) and
/// one Expected Attention score table per method of `expected`.
fn oracle(
    name: &str,
    batch: &Batch,
    window: usize,
    kernel: usize,
    expected: &[Baseline],
) -> ([Table; 3], Vec<Table>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("input.json");
    let input = serde_json::json!({
        "model": tiny_models().join(name),
        "ids": batch.rows,
        "len": batch.len,
        "spans": batch.spans,
        "window": window,
        "kernel": kernel,
        "expected_attention": expected.iter().map(|b| match *b {
            Baseline::ExpectedAttention { future, sinks, window, covariance, vnorm } => serde_json::json!({
                "future": future, "sinks": sinks, "window": window,
                "covariance": covariance, "vnorm": vnorm,
            }),
            other => panic!("{} is not expected_attention", other.name()),
        }).collect::<Vec<_>>(),
    });
    std::fs::write(&path, input.to_string()).expect("write oracle input");
    let out = run_oracle("baseline_scores.py", &[path.to_str().expect("utf-8")]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("oracle JSON");
    let get = |k: &str| -> Vec<Vec<f32>> { serde_json::from_value(v[k].clone()).expect(k) };
    let ea: Vec<Table> =
        serde_json::from_value(v["expected_attention"].clone()).expect("expected_attention");
    assert_eq!(ea.len(), expected.len());
    ([get("h2o"), get("snapkv"), get("key_norm")], ea)
}

/// Compares `ours` with `theirs` at every span position: |a - b| < 1e-4 (the
/// largest differences seen are ~2e-5, on H2O sums of ~50).
fn assert_close_in_spans(what: &str, batch: &Batch, ours: &[Vec<f32>], theirs: &[Vec<f32>]) {
    let mut worst = (0f64, 0, 0);
    let mut compared = 0;
    for (i, spans) in batch.spans.iter().enumerate() {
        for &(s, n) in spans {
            for p in s..s + n {
                let (a, b) = (ours[i][p] as f64, theirs[i][p] as f64);
                let d = (a - b).abs();
                assert!(d.is_finite(), "{what}: row {i} position {p}: {a} vs {b}");
                if d > worst.0 {
                    worst = (d, i, p);
                }
                compared += 1;
            }
        }
    }
    assert!(compared > 0);
    let (d, i, p) = worst;
    assert!(
        d < 1e-4,
        "{what}: row {i} position {p}: ours {} vs transformers {} (abs diff {d})",
        ours[i][p],
        theirs[i][p]
    );
}

fn parity(name: &str, window: usize, kernel: usize) {
    let m = model(name);
    let batch = Batch::long(7);
    let ([h2o, snap, knorm], _) = oracle(name, &batch, window, kernel, &[]);
    let tag = |m: &str| format!("{name} {m}");
    assert_close_in_spans(&tag("h2o"), &batch, &batch.scores(&m, &Baseline::H2o), &h2o);
    assert_close_in_spans(
        &tag(&format!("snapkv w={window} k={kernel}")),
        &batch,
        &batch.scores(&m, &Baseline::SnapKv { window, kernel }),
        &snap,
    );
    assert_close_in_spans(
        &tag("key_norm"),
        &batch,
        &batch.scores(&m, &Baseline::KeyNorm),
        &knorm,
    );
}

/// Expected Attention against scores computed in float64 from transformers'
/// pre-RoPE queries, cached keys and values and rotary embedding.
fn expected_parity(name: &str) {
    let m = model(name);
    let batch = Batch::long(7);
    let methods = expected_variants();
    let (_, theirs) = oracle(name, &batch, 32, 7, &methods);
    for (method, theirs) in methods.iter().zip(&theirs) {
        let ours = batch.scores(&m, method);
        assert_close_in_spans(&format!("{name} {method:?}"), &batch, &ours, theirs);
        // The sinks (4 by default) of the span (26, 4) are all of it.
        if let Baseline::ExpectedAttention { sinks: 4, .. } = method {
            assert_eq!(&ours[0][26..30], &[1.0; 4]);
        }
    }
}

#[test]
fn expected_attention_matches_transformers_llama_gqa() {
    expected_parity("llama");
}

#[test]
fn expected_attention_matches_transformers_mistral_sliding_window() {
    expected_parity("mistral");
}

#[test]
fn expected_attention_matches_transformers_gemma3_local_global() {
    expected_parity("gemma3");
}

#[test]
fn scores_match_transformers_llama_gqa() {
    parity("llama", 32, 7);
    parity("llama", 5, 3);
}

#[test]
fn scores_match_transformers_mistral_sliding_window() {
    parity("mistral", 32, 7);
}

#[test]
fn scores_match_transformers_gemma3_local_global() {
    parity("gemma3", 32, 7);
}

#[test]
fn streaming_llm_keeps_sinks_and_most_recent() {
    let m = model("llama");
    let batch = Batch::short(7);
    for sinks in [4, 2, 0] {
        let scores = batch.scores(&m, &Baseline::StreamingLlm { sinks });
        for ratio in [0.1, 0.3, 0.5, 1.0] {
            for (i, spans) in batch.spans.iter().enumerate() {
                let sel = select(&scores[i], batch.len[i], spans, ratio).expect("select");
                for &(s, n) in spans {
                    let k = kept_count(n, ratio);
                    let head = k.min(sinks);
                    let want: Vec<usize> = (s..s + head).chain(s + n - (k - head)..s + n).collect();
                    let got: Vec<usize> = sel
                        .kept
                        .iter()
                        .copied()
                        .filter(|p| (s..s + n).contains(p))
                        .collect();
                    assert_eq!(
                        got, want,
                        "sinks {sinks}, ratio {ratio}, row {i}, span ({s}, {n})"
                    );
                }
            }
        }
    }
}

#[test]
fn random_is_deterministic_per_seed_and_differs_across_seeds() {
    let m = model("llama");
    let batch = Batch::short(7);
    let a = batch.scores(&m, &Baseline::Random { seed: 1 });
    let again = batch.scores(&m, &Baseline::Random { seed: 1 });
    let b = batch.scores(&m, &Baseline::Random { seed: 2 });
    assert_eq!(a, again, "same seed, different scores");
    for (i, row) in a.iter().enumerate() {
        let n = batch.len[i];
        assert!(
            row[..n].iter().all(|x| (0.0..1.0).contains(x)),
            "row {i} not in [0, 1): {row:?}"
        );
        let same = row[..n]
            .iter()
            .zip(&b[i][..n])
            .filter(|(x, y)| x == y)
            .count();
        assert!(
            same < n / 4,
            "row {i}: seeds 1 and 2 agree at {same} of {n}"
        );
    }
    let same_rows = a[0][..29]
        .iter()
        .zip(&a[1][..29])
        .filter(|(x, y)| x == y)
        .count();
    assert!(same_rows < 8, "rows 0 and 1 agree at {same_rows} positions");
    let sel = |s: &[Vec<f32>]| select(&s[0], 40, &batch.spans[0], 0.25).expect("select");
    assert_ne!(sel(&a), sel(&b), "seeds 1 and 2 select the same positions");
}

#[test]
fn every_baseline_keeps_exactly_k_per_span() {
    let m = model("gemma3");
    let batch = Batch::short(7);
    for method in Baseline::all() {
        let scores = batch.scores(&m, &method);
        for (i, spans) in batch.spans.iter().enumerate() {
            let n_ctx = batch.len[i];
            assert!(
                scores[i][..n_ctx].iter().all(|x| x.is_finite()),
                "{}: non-finite score in row {i}",
                method.name()
            );
            assert!(
                scores[i][n_ctx..].iter().all(|&x| x == f32::NEG_INFINITY),
                "{}: padding of row {i} is not -inf",
                method.name()
            );
            for ratio in [0.05, 0.25, 0.5, 1.0] {
                let sel = select(&scores[i], n_ctx, spans, ratio).expect("select");
                for &(s, n) in spans {
                    let inside = sel.kept.iter().filter(|p| (s..s + n).contains(p)).count();
                    assert_eq!(
                        inside,
                        kept_count(n, ratio),
                        "{}: row {i}, span ({s}, {n}), ratio {ratio}",
                        method.name()
                    );
                }
                let span_total: usize = spans.iter().map(|&(_, n)| n).sum();
                let kept_total: usize = spans.iter().map(|&(_, n)| kept_count(n, ratio)).sum();
                assert_eq!(sel.kept.len(), n_ctx - span_total + kept_total);
            }
        }
    }
}

#[test]
fn padding_never_changes_scores() {
    for name in ["llama", "mistral", "gemma3"] {
        let m = model(name);
        let (a, b) = (Batch::short(7), Batch::short(1234));
        assert_ne!(a.rows[1], b.rows[1], "the padding differs");
        // Row 1 alone, without any padding.
        let single = Batch {
            rows: vec![a.rows[1][..a.len[1]].to_vec()],
            len: vec![a.len[1]],
            spans: vec![a.spans[1].clone()],
        };
        for method in Baseline::all().into_iter().chain(expected_variants()) {
            let (sa, sb, s1) = (
                a.scores(&m, &method),
                b.scores(&m, &method),
                single.scores(&m, &method),
            );
            let n = a.len[1];
            for p in 0..n {
                for (other, what) in [(sb[1][p], "other padding"), (s1[0][p], "unbatched")] {
                    let d = (sa[1][p] - other).abs() / other.abs().max(1.0);
                    assert!(
                        d < 1e-5,
                        "{name} {}: position {p}: {} vs {other} ({what})",
                        method.name(),
                        sa[1][p]
                    );
                }
            }
        }
    }
}

/// Counts observed probability chunks and checks they are distributions.
struct Counting {
    calls: Cell<usize>,
    queries: Cell<i64>,
}

impl Hooks for Counting {
    fn wants_attention(&self, _layer: usize) -> bool {
        true
    }

    fn observe_attention(&self, _layer: usize, _q_start: i64, probs: &Tensor) -> ModelResult<()> {
        let rows = probs.sum_dim_intlist([-1].as_slice(), false, Kind::Float);
        let err = (rows - 1.0).abs().max().double_value(&[]);
        assert!(err < 1e-5, "probabilities sum to 1 +- {err}");
        self.calls.set(self.calls.get() + 1);
        self.queries.set(self.queries.get() + probs.size()[2]);
        Ok(())
    }
}

#[test]
fn observing_attention_leaves_logits_bit_identical() {
    for name in ["llama", "mistral", "gemma3"] {
        let m = model(name);
        let batch = Batch::long(7);
        let ids = batch.ids();
        let valid_host: Vec<bool> = batch
            .len
            .iter()
            .flat_map(|&n| (0..300).map(move |p| p < n))
            .collect();
        let valid = Tensor::from_slice(&valid_host).view([2, 300]);
        let layers = m.config().num_layers;
        // Causal fast path (no validity) and the explicit-mask path.
        for input in [Input::new(&ids), Input::new(&ids).with_valid(&valid)] {
            let plain = tch::no_grad(|| m.forward(input, None)).expect("forward");
            let hooks = Counting {
                calls: Cell::new(0),
                queries: Cell::new(0),
            };
            let observed = tch::no_grad(|| m.forward_hidden_with(input, None, &hooks))
                .map(|h| m.logits(&h))
                .expect("observed forward");
            assert_eq!(hooks.calls.get(), 2 * layers, "{name}: 2 chunks per layer");
            assert_eq!(hooks.queries.get(), 300 * layers as i64);
            assert!(
                plain.equal(&observed),
                "{name}: observing attention changed the logits"
            );
        }
        // Scoring changes nothing, and returns the frozen model's full cache.
        let plain = tch::no_grad(|| m.forward(Input::new(&ids), None)).expect("forward");
        let mut fresh = m.new_cache();
        let _ = tch::no_grad(|| m.forward(Input::new(&ids), Some(&mut fresh))).expect("forward");
        for method in [
            Baseline::H2o,
            Baseline::SnapKv {
                window: 32,
                kernel: 7,
            },
            Baseline::parse("expected_attention").expect("parse"),
        ] {
            let (_, cache) =
                baseline_scores(&m, &method, &ids, &batch.len, &batch.spans).expect("scores");
            let after = tch::no_grad(|| m.forward(Input::new(&ids), None)).expect("forward");
            assert!(
                plain.equal(&after),
                "{name}: {} changed later logits",
                method.name()
            );
            assert_eq!(cache.len(), 300);
            for l in 0..layers {
                let (x, y) = (
                    cache.layer(l).expect("layer"),
                    fresh.layer(l).expect("layer"),
                );
                assert!(
                    x.k.equal(&y.k) && x.v.equal(&y.v),
                    "{name}: {} cache layer {l} differs",
                    method.name()
                );
            }
        }
    }
}

#[test]
fn names_parse_and_serde_round_trips() {
    for b in Baseline::all() {
        let parsed: Baseline = b.name().parse().expect("parse");
        assert_eq!(parsed, b);
        let json = serde_json::to_string(&b).expect("serialise");
        assert!(json.contains(b.name()), "{json}");
        let back: Baseline = serde_json::from_str(&json).expect("deserialise");
        assert_eq!(back, b);
    }
    assert_eq!(
        Baseline::parse("snapkv:window=16,kernel=5").expect("parse"),
        Baseline::SnapKv {
            window: 16,
            kernel: 5
        }
    );
    assert_eq!(
        Baseline::parse("random:seed=9").expect("parse"),
        Baseline::Random { seed: 9 }
    );
    assert_eq!(
        serde_json::from_str::<Baseline>(r#"{"method":"streaming_llm"}"#).expect("defaults"),
        Baseline::StreamingLlm { sinks: 4 }
    );
    let ea_defaults = Baseline::ExpectedAttention {
        future: 512,
        sinks: 4,
        window: 0,
        covariance: true,
        vnorm: true,
    };
    assert_eq!(
        serde_json::from_str::<Baseline>(r#"{"method":"expected_attention"}"#).expect("defaults"),
        ea_defaults
    );
    assert_eq!(
        Baseline::parse("expected-attention").expect("parse"),
        ea_defaults
    );
    assert_eq!(
        Baseline::parse("expected_attention:future=256,sinks=2,window=8,covariance=0,vnorm=1")
            .expect("parse"),
        Baseline::ExpectedAttention {
            future: 256,
            sinks: 2,
            window: 8,
            covariance: false,
            vnorm: true,
        }
    );
    for bad in [
        "snap",
        "snapkv:kernel=4",
        "snapkv:window=0",
        "h2o:window=3",
        "random:seed=x",
        "random:seed",
        "expected_attention:future=0",
        "expected_attention:covariance=2",
        "expected_attention:kernel=3",
    ] {
        assert!(Baseline::parse(bad).is_err(), "`{bad}` accepted");
    }
}

#[test]
fn bad_inputs_are_errors() {
    let m = model("llama");
    let b = Batch::short(7);
    let ids = b.ids();
    let h2o = Baseline::H2o;
    assert!(baseline_scores(&m, &h2o, &ids, &[40], &b.spans).is_err());
    assert!(baseline_scores(&m, &h2o, &ids, &[41, 29], &b.spans).is_err());
    assert!(baseline_scores(&m, &h2o, &ids, &[40, 0], &b.spans).is_err());
    let outside = vec![b.spans[0].clone(), vec![(20, 10)]];
    assert!(baseline_scores(&m, &h2o, &ids, &b.len, &outside).is_err());
    let even = Baseline::SnapKv {
        window: 4,
        kernel: 2,
    };
    assert!(baseline_scores(&m, &even, &ids, &b.len, &b.spans).is_err());
    assert!(baseline_scores(&m, &h2o, &ids.view([-1]), &[80], &[vec![]]).is_err());
}

/// Deterministic pseudo-random tokens below the tiny vocabulary (96).
fn tokens(n: usize, seed: u64) -> Vec<i64> {
    lcg_tokens(n, seed, 0, 96)
        .into_iter()
        .map(i64::from)
        .collect()
}

/// A method that reads no attention scores from a full cache it is handed
/// (the evaluation's teacher's, made by `fill_cache`) exactly as from its
/// own forward; a method that observes attention runs its forward anyway;
/// a cache of another shape is refused.
#[test]
fn methods_without_attention_score_from_a_reused_full_cache() {
    use kvd_trainer::distill::baseline_scores_reusing;
    use kvd_trainer::model::NoHooks;
    for name in ["llama", "gemma3"] {
        let m = model(name);
        let b = Batch::long(7);
        let ids = b.ids();
        let mut full = m.new_cache();
        tch::no_grad(|| m.fill_cache(Input::new(&ids), &mut full, &NoHooks)).expect("fill");
        for method in [
            Baseline::Random { seed: 3 },
            Baseline::StreamingLlm { sinks: 4 },
            Baseline::KeyNorm,
            Baseline::H2o,
        ] {
            let (own, own_cache) =
                baseline_scores(&m, &method, &ids, &b.len, &b.spans).expect("scores");
            let (reused, reused_cache) =
                baseline_scores_reusing(&m, &method, &ids, &b.len, &b.spans, Some(&full))
                    .expect("scores");
            assert_eq!(rows(&own), rows(&reused), "{name} {method:?}");
            for l in 0..own_cache.num_layers() {
                let (a, c) = (own_cache.layer(l).unwrap(), reused_cache.layer(l).unwrap());
                let close = |x: &Tensor, y: &Tensor| x.allclose(y, 1e-5, 1e-6, false);
                assert!(
                    close(&a.k, &c.k) && close(&a.v, &c.v),
                    "{name} {method:?} layer {l}"
                );
                // Handed over, not recomputed, unless the method observes attention.
                let shared = c.k.data_ptr() == full.layer(l).unwrap().k.data_ptr();
                assert_eq!(
                    shared,
                    !method.reads_attention(),
                    "{name} {method:?} layer {l}"
                );
            }
        }
        for method in [
            Baseline::SnapKv {
                window: 4,
                kernel: 1,
            },
            Baseline::Tova,
            Baseline::H2o,
        ] {
            assert!(method.reads_attention(), "{method:?}");
        }
        let short = Batch::short(7);
        let err = baseline_scores_reusing(
            &m,
            &Baseline::KeyNorm,
            &short.ids(),
            &short.len,
            &short.spans,
            Some(&full),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("reused cache holds 300 positions"), "{err}");
    }
}
