//! Building a tokenizer from a GGUF file's `tokenizer.*` metadata.
//!
//! This mirrors transformers 5.x (`integrations/gguf/gguf_tokenizer_mapping.py`
//! plus the tokenizer classes it hands the vocabulary to), step by step:
//!
//! 1. The builder is picked from `tokenizer.ggml.model` and
//!    `general.architecture`:
//!    - `"gpt2"`: byte-level BPE (`GPT2Tokenizer`). Tokens not spelled in the
//!      GPT-2 byte alphabet are respelled byte by byte; merges from
//!      `tokenizer.ggml.merges`. Pre-tokenizer `ByteLevel(add_prefix_space=False)`,
//!      decoder `ByteLevel`, no normalizer.
//!    - `"llama"` with architecture `gemma`/`gemma2`/`gemma3`: `GemmaTokenizer`,
//!      a BPE with byte fallback (`fuse_unk`, `unk_token="<unk>"`). Tokens made
//!      only of whitespace that contain a space are respelled as that many
//!      `▁`; the file has no merges, so they are recovered from the vocabulary
//!      with the token's position in the file as its rank (not its score).
//!      Normalizer `Replace(" ", "▁")`, pre-tokenizer
//!      `Split(" ", merged_with_previous)`, decoder
//!      `Replace("▁", " ") + ByteFallback + Fuse`.
//!    - `"llama"` with architecture `phi3`: the `"llama"` build below, but the
//!      prefix space comes from a normalizer `Prepend("▁") + Replace(" ", "▁")`
//!      and there is no pre-tokenizer.
//!    - `"llama"` otherwise: `LlamaTokenizer`, a BPE with byte fallback
//!      (`fuse_unk`, no unk token), merges from the file or recovered from the
//!      vocabulary ranked by `tokenizer.ggml.scores`; pre-tokenizer
//!      `Metaspace("▁", prepend_scheme="first", split=False)`, decoder
//!      `Replace("▁", " ") + ByteFallback + Fuse + Strip(" ", 1, 0)`.
//!    - `"gemma4"`: `GemmaTokenizer` on the vocabulary as spelled, merges from
//!      the file or recovered by score.
//!    - anything else (`"t5"` Unigram included) is reported as unsupported.
//! 2. The class's own default special tokens are added as special added
//!    tokens when they are not added tokens yet (`<|endoftext|>` for GPT-2;
//!    `<s>`, `</s>`, `<unk>` for Llama; `<bos>`, `<eos>`, `<unk>`, `<pad>`,
//!    `<mask>` for Gemma), taking a new id if not in the vocabulary.
//! 3. Tokens of type CONTROL (3) become special added tokens (for byte-level
//!    vocabularies only those spelled in the byte alphabet); tokens of type
//!    USER_DEFINED (4) that are in the vocabulary become non-special added
//!    tokens. Neither is normalized.
//! 4. If `tokenizer.ggml.pre` names a known split regex (llama3, qwen2, ...),
//!    the pre-tokenizer becomes `Split(regex, isolated) + ByteLevel(use_regex=False)`.
//! 5. The special tokens `bos`/`eos`/`unk`/`pad` are the tokens at
//!    `tokenizer.ggml.{bos,eos,unknown,padding}_token_id` (plus `<mask>` for
//!    the gemma architectures); any that is not an added token yet is added
//!    as a special one.
//! 6. The post-processor is `TemplateProcessing` adding BOS / EOS according to
//!    `tokenizer.ggml.add_bos_token` / `add_eos_token` (`"llama"` models
//!    default to adding BOS; `"gemma4"` never does); when the file states
//!    neither, nothing is added.
//!
//! `tokenizer.chat_template` is the chat template. `tokenizer.ggml.add_space_prefix`
//! and `tokenizer.ggml.precompiled_charsmap` are not used, as in transformers.
//! `tokenizer.ggml.eot_token_id` / `eom_token_id` (not read by transformers)
//! only join [`Tokenizer::stop_token_ids`].

