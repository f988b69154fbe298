//! Tokenizers and chat templates, built to give the same token ids, decodes
//! and rendered prompts as HF transformers.
//!
//! Two sources:
//!
//! - [`Tokenizer::from_gguf`]: a GGUF file's `tokenizer.*` metadata, rebuilt
//!   the way transformers does for `AutoTokenizer.from_pretrained(dir,
//!   gguf_file=...)` (`transformers/integrations/gguf/gguf_tokenizer_mapping.py`):
//!   byte-level BPE for `tokenizer.ggml.model = "gpt2"`, byte-fallback BPE for
//!   the SentencePiece-style `"llama"` / `"gemma4"` models (merges from the
//!   file, or recovered from the vocabulary), Gemma's respelling and merge
//!   order for the gemma architectures, and the control / user-defined token
//!   types as added tokens.
//! - [`Tokenizer::from_hf_dir`]: an HF tokenizer directory
//!   (`tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`,
//!   `special_tokens_map.json`, `generation_config.json`, `config.json`).
//!
//! Chat templates are the model's own Jinja templates, rendered with
//! minijinja configured like transformers' sandboxed Jinja environment
//! (see [`chat`]).

pub mod chat;
mod error;
pub mod gguf;
pub mod hf;
mod merges;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use tokenizers::processors::template::TemplateProcessing;
use tokenizers::AddedToken;

pub use error::TokenizerError;

/// One chat message, as passed to a chat template (`{"role": ..., "content": ...}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// `"system"`, `"user"`, `"assistant"`, ...
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// A message with the given role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Token strings that end a generation turn in some chat format. Those of
/// them that are in a tokenizer's vocabulary join its
/// [`Tokenizer::stop_token_ids`] (llama.cpp treats the same strings as
/// end-of-generation tokens).
pub const END_OF_TURN_TOKENS: &[&str] = &[
    "<|im_end|>",
    "<end_of_turn>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<|return|>",
    "<|call|>",
    "<EOT>",
];

/// The named special-token attributes of transformers
/// (`PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES`), in its order.
pub(crate) const SPECIAL_TOKEN_ATTRIBUTES: &[&str] = &[
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// A text tokenizer with its special tokens and chat template.
///
/// Wraps a [`tokenizers::Tokenizer`] whose pipeline (normalizer,
/// pre-tokenizer, model, post-processor, decoder, added tokens) is the one
/// transformers builds for the same source, so [`Tokenizer::encode`] and
/// [`Tokenizer::decode`] agree with `tokenizer(text, add_special_tokens=...)`
/// A token's character range `[start, end)` in its text.
pub type CharRange = (usize, usize);

/// and `tokenizer.decode(ids, skip_special_tokens=...)`.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    source: PathBuf,
    special_tokens: Vec<(String, String)>,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    stop_ids: Vec<u32>,
    chat_template: Option<String>,
    template_source: PathBuf,
    clean_up_tokenization_spaces: bool,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size())
            .field("special_tokens", &self.special_tokens)
            .field("stop_ids", &self.stop_ids)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

/// Everything a loader gathers before [`assemble`] finishes the tokenizer the
/// way `TokenizersBackend.__init__` does.
pub(crate) struct Parts {
    /// The backend with model, normalizer, pre-tokenizer, decoder and the
    /// added tokens so far.
    pub inner: tokenizers::Tokenizer,
    /// The file the tokenizer comes from (named in errors).
    pub source: PathBuf,
    /// Named special tokens (`bos_token`, ...) in
    /// [`SPECIAL_TOKEN_ATTRIBUTES`] order, then model-specific ones
    /// (`image_token`, ...).
    pub special_tokens: Vec<(String, AddedToken)>,
    /// Extra special tokens (`extra_special_tokens` /
    /// `additional_special_tokens`).
    pub extra_special_tokens: Vec<AddedToken>,
    /// `add_bos_token`, when the source states it.
    pub add_bos: Option<bool>,
    /// `add_eos_token`, when the source states it.
    pub add_eos: Option<bool>,
    /// The chat template.
    pub chat_template: Option<String>,
    /// The file the chat template comes from (named in template errors).
    pub template_source: PathBuf,
    /// More end-of-sequence ids (GGUF eot/eom ids, `generation_config.json`...).
    pub extra_stop_ids: Vec<u32>,
    /// `clean_up_tokenization_spaces` (only honoured for non-BPE models, as
    /// transformers does).
    pub clean_up_tokenization_spaces: bool,
}

