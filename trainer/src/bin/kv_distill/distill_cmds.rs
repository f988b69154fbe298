//! `train`, `compress` and the cache side of `generate`.

use super::{load, ModelArgs};
use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use kvd_data::{BadInputPolicy, BuilderConfig, DatasetOptions, StoreOptions};
use kvd_trainer::chaos::Chaos;
use kvd_trainer::distill::cache_file::{CacheMeta, CompressedCache};
use kvd_trainer::distill::checkpoint::{config_hash, load as load_adaptor};
use kvd_trainer::distill::infer::{compress_contexts, Method};
use kvd_trainer::distill::student::Contexts;
use kvd_trainer::distill::{Adaptor, DistillConfig, LoraConfig, ScoreFeed, TrainConfig};
use kvd_trainer::model::{Model, Proj};
use kvd_trainer::train_loop::{train, DataMix, LocalCheckpoints, TrainJob};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Object-store settings shared by commands that read datasets.
#[derive(Args, Debug, Clone)]
pub(crate) struct StoreArgs {
    /// Object-store option KEY=VALUE (e.g. endpoint=http://host:9000,
    /// allow_http=true, region=us-east-1); repeatable. Unset keys come from the
    /// standard AWS_*/GOOGLE_*/AZURE_* environment.
    #[arg(long = "store-opt", value_name = "KEY=VALUE")]
    pub store: Vec<String>,
    /// Skip checking each data file's size and etag against the manifest (for
    /// datasets copied to another file system, where local etags change).
    #[arg(long)]
    pub no_verify_data: bool,
}

impl StoreArgs {
    /// Dataset options with these store settings.
    pub(crate) fn dataset_options(&self) -> Result<DatasetOptions> {
        let mut store = StoreOptions::default();
        for kv in &self.store {
            let (k, v) = kv
                .split_once('=')
                .with_context(|| format!("--store-opt `{kv}` is not KEY=VALUE"))?;
            store = store.with(k, v);
        }
        Ok(DatasetOptions {
            store,
            verify: !self.no_verify_data,
            ..DatasetOptions::default()
        })
    }
}

/// The method's flags (what `train` and `worker` train; `bench-step
/// --method train` times the defaults).
#[derive(Args, Debug, Clone)]
pub(crate) struct MethodArgs {
    /// The scorer reads the state after this many layers.
    #[arg(long, default_value_t = 6)]
    scorer_layer: usize,
    /// What the scorer reads of that state: rms (each token's state over its
    /// root mean square, so scores do not grow with the residual stream, as
    /// Gemma 3's does) or raw (adaptors trained before --scorer-input).
    #[arg(long, default_value = "rms", value_parser = ["rms", "raw"])]
    scorer_input: String,
    /// LoRA target projections.
    #[arg(long, value_delimiter = ',', default_value = "q,k,v,o")]
    lora_targets: Vec<String>,
    /// LoRA rank.
    #[arg(long, default_value_t = 16)]
    lora_rank: i64,
    /// LoRA alpha.
    #[arg(long, default_value_t = 16.0)]
    lora_alpha: f64,
    /// Weight of forward KL (reverse KL gets 1 - this).
    #[arg(long, default_value_t = 0.6)]
    kl_forward_weight: f64,
    /// Loss on answer tokens only (QA rows).
    #[arg(long)]
    answer_only: bool,
    /// LoRA scaling: rs (rank-stabilised, alpha / sqrt(rank)) or standard
    /// (alpha / rank).
    #[arg(long, default_value = "rs")]
    lora_scaling: String,
    /// Where the K and V adaptors act: all (every context position; Q/O only
    /// at kept ones) or kept (every adaptor only at kept positions).
    #[arg(long, default_value = "all")]
    lora_kv_positions: String,
    /// How the kept tokens' scores enter the decoder's attention:
    /// log_sigmoid (the paper's σ(s) weighting), straight_through or direct.
    #[arg(long, default_value = "log_sigmoid")]
    score_feed: String,
    /// The first N positions of each span are always kept (attention sinks).
    #[arg(long, default_value_t = 4)]
    sinks: usize,
    /// Weight of the selection loss: the scorer learns to predict the
    /// teacher's attention from the suffix onto every span position (0: off,
    /// the straight-through signal alone). 16 measured best on the needle and
    /// SQuAD (docs/RESULTS.md).
    #[arg(long, default_value_t = 16.0)]
    select_weight: f64,
    /// Add the answer's location to the selection loss's target, with this
    /// weight against the teacher's attention (QA rows and synthetic facts
    /// whose answer text occurs in the context): the scorer learns what
    /// questions ask about. Needs --select-weight above 0. Default: 4 (measured
    /// best on the needle and SQuAD), 0 (off) when --select-weight is 0.
    #[arg(long)]
    select_answer_weight: Option<f64>,
    /// When the adaptor compresses (eval, compress, generate), rank span
    /// positions by the mean score within N positions on either side (a
    /// span-local average pool), so runs of high-scoring tokens such as
    /// numbers and names are kept whole; stored in the adaptor (0: the raw
    /// scores). 3 measured best (docs/RESULTS.md).
    #[arg(long, default_value_t = 3)]
    span_pool: usize,
    /// The same pool in training's selection (0: the raw scores, as measured).
    #[arg(long, default_value_t = 0)]
    train_span_pool: usize,
}