use std::collections::HashSet;
use std::path::Path;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use super::merges::{bytes_to_unicode, generate_merges, py_isspace, PyDict};
use super::{assemble, Parts, Tokenizer, TokenizerError};
use kvd_gguf::{GgufFile, GgufValue};

/// llama.cpp's token type CONTROL.
const TOKEN_TYPE_CONTROL: i64 = 3;
/// llama.cpp's token type USER_DEFINED.
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// The Llama 3 split regex (`_LLAMA3_SPLIT`).
const LLAMA3_SPLIT: &str = concat!(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}",
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);
/// Mistral's Tekken split regex (`_TEKKEN_SPLIT`).
const TEKKEN_SPLIT: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*",
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);
/// The GPT-4o split regex (`_GPT4O_SPLIT`).
const GPT4O_SPLIT: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);
/// Qwen2's split regex (`models/qwen2/tokenization_qwen2.py`).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen3.5's split regex (`models/qwen3_5/tokenization_qwen3_5.py`).
const QWEN35_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// `GGUF_PRE_TOKENIZER_SPLITS`: the split regex for a `tokenizer.ggml.pre` value.
fn split_regex(pre: &str) -> Option<&'static str> {
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" | "dbrx" | "smaug-bpe" => LLAMA3_SPLIT,
        "tekken" => TEKKEN_SPLIT,
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => QWEN2_SPLIT,
        "qwen35" => QWEN35_SPLIT,
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => GPT4O_SPLIT,
        _ => return None,
    })
}

/// Which transformers builder a file gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `byte_level_tokenizer` (`tokenizer.ggml.model = "gpt2"`).
    ByteLevel,
    /// `sentencepiece_tokenizer` with `LlamaTokenizer`.
    Llama,
    /// `phi3_tokenizer`.
    Phi3,
    /// `gemma_tokenizer` (gemma, gemma2, gemma3 architectures).
    Gemma,
    /// `sentencepiece_tokenizer` with `GemmaTokenizer` (`"gemma4"`).
    Gemma4,
}

/// `select_tokenizer_builder(architecture, tokenizer_type)`.
fn select(path: &Path, architecture: &str, model: Option<&str>) -> Result<Kind, TokenizerError> {
    match (model, architecture) {
        (Some("llama"), "gemma" | "gemma2" | "gemma3") => Ok(Kind::Gemma),
        (Some("llama"), "phi3") => Ok(Kind::Phi3),
        (Some("llama"), _) => Ok(Kind::Llama),
        (Some("gpt2"), _) => Ok(Kind::ByteLevel),
        (Some("gemma4"), _) => Ok(Kind::Gemma4),
        (Some(other), _) => Err(TokenizerError::Unsupported {
            path: path.to_path_buf(),
            key: "tokenizer.ggml.model".into(),
            value: other.into(),
            supported: "gpt2, llama, gemma4".into(),
        }),
        (None, _) => Err(TokenizerError::Missing {
            path: path.to_path_buf(),
            key: "tokenizer.ggml.model".into(),
        }),
    }
}

/// Typed access to the metadata, with errors naming the file and key.
struct Meta<'a> {
    file: &'a GgufFile,
    path: &'a Path,
}

impl<'a> Meta<'a> {
    fn invalid(&self, key: &str, reason: impl Into<String>) -> TokenizerError {
        TokenizerError::Invalid {
            path: self.path.to_path_buf(),
            key: key.into(),
            reason: reason.into(),
        }
    }

    fn build_err(&self, what: &str, source: tokenizers::Error) -> TokenizerError {
        TokenizerError::Build {
            path: self.path.to_path_buf(),
            what: what.into(),
            source,
        }
    }

    fn missing(&self, key: &str) -> TokenizerError {
        TokenizerError::Missing {
            path: self.path.to_path_buf(),
            key: key.into(),
        }
    }

