//! `kv-distill`: train KV-Distill adaptors, compress contexts and answer from
//! the compressed caches, run prompts through a model, score text, inspect checkpoints.

mod bench_step;
mod distill_cmds;
mod worker_cmd;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use kvd_trainer::checkpoint::Checkpoint;
use kvd_trainer::config::ModelConfig;
use kvd_trainer::device::{parse_device, parse_kind};
use kvd_trainer::generate::{generate_with_bias, mean_nll, GenerateOptions, Sampling};
use kvd_trainer::model::{Input, Model};
use kvd_trainer::tokenizer::{ChatMessage, Tokenizer};
use kvd_trainer::weights::RandomWeights;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;
use tch::Tensor;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "kv-distill: KV-cache distillation for pretrained LMs"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true, env = "KVD_LOG_FORMAT")]
    log_format: LogFormat,
    /// CPU threads for libtorch's operators (default: libtorch's choice).
    #[arg(long, global = true, env = "KVD_THREADS")]
    threads: Option<i32>,
    #[command(subcommand)]
    command: Command,
}

/// How log lines are written (stderr).
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    /// Readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a KV-Distill adaptor on prepared Parquet datasets.
    Train(Box<distill_cmds::TrainCmd>),
    /// Train as one worker of a distributed job run by `coordinator`.
    Worker(Box<worker_cmd::WorkerArgs>),
    /// Compress a context into a KV cache file (KV-Distill or a baseline).
    Compress(distill_cmds::CompressArgs),
    /// Evaluate KV-Distill and the baselines on SQuAD or the needle test.
    Eval(distill_cmds::EvalArgs),
    /// Show which tokens a method keeps of a context (terminal + HTML).
    Inspect(distill_cmds::InspectArgs),
    /// The gradient the loss sends to the scores of answer tokens (diagnosis).
    Diagnose(distill_cmds::DiagnoseArgs),
    /// Run a prompt through a model and print the continuation.
    Generate(GenerateArgs),
    /// Perplexity of a text file's first tokens.
    Perplexity(PerplexityArgs),
    /// Print a checkpoint's configuration.
    Info(ModelArgs),
    /// Report whether CUDA is usable from this binary.
    Devices,
    /// Write a prompt's token ids and float32 logits to a safetensors file.
    Logits(LogitsArgs),
    /// Time full forward passes (prefill) over a sequence: tokens/s.
    BenchForward(BenchArgs),
    /// Time the full KV-Distill training step at a shape: tokens/s, memory, MFU.
    BenchStep(bench_step::BenchStepArgs),
}

/// Which model to load, and how.
#[derive(Args, Debug)]
pub struct ModelArgs {
    /// HF model directory or GGUF file.
    #[arg(long, env = "KVD_MODEL")]
    pub model: PathBuf,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// auto (bf16 on CUDA, f32 on CPU), f32, bf16 or f16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
}

#[derive(Args, Debug)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt as a user turn with the model's chat template.
    #[arg(long, conflicts_with = "cache")]
    chat: bool,
    /// Continue from a compressed context written by `compress`: the prompt
    /// follows the context (no special tokens are added).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Maximum new tokens.
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 means greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Top-k truncation when sampling (0: off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus (top-p) truncation when sampling.
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args, Debug)]
struct LogitsArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt (tokenised with special tokens, e.g. BOS).
    #[arg(long)]
    prompt: String,
    /// Output safetensors file with `ids` [1, T] and `logits` [1, T, V].
    #[arg(long)]
    out: PathBuf,
}

/// The model of a benchmark: a checkpoint, or a preset shape with random weights.
#[derive(Args, Debug)]
pub struct BenchModelArgs {
    /// HF directory or GGUF file; omit to use `--preset` with random weights.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Random-weight shape when no model is given: llama-3.2-1b, smollm2-135m,
    /// or smollm2-135m-narrow (SmolLM2's 30 layers and heads at 1/8 of its
    /// widths: the same operations on little arithmetic, so the time is
    /// mostly host-side dispatch).
    #[arg(long, default_value = "llama-3.2-1b")]
    pub preset: String,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// auto (bf16 on CUDA, f32 on CPU), f32, bf16 or f16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
}

