//! Loading an HF tokenizer directory.
//!
//! The pipeline is `tokenizer.json` as the `tokenizers` library loads it
//! (what transformers' `TokenizersBackend` uses). On top of it, like
//! `PreTrainedTokenizerBase._from_pretrained` and `TokenizersBackend.__init__`:
//!
//! - `tokenizer_config.json`: the named special tokens (`bos_token`, ...,
//!   `mask_token`, plus model-specific `*_token` strings such as
//!   `image_token`), `extra_special_tokens` / `additional_special_tokens`,
//!   `added_tokens_decoder`; any of these that is not an added token yet is
//!   added. `clean_up_tokenization_spaces` and `split_special_tokens` are
//!   honoured; `chat_template` (a string, or a list of `{name, template}`
//!   whose `default` is used).
//! - `add_bos_token` / `add_eos_token` are ignored, as transformers 5 does
//!   whenever there is a `tokenizer.json`: its post-processor decides what
//!   `add_special_tokens=True` adds (a missing one means nothing is added).
//! - `special_tokens_map.json` (legacy) overrides the named special tokens
//!   when `tokenizer_config.json` has no `added_tokens_decoder`.
//! - `chat_template.jinja` overrides the config's `chat_template`.
//! - `generation_config.json` and `config.json` (`eos_token_id`, an id or a
//!   list; also `text_config.eos_token_id`) add stop tokens.
//!
//! Not replicated: transformers 5 rebuilds the normalizer / pre-tokenizer /
//! decoder from class code for some `tokenizer_class` values (e.g.
//! `GemmaTokenizer`, `LlamaTokenizer`) instead of using the ones in
//! `tokenizer.json`; for files written by transformers 5 they are the same.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use tokenizers::AddedToken;

use super::{assemble, Parts, Tokenizer, TokenizerError, SPECIAL_TOKEN_ATTRIBUTES};

/// Reads and parses a JSON file; `Ok(None)` if it does not exist.
fn read_json(path: &Path) -> Result<Option<Value>, TokenizerError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(TokenizerError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| TokenizerError::Json {
            path: path.to_path_buf(),
            source,
        })
}

