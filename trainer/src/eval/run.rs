//! The evaluation harness: SQuAD questions asked after a compressed context,
//! for every method x retention ratio, in batches. Each example is built by the
//! same example builder as training (prefix = BOS, span = the context, suffix =
//! question template + answer + EOS), so the prompt is the one the adaptor saw.
//! Metrics: generation EM/F1 (SQuAD normalisation), teacher-forced NLL of the
//! gold answer (first gold, EOS included) and KL(teacher || method) on it.

use super::answer_groups::{AnswerGroup, GroupSums, QuestionScore};
use super::kept_profile::{KeptProfile, ProfileSum, TokenClass};
use super::metrics::MetricSum;
use super::plot::{plot_f1_vs_ratio, Series};
use super::squad::{SquadQuestion, SquadSet};
use crate::distill::baselines::Baseline;
use crate::distill::examples::ModelTokenizer;
use crate::distill::infer::{
    adaptor_compress, compress_contexts, compress_contexts_forcing, forced_scores, generate_batch,
    keep_all, pad_rows, teacher_logprobs, BaselineScores, Method, SCORER_ONLY,
};
use crate::distill::phases::PhaseTimer;
use crate::distill::select::Span;
use crate::distill::student::{Compressed, Contexts};
use crate::distill::Adaptor;
use crate::error::{ModelError, Result};
use crate::model::{Input, KvCache, Model, StatesAfter};
use crate::tokenizer::Tokenizer;
use kvd_data::{BuilderConfig, ExampleBuilder, Location, QaTemplate, Record};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;
use tch::Tensor;

/// Which text is compressed before the question.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContextKind {
    /// The question's paragraph.
    Paragraph,
    /// The whole article (paragraphs joined), cut to the window.
    Article,
}

/// Harness settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalConfig {
    /// Questions evaluated (a seeded subset; all when larger than the set).
    pub questions: usize,
    /// Subset seed.
    pub seed: u64,
    /// Paragraph or article contexts.
    pub context: ContextKind,
    /// Retention ratios.
    pub ratios: Vec<f64>,
    /// Methods: `kv_distill` (needs an adaptor) and baseline names.
    pub methods: Vec<String>,
    /// Questions per batch.
    pub batch: usize,
    /// Longest generated answer.
    pub max_new_tokens: usize,
    /// Tokens per example at most (longer contexts keep their beginning).
    pub max_len: usize,
    /// The question/answer text around the suffix (must match training).
    pub template: QaTemplate,
    /// Stop after the batch that crosses this many seconds (rows then count
    /// the questions actually evaluated).
    #[serde(default)]
    pub time_limit_s: Option<f64>,
    /// Record every question's result per method and ratio in the report.
    #[serde(default)]
    pub per_item: bool,
    /// Fault injection for tests: a batch of more questions than this fails
    /// with an allocation failure (libtorch refuses a real allocation).
    #[serde(skip)]
    pub inject_oom_above: Option<usize>,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            questions: 1000,
            seed: 0,
            context: ContextKind::Paragraph,
            ratios: vec![1.0, 0.5, 0.25, 0.1, 0.05, 0.02],
            methods: vec![
                "kv_distill".into(),
                "random".into(),
                "streaming_llm".into(),
                "key_norm".into(),
                "h2o".into(),
                "snapkv".into(),
            ],
            batch: 32,
            max_new_tokens: 24,
            max_len: 2048,
            template: QaTemplate::default(),
            time_limit_s: None,
            per_item: false,
            inject_oom_above: None,
        }
    }
}

/// One method at one ratio.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRow {
    /// Method name (`full` is the uncompressed teacher).
    pub method: String,
    /// Retention ratio.
    pub ratio: f64,
    /// Questions.
    pub questions: usize,
    /// Exact match, percent.
    pub exact_match: f64,
    /// F1, percent.
    pub f1: f64,
    /// Standard error of the mean F1, percent points.
    #[serde(default)]
    pub f1_se: f64,
    /// Mean teacher-forced NLL of the gold answer (nats/token).
    pub answer_nll: f64,
    /// Mean KL(teacher || method) over the answer tokens.
    pub kl: f64,
    /// Cache entries kept / context entries (mean over questions).
    pub cache_fraction: f64,
    /// Containment accuracy, percent: a gold answer (SQuAD-normalised) is
    /// contained in the normalised generation (the KV-Distill paper's metric).
    #[serde(default)]
    pub contains: f64,
    /// Share of the gold answer's context tokens the method kept (mean over
    /// the questions whose answer could be located in the context).
    #[serde(default)]
    pub answer_kept: Option<f64>,
    /// Where the kept tokens fall: keep rates of the spans' digits,
    /// punctuation and words, and of each tenth of the span.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept_profile: Option<KeptProfile>,
    /// The questions whose answer could be located, grouped by how much of
    /// it was kept (none, part, all), with the uncompressed model's scores on
    /// the same questions (empty for `full`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub by_answer_kept: Vec<AnswerGroup>,
}

/// One question's result for one method and ratio.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemResult {
    /// Question id.
    pub id: String,
    /// Method.
    pub method: String,
    /// Retention ratio.
    pub ratio: f64,
    /// F1, percent.
    pub f1: f64,
    /// Containment (0 or 1).
    pub contains: bool,
    /// Teacher-forced NLL of the answer.
    pub answer_nll: f64,
    /// Share of the answer's context tokens kept.
    pub answer_kept: Option<f64>,
}