    fn opt_str(&self, key: &str) -> Result<Option<&'a str>, TokenizerError> {
        match self.file.get(key) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| {
                self.invalid(key, format!("expected a string, found {}", v.type_name()))
            }),
        }
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>, TokenizerError> {
        match self.file.get(key) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| {
                self.invalid(key, format!("expected a bool, found {}", v.type_name()))
            }),
        }
    }

    fn opt_u64(&self, key: &str) -> Result<Option<u64>, TokenizerError> {
        match self.file.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                self.invalid(
                    key,
                    format!("expected a non-negative integer, found {}", v.type_name()),
                )
            }),
        }
    }

    fn opt_array(&self, key: &str) -> Result<Option<&'a [GgufValue]>, TokenizerError> {
        match self.file.get(key) {
            None => Ok(None),
            Some(v) => v.as_array().map(Some).ok_or_else(|| {
                self.invalid(key, format!("expected an array, found {}", v.type_name()))
            }),
        }
    }

    /// The array under `key` with every element converted by `conv`
    /// (`what` names the element type in the error).
    fn opt_list<T>(
        &self,
        key: &str,
        what: &str,
        conv: impl Fn(&'a GgufValue) -> Option<T>,
    ) -> Result<Option<Vec<T>>, TokenizerError> {
        let Some(items) = self.opt_array(key)? else {
            return Ok(None);
        };
        items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                conv(v).ok_or_else(|| {
                    self.invalid(
                        key,
                        format!("element {i} is {}, expected {what}", v.type_name()),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    fn opt_strings(&self, key: &str) -> Result<Option<Vec<&'a str>>, TokenizerError> {
        self.opt_list(key, "a string", GgufValue::as_str)
    }

    fn opt_ints(&self, key: &str) -> Result<Option<Vec<i64>>, TokenizerError> {
        self.opt_list(key, "an integer", GgufValue::as_i64)
    }

    fn opt_floats(&self, key: &str) -> Result<Option<Vec<f64>>, TokenizerError> {
        self.opt_list(key, "a number", GgufValue::as_f64)
    }

    /// The token at the id stored under `key`, if the key is present.
    fn token_at(
        &self,
        key: &str,
        tokens: &[&str],
    ) -> Result<Option<(u32, String)>, TokenizerError> {
        let Some(id) = self.opt_u64(key)? else {
            return Ok(None);
        };
        let token = usize::try_from(id)
            .ok()
            .and_then(|i| tokens.get(i))
            .ok_or_else(|| {
                self.invalid(
                    key,
                    format!(
                        "id {id} out of range (vocabulary has {} tokens)",
                        tokens.len()
                    ),
                )
            })?;
        // In range of a vector that fits u32 ids (checked by the caller).
        let id = u32::try_from(id).map_err(|_| self.invalid(key, format!("id {id} too large")))?;
        Ok(Some((id, (*token).to_string())))
    }
}

/// Builds the tokenizer `file` describes (see the module docs): the
/// vocabulary as the class spells it, the merges, the BPE model, the class's
/// normalizer/pre-tokenizer/decoder, its special tokens and GGUF's, then the
/// split regex of `tokenizer.ggml.pre`.
pub(crate) fn build(file: &GgufFile) -> Result<Tokenizer, TokenizerError> {
    let path = file.path();
    let meta = Meta { file, path };
    let architecture = meta
        .opt_str("general.architecture")?
        .ok_or_else(|| meta.missing("general.architecture"))?;
    let model = meta.opt_str("tokenizer.ggml.model")?;
    let kind = select(path, architecture, model)?;

    let tokens = meta
        .opt_strings("tokenizer.ggml.tokens")?
        .ok_or_else(|| meta.missing("tokenizer.ggml.tokens"))?;
    if u32::try_from(tokens.len()).is_err() {
        return Err(meta.invalid("tokenizer.ggml.tokens", "more than 2^32 tokens"));
    }
    let token_types = meta.opt_ints("tokenizer.ggml.token_type")?;
    let file_merges = meta.opt_strings("tokenizer.ggml.merges")?;
    let scores = meta.opt_floats("tokenizer.ggml.scores")?;
    let pre = meta.opt_str("tokenizer.ggml.pre")?;

    // `get_gguf_tokenizer`: the tokenizer_config part.
    let mut add_bos = meta.opt_bool("tokenizer.ggml.add_bos_token")?;
    let add_eos = meta.opt_bool("tokenizer.ggml.add_eos_token")?;
    match model {
        Some("llama") => {
            add_bos.get_or_insert(true);
        }
        Some("gemma4") => add_bos = Some(false),
        _ => {}
    }
    let specials = [
        ("bos_token", "tokenizer.ggml.bos_token_id"),
        ("eos_token", "tokenizer.ggml.eos_token_id"),
        ("unk_token", "tokenizer.ggml.unknown_token_id"),
        ("pad_token", "tokenizer.ggml.padding_token_id"),
    ]
    .into_iter()
    .map(|(attr, key)| Ok((attr, meta.token_at(key, &tokens)?)))
    .collect::<Result<Vec<_>, TokenizerError>>()?;
    let chat_template = meta.opt_str("tokenizer.chat_template")?.map(str::to_owned);
    let mut extra_stop_ids = Vec::new();
    for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
        if let Some((id, _)) = meta.token_at(key, &tokens)? {
            extra_stop_ids.push(id);
        }
    }

    let spelled = spell_vocab(kind, &tokens);
    let merges = merges(&meta, kind, &tokens, &spelled, file_merges, scores)?;
    let mut inner = tokenizers::Tokenizer::new(bpe_model(&meta, kind, &spelled, merges)?);
    let class_specials = configure_class(&meta, kind, &mut inner)?;

    // The class's default special tokens (`TokenizersBackend.__init__`).
    let mut seen = HashSet::new();
    let defaults: Vec<AddedToken> = class_specials
        .iter()
        .filter(|t| seen.insert(**t))
        .map(|t| AddedToken::from(*t, true))
        .collect();
    inner
        .add_tokens(defaults)
        .map_err(|e| meta.build_err("class special tokens", e))?;
    if let Some(types) = &token_types {
        add_gguf_special_tokens(&meta, kind, &mut inner, &tokens, types)?;
    }

    // `set_split_regex`.
    if let Some(regex) = pre.and_then(split_regex) {
        let split = Split::new(
            SplitPattern::Regex(regex.into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| meta.build_err("tokenizer.ggml.pre split regex", e))?;
        inner.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
            split.into(),
            ByteLevel::new(false, true, false).into(),
        ])));
    }

    assemble(Parts {
        inner,
        source: path.to_path_buf(),
        special_tokens: class_special_tokens(kind, specials),
        extra_special_tokens: Vec::new(),
        add_bos,
        add_eos,
        chat_template,
        template_source: path.to_path_buf(),
        extra_stop_ids,
        clean_up_tokenization_spaces: false,
    })
}

