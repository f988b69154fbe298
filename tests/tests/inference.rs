//! Inference from compressed caches on a tiny random Llama (CPU): the full
//! method reproduces plain generation, batched generation equals one-by-one
//! generation, cache files round-trip bit-exactly and hold r of the memory,
//! teacher-forced scores, and the bad inputs of the KV-Distill issue.

use kvd_tests::env::tiny_models;
use kvd_trainer::checkpoint::Checkpoint;
use kvd_trainer::distill::cache_file::{CacheMeta, CompressedCache};
use kvd_trainer::distill::checkpoint::{config_hash, load as load_adaptor, save as save_adaptor};
use kvd_trainer::distill::infer::{
    adaptor_compress, compress_contexts, forced_scores, generate_batch, pad_rows, teacher_logprobs,
    Method,
};
use kvd_trainer::distill::student::{Compressed, Contexts};
use kvd_trainer::distill::{kept_count, Adaptor, Baseline, DistillConfig};
use kvd_trainer::generate::{generate, GenerateOptions, Sampling};
use kvd_trainer::model::Model;
use tch::{Device, Kind, Tensor};

fn model(name: &str) -> Model {
    Checkpoint::open(&tiny_models().join(name))
        .and_then(|c| c.load_model(Kind::Float, Device::Cpu))
        .expect("tiny model")
}

fn tokens(n: usize, seed: u64) -> Vec<u32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 96) as u32
        })
        .collect()
}

/// An adaptor whose LoRA B matrices are non-zero, so routing matters.
fn trained_like_adaptor(m: &Model) -> Adaptor {
    let cfg = DistillConfig {
        scorer_layer: 1,
        ..DistillConfig::default()
    };
    let a = Adaptor::new(m.config(), cfg, Device::Cpu, 7).expect("adaptor");
    tch::no_grad(|| {
        for (name, mut v) in a.vs.variables() {
            if name.ends_with(".b") {
                v.copy_(&(Tensor::randn(v.size(), (Kind::Float, Device::Cpu)) * 0.05));
            }
        }
    });
    a
}

/// Compresses `ctxs` (span = everything after position 1) with `method` at `r`.
fn compress(m: &Model, method: Method, ctxs: &[Vec<u32>], r: f64) -> Compressed {
    let (ids, len) = pad_rows(ctxs, m.config().vocab_size, Device::Cpu).unwrap();
    let spans: Vec<Vec<(usize, usize)>> = ctxs.iter().map(|c| vec![(1, c.len() - 1)]).collect();
    let ratios = vec![r; ctxs.len()];
    compress_contexts(
        m,
        method,
        Contexts {
            ids: &ids,
            len: &len,
            spans: &spans,
            ratios: &ratios,
        },
    )
    .expect("compress")
}

fn greedy(n: usize) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: n,
        sampling: Sampling::Greedy,
        stop_tokens: vec![],
    }
}

fn meta(m: &Model, method: &str, r: f64, ctx_len: usize) -> CacheMeta {
    CacheMeta {
        format: 1,
        base_model: "tiny-llama".into(),
        base_config_hash: config_hash(m.config()),
        method: method.into(),
        adaptor: None,
        ratio: r,
        context_len: ctx_len,
        spans: vec![(1, ctx_len - 1)],
        kept: 0,
    }
}

#[test]
fn full_method_generation_equals_plain_generation() {
    let m = model("llama");
    let ctxs = vec![tokens(30, 1), tokens(21, 2)];
    let prompts = vec![tokens(5, 3), tokens(8, 4)];
    let mut comp = compress(&m, Method::Full, &ctxs, 1.0);
    let batched = generate_batch(&m, &mut comp, &prompts, 10, &[]).expect("generate");
    for i in 0..2 {
        let whole: Vec<u32> = [ctxs[i].clone(), prompts[i].clone()].concat();
        let plain = generate(&m, &whole, None, &greedy(10), |_| {}).expect("plain");
        assert_eq!(batched[i], plain, "row {i}");
    }
}

