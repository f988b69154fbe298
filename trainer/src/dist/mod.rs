//! Data-parallel training across processes: the gradient all-reduce behind
//! one [`Collective`] trait (NCCL on GPUs, a TCP star on CPUs), sharded
//! training-state checkpoints on object storage, fault injection for tests,
//! and the worker that runs the job under the coordinator.

pub mod bench;
pub mod chaos;
pub mod collective;
pub mod nccl;
pub mod state;
pub mod tcp;
pub mod worker;

pub use collective::{all_reduce_values, Collective, CollectiveError, FlatGrads, Single};