/// Reads a JSON file that must hold an object; `Ok(None)` if it does not exist.
fn read_json_object(path: &Path) -> Result<Option<Map<String, Value>>, TokenizerError> {
    match read_json(path)? {
        None => Ok(None),
        Some(Value::Object(map)) => Ok(Some(map)),
        Some(other) => Err(TokenizerError::Invalid {
            path: path.to_path_buf(),
            key: "(top level)".into(),
            reason: format!("expected a JSON object, found {}", json_type(&other)),
        }),
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a bool",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Errors about one field of one file.
struct Field<'a> {
    path: &'a Path,
}

impl Field<'_> {
    fn invalid(&self, key: &str, reason: impl Into<String>) -> TokenizerError {
        TokenizerError::Invalid {
            path: self.path.to_path_buf(),
            key: key.into(),
            reason: reason.into(),
        }
    }

    /// A token given as a string (`AddedToken(s, special=True)`) or as a
    /// serialized `AddedToken` object; `None` for `null`.
    fn added_token(&self, key: &str, v: &Value) -> Result<Option<AddedToken>, TokenizerError> {
        match v {
            Value::Null => Ok(None),
            Value::String(s) => Ok(Some(AddedToken::from(s.as_str(), true))),
            Value::Object(m) => {
                let content = m.get("content").and_then(Value::as_str).ok_or_else(|| {
                    self.invalid(key, "token object without a string \"content\"")
                })?;
                let flag = |name: &str, default: bool| -> Result<bool, TokenizerError> {
                    match m.get(name) {
                        None | Some(Value::Null) => Ok(default),
                        Some(Value::Bool(b)) => Ok(*b),
                        Some(other) => Err(self.invalid(
                            key,
                            format!("\"{name}\" is {}, expected a bool", json_type(other)),
                        )),
                    }
                };
                let special = flag("special", false)?;
                Ok(Some(
                    AddedToken::from(content, special)
                        .single_word(flag("single_word", false)?)
                        .lstrip(flag("lstrip", false)?)
                        .rstrip(flag("rstrip", false)?)
                        .normalized(flag("normalized", !special)?),
                ))
            }
            other => Err(self.invalid(
                key,
                format!(
                    "expected a token string or object, found {}",
                    json_type(other)
                ),
            )),
        }
    }

    /// A list of tokens (strings or objects), or a `{name: token}` map.
    fn token_list(&self, key: &str, v: &Value) -> Result<Vec<AddedToken>, TokenizerError> {
        let items: Vec<&Value> = match v {
            Value::Null => return Ok(Vec::new()),
            Value::Array(a) => a.iter().collect(),
            Value::Object(m) => m.values().collect(),
            other => {
                return Err(self.invalid(
                    key,
                    format!("expected a list of tokens, found {}", json_type(other)),
                ))
            }
        };
        let mut out = Vec::new();
        for item in items {
            if let Some(mut t) = self.added_token(key, item)? {
                t.special = true;
                out.push(t);
            }
        }
        Ok(out)
    }

    fn opt_bool(
        &self,
        map: &Map<String, Value>,
        key: &str,
    ) -> Result<Option<bool>, TokenizerError> {
        match map.get(key) {
            None => Ok(None),
            Some(Value::Null) => Ok(Some(false)),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => {
                Err(self.invalid(key, format!("expected a bool, found {}", json_type(other))))
            }
        }
    }

    /// `eos_token_id`: an id or a list of ids.
    fn ids(&self, key: &str, v: &Value) -> Result<Vec<u32>, TokenizerError> {
        let one = |x: &Value| {
            x.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| self.invalid(key, format!("expected a token id, found {x}")))
        };
        match v {
            Value::Null => Ok(Vec::new()),
            Value::Array(a) => a.iter().map(one).collect(),
            x => Ok(vec![one(x)?]),
        }
    }
}

/// Loads the tokenizer of an HF directory (see the module docs):
/// tokenizer.json, then tokenizer_config.json's special tokens (with the
/// legacy special_tokens_map.json), its added tokens, flags and chat
/// template, and the eos ids of the generation config.
pub(crate) fn load(dir: &Path) -> Result<Tokenizer, TokenizerError> {
    let (tokenizer_path, mut inner) = read_tokenizer_json(dir)?;
    let config_path = dir.join("tokenizer_config.json");
    let config = read_json_object(&config_path)?.unwrap_or_default();
    let field = Field { path: &config_path };

    let (mut special, mut extra) = named_special_tokens(&field, &config)?;
    // Legacy special_tokens_map.json, read only without added_tokens_decoder.
    if !config.contains_key("added_tokens_decoder") {
        merge_special_tokens_map(dir, &mut special, &mut extra)?;
    }
    if let Some(v) = config.get("added_tokens_decoder") {
        add_decoder_tokens(&field, v, &special, &mut inner)?;
    }

    let clean_up = field
        .opt_bool(&config, "clean_up_tokenization_spaces")?
        .unwrap_or(false);
    if field
        .opt_bool(&config, "split_special_tokens")?
        .unwrap_or(false)
    {
        inner.set_encode_special_tokens(true);
    }
    let (chat_template, template_source) = chat_template(dir, &field, &config)?;

    assemble(Parts {
        inner,
        source: tokenizer_path,
        special_tokens: special
            .into_iter()
            .filter_map(|(name, t)| t.map(|t| (name, t)))
            .collect(),
        extra_special_tokens: extra,
        add_bos: None,
        add_eos: None,
        chat_template,
        template_source,
        extra_stop_ids: extra_stop_ids(dir)?,
        clean_up_tokenization_spaces: clean_up,
    })
}