impl MethodArgs {
    /// The flags' defaults: the method `train` trains unless told otherwise.
    pub(crate) fn train_defaults() -> Result<MethodArgs> {
        use clap::{CommandFactory, FromArgMatches, Parser};
        #[derive(Parser)]
        struct Only {
            #[command(flatten)]
            method: MethodArgs,
        }
        let matches = Only::command().try_get_matches_from(["method"])?;
        Ok(Only::from_arg_matches(&matches)?.method)
    }

    /// The method's configuration, checked.
    pub(crate) fn distill_config(&self) -> Result<DistillConfig> {
        let select_answer_weight = match self.select_answer_weight {
            Some(w) if w < 0.0 || (w > 0.0 && self.select_weight <= 0.0) => bail!(
                "--select-answer-weight {w} needs a non-negative value and --select-weight above 0 \
                 (it adds to the selection loss's target)"
            ),
            Some(w) => w,
            None if self.select_weight > 0.0 => 4.0,
            None => 0.0,
        };
        let targets = self
            .lora_targets
            .iter()
            .map(|t| Proj::parse(t).with_context(|| format!("unknown LoRA target `{t}`")))
            .collect::<Result<Vec<_>>>()?;
        Ok(DistillConfig {
            scorer_layer: self.scorer_layer,
            lora: LoraConfig {
                targets,
                rank: self.lora_rank,
                alpha: self.lora_alpha,
                dropout: 0.0,
                rslora: match self.lora_scaling.as_str() {
                    "rs" => true,
                    "standard" => false,
                    x => bail!("--lora-scaling `{x}`: expected rs or standard"),
                },
                kv_all_tokens: match self.lora_kv_positions.as_str() {
                    "all" => true,
                    "kept" => false,
                    x => bail!("--lora-kv-positions `{x}`: expected all or kept"),
                },
            },
            kl_forward_weight: self.kl_forward_weight,
            answer_only: self.answer_only,
            score_feed: ScoreFeed::parse(&self.score_feed).with_context(|| {
                format!(
                    "unknown --score-feed `{}` (straight_through, direct, log_sigmoid)",
                    self.score_feed
                )
            })?,
            sinks: self.sinks,
            select_weight: self.select_weight,
            select_answer_weight,
            span_pool: self.span_pool,
            train_span_pool: self.train_span_pool,
            scorer_norm: self.scorer_input == "rms",
            ..DistillConfig::default()
        })
    }
}

