//! kv-distill trainer library: decoder-only LMs on libtorch (tch), checkpoint
//! loading (HF safetensors, GGUF), generation, the KV-Distill method
//! (`distill`), the collectives below it (`collective`), and training above
//! both: the one training loop (`train_loop`), checkpoints of its state
//! (`checkpointer`) and the distributed worker (`worker`); tokenizers and GGUF
//! reading come from the `kvd-tokenizer` and `kvd-gguf` crates.

pub mod ablate;
pub mod chaos;
pub mod checkpoint;
pub mod checkpointer;
pub mod collective;
pub mod config;
pub mod cuda_graph;
pub mod device;
pub mod distill;
pub mod error;
pub mod eval;
pub mod generate;
pub use kvd_gguf as gguf;
pub mod kernel_profile;
pub mod model;
pub mod op_count;
pub use kvd_tokenizer as tokenizer;
pub mod train_loop;
pub mod weights;
pub mod worker;