/// The directory's tokenizer.json, parsed (malformed JSON told apart from
/// JSON that is not a tokenizer).
fn read_tokenizer_json(dir: &Path) -> Result<(PathBuf, tokenizers::Tokenizer), TokenizerError> {
    let meta = fs::metadata(dir).map_err(|source| TokenizerError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(TokenizerError::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
        });
    }

    let tokenizer_path = dir.join("tokenizer.json");
    let bytes = fs::read(&tokenizer_path).map_err(|source| TokenizerError::Io {
        path: tokenizer_path.clone(),
        source,
    })?;
    let inner = match tokenizers::Tokenizer::from_bytes(&bytes) {
        Ok(t) => t,
        Err(source) => {
            // Tell malformed JSON apart from JSON that is not a tokenizer.
            if let Err(json_err) = serde_json::from_slice::<serde::de::IgnoredAny>(&bytes) {
                return Err(TokenizerError::Json {
                    path: tokenizer_path,
                    source: json_err,
                });
            }
            return Err(TokenizerError::Build {
                path: tokenizer_path,
                what: "tokenizer.json".into(),
                source,
            });
        }
    };
    drop(bytes);

    Ok((tokenizer_path, inner))
}

/// Special tokens by attribute name (`None` for an attribute set to null).
type Named = Vec<(String, Option<AddedToken>)>;

/// Named special tokens and the extra special tokens of tokenizer_config.json.
fn named_special_tokens(
    field: &Field<'_>,
    config: &Map<String, Value>,
) -> Result<(Named, Vec<AddedToken>), TokenizerError> {
    // Named special tokens: the standard attributes, then model-specific
    // `*_token` strings (`image_token`, ...).
    let mut special: Vec<(String, Option<AddedToken>)> = Vec::new();
    for attr in SPECIAL_TOKEN_ATTRIBUTES {
        let token = match config.get(*attr) {
            Some(v) => field.added_token(attr, v)?,
            None => None,
        };
        special.push(((*attr).to_string(), token));
    }
    for (key, v) in config {
        if key.ends_with("_token") && !SPECIAL_TOKEN_ATTRIBUTES.contains(&key.as_str()) {
            let token_like = v.is_string()
                || v.as_object()
                    .is_some_and(|m| m.get("content").is_some_and(Value::is_string));
            if token_like {
                special.push((key.clone(), field.added_token(key, v)?));
            }
        }
    }
    // Extra special tokens: `extra_special_tokens` (a list, or a map of
    // named model-specific tokens), or `additional_special_tokens` when
    // `extra_special_tokens` is absent, empty or a map.
    let falsy = |v: &Value| match v {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(m) => m.is_empty(),
        _ => false,
    };
    let list = match config.get("extra_special_tokens").filter(|v| !falsy(v)) {
        Some(Value::Object(named)) => {
            for (name, tv) in named {
                special.push((name.clone(), field.added_token("extra_special_tokens", tv)?));
            }
            config
                .get("additional_special_tokens")
                .map(|v| ("additional_special_tokens", v))
        }
        Some(v) => Some(("extra_special_tokens", v)),
        None => config
            .get("additional_special_tokens")
            .map(|v| ("additional_special_tokens", v)),
    };
    let extra: Vec<AddedToken> = match list {
        Some((key, v)) => field.token_list(key, v)?,
        None => Vec::new(),
    };

    Ok((special, extra))
}

/// Legacy special_tokens_map.json: its named tokens override (as special),
/// its extra ones are appended.
fn merge_special_tokens_map(
    dir: &Path,
    special: &mut Named,
    extra: &mut Vec<AddedToken>,
) -> Result<(), TokenizerError> {
    let map_path = dir.join("special_tokens_map.json");
    if let Some(map) = read_json_object(&map_path)? {
        let map_field = Field { path: &map_path };
        for (key, v) in &map {
            if key == "extra_special_tokens" || key == "additional_special_tokens" {
                for t in map_field.token_list(key, v)? {
                    if !extra.iter().any(|e| e.content == t.content) {
                        extra.push(t);
                    }
                }
                continue;
            }
            let mut token = map_field.added_token(key, v)?;
            if let Some(t) = token.as_mut() {
                t.special = true;
            }
            match special.iter_mut().find(|(name, _)| name == key) {
                Some(slot) => slot.1 = token,
                None => special.push((key.clone(), token)),
            }
        }
    }
    Ok(())
}