/// A finished evaluation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalReport {
    /// Settings.
    pub config: EvalConfig,
    /// The evaluation file.
    pub dataset: String,
    /// Model label.
    pub model: String,
    /// Adaptor label, if one was evaluated.
    pub adaptor: Option<String>,
    /// Rows: `full` first, then methods in order, ratios in order.
    pub rows: Vec<EvalRow>,
    /// Up to 3 example predictions per method at r = 0.1 (or the first ratio).
    pub samples: Vec<(String, String, String, Vec<String>)>,
    /// Per question results ([`EvalConfig::per_item`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub items: Vec<ItemResult>,
    /// The needle test's grid position of each item (empty for SQuAD).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub needle: Vec<super::needle::NeedleItem>,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Seconds per stage with phase timing on (`eval --phases`: the device
    /// synchronizes between stages): `eval prepare` (tokenising), `eval
    /// teacher` (the full cache and its scores), `eval compress` (the
    /// methods' selections and caches), `eval forced` (the answer's NLL and
    /// KL), `eval generate` (decoding the answers), `eval metrics`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub phases_s: BTreeMap<String, f64>,
}

/// Running sums of one row.
#[derive(Default, Clone)]
struct Acc {
    metric: MetricSum,
    nll: f64,
    kl: f64,
    fraction: f64,
    contains: f64,
    answer_kept: f64,
    answer_located: usize,
    /// Sum of squared per-question F1 (percent).
    f1_sq: f64,
    profile: ProfileSum,
    groups: GroupSums,
}

impl Acc {
    /// The row of these sums over `n` evaluated questions.
    fn row(&self, method: String, ratio: f64, n: usize) -> EvalRow {
        let k = self.metric.count as f64;
        let mean = self.metric.f1();
        EvalRow {
            method,
            ratio,
            questions: self.metric.count,
            exact_match: self.metric.exact_match(),
            f1: mean,
            answer_nll: self.nll / n.max(1) as f64,
            kl: self.kl / n.max(1) as f64,
            cache_fraction: self.fraction / n.max(1) as f64,
            contains: 100.0 * self.contains / k.max(1.0),
            f1_se: if k > 1.0 {
                ((self.f1_sq / k - mean * mean).max(0.0) * k / (k - 1.0) / k).sqrt()
            } else {
                0.0
            },
            answer_kept: (self.answer_located > 0)
                .then(|| self.answer_kept / self.answer_located as f64),
            kept_profile: self.profile.profile(),
            by_answer_kept: self.groups.groups(),
        }
    }
}

/// One batch's tokenised examples.
struct Prepared {
    ctx: Vec<Vec<u32>>,
    spans: Vec<Vec<Span>>,
    prompts: Vec<Vec<u32>>,
    suffixes: Vec<Vec<u32>>,
    scored: Vec<(usize, usize)>,
    /// Context positions of the first gold answer's tokens (empty when it
    /// could not be located, e.g. cut off by the window).
    answer_pos: Vec<Vec<usize>>,
    /// The class of each context token.
    classes: Vec<Vec<TokenClass>>,
}

fn prepare(
    builder: &ExampleBuilder,
    tok: &Tokenizer,
    set: &SquadSet,
    qs: &[SquadQuestion],
    kind: ContextKind,
) -> Result<Prepared> {
    let mut p = Prepared {
        ctx: Vec::new(),
        spans: Vec::new(),
        prompts: Vec::new(),
        suffixes: Vec::new(),
        scored: Vec::new(),
        answer_pos: Vec::new(),
        classes: Vec::new(),
    };
    for q in qs {
        let (context, offset) = match kind {
            ContextKind::Paragraph => (q.context.clone(), 0),
            ContextKind::Article => (
                set.article_context(q).to_string(),
                set.articles
                    .get(q.article)
                    .map_or(0, |a| a.paragraph_char_offset(q.paragraph)),
            ),
        };
        let answer_chars = match (q.answer_starts.first(), q.answers.first()) {
            (Some(&s), Some(a)) => Some((offset + s, offset + s + a.chars().count())),
            _ => None,
        };
        let located = answer_token_positions(tok, &context, answer_chars)?;
        let record = Record::Qa {
            context,
            question: q.question.clone(),
            answers: q.answers.clone(),
        };
        let loc = Location::file(format!("{} question {}", set.path.display(), q.id));
        let ex = builder.build(&record, 0, 0, &loc)?;
        let ctx_len = ex.prefix_len + ex.span_len;
        let (a_start, a_len) = ex
            .answer_span
            .ok_or_else(|| ModelError::Input(format!("question {} has no answer", q.id)))?;
        let classes = ex.tokens[..ctx_len]
            .iter()
            .map(|&id| Ok(TokenClass::of(&tok.decode(&[id], false)?)))
            .collect::<Result<Vec<_>>>()?;
        p.classes.push(classes);
        p.ctx.push(ex.tokens[..ctx_len].to_vec());
        p.spans.push(vec![(ex.prefix_len, ex.span_len)]);
        p.prompts.push(ex.tokens[ctx_len..a_start].to_vec());
        p.suffixes.push(ex.tokens[ctx_len..].to_vec());
        p.scored.push((a_start - ctx_len, a_len));
        // Token j of the context text is context position prefix_len + j;
        // positions cut off by the window are not in the context.
        p.answer_pos.push(
            located
                .into_iter()
                .map(|j| j + ex.prefix_len)
                .filter(|&j| j < ctx_len)
                .collect(),
        );
    }
    Ok(p)
}