/// The vocabulary as the class's builder spells it.
fn spell_vocab(kind: Kind, tokens: &[&str]) -> Vec<String> {
    match kind {
        Kind::ByteLevel => {
            let alphabet = bytes_to_unicode();
            let in_alphabet: HashSet<char> = alphabet.iter().copied().collect();
            tokens
                .iter()
                .map(|t| {
                    if t.chars().all(|c| in_alphabet.contains(&c)) {
                        (*t).to_string()
                    } else {
                        t.bytes().map(|b| alphabet[usize::from(b)]).collect()
                    }
                })
                .collect()
        }
        Kind::Gemma => tokens
            .iter()
            .map(|t| {
                if t.contains(' ') && t.chars().all(py_isspace) {
                    "\u{2581}".repeat(t.chars().count())
                } else {
                    (*t).to_string()
                }
            })
            .collect(),
        Kind::Llama | Kind::Phi3 | Kind::Gemma4 => {
            tokens.iter().map(|t| (*t).to_string()).collect()
        }
    }
}

/// `get_merges`: from the file, or recovered from the vocabulary. The
/// byte-level builder recovers them from the tokens as the file spells them.
fn merges(
    meta: &Meta<'_>,
    kind: Kind,
    tokens: &[&str],
    spelled: &[String],
    file_merges: Option<Vec<&str>>,
    scores: Option<Vec<f64>>,
) -> Result<Vec<(String, String)>, TokenizerError> {
    if let Some(lines) = file_merges {
        return lines
            .iter()
            .enumerate()
            .map(|(i, line)| {
                let mut parts = line.split(' ');
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(a), Some(b), None) => Ok((a.to_string(), b.to_string())),
                    _ => Err(meta.invalid(
                        "tokenizer.ggml.merges",
                        format!("entry {i} ({line:?}) is not two tokens separated by one space"),
                    )),
                }
            })
            .collect();
    }
    let merge_tokens: Vec<&str> = match kind {
        Kind::Gemma => spelled.iter().map(String::as_str).collect(),
        _ => tokens.to_vec(),
    };
    let merge_vocab = PyDict::from_pairs(
        merge_tokens
            .iter()
            .enumerate()
            .map(|(i, t)| ((*t).to_string(), i as u32)),
    );
    let ranks = match kind {
        // Gemma: the position in the file, not the score.
        Kind::Gemma => PyDict::from_pairs(
            merge_tokens
                .iter()
                .enumerate()
                .map(|(i, t)| ((*t).to_string(), -(i as f64))),
        ),
        _ => {
            let scores = scores.ok_or_else(|| {
                meta.invalid(
                    "tokenizer.ggml.scores",
                    "missing; needed to recover the merges, as tokenizer.ggml.merges is absent",
                )
            })?;
            PyDict::from_pairs(
                merge_tokens
                    .iter()
                    .zip(scores.iter())
                    .map(|(t, s)| ((*t).to_string(), *s)),
            )
        }
    };
    Ok(generate_merges(&merge_vocab, Some(&ranks)))
}

