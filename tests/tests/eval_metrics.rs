//! `kvd_trainer::eval`: SQuAD v1.1 metrics against the official script (Python
//! oracle `tests/oracle/squad_eval.py`), the SQuAD loader on the real dev file,
//! deterministic subsets, and the F1-vs-ratio plot.

use kvd_data::prepare::QaSources;
use kvd_tests::env::{qa_sources, qa_sources_kind, run_oracle};
use kvd_trainer::eval::{
    best_over, exact_match, f1, load_squad, normalize_answer, plot_f1_vs_ratio, select_questions,
    EvalError, MetricSum, Series, SquadQuestion, SquadSet, PARAGRAPH_SEPARATOR,
};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::OnceLock;

fn squad_dev_path() -> PathBuf {
    qa_sources().join("squad_shifts/squaddev_v1.1.json")
}

/// The real SQuAD v1.1 dev set, loaded once per test binary.
/// What the dev file holds: the counts of shared/DATA.md for the real file,
/// those `scripts/make_qa_substitute.py` wrote (`counts.json`) for the substitute.
struct DevCounts {
    articles: usize,
    paragraphs: usize,
    questions: usize,
    answers_at_offsets: usize,
}

fn expected_dev() -> DevCounts {
    match qa_sources_kind() {
        (_, QaSources::BigBench) => DevCounts {
            articles: 48,
            paragraphs: 2_067,
            questions: 10_565,
            answers_at_offsets: 34_001,
        },
        (root, QaSources::Substitute) => {
            let c: serde_json::Value = serde_json::from_slice(
                &std::fs::read(root.join("counts.json")).expect("substitute counts.json"),
            )
            .expect("counts JSON");
            let n = |k: &str| c[k].as_u64().expect(k) as usize;
            // One answer per question, each at its offset.
            DevCounts {
                articles: n("squad_dev_articles"),
                paragraphs: n("squad_dev_paragraphs"),
                questions: n("squad_dev"),
                answers_at_offsets: n("squad_dev"),
            }
        }
    }
}

fn squad_dev() -> &'static SquadSet {
    static SET: OnceLock<SquadSet> = OnceLock::new();
    SET.get_or_init(|| load_squad(&squad_dev_path()).expect("load the SQuAD v1.1 dev file"))
}

#[derive(Serialize)]
struct Item {
    prediction: String,
    answers: Vec<String>,
}

#[derive(Deserialize)]
struct OracleItem {
    normalized: String,
    em: bool,
    f1: f64,
}

#[derive(Deserialize)]
struct OracleOut {
    items: Vec<OracleItem>,
    exact_match: f64,
    f1: f64,
}

fn item(prediction: &str, answers: &[&str]) -> Item {
    Item {
        prediction: prediction.to_owned(),
        answers: answers.iter().map(|s| s.to_string()).collect(),
    }
}

