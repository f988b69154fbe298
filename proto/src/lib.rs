//! The coordinator/worker gRPC API (tonic + prost) and the plain types shared by
//! every crate. Filled in by the distributed-training work; empty for now.