/// The indices of the tokens of `context` (encoded alone) that overlap the
/// character range `answer`; empty when there is none.
fn answer_token_positions(
    tok: &Tokenizer,
    context: &str,
    answer: Option<(usize, usize)>,
) -> Result<Vec<usize>> {
    let Some((a, b)) = answer else {
        return Ok(Vec::new());
    };
    let (_, offsets) = tok
        .encode_with_offsets(context)
        .map_err(|e| ModelError::Input(e.to_string()))?;
    Ok(offsets
        .iter()
        .enumerate()
        .filter(|(_, &(s, e))| s < b && e > a)
        .map(|(j, _)| j)
        .collect())
}

/// The example builder of the evaluation: the training prompt, contexts cut
/// to `max_len` (and the model window), nothing dropped for being short.
fn eval_builder(
    tok: &Arc<Tokenizer>,
    model: &Model,
    max_len: usize,
    template: QaTemplate,
) -> Result<ExampleBuilder> {
    Ok(ExampleBuilder::new(
        Arc::new(ModelTokenizer(tok.clone())),
        BuilderConfig {
            max_len: max_len.min(model.config().max_position_embeddings),
            ratios: vec![1.0],
            min_span: 1,
            qa_template: template,
            ..BuilderConfig::default()
        },
    )?)
}

/// Runs every method x ratio over the selected questions. `progress(done,
/// total)` is called after each (batch, method, ratio) unit.
pub fn run_eval(
    model: &Model,
    tok: Arc<Tokenizer>,
    adaptor: Option<&Adaptor>,
    set: &SquadSet,
    cfg: &EvalConfig,
    mut progress: impl FnMut(usize, usize),
) -> Result<EvalReport> {
    if cfg.ratios.iter().any(|&r| !(r > 0.0 && r <= 1.0)) {
        return Err(ModelError::Input(format!(
            "retention ratios {:?}: each must lie in (0, 1]",
            cfg.ratios
        )));
    }
    if cfg.batch == 0 {
        return Err(ModelError::Input("batch must be positive".into()));
    }
    let methods = cfg
        .methods
        .iter()
        .map(|m| EvalMethod::parse(m, adaptor))
        .collect::<Result<Vec<_>>>()?;
    let start = Instant::now();
    let stop: Vec<u32> = tok
        .eos_token_id()
        .into_iter()
        .chain(tok.stop_token_ids().iter().copied())
        .collect();
    let builder = eval_builder(&tok, model, cfg.max_len, cfg.template.clone())?;
    let questions = super::squad::select_questions(&set.questions, cfg.questions, cfg.seed);
    let steps = 1 + methods.len() * cfg.ratios.len();
    let total = questions.len() * steps;
    let mut done = 0;
    let mut full = Acc::default();
    let mut accs = vec![vec![Acc::default(); cfg.ratios.len()]; methods.len()];
    let sample_r = cfg
        .ratios
        .iter()
        .position(|&r| (r - 0.1).abs() < 1e-9)
        .unwrap_or(0);
    let mut out = Outputs::default();
    let mut evaluated = 0;
    // Batches still to evaluate; one that runs out of device memory is put
    // back as two halves (its partial sums dropped), so a too-large --batch
    // costs time, not the run.
    let mut queue: VecDeque<&[SquadQuestion]> = questions.chunks(cfg.batch).collect();
    let runner = BatchRunner {
        model,
        tok: &tok,
        builder: &builder,
        set,
        cfg,
        stop: &stop,
        methods: &methods,
        sample_r,
    };
    while let Some(qs) = queue.pop_front() {
        if cfg
            .time_limit_s
            .is_some_and(|t| start.elapsed().as_secs_f64() > t)
        {
            tracing::warn!(evaluated, "time limit reached: stopping early");
            break;
        }
        let before = (full.clone(), accs.clone(), out.len(), done);
        let what = || {
            format!(
                "in an evaluation batch of {} questions of up to {} tokens",
                qs.len(),
                cfg.max_len
            )
        };
        let r = crate::error::catch_panic(what, || {
            let mut step = || {
                done += qs.len();
                progress(done, total);
            };
            let sums = BatchSums {
                full: &mut full,
                accs: &mut accs,
                out: &mut out,
            };
            runner.run(qs, sums, &mut step)
        });
        match r {
            Ok(()) => evaluated += qs.len(),
            Err(e) if e.is_out_of_memory() && qs.len() > 1 => {
                tracing::warn!(
                    questions = qs.len(),
                    "out of memory in an evaluation batch: evaluating it again in two halves"
                );
                (full, accs) = (before.0, before.1);
                out.truncate(before.2);
                done = before.3;
                let (a, b) = qs.split_at(qs.len() / 2);
                queue.push_front(b);
                queue.push_front(a);
            }
            Err(e) => {
                return Err(e.with_oom_context(what, "a smaller --batch or a shorter --max-len"))
            }
        }
    }
    let mut rows = vec![full.row("full".into(), 1.0, evaluated)];
    for (m, method) in methods.iter().enumerate() {
        for (ri, &r) in cfg.ratios.iter().enumerate() {
            rows.push(accs[m][ri].row(method.name(), r, evaluated));
        }
    }
    Ok(EvalReport {
        config: cfg.clone(),
        dataset: set.path.display().to_string(),
        model: String::new(),
        adaptor: None,
        rows,
        samples: out.samples,
        items: out.items,
        needle: Vec::new(),
        seconds: start.elapsed().as_secs_f64(),
        phases_s: crate::distill::phases::take()
            .into_iter()
            .filter(|(k, _)| k.starts_with("eval "))
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    })
}