/// `added_tokens_decoder`: re-added in id order (identical ones are no-ops),
/// special when a named special token has their content.
fn add_decoder_tokens(
    field: &Field<'_>,
    v: &Value,
    special: &[(String, Option<AddedToken>)],
    inner: &mut tokenizers::Tokenizer,
) -> Result<(), TokenizerError> {
    let Value::Object(m) = v else {
        return Err(field.invalid(
            "added_tokens_decoder",
            format!("expected an object, found {}", json_type(v)),
        ));
    };
    let mut entries: Vec<(u64, AddedToken)> = Vec::new();
    for (id, tv) in m {
        let key = format!("added_tokens_decoder.{id}");
        let index: u64 = id
            .parse()
            .map_err(|_| field.invalid(&key, "key is not a token id"))?;
        if let Some(t) = field.added_token(&key, tv)? {
            entries.push((index, t));
        }
    }
    entries.sort_by_key(|(i, _)| *i);
    let named: Vec<String> = special
        .iter()
        .filter_map(|(_, t)| t.as_ref().map(|t| t.content.clone()))
        .collect();
    let tokens: Vec<AddedToken> = entries
        .into_iter()
        .map(|(_, mut t)| {
            if named.contains(&t.content) {
                t.special = true;
            }
            t
        })
        .collect();
    inner
        .add_tokens(tokens)
        .map_err(|source| TokenizerError::Build {
            path: field.path.to_path_buf(),
            what: "added_tokens_decoder".into(),
            source,
        })?;
    Ok(())
}

/// The chat template and the file it came from: chat_template.jinja, else
/// the config's `chat_template` (a string, or the `default` of a list).
fn chat_template(
    dir: &Path,
    field: &Field<'_>,
    config: &Map<String, Value>,
) -> Result<(Option<String>, PathBuf), TokenizerError> {
    let jinja_path = dir.join("chat_template.jinja");
    let (chat_template, template_source): (Option<String>, PathBuf) =
        match fs::read_to_string(&jinja_path) {
            Ok(t) => (Some(t), jinja_path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let template =
                    match config.get("chat_template") {
                        None | Some(Value::Null) => None,
                        Some(Value::String(s)) => Some(s.clone()),
                        Some(Value::Array(list)) => {
                            let mut default = None;
                            for item in list {
                                let name = item.get("name").and_then(Value::as_str);
                                let template = item.get("template").and_then(Value::as_str);
                                match (name, template) {
                                    (Some(n), Some(t)) => {
                                        if n == "default" {
                                            default = Some(t.to_string());
                                        }
                                    }
                                    _ => return Err(field.invalid(
                                        "chat_template",
                                        "list entries must have string \"name\" and \"template\"",
                                    )),
                                }
                            }
                            default
                        }
                        Some(other) => {
                            return Err(field.invalid(
                                "chat_template",
                                format!("expected a string or a list, found {}", json_type(other)),
                            ))
                        }
                    };
                (template, field.path.to_path_buf())
            }
            Err(source) => {
                return Err(TokenizerError::Io {
                    path: jinja_path,
                    source,
                })
            }
        };

    Ok((chat_template, template_source))
}

/// More eos ids for stopping, from generation_config.json and config.json.
fn extra_stop_ids(dir: &Path) -> Result<Vec<u32>, TokenizerError> {
    let mut extra_stop_ids = Vec::new();
    for name in ["generation_config.json", "config.json"] {
        let path = dir.join(name);
        if let Some(map) = read_json_object(&path)? {
            let f = Field { path: &path };
            if let Some(v) = map.get("eos_token_id") {
                extra_stop_ids.extend(f.ids("eos_token_id", v)?);
            }
            if let Some(v) = map.get("text_config").and_then(|c| c.get("eos_token_id")) {
                extra_stop_ids.extend(f.ids("text_config.eos_token_id", v)?);
            }
        }
    }

    Ok(extra_stop_ids)
}
