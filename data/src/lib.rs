//! Parquet long-context datasets read through `object_store`: the dataset
//! manifest, deterministic global sharding, the resumable cursor, the example
//! builder and padded batches, and `prepare` (Parquet from the raw sources).
//! See `data/README.md` for the model.

pub mod batch;
pub mod builder;
pub mod cursor;
pub mod dataset;
pub mod error;
pub mod loader;
pub mod manifest;
pub mod multiqa;
pub mod prepare;
pub mod reader;
pub mod schema;
pub mod shard;
pub mod synth;
pub mod tokenize;
pub mod writer;

pub use batch::{micro_batches, Batch};
pub use builder::{
    BadInputPolicy, BuildItem, BuilderConfig, Example, ExampleBuilder, QaTemplate, SkipStats,
};
pub use cursor::Cursor;
pub use dataset::{Dataset, DatasetOptions};
pub use error::{BadInputKind, DataError, Location, Result};
pub use kvd_store::{ObjectInfo, Source, StoreError, StoreOptions};
pub use loader::{Loader, LoaderConfig, RankBatch};
pub use manifest::{FileEntry, Manifest};
pub use schema::{Record, SchemaSpec};
pub use shard::{balanced_range, rank_slice, ExampleId, GlobalBatcher};
pub use tokenize::{HfTokenizer, TextTokenizer};