/// Arguments of `train`.
#[derive(Args, Debug)]
pub(crate) struct TrainArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Dataset URL (file://, s3://, gs://, az:// or a path) prepared by `kvd-data
    /// prepare`; repeatable.
    #[arg(long, required = true)]
    data: Vec<String>,
    /// Integer mixing weight per dataset (steps per schedule cycle), e.g. 3,1.
    #[arg(long, value_delimiter = ',')]
    weights: Vec<u32>,
    #[command(flatten)]
    store: StoreArgs,
    /// Where the adaptor is written (safetensors; a path, or for a worker also
    /// an object URL).
    #[arg(long)]
    pub out: Option<String>,
    /// Optimizer steps.
    #[arg(long, default_value_t = 1000)]
    pub steps: usize,
    /// Examples per optimizer step.
    #[arg(long, default_value_t = 16)]
    global_batch: usize,
    /// Examples per forward/backward (the rest accumulate). One that runs out
    /// of device memory is run again as two halves (same update, a warning);
    /// a single example that does not fit stops the job with an error.
    #[arg(long, default_value_t = 8)]
    micro_batch: usize,
    /// Peak learning rate. 3e-4 kept the LoRA's reading where 1e-3 cost it
    /// (needle F1 38.3 against 34.1 at r = 0.25; docs/RESULTS.md).
    #[arg(long, default_value_t = 3e-4)]
    lr: f64,
    /// Linear warmup steps.
    #[arg(long, default_value_t = 50)]
    warmup: usize,
    /// Gradient clipping norm (0: off).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// Train the scorer alone on the selection loss for the first N steps
    /// (the teacher's cost, no student pass; needs --select-weight), then
    /// the whole adaptor.
    #[arg(long, default_value_t = 0)]
    select_warmup_steps: usize,
    /// Retention ratios drawn per example.
    #[arg(long, value_delimiter = ',', default_value = "0.1,0.25,0.5,0.8")]
    ratios: Vec<f32>,
    /// Tokens per example at most (the model window or less).
    #[arg(long, default_value_t = 1024)]
    max_len: usize,
    /// Continuation tokens of text rows.
    #[arg(long, default_value_t = 128)]
    text_suffix: usize,
    #[command(flatten)]
    pub method: MethodArgs,
    /// Skip (count and log) bad rows instead of stopping.
    #[arg(long)]
    skip_bad_rows: bool,
    /// Seed of data order, ratios and initialisation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Checkpoint every N steps (0: only at the end), so a crash costs at
    /// most N steps: `train` writes the training state to --checkpoint-dir
    /// and rewrites the adaptor; a worker uses --checkpoint-every.
    #[arg(long, default_value_t = 100)]
    save_every: usize,
    /// Log every N steps.
    #[arg(long, default_value_t = 10)]
    log_every: usize,
    /// Stop (and save) after this many seconds even if steps remain.
    #[arg(long)]
    time_limit_s: Option<f64>,
    /// Example-builder (tokenizer) threads.
    #[arg(long, default_value_t = 2)]
    data_threads: usize,
    /// Order each step's examples by length before cutting micro-batches
    /// (less padding when --micro-batch is below --global-batch; the same step).
    #[arg(long)]
    bucket_by_length: bool,
    /// Cut each step's examples (ordered by length) into micro-batches of at
    /// most this many padded positions (examples x longest context + suffix)
    /// and at most --micro-batch examples: many short examples at once, few
    /// long ones; the same step, and a bound on a micro-batch's memory.
    #[arg(long)]
    micro_batch_tokens: Option<usize>,
    /// Keep no activations of the student's encoder: recompute them layer by
    /// layer in the backward (the same step in much less device memory, for
    /// one more encoder forward). Lets larger --micro-batch values fit.
    #[arg(long)]
    recompute_encoder: bool,
    /// Pad each micro-batch's contexts to a multiple of N positions (and its
    /// suffixes to one of min(N, 32)), so micro-batches of similar lengths
    /// share shapes; 1: to the longest example. The same step up to rounding.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pad_multiple: u64,
    /// Time the step's phases (teacher, scorer, encoder, decoder, loss,
    /// backward, optimizer; the device synchronizes between them, so the job
    /// runs slower) and log their mean seconds per step at every log line.
    #[arg(long, env = "KVD_STEP_PHASES")]
    step_phases: bool,
    /// Fault injection for recovery tests: `kill|term:rank=R:step=S[:at=step|upload]`
    /// or `alloc:rank=R:step=S` (an allocation failure inside the step).
    #[arg(long, env = "KVD_CHAOS", hide_env_values = true)]
    chaos: Option<String>,
    /// With --chaos: fire only if this file does not exist, and create it.
    #[arg(long, env = "KVD_CHAOS_ONCE", requires = "chaos")]
    chaos_once: Option<PathBuf>,
}

impl TrainArgs {
    /// Turns on what the flags ask of the whole process (phase timing).
    pub(crate) fn set_process_options(&self) {
        kvd_trainer::distill::phases::set_enabled(self.step_phases);
    }

    /// The fault of --chaos, if any.
    pub(crate) fn chaos(&self) -> Result<Option<Chaos>> {
        self.chaos
            .as_deref()
            .map(|spec| Ok(Chaos::parse(spec)?.once(self.chaos_once.clone())))
            .transpose()
    }
}

/// Arguments of `train`: the training flags and where a single process
/// keeps its checkpoints.
#[derive(Args, Debug)]
pub(crate) struct TrainCmd {
    #[command(flatten)]
    train: TrainArgs,
    /// Checkpoint directory [default: beside --out, NAME.ckpt for
    /// NAME.safetensors].
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    /// Continue from the newest intact checkpoint in the checkpoint directory
    /// (adaptor, optimizer, step and data position; a fresh start when there
    /// is none). Raise --steps to train on past a finished run.
    #[arg(long)]
    resume: bool,
    /// Newest checkpoints kept (0: all).
    #[arg(long, default_value_t = 2)]
    keep_last: usize,
}