#[test]
fn batched_generation_equals_single_row_generation() {
    let m = model("llama");
    let a = trained_like_adaptor(&m);
    let ctxs = vec![tokens(40, 5), tokens(26, 6), tokens(33, 7)];
    let prompts = vec![tokens(4, 8), tokens(9, 9), tokens(1, 10)];
    let mut comp = compress(&m, Method::kv_distill(&a), &ctxs, 0.25);
    let batched = generate_batch(&m, &mut comp, &prompts, 8, &[]).expect("batched");
    for i in 0..3 {
        let mut one = compress(&m, Method::kv_distill(&a), &ctxs[i..i + 1], 0.25);
        let single =
            generate_batch(&m, &mut one, &prompts[i..i + 1], 8, &[]).expect("single")[0].clone();
        assert_eq!(batched[i], single, "row {i}");
        // The library's one-sequence generate continues a compressed cache the same way.
        let mut again = compress(&m, Method::kv_distill(&a), &ctxs[i..i + 1], 0.25);
        let plain = generate(&m, &prompts[i], Some(&mut again.cache), &greedy(8), |_| {})
            .expect("generate from cache");
        assert_eq!(plain, single, "row {i} via generate()");
    }
}

#[test]
fn cache_file_round_trips_and_holds_r_of_the_memory() {
    let m = model("llama");
    let a = trained_like_adaptor(&m);
    let ctx = tokens(81, 11);
    let dir = tempfile::tempdir().expect("tempdir");
    for (r, method) in [
        (0.1, Method::kv_distill(&a)),
        (0.25, Method::Baseline(Baseline::H2o)),
    ] {
        let comp = compress(&m, method, std::slice::from_ref(&ctx), r);
        let cache = CompressedCache::from_compressed(comp, meta(&m, &method.name(), r, ctx.len()))
            .expect("cache");
        let k = kept_count(80, r);
        assert_eq!(cache.meta.kept, 1 + k);
        assert_eq!(cache.cache.len() as usize, 1 + k);
        // Memory: exactly (kept / context) of the uncompressed cache.
        let full = compress(&m, Method::Full, std::slice::from_ref(&ctx), 1.0);
        assert_eq!(
            cache.memory_bytes() * ctx.len(),
            full.cache.memory_bytes() * (1 + k),
            "memory at r = {r}"
        );
        assert_eq!(cache.full_memory_bytes(), full.cache.memory_bytes());
        let path = dir.path().join(format!("c{r}.safetensors"));
        cache.save(&path).expect("save");
        let back = CompressedCache::load(&path, &m).expect("load");
        assert_eq!(back.meta, cache.meta);
        for l in 0..m.config().num_layers {
            let (x, y) = (
                cache.cache.layer(l).expect("l"),
                back.cache.layer(l).expect("l"),
            );
            assert!(x.k.equal(&y.k) && x.v.equal(&y.v), "layer {l} differs");
        }
        let prompt = tokens(6, 12);
        let mut c1 = cache;
        let mut c2 = back;
        let g1 = generate(&m, &prompt, Some(&mut c1.cache), &greedy(8), |_| {}).expect("g1");
        let g2 = generate(&m, &prompt, Some(&mut c2.cache), &greedy(8), |_| {}).expect("g2");
        assert_eq!(g1, g2);
    }
}

#[test]
fn baselines_at_full_retention_equal_the_full_cache() {
    let m = model("llama");
    let ctxs = vec![tokens(30, 13), tokens(17, 14)];
    let full = compress(&m, Method::Full, &ctxs, 1.0);
    for b in Baseline::all() {
        let c = compress(&m, Method::Baseline(b), &ctxs, 1.0);
        assert_eq!(c.selections, full.selections, "{}", b.name());
        for l in 0..m.config().num_layers {
            let (x, y) = (
                c.cache.layer(l).expect("l"),
                full.cache.layer(l).expect("l"),
            );
            assert!(x.k.equal(&y.k), "{} layer {l}", b.name());
        }
    }
}

