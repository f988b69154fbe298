//! Parquet long-context datasets read through `object_store`: the dataset
//! manifest, deterministic global sharding, the resumable cursor and the
//! example builder. Filled in by the data work; empty for now.