/// Where one batch adds its results.
struct BatchSums<'a> {
    full: &'a mut Acc,
    accs: &'a mut [Vec<Acc>],
    out: &'a mut Outputs,
}

/// Evaluates one batch of questions: the teacher, then every method at
/// every ratio.
struct BatchRunner<'a> {
    model: &'a Model,
    tok: &'a Tokenizer,
    builder: &'a ExampleBuilder,
    set: &'a SquadSet,
    cfg: &'a EvalConfig,
    stop: &'a [u32],
    methods: &'a [EvalMethod<'a>],
    /// The ratio whose answers are kept as samples.
    sample_r: usize,
}

impl BatchRunner<'_> {
    /// Adds the batch `qs`'s results to `sums`, calling `step` after each
    /// (method, ratio) unit and the teacher's.
    fn run(&self, qs: &[SquadQuestion], sums: BatchSums, step: &mut dyn FnMut()) -> Result<()> {
        let (model, cfg) = (self.model, self.cfg);
        let device = model.device();
        if cfg.inject_oom_above.is_some_and(|n| qs.len() > n) {
            // 2^46 float32 elements (256 TiB): refused by any allocator.
            let _ = Tensor::f_empty([1i64 << 46], (tch::Kind::Float, device))?;
        }
        let mut timer = PhaseTimer::start(device);
        let p = prepare(self.builder, self.tok, self.set, qs, cfg.context)?;
        let (ids, len) = pad_rows(&p.ctx, model.config().vocab_size, device)?;
        timer.mark("eval prepare");
        let ones = vec![1.0; qs.len()];
        let all_kept = Contexts {
            ids: &ids,
            len: &len,
            spans: &p.spans,
            ratios: &ones,
        };
        // The teacher: the full cache, from the forward that also gives the
        // adaptor's scorer its states.
        let (full, features) = shared_pass(model, &ids, &len, self.methods)?;
        let teacher_comp = keep_all(&full, all_kept, device)?;
        // Kept for the methods that compress from it (a cache's memory
        // otherwise held through every method).
        let full = self.methods.iter().any(reads_full_cache).then_some(full);
        let teacher = teacher_logprobs(
            model,
            &mut teacher_comp.shallow_clone(),
            &p.suffixes,
            &p.scored,
        )?;
        timer.mark("eval teacher");
        let batch = BatchScorer {
            model,
            tok: self.tok,
            cfg,
            stop: self.stop,
            qs,
            len: &len,
            p: &p,
            teacher: &teacher,
        };
        let full_scores =
            batch.score(teacher_comp, sums.full, "full", 1.0, true, None, sums.out)?;
        step();
        timer.skip();
        for (m, method) in self.methods.iter().enumerate() {
            // A training-free method scores the contexts once for every ratio.
            let scored = match method {
                EvalMethod::Compress(Method::Baseline(b)) => Some((*b, None)),
                EvalMethod::Oracle(Method::Baseline(b)) => Some((*b, Some(&p.answer_pos[..]))),
                _ => None,
            }
            .map(|(b, force)| BaselineScores::new(model, b, all_kept, force, full.as_ref()))
            .transpose()?;
            for (ri, &r) in cfg.ratios.iter().enumerate() {
                let ratios = vec![r; qs.len()];
                let contexts = Contexts {
                    ids: &ids,
                    len: &len,
                    spans: &p.spans,
                    ratios: &ratios,
                };
                let comp = match (&scored, method, &features) {
                    (Some(s), _, _) => s.compress(device, contexts)?,
                    (None, EvalMethod::Compress(m), Some(f)) if m.adaptor().is_some() => {
                        adaptor_compress(model, *m, contexts, None, f, full.as_ref())?
                    }
                    (None, EvalMethod::Oracle(m), Some(f)) if m.adaptor().is_some() => {
                        adaptor_compress(
                            model,
                            *m,
                            contexts,
                            Some(&p.answer_pos),
                            f,
                            full.as_ref(),
                        )?
                    }
                    (None, EvalMethod::Compress(method), _) => {
                        compress_contexts(model, *method, contexts)?
                    }
                    (None, EvalMethod::Oracle(method), _) => {
                        compress_contexts_forcing(model, *method, contexts, Some(&p.answer_pos))?
                    }
                    (None, EvalMethod::QuestionAware(kernel), _) => {
                        question_aware(model, *kernel, contexts, &p.ctx, &p.prompts)?
                    }
                };
                timer.mark("eval compress");
                let name = method.name();
                batch.score(
                    comp,
                    &mut sums.accs[m][ri],
                    &name,
                    r,
                    ri == self.sample_r,
                    Some(&full_scores),
                    sums.out,
                )?;
                step();
                timer.skip();
            }
        }
        Ok(())
    }
}

