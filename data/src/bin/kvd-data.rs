//! `kvd-data`: build datasets (`prepare`), index existing Parquet (`index`),
//! and measure loader throughput (`bench`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use kvd_data::prepare::SquadContext;
use kvd_data::writer::WriterConfig;
use kvd_data::{
    BuilderConfig, Dataset, DatasetOptions, ExampleBuilder, HfTokenizer, Loader, LoaderConfig,
    Manifest, SchemaSpec, Source, StoreOptions,
};

#[derive(Parser)]
#[command(
    name = "kvd-data",
    about = "kv-distill datasets: prepare, index, bench"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the train/eval Parquet datasets from the raw sources.
    Prepare {
        /// The assets directory (`$KVD_CACHE/assets`).
        #[arg(long)]
        assets: PathBuf,
        /// Output root URL or directory; gets train/qa, train/text, eval/qa.
        #[arg(long)]
        out: String,
        /// SQuAD contexts: paragraph or article.
        #[arg(long, default_value = "paragraph")]
        squad_context: String,
        /// Rows per row group at most.
        #[arg(long, default_value_t = 256)]
        row_group_rows: usize,
        /// Store options `key=value` (endpoint, access_key_id, ...).
        #[arg(long = "store-opt")]
        store_opt: Vec<String>,
    },
    /// Write `manifest.json` for the Parquet files under a URL.
    Index {
        /// Dataset root URL or directory.
        url: String,
        /// `text` or `qa`.
        #[arg(long, default_value = "qa")]
        schema: String,
        /// Store options `key=value`.
        #[arg(long = "store-opt")]
        store_opt: Vec<String>,
    },
    /// Loader throughput (examples/s, tokens/s) for one dataset.
    Bench {
        /// Dataset root URL or directory.
        url: String,
        /// tokenizer.json.
        #[arg(long)]
        tokenizer: PathBuf,
        /// Threads (tokio workers and tokenizer threads).
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Model window.
        #[arg(long, default_value_t = 2048)]
        max_len: usize,
        /// Global batch.
        #[arg(long, default_value_t = 64)]
        global_batch: usize,
        /// Samples to read at most (0: one epoch).
        #[arg(long, default_value_t = 0)]
        samples: u64,
        /// Store options `key=value`.
        #[arg(long = "store-opt")]
        store_opt: Vec<String>,
    },
}

fn store_opts(v: &[String]) -> Result<StoreOptions> {
    let mut o = StoreOptions::default();
    for kv in v {
        let (k, val) = kv.split_once('=').context("--store-opt takes key=value")?;
        o = o.with(k, val);
    }
    Ok(o)
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let threads = match &cli.cmd {
        Cmd::Bench { threads, .. } => (*threads).max(1),
        _ => 2,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    rt.block_on(run(cli.cmd))
}

async fn run(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Prepare {
            assets,
            out,
            squad_context,
            row_group_rows,
            store_opt,
        } => {
            let ctx = match squad_context.as_str() {
                "paragraph" => SquadContext::Paragraph,
                "article" => SquadContext::Article,
                o => anyhow::bail!("--squad-context: paragraph or article, not `{o}`"),
            };
            let cfg = WriterConfig {
                row_group_rows,
                ..WriterConfig::default()
            };
            let s = kvd_data::prepare::prepare(
                &assets,
                &out,
                &store_opts(&store_opt)?,
                &cfg,
                ctx,
                true,
            )
            .await?;
            for (url, rows, files) in s.datasets {
                println!("{url}: {rows} rows in {files} files");
            }
            if s.qa_sources == kvd_data::prepare::QaSources::Substitute {
                eprintln!(
                    "warning: the QA rows come from {}/qa-substitute (rule-made questions over the \
                     essays: the registry did not serve bigbench==1.0.0); they test the pipeline \
                     and measure no model quality",
                    assets.display()
                );
            }
        }
        Cmd::Index {
            url,
            schema,
            store_opt,
        } => {
            let spec = match schema.as_str() {
                "qa" => SchemaSpec::qa(),
                "text" => SchemaSpec::text(),
                o => anyhow::bail!("--schema: qa or text, not `{o}`"),
            };
            let source = Source::open(&url, &store_opts(&store_opt)?)?;
            let m = Manifest::build(&source, &spec).await?;
            m.save(&source).await?;
            println!(
                "{}: {} files, {} rows, manifest {}",
                url,
                m.files.len(),
                m.num_rows(),
                m.hash()
            );
        }
        Cmd::Bench {
            url,
            tokenizer,
            threads,
            max_len,
            global_batch,
            samples,
            store_opt,
        } => {
            let opts = DatasetOptions {
                store: store_opts(&store_opt)?,
                ..DatasetOptions::default()
            };
            let t_open = Instant::now();
            let ds = Arc::new(Dataset::open(&url, opts).await?);
            let open_s = t_open.elapsed().as_secs_f64();
            let tok = Arc::new(HfTokenizer::from_file(&tokenizer)?);
            let builder = Arc::new(ExampleBuilder::new(
                tok,
                BuilderConfig {
                    max_len,
                    threads,
                    policy: kvd_data::BadInputPolicy::Skip,
                    ..BuilderConfig::default()
                },
            )?);
            let mut loader = Loader::new(
                ds.clone(),
                builder.clone(),
                LoaderConfig {
                    global_batch,
                    ..LoaderConfig::default()
                },
            );
            let mut cursor = loader.cursor();
            let limit = if samples == 0 {
                ds.manifest().num_rows()
            } else {
                samples
            };
            let (mut n, mut tokens) = (0u64, 0u64);
            let t0 = Instant::now();
            while n < limit && cursor.epoch == 0 {
                let b = loader.next(&mut cursor, 0, 1).await?;
                if b.global_ids.is_empty() {
                    break;
                }
                n += b.examples.len() as u64;
                tokens += b
                    .examples
                    .iter()
                    .map(|e| e.tokens.len() as u64)
                    .sum::<u64>();
                if cursor.sample_index >= loader.batcher().epoch_len() {
                    break;
                }
            }
            let s = t0.elapsed().as_secs_f64();
            // One machine-readable line per run; `make bench` collects them.
            println!(
                "{}",
                serde_json::json!({
                    "url": url, "threads": threads, "examples": n, "tokens": tokens,
                    "seconds": s, "open_seconds": open_s,
                    "examples_per_s": n as f64 / s, "tokens_per_s": tokens as f64 / s,
                    "skipped": builder.stats().summary(),
                })
            );
        }
    }
    Ok(())
}
