//! `prepare` on the real sources ($KVD_CACHE/assets, from scripts/fetch_assets.sh):
//! row counts per source (as shared/DATA.md states them), the held-out guard,
//! the written Parquet read back by pyarrow and by the loader, and examples
//! tokenised with SmolLM2's real tokenizer against transformers.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use kvd_data::prepare::{self, QaSources, SquadContext};
use kvd_data::writer::WriterConfig;
use kvd_data::{
    BuilderConfig, Dataset, DatasetOptions, ExampleBuilder, HfTokenizer, Loader, LoaderConfig,
    Record, TextTokenizer,
};

fn cache() -> PathBuf {
    std::env::var_os("KVD_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/kv-distill")
        })
}

fn python() -> PathBuf {
    cache().join("venv/bin/python")
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("root")
}

/// Rows per source: shared/DATA.md's for the BIG-bench files, the counts
/// `scripts/make_qa_substitute.py` wrote for the substitute.
struct Expected {
    rows: Vec<(&'static str, usize)>,
    eval: usize,
    /// Fewest multi-question rows.
    multi: usize,
    /// How many times longer the article contexts are than the paragraphs.
    article_factor: usize,
}

fn expected(split: &prepare::Split, root: &Path) -> Expected {
    match split.qa_sources {
        QaSources::BigBench => Expected {
            rows: vec![
                ("new_wiki", 7936),
                ("coqa", 10930),
                ("quoref", 6500),
                ("drop", 6500),
                ("minute_mysteries", 274),
            ],
            eval: 10565,
            multi: 5000,
            article_factor: 10,
        },
        QaSources::Substitute => {
            let c: serde_json::Value = serde_json::from_slice(
                &std::fs::read(root.join("counts.json")).expect("substitute counts.json"),
            )
            .expect("counts JSON");
            let n = |k: &str| c[k].as_u64().expect(k) as usize;
            Expected {
                rows: ["new_wiki", "coqa", "quoref", "drop", "minute_mysteries"]
                    .into_iter()
                    .map(|k| (k, n(k)))
                    .collect(),
                eval: n("squad_dev"),
                multi: 500,
                // Two paragraphs an article.
                article_factor: 1,
            }
        }
    }
}

#[test]
fn source_row_counts_match_data_md() {
    let a = cache().join("assets");
    let split = prepare::read_split(&a, SquadContext::Paragraph).expect("split");
    let (root, _) = prepare::qa_root(&a).expect("QA sources");
    let want = expected(&split, &root);
    let count = |src: &str| split.train_qa.iter().filter(|r| r.source == src).count();
    for &(src, n) in &want.rows {
        assert_eq!(count(src), n, "{src}");
    }
    assert_eq!(split.train_text.len(), 49);
    assert_eq!(split.eval_qa.len(), want.eval);
    // Mysteries: every story ends in a question that is split off.
    for r in split
        .train_qa
        .iter()
        .filter(|r| r.source == "minute_mysteries")
    {
        let Record::Qa {
            question, context, ..
        } = &r.record
        else {
            panic!("qa")
        };
        assert!(
            question.ends_with('?') && !context.ends_with('?'),
            "{}: {question}",
            r.id
        );
    }
    // CoQA turns carry their history.
    let turn2 = split
        .train_qa
        .iter()
        .find(|r| r.id.starts_with("coqa/") && r.id.ends_with("/2"))
        .expect("turn 2");
    let Record::Qa { question, .. } = &turn2.record else {
        panic!("qa")
    };
    assert!(
        question.starts_with("Q: ") && question.contains("\nA: "),
        "{question}"
    );
    // Article contexts are longer than paragraphs.
    let art = prepare::read_squad(&root.join(prepare::SQUAD_DEV), "d", SquadContext::Article)
        .expect("article");
    let para = &split.eval_qa;
    let len = |r: &kvd_data::writer::SourcedRecord| r.record.text_bytes();
    assert!(
        art.iter().map(len).sum::<usize>()
            > want.article_factor * para.iter().map(len).sum::<usize>()
    );
    // Several questions per context: training contexts only, never CoQA's
    // (its rows hold their history), each row asking 2 to 3 questions.
    let multi = &split.train_multiqa;
    assert!(
        multi.len() > want.multi,
        "{} multi-question rows",
        multi.len()
    );
    let eval: std::collections::HashSet<&str> = para
        .iter()
        .filter_map(|r| match &r.record {
            Record::Qa { context, .. } => Some(context.as_str()),
            Record::Text { .. } => None,
        })
        .collect();
    for r in multi {
        let Record::Qa {
            context, question, ..
        } = &r.record
        else {
            panic!("qa")
        };
        assert!(
            !eval.contains(context.as_str()),
            "{}: an eval context",
            r.id
        );
        assert!(!r.source.starts_with("coqa"), "{}", r.id);
        let asked = 1 + question.matches("\n\nQuestion: ").count();
        assert!(
            (2..=prepare::MULTIQA_QUESTIONS).contains(&asked),
            "{}: {asked}",
            r.id
        );
    }
    for src in ["new_wiki+multi", "synth+multi", "quoref+multi"] {
        assert!(multi.iter().any(|r| r.source == src), "no {src} rows");
    }
}

/// The substitute QA sources (`scripts/make_qa_substitute.py`, made by the
/// setup where the registry does not serve the BIG-bench package), made here
/// from the real essays whichever sources this machine has: the same bytes
/// twice, every file read by its reader with the rows `counts.json` states,
/// every SQuAD answer at its character offset, and no evaluation paragraph
/// among the training sources' contexts.
#[test]
fn the_qa_substitute_is_deterministic_readable_and_disjoint() {
    let essays = cache().join("assets/essays");
    let dirs = [
        tempfile::tempdir().expect("tmp"),
        tempfile::tempdir().expect("tmp"),
    ];
    for d in &dirs {
        let o = Command::new(python())
            .arg(repo().join("scripts/make_qa_substitute.py"))
            .args([&essays, &d.path().to_path_buf()])
            .output()
            .expect("python");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let (a, b) = (dirs[0].path(), dirs[1].path());
    let files = [
        "squad_shifts/new_wiki_v1.0.json",
        prepare::SQUAD_DEV,
        "coqa_conversational_question_answering/coqa.test.json",
        "natural_instructions/subtask002_quoref_answer_generation/task.json",
        "natural_instructions/subtask028_drop_answer_generation/task.json",
        "minute_mysteries_qa/freetext/task.json",
        "counts.json",
    ];
    for f in files {
        let x = std::fs::read(a.join(f)).expect(f);
        assert!(
            x == std::fs::read(b.join(f)).expect(f),
            "{f} differs between runs"
        );
    }
    let c: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.join("counts.json")).expect("counts"))
            .expect("counts JSON");
    let n = |k: &str| c[k].as_u64().expect(k) as usize;
    let p = SquadContext::Paragraph;
    let wiki = prepare::read_squad(&a.join(files[0]), "new_wiki", p).expect("new_wiki");
    let dev = prepare::read_squad(&a.join(files[1]), "squad_dev", p).expect("dev");
    let coqa = prepare::read_coqa(&a.join(files[2])).expect("coqa");
    let quoref = prepare::read_natural_instructions(&a.join(files[3]), "quoref").expect("quoref");
    let drop = prepare::read_natural_instructions(&a.join(files[4]), "drop").expect("drop");
    let myst = prepare::read_minute_mysteries(&a.join(files[5])).expect("mysteries");
    for (name, rows) in [
        ("new_wiki", &wiki),
        ("squad_dev", &dev),
        ("coqa", &coqa),
        ("quoref", &quoref),
        ("drop", &drop),
        ("minute_mysteries", &myst),
    ] {
        assert_eq!(rows.len(), n(name), "{name}");
        assert!(rows.len() > 50, "{name}: {} rows", rows.len());
    }
    // Every mystery's question is split off its story, as the real ones are.
    for r in &myst {
        let Record::Qa { question, .. } = &r.record else {
            panic!("qa")
        };
        assert!(question.starts_with("What words come after"), "{question}");
    }
    let context = |r: &kvd_data::writer::SourcedRecord| match &r.record {
        Record::Qa {
            context, answers, ..
        } => {
            assert!(
                context.contains(&answers[0]),
                "{}: answer not in context",
                r.id
            );
            context.clone()
        }
        Record::Text { .. } => panic!("{}: not QA", r.id),
    };
    let eval: std::collections::HashSet<String> = dev.iter().map(context).collect();
    for r in wiki
        .iter()
        .chain(&coqa)
        .chain(&quoref)
        .chain(&drop)
        .chain(&myst)
    {
        let c = context(r);
        assert!(
            !eval
                .iter()
                .any(|e| e.contains(&c) || c.contains(e.as_str())),
            "{}: an evaluation paragraph",
            r.id
        );
    }
    // SQuAD answers at their character offsets.
    let raw: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.join(files[1])).expect("dev")).expect("JSON");
    let mut at = 0;
    for art in raw["data"].as_array().expect("data") {
        for para in art["paragraphs"].as_array().expect("paragraphs") {
            let ctx: Vec<char> = para["context"].as_str().expect("context").chars().collect();
            for qa in para["qas"].as_array().expect("qas") {
                let ans = &qa["answers"][0];
                let text = ans["text"].as_str().expect("text");
                let s = ans["answer_start"].as_u64().expect("start") as usize;
                let got: String = ctx[s..s + text.chars().count()].iter().collect();
                assert_eq!(got, text, "{}", qa["id"]);
                at += 1;
            }
        }
    }
    assert_eq!(at, n("squad_dev"));
}