#[test]
fn forced_scores_are_zero_kl_for_the_teacher_and_match_full_forward_nll() {
    let m = model("llama");
    let ctxs = vec![tokens(25, 15), tokens(19, 16)];
    let suffixes = vec![tokens(9, 17), tokens(6, 18)];
    let scored = vec![(4, 5), (2, 3)];
    let full = compress(&m, Method::Full, &ctxs, 1.0);
    let mut t = full.shallow_clone();
    let teacher = teacher_logprobs(&m, &mut t, &suffixes, &scored).expect("teacher");
    let mut f = full;
    let s = forced_scores(&m, &mut f, &suffixes, &scored, Some(&teacher)).expect("scores");
    for (i, sc) in s.iter().enumerate() {
        assert!(sc.kl.abs() < 1e-6, "row {i}: KL {}", sc.kl);
        // NLL from one plain forward over context + suffix.
        let whole: Vec<i64> = ctxs[i]
            .iter()
            .chain(&suffixes[i])
            .map(|&t| t as i64)
            .collect();
        let logp = m
            .forward(
                kvd_trainer::model::Input::new(&Tensor::from_slice(&whole).unsqueeze(0)),
                None,
            )
            .expect("forward")
            .log_softmax(-1, Kind::Float);
        let (st, n) = scored[i];
        let c = ctxs[i].len();
        let nll: f64 = (st..st + n)
            .map(|j| -logp.double_value(&[0, (c + j - 1) as i64, whole[c + j]]))
            .sum::<f64>()
            / n as f64;
        assert!((nll - sc.nll).abs() < 1e-4, "row {i}: {nll} vs {}", sc.nll);
    }
    // A compressed student differs from the teacher.
    let a = trained_like_adaptor(&m);
    let mut c = compress(&m, Method::kv_distill(&a), &ctxs, 0.1);
    let s = forced_scores(&m, &mut c, &suffixes, &scored, Some(&teacher)).expect("scores");
    assert!(s.iter().all(|x| x.kl > 1e-4), "{s:?}");
}

#[test]
fn bad_inputs_give_clear_errors() {
    let m = model("llama");
    let a = trained_like_adaptor(&m);
    let ctx = vec![tokens(20, 19)];
    let (ids, len) = pad_rows(&ctx, m.config().vocab_size, Device::Cpu).unwrap();
    let run = |spans: Vec<Vec<(usize, usize)>>, r: f64| {
        compress_contexts(
            &m,
            Method::kv_distill(&a),
            Contexts {
                ids: &ids,
                len: &len,
                spans: &spans,
                ratios: &[r],
            },
        )
        .map(|_| ())
        .expect_err("must fail")
        .to_string()
    };
    for r in [0.0, -0.5, 1.5, f64::NAN] {
        let e = run(vec![vec![(1, 19)]], r);
        assert!(e.contains("outside (0, 1]"), "r = {r}: {e}");
    }
    let e = run(vec![vec![(3, 0)]], 0.5);
    assert!(e.contains("empty span"), "{e}");
    let e = run(vec![vec![(1, 40)]], 0.5);
    assert!(e.contains("outside the 20-token context"), "{e}");
    // Span longer than the model window (tiny llama: 256 positions).
    let long = vec![tokens(300, 20)];
    let (lids, llen) = pad_rows(&long, m.config().vocab_size, Device::Cpu).unwrap();
    let e = compress_contexts(
        &m,
        Method::kv_distill(&a),
        Contexts {
            ids: &lids,
            len: &llen,
            spans: &[vec![(1, 299)]],
            ratios: &[0.5],
        },
    )
    .map(|_| ())
    .expect_err("longer than the window")
    .to_string();
    assert!(e.contains("window"), "{e}");

    // An adaptor for another base model.
    let dir = tempfile::tempdir().expect("tempdir");
    let ap = dir.path().join("adaptor.safetensors");
    save_adaptor(&a, "tiny-llama", m.config(), 3, &ap).expect("save");
    let other = model("qwen2");
    let e = load_adaptor(&ap, other.config(), Device::Cpu)
        .map(|_| ())
        .expect_err("wrong base")
        .to_string();
    assert!(
        e.contains("adaptor.safetensors") && e.contains("tiny-llama"),
        "{e}"
    );

    // Cache files: another model, truncated, garbage, not a cache.
    let comp = compress(&m, Method::kv_distill(&a), &ctx, 0.5);
    let cache =
        CompressedCache::from_compressed(comp, meta(&m, "kv_distill", 0.5, 20)).expect("cache");
    let cp = dir.path().join("cache.safetensors");
    cache.save(&cp).expect("save");
    let e = CompressedCache::load(&cp, &other)
        .map(|_| ())
        .expect_err("other model")
        .to_string();
    assert!(
        e.contains("cache.safetensors") && e.contains("tiny-llama"),
        "{e}"
    );
    let bytes = std::fs::read(&cp).expect("read");
    let cut = dir.path().join("truncated.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).expect("write");
    let e = CompressedCache::load(&cut, &m)
        .map(|_| ())
        .expect_err("truncated")
        .to_string();
    assert!(e.contains("truncated.safetensors"), "{e}");
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"definitely not a cache").expect("write");
    let e = CompressedCache::load(&junk, &m)
        .map(|_| ())
        .expect_err("junk")
        .to_string();
    assert!(
        e.contains("junk.safetensors") && e.contains("not a safetensors"),
        "{e}"
    );
    let e = CompressedCache::load(&ap, &m)
        .map(|_| ())
        .expect_err("an adaptor is not a cache")
        .to_string();
    assert!(e.contains("not a compressed cache"), "{e}");
    let e = CompressedCache::load(&dir.path().join("missing.safetensors"), &m)
        .map(|_| ())
        .expect_err("missing")
        .to_string();
    assert!(e.contains("missing.safetensors"), "{e}");
}