impl BenchModelArgs {
    /// Loads the model; returns it with a label for the report.
    pub fn load(&self) -> Result<(Model, String)> {
        let device = parse_device(&self.device)?;
        let kind = parse_kind(&self.dtype, device)?;
        Ok(match &self.model {
            Some(path) => (
                Checkpoint::open(path)?.load_model(kind, device)?,
                path.display().to_string(),
            ),
            None => {
                let cfg = match self.preset.as_str() {
                    "llama-3.2-1b" => ModelConfig::llama_3_2_1b(),
                    "smollm2-135m" => ModelConfig::smollm2_135m(),
                    "smollm2-135m-narrow" => ModelConfig::smollm2_135m().narrowed(8),
                    other => anyhow::bail!(
                        "unknown preset `{other}` (known: llama-3.2-1b, smollm2-135m, smollm2-135m-narrow)"
                    ),
                };
                let src = RandomWeights::new(cfg.arch, 0);
                (
                    Model::load(cfg, &src, kind, device)?,
                    format!("random {}", self.preset),
                )
            }
        })
    }
}

#[derive(Args, Debug)]
struct BenchArgs {
    #[command(flatten)]
    model: BenchModelArgs,
    /// Sequence length.
    #[arg(long, default_value_t = 4096)]
    tokens: i64,
    /// Timed iterations (after 2 warm-up ones).
    #[arg(long, default_value_t = 10)]
    iters: usize,
}

#[derive(Args, Debug)]
struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// UTF-8 text file.
    #[arg(long)]
    file: PathBuf,
    /// Score the first N tokens.
    #[arg(long, default_value_t = 1024)]
    max_tokens: usize,
}

/// Runs the command; an error is printed as one line, each cause once (not
/// anyhow's "Caused by:" list, which repeats causes that error types already
/// print). Exit status: 0 done, 1 failed, 128 + N when signal N stopped a
/// worker (it left its job cleanly).
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {}", kvd_proto::report::error_chain(e.as_ref()));
            match e.downcast_ref::<kvd_trainer::error::ModelError>() {
                Some(kvd_trainer::error::ModelError::Interrupted { signal, .. }) => {
                    std::process::ExitCode::from((128 + signal).clamp(1, 255) as u8)
                }
                _ => std::process::ExitCode::FAILURE,
            }
        }
    }
}

