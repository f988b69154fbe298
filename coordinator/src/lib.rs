//! The kv-distill job coordinator: a tonic gRPC server (`kvd.v1.Coordinator`)
//! that admits N workers, assigns ranks, relays rank 0's NCCL unique id,
//! tracks heartbeats, rebuilds the membership when a worker dies, and ends the
//! job when every worker reached the final step (or on SIGINT/SIGTERM or a
//! Shutdown request).
//!
//! - [`config`]: defaults < job.toml < `KVD_*` < flags (figment).
//! - [`membership`]: the state machine (ranks, epochs, liveness, checkpoints).
//! - [`service`]: the gRPC service over it.
//! - [`server`]: listening, the reaper, signals, graceful shutdown.

pub mod checkpoints;
pub mod config;
pub mod membership;
pub mod server;
pub mod service;
pub mod spawn;
