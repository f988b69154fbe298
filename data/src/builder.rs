//! The example builder: tokenises records (in parallel, a batch at a time),
//! cuts them to the model window, chooses prefix/span/suffix and draws the
//! per-example retention ratio from a seeded RNG. Bad rows are errors or
//! counted, logged skips according to [`BadInputPolicy`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::error::{BadInputKind, DataError, Location, Result};
use crate::schema::Record;
use crate::shard::SplitMix64;
use crate::tokenize::TextTokenizer;

/// What to do with a bad row (empty, not UTF-8, too long, no room).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BadInputPolicy {
    /// Stop with an error naming file, row and column (the default).
    #[default]
    Error,
    /// Skip the row, log it and count it in [`SkipStats`].
    Skip,
}

/// The text placed around question and answer in a QA example's suffix.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QaTemplate {
    /// Before the question (after the context).
    pub question_prefix: String,
    /// Between question and answer.
    pub answer_prefix: String,
}

impl Default for QaTemplate {
    fn default() -> Self {
        Self {
            question_prefix: "\n\nQuestion: ".into(),
            answer_prefix: "\nAnswer: ".into(),
        }
    }
}

/// Example-builder settings.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct BuilderConfig {
    /// The model window: tokens per example at most.
    pub max_len: usize,
    /// Retention ratios; each example draws one uniformly.
    pub ratios: Vec<f32>,
    /// Text rows: suffix (continuation) tokens.
    pub text_suffix_len: usize,
    /// Text rows: prefix tokens kept uncompressed, drawn in `0..=text_prefix_max`
    /// (after BOS).
    pub text_prefix_max: usize,
    /// The shortest span accepted; shorter is [`BadInputKind::NoRoomForSpan`].
    pub min_span: usize,
    /// Rows with more text bytes are [`BadInputKind::TooLong`].
    pub max_document_bytes: usize,
    /// The QA suffix text.
    pub qa_template: QaTemplate,
    /// Bad-row handling.
    pub policy: BadInputPolicy,
    /// Tokenizer threads (>= 1).
    pub threads: usize,
}

impl Default for BuilderConfig {
    fn default() -> Self {
        Self {
            max_len: 2048,
            ratios: vec![0.02, 0.05, 0.1, 0.25, 0.5],
            text_suffix_len: 128,
            text_prefix_max: 0,
            min_span: 16,
            max_document_bytes: 4 << 20,
            qa_template: QaTemplate::default(),
            policy: BadInputPolicy::Error,
            threads: 1,
        }
    }
}

/// One training example: `tokens` = prefix ++ span ++ suffix.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// The row's stable id (its global index in the manifest).
    pub id: u64,
    /// Token ids.
    pub tokens: Vec<u32>,
    /// Tokens before the span (BOS and any uncompressed prefix).
    pub prefix_len: usize,
    /// Tokens of the compressed span.
    pub span_len: usize,
    /// Tokens after the span (question + answer, or the continuation).
    pub suffix_len: usize,
    /// The retention ratio drawn for this example.
    pub ratio: f32,
    /// Answer tokens (start, length) in `tokens`, for QA rows (EOS included).
    pub answer_span: Option<(usize, usize)>,
    /// Where the answer's text occurs in the span (start, length in
    /// `tokens`; every occurrence of every listed answer whose tokens appear
    /// there as they are), for QA rows: what a question asks about, a target
    /// for the scorer (`train --select-answer-weight`). Empty for text rows
    /// and answers not found.
    pub context_answers: Vec<(usize, usize)>,
}

/// The answers a multi-question row's `question` holds (see
/// [`crate::multiqa`]: `q1 <answer prefix> a1 <question prefix> q2 ...`): the
/// text after the template's answer prefix in every part but the last. None
/// for an ordinary question.
pub fn earlier_answers(question: &str, template: &QaTemplate) -> Vec<String> {
    if template.question_prefix.is_empty() || template.answer_prefix.is_empty() {
        return Vec::new();
    }
    let parts: Vec<&str> = question.split(template.question_prefix.as_str()).collect();
    let Some((_, earlier)) = parts.split_last() else {
        return Vec::new();
    };
    earlier
        .iter()
        .filter_map(|p| p.rsplit_once(template.answer_prefix.as_str()))
        .map(|(_, a)| a.trim().to_string())
        .filter(|a| !a.is_empty())
        .collect()
}

/// Every occurrence of each answer's tokens in `ctx` (with and without a
/// leading space, as a word inside the text or at its start is tokenised),
/// as (start, length) offset by `offset`, sorted and without repeats.
fn answer_occurrences(
    tok: &dyn TextTokenizer,
    ctx: &[u32],
    answers: &[String],
    offset: usize,
) -> Result<Vec<(usize, usize)>> {
    let mut found = Vec::new();
    for a in answers.iter().map(|a| a.trim()).filter(|a| !a.is_empty()) {
        for text in [format!(" {a}"), a.to_string()] {
            let needle = tok.encode(&text)?;
            if needle.is_empty() || needle.len() > ctx.len() {
                continue;
            }
            for (i, w) in ctx.windows(needle.len()).enumerate() {
                if w == needle.as_slice() {
                    found.push((offset + i, needle.len()));
                }
            }
        }
    }
    found.sort_unstable();
    found.dedup();
    Ok(found)
}