/// Finishes a tokenizer like `TokenizersBackend.__init__`: adds the named and
/// extra special tokens that are not added tokens yet, and rebuilds the
/// post-processor from `add_bos_token` / `add_eos_token` when the source
/// states either (or has no post-processor).
pub(crate) fn assemble(parts: Parts) -> Result<Tokenizer, TokenizerError> {
    let Parts {
        mut inner,
        source,
        special_tokens,
        extra_special_tokens,
        add_bos,
        add_eos,
        chat_template,
        template_source,
        extra_stop_ids,
        clean_up_tokenization_spaces,
    } = parts;

    let named: HashSet<String> = special_tokens
        .iter()
        .map(|(_, t)| t.content.clone())
        .collect();
    let mut encoder: HashSet<String> = inner
        .get_added_tokens_decoder()
        .into_values()
        .map(|t| t.content)
        .collect();
    let mut to_add = Vec::new();
    for token in special_tokens
        .iter()
        .map(|(_, t)| t)
        .chain(extra_special_tokens.iter())
    {
        if encoder.insert(token.content.clone()) {
            let mut token = token.clone();
            if named.contains(&token.content) {
                token.special = true;
            }
            to_add.push(token);
        }
    }
    if !to_add.is_empty() {
        inner
            .add_tokens(to_add)
            .map_err(|source_err| TokenizerError::Build {
                path: source.clone(),
                what: "special tokens".into(),
                source: source_err,
            })?;
    }

    let token_of = |name: &str| {
        special_tokens
            .iter()
            .find(|(attr, _)| *attr == name)
            .map(|(_, t)| t.content.clone())
    };
    let bos = token_of("bos_token");
    let eos = token_of("eos_token");

    if add_bos.is_some() || add_eos.is_some() || inner.get_post_processor().is_none() {
        let processor = template_processor(
            &inner,
            &source,
            bos.as_deref().filter(|_| add_bos.unwrap_or(false)),
            eos.as_deref().filter(|_| add_eos.unwrap_or(false)),
        )?;
        inner.with_post_processor(Some(processor));
    }
    inner
        .with_truncation(None)
        .map_err(|source_err| TokenizerError::Build {
            path: source.clone(),
            what: "truncation".into(),
            source: source_err,
        })?;
    inner.with_padding(None);

    let bos_id = bos.as_deref().and_then(|t| inner.token_to_id(t));
    let eos_id = eos.as_deref().and_then(|t| inner.token_to_id(t));
    let mut stop_ids: Vec<u32> = Vec::new();
    let candidates = eos_id.into_iter().chain(extra_stop_ids).chain(
        END_OF_TURN_TOKENS
            .iter()
            .filter_map(|t| inner.token_to_id(t)),
    );
    for id in candidates {
        if !stop_ids.contains(&id) {
            stop_ids.push(id);
        }
    }

    Ok(Tokenizer {
        inner,
        source,
        special_tokens: special_tokens
            .into_iter()
            .map(|(attr, t)| (attr, t.content))
            .collect(),
        bos_id,
        eos_id,
        stop_ids,
        chat_template,
        template_source,
        clean_up_tokenization_spaces,
    })
}

/// `TokenizersBackend.update_post_processor()`: `"[bos:0 ]$A:0[ eos:0]"` and
/// `"[bos:0 ]$A:0[ eos:0][ bos:1] $B:1[ eos:1]"`.
fn template_processor(
    inner: &tokenizers::Tokenizer,
    source: &Path,
    bos: Option<&str>,
    eos: Option<&str>,
) -> Result<TemplateProcessing, TokenizerError> {
    let build_err = |e: String| TokenizerError::Build {
        path: source.to_path_buf(),
        what: "post-processor".into(),
        source: e.into(),
    };
    let mut specials: Vec<(String, u32)> = Vec::new();
    for (attr, token) in [("bos_token", bos), ("eos_token", eos)] {
        if let Some(token) = token {
            let id = inner
                .token_to_id(token)
                .ok_or_else(|| TokenizerError::Invalid {
                    path: source.to_path_buf(),
                    key: attr.into(),
                    reason: format!("{token:?} is not in the vocabulary"),
                })?;
            specials.push((token.to_string(), id));
        }
    }
    let single = format!(
        "{}$A:0{}",
        bos.map(|b| format!("{b}:0 ")).unwrap_or_default(),
        eos.map(|e| format!(" {e}:0")).unwrap_or_default()
    );
    let pair = format!(
        "{single}{} $B:1{}",
        bos.map(|b| format!(" {b}:1")).unwrap_or_default(),
        eos.map(|e| format!(" {e}:1")).unwrap_or_default()
    );
    TemplateProcessing::builder()
        .try_single(single)
        .map_err(build_err)?
        .try_pair(pair)
        .map_err(build_err)?
        .special_tokens(specials)
        .build()
        .map_err(|e| build_err(e.to_string()))
}