/// Hand-written edge cases: punctuation, articles, whitespace, unicode, empty
/// answers, numbers, repeated tokens, several golds.
fn tricky_items() -> Vec<Item> {
    vec![
        item("The Eiffel Tower", &["eiffel tower"]),
        item("Eiffel Tower.", &["The Eiffel Tower"]),
        item("", &["the"]),
        item("", &["Paris"]),
        item("   ", &[""]),
        item("a an the", &["the"]),
        item("An", &["a", "the cat"]),
        item("Paris!!!", &["paris"]),
        item("U.S.A.", &["USA", "United States"]),
        item("theater", &["the theater"]),
        item("anthem of a nation", &["the anthem", "nation"]),
        item("the the the cat", &["cat cat"]),
        item("cat cat cat", &["cat"]),
        item("cat dog cat dog", &["dog cat dog bird"]),
        item("1,000", &["1000"]),
        item("3.14", &["314", "3 14"]),
        item("$5 million", &["5 million dollars"]),
        item("1 000", &["1000"]),
        item("in the 1990s", &["1990s", "the 1990"]),
        item("Apollo 11 and 12", &["Apollo 11", "12"]),
        item("Super Bowl 50", &["Super Bowl L", "50"]),
        item("Café Müller", &["café müller"]),
        item("ΣΊΣΥΦΟΣ", &["σίσυφος"]),
        item("ΟΔΟΣ ΑΣ", &["οδος ας"]),
        item("İstanbul", &["istanbul"]),
        item("naïve", &["naive"]),
        item("Straße", &["STRASSE", "strasse"]),
        item("“The” answer", &["answer"]),
        item("the’s theory", &["’s theory"]),
        item("l’homme", &["l homme"]),
        item("日本の首都", &["日本"]),
        item("東京 the 大阪", &["東京 大阪"]),
        item("a\u{a0}b c", &["b c"]),
        item("x\u{1c}y z", &["x y z"]),
        item("x\u{200b}y", &["x y"]),
        item("x\u{3000}the\u{2003}y", &["x y"]),
        item("tab\tand\nnew\r\nline", &["tab and new line"]),
        item("The_Beatles", &["beatles", "thebeatles"]),
        item("A-team", &["team", "ateam"]),
        item("ＡＢＣ the", &["abc"]),
        item("the２ x", &["x"]),
        item("Ⅻ the x²", &["ⅻ x²"]),
        item("the\u{301} a\u{308}", &[""]),
        item("—the—", &["— —"]),
        item("(the) [a] {an}", &[""]),
        item("don't stop", &["dont stop", "do not stop"]),
        item("e-mail", &["email", "e mail"]),
        item(
            "The Beatles",
            &["The Beatles", "Beatles", "the beatles band"],
        ),
        item("Denver Broncos", &["Carolina Panthers", "Denver"]),
        item("Ünïcödé ÀÉÎ", &["ünïcödé àéî"]),
        item("ß ẞ", &["ß ß"]),
        item("a 🙂 b", &["🙂"]),
        item("#1 @home", &["1 home"]),
        item("!!!", &["?"]),
    ]
}

/// Items drawn from the real dev set: wrong answers (another question's gold),
/// right answers, truncations, extensions into the paragraph, case and
/// punctuation variants, and whole questions as predictions.
fn squad_items(set: &SquadSet) -> Vec<Item> {
    let qs = select_questions(&set.questions, 420, 20_240_601);
    let mut items = Vec::new();
    for (k, q) in qs.iter().enumerate() {
        let other = &qs[(k + 1) % qs.len()];
        let gold0 = &q.answers[0];
        let prediction = match k % 7 {
            0 => other.answers[0].clone(),
            1 => q.answers[q.answers.len() - 1].clone(),
            2 => {
                let toks: Vec<&str> = gold0.split_whitespace().collect();
                if toks.len() > 1 {
                    toks[1..].join(" ")
                } else {
                    gold0
                        .chars()
                        .take(gold0.chars().count().div_ceil(2))
                        .collect()
                }
            }
            3 => {
                let chars: Vec<char> = q.context.chars().collect();
                let start = q.answer_starts[0];
                let end = (start + gold0.chars().count() + 12).min(chars.len());
                chars[start.saturating_sub(9)..end].iter().collect()
            }
            4 => format!("The {}.", gold0.to_uppercase()),
            5 => q.question.clone(),
            _ => format!("{} {}", gold0, other.answers[0]),
        };
        items.push(Item {
            prediction,
            answers: q.answers.clone(),
        });
    }
    items
}