/// The BPE model of the class over the spelled vocabulary.
fn bpe_model(
    meta: &Meta<'_>,
    kind: Kind,
    spelled: &[String],
    merges: Vec<(String, String)>,
) -> Result<BPE, TokenizerError> {
    let vocab = PyDict::from_pairs(
        spelled
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32)),
    );
    let bpe_vocab: Vocab = vocab
        .entries()
        .iter()
        .map(|(t, id)| (t.clone(), *id))
        .collect();
    let builder = BPE::builder().vocab_and_merges(bpe_vocab, merges);
    match kind {
        Kind::ByteLevel => builder
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix(String::new())
            .fuse_unk(false),
        Kind::Llama | Kind::Phi3 => builder.fuse_unk(true).byte_fallback(true),
        Kind::Gemma | Kind::Gemma4 => builder
            .fuse_unk(true)
            .unk_token("<unk>".into())
            .byte_fallback(true),
    }
    .build()
    .map_err(|e| meta.build_err("BPE model", e))
}

/// The class's normalizer, pre-tokenizer and decoder on `inner`; returns the
/// class's default special tokens.
fn configure_class(
    meta: &Meta<'_>,
    kind: Kind,
    inner: &mut tokenizers::Tokenizer,
) -> Result<&'static [&'static str], TokenizerError> {
    let replace = |from: &str, to: &str| {
        Replace::new(from, to).map_err(|e| meta.build_err("replace rule", e))
    };
    Ok(match kind {
        Kind::ByteLevel => {
            inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
            inner.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
            &["<|endoftext|>"]
        }
        Kind::Llama | Kind::Phi3 => {
            if kind == Kind::Phi3 {
                let normalizer = NormalizerSequence::new(vec![
                    Prepend::new("\u{2581}".into()).into(),
                    replace(" ", "\u{2581}")?.into(),
                ]);
                inner
                    .with_normalizer(Some(normalizer))
                    .map_err(|e| meta.build_err("normalizer", e))?;
            } else {
                inner.with_pre_tokenizer(Some(Metaspace::new(
                    '\u{2581}',
                    PrependScheme::First,
                    false,
                )));
            }
            inner.with_decoder(Some(DecoderSequence::new(vec![
                DecoderWrapper::Replace(replace("\u{2581}", " ")?),
                ByteFallback::new().into(),
                Fuse::new().into(),
                Strip::new(' ', 1, 0).into(),
            ])));
            // bos, eos, unk of `LlamaTokenizer`.
            &["<s>", "</s>", "<unk>"]
        }
        Kind::Gemma | Kind::Gemma4 => {
            inner
                .with_normalizer(Some(replace(" ", "\u{2581}")?))
                .map_err(|e| meta.build_err("normalizer", e))?;
            let split = Split::new(" ", SplitDelimiterBehavior::MergedWithPrevious, false)
                .map_err(|e| meta.build_err("pre-tokenizer", e))?;
            inner.with_pre_tokenizer(Some(split));
            inner.with_decoder(Some(DecoderSequence::new(vec![
                DecoderWrapper::Replace(replace("\u{2581}", " ")?),
                ByteFallback::new().into(),
                Fuse::new().into(),
            ])));
            // bos, eos, unk, pad, mask of `GemmaTokenizer`.
            &["<bos>", "<eos>", "<unk>", "<pad>", "<mask>"]
        }
    })
}

