//! `prepare`: Parquet datasets from the raw sources of shared/DATA.md, with
//! the train/eval split there: train on SQuAD-shifts new_wiki, CoQA, Quoref,
//! DROP, minute mysteries and the essays; evaluate on SQuAD v1.1 dev. The
//! held-out SQuAD-shifts files (nyt, reddit, amazon_reviews) are refused.
//! Where the registry no longer serves the BIG-bench package that holds the QA
//! sets, the same files made from the essays stand in ([`qa_root`]).
//!
//! Output under the target URL: `train/qa/`, `train/text/`, `train/synth/`
//! (synthetic retrieval rows, [`crate::synth`]), `eval/qa/`, each a dataset
//! (Parquet files + `manifest.json`).

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{DataError, Result};
use crate::manifest::Manifest;
use crate::schema::{Record, SchemaSpec};
use crate::writer::{encode_parquet, SourcedRecord, WriterConfig};
use kvd_store::{Source, StoreOptions};

/// SQuAD-shifts files that must never be read (held out for acceptance).
pub const HELD_OUT: &[&str] = &["nyt_v1.0", "reddit_v1.0", "amazon_reviews_v1.0"];

/// How SQuAD contexts are cut.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SquadContext {
    /// One paragraph per row (the SQuAD setting).
    #[default]
    Paragraph,
    /// The whole article (paragraphs joined) per row: long contexts.
    Article,
}

fn src_err(path: &Path, reason: impl Into<String>) -> DataError {
    DataError::Source {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let name = path.to_string_lossy();
    if HELD_OUT.iter().any(|h| name.contains(h)) {
        return Err(src_err(
            path,
            "held-out file: never used for training, tuning or tests",
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| DataError::Io {
        path: path.display().to_string(),
        source: e,
    })?;
    serde_json::from_slice(&bytes).map_err(|e| src_err(path, format!("invalid JSON: {e}")))
}

fn str_at<'a>(v: &'a Value, key: &str, path: &Path, what: &str) -> Result<&'a str> {
    v.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| src_err(path, format!("{what}: missing string `{key}`")))
}

fn arr_at<'a>(v: &'a Value, key: &str, path: &Path, what: &str) -> Result<&'a Vec<Value>> {
    v.get(key)
        .and_then(Value::as_array)
        .ok_or_else(|| src_err(path, format!("{what}: missing array `{key}`")))
}

/// SQuAD-format JSON (`data[].paragraphs[].{context, qas[].{id, question, answers[].text}}`).
pub fn read_squad(path: &Path, source: &str, ctx: SquadContext) -> Result<Vec<SourcedRecord>> {
    let v = read_json(path)?;
    let mut out = Vec::new();
    for (ai, art) in arr_at(&v, "data", path, "root")?.iter().enumerate() {
        let what = format!("data[{ai}]");
        let paras = arr_at(art, "paragraphs", path, &what)?;
        let article: Vec<&str> = paras
            .iter()
            .map(|p| str_at(p, "context", path, &what))
            .collect::<Result<_>>()?;
        let joined = article.join("\n\n");
        for (pi, p) in paras.iter().enumerate() {
            let what = format!("data[{ai}].paragraphs[{pi}]");
            for (qi, qa) in arr_at(p, "qas", path, &what)?.iter().enumerate() {
                let what = format!("{what}.qas[{qi}]");
                let mut answers: Vec<String> = Vec::new();
                for a in arr_at(qa, "answers", path, &what)? {
                    let t = str_at(a, "text", path, &what)?.trim().to_string();
                    if !t.is_empty() && !answers.contains(&t) {
                        answers.push(t);
                    }
                }
                if answers.is_empty() {
                    return Err(src_err(path, format!("{what}: no answers")));
                }
                let id = qa.get("id").and_then(Value::as_str).unwrap_or_default();
                out.push(SourcedRecord {
                    id: format!("{source}/{id}"),
                    source: source.to_string(),
                    record: Record::Qa {
                        context: match ctx {
                            SquadContext::Paragraph => article[pi].to_string(),
                            SquadContext::Article => joined.clone(),
                        },
                        question: str_at(qa, "question", path, &what)?.to_string(),
                        answers,
                    },
                });
            }
        }
    }
    Ok(out)
}

