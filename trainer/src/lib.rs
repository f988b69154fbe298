//! kv-distill trainer library: decoder-only LMs on libtorch (tch), checkpoint
//! loading (HF safetensors, GGUF), tokenizers and chat templates, generation.

pub mod ablate;
pub mod checkpoint;
pub mod checkpointer;
pub mod config;
pub mod cuda_graph;
pub mod device;
pub mod dist;
pub mod distill;
pub mod error;
pub mod eval;
pub mod generate;
pub use kvd_gguf as gguf;
pub mod model;
pub use kvd_tokenizer as tokenizer;
pub mod train_loop;
pub mod weights;