/// Counts of skipped rows by kind, shared by the pipeline and the run summary.
#[derive(Debug, Default, Clone)]
pub struct SkipStats(Arc<Mutex<BTreeMap<BadInputKind, u64>>>);

impl SkipStats {
    /// Counts one skip.
    pub fn add(&self, kind: BadInputKind) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry(kind).or_default() += 1;
    }

    /// Skips by kind.
    pub fn counts(&self) -> BTreeMap<BadInputKind, u64> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// All skips.
    pub fn total(&self) -> u64 {
        self.counts().values().sum()
    }

    /// A one-line summary, e.g. `skipped 3 rows (empty 2, too long 1)`.
    pub fn summary(&self) -> String {
        let c = self.counts();
        let parts: Vec<String> = c.iter().map(|(k, v)| format!("{k} {v}")).collect();
        format!(
            "skipped {} rows ({})",
            c.values().sum::<u64>(),
            if parts.is_empty() {
                "none".into()
            } else {
                parts.join(", ")
            }
        )
    }
}

/// Turns records into [`Example`]s.
pub struct ExampleBuilder {
    tok: Arc<dyn TextTokenizer>,
    cfg: BuilderConfig,
    stats: SkipStats,
}

/// One input to [`ExampleBuilder::build_many`].
#[derive(Debug)]
pub struct BuildItem {
    /// The row id.
    pub id: u64,
    /// Seed for this draw ([`crate::ExampleId::seed`]).
    pub seed: u64,
    /// The record, or the row's read error.
    pub record: Result<Record>,
    /// Where the row is (for messages).
    pub location: Location,
}