#[test]
fn held_out_files_are_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path().join("nyt_v1.0.json");
    std::fs::write(&p, "{}").expect("write");
    let e = prepare::read_squad(&p, "x", SquadContext::Paragraph).expect_err("held out");
    assert!(e.to_string().contains("held-out"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_writes_datasets_readable_by_pyarrow_and_the_loader() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("prepared");
    let cfg = WriterConfig {
        row_group_rows: 256,
        ..WriterConfig::default()
    };
    let s = prepare::prepare(
        &cache().join("assets"),
        &out.to_string_lossy(),
        &Default::default(),
        &cfg,
        SquadContext::Paragraph,
        false,
    )
    .await
    .expect("prepare");
    let rows: Vec<u64> = s.datasets.iter().map(|d| d.1).collect();
    let split =
        prepare::read_split(&cache().join("assets"), SquadContext::Paragraph).expect("split");
    let (root, _) = prepare::qa_root(&cache().join("assets")).expect("QA sources");
    let want = expected(&split, &root);
    assert_eq!(s.qa_sources, split.qa_sources);
    assert_eq!(
        rows,
        vec![
            want.rows.iter().map(|r| r.1 as u64).sum::<u64>(),
            49,
            prepare::SYNTH_ROWS as u64,
            split.train_multiqa.len() as u64,
            want.eval as u64
        ]
    );
    // The synthetic retrieval rows: every answer is in its context.
    let synth = split.train_synth;
    assert_eq!(synth.len(), prepare::SYNTH_ROWS);
    for r in synth.iter().step_by(97) {
        let kvd_data::Record::Qa {
            context, answers, ..
        } = &r.record
        else {
            panic!("{}: not a QA row", r.id)
        };
        assert!(context.contains(&answers[0]), "{}", r.id);
    }
    // pyarrow reads the same rows, zstd-compressed, with row groups <= 256.
    let script = "import sys,glob,pyarrow.parquet as pq\nn=0\nfor f in sorted(glob.glob(sys.argv[1]+'/*.parquet')):\n  m=pq.ParquetFile(f).metadata\n  n+=m.num_rows\n  assert all(m.row_group(i).num_rows<=256 for i in range(m.num_row_groups))\n  assert m.row_group(0).column(0).compression=='ZSTD'\nprint(n)";
    let o = Command::new(python())
        .args(["-c", script, &out.join("eval/qa").to_string_lossy()])
        .output()
        .expect("python");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        want.eval.to_string()
    );

    // The real tokenizer (SmolLM2, via transformers) and one loader step.
    let tokdir = dir.path().join("tok");
    let text = dir.path().join("text.txt");
    let ds = Arc::new(
        Dataset::open(
            &out.join("eval/qa").to_string_lossy(),
            DatasetOptions::default(),
        )
        .await
        .expect("open"),
    );
    let first = ds.row_group(0, 0).await.expect("rg");
    let Ok(Record::Qa { context, .. }) = &first[0] else {
        panic!("qa row")
    };
    std::fs::write(&text, context).expect("write");
    let gguf = cache().join("assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let o = Command::new(python())
        .arg(repo().join("tests/oracle/data_tokenizer.py"))
        .args([&gguf, &tokdir, &text])
        .output()
        .expect("python");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let want: Vec<u32> = serde_json::from_slice(&o.stdout).expect("ids");
    let tok = Arc::new(HfTokenizer::from_file(&tokdir.join("tokenizer.json")).expect("tokenizer"));
    assert_eq!(tok.encode(context).expect("encode"), want);
    let builder = Arc::new(
        ExampleBuilder::new(
            tok.clone(),
            BuilderConfig {
                max_len: 2048,
                threads: 2,
                ..BuilderConfig::default()
            },
        )
        .expect("b"),
    );
    let mut loader = Loader::new(
        ds,
        builder,
        LoaderConfig {
            global_batch: 32,
            ..LoaderConfig::default()
        },
    );
    let mut c = loader.cursor();
    let b = loader.next(&mut c, 0, 1).await.expect("step");
    assert_eq!(b.examples.len(), 32);
    for e in &b.examples {
        assert!(e.tokens.len() <= 2048 && e.span_len >= 16);
        assert_eq!(e.tokens.len(), e.prefix_len + e.span_len + e.suffix_len);
    }
}