/// CoQA: one row per question turn; the question carries the earlier turns
/// of the conversation (`Q: ...\nA: ...`), the answers are the free-form
/// answer and the additional annotators' answers.
pub fn read_coqa(path: &Path) -> Result<Vec<SourcedRecord>> {
    let v = read_json(path)?;
    let mut out = Vec::new();
    for (si, s) in arr_at(&v, "data", path, "root")?.iter().enumerate() {
        let what = format!("data[{si}]");
        let story = str_at(s, "story", path, &what)?;
        let sid = str_at(s, "id", path, &what)?;
        let qs = arr_at(s, "questions", path, &what)?;
        let answers = arr_at(s, "answers", path, &what)?;
        if qs.len() != answers.len() {
            return Err(src_err(
                path,
                format!("{what}: questions and answers differ in number"),
            ));
        }
        let extra = s.get("additional_answers").and_then(Value::as_object);
        let mut history = String::new();
        for (ti, (q, a)) in qs.iter().zip(answers).enumerate() {
            let what = format!("{what}.questions[{ti}]");
            let question = str_at(q, "input_text", path, &what)?;
            let answer = str_at(a, "input_text", path, &what)?;
            let mut all = vec![answer.to_string()];
            for alt in extra.into_iter().flat_map(|m| m.values()) {
                if let Some(t) = alt
                    .get(ti)
                    .and_then(|x| x.get("input_text"))
                    .and_then(Value::as_str)
                {
                    if !all.iter().any(|x| x == t) {
                        all.push(t.to_string());
                    }
                }
            }
            out.push(SourcedRecord {
                id: format!("coqa/{sid}/{}", ti + 1),
                source: "coqa".into(),
                record: Record::Qa {
                    context: story.to_string(),
                    question: format!("{history}{question}"),
                    answers: all,
                },
            });
            history.push_str(&format!("Q: {question}\nA: {answer}\n"));
        }
    }
    Ok(out)
}

/// A natural-instructions task (`examples[].{input: "Passage: ... \nQuestion: ...", target: [..]}`):
/// the passage is the context, the rest of the input (question, answer type) the question.
pub fn read_natural_instructions(path: &Path, source: &str) -> Result<Vec<SourcedRecord>> {
    let v = read_json(path)?;
    let mut out = Vec::new();
    for (i, e) in arr_at(&v, "examples", path, "root")?.iter().enumerate() {
        let what = format!("examples[{i}]");
        let input = str_at(e, "input", path, &what)?;
        let body = input.strip_prefix("Passage: ").unwrap_or(input);
        let (ctx, q) = body
            .split_once("\nQuestion: ")
            .ok_or_else(|| src_err(path, format!("{what}: no `\\nQuestion: ` in input")))?;
        let answers: Vec<String> = match e.get("target") {
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect(),
            Some(Value::String(s)) => vec![s.clone()],
            _ => Vec::new(),
        };
        if answers.is_empty() {
            return Err(src_err(path, format!("{what}: no target")));
        }
        out.push(SourcedRecord {
            id: format!("{source}/{i}"),
            source: source.to_string(),
            record: Record::Qa {
                context: ctx.trim().to_string(),
                question: q.trim().to_string(),
                answers,
            },
        });
    }
    Ok(out)
}

/// Splits a mystery's trailing question sentences from the story: the
/// question is the text after the last sentence end (`.`, `!`, `”`, `"`
/// followed by a space) when all of it ends in `?`.
pub fn split_trailing_question(input: &str) -> (&str, &str) {
    let s = input.trim_end();
    if !s.ends_with('?') {
        return (s, "");
    }
    let bytes = s.as_bytes();
    let mut cut = None;
    for (i, ch) in s.char_indices().rev() {
        let ends = matches!(ch, '.' | '!' | '”' | '"');
        let next = i + ch.len_utf8();
        if ends && next < bytes.len() && bytes[next].is_ascii_whitespace() {
            cut = Some(next);
            break;
        }
    }
    match cut {
        Some(c) => (s[..c].trim_end(), s[c..].trim()),
        None => (s, ""),
    }
}

/// BIG-bench minute mysteries (`examples[].{input, target}`): story as
/// context, its closing question(s) as the question, the explanation as answer.
pub fn read_minute_mysteries(path: &Path) -> Result<Vec<SourcedRecord>> {
    let v = read_json(path)?;
    let mut out = Vec::new();
    for (i, e) in arr_at(&v, "examples", path, "root")?.iter().enumerate() {
        let what = format!("examples[{i}]");
        let input = str_at(e, "input", path, &what)?;
        let target = str_at(e, "target", path, &what)?;
        let (story, q) = split_trailing_question(input);
        let question = if q.is_empty() {
            "Who did it, and how do you know?"
        } else {
            q
        };
        out.push(SourcedRecord {
            id: format!("minute_mysteries/{i}"),
            source: "minute_mysteries".into(),
            record: Record::Qa {
                context: story.to_string(),
                question: question.to_string(),
                answers: vec![target.trim().to_string()],
            },
        });
    }
    Ok(out)
}