#[test]
fn a_sigmoid_feed_adaptor_decodes_the_same_from_memory_and_from_a_cache_file() {
    // The σ(s) feed changes attention at decoding time: a cache file carries
    // the kept entries' bias, and generation from it equals generation from
    // the in-memory compressed context (which applies the feed itself), and
    // differs from ignoring the bias.
    let m = model("llama");
    let cfg = DistillConfig {
        scorer_layer: 1,
        score_feed: kvd_trainer::distill::ScoreFeed::LogSigmoid,
        ..DistillConfig::default()
    };
    let a = Adaptor::new(m.config(), cfg, Device::Cpu, 7).expect("adaptor");
    tch::no_grad(|| {
        for (name, mut v) in a.vs.variables() {
            if name.ends_with(".b") {
                v.copy_(&(Tensor::randn(v.size(), (Kind::Float, Device::Cpu)) * 0.05));
            }
            if name == "scorer.b2" {
                // Scores around -2: σ(s) far from 1, so the feed matters.
                v.copy_(&Tensor::full([1], -2.0, (Kind::Float, Device::Cpu)));
            }
        }
    });
    let ctx = tokens(60, 21);
    let prompt = tokens(5, 22);
    let r = 0.25;
    let mem = compress(&m, Method::kv_distill(&a), std::slice::from_ref(&ctx), r);
    assert!(mem.feed.is_some());
    let want = generate_batch(
        &m,
        &mut mem.shallow_clone(),
        std::slice::from_ref(&prompt),
        8,
        &[],
    )
    .expect("batch")[0]
        .clone();
    let cache =
        CompressedCache::from_compressed(mem, meta(&m, "kv_distill", r, ctx.len())).expect("cache");
    let bias = cache
        .feed_bias
        .as_ref()
        .expect("feed bias stored")
        .shallow_clone();
    assert_eq!(bias.size(), [1, cache.meta.kept as i64]);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("c.safetensors");
    cache.save(&path).expect("save");
    let mut back = CompressedCache::load(&path, &m).expect("load");
    let loaded = back
        .feed_bias
        .as_ref()
        .expect("bias loaded")
        .shallow_clone();
    assert!(loaded.equal(&bias), "the bias round-trips");
    let got = kvd_trainer::generate::generate_with_bias(
        &m,
        &prompt,
        Some(&mut back.cache),
        Some(&loaded),
        &greedy(8),
        |_| {},
    )
    .expect("from file");
    assert_eq!(got, want, "cache file + bias vs in-memory decoding");
    // The in-memory path through a cache file's Compressed agrees too.
    let again = CompressedCache::load(&path, &m).expect("load");
    let got2 = generate_batch(
        &m,
        &mut again.into_compressed(),
        std::slice::from_ref(&prompt),
        8,
        &[],
    )
    .expect("into_compressed")[0]
        .clone();
    assert_eq!(got2, want);
    // Without the bias the forward pass differs (the feed is not a no-op).
    // Decoder states from the loaded cache, with its feed and with the feed dropped.
    let states = |with_feed: bool| {
        let mut c = CompressedCache::load(&path, &m)
            .expect("load")
            .into_compressed();
        if !with_feed {
            c.feed = None;
        }
        let (ids, len) = pad_rows(std::slice::from_ref(&prompt), 96, Device::Cpu).expect("pad");
        let s = kvd_trainer::distill::student::Suffixes::new(ids, &len, &c.ctx_len).expect("s");
        kvd_trainer::distill::student::decode(&m, &mut c, &s, None).expect("decode")
    };
    let (h_bias, h_plain) = (states(true), states(false));
    let diff = (h_bias - h_plain).abs().max().double_value(&[]);
    assert!(diff > 1e-4, "the feed changes the decoder's states: {diff}");
}