/// The training job the arguments describe, for `model`.
pub(crate) fn build_job(a: &TrainArgs, model: &Model) -> Result<TrainJob> {
    let weights = match a.weights.len() {
        0 => vec![1; a.data.len()],
        n if n == a.data.len() => a.weights.clone(),
        n => bail!("{n} --weights for {} --data", a.data.len()),
    };
    let job = TrainJob {
        data: a
            .data
            .iter()
            .zip(&weights)
            .map(|(url, &weight)| DataMix {
                url: url.clone(),
                weight,
            })
            .collect(),
        dataset: a.store.dataset_options()?,
        builder: BuilderConfig {
            max_len: a.max_len.min(model.config().max_position_embeddings),
            ratios: a.ratios.clone(),
            text_suffix_len: a.text_suffix,
            policy: if a.skip_bad_rows {
                BadInputPolicy::Skip
            } else {
                BadInputPolicy::Error
            },
            threads: a.data_threads.max(1),
            ..BuilderConfig::default()
        },
        distill: a.method.distill_config()?,
        train: TrainConfig {
            lr: a.lr,
            warmup_steps: a.warmup,
            total_steps: a.steps,
            max_grad_norm: a.max_grad_norm,
            grad_accum: a.global_batch.div_ceil(a.micro_batch.max(1)),
            select_warmup_steps: a.select_warmup_steps,
            ..TrainConfig::default()
        },
        global_batch: a.global_batch,
        micro_batch: a.micro_batch,
        seed: a.seed,
        prefetch: 4,
        out: a.out.clone().map(PathBuf::from).unwrap_or_default(),
        save_every: a.save_every,
        log_every: a.log_every,
        base_model: model_label(&a.model.model),
        time_limit_s: a.time_limit_s,
        bucket_by_length: a.bucket_by_length,
        micro_batch_tokens: a.micro_batch_tokens,
        recompute_encoder: a.recompute_encoder,
        pad_multiple: a.pad_multiple as usize,
    };
    Ok(job)
}

/// Runs `train`.
pub(crate) fn run_train(cmd: TrainCmd) -> Result<()> {
    let a = cmd.train;
    let Some(out) = a.out.clone() else {
        bail!("train needs --out (where the adaptor is written)");
    };
    if out.contains("://") {
        bail!("train writes --out to a local path; object URLs are for `worker`");
    }
    let (model, tok) = load(&a.model)?;
    let job = build_job(&a, &model)?;
    a.set_process_options();
    tracing::info!(job = %job.log_json(), "training");
    let bar = ProgressBar::new(a.steps as u64).with_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps {msg} [{elapsed} < {eta}]")
            .expect("static template"),
    );
    let ckpt = LocalCheckpoints {
        dir: cmd
            .checkpoint_dir
            .unwrap_or_else(|| LocalCheckpoints::beside(Path::new(&out)).dir),
        keep_last: cmd.keep_last,
        resume: cmd.resume,
    };
    let chaos = a.chaos()?;
    let (_, summary) = train(
        &model,
        Arc::new(tok),
        &job,
        &ckpt,
        chaos.as_ref(),
        |step, loss, lr| {
            bar.set_position(step as u64);
            bar.set_message(format!("loss {loss:.4} lr {lr:.2e}"));
        },
    )
    .map_err(with_bad_row_hint)?;
    bar.finish_and_clear();
    println!("{}", serde_json::to_string_pretty(&summary)?);
    println!(
        "adaptor written to {out}; checkpoints in {} (continue with --resume)",
        ckpt.dir.display()
    );
    Ok(())
}

/// A training error with how to get past a bad row: `--skip-bad-rows` (the
/// rows are counted and logged), and for a row whose question and answer
/// leave no room for a span, a larger `--max-len`. Other errors pass as they are.
pub(crate) fn with_bad_row_hint(e: kvd_trainer::error::ModelError) -> anyhow::Error {
    use kvd_data::{BadInputKind, DataError};
    use kvd_trainer::error::ModelError;
    let fix = match &e {
        ModelError::Data(DataError::BadRow {
            kind: BadInputKind::NoRoomForSpan,
            ..
        }) => "a larger --max-len, or --skip-bad-rows to skip (and count) such rows",
        ModelError::Data(DataError::BadRow { .. }) => {
            "--skip-bad-rows skips (and counts) such rows"
        }
        _ => return e.into(),
    };
    anyhow::anyhow!("{e}\n  fix: {fix}")
}