/// Every `*.txt` in `dir` (sorted) as one text row.
pub fn read_text_dir(dir: &Path, source: &str) -> Result<Vec<SourcedRecord>> {
    let io = |e| DataError::Io {
        path: dir.display().to_string(),
        source: e,
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|p| {
            let bytes = std::fs::read(p).map_err(|e| DataError::Io {
                path: p.display().to_string(),
                source: e,
            })?;
            let text =
                String::from_utf8(bytes).map_err(|e| src_err(p, format!("not UTF-8: {e}")))?;
            let stem = p
                .file_stem()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_default();
            Ok(SourcedRecord {
                id: format!("{source}/{stem}"),
                source: source.to_string(),
                record: Record::Text { text },
            })
        })
        .collect()
}

/// JSON Lines: each line `{"text": ...}` or `{"context", "question", "answer"}`
/// (answer a string or list); `id` optional.
pub fn read_jsonl(path: &Path, source: &str) -> Result<Vec<SourcedRecord>> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::Io {
        path: path.display().to_string(),
        source: e,
    })?;
    let mut out = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let what = format!("line {}", i + 1);
        let v: Value =
            serde_json::from_str(line).map_err(|e| src_err(path, format!("{what}: {e}")))?;
        let record = if let Some(t) = v.get("text").and_then(Value::as_str) {
            Record::Text {
                text: t.to_string(),
            }
        } else {
            let answers = match v.get("answer") {
                Some(Value::Array(a)) => a
                    .iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect(),
                Some(Value::String(s)) => vec![s.clone()],
                _ => return Err(src_err(path, format!("{what}: no `text` or `answer`"))),
            };
            Record::Qa {
                context: str_at(&v, "context", path, &what)?.to_string(),
                question: str_at(&v, "question", path, &what)?.to_string(),
                answers,
            }
        };
        let id = v
            .get("id")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or(i.to_string());
        out.push(SourcedRecord {
            id: format!("{source}/{id}"),
            source: source.to_string(),
            record,
        });
    }
    Ok(out)
}

/// The records of the standard split, read from `assets` (`$KVD_CACHE/assets`).
pub struct Split {
    /// Training QA rows.
    pub train_qa: Vec<SourcedRecord>,
    /// Training documents.
    pub train_text: Vec<SourcedRecord>,
    /// Synthetic retrieval rows built from the training contexts and
    /// documents ([`crate::synth`]).
    pub train_synth: Vec<SourcedRecord>,
    /// Several questions about one context per row, from the training QA
    /// (CoQA's rows hold their earlier turns already) and synthetic rows
    /// ([`crate::multiqa`]).
    pub train_multiqa: Vec<SourcedRecord>,
    /// Evaluation QA rows (SQuAD v1.1 dev).
    pub eval_qa: Vec<SourcedRecord>,
    /// Where the QA rows came from.
    pub qa_sources: QaSources,
}

/// Most questions in one `train/multiqa` row.
pub const MULTIQA_QUESTIONS: usize = 3;

/// Synthetic retrieval rows written to `train/synth`.
pub const SYNTH_ROWS: usize = 16_000;

/// Where the QA sources of shared/DATA.md were read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QaSources {
    /// The BIG-bench files (`assets/bigbench`, from `bigbench==1.0.0`).
    BigBench,
    /// The corpus `scripts/make_qa_substitute.py` makes from the essays in the
    /// same formats (`assets/qa-substitute`), for machines where the registry
    /// does not serve `bigbench==1.0.0`: rule-made questions that exercise the
    /// pipeline and measure no model quality.
    Substitute,
}

/// The SQuAD v1.1 dev file under a sources root ([`qa_root`]).
pub const SQUAD_DEV: &str = "squad_shifts/squaddev_v1.1.json";

/// The root of the QA sources under `assets`: `bigbench/` where its SQuAD
/// dev file is, else `qa-substitute/` (made by `scripts/fetch_assets.sh` when
/// the registry refuses the BIG-bench package); an error naming both when
/// neither is there.
pub fn qa_root(assets: &Path) -> Result<(PathBuf, QaSources)> {
    let bb = assets.join("bigbench");
    if bb.join(SQUAD_DEV).is_file() {
        return Ok((bb, QaSources::BigBench));
    }
    let sub = assets.join("qa-substitute");
    if sub.join(SQUAD_DEV).is_file() {
        return Ok((sub, QaSources::Substitute));
    }
    Err(src_err(
        &bb,
        format!(
            "no QA sources: neither {} nor {} has {SQUAD_DEV} (run scripts/setup.sh)",
            bb.display(),
            sub.display()
        ),
    ))
}

