//! Shared helpers for the integration tests: where the Python oracle and the
//! fetched model assets live, and how to run an oracle script.

pub mod env;
pub mod tokens;