/// A model's label: its file or directory name.
fn model_label(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// Arguments of `compress`.
#[derive(Args, Debug)]
pub(crate) struct CompressArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A trained adaptor (KV-Distill); without it, `--method` picks a baseline.
    #[arg(long)]
    adaptor: Option<PathBuf>,
    /// full, random, streaming_llm, key_norm, h2o, snapkv, tova or
    /// expected_attention (when no --adaptor; parameters after a colon,
    /// e.g. snapkv:window=16).
    #[arg(long, default_value = "full")]
    method: String,
    /// Retention ratio r in (0, 1].
    #[arg(long)]
    ratio: f64,
    /// The context (compressed after the BOS token).
    #[arg(long, conflicts_with = "context_file")]
    context: Option<String>,
    /// A UTF-8 file holding the context.
    #[arg(long)]
    context_file: Option<PathBuf>,
    /// Output cache file (safetensors).
    #[arg(long)]
    out: PathBuf,
}

/// Resolves a method name (and optional adaptor) into a [`Method`].
pub(crate) fn parse_method<'a>(name: &str, adaptor: Option<&'a Adaptor>) -> Result<Method<'a>> {
    Ok(match (name, adaptor) {
        (_, Some(a)) => Method::kv_distill(a),
        ("full", None) => Method::Full,
        ("kv_distill", None) => bail!("method kv_distill needs --adaptor"),
        (other, None) => Method::Baseline(other.parse().map_err(|e| anyhow::anyhow!("{e}"))?),
    })
}

/// Runs `compress`.
pub(crate) fn run_compress(a: CompressArgs) -> Result<()> {
    if !(a.ratio > 0.0 && a.ratio <= 1.0) {
        bail!("--ratio {} is outside (0, 1]", a.ratio);
    }
    let text = read_context(a.context.as_deref(), a.context_file.as_deref())?;
    let (model, tok) = load(&a.model)?;
    let adaptor = match &a.adaptor {
        Some(p) => Some(load_adaptor(p, model.config(), model.device())?),
        None => None,
    };
    let method = parse_method(&a.method, adaptor.as_ref().map(|x| &x.0))?;
    let mut tokens: Vec<u32> = tok.bos_token_id().into_iter().collect();
    let prefix = tokens.len();
    tokens.extend(tok.encode(&text, false)?);
    let window = model.config().max_position_embeddings;
    if tokens.len() == prefix {
        bail!("the context is empty: nothing to compress");
    }
    if tokens.len() > window {
        bail!(
            "the context has {} tokens, longer than the model window of {window}",
            tokens.len()
        );
    }
    let cache = compress_one(
        &model,
        method,
        &tokens,
        prefix,
        a.ratio,
        &a,
        adaptor.as_ref(),
    )?;
    cache.save(&a.out)?;
    let (mem, full) = (cache.memory_bytes(), cache.full_memory_bytes());
    println!(
        "compressed {} tokens to {} cache entries per layer with {} at r = {}: {} of {} bytes ({:.1}%) -> {}",
        tokens.len(),
        cache.meta.kept,
        cache.meta.method,
        a.ratio,
        mem,
        full,
        100.0 * mem as f64 / full as f64,
        a.out.display()
    );
    Ok(())
}

/// The context of `--context` or `--context-file`.
fn read_context(context: Option<&str>, file: Option<&Path>) -> Result<String> {
    match (context, file) {
        (Some(t), None) => Ok(t.to_string()),
        (None, Some(p)) => {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
        }
        _ => bail!("give the context with --context or --context-file"),
    }
}

/// Compresses one tokenised context (span = everything after `prefix`).
fn compress_one(
    model: &Model,
    method: Method,
    tokens: &[u32],
    prefix: usize,
    ratio: f64,
    a: &CompressArgs,
    adaptor: Option<&(Adaptor, kvd_trainer::distill::checkpoint::AdaptorMeta)>,
) -> Result<CompressedCache> {
    let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
    let ids = tch::Tensor::from_slice(&ids)
        .unsqueeze(0)
        .to_device(model.device());
    let len = [tokens.len()];
    let spans = [vec![(prefix, tokens.len() - prefix)]];
    let ratios = [if matches!(method, Method::Full) {
        1.0
    } else {
        ratio
    }];
    let comp = compress_contexts(
        model,
        method,
        Contexts {
            ids: &ids,
            len: &len,
            spans: &spans,
            ratios: &ratios,
        },
    )?;
    let meta = CacheMeta {
        format: 1,
        base_model: model_label(&a.model.model),
        base_config_hash: config_hash(model.config()),
        method: method.name(),
        adaptor: adaptor.map(|(_, m)| {
            format!(
                "{} (step {})",
                a.adaptor.as_deref().map(model_label).unwrap_or_default(),
                m.step
            )
        }),
        ratio: ratios[0],
        context_len: tokens.len(),
        spans: spans[0].clone(),
        kept: 0,
    };
    Ok(CompressedCache::from_compressed(comp, meta)?)
}