/// Reads the split of shared/DATA.md from `assets` (the QA sources from
/// [`qa_root`]).
pub fn read_split(assets: &Path, ctx: SquadContext) -> Result<Split> {
    let (bb, qa_sources) = qa_root(assets)?;
    let ni = bb.join("natural_instructions");
    let mut train_qa = read_squad(&bb.join("squad_shifts/new_wiki_v1.0.json"), "new_wiki", ctx)?;
    train_qa.extend(read_coqa(
        &bb.join("coqa_conversational_question_answering/coqa.test.json"),
    )?);
    train_qa.extend(read_natural_instructions(
        &ni.join("subtask002_quoref_answer_generation/task.json"),
        "quoref",
    )?);
    train_qa.extend(read_natural_instructions(
        &ni.join("subtask028_drop_answer_generation/task.json"),
        "drop",
    )?);
    train_qa.extend(read_minute_mysteries(
        &bb.join("minute_mysteries_qa/freetext/task.json"),
    )?);
    let train_text = read_text_dir(&assets.join("essays"), "essays")?;
    let train_synth = crate::synth::synthesize(&train_qa, &train_text, SYNTH_ROWS, 300, 0);
    // CoQA's rows carry their conversation's earlier turns already.
    let both: Vec<SourcedRecord> = train_qa
        .iter()
        .filter(|r| r.source != "coqa")
        .chain(&train_synth)
        .cloned()
        .collect();
    Ok(Split {
        train_multiqa: crate::multiqa::multi_question(
            &both,
            MULTIQA_QUESTIONS,
            &crate::builder::QaTemplate::default(),
        ),
        train_synth,
        train_qa,
        train_text,
        qa_sources,
        eval_qa: read_squad(&bb.join(SQUAD_DEV), "squad_dev", ctx)?,
    })
}

/// Writes `rows` as a dataset under `url` (files `part-00000.parquet`, ...)
/// and its manifest; returns the manifest.
pub async fn write_dataset(
    url: &str,
    store: &StoreOptions,
    rows: &[SourcedRecord],
    cfg: &WriterConfig,
    progress: Option<&indicatif::ProgressBar>,
) -> Result<Manifest> {
    let source = Source::open(url, store)?;
    let qa = matches!(rows.first().map(|r| &r.record), Some(Record::Qa { .. }));
    for (i, chunk) in rows.chunks(cfg.file_rows.max(1)).enumerate() {
        let bytes = encode_parquet(chunk, cfg)?;
        source
            .put(&format!("part-{i:05}.parquet"), bytes.into())
            .await?;
        if let Some(p) = progress {
            p.inc(chunk.len() as u64);
        }
    }
    let spec = if qa {
        SchemaSpec::qa()
    } else {
        SchemaSpec::text()
    };
    let manifest = Manifest::build(&source, &spec).await?;
    manifest.save(&source).await?;
    Ok(manifest)
}

/// What `prepare` wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PrepareSummary {
    /// (dataset URL, rows, files).
    pub datasets: Vec<(String, u64, usize)>,
    /// Where the QA rows came from.
    pub qa_sources: QaSources,
}

/// Reads the split from `assets` and writes `train/qa`, `train/text`,
/// `train/synth`, `train/multiqa` and `eval/qa` under `out_url`, with a progress bar if `progress`.
pub async fn prepare(
    assets: &Path,
    out_url: &str,
    store: &StoreOptions,
    cfg: &WriterConfig,
    ctx: SquadContext,
    progress: bool,
) -> Result<PrepareSummary> {
    let split = read_split(assets, ctx)?;
    let total = (split.train_qa.len()
        + split.train_text.len()
        + split.train_synth.len()
        + split.train_multiqa.len()
        + split.eval_qa.len()) as u64;
    let bar = if progress {
        indicatif::ProgressBar::new(total)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg:12} [{bar:40}] {pos}/{len} rows ({elapsed})")
            .map_err(|e| DataError::Config(e.to_string()))?,
    );
    let base = out_url.trim_end_matches('/');
    let mut datasets = Vec::new();
    for (name, rows) in [
        ("train/qa", &split.train_qa),
        ("train/text", &split.train_text),
        ("train/synth", &split.train_synth),
        ("train/multiqa", &split.train_multiqa),
        ("eval/qa", &split.eval_qa),
    ] {
        bar.set_message(name);
        let url = format!("{base}/{name}");
        let m = write_dataset(&url, store, rows, cfg, Some(&bar)).await?;
        datasets.push((url, m.num_rows(), m.files.len()));
    }
    bar.finish();
    Ok(PrepareSummary {
        datasets,
        qa_sources: split.qa_sources,
    })
}