/// `add_gguf_special_tokens`: control tokens as special, user-defined ones
/// as added tokens.
fn add_gguf_special_tokens(
    meta: &Meta<'_>,
    kind: Kind,
    inner: &mut tokenizers::Tokenizer,
    tokens: &[&str],
    types: &[i64],
) -> Result<(), TokenizerError> {
    let alphabet: Option<HashSet<char>> =
        (kind == Kind::ByteLevel).then(|| bytes_to_unicode().iter().copied().collect());
    let control: Vec<AddedToken> = tokens
        .iter()
        .zip(types.iter())
        .filter(|(t, ty)| {
            **ty == TOKEN_TYPE_CONTROL
                && alphabet
                    .as_ref()
                    .is_none_or(|a| t.chars().all(|c| a.contains(&c)))
        })
        .map(|(t, _)| AddedToken::from(*t, true))
        .collect();
    if !control.is_empty() {
        inner
            .add_special_tokens(control)
            .map_err(|e| meta.build_err("control tokens", e))?;
    }
    let user_defined: Vec<AddedToken> = tokens
        .iter()
        .zip(types.iter())
        .filter(|(t, ty)| **ty == TOKEN_TYPE_USER_DEFINED && inner.token_to_id(t).is_some())
        .map(|(t, _)| AddedToken::from(*t, false).normalized(false))
        .collect();
    if !user_defined.is_empty() {
        inner
            .add_tokens(user_defined)
            .map_err(|e| meta.build_err("user-defined tokens", e))?;
    }
    Ok(())
}

/// The tokenizer class's special tokens: those the file names by id, and
/// Gemma's mask.
fn class_special_tokens(
    kind: Kind,
    specials: Vec<(&str, Option<(u32, String)>)>,
) -> Vec<(String, AddedToken)> {
    let mut out: Vec<(String, AddedToken)> = specials
        .into_iter()
        .filter_map(|(attr, token)| Some((attr.to_string(), AddedToken::from(token?.1, true))))
        .collect();
    if kind == Kind::Gemma {
        out.push(("mask_token".into(), AddedToken::from("<mask>", true)));
    }
    out
}
