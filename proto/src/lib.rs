//! The coordinator/worker gRPC API (tonic + prost) and the plain types shared by
//! the coordinator and the workers.
//!
//! - [`v1`]: the generated messages, the client ([`v1::coordinator_client`]) and
//!   the server trait ([`v1::coordinator_server`]) of `kvd.v1.Coordinator`
//!   (`proto/kvd/v1/coordinator.proto`, which documents the protocol).
//! - [`client::connect`]: a client with the job token and the size limits set.
//! - [`auth`]: the bearer-token interceptors (client and server side).
//! - [`CheckpointManifest`]: what a distributed checkpoint is made of.
//! - [`report::error_chain`]: an error and its causes on one line, each once.
//! - [`status`]: protocol conditions in gRPC statuses (the job's end).

pub mod auth;
pub mod client;
mod manifest;
pub mod report;
pub mod status;

pub use manifest::{CheckpointManifest, CheckpointPart, ManifestError, MANIFEST_FORMAT_VERSION};

/// Generated code of the `kvd.v1` protobuf package.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("kvd.v1");
}

/// Protocol version spoken by this build; the coordinator rejects workers
/// registering with another one. Bumped when the meaning of `kvd.v1` messages
/// changes (new fields alone do not bump it).
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest gRPC message (encoded or decoded) accepted by the coordinator and
/// by [`client::connect`]'s client: 4 MiB.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// Size of an NCCL unique id (`NCCL_UNIQUE_ID_BYTES` in nccl.h).
pub const NCCL_UNIQUE_ID_BYTES: usize = 128;

/// Port the coordinator listens on unless told otherwise.
pub const DEFAULT_PORT: u16 = 50051;
