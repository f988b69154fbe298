//! Tokenisation behind a small trait, so this crate does not depend on the
//! trainer (which links libtorch). The trainer adapts its own tokenizer to
//! [`TextTokenizer`]; [`HfTokenizer`] covers a plain `tokenizer.json`.

use std::path::Path;

use crate::error::{DataError, Result};

/// What the example builder needs from a tokenizer.
pub trait TextTokenizer: Send + Sync {
    /// Token ids of `text`, without special tokens.
    fn encode(&self, text: &str) -> Result<Vec<u32>>;
    /// The beginning-of-sequence id prepended to every example, if any.
    fn bos_id(&self) -> Option<u32>;
    /// The end-of-sequence id appended after an answer, if any.
    fn eos_id(&self) -> Option<u32>;
}

/// A bare `tokenizers::Tokenizer`: encodes without special tokens and has no
/// BOS/EOS (wrap it in [`HfTokenizer`] to set them).
impl TextTokenizer for tokenizers::Tokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = std::ops::Deref::deref(self)
            .encode(text, false)
            .map_err(|e| DataError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }
    fn bos_id(&self) -> Option<u32> {
        None
    }
    fn eos_id(&self) -> Option<u32> {
        None
    }
}

/// A `tokenizers::Tokenizer` with explicit BOS/EOS ids.
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    eos: Option<u32>,
}

/// Special-token names tried, in order, when guessing BOS and EOS.
const BOS_NAMES: &[&str] = &["<|begin_of_text|>", "<s>", "<bos>", "<|endoftext|>"];
const EOS_NAMES: &[&str] = &["<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>"];

impl HfTokenizer {
    /// Wraps `inner` with the given special ids.
    pub fn new(inner: tokenizers::Tokenizer, bos: Option<u32>, eos: Option<u32>) -> Self {
        Self { inner, bos, eos }
    }

    /// Loads `tokenizer.json`; BOS/EOS are guessed from common special-token
    /// names (`<s>`, `<|endoftext|>`, ...) unless set later with
    /// [`HfTokenizer::with_special`].
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| DataError::Tokenizer(format!("{}: {e}", path.display())))?;
        let find = |names: &[&str]| names.iter().find_map(|n| inner.token_to_id(n));
        let bos = find(BOS_NAMES);
        let eos = find(EOS_NAMES);
        Ok(Self { inner, bos, eos })
    }

    /// Overrides the special ids.
    pub fn with_special(mut self, bos: Option<u32>, eos: Option<u32>) -> Self {
        self.bos = bos;
        self.eos = eos;
        self
    }

    /// The wrapped tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

impl TextTokenizer for HfTokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        TextTokenizer::encode(&self.inner, text)
    }
    fn bos_id(&self) -> Option<u32> {
        self.bos
    }
    fn eos_id(&self) -> Option<u32> {
        self.eos
    }
}
