//! Helpers shared by the `kv-distill` binary's integration tests.

use std::path::PathBuf;

/// The fetched assets: `$KVD_ASSETS`, else `$KVD_CACHE/assets` (default
/// `~/.cache/kv-distill/assets`).
pub(crate) fn assets() -> PathBuf {
    if let Ok(a) = std::env::var("KVD_ASSETS") {
        return a.into();
    }
    let cache = std::env::var("KVD_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
                .join(".cache/kv-distill")
        });
    cache.join("assets")
}

/// The root of the QA sources ([`kvd_data::prepare::qa_root`]).
#[allow(dead_code)]
pub(crate) fn qa_sources() -> PathBuf {
    kvd_data::prepare::qa_root(&assets())
        .expect("QA sources: run scripts/setup.sh")
        .0
}

/// The real SmolLM2-135M-Instruct GGUF.
pub(crate) fn smollm2() -> String {
    assets()
        .join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        .to_string_lossy()
        .into_owned()
}
