//! KV-Distill (shared/METHOD.md): a trainable token scorer picks the top-k
//! positions of each compressible span, LoRA adaptors active only at those
//! positions shape their K/V, and the frozen decoder answers from the compressed
//! cache; the student is trained to match the full-cache teacher with a forward +
//! reverse KL mix.

pub mod adamw;
pub mod adaptor;
pub mod baselines;
pub mod cache_file;
pub mod checkpoint;
pub mod config;
pub mod diagnose;
pub mod dump;
pub mod examples;
pub mod flops;
pub mod infer;
pub mod loss;
pub mod phases;
pub mod select;
pub mod step;
pub mod step_graph;
pub mod student;
pub mod trainer;

pub use adaptor::Adaptor;
pub use baselines::{baseline_scores, baseline_scores_reusing, Baseline};
pub use config::{kept_count, DistillConfig, LoraConfig, ScoreFeed};
pub use step::{distill_step, with_pad_multiple, Backward, DistillExample, GradScale, StepStats};
pub use step_graph::StepGraphs;
pub use trainer::{OptStats, TrainConfig, Trainer};
