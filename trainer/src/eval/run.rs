//! The evaluation harness: SQuAD questions asked after a compressed context,
//! for every method x retention ratio, in batches. Each example is built by the
//! same example builder as training (prefix = BOS, span = the context, suffix =
//! question template + answer + EOS), so the prompt is the one the adaptor saw.
//! Metrics: generation EM/F1 (SQuAD normalisation), teacher-forced NLL of the
//! gold answer (first gold, EOS included) and KL(teacher || method) on it.

use super::metrics::MetricSum;
use super::plot::{plot_f1_vs_ratio, Series};
use super::squad::{SquadQuestion, SquadSet};
use crate::distill::baselines::Baseline;
use crate::distill::examples::ModelTokenizer;
use crate::distill::infer::{
    compress_contexts, forced_scores, generate_batch, pad_rows, teacher_logprobs, Method,
};
use crate::distill::select::Span;
use crate::distill::student::{Compressed, Contexts};
use crate::distill::Adaptor;
use crate::error::{ModelError, Result};
use crate::model::Model;
use crate::tokenizer::Tokenizer;
use kvd_data::{BuilderConfig, ExampleBuilder, Location, QaTemplate, Record};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

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
    /// Mean teacher-forced NLL of the gold answer (nats/token).
    pub answer_nll: f64,
    /// Mean KL(teacher || method) over the answer tokens.
    pub kl: f64,
    /// Cache entries kept / context entries (mean over questions).
    pub cache_fraction: f64,
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
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// Running sums of one row.
#[derive(Default, Clone)]
struct Acc {
    metric: MetricSum,
    nll: f64,
    kl: f64,
    fraction: f64,
}

/// One batch's tokenised examples.
struct Prepared {
    ctx: Vec<Vec<u32>>,
    spans: Vec<Vec<Span>>,
    prompts: Vec<Vec<u32>>,
    suffixes: Vec<Vec<u32>>,
    scored: Vec<(usize, usize)>,
}