fn run() -> Result<()> {
    let (args, settings) = worker_cmd::resolve_config(std::env::args_os().collect())?;
    let cli = Cli::parse_from(args);
    init_logging(cli.log_format);
    if let Some(n) = cli.threads {
        tch::set_num_threads(n);
    }
    match cli.command {
        Command::Train(a) => distill_cmds::run_train(*a),
        Command::Worker(a) => worker_cmd::run_worker_cmd(*a, &settings),
        Command::Compress(a) => distill_cmds::run_compress(a),
        Command::Eval(a) => distill_cmds::run_eval_cmd(a),
        Command::Inspect(a) => distill_cmds::run_inspect(a),
        Command::Diagnose(a) => distill_cmds::run_diagnose(a),
        Command::Generate(a) => run_generate(a),
        Command::Perplexity(a) => run_perplexity(a),
        Command::Info(a) => {
            let ck = Checkpoint::open(&a.model)?;
            println!("{:#?}", ck.config()?);
            Ok(())
        }
        Command::BenchForward(a) => run_bench(a),
        Command::BenchStep(a) => bench_step::run_bench_step(a),
        Command::Logits(a) => run_logits(a),
        Command::Devices => {
            println!("cuda_available={}", tch::Cuda::is_available());
            println!("cuda_device_count={}", tch::Cuda::device_count());
            println!("cudnn_available={}", tch::Cuda::cudnn_is_available());
            Ok(())
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Loads model and tokenizer with a spinner.
pub fn load(a: &ModelArgs) -> Result<(Model, Tokenizer)> {
    let device = parse_device(&a.device)?;
    let kind = parse_kind(&a.dtype, device)?;
    let spinner = ProgressBar::new_spinner()
        .with_style(
            ProgressStyle::with_template("{spinner} {msg} {elapsed}").expect("static template"),
        )
        .with_message(format!("loading {}", a.model.display()));
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    let start = Instant::now();
    let ck = Checkpoint::open(&a.model)?;
    let loaded = ck.load(kind, device)?;
    spinner.finish_and_clear();
    let cfg = loaded.0.config();
    tracing::info!(
        model = %a.model.display(),
        arch = cfg.arch.name(),
        layers = cfg.num_layers,
        hidden = cfg.hidden_size,
        vocab = cfg.vocab_size,
        device = ?device,
        dtype = ?kind,
        secs = format!("{:.1}", start.elapsed().as_secs_f64()),
        "model loaded"
    );
    Ok(loaded)
}

fn run_generate(a: GenerateArgs) -> Result<()> {
    let (model, tok) = load(&a.model)?;
    let mut context = match &a.cache {
        Some(path) => Some(kvd_trainer::distill::cache_file::CompressedCache::load(
            path, &model,
        )?),
        None => None,
    };
    let (text, add_special) = if context.is_some() {
        (a.prompt.clone(), false)
    } else if a.chat {
        let msg = ChatMessage {
            role: "user".into(),
            content: a.prompt.clone(),
        };
        (tok.apply_chat_template(&[msg], true)?, false)
    } else {
        (a.prompt.clone(), true)
    };
    let ids = tok.encode(&text, add_special)?;
    let sampling = if a.temperature > 0.0 {
        Sampling::Sample {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            seed: a.seed,
        }
    } else {
        Sampling::Greedy
    };
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        sampling,
        stop_tokens: tok.stop_token_ids().to_vec(),
    };
    let start = Instant::now();
    let mut produced: Vec<u32> = Vec::new();
    let mut printed = 0usize;
    let mut stdout = std::io::stdout();
    let bias = context
        .as_ref()
        .and_then(|c| c.feed_bias.as_ref().map(|b| b.shallow_clone()));
    let cache = context.as_mut().map(|c| &mut c.cache);
    let out = generate_with_bias(&model, &ids, cache, bias.as_ref(), &opts, |t| {
        produced.push(t);
        // Print whole characters only: decode everything so far, emit the new suffix.
        if let Ok(s) = tok.decode(&produced, true) {
            if s.len() > printed && s.is_char_boundary(printed) && !s.ends_with('\u{fffd}') {
                let _ = write!(stdout, "{}", &s[printed..]);
                let _ = stdout.flush();
                printed = s.len();
            }
        }
    })?;
    let secs = start.elapsed().as_secs_f64();
    let full = tok.decode(&out, true)?;
    if full.len() > printed && full.is_char_boundary(printed) {
        print!("{}", &full[printed..]);
    }
    println!();
    tracing::info!(
        prompt_tokens = ids.len(),
        new_tokens = out.len(),
        tokens_per_s = format!("{:.1}", out.len() as f64 / secs.max(1e-9)),
        "generation done"
    );
    Ok(())
}

fn run_logits(a: LogitsArgs) -> Result<()> {
    let (model, tok) = load(&a.model)?;
    let ids: Vec<i64> = tok
        .encode(&a.prompt, true)?
        .into_iter()
        .map(i64::from)
        .collect();
    let ids = Tensor::from_slice(&ids).unsqueeze(0);
    let logits = tch::no_grad(|| model.forward(Input::new(&ids.to_device(model.device())), None))?
        .to_kind(tch::Kind::Float)
        .to_device(tch::Device::Cpu);
    Tensor::write_safetensors(&[("ids", &ids), ("logits", &logits)], &a.out)
        .with_context(|| format!("writing {}", a.out.display()))?;
    println!("wrote {} ({} tokens)", a.out.display(), ids.size()[1]);
    Ok(())
}

fn run_bench(a: BenchArgs) -> Result<()> {
    let (model, name) = a.model.load()?;
    let (device, kind) = (model.device(), model.kind());
    let vocab = model.config().vocab_size as i64;
    let ids = Tensor::randint(vocab, [1, a.tokens], (tch::Kind::Int64, device));
    let sync = || kvd_trainer::device::synchronize(device);
    let mut times = Vec::with_capacity(a.iters);
    tch::no_grad(|| -> Result<()> {
        for i in 0..a.iters.max(1) + 2 {
            sync();
            let start = Instant::now();
            let h = model.forward_hidden(Input::new(&ids), None)?;
            // The LM head on the last position only, as a prefill would.
            let _ = model.logits(&h.narrow(1, a.tokens - 1, 1));
            sync();
            if i >= 2 {
                times.push(start.elapsed().as_secs_f64());
            }
        }
        Ok(())
    })?;
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "model={name} device={device:?} dtype={kind:?} tokens={} median_s={median:.4} tokens_per_s={:.0}",
        a.tokens,
        a.tokens as f64 / median
    );
    Ok(())
}

fn run_perplexity(a: PerplexityArgs) -> Result<()> {
    let (model, tok) = load(&a.model)?;
    let text = std::fs::read_to_string(&a.file)
        .with_context(|| format!("reading {}", a.file.display()))?;
    let mut ids = tok.encode(&text, true)?;
    ids.truncate(a.max_tokens);
    let start = Instant::now();
    let nll = mean_nll(&model, &ids)?;
    println!(
        "tokens={} mean_nll={nll:.6} perplexity={:.4} secs={:.2}",
        ids.len(),
        nll.exp(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