/// Arguments of `eval`.
#[derive(Args, Debug)]
pub(crate) struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A trained adaptor: adds the `kv_distill` method.
    #[arg(long)]
    adaptor: Option<PathBuf>,
    /// SQuAD-format JSON (e.g. SQuAD v1.1 dev), for `--task squad`.
    #[arg(long, required_if_eq("task", "squad"))]
    squad: Option<PathBuf>,
    /// squad (questions about real passages) or needle (a fact inserted into
    /// filler prose at varied depths and lengths; needs --haystack).
    #[arg(long, default_value = "squad")]
    task: String,
    /// Needle test: a directory of .txt files of filler prose (e.g. the Paul
    /// Graham essays of the assets).
    #[arg(long, required_if_eq("task", "needle"))]
    haystack: Option<PathBuf>,
    /// Needle test: context lengths in tokens.
    #[arg(long, value_delimiter = ',', default_value = "256,512,1024,2048")]
    needle_lengths: Vec<usize>,
    /// Needle test: depths of the fact in the context, in [0, 1].
    #[arg(long, value_delimiter = ',', default_value = "0,0.25,0.5,0.75,1")]
    needle_depths: Vec<f64>,
    /// Record each question's result in results.json (always on for needle).
    #[arg(long)]
    per_item: bool,
    /// Questions (a seeded subset).
    #[arg(long, default_value_t = 1000)]
    questions: usize,
    /// Subset seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// paragraph or article.
    #[arg(long, default_value = "paragraph")]
    context: String,
    /// Retention ratios.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1.0,0.5,0.25,0.1,0.05,0.02"
    )]
    ratios: Vec<f64>,
    /// Methods (kv_distill is added first when --adaptor is given and no
    /// kv_distill* method is named;
    /// kv_distill_poolN ranks by the scores after a span-local average pool
    /// of half-width N; kv_distill_select keeps what the adaptor's scorer
    /// keeps and reads it with the frozen model, no LoRA; METHOD+answer keeps
    /// the answer's tokens, an oracle);
    /// snapkv_question is a question-aware reference, not a competitor.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "random,streaming_llm,key_norm,h2o,snapkv,tova,expected_attention,snapkv_question"
    )]
    methods: Vec<String>,
    /// Questions per batch. One that runs out of device memory is evaluated
    /// again as two halves (same results, a warning).
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Longest generated answer.
    #[arg(long, default_value_t = 24)]
    max_new_tokens: usize,
    /// Tokens per example at most.
    #[arg(long, default_value_t = 2048)]
    max_len: usize,
    /// Directory for results.json, results.md and f1_vs_ratio.png.
    #[arg(long)]
    out_dir: PathBuf,
    /// Stop after the batch that crosses this many seconds.
    #[arg(long)]
    time_limit_s: Option<f64>,
    /// Time the stages (tokenising, the teacher, compression, the answer's
    /// scores, generation, metrics; the device synchronizes between them)
    /// into results.json's `phases_s` and results.md.
    #[arg(long)]
    phases: bool,
}

/// The methods `eval` runs: those asked for, with `kv_distill` first when
/// an adaptor is given and none of the adaptor's methods (`kv_distill*`) was
/// named (so `--methods kv_distill_select` runs that alone).
fn eval_methods(asked: &[String], adaptor: bool) -> Vec<String> {
    let mut methods = asked.to_vec();
    if adaptor && !methods.iter().any(|m| m.starts_with("kv_distill")) {
        methods.insert(0, "kv_distill".into());
    }
    methods
}