#[test]
fn metrics_match_official_script() {
    let mut items = tricky_items();
    let n_tricky = items.len();
    items.extend(squad_items(squad_dev()));
    assert!(items.len() > 400, "only {} items", items.len());

    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("items.json");
    std::fs::write(&input, serde_json::to_vec(&items).expect("json")).expect("write items");
    let stdout = run_oracle("squad_eval.py", &[input.to_str().expect("utf-8 path")]);
    let oracle: OracleOut = serde_json::from_str(&stdout).expect("oracle JSON");
    assert_eq!(oracle.items.len(), items.len());

    let mut sum = MetricSum::new();
    let mut failures = Vec::new();
    for (i, (it, want)) in items.iter().zip(&oracle.items).enumerate() {
        let norm = normalize_answer(&it.prediction);
        let (em, f) = sum.add_prediction(&it.prediction, &it.answers);
        if norm != want.normalized || em != want.em || (f - want.f1).abs() >= 1e-9 {
            failures.push(format!(
                "#{i} {:?} vs {:?}: rust ({norm:?}, {em}, {f}) python ({:?}, {}, {})",
                it.prediction, it.answers, want.normalized, want.em, want.f1
            ));
        }
        // The single-gold functions agree with best_over.
        let single_em = it.answers.iter().any(|g| exact_match(&it.prediction, g));
        let single_f1 = it
            .answers
            .iter()
            .map(|g| f1(&it.prediction, g))
            .fold(0.0, f64::max);
        assert_eq!(
            (single_em, single_f1),
            best_over(&it.prediction, &it.answers)
        );
    }
    assert!(
        failures.is_empty(),
        "{} of {} items differ from the official script:\n{}",
        failures.len(),
        items.len(),
        failures.join("\n")
    );
    assert!((sum.exact_match() - oracle.exact_match).abs() < 1e-9);
    assert!((sum.f1() - oracle.f1).abs() < 1e-9);
    assert_eq!(sum.count, items.len());

    // The items exercise every regime of the metric, on both item sources.
    for (name, range) in [("tricky", 0..n_tricky), ("squad", n_tricky..items.len())] {
        let o = &oracle.items[range];
        let exact = o.iter().filter(|x| x.em).count();
        let partial = o
            .iter()
            .filter(|x| !x.em && x.f1 > 0.0 && x.f1 < 1.0)
            .count();
        let zero = o.iter().filter(|x| !x.em && x.f1 == 0.0).count();
        assert!(
            exact >= 5 && partial >= 5 && zero >= 5,
            "{name}: exact {exact}, partial {partial}, zero {zero}"
        );
    }
}

#[test]
fn metric_sum_aggregates() {
    let mut a = MetricSum::new();
    assert_eq!((a.exact_match(), a.f1()), (0.0, 0.0));
    let (em1, f1a) = a.add_prediction("the cat", &["cat"]);
    let (em2, f1b) = a.add_prediction("cat dog", &["cat"]);
    let mut b = MetricSum::new();
    let (em3, f1c) = b.add_prediction("bird", &["cat", "dog"]);
    a.merge(&b);
    let ems = [em1, em2, em3];
    let n_em = ems.iter().filter(|&&e| e).count() as f64;
    assert_eq!(a.count, 3);
    assert!((a.exact_match() - 100.0 * n_em / 3.0).abs() < 1e-12);
    assert!((a.f1() - 100.0 * (f1a + f1b + f1c) / 3.0).abs() < 1e-12);
}

