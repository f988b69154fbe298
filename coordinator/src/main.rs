//! `coordinator`: drives a distributed KV-Distill job. The gRPC service, worker
//! membership and checkpoint control arrive with the distributed-training work.

use clap::Parser;

/// Command-line flags of the coordinator.
#[derive(Parser, Debug)]
#[command(version, about = "kv-distill job coordinator (not implemented yet)")]
struct Args {
    /// Number of workers the job waits for.
    #[arg(long, default_value_t = 1)]
    workers: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::bail!(
        "the coordinator is not implemented yet (asked for {} workers); see README.md",
        args.workers
    )
}