/// Runs `eval`.
pub(crate) fn run_eval_cmd(a: EvalArgs) -> Result<()> {
    use kvd_trainer::eval::run::{markdown, run_eval, write_report, ContextKind, EvalConfig};
    let context = match a.context.as_str() {
        "paragraph" => ContextKind::Paragraph,
        "article" => ContextKind::Article,
        other => bail!("--context `{other}`: expected paragraph or article"),
    };
    kvd_trainer::distill::phases::set_enabled(a.phases);
    let (model, tok) = load(&a.model)?;
    let (set, needle) = match (a.task.as_str(), &a.squad, &a.haystack) {
        ("squad", Some(p), _) => (kvd_trainer::eval::load_squad(p)?, Vec::new()),
        ("needle", _, Some(dir)) => {
            use kvd_trainer::eval::needle::{build_needles, load_haystack, NeedleConfig};
            let filler = load_haystack(dir)?;
            let ncfg = NeedleConfig {
                items: a.questions,
                lengths: a.needle_lengths.clone(),
                depths: a.needle_depths.clone(),
                seed: a.seed,
            };
            build_needles(&filler, &tok, &ncfg)?
        }
        (t, _, _) => {
            bail!("--task `{t}`: expected squad (with --squad) or needle (with --haystack)")
        }
    };
    let adaptor = match &a.adaptor {
        Some(p) => Some(load_adaptor(p, model.config(), model.device())?),
        None => None,
    };
    let methods = eval_methods(&a.methods, adaptor.is_some());
    let cfg = EvalConfig {
        questions: a.questions,
        seed: a.seed,
        context,
        ratios: a.ratios.clone(),
        methods,
        batch: a.batch,
        max_new_tokens: a.max_new_tokens,
        // A needle context must not be cut (the fact may sit at its end).
        max_len: a
            .max_len
            .max(needle.iter().map(|n| n.length + 128).max().unwrap_or(0)),
        time_limit_s: a.time_limit_s,
        per_item: a.per_item || !needle.is_empty(),
        ..EvalConfig::default()
    };
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} (question x method x ratio) [{elapsed} < {eta}]",
        )
        .expect("static template"),
    );
    // Without a terminal (a background run, a pod) the bar is hidden: log
    // the progress every 30 seconds instead.
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut last_log = std::time::Instant::now();
    let mut report = run_eval(
        &model,
        Arc::new(tok),
        adaptor.as_ref().map(|x| &x.0),
        &set,
        &cfg,
        |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
            if !terminal && last_log.elapsed().as_secs_f64() >= 30.0 {
                last_log = std::time::Instant::now();
                tracing::info!(
                    done,
                    total,
                    elapsed_s = bar.elapsed().as_secs(),
                    "evaluating (question x method x ratio)"
                );
            }
        },
    )?;
    bar.finish_and_clear();
    report.model = model_label(&a.model.model);
    report.adaptor = adaptor.as_ref().map(|(_, m)| {
        format!(
            "{} (step {})",
            a.adaptor.as_deref().map(model_label).unwrap_or_default(),
            m.step
        )
    });
    report.needle = needle;
    write_report(&report, &a.out_dir)?;
    let mut md = markdown(&report);
    if !report.needle.is_empty() {
        let grid = kvd_trainer::eval::needle::write_needle_report(&report, &a.out_dir)?;
        let path = a.out_dir.join("results.md");
        md.push_str(&grid);
        std::fs::write(&path, &md).with_context(|| format!("writing {}", path.display()))?;
    }
    println!("{md}");
    println!("results written to {}", a.out_dir.display());
    Ok(())
}

/// Arguments of `inspect`.
#[derive(Args, Debug)]
pub(crate) struct InspectArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A trained adaptor (adds `kv_distill`).
    #[arg(long)]
    adaptor: Option<PathBuf>,
    /// Methods to show (kv_distill and baseline names).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "kv_distill,snapkv,streaming_llm"
    )]
    methods: Vec<String>,
    /// Retention ratio r in (0, 1].
    #[arg(long)]
    ratio: f64,
    /// The context (compressed after the BOS token).
    #[arg(long, conflicts_with = "context_file")]
    context: Option<String>,
    /// A UTF-8 file holding the context.
    #[arg(long)]
    context_file: Option<PathBuf>,
    /// Also write an HTML page with the kept tokens highlighted.
    #[arg(long)]
    html: Option<PathBuf>,
}