#[test]
fn loads_real_squad_dev() {
    let set = squad_dev();
    let want = expected_dev();
    assert_eq!(set.articles.len(), want.articles);
    assert_eq!(set.num_paragraphs(), want.paragraphs);
    assert_eq!(set.questions.len(), want.questions);
    let ids: HashSet<&str> = set.questions.iter().map(|q| q.id.as_str()).collect();
    assert_eq!(ids.len(), set.questions.len(), "question ids are unique");

    for art in &set.articles {
        assert!(!art.title.is_empty());
        assert_eq!(art.context, art.paragraphs.join(PARAGRAPH_SEPARATOR));
        for (p, para) in art.paragraphs.iter().enumerate() {
            let off = art.paragraph_char_offset(p);
            let at: String = art
                .context
                .chars()
                .skip(off)
                .take(para.chars().count())
                .collect();
            assert_eq!(&at, para, "paragraph {p} of {:?}", art.title);
        }
    }

    // Answer offsets are character offsets into the paragraph (and, shifted,
    // into the article context). A handful of official answers (15 in the dev
    // set, most starting with a space) sit one character later; all others
    // match exactly.
    let mut exact = 0usize;
    let mut off_by_one = Vec::new();
    let mut wrong = Vec::new();
    for q in &set.questions {
        assert_eq!(set.articles[q.article].paragraphs[q.paragraph], q.context);
        assert!(set.article_context(q).contains(&q.context));
        assert!(!q.answers.is_empty() && q.answers.len() == q.answer_starts.len());
        let chars: Vec<char> = q.context.chars().collect();
        let art = &set.articles[q.article];
        let art_chars: Vec<char> = art.context.chars().collect();
        let base = art.paragraph_char_offset(q.paragraph);
        for (text, &start) in q.answers.iter().zip(&q.answer_starts) {
            let len = text.chars().count();
            let slice = |s: usize| -> String {
                chars[s.min(chars.len())..(s + len).min(chars.len())]
                    .iter()
                    .collect()
            };
            if slice(start) == *text {
                exact += 1;
                let in_article: String =
                    art_chars[base + start..base + start + len].iter().collect();
                assert_eq!(&in_article, text);
            } else if slice(start + 1) == *text {
                off_by_one.push((q.id.clone(), text.clone()));
            } else {
                wrong.push((q.id.clone(), text.clone(), start));
            }
        }
    }
    assert!(wrong.is_empty(), "answers not at answer_start: {wrong:?}");
    assert!(
        exact >= want.answers_at_offsets,
        "only {exact} answers at their offsets"
    );
    assert!(
        off_by_one.len() * 1000 < exact,
        "too many off-by-one answers: {off_by_one:?}"
    );

    // Independent check against the raw JSON for a sample of questions.
    let raw: serde_json::Value =
        serde_json::from_slice(&std::fs::read(squad_dev_path()).expect("read the dev file"))
            .expect("dev file JSON");
    let by_id: HashMap<&str, &SquadQuestion> =
        set.questions.iter().map(|q| (q.id.as_str(), q)).collect();
    let mut checked = 0;
    for (a, art) in raw["data"].as_array().expect("data").iter().enumerate() {
        assert_eq!(art["title"].as_str(), Some(set.articles[a].title.as_str()));
        for (p, para) in art["paragraphs"]
            .as_array()
            .expect("paragraphs")
            .iter()
            .enumerate()
        {
            for qa in para["qas"].as_array().expect("qas").iter().step_by(5) {
                let q = by_id[qa["id"].as_str().expect("id")];
                assert_eq!((q.article, q.paragraph), (a, p));
                assert_eq!(Some(q.question.as_str()), qa["question"].as_str());
                assert_eq!(Some(q.context.as_str()), para["context"].as_str());
                let answers: Vec<(&str, u64)> = qa["answers"]
                    .as_array()
                    .expect("answers")
                    .iter()
                    .map(|x| {
                        (
                            x["text"].as_str().expect("text"),
                            x["answer_start"].as_u64().expect("start"),
                        )
                    })
                    .collect();
                let ours: Vec<(&str, u64)> = q
                    .answers
                    .iter()
                    .zip(&q.answer_starts)
                    .map(|(t, &s)| (t.as_str(), s as u64))
                    .collect();
                assert_eq!(ours, answers);
                checked += 1;
            }
        }
    }
    // Every fifth question of each paragraph: at least a fifth of them all.
    assert!(checked * 5 >= want.questions, "checked {checked}");
}

/// A minimal valid SQuAD document whose second question can be broken.
fn tiny_squad() -> serde_json::Value {
    serde_json::json!({
        "version": "1.1",
        "data": [{
            "title": "T",
            "paragraphs": [{
                "context": "Éclair is a French pastry.",
                "qas": [
                    {"id": "q1", "question": "What is an éclair?",
                     "answers": [{"text": "a French pastry", "answer_start": 10}]},
                    {"id": "q2", "question": "Which country?",
                     "answers": [{"text": "French", "answer_start": 12}]}
                ]
            }]
        }]
    })
}

fn write_json(dir: &tempfile::TempDir, name: &str, v: &serde_json::Value) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, serde_json::to_vec(v).expect("json")).expect("write");
    p
}

fn assert_mentions(err: &EvalError, parts: &[&str]) {
    let msg = err.to_string();
    for p in parts {
        assert!(msg.contains(p), "error {msg:?} does not mention {p:?}");
    }
}

