//! SQuAD-format (v1.1) question answering sets: loading and deterministic
//! subsets.
//!
//! The file layout is `{"data": [{"title", "paragraphs": [{"context", "qas":
//! [{"id", "question", "answers": [{"text", "answer_start"}]}]}]}]}`; other keys
//! (`version`, BIG-bench's `canary`, ...) are ignored. `answer_start` is a
//! character (Unicode scalar value) offset into `context`, as in the Python
//! tooling that made the files.

use super::error::{EvalError, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Separator between the paragraphs of an article-level context.
pub const PARAGRAPH_SEPARATOR: &str = "\n\n";

/// One question with its gold answers and the paragraph it is asked about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SquadQuestion {
    /// The question's id in the file.
    pub id: String,
    /// The question text.
    pub question: String,
    /// The gold answer texts, in file order (duplicates kept, as in the file).
    pub answers: Vec<String>,
    /// For each answer, its start in `context` as a character offset.
    pub answer_starts: Vec<usize>,
    /// The paragraph the question is about.
    pub context: String,
    /// Index of the article in the file (`data[article]`).
    pub article: usize,
    /// Index of the paragraph within its article (`paragraphs[paragraph]`).
    pub paragraph: usize,
}

/// One article: its title and paragraphs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SquadArticle {
    /// The article's title.
    pub title: String,
    /// The paragraph texts, in file order.
    pub paragraphs: Vec<String>,
    /// All paragraphs joined with [`PARAGRAPH_SEPARATOR`].
    pub context: String,
}

impl SquadArticle {
    /// Character offset of paragraph `p` in [`SquadArticle::context`], so that a
    /// paragraph-level `answer_start` maps to `offset + answer_start` there.
    /// Panics if `p` is out of range.
    pub fn paragraph_char_offset(&self, p: usize) -> usize {
        let sep = PARAGRAPH_SEPARATOR.chars().count();
        self.paragraphs[..p]
            .iter()
            .map(|t| t.chars().count() + sep)
            .sum()
    }
}

/// A loaded SQuAD-format file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SquadSet {
    /// The file it was loaded from.
    pub path: PathBuf,
    /// The articles, in file order.
    pub articles: Vec<SquadArticle>,
    /// Every question, in file order (article, paragraph, question).
    pub questions: Vec<SquadQuestion>,
}

impl SquadSet {
    /// Number of paragraphs over all articles.
    pub fn num_paragraphs(&self) -> usize {
        self.articles.iter().map(|a| a.paragraphs.len()).sum()
    }

    /// The article-level context of a question (all paragraphs of its article).
    pub fn article_context(&self, q: &SquadQuestion) -> &str {
        &self.articles[q.article].context
    }
}

/// Walks a parsed JSON document, naming the file and JSON path in errors.
struct Walker<'a> {
    path: &'a Path,
}

impl Walker<'_> {
    fn missing(&self, field: String) -> EvalError {
        EvalError::MissingField {
            path: self.path.to_path_buf(),
            field,
        }
    }

    fn bad(&self, field: String, msg: impl Into<String>) -> EvalError {
        EvalError::BadField {
            path: self.path.to_path_buf(),
            field,
            msg: msg.into(),
        }
    }

    fn get<'v>(&self, obj: &'v Value, at: &str, key: &str) -> Result<&'v Value> {
        let field = join(at, key);
        let map = obj
            .as_object()
            .ok_or_else(|| self.bad(at_or_root(at), "expected a JSON object"))?;
        map.get(key).ok_or_else(|| self.missing(field))
    }

    fn string(&self, obj: &Value, at: &str, key: &str) -> Result<String> {
        match self.get(obj, at, key)? {
            Value::String(s) => Ok(s.clone()),
            other => Err(self.bad(
                join(at, key),
                format!("expected a string, found {}", kind(other)),
            )),
        }
    }

    fn array<'v>(&self, obj: &'v Value, at: &str, key: &str) -> Result<&'v Vec<Value>> {
        match self.get(obj, at, key)? {
            Value::Array(a) => Ok(a),
            other => Err(self.bad(
                join(at, key),
                format!("expected an array, found {}", kind(other)),
            )),
        }
    }

    fn index(&self, obj: &Value, at: &str, key: &str) -> Result<usize> {
        let v = self.get(obj, at, key)?;
        v.as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| {
                self.bad(
                    join(at, key),
                    format!("expected a non-negative integer, found {v}"),
                )
            })
    }
}