fn prepare(
    builder: &ExampleBuilder,
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
    };
    for q in qs {
        let context = match kind {
            ContextKind::Paragraph => q.context.clone(),
            ContextKind::Article => set.article_context(q).to_string(),
        };
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
        p.ctx.push(ex.tokens[..ctx_len].to_vec());
        p.spans.push(vec![(ex.prefix_len, ex.span_len)]);
        p.prompts.push(ex.tokens[ctx_len..a_start].to_vec());
        p.suffixes.push(ex.tokens[ctx_len..].to_vec());
        p.scored.push((a_start - ctx_len, a_len));
    }
    Ok(p)
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
    let methods: Vec<Method> = cfg
        .methods
        .iter()
        .map(|m| match (m.as_str(), adaptor) {
            ("kv_distill", Some(a)) => Ok(Method::KvDistill(a)),
            ("kv_distill", None) => Err(ModelError::Input(
                "method kv_distill needs an adaptor".into(),
            )),
            (name, _) => Ok(Method::Baseline(Baseline::parse(name)?)),
        })
        .collect::<Result<_>>()?;
    let start = Instant::now();
    let stop: Vec<u32> = tok
        .eos_token_id()
        .into_iter()
        .chain(tok.stop_token_ids().iter().copied())
        .collect();
    let builder = ExampleBuilder::new(
        Arc::new(ModelTokenizer(tok.clone())),
        BuilderConfig {
            max_len: cfg.max_len.min(model.config().max_position_embeddings),
            ratios: vec![1.0],
            min_span: 1,
            qa_template: cfg.template.clone(),
            ..BuilderConfig::default()
        },
    )?;
    let questions = super::squad::select_questions(&set.questions, cfg.questions, cfg.seed);
    let batches: Vec<&[SquadQuestion]> = questions.chunks(cfg.batch).collect();
    let total = batches.len() * (1 + methods.len() * cfg.ratios.len());
    let mut done = 0;
    let mut full = Acc::default();
    let mut accs = vec![vec![Acc::default(); cfg.ratios.len()]; methods.len()];
    let sample_r = cfg
        .ratios
        .iter()
        .position(|&r| (r - 0.1).abs() < 1e-9)
        .unwrap_or(0);
    let mut samples: Vec<(String, String, String, Vec<String>)> = Vec::new();
    let device = model.device();
    let mut evaluated = 0;
    for qs in batches {
        if cfg
            .time_limit_s
            .is_some_and(|t| start.elapsed().as_secs_f64() > t)
        {
            tracing::warn!(evaluated, "time limit reached: stopping early");
            break;
        }
        evaluated += qs.len();
        let p = prepare(&builder, set, qs, cfg.context)?;
        let (ids, len) = pad_rows(&p.ctx, model.config().vocab_size, device)?;
        let ones = vec![1.0; qs.len()];
        // The teacher: the full cache.
        let teacher_comp = compress_contexts(
            model,
            Method::Full,
            Contexts {
                ids: &ids,
                len: &len,
                spans: &p.spans,
                ratios: &ones,
            },
        )?;
        let teacher = teacher_logprobs(
            model,
            &mut teacher_comp.shallow_clone(),
            &p.suffixes,
            &p.scored,
        )?;
        let mut score = |comp: Compressed, acc: &mut Acc, name: &str, sample: bool| -> Result<()> {
            let mut gen = comp.shallow_clone();
            let mut forced = comp;
            for (i, s) in forced.selections.iter().enumerate() {
                acc.fraction += s.kept.len() as f64 / len[i] as f64;
            }
            let f = forced_scores(model, &mut forced, &p.suffixes, &p.scored, Some(&teacher))?;
            let outs = generate_batch(model, &mut gen, &p.prompts, cfg.max_new_tokens, &stop)?;
            for ((q, out), f) in qs.iter().zip(outs).zip(f) {
                let text = tok.decode(&out, true)?;
                // The answer is the first non-empty line.
                let pred = text
                    .trim_start()
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_string();
                acc.metric.add_prediction(&pred, &q.answers);
                acc.nll += f.nll;
                acc.kl += f.kl;
                if sample && samples.iter().filter(|s| s.0 == name).count() < 3 {
                    samples.push((
                        name.to_string(),
                        q.question.clone(),
                        pred,
                        q.answers.clone(),
                    ));
                }
            }
            Ok(())
        };
        score(teacher_comp, &mut full, "full", true)?;
        done += 1;
        progress(done, total);
        for (m, method) in methods.iter().enumerate() {
            for (ri, &r) in cfg.ratios.iter().enumerate() {
                let ratios = vec![r; qs.len()];
                let comp = compress_contexts(
                    model,
                    *method,
                    Contexts {
                        ids: &ids,
                        len: &len,
                        spans: &p.spans,
                        ratios: &ratios,
                    },
                )?;
                score(comp, &mut accs[m][ri], &method.name(), ri == sample_r)?;
                done += 1;
                progress(done, total);
            }
        }
    }
    let n = evaluated;
    let row = |method: String, ratio: f64, a: &Acc| EvalRow {
        method,
        ratio,
        questions: a.metric.count,
        exact_match: a.metric.exact_match(),
        f1: a.metric.f1(),
        answer_nll: a.nll / n.max(1) as f64,
        kl: a.kl / n.max(1) as f64,
        cache_fraction: a.fraction / n.max(1) as f64,
    };
    let mut rows = vec![row("full".into(), 1.0, &full)];
    for (m, method) in methods.iter().enumerate() {
        for (ri, &r) in cfg.ratios.iter().enumerate() {
            rows.push(row(method.name(), r, &accs[m][ri]));
        }
    }
    Ok(EvalReport {
        config: cfg.clone(),
        dataset: set.path.display().to_string(),
        model: String::new(),
        adaptor: None,
        rows,
        samples,
        seconds: start.elapsed().as_secs_f64(),
    })
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
    if let Some(f) = full {
        let _ = writeln!(
            out,
            "Uncompressed (full cache): EM {:.1}, F1 {:.1}, answer NLL {:.3}.\n",
            f.exact_match, f.f1, f.answer_nll
        );
    }
    type Pick = fn(&EvalRow) -> String;
    let tables: [(&str, Pick); 4] = [
        ("F1 (%)", |r| format!("{:.1}", r.f1)),
        ("Exact match (%)", |r| format!("{:.1}", r.exact_match)),
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