#[test]
fn generation_stays_inside_the_model_window() {
    let m = model("llama");
    let window = m.config().max_position_embeddings;
    let long = tokens(window + 5, 31);
    let e = generate(&m, &long, None, &greedy(4), |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("more than the model window of {window}")),
        "{e}"
    );
    // An unbounded request stops at the window.
    let near = tokens(window - 6, 32);
    let out = generate(&m, &near, None, &greedy(usize::MAX), |_| {}).expect("bounded");
    assert!(
        out.len() <= 6,
        "{} new tokens past a window of {window}",
        out.len()
    );
    // After a compressed context, the window counts from the context's length.
    let ctx = tokens(window - 10, 33);
    let mut c = compress(&m, Method::Baseline(Baseline::H2o), &[ctx], 0.25);
    let e = generate(&m, &tokens(12, 34), Some(&mut c.cache), &greedy(2), |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("after a context of {}", window - 10)),
        "{e}"
    );
}

/// The evaluation's shared pass: one cache-filling forward keeps the states
/// the adaptor's scorer reads (`StatesAfter`), and the adaptor's methods
/// compress from them and from that cache exactly as from their own passes;
/// other methods are refused.
#[test]
fn adaptor_methods_compress_the_same_from_a_shared_pass() {
    use kvd_trainer::model::{Input, StatesAfter};
    let m = model("llama");
    let a = trained_like_adaptor(&m);
    let ctxs = vec![tokens(60, 1), tokens(45, 2)];
    let (ids, len) = pad_rows(&ctxs, m.config().vocab_size, Device::Cpu).unwrap();
    let spans: Vec<Vec<(usize, usize)>> = ctxs.iter().map(|c| vec![(1, c.len() - 1)]).collect();
    let ratios = vec![0.25; ctxs.len()];
    let ctx = Contexts {
        ids: &ids,
        len: &len,
        spans: &spans,
        ratios: &ratios,
    };
    let layer = a.config().scorer_layer;
    let watch = StatesAfter::new(layer);
    let mut full = m.new_cache();
    tch::no_grad(|| m.fill_cache(Input::new(&ids), &mut full, &watch)).unwrap();
    let features = watch.take().expect("states after the scorer layer");
    let own = tch::no_grad(|| m.layer_states(Input::new(&ids), layer)).unwrap();
    assert!(features.allclose(&own, 1e-6, 1e-6, false));
    for method in [Method::kv_distill(&a), Method::ScorerOnly(&a)] {
        let alone = compress_contexts(&m, method, ctx).expect("compress");
        let shared =
            adaptor_compress(&m, method, ctx, None, &features, Some(&full)).expect("compress");
        assert_eq!(alone.selections, shared.selections, "{}", method.name());
        for l in 0..alone.cache.num_layers() {
            let (x, y) = (
                alone.cache.layer(l).unwrap(),
                shared.cache.layer(l).unwrap(),
            );
            assert!(
                x.k.allclose(&y.k, 1e-5, 1e-6, false) && x.v.allclose(&y.v, 1e-5, 1e-6, false),
                "{} layer {l}",
                method.name()
            );
        }
    }
    let err = adaptor_compress(&m, Method::Full, ctx, None, &features, Some(&full))
        .unwrap_err()
        .to_string();
    assert!(err.contains("full is not an adaptor's method"), "{err}");
}

/// A filled cache's values are their own compact tensors, not column views
/// of the stacked q/k/v product (which would keep the queries' and keys'
/// memory alive as long as the cache).
#[test]
fn cached_values_do_not_hold_the_stacked_projection() {
    use kvd_trainer::model::{Input, NoHooks};
    for name in ["llama", "gemma3"] {
        let m = model(name);
        let (ids, _) = pad_rows(&[tokens(30, 4)], m.config().vocab_size, Device::Cpu).unwrap();
        let mut cache = m.new_cache();
        tch::no_grad(|| m.fill_cache(Input::new(&ids), &mut cache, &NoHooks)).unwrap();
        let row = (m.config().num_kv_heads * m.config().head_dim) as i64;
        for l in 0..cache.num_layers() {
            let v = &cache.layer(l).unwrap().v;
            // [batch, kv heads, positions, head_dim]: one position's values
            // are `row` apart, as in a tensor of their own.
            assert_eq!(v.stride()[2], row, "{name} layer {l}: {:?}", v.stride());
        }
    }
}