/// One forward of the frozen model over a batch's contexts `ids` (lengths
/// `len`): its full cache and, when `methods` hold an adaptor's, the states
/// after the adaptor's scorer layer (what `kv_distill*` score from).
fn shared_pass(
    model: &Model,
    ids: &Tensor,
    len: &[usize],
    methods: &[EvalMethod],
) -> Result<(KvCache, Option<Tensor>)> {
    crate::distill::infer::check_window(model, len)?;
    let scorer_layer = methods
        .iter()
        .find_map(|m| match m {
            EvalMethod::Compress(x) | EvalMethod::Oracle(x) => x.adaptor(),
            EvalMethod::QuestionAware(_) => None,
        })
        .map(|a| a.config().scorer_layer);
    let watch = StatesAfter::new(scorer_layer.unwrap_or(0));
    let mut full = model.new_cache();
    tch::no_grad(|| model.fill_cache(Input::new(ids), &mut full, &watch))?;
    let features = match scorer_layer {
        Some(l) => Some(match watch.take() {
            Some(f) => f,
            // The last layer's output (a cache-filling pass skips it).
            None => tch::no_grad(|| model.layer_states(Input::new(ids), l))?,
        }),
        None => None,
    };
    Ok((full, features))
}

/// Whether `method` compresses from the frozen model's full cache when
/// handed it: the scorer-only selection and the training-free methods that
/// read no attention.
fn reads_full_cache(method: &EvalMethod) -> bool {
    match method {
        EvalMethod::Compress(m) | EvalMethod::Oracle(m) => match m {
            Method::ScorerOnly(_) => true,
            Method::Baseline(b) => !b.reads_attention(),
            _ => false,
        },
        EvalMethod::QuestionAware(_) => false,
    }
}

/// What an evaluation collects besides the sums: sample answers and, with
/// `per_item`, each question's result.
#[derive(Default)]
struct Outputs {
    samples: Vec<(String, String, String, Vec<String>)>,
    items: Vec<ItemResult>,
}

impl Outputs {
    /// How many samples and items it holds (to [`Outputs::truncate`] back to).
    fn len(&self) -> (usize, usize) {
        (self.samples.len(), self.items.len())
    }

    /// Drops what was added after [`Outputs::len`] returned `to`.
    fn truncate(&mut self, to: (usize, usize)) {
        self.samples.truncate(to.0);
        self.items.truncate(to.1);
    }
}

/// Scores compressed caches of one batch against its teacher: F1,
/// containment, the answer's NLL and KL, the share of its tokens kept.
struct BatchScorer<'a> {
    model: &'a Model,
    tok: &'a Tokenizer,
    cfg: &'a EvalConfig,
    stop: &'a [u32],
    qs: &'a [SquadQuestion],
    len: &'a [usize],
    p: &'a Prepared,
    teacher: &'a Tensor,
}

impl BatchScorer<'_> {
    /// Adds `comp`'s results to `acc` (and `out`), as method `name` at
    /// `ratio`, grouped by the answer's tokens kept against `full` (the
    /// uncompressed model's scores of these questions); returns each
    /// question's scores.
    #[allow(clippy::too_many_arguments)]
    fn score(
        &self,
        comp: Compressed,
        acc: &mut Acc,
        name: &str,
        ratio: f64,
        sample: bool,
        full: Option<&[QuestionScore]>,
        out: &mut Outputs,
    ) -> Result<Vec<QuestionScore>> {
        let (qs, p) = (self.qs, self.p);
        let mut timer = PhaseTimer::start(self.model.device());
        let mut gen = comp.shallow_clone();
        let mut forced = comp;
        let mut kept_share = Vec::with_capacity(qs.len());
        for (i, s) in forced.selections.iter().enumerate() {
            acc.fraction += s.kept.len() as f64 / self.len[i] as f64;
            acc.profile.add(&p.classes[i], &p.spans[i], &s.kept);
            let want = &p.answer_pos[i];
            kept_share.push((!want.is_empty()).then(|| {
                let hit = want
                    .iter()
                    .filter(|j| s.kept.binary_search(j).is_ok())
                    .count();
                hit as f64 / want.len() as f64
            }));
        }
        let f = forced_scores(
            self.model,
            &mut forced,
            &p.suffixes,
            &p.scored,
            Some(self.teacher),
        )?;
        timer.mark("eval forced");
        let outs = generate_batch(
            self.model,
            &mut gen,
            &p.prompts,
            self.cfg.max_new_tokens,
            self.stop,
        )?;
        timer.mark("eval generate");
        let mut scores = Vec::with_capacity(qs.len());
        for (i, (((q, generated), f), share)) in
            qs.iter().zip(outs).zip(f).zip(kept_share).enumerate()
        {
            let text = self.tok.decode(&generated, true)?;
            // The answer is the first non-empty line.
            let pred = text
                .trim_start()
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string();
            let (_, item_f1) = acc.metric.add_prediction(&pred, &q.answers);
            acc.f1_sq += (100.0 * item_f1).powi(2);
            let contains = contains_answer(&text, &q.answers);
            acc.contains += f64::from(u8::from(contains));
            if let Some(x) = share {
                acc.answer_kept += x;
                acc.answer_located += 1;
            }
            acc.nll += f.nll;
            acc.kl += f.kl;
            let own = QuestionScore {
                f1: 100.0 * item_f1,
                contains,
                nll: f.nll,
            };
            if let (Some(x), Some(full)) = (share, full) {
                acc.groups.add(x, own, full[i]);
            }
            scores.push(own);
            if self.cfg.per_item {
                out.items.push(ItemResult {
                    id: q.id.clone(),
                    method: name.to_string(),
                    ratio,
                    f1: 100.0 * item_f1,
                    contains,
                    answer_nll: f.nll,
                    answer_kept: share,
                });
            }
            if sample && out.samples.iter().filter(|s| s.0 == name).count() < 3 {
                out.samples.push((
                    name.to_string(),
                    q.question.clone(),
                    pred,
                    q.answers.clone(),
                ));
            }
        }
        timer.mark("eval metrics");
        Ok(scores)
    }
}