impl ExampleBuilder {
    /// A builder; errors on an invalid configuration.
    pub fn new(tok: Arc<dyn TextTokenizer>, cfg: BuilderConfig) -> Result<Self> {
        if cfg.ratios.is_empty() || cfg.ratios.iter().any(|r| !(*r > 0.0 && *r <= 1.0)) {
            return Err(DataError::Config(format!(
                "ratios must be a non-empty set in (0, 1], got {:?}",
                cfg.ratios
            )));
        }
        if cfg.max_len < 4 || cfg.min_span == 0 {
            return Err(DataError::Config(
                "max_len must be >= 4 and min_span >= 1".into(),
            ));
        }
        if cfg.text_suffix_len + cfg.text_prefix_max + cfg.min_span + 1 > cfg.max_len {
            return Err(DataError::Config(format!(
                "text_suffix_len {} + text_prefix_max {} + min_span {} + BOS exceed max_len {}",
                cfg.text_suffix_len, cfg.text_prefix_max, cfg.min_span, cfg.max_len
            )));
        }
        Ok(Self {
            tok,
            cfg,
            stats: SkipStats::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &BuilderConfig {
        &self.cfg
    }

    /// The skip counters.
    pub fn stats(&self) -> &SkipStats {
        &self.stats
    }

    fn bad(loc: &Location, column: Option<&str>, kind: BadInputKind, detail: String) -> DataError {
        let mut location = loc.clone();
        if let Some(c) = column {
            location.column = Some(c.to_string());
        }
        DataError::BadRow {
            location,
            kind,
            detail,
        }
    }

    /// Builds one example. `seed` drives the ratio and window choices.
    pub fn build(&self, record: &Record, id: u64, seed: u64, loc: &Location) -> Result<Example> {
        let bytes = record.text_bytes();
        if bytes > self.cfg.max_document_bytes {
            return Err(Self::bad(
                loc,
                None,
                BadInputKind::TooLong,
                format!(
                    "{bytes} bytes of text, limit max_document_bytes = {}",
                    self.cfg.max_document_bytes
                ),
            ));
        }
        let mut rng = SplitMix64::new(seed);
        let ratio = self.cfg.ratios[rng.below(self.cfg.ratios.len() as u64) as usize];
        let bos: Vec<u32> = self.tok.bos_id().into_iter().collect();
        let max = self.cfg.max_len;
        match record {
            Record::Text { text } => {
                let doc = self.tok.encode(text)?;
                let room = max - bos.len();
                let need = self.cfg.text_suffix_len + self.cfg.min_span;
                if doc.len() < need {
                    return Err(Self::bad(
                        loc,
                        None,
                        BadInputKind::NoRoomForSpan,
                        format!(
                            "{} tokens, fewer than min_span {} + text_suffix_len {}",
                            doc.len(),
                            self.cfg.min_span,
                            self.cfg.text_suffix_len
                        ),
                    ));
                }
                // A window of the document, at a random start if it is longer.
                let start = if doc.len() > room {
                    rng.below((doc.len() - room + 1) as u64) as usize
                } else {
                    0
                };
                let window = &doc[start..(start + room).min(doc.len())];
                let suffix_len = self.cfg.text_suffix_len;
                let max_prefix = self
                    .cfg
                    .text_prefix_max
                    .min(window.len() - suffix_len - self.cfg.min_span);
                let extra_prefix = rng.below(max_prefix as u64 + 1) as usize;
                let mut tokens = bos.clone();
                tokens.extend_from_slice(window);
                let prefix_len = bos.len() + extra_prefix;
                Ok(Example {
                    id,
                    span_len: tokens.len() - prefix_len - suffix_len,
                    tokens,
                    prefix_len,
                    suffix_len,
                    ratio,
                    answer_span: None,
                    context_answers: Vec::new(),
                })
            }
            Record::Qa {
                context,
                question,
                answers,
            } => {
                let t = &self.cfg.qa_template;
                let q = self.tok.encode(&format!(
                    "{}{}{}",
                    t.question_prefix, question, t.answer_prefix
                ))?;
                let first = answers.first().map(String::as_str).unwrap_or_default();
                let mut a = self.tok.encode(first)?;
                a.extend(self.tok.eos_id());
                let suffix_len = q.len() + a.len();
                if bos.len() + suffix_len + self.cfg.min_span > max {
                    return Err(Self::bad(
                        loc,
                        Some("question"),
                        BadInputKind::NoRoomForSpan,
                        format!("question + answer take {suffix_len} tokens of max_len {max}"),
                    ));
                }
                let mut ctx = self.tok.encode(context)?;
                if ctx.len() < self.cfg.min_span {
                    return Err(Self::bad(
                        loc,
                        Some("context"),
                        BadInputKind::NoRoomForSpan,
                        format!(
                            "context has {} tokens, min_span {}",
                            ctx.len(),
                            self.cfg.min_span
                        ),
                    ));
                }
                // Keep the beginning of an over-long context.
                ctx.truncate(max - bos.len() - suffix_len);
                // A multi-question row (`train/multiqa`) asks about its
                // earlier answers too: locate them as well.
                let mut asked = answers.to_vec();
                asked.extend(earlier_answers(question, t));
                let context_answers =
                    answer_occurrences(self.tok.as_ref(), &ctx, &asked, bos.len())?;
                let mut tokens = bos.clone();
                tokens.extend_from_slice(&ctx);
                tokens.extend_from_slice(&q);
                let answer_start = tokens.len();
                tokens.extend_from_slice(&a);
                Ok(Example {
                    id,
                    prefix_len: bos.len(),
                    span_len: ctx.len(),
                    suffix_len,
                    ratio,
                    answer_span: Some((answer_start, a.len())),
                    context_answers,
                    tokens,
                })
            }
        }
    }

    /// Builds one item without the bad-row policy: a bad row is an error.
    fn try_build(&self, item: &BuildItem) -> Result<Example> {
        match &item.record {
            Ok(r) => self.build(r, item.id, item.seed, &item.location),
            Err(DataError::BadRow {
                location,
                kind,
                detail,
            }) => Err(DataError::BadRow {
                location: location.clone(),
                kind: *kind,
                detail: detail.clone(),
            }),
            Err(e) => Err(DataError::Config(e.to_string())),
        }
    }

    /// Applies the bad-row policy to a built result: `Ok(None)` is a counted,
    /// logged skip; any other error stays an error.
    pub fn keep(&self, built: Result<Example>) -> Result<Option<Example>> {
        match built {
            Ok(ex) => Ok(Some(ex)),
            Err(DataError::BadRow {
                location,
                kind,
                detail,
            }) if self.cfg.policy == BadInputPolicy::Skip => {
                tracing::warn!(%location, %kind, %detail, "skipping bad row");
                self.stats.add(kind);
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Builds many items on `threads` threads without the bad-row policy
    /// (nothing counted or logged), one result per item in input order.
    pub fn try_build_many(&self, items: &[BuildItem]) -> Vec<Result<Example>> {
        let threads = self.cfg.threads.max(1).min(items.len().max(1));
        if threads == 1 {
            return items.iter().map(|i| self.try_build(i)).collect();
        }
        let chunk = items.len().div_ceil(threads);
        std::thread::scope(|s| {
            let handles: Vec<_> = items
                .chunks(chunk)
                .map(|c| {
                    (
                        c.len(),
                        s.spawn(move || c.iter().map(|i| self.try_build(i)).collect::<Vec<_>>()),
                    )
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|(n, h)| match h.join() {
                    Ok(v) => v,
                    Err(_) => (0..n)
                        .map(|_| Err(DataError::Tokenizer("tokenizer thread panicked".into())))
                        .collect(),
                })
                .collect()
        })
    }

    /// Builds many examples on `threads` threads, keeping input order;
    /// skipped rows are left out (and counted).
    pub fn build_many(&self, items: &[BuildItem]) -> Result<Vec<Example>> {
        let mut out = Vec::with_capacity(items.len());
        for built in self.try_build_many(items) {
            if let Some(e) = self.keep(built)? {
                out.push(e);
            }
        }
        Ok(out)
    }
}