fn join(at: &str, key: &str) -> String {
    if at.is_empty() {
        key.to_owned()
    } else {
        format!("{at}.{key}")
    }
}

fn at_or_root(at: &str) -> String {
    if at.is_empty() {
        "(root)".to_owned()
    } else {
        at.to_owned()
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Loads a SQuAD-format JSON file. Every error names the file and, for a
/// missing or malformed field, its JSON path (e.g.
/// `data[0].paragraphs[2].qas[5].question`). Question ids must be unique, and
/// every `answer_start` must lie within its paragraph (the text found there is
/// not checked: a few official answers are off by one).
pub fn load_squad(path: &Path) -> Result<SquadSet> {
    let bytes = std::fs::read(path).map_err(|source| EvalError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let doc: Value = serde_json::from_slice(&bytes).map_err(|source| EvalError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    parse_squad(path, &doc)
}

fn parse_squad(path: &Path, doc: &Value) -> Result<SquadSet> {
    let w = Walker { path };
    let mut articles = Vec::new();
    let mut questions = Vec::new();
    let mut seen = std::collections::HashMap::new();
    for (a, article) in w.array(doc, "", "data")?.iter().enumerate() {
        let at_a = format!("data[{a}]");
        let title = w.string(article, &at_a, "title")?;
        let mut paragraphs = Vec::new();
        for (p, para) in w.array(article, &at_a, "paragraphs")?.iter().enumerate() {
            let at_p = format!("{at_a}.paragraphs[{p}]");
            let context = w.string(para, &at_p, "context")?;
            let context_chars = context.chars().count();
            for (k, qa) in w.array(para, &at_p, "qas")?.iter().enumerate() {
                let at_q = format!("{at_p}.qas[{k}]");
                let id = w.string(qa, &at_q, "id")?;
                let question = w.string(qa, &at_q, "question")?;
                let mut answers = Vec::new();
                let mut answer_starts = Vec::new();
                for (j, ans) in w.array(qa, &at_q, "answers")?.iter().enumerate() {
                    let at_ans = format!("{at_q}.answers[{j}]");
                    let text = w.string(ans, &at_ans, "text")?;
                    let start = w.index(ans, &at_ans, "answer_start")?;
                    if start + text.chars().count() > context_chars {
                        return Err(w.bad(
                            join(&at_ans, "answer_start"),
                            format!(
                                "answer of {} characters at {start} runs past the end of \
                                 its paragraph ({context_chars} characters)",
                                text.chars().count()
                            ),
                        ));
                    }
                    answers.push(text);
                    answer_starts.push(start);
                }
                if let Some(first) = seen.insert(id.clone(), at_q.clone()) {
                    return Err(w.bad(
                        join(&at_q, "id"),
                        format!("duplicate question id {id:?} (first at {first})"),
                    ));
                }
                questions.push(SquadQuestion {
                    id,
                    question,
                    answers,
                    answer_starts,
                    context: context.clone(),
                    article: a,
                    paragraph: p,
                });
            }
            paragraphs.push(context);
        }
        let context = paragraphs.join(PARAGRAPH_SEPARATOR);
        articles.push(SquadArticle {
            title,
            paragraphs,
            context,
        });
    }
    Ok(SquadSet {
        path: path.to_path_buf(),
        articles,
        questions,
    })
}

/// SplitMix64 (Steele, Lea & Flood 2014): a tiny generator whose output for a
/// given seed is fixed forever, unlike `rand`'s `StdRng`, which may change
/// between releases.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..bound` (`bound > 0`) by Lemire's multiply-and-reject.
    fn below(&mut self, bound: u64) -> u64 {
        let threshold = bound.wrapping_neg() % bound;
        loop {
            let m = u128::from(self.next_u64()) * u128::from(bound);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }
}

/// A deterministic random subset of `n` questions (all of them when
/// `n >= all.len()`), in the order of a seeded Fisher–Yates shuffle. The result
/// depends only on `all`, `n` and `seed`, is the same on every platform and
/// release, and for one seed a smaller `n` gives a prefix of a larger one.
pub fn select_questions(all: &[SquadQuestion], n: usize, seed: u64) -> Vec<SquadQuestion> {
    let mut order: Vec<usize> = (0..all.len()).collect();
    let take = n.min(all.len());
    let mut rng = SplitMix64(seed);
    for i in 0..take {
        let j = i + rng.below((all.len() - i) as u64) as usize;
        order.swap(i, j);
    }
    order[..take].iter().map(|&i| all[i].clone()).collect()
}