/// Whether a gold answer, SQuAD-normalised, is contained in the normalised
/// generation (the KV-Distill paper's SQuAD accuracy).
pub fn contains_answer<S: AsRef<str>>(generated: &str, golds: &[S]) -> bool {
    let text = format!(" {} ", super::metrics::normalize_answer(generated));
    golds.iter().any(|g| {
        let g = super::metrics::normalize_answer(g.as_ref());
        !g.is_empty() && text.contains(&format!(" {g} "))
    })
}

/// A method of the evaluation: a compressor of the context alone, or a
/// question-aware reference that sees the question.
#[derive(Debug, Clone, Copy)]
enum EvalMethod<'a> {
    Compress(Method<'a>),
    /// The method with the gold answer's context tokens always kept (a
    /// diagnosis: can the decoder read a fact that was kept?).
    Oracle(Method<'a>),
    /// SnapKV whose observation window is the question prompt, with this
    /// pooling kernel (an upper reference: it is not question-agnostic).
    QuestionAware(usize),
}

impl<'a> EvalMethod<'a> {
    /// The method `name` of `eval --methods` (`kv_distill*` need `adaptor`).
    fn parse(name: &str, adaptor: Option<&'a Adaptor>) -> Result<EvalMethod<'a>> {
        let needs = || ModelError::Input(format!("method {name} needs an adaptor"));
        if let Some(base) = name.strip_suffix(ORACLE_SUFFIX) {
            // Any compressor with the answer's tokens forced kept.
            return match EvalMethod::parse(base, adaptor)? {
                EvalMethod::Compress(m) => Ok(EvalMethod::Oracle(m)),
                _ => Err(ModelError::Input(format!(
                    "method {name}: {ORACLE_SUFFIX} applies to a compressor of the context, not {base}"
                ))),
            };
        }
        Ok(match (name, adaptor) {
            ("kv_distill", Some(a)) => EvalMethod::Compress(Method::kv_distill(a)),
            (SCORER_ONLY, Some(a)) => EvalMethod::Compress(Method::ScorerOnly(a)),
            (name, Some(a)) if name.starts_with(POOLED_PREFIX) => {
                let pool = name[POOLED_PREFIX.len()..].parse().map_err(|_| {
                    ModelError::Input(format!(
                        "method {name}: expected {POOLED_PREFIX}N (N: the pool's half-width)"
                    ))
                })?;
                EvalMethod::Compress(Method::KvDistill {
                    adaptor: a,
                    span_pool: Some(pool),
                })
            }
            (name, None) if name.starts_with("kv_distill") => return Err(needs()),
            (QUESTION_AWARE, _) => EvalMethod::QuestionAware(7),
            (name, _) => EvalMethod::Compress(Method::Baseline(Baseline::parse(name)?)),
        })
    }

    fn name(&self) -> String {
        match self {
            EvalMethod::Compress(m) => m.name(),
            EvalMethod::Oracle(m) => format!("{}{ORACLE_SUFFIX}", m.name()),
            EvalMethod::QuestionAware(_) => QUESTION_AWARE.into(),
        }
    }
}

/// Suffix of a method's name that forces the answer's tokens kept.
pub const ORACLE_SUFFIX: &str = "+answer";

/// `kv_distill_poolN`: KV-Distill ranking by the scores after a span-local
/// average pool of half-width N (whatever the adaptor was trained with).
pub const POOLED_PREFIX: &str = "kv_distill_pool";

/// The question-aware SnapKV reference's name in tables.
pub const QUESTION_AWARE: &str = "snapkv_question";

/// Compresses the contexts by the attention their prompts (question template
/// and question) pay to each span position, summed over layers, averaged
/// over heads and max-pooled like SnapKV.
fn question_aware(
    model: &Model,
    kernel: usize,
    ctx: Contexts,
    contexts: &[Vec<u32>],
    prompts: &[Vec<u32>],
) -> Result<Compressed> {
    let rows: Vec<Vec<u32>> = contexts
        .iter()
        .zip(prompts)
        .map(|(c, q)| [c.as_slice(), q.as_slice()].concat())
        .collect();
    let queries: Vec<(usize, usize)> = contexts
        .iter()
        .zip(prompts)
        .map(|(c, q)| (c.len(), q.len()))
        .collect();
    crate::distill::baselines::question_aware_compress(model, &rows, ctx, &queries, kernel)
}

/// The report as Markdown: one table per metric (methods x ratios).
pub fn markdown(report: &EvalReport) -> String {
    let mut out = String::new();
    let ratios = &report.config.ratios;
    let full = report.rows.iter().find(|r| r.method == "full");
    let _ = writeln!(
        out,
        "Model `{}`{}; {} questions of `{}` ({:?} contexts, seed {}); {:.0} s.\n",
        report.model,
        report
            .adaptor
            .as_ref()
            .map(|a| format!(", adaptor `{a}`"))
            .unwrap_or_default(),
        full.map_or(0, |f| f.questions),
        report.dataset,
        report.config.context,
        report.config.seed,
        report.seconds
    );
    if !report.phases_s.is_empty() {
        let mut stages: Vec<_> = report.phases_s.iter().collect();
        stages.sort_by(|a, b| b.1.total_cmp(a.1));
        let text: Vec<String> = stages
            .iter()
            .map(|(k, v)| format!("{} {v:.1}", k.trim_start_matches("eval ")))
            .collect();
        let _ = writeln!(
            out,
            "Seconds by stage (the device synchronized between them): {}.\n",
            text.join(", ")
        );
    }
    if let Some(f) = full {
        let _ = writeln!(
            out,
            "Uncompressed (full cache): EM {:.1}, F1 {:.1}, containment {:.1}, answer NLL {:.3}.\n",
            f.exact_match, f.f1, f.contains, f.answer_nll
        );
    }
    type Pick = fn(&EvalRow) -> String;
    let tables: [(&str, Pick); 8] = [
        ("F1 (%) ± standard error", |r| {
            format!("{:.1} ± {:.1}", r.f1, r.f1_se)
        }),
        ("Exact match (%)", |r| format!("{:.1}", r.exact_match)),
        (
            "Containment accuracy (%): the gold answer is contained in the generation",
            |r| format!("{:.1}", r.contains),
        ),
        ("Share of the answer's context tokens kept (%)", |r| {
            r.answer_kept
                .map_or("-".into(), |x| format!("{:.1}", 100.0 * x))
        }),
        (
            "Span tokens kept (%): digits / punctuation / words",
            |r| match &r.kept_profile {
                Some(k) => [k.digits, k.punctuation, k.words]
                    .map(|x| x.map_or("-".into(), |x| format!("{:.0}", 100.0 * x)))
                    .join(" / "),
                None => "-".into(),
            },
        ),
        (
            "Span tokens kept (%) by tenth of the span, first to last",
            |r| match &r.kept_profile {
                Some(k) => k
                    .by_tenth
                    .iter()
                    .map(|x| x.map_or("-".into(), |x| format!("{:.0}", 100.0 * x)))
                    .collect::<Vec<_>>()
                    .join(" "),
                None => "-".into(),
            },
        ),
        ("Teacher-forced answer NLL (nats/token)", |r| {
            format!("{:.3}", r.answer_nll)
        }),
        ("KL(teacher || method) on the answer", |r| {
            format!("{:.4}", r.kl)
        }),
    ];
    for (title, pick) in tables {
        let _ = writeln!(out, "**{title}**\n");
        let _ = write!(out, "| method |");
        for r in ratios {
            let _ = write!(out, " r = {r} |");
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "|---|{}", "---|".repeat(ratios.len()));
        let mut methods: Vec<&str> = Vec::new();
        for r in &report.rows {
            if r.method != "full" && !methods.contains(&r.method.as_str()) {
                methods.push(&r.method);
            }
        }
        for m in methods {
            let _ = write!(out, "| {m} |");
            for &ratio in ratios {
                let cell = report
                    .rows
                    .iter()
                    .find(|r| r.method == m && (r.ratio - ratio).abs() < 1e-12)
                    .map(pick)
                    .unwrap_or_default();
                let _ = write!(out, " {cell} |");
            }
            let _ = writeln!(out);
        }
        let _ = writeln!(out);
    }
    out.push_str(&super::answer_groups::markdown(&report.rows));
    if !report.samples.is_empty() {
        let _ = writeln!(out, "**Sample predictions**\n");
        let _ = writeln!(out, "| method | question | prediction | gold |");
        let _ = writeln!(out, "|---|---|---|---|");
        for (m, q, p, g) in &report.samples {
            let esc = |s: &str| s.replace('|', "\\|");
            let _ = writeln!(
                out,
                "| {m} | {} | {} | {} |",
                esc(q),
                esc(p),
                esc(&g.join(" / "))
            );
        }
    }
    out
}

/// Writes `results.json`, `results.md` and `f1_vs_ratio.png` into `dir`.
pub fn write_report(report: &EvalReport, dir: &Path) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ModelError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let json = serde_json::to_string_pretty(report)
        .map_err(|e| ModelError::Input(format!("cannot serialise the report: {e}")))?;
    let p = dir.join("results.json");
    std::fs::write(&p, json).map_err(io(&p))?;
    let p = dir.join("results.md");
    std::fs::write(&p, markdown(report)).map_err(io(&p))?;
    let mut series = Vec::new();
    for r in &report.rows {
        if r.method == "full" {
            continue;
        }
        match series.iter_mut().find(|s: &&mut Series| s.name == r.method) {
            Some(s) => s.points.push((r.ratio, r.f1)),
            None => series.push(Series {
                name: r.method.clone(),
                points: vec![(r.ratio, r.f1)],
            }),
        }
    }
    if let Some(f) = report.rows.iter().find(|r| r.method == "full") {
        let ratios = &report.config.ratios;
        series.push(Series {
            name: "uncompressed".into(),
            points: ratios.iter().map(|&r| (r, f.f1)).collect(),
        });
    }
    if !series.is_empty() {
        plot_f1_vs_ratio(
            &dir.join("f1_vs_ratio.png"),
            &format!(
                "SQuAD v1.1 dev: F1 vs. KV-cache retention ({})",
                report.model
            ),
            &series,
        )?;
    }
    Ok(())
}

/// What the distillation loss's gradient says about the scores of the
/// answer's context tokens ([`crate::distill::diagnose::score_gradients`]),
/// with those tokens forced into the kept set so that they receive one.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GradientReport {
    /// Questions whose answer was located in the context.
    pub questions: usize,
    /// Retention ratio.
    pub ratio: f64,
    /// Kept answer-token slots.
    pub answer_slots: usize,
    /// Their mean d loss / d score.
    pub answer_mean_grad: f64,
    /// Share of them whose gradient is positive: a descent step LOWERS their
    /// score, pushing them toward being dropped.
    pub answer_pushed_down: f64,
    /// The other kept span slots.
    pub other_slots: usize,
    /// Their mean d loss / d score.
    pub other_mean_grad: f64,
    /// Share of them pushed down.
    pub other_pushed_down: f64,
    /// Mean, over answer slots, of the slot's rank among its example's kept
    /// slots by gradient, as a fraction (0: raised the most, 1: lowered the
    /// most; 0.5 when the gradient ignores what the slot holds).
    pub answer_rank: f64,
}

