//! Errors of model configuration, weight loading and inference.

use std::path::PathBuf;

/// Everything that can go wrong while loading or running a model. Every variant
/// that stems from a file names that file, and the field or tensor at fault.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read.
    #[error("{path}: cannot read: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A JSON file did not parse.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        source: serde_json::Error,
    },
    /// A required configuration field is absent.
    #[error("{path}: required config field `{field}` is missing")]
    MissingField {
        /// The config file (config.json or GGUF).
        path: PathBuf,
        /// The field.
        field: String,
    },
    /// A configuration field has a value this crate cannot use.
    #[error("{path}: config field `{field}`: {msg}")]
    BadField {
        /// The config file.
        path: PathBuf,
        /// The field.
        field: String,
        /// What is wrong with it.
        msg: String,
    },
    /// The checkpoint's architecture is not implemented.
    #[error(
        "{path}: unsupported architecture `{arch}` (supported: llama, mistral, qwen2, gemma3)"
    )]
    UnknownArchitecture {
        /// The config file.
        path: PathBuf,
        /// The architecture it names.
        arch: String,
    },
    /// A weight the architecture needs is absent from the checkpoint.
    #[error("{path}: weight `{name}` is missing")]
    MissingWeight {
        /// The checkpoint (directory, index or GGUF file).
        path: PathBuf,
        /// The weight's (HF) name.
        name: String,
    },
    /// A weight has the wrong shape for the configuration.
    #[error("{path}: weight `{name}` has shape {got:?}, the config implies {expected:?}")]
    WeightShape {
        /// The file holding the weight.
        path: PathBuf,
        /// The weight's (HF) name.
        name: String,
        /// Its shape in the file.
        got: Vec<i64>,
        /// The shape the config implies.
        expected: Vec<i64>,
    },
    /// A safetensors file is malformed or truncated, or holds an unsupported dtype.
    #[error("{path}: {msg}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// The tokenizer knows ids the embedding matrix has no row for.
    #[error("vocab size mismatch: the tokenizer has {tokenizer} tokens but the embedding `{name}` in {path} has {embedding} rows")]
    VocabMismatch {
        /// The checkpoint.
        path: PathBuf,
        /// The embedding weight's name.
        name: String,
        /// Tokens in the tokenizer.
        tokenizer: usize,
        /// Rows of the embedding matrix.
        embedding: usize,
    },
    /// A GGUF-level failure (malformed file, unsupported tensor type, ...).
    #[error(transparent)]
    Gguf(#[from] crate::gguf::GgufError),
    /// A tokenizer failure.
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    /// A libtorch failure.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// A dataset failure (names the file, row and column).
    #[error(transparent)]
    Data(#[from] kvd_data::DataError),
    /// An evaluation-set or plotting failure (names the file and field).
    #[error(transparent)]
    Eval(#[from] crate::eval::EvalError),
    /// A caller passed inputs the model cannot take.
    #[error("invalid input: {0}")]
    Input(String),
    /// A checkpoint cannot be read or does not fit (names the manifest or part).
    #[error("checkpoint {0}")]
    Checkpoint(String),
    /// The coordinator could not be reached or refused a request (a
    /// transport or protocol failure, not bad input).
    #[error("{0}")]
    Coordinator(String),
    /// An object could not be written to or read from storage (names the URL).
    #[error("storage: {0}")]
    Storage(String),
    /// A signal (SIGTERM, SIGINT) stopped the process; it left the job cleanly.
    #[error("{reason}")]
    Interrupted {
        /// The signal's number.
        signal: i32,
        /// What happened, for the exit message.
        reason: String,
    },
    /// The device ran out of memory; names the work that needed it and how
    /// to make it fit.
    #[error("out of memory {what}: {detail}\n  fix: {fix}")]
    OutOfMemory {
        /// The work that ran out (e.g. `in a micro-batch of 16 examples of up to 1024 tokens`).
        what: String,
        /// libtorch's message (its first line).
        detail: String,
        /// How to make the work fit (e.g. `a smaller --micro-batch ...`).
        fix: String,
    },
    /// A libtorch operation panicked (tch's infallible operations abort the
    /// thread on an error; the step catches it).
    #[error("libtorch failed {what}: {detail}")]
    Panic {
        /// The work that failed.
        what: String,
        /// The panic's message.
        detail: String,
    },

    /// A collective (gradient all-reduce) failed: a peer died, timed out or
    /// the communicator was aborted by the coordinator's order.
    #[error(transparent)]
    Collective(#[from] crate::collective::CollectiveError),
}

/// Result alias for this crate's model code.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl From<kvd_data::StoreError> for ModelError {
    /// Object-store failures read like the data pipeline's (naming the object).
    fn from(e: kvd_data::StoreError) -> Self {
        ModelError::Data(e.into())
    }
}

impl ModelError {
    /// Whether this is the device running out of memory (typed, or libtorch's message).
    pub fn is_out_of_memory(&self) -> bool {
        match self {
            ModelError::OutOfMemory { .. } => true,
            ModelError::Torch(e) => is_oom_message(&e.to_string()),
            ModelError::Panic { detail, .. } => is_oom_message(detail),
            _ => false,
        }
    }

    /// This error as [`ModelError::OutOfMemory`] naming `what` and the `fix`
    /// when it is one, else unchanged.
    pub fn with_oom_context(self, what: impl FnOnce() -> String, fix: &str) -> ModelError {
        if !self.is_out_of_memory() {
            return self;
        }
        let detail = match self {
            ModelError::OutOfMemory { detail, .. } | ModelError::Panic { detail, .. } => detail,
            other => other.to_string(),
        };
        ModelError::OutOfMemory {
            what: what(),
            detail: torch_message(&detail).to_string(),
            fix: fix.to_string(),
        }
    }
}

/// The fix an out-of-memory training step suggests.
pub const TRAIN_OOM_FIX: &str =
    "a smaller --micro-batch (gradients accumulate to the same --global-batch) or a shorter --max-len";

/// libtorch's own message inside `detail`, without what wraps it: the
/// `called \`Result::unwrap()\` on an \`Err\` value: Torch("...")` of a caught
/// panic, and the C++ backtrace libtorch appends (after its first line, or
/// after an escaped `\n` in a panic's debug-formatted message).
fn torch_message(detail: &str) -> &str {
    let inner = detail
        .split_once("Torch(\"")
        .map_or(detail, |(_, rest)| rest);
    let first = inner.split("\\n").next().unwrap_or(inner);
    let first = first.lines().next().unwrap_or(first);
    first.trim_end_matches("\")").trim_end()
}

/// Whether libtorch's message `m` reports a failed allocation: CUDA's
/// "out of memory" or the CPU allocator's "not enough memory" / "can't
/// allocate memory".
fn is_oom_message(m: &str) -> bool {
    m.contains("out of memory")
        || m.contains("not enough memory")
        || m.contains("can't allocate memory")
}

thread_local! {
    /// How many [`catch_panic`] calls this thread is inside.
    static CATCHING: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Installs (once) a panic hook that stays silent for panics [`catch_panic`]
/// turns into errors (their message travels in the error) and defers to the
/// previous hook for every other panic.
fn quiet_caught_panics() {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if CATCHING.with(|c| c.get()) == 0 {
                previous(info);
            }
        }));
    });
}