#[test]
fn malformed_squad_files_name_file_and_field() {
    let dir = tempfile::tempdir().expect("tempdir");

    let good = write_json(&dir, "good.json", &tiny_squad());
    let set = load_squad(&good).expect("tiny set loads");
    assert_eq!(set.questions.len(), 2);
    let q = &set.questions[0];
    let at: String = q
        .context
        .chars()
        .skip(q.answer_starts[0])
        .take(15)
        .collect();
    assert_eq!(at, q.answers[0]);

    let mut v = tiny_squad();
    v["data"][0]["paragraphs"][0]["qas"][1]
        .as_object_mut()
        .expect("qa")
        .remove("question");
    let p = write_json(&dir, "no_question.json", &v);
    let err = load_squad(&p).expect_err("missing question");
    assert!(matches!(err, EvalError::MissingField { .. }), "{err:?}");
    assert_mentions(
        &err,
        &[
            p.to_str().expect("utf-8"),
            "data[0].paragraphs[0].qas[1].question",
        ],
    );

    let mut v = tiny_squad();
    v["data"][0]["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"] = "ten".into();
    let p = write_json(&dir, "bad_start.json", &v);
    let err = load_squad(&p).expect_err("string answer_start");
    assert!(matches!(err, EvalError::BadField { .. }), "{err:?}");
    assert_mentions(
        &err,
        &[p.to_str().expect("utf-8"), "qas[0].answers[0].answer_start"],
    );

    let mut v = tiny_squad();
    v["data"][0]["paragraphs"][0]["qas"][1]["answers"][0]["answer_start"] = 500.into();
    let p = write_json(&dir, "past_end.json", &v);
    assert_mentions(
        &load_squad(&p).expect_err("answer past the end"),
        &[p.to_str().expect("utf-8"), "qas[1].answers[0].answer_start"],
    );

    let mut v = tiny_squad();
    v["data"][0]["paragraphs"][0]["qas"][1]["id"] = "q1".into();
    let p = write_json(&dir, "dup_id.json", &v);
    assert_mentions(
        &load_squad(&p).expect_err("duplicate id"),
        &[p.to_str().expect("utf-8"), "qas[1].id", "q1"],
    );

    let mut v = tiny_squad();
    v.as_object_mut().expect("root").remove("data");
    let p = write_json(&dir, "no_data.json", &v);
    assert_mentions(
        &load_squad(&p).expect_err("no data"),
        &[p.to_str().expect("utf-8"), "`data`"],
    );

    let p = dir.path().join("truncated.json");
    std::fs::write(&p, b"{\"data\": [").expect("write");
    let err = load_squad(&p).expect_err("truncated");
    assert!(matches!(err, EvalError::Json { .. }), "{err:?}");
    assert_mentions(&err, &[p.to_str().expect("utf-8")]);

    let p = dir.path().join("absent.json");
    let err = load_squad(&p).expect_err("absent");
    assert!(matches!(err, EvalError::Io { .. }), "{err:?}");
    assert_mentions(&err, &[p.to_str().expect("utf-8")]);
}

#[test]
fn select_questions_is_deterministic_and_distinct() {
    let all = &squad_dev().questions;
    let ids = |qs: &[SquadQuestion]| qs.iter().map(|q| q.id.clone()).collect::<Vec<_>>();
    let a = select_questions(all, 500, 1234);
    let b = select_questions(all, 500, 1234);
    assert_eq!(a.len(), 500);
    assert_eq!(ids(&a), ids(&b));
    assert_eq!(a, b);
    assert_eq!(ids(&a).into_iter().collect::<HashSet<_>>().len(), 500);
    let c = select_questions(all, 500, 1235);
    let overlap = ids(&a).iter().filter(|id| ids(&c).contains(id)).count();
    // Two independent draws of 500 share 500 * 500 / n questions on average.
    let chance = 500 * 500 / all.len();
    assert!(
        overlap < 100.max(2 * chance),
        "seeds 1234 and 1235 share {overlap} of 500 (chance {chance})"
    );
    // Not just the first questions of the file, and spread over the articles.
    let articles: HashSet<usize> = a.iter().map(|q| q.article).collect();
    assert!(articles.len() > 40, "{} articles", articles.len());
    // A smaller subset is a prefix of a larger one; n past the end takes all.
    assert_eq!(
        ids(&select_questions(all, 50, 1234)),
        ids(&a)[..50].to_vec()
    );
    let every = select_questions(all, usize::MAX, 9);
    assert_eq!(every.len(), all.len());
    assert_eq!(
        every.iter().map(|q| &q.id).collect::<HashSet<_>>().len(),
        all.len()
    );
    assert!(select_questions(all, 0, 9).is_empty());
    assert!(select_questions(&[], 10, 9).is_empty());
}