/// Runs `inspect`: for each method, the context with its kept tokens shown
/// (`[token]` and bold in the terminal, highlighted in the HTML page).
pub(crate) fn run_inspect(a: InspectArgs) -> Result<()> {
    if !(a.ratio > 0.0 && a.ratio <= 1.0) {
        bail!("--ratio {} is outside (0, 1]", a.ratio);
    }
    let text = read_context(a.context.as_deref(), a.context_file.as_deref())?;
    let (model, tok) = load(&a.model)?;
    let adaptor = match &a.adaptor {
        Some(p) => Some(load_adaptor(p, model.config(), model.device())?),
        None => None,
    };
    let mut tokens: Vec<u32> = tok.bos_token_id().into_iter().collect();
    let prefix = tokens.len();
    tokens.extend(tok.encode(&text, false)?);
    if tokens.len() == prefix {
        bail!("the context is empty: nothing to inspect");
    }
    let pieces: Vec<String> = tokens
        .iter()
        .map(|&t| tok.decode(&[t], false))
        .collect::<std::result::Result<_, _>>()?;
    let (ids, len) = kvd_trainer::distill::infer::pad_rows(
        &[tokens.clone()],
        model.config().vocab_size,
        model.device(),
    )?;
    let spans = [vec![(prefix, tokens.len() - prefix)]];
    let mut html = String::from(
        "<!doctype html><meta charset=utf-8><title>kv-distill inspect</title>\
         <style>body{font:14px/1.6 sans-serif;max-width:60em;margin:2em auto}\
         .k{background:#9be39b}.d{color:#999}h2{font-size:16px}</style>\n",
    );
    html.push_str(&format!(
        "<h1>Kept tokens at r = {} ({} tokens)</h1>\n",
        a.ratio,
        tokens.len()
    ));
    for name in &a.methods {
        if name == "kv_distill" && adaptor.is_none() {
            continue;
        }
        let method = parse_method(name, adaptor.as_ref().map(|x| &x.0))?;
        let comp = compress_contexts(
            &model,
            method,
            Contexts {
                ids: &ids,
                len: &len,
                spans: &spans,
                ratios: &[a.ratio],
            },
        )?;
        let kept = &comp.selections[0].kept;
        let mut term = String::new();
        html.push_str(&format!(
            "<h2>{} ({} kept)</h2><p>",
            method.name(),
            kept.len()
        ));
        for (p, piece) in pieces.iter().enumerate().skip(prefix) {
            let esc = piece
                .replace('&', "&amp;")
                .replace('<', "&lt;")
                .replace('>', "&gt;");
            if kept.binary_search(&p).is_ok() {
                term.push_str(&format!("\x1b[1;32m[{piece}]\x1b[0m"));
                html.push_str(&format!("<span class=k>{esc}</span>"));
            } else {
                term.push_str(piece);
                html.push_str(&format!("<span class=d>{esc}</span>"));
            }
        }
        html.push_str("</p>\n");
        println!(
            "== {} ({} of {} kept)\n{term}\n",
            method.name(),
            kept.len(),
            tokens.len()
        );
    }
    if let Some(path) = &a.html {
        std::fs::write(path, html).with_context(|| format!("writing {}", path.display()))?;
        println!("written to {}", path.display());
    }
    Ok(())
}

/// Arguments of `diagnose`.
#[derive(Args, Debug)]
pub(crate) struct DiagnoseArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A trained adaptor; without it a fresh one (LoRA zero, random scorer).
    #[arg(long)]
    adaptor: Option<PathBuf>,
    /// SQuAD-format JSON whose answers are located in their contexts.
    #[arg(long)]
    squad: PathBuf,
    /// Questions (a seeded subset).
    #[arg(long, default_value_t = 200)]
    questions: usize,
    /// Retention ratio.
    #[arg(long, default_value_t = 0.25)]
    ratio: f64,
    /// Fresh adaptor: the scorer's layer.
    #[arg(long, default_value_t = 3)]
    scorer_layer: usize,
    /// Fresh adaptor: the score feed.
    #[arg(long, default_value = "straight_through")]
    score_feed: String,
    /// Questions per batch.
    #[arg(long, default_value_t = 8)]
    batch: usize,
}

/// Runs `diagnose`: prints (and returns as JSON) the [`GradientReport`].
pub(crate) fn run_diagnose(a: DiagnoseArgs) -> Result<()> {
    let set = kvd_trainer::eval::load_squad(&a.squad)?;
    let (model, tok) = load(&a.model)?;
    let adaptor = match &a.adaptor {
        Some(p) => load_adaptor(p, model.config(), model.device())?.0,
        None => Adaptor::new(
            model.config(),
            DistillConfig {
                scorer_layer: a.scorer_layer,
                score_feed: ScoreFeed::parse(&a.score_feed)
                    .with_context(|| format!("unknown --score-feed `{}`", a.score_feed))?,
                ..DistillConfig::default()
            },
            model.device(),
            0,
        )?,
    };
    let r = kvd_trainer::eval::run::gradient_report(
        &model,
        Arc::new(tok),
        &adaptor,
        &set,
        a.questions,
        a.ratio,
        a.batch,
    )?;
    println!("{}", serde_json::to_string_pretty(&r)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eval_adds_the_adaptor_method_unless_one_is_named() {
        let m = |xs: &[&str]| xs.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            eval_methods(&m(&["snapkv"]), true),
            m(&["kv_distill", "snapkv"])
        );
        assert_eq!(eval_methods(&m(&["snapkv"]), false), m(&["snapkv"]));
        assert_eq!(
            eval_methods(&m(&["kv_distill_select", "random"]), true),
            m(&["kv_distill_select", "random"])
        );
        assert_eq!(
            eval_methods(&m(&["random", "kv_distill"]), true),
            m(&["random", "kv_distill"])
        );
    }
}