/// Runs `f`, turning a panic inside it (tch's infallible operations panic on
/// a libtorch error, e.g. CUDA out of memory) into [`ModelError::Panic`]
/// naming `what`, so a worker reports it instead of aborting (and prints no
/// panic message of its own).
pub fn catch_panic<T>(what: impl FnOnce() -> String, f: impl FnOnce() -> Result<T>) -> Result<T> {
    quiet_caught_panics();
    CATCHING.with(|c| c.set(c.get() + 1));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    CATCHING.with(|c| c.set(c.get() - 1));
    match r {
        Ok(r) => r,
        Err(p) => {
            let detail = p
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| p.downcast_ref::<&str>().copied())
                .unwrap_or("no message")
                .to_string();
            Err(ModelError::Panic {
                what: what(),
                detail,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_error_naming_the_work() {
        let r: Result<()> = catch_panic(
            || "in step 3".into(),
            || {
                panic!("called `Result::unwrap()` on an `Err` value: Torch(\"CUDA out of memory. Tried to allocate 974.00 MiB\\nException raised from malloc at CUDACachingAllocator.cpp:1574\\nframe #0: c10::Error\")")
            },
        );
        let e = r.unwrap_err();
        assert!(matches!(e, ModelError::Panic { .. }), "{e:?}");
        assert!(e.is_out_of_memory());
        let e = e.with_oom_context(
            || "in a micro-batch of 16 examples of up to 1024 tokens".into(),
            TRAIN_OOM_FIX,
        );
        let msg = e.to_string();
        assert_eq!(
            msg.lines().next().unwrap(),
            "out of memory in a micro-batch of 16 examples of up to 1024 tokens: CUDA out of memory. Tried to allocate 974.00 MiB",
            "{msg}"
        );
        assert!(msg.contains("smaller --micro-batch"), "{msg}");
        assert!(!msg.contains("invalid input"), "{msg}");
    }

    #[test]
    fn other_errors_keep_their_kind() {
        let e = ModelError::Input("bad".into()).with_oom_context(|| "x".into(), "y");
        assert_eq!(e.to_string(), "invalid input: bad");
        assert_eq!(catch_panic(|| "x".into(), || Ok(5)).unwrap(), 5);
    }
}