fn read_png(path: &std::path::Path) -> (u32, u32, Vec<[u8; 3]>) {
    let bytes = std::fs::read(path).expect("read png");
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes))
        .read_info()
        .expect("png header");
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).expect("png frame");
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    let channels = match info.color_type {
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        other => panic!("unexpected colour type {other:?}"),
    };
    let pixels = buf[..info.buffer_size()]
        .chunks_exact(channels)
        .map(|c| [c[0], c[1], c[2]])
        .collect();
    (info.width, info.height, pixels)
}

#[test]
fn plot_f1_vs_ratio_writes_png() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("f1_vs_ratio.png");
    let ratios = [1.0, 0.5, 0.25, 0.1, 0.05, 0.02];
    let series: Vec<Series> = [("full KV", 0.0), ("distilled", 8.0), ("SnapKV", 25.0)]
        .iter()
        .map(|&(name, drop)| Series {
            name: name.to_owned(),
            points: ratios
                .iter()
                .enumerate()
                .map(|(i, &r)| (r, 86.0 - drop * i as f64 / 2.0))
                .collect(),
        })
        .collect();
    plot_f1_vs_ratio(&path, "SQuAD v1.1 F1 vs KV retention", &series).expect("plot");
    if let Ok(keep) = std::env::var("KVD_KEEP_PLOT") {
        std::fs::copy(&path, keep).expect("keep plot");
    }

    let (w, h, pixels) = read_png(&path);
    assert_eq!((w, h), kvd_trainer::eval::plot::PLOT_SIZE);
    assert_eq!(pixels.len(), (w * h) as usize);
    let background = [255u8, 255, 255];
    let non_bg = pixels.iter().filter(|&&p| p != background).count();
    assert!(non_bg > 5_000, "only {non_bg} non-background pixels");
    // Dark pixels: axes and text.
    let dark = pixels.iter().filter(|p| p.iter().all(|&c| c < 80)).count();
    assert!(dark > 1_000, "only {dark} dark pixels (axes, labels)");
    // Distinct saturated colours, each covering a line's worth of pixels.
    let mut counts: HashMap<[u8; 3], usize> = HashMap::new();
    for p in &pixels {
        let (lo, hi) = (p.iter().min().unwrap(), p.iter().max().unwrap());
        if hi - lo > 60 {
            *counts.entry(*p).or_default() += 1;
        }
    }
    let big = counts.values().filter(|&&n| n >= 300).count();
    assert!(
        big >= 3,
        "only {big} line colours with >= 300 pixels ({} colours)",
        counts.len()
    );

    // Bad inputs are errors that name the file.
    let bad = dir.path().join("bad.png");
    let err = plot_f1_vs_ratio(&bad, "t", &[]).expect_err("no series");
    assert_mentions(&err, &[bad.to_str().expect("utf-8")]);
    let zero = [Series {
        name: "x".into(),
        points: vec![(0.0, 50.0)],
    }];
    let err = plot_f1_vs_ratio(&bad, "t", &zero).expect_err("ratio 0");
    assert_mentions(&err, &[bad.to_str().expect("utf-8"), "ratio"]);
    let nowhere = dir.path().join("no/such/dir/plot.png");
    let err = plot_f1_vs_ratio(&nowhere, "t", &series).expect_err("unwritable");
    assert_mentions(&err, &[nowhere.to_str().expect("utf-8")]);
}