/// Runs [`crate::distill::diagnose::score_gradients`] on `questions` of
/// `set` at retention `ratio` with the answer's tokens forced into the kept
/// set, and summarises the gradients at answer slots against the others.
pub fn gradient_report(
    model: &Model,
    tok: Arc<Tokenizer>,
    adaptor: &Adaptor,
    set: &SquadSet,
    questions: usize,
    ratio: f64,
    batch: usize,
) -> Result<GradientReport> {
    let builder = eval_builder(&tok, model, 2048, QaTemplate::default())?;
    let qs = super::squad::select_questions(&set.questions, questions, 0);
    let mut r = GradientReport {
        ratio,
        ..GradientReport::default()
    };
    let (mut ans_sum, mut ans_pos, mut oth_sum, mut oth_pos, mut rank_sum) =
        (0.0, 0usize, 0.0, 0usize, 0.0);
    for chunk in qs.chunks(batch.max(1)) {
        let p = prepare(&builder, &tok, set, chunk, ContextKind::Paragraph)?;
        let keep: Vec<usize> = (0..chunk.len())
            .filter(|&i| !p.answer_pos[i].is_empty())
            .collect();
        if keep.is_empty() {
            continue;
        }
        let examples: Vec<crate::distill::DistillExample> = keep
            .iter()
            .map(|&i| crate::distill::DistillExample {
                context: p.ctx[i].clone(),
                spans: p.spans[i].clone(),
                suffix: p.suffixes[i].clone(),
                ratio,
                answer: Some(p.scored[i]),
                context_answers: Vec::new(),
            })
            .collect();
        let force: Vec<Vec<usize>> = keep.iter().map(|&i| p.answer_pos[i].clone()).collect();
        let grads = crate::distill::diagnose::score_gradients(
            model,
            adaptor,
            adaptor.config(),
            &examples,
            &force,
        )?;
        for (g, want) in grads.iter().zip(&force) {
            r.questions += 1;
            let mut order: Vec<f64> = g.iter().map(|x| x.1).collect();
            order.sort_by(f64::total_cmp);
            for &(pos, v) in g {
                if want.contains(&pos) {
                    r.answer_slots += 1;
                    ans_sum += v;
                    ans_pos += usize::from(v > 0.0);
                    let below = order.partition_point(|&x| x < v);
                    rank_sum += below as f64 / (order.len().max(2) - 1) as f64;
                } else {
                    r.other_slots += 1;
                    oth_sum += v;
                    oth_pos += usize::from(v > 0.0);
                }
            }
        }
    }
    let div = |a: f64, n: usize| if n == 0 { f64::NAN } else { a / n as f64 };
    r.answer_mean_grad = div(ans_sum, r.answer_slots);
    r.answer_pushed_down = div(ans_pos as f64, r.answer_slots);
    r.other_mean_grad = div(oth_sum, r.other_slots);
    r.other_pushed_down = div(oth_pos as f64, r.other_slots);
    r.answer_rank = div(rank_sum, r.answer_slots);
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distill::DistillConfig;

    /// `METHOD+answer` is the oracle of every compressor, the adaptor's
    /// included, and names itself back; it refuses what is not one.
    #[test]
    fn every_compressor_has_its_answer_oracle() {
        let model = Model::tiny_random(2, 5);
        let adaptor = Adaptor::new(
            model.config(),
            DistillConfig {
                scorer_layer: 1,
                ..Default::default()
            },
            tch::Device::Cpu,
            3,
        )
        .unwrap();
        for name in [
            "random+answer",
            "kv_distill+answer",
            "kv_distill_select+answer",
            "kv_distill_pool2+answer",
        ] {
            let m = EvalMethod::parse(name, Some(&adaptor)).unwrap();
            assert!(matches!(m, EvalMethod::Oracle(_)), "{name}: {m:?}");
            assert_eq!(m.name(), name);
        }
        for name in ["snapkv_question+answer", "full+answer+answer"] {
            assert!(EvalMethod::parse(name, Some(&adaptor)).is_err(), "{name}");
        }
        let err = EvalMethod::parse("kv_distill_select+answer", None).unwrap_err();
        assert!(err.to_string().contains("needs an adaptor"), "{err}");
    }
}