impl Tokenizer {
    /// Builds the tokenizer a GGUF file describes, exactly as transformers
    /// does for `AutoTokenizer.from_pretrained(dir, gguf_file=name)`.
    ///
    /// See [`gguf`] for what is built for each `tokenizer.ggml.model`.
    pub fn from_gguf(file: &kvd_gguf::GgufFile) -> Result<Self, TokenizerError> {
        gguf::build(file)
    }

    /// Loads an HF tokenizer directory like transformers 5 does:
    /// `tokenizer.json`, plus (when present) `tokenizer_config.json` (special
    /// tokens, `chat_template`, ...), `chat_template.jinja`,
    /// `special_tokens_map.json`, and the `eos_token_id` of
    /// `generation_config.json` / `config.json` for the stop tokens.
    ///
    /// As in transformers 5, `add_bos_token` / `add_eos_token` in
    /// `tokenizer_config.json` are ignored: `tokenizer.json`'s post-processor
    /// decides what `add_special_tokens=true` adds. See [`hf`].
    pub fn from_hf_dir(dir: &Path) -> Result<Self, TokenizerError> {
        hf::load(dir)
    }

    /// Token ids of `text`, as `tokenizer(text, add_special_tokens=...)["input_ids"]`.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|source| TokenizerError::Encode {
                path: self.source.clone(),
                source,
            })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Token ids of `text` (no special tokens) with each token's
    /// [`CharRange`] in `text`.
    pub fn encode_with_offsets(
        &self,
        text: &str,
    ) -> Result<(Vec<u32>, Vec<CharRange>), TokenizerError> {
        let encoding = self
            .inner
            .encode_char_offsets(text, false)
            .map_err(|source| TokenizerError::Encode {
                path: self.source.clone(),
                source,
            })?;
        Ok((encoding.get_ids().to_vec(), encoding.get_offsets().to_vec()))
    }

    /// Text of `ids`, as `tokenizer.decode(ids, skip_special_tokens=...)`.
    /// Ids outside the vocabulary are skipped, as the `tokenizers` library does.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        let text = self
            .inner
            .decode(ids, skip_special_tokens)
            .map_err(|source| TokenizerError::Decode {
                path: self.source.clone(),
                source,
            })?;
        let is_bpe = matches!(
            self.inner.get_model(),
            tokenizers::models::ModelWrapper::BPE(_)
        );
        if self.clean_up_tokenization_spaces && !is_bpe {
            Ok(clean_up_tokenization(&text))
        } else {
            Ok(text)
        }
    }

    /// Size of the vocabulary including added tokens (`len(hf_tokenizer)`).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Id of the beginning-of-sequence token, if the tokenizer has one.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// Id of the end-of-sequence token, if the tokenizer has one.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// Ids that end a generation: the eos token, the source's other eos ids
    /// (GGUF `tokenizer.ggml.eot_token_id` / `eom_token_id`,
    /// `generation_config.json` / `config.json` `eos_token_id`), and the
    /// [`END_OF_TURN_TOKENS`] present in the vocabulary. No duplicates; eos first.
    pub fn stop_token_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// The named special tokens (`("bos_token", "<bos>")`, ...) in
    /// transformers' attribute order; these are the variables a chat
    /// template sees besides `messages`.
    pub fn special_tokens(&self) -> &[(String, String)] {
        &self.special_tokens
    }

    /// The model's chat template (Jinja source), if it has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Renders `messages` with the model's chat template, like
    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`.
    ///
    /// Fails with [`TokenizerError::NoChatTemplate`] if there is no template,
    /// and with [`TokenizerError::Template`] if it does not render (including
    /// the template calling `raise_exception`).
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        let template =
            self.chat_template
                .as_deref()
                .ok_or_else(|| TokenizerError::NoChatTemplate {
                    path: self.source.clone(),
                })?;
        chat::render(
            template,
            &self.template_source,
            messages,
            add_generation_prompt,
            &self.special_tokens,
        )
    }

    /// Id of a token string (added tokens first, then the model vocabulary).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token string of an id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The file the tokenizer was built from (the GGUF file, or the
    /// directory's `tokenizer.json`).
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// `PreTrainedTokenizerBase.clean_up_tokenization`.
fn clean_up_tokenization(text: &str) -> String {
    text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_up_matches_transformers() {
        assert_eq!(
            clean_up_tokenization("a , b . c ' d do n't I 'm it 's we 've they 're ?!"),
            "a, b. c'd don't I'm it's we've they're?!"
        );
    }
}
