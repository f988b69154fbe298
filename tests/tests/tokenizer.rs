//! Tokenizer parity with HF transformers (the oracle): token ids, decodes and
//! rendered chat templates for the real SmolLM2 and Gemma-3 GGUF files, for
//! small synthetic GGUF files reaching the other builders, for the HF
//! directories transformers saves from each of them and for hand-made HF
//! directories; plus chat templates rendered by transformers' own Jinja
//! environment, and malformed input.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use kvd_tests::env;
use kvd_trainer::gguf::GgufFile;
use kvd_trainer::tokenizer::{chat, ChatMessage, Tokenizer, TokenizerError};
use serde::Deserialize;
use serde_json::Value;

/// What `tests/oracle/tokenize_gguf.py` prints for one GGUF file.
#[derive(Debug, Deserialize)]
struct Oracle {
    gguf: Side,
    hf: Side,
}

/// What `tests/oracle/tokenize_synthetic.py` prints.
#[derive(Debug, Deserialize)]
struct SyntheticOracle {
    gguf: BTreeMap<String, SyntheticGguf>,
    hf_dirs: BTreeMap<String, SyntheticHfDir>,
}

/// A synthetic GGUF file and the HF directory transformers saved from it.
#[derive(Debug, Deserialize)]
struct SyntheticGguf {
    path: PathBuf,
    hf_dir: PathBuf,
    gguf: Side,
    hf: Side,
}

/// A hand-made HF directory.
#[derive(Debug, Deserialize)]
struct SyntheticHfDir {
    hf_dir: PathBuf,
    hf: Side,
}

/// The oracle's view of one tokenizer.
#[derive(Debug, Deserialize)]
struct Side {
    len: usize,
    bos_token_id: Option<u32>,
    eos_token_id: Option<u32>,
    special_tokens_map: BTreeMap<String, String>,
    cases: Vec<Case>,
    chats: Vec<Chat>,
}

#[derive(Debug, Deserialize)]
struct Case {
    text: String,
    ids_special: Vec<u32>,
    ids_plain: Vec<u32>,
    decode: String,
    decode_skip: String,
    decode_plain: String,
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    content: String,
}

#[derive(Debug, Deserialize)]
struct ChatError {
    kind: String,
    message: String,
}

#[derive(Debug, Deserialize)]
struct Chat {
    messages: Vec<Message>,
    add_generation_prompt: bool,
    rendered: Option<String>,
    error: Option<ChatError>,
}

fn messages(ms: &[Message]) -> Vec<ChatMessage> {
    ms.iter()
        .map(|m| ChatMessage::new(m.role.clone(), m.content.clone()))
        .collect()
}

fn short(s: &str) -> String {
    let mut out: String = s.chars().take(60).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    format!("{out:?}")
}

/// Compares one tokenizer with the oracle's view of it, pushing every
/// difference onto `problems`.
fn compare(label: &str, tok: &Tokenizer, side: &Side, problems: &mut Vec<String>) {
    // Guard against a vacuous oracle.
    assert!(
        side.cases.len() >= 25,
        "{label}: oracle returned only {} cases",
        side.cases.len()
    );
    assert!(!side.chats.is_empty(), "{label}: oracle returned no chats");

    let mut push = |p: String| problems.push(format!("{label}: {p}"));
    if tok.vocab_size() != side.len {
        push(format!(
            "vocab_size {} != len(tok) {}",
            tok.vocab_size(),
            side.len
        ));
    }
    if tok.bos_token_id() != side.bos_token_id {
        push(format!(
            "bos_token_id {:?} != {:?}",
            tok.bos_token_id(),
            side.bos_token_id
        ));
    }
    if tok.eos_token_id() != side.eos_token_id {
        push(format!(
            "eos_token_id {:?} != {:?}",
            tok.eos_token_id(),
            side.eos_token_id
        ));
    }
    let specials: BTreeMap<String, String> = tok.special_tokens().iter().cloned().collect();
    if specials != side.special_tokens_map {
        push(format!(
            "special tokens {specials:?} != {:?}",
            side.special_tokens_map
        ));
    }
    if let Some(eos) = tok.eos_token_id() {
        if tok.stop_token_ids().first() != Some(&eos) {
            push(format!(
                "stop_token_ids {:?} do not start with eos {eos}",
                tok.stop_token_ids()
            ));
        }
    }

    for case in &side.cases {
        let t = short(&case.text);
        match tok.encode(&case.text, true) {
            Ok(ids) if ids == case.ids_special => {}
            Ok(ids) => push(format!(
                "encode({t}, special) = {ids:?}, expected {:?}",
                case.ids_special
            )),
            Err(e) => push(format!("encode({t}, special) failed: {e}")),
        }
        match tok.encode(&case.text, false) {
            Ok(ids) if ids == case.ids_plain => {}
            Ok(ids) => push(format!(
                "encode({t}, plain) = {ids:?}, expected {:?}",
                case.ids_plain
            )),
            Err(e) => push(format!("encode({t}, plain) failed: {e}")),
        }
        for (ids, skip, expected, what) in [
            (&case.ids_special, false, &case.decode, "decode"),
            (&case.ids_special, true, &case.decode_skip, "decode(skip)"),
            (&case.ids_plain, false, &case.decode_plain, "decode(plain)"),
        ] {
            match tok.decode(ids, skip) {
                Ok(text) if &text == expected => {}
                Ok(text) => push(format!(
                    "{what} of {t} = {:?}, expected {:?}",
                    short(&text),
                    short(expected)
                )),
                Err(e) => push(format!("{what} of {t} failed: {e}")),
            }
        }
    }

    for (i, c) in side.chats.iter().enumerate() {
        let result = tok.apply_chat_template(&messages(&c.messages), c.add_generation_prompt);
        match (&c.rendered, &c.error, result) {
            (Some(expected), _, Ok(got)) if &got == expected => {}
            (Some(expected), _, Ok(got)) => {
                push(format!("chat {i}: rendered {got:?}, expected {expected:?}"))
            }
            (Some(_), _, Err(e)) => push(format!("chat {i}: failed: {e}")),
            (None, Some(err), Err(TokenizerError::NoChatTemplate { .. }))
                if err.kind == "no_template" => {}
            (None, Some(err), Err(TokenizerError::Template { message, .. }))
                if err.kind == "template" && message.contains(&err.message) => {}
            (None, err, got) => push(format!(
                "chat {i}: transformers gave {err:?}, we gave {:?}",
                got.map_err(|e| e.to_string())
            )),
        }
    }
}

/// The first place two JSON values differ, as a path.
fn first_diff(path: &str, a: &Value, b: &Value) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for key in x.keys().chain(y.keys()) {
                match (x.get(key), y.get(key)) {
                    (Some(u), Some(v)) => {
                        if let Some(d) = first_diff(&format!("{path}.{key}"), u, v) {
                            return Some(d);
                        }
                    }
                    (u, v) => {
                        return Some(format!(
                            "{path}.{key}: ours {} / transformers {}",
                            u.is_some(),
                            v.is_some()
                        ))
                    }
                }
            }
            None
        }
        (Value::Array(x), Value::Array(y)) => {
            for (i, (u, v)) in x.iter().zip(y.iter()).enumerate() {
                if let Some(d) = first_diff(&format!("{path}[{i}]"), u, v) {
                    return Some(d);
                }
            }
            (x.len() != y.len()).then(|| format!("{path}: length {} vs {}", x.len(), y.len()))
        }
        (u, v) => (u != v).then(|| {
            let (su, sv) = (u.to_string(), v.to_string());
            format!("{path}: ours {} / transformers {}", short(&su), short(&sv))
        }),
    }
}

/// The whole `tokenizer.json` we build must equal the one transformers saves
/// (model vocabulary and merges, added tokens, normalizer, pre-tokenizer,
/// post-processor, decoder).
fn compare_tokenizer_json(label: &str, tok: &Tokenizer, hf_dir: &Path, problems: &mut Vec<String>) {
    let ours: Value = match tok.inner().to_string(false) {
        Ok(s) => serde_json::from_str(&s).expect("tokenizers wrote invalid JSON"),
        Err(e) => {
            problems.push(format!("{label}: cannot serialize: {e}"));
            return;
        }
    };
    let path = hf_dir.join("tokenizer.json");
    let bytes = fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let theirs: Value = serde_json::from_slice(&bytes).expect("transformers wrote invalid JSON");
    if let Some(d) = first_diff("tokenizer.json", &ours, &theirs) {
        problems.push(format!("{label}: {d}"));
    }
}

fn report(problems: &[String]) {
    assert!(
        problems.is_empty(),
        "{} mismatches with transformers:\n{}",
        problems.len(),
        problems
            .iter()
            .take(40)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Runs the oracle on a real GGUF file and compares the GGUF and HF-directory paths.
fn check_real_model(gguf: &Path) -> Tokenizer {
    assert!(gguf.is_file(), "missing asset {}", gguf.display());
    let tmp = tempfile::tempdir().expect("tempdir");
    let hf_dir = tmp.path().join("hf");
    let mut args = vec![
        gguf.to_str().expect("utf-8 path").to_string(),
        hf_dir.to_str().expect("utf-8 path").to_string(),
    ];
    let essay = env::assets().join("essays/addiction.txt");
    if essay.is_file() {
        args.push(essay.to_str().expect("utf-8 path").to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = env::run_oracle("tokenize_gguf.py", &args);
    let oracle: Oracle = serde_json::from_str(&out).expect("oracle output");

    let file = GgufFile::open(gguf).expect("open GGUF");
    let from_gguf = Tokenizer::from_gguf(&file).expect("Tokenizer::from_gguf");
    let from_hf = Tokenizer::from_hf_dir(&hf_dir).expect("Tokenizer::from_hf_dir");

    let mut problems = Vec::new();
    compare("gguf", &from_gguf, &oracle.gguf, &mut problems);
    compare_tokenizer_json("gguf", &from_gguf, &hf_dir, &mut problems);
    compare("hf dir", &from_hf, &oracle.hf, &mut problems);
    report(&problems);
    from_gguf
}

#[test]
fn smollm2_gguf_and_hf_dir_match_transformers() {
    let tok = check_real_model(&env::smollm2_gguf());
    // ChatML: <|im_end|> ends a turn and is the eos; <|endoftext|> also stops.
    let im_end = tok.token_to_id("<|im_end|>").expect("<|im_end|>");
    assert_eq!(tok.eos_token_id(), Some(im_end));
    assert!(tok.stop_token_ids().contains(&im_end));
    assert!(tok.chat_template().is_some());
}

#[test]
fn gemma3_gguf_and_hf_dir_match_transformers() {
    let tok = check_real_model(&env::gemma3_gguf());
    let end_of_turn = tok.token_to_id("<end_of_turn>").expect("<end_of_turn>");
    assert_eq!(tok.stop_token_ids(), &[1, end_of_turn]);
    // This GGUF has no chat template: a clear error, not an invented template.
    let err = tok
        .apply_chat_template(&[ChatMessage::new("user", "hi")], true)
        .expect_err("Gemma-3 270m GGUF has no chat template");
    assert!(
        matches!(err, TokenizerError::NoChatTemplate { .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("gemma-3-270m-q4_k_m.gguf"),
        "{err}"
    );
}

#[test]
fn synthetic_ggufs_and_hf_dirs_match_transformers() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = env::run_oracle(
        "tokenize_synthetic.py",
        &[tmp.path().to_str().expect("utf-8 path")],
    );
    let oracle: SyntheticOracle = serde_json::from_str(&out).expect("oracle output");
    assert_eq!(
        oracle.gguf.keys().map(String::as_str).collect::<Vec<_>>(),
        ["llama", "phi3", "qwen2"]
    );
    assert_eq!(
        oracle
            .hf_dirs
            .keys()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        ["tiny_config", "tiny_legacy"]
    );
    let mut problems = Vec::new();
    for (name, o) in &oracle.gguf {
        let file = GgufFile::open(&o.path).expect("open GGUF");
        let from_gguf = match Tokenizer::from_gguf(&file) {
            Ok(t) => t,
            Err(e) => {
                problems.push(format!("{name}: from_gguf failed: {e}"));
                continue;
            }
        };
        compare(&format!("{name} gguf"), &from_gguf, &o.gguf, &mut problems);
        compare_tokenizer_json(
            &format!("{name} gguf"),
            &from_gguf,
            &o.hf_dir,
            &mut problems,
        );
        match Tokenizer::from_hf_dir(&o.hf_dir) {
            Ok(t) => compare(&format!("{name} hf dir"), &t, &o.hf, &mut problems),
            Err(e) => problems.push(format!("{name}: from_hf_dir failed: {e}")),
        }
        if name == "qwen2" {
            // tokenizer.ggml.eot_token_id (3, "<|stop|>") stops generation too.
            let stops = from_gguf.stop_token_ids();
            if !stops.contains(&3) || stops.first() != Some(&2) {
                problems.push(format!("qwen2: stop_token_ids {stops:?}"));
            }
        }
    }
    for (name, o) in &oracle.hf_dirs {
        let tok = match Tokenizer::from_hf_dir(&o.hf_dir) {
            Ok(t) => t,
            Err(e) => {
                problems.push(format!("{name}: from_hf_dir failed: {e}"));
                continue;
            }
        };
        compare(name, &tok, &o.hf, &mut problems);
        if name == "tiny_config" {
            // eos ("</s>", 11), then generation_config.json's [10, 2].
            if tok.stop_token_ids() != [11, 10, 2] {
                problems.push(format!("{name}: stop_token_ids {:?}", tok.stop_token_ids()));
            }
        }
    }
    report(&problems);

    // The malformed files written next to them: errors naming file and key.
    let bad: &[(&str, &str)] = &[
        ("bad_no_tokens", "tokenizer.ggml.tokens missing"),
        ("bad_no_model", "tokenizer.ggml.model missing"),
        (
            "bad_model",
            "tokenizer.ggml.model = \"bert\" is not supported",
        ),
        ("bad_no_merges", "tokenizer.ggml.scores"),
        (
            "bad_bos_range",
            "tokenizer.ggml.bos_token_id: id 100000 out of range",
        ),
        ("bad_merge_entry", "tokenizer.ggml.merges: entry 1"),
        ("bad_merge_oov", "BPE model"),
        ("bad_tokens_type", "tokenizer.ggml.tokens: element 0"),
    ];
    for (name, expected) in bad {
        let path = tmp.path().join(format!("{name}.gguf"));
        let file = GgufFile::open(&path).expect("open GGUF");
        let err = Tokenizer::from_gguf(&file)
            .map(|_| ())
            .expect_err(&format!("{name}: from_gguf accepted a malformed file"));
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{name}: {msg}");
        assert!(msg.contains(expected), "{name}: {msg:?} lacks {expected:?}");
    }
}

/// Chat templates in the style of real models, exercising what templates use
/// (whitespace control, `trim_blocks`/`lstrip_blocks`, namespaces, Python
/// string methods, `tojson`, loop controls, `raise_exception`, slicing,
/// `{% generation %}`).
///
/// Not covered: iterating a dict *literal* of the template itself. minijinja
/// keeps such maps sorted by key unless its `preserve_order` feature is on,
/// while Python keeps insertion order.
const TEMPLATES: &[&str] = &[
    // Gemma 3 style.
    "{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = \"\" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = \"model\" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- else -%}
        {{ raise_exception(\"Invalid content type\") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
",
    // Qwen 2.5 style: tools, namespace, tojson, startswith/strip.
    "{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- for tool in tools %}
        {{- tool | tojson }}
    {%- endfor %}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(last_user=-1, n=0) %}
{%- for message in messages %}
    {%- if message.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}
    {%- set ns.n = ns.n + message.content | length %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role == 'system' and loop.first %}{% continue %}{% endif %}
    {%- if message.content.startswith('!') %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content[1:].strip() + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
    {%- if loop.index0 == ns.last_user %}{{- '<!-- last user -->' }}{% endif %}
{%- endfor %}
{{- '<!-- ' ~ ns.n ~ ' chars -->' }}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
",
    // Jinja whitespace semantics without '-' markers, comments, tojson of messages.
    "{# a comment #}
{% for m in messages %}
  {% if m.role == 'user' %}
    USER: {{ m.content }}
  {% elif m.role == 'assistant' %}
    ASSISTANT: {{ m.content | upper }}
  {% else %}
    {{ m.role | title }}: {{ m.content.split() | join('_') }}
  {% endif %}
{% endfor %}
JSON {{ messages | tojson }}
INDENT {{ messages[-1] | tojson(indent=2) }}
{% if add_generation_prompt %}ASSISTANT:{% endif %}
",
    // Loop controls, filters, `in`, `is defined`, dict literals, items(), generation tags.
    "{%- set roles = {'user': 'U', 'assistant': 'A', 'system': 'S'} -%}
{%- for m in messages -%}
{%- if loop.index > 3 %}{% break %}{% endif -%}
[{{ roles[m.role] }}{{ loop.revindex }}{% if m.tool_calls is defined %}T{% endif %}]
{%- if m.role == 'assistant' -%}{% generation %}{{ m.content }}{% endgeneration %}{%- else -%}{{ m.content | replace('\\n', ' / ') }}{%- endif -%}
{{ ' ' if 'France' in m.content else '' }}
{%- endfor -%}
{%- for k, v in roles | dictsort %}{{ k }}={{ v }};{% endfor -%}
{%- for k, v in {'a': 1, 'b': [2, 'x']}.items() %}{{ k }}{{ v | tojson }}{% endfor -%}
{{ messages | map(attribute='role') | join(',') }}|{{ messages | length }}|{{ eos_token }}
{%- if add_generation_prompt %}<gen>{% endif -%}
",
];

#[derive(Debug, Deserialize)]
struct RenderResult {
    rendered: Option<String>,
    error: Option<String>,
}

#[test]
fn chat_templates_render_like_transformers() {
    let conversations: Vec<Vec<ChatMessage>> = vec![
        vec![
            ChatMessage::new("user", "What is the capital of France?"),
            ChatMessage::new("assistant", "The capital of France is Paris."),
            ChatMessage::new("user", "And of Italy?\nOne word."),
        ],
        vec![
            ChatMessage::new("system", "Be terse."),
            ChatMessage::new("user", "  ! Héllo 日本 😀 \"quoted\" <tag> \\ back\t"),
        ],
        // Breaks the alternation rule of the Gemma-style template.
        vec![
            ChatMessage::new("user", "one"),
            ChatMessage::new("user", "two"),
        ],
    ];
    let specials = vec![
        ("bos_token".to_string(), "<bos>".to_string()),
        ("eos_token".to_string(), "<eos>".to_string()),
        ("pad_token".to_string(), "<pad>".to_string()),
    ];
    let mut cases = Vec::new();
    for template in TEMPLATES {
        for conv in &conversations {
            for add_generation_prompt in [false, true] {
                cases.push(serde_json::json!({
                    "template": template,
                    "messages": conv.iter().map(|m| serde_json::json!({"role": m.role, "content": m.content})).collect::<Vec<_>>(),
                    "add_generation_prompt": add_generation_prompt,
                    "special_tokens": specials.iter().cloned().collect::<BTreeMap<_, _>>(),
                }));
            }
        }
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let cases_path = tmp.path().join("cases.json");
    fs::write(&cases_path, serde_json::to_vec(&cases).expect("json")).expect("write cases");
    let out = env::run_oracle(
        "tokenize_chat.py",
        &[cases_path.to_str().expect("utf-8 path")],
    );
    let results: Vec<RenderResult> = serde_json::from_str(&out).expect("oracle output");
    assert_eq!(results.len(), cases.len());
    assert!(
        results.iter().any(|r| r.error.is_some()) && results.iter().any(|r| r.rendered.is_some()),
        "the cases should both render and raise"
    );

    let mut problems = Vec::new();
    let mut i = 0;
    for (t, template) in TEMPLATES.iter().enumerate() {
        for (c, conv) in conversations.iter().enumerate() {
            for add_generation_prompt in [false, true] {
                let expected = &results[i];
                i += 1;
                let got = chat::render(
                    template,
                    Path::new("template.jinja"),
                    conv,
                    add_generation_prompt,
                    &specials,
                );
                let label = format!("template {t}, conversation {c}, gen {add_generation_prompt}");
                match (&expected.rendered, &expected.error, got) {
                    (Some(e), _, Ok(g)) if &g == e => {}
                    (None, Some(e), Err(TokenizerError::Template { message, path, .. }))
                        if message.contains(e.as_str()) && path == Path::new("template.jinja") => {}
                    (r, e, g) => problems.push(format!(
                        "{label}: transformers {r:?} / error {e:?}, ours {:?}",
                        g.map_err(|e| e.to_string())
                    )),
                }
            }
        }
    }
    report(&problems);
}

/// A tiny valid tokenizer.json (word-level) for the HF-directory error tests.
const TINY_TOKENIZER_JSON: &str = r#"{
  "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
  "normalizer": null,
  "pre_tokenizer": {"type": "WhitespaceSplit"},
  "post_processor": null, "decoder": null,
  "model": {"type": "WordLevel", "vocab": {"<unk>": 0, "hello": 1, "world": 2, "<s>": 3}, "unk_token": "<unk>"}
}"#;

fn hf_dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, content) in files {
        fs::write(dir.path().join(name), content).expect("write");
    }
    dir
}

fn hf_error(dir: &Path) -> String {
    Tokenizer::from_hf_dir(dir)
        .map(|_| ())
        .expect_err("from_hf_dir accepted bad input")
        .to_string()
}

#[test]
fn hf_dir_bad_input_errors_name_the_file() {
    // No tokenizer.json.
    let dir = hf_dir_with(&[("tokenizer_config.json", "{}")]);
    let msg = hf_error(dir.path());
    assert!(
        msg.contains(&dir.path().join("tokenizer.json").display().to_string()),
        "{msg}"
    );

    // tokenizer.json that is not JSON.
    let dir = hf_dir_with(&[("tokenizer.json", "{\"version\": \"1.0\", oops")]);
    let err = Tokenizer::from_hf_dir(dir.path())
        .map(|_| ())
        .expect_err("bad JSON");
    assert!(matches!(err, TokenizerError::Json { .. }), "{err}");
    assert!(
        err.to_string().contains("tokenizer.json: invalid JSON"),
        "{err}"
    );

    // JSON, but not a tokenizer.
    let dir = hf_dir_with(&[("tokenizer.json", "{\"model\": 3}")]);
    let msg = hf_error(dir.path());
    assert!(
        msg.contains("tokenizer.json: cannot build tokenizer"),
        "{msg}"
    );

    // A bad tokenizer_config.json next to a good tokenizer.json.
    let dir = hf_dir_with(&[
        ("tokenizer.json", TINY_TOKENIZER_JSON),
        ("tokenizer_config.json", "[1, 2"),
    ]);
    let msg = hf_error(dir.path());
    assert!(msg.contains("tokenizer_config.json: invalid JSON"), "{msg}");

    let dir = hf_dir_with(&[
        ("tokenizer.json", TINY_TOKENIZER_JSON),
        (
            "tokenizer_config.json",
            r#"{"split_special_tokens": "yes"}"#,
        ),
    ]);
    let msg = hf_error(dir.path());
    assert!(
        msg.contains("tokenizer_config.json: split_special_tokens: expected a bool"),
        "{msg}"
    );

    let dir = hf_dir_with(&[
        ("tokenizer.json", TINY_TOKENIZER_JSON),
        ("tokenizer_config.json", r#"{"bos_token": {"content": 5}}"#),
    ]);
    let msg = hf_error(dir.path());
    assert!(msg.contains("tokenizer_config.json: bos_token"), "{msg}");

    let dir = hf_dir_with(&[
        ("tokenizer.json", TINY_TOKENIZER_JSON),
        ("generation_config.json", r#"{"eos_token_id": "two"}"#),
    ]);
    let msg = hf_error(dir.path());
    assert!(
        msg.contains("generation_config.json: eos_token_id"),
        "{msg}"
    );

    // Not a directory at all.
    let missing = dir.path().join("nope");
    let msg = hf_error(&missing);
    assert!(msg.contains(&missing.display().to_string()), "{msg}");
}

#[test]
fn hf_dir_without_config_has_no_specials_or_template() {
    let dir = hf_dir_with(&[("tokenizer.json", TINY_TOKENIZER_JSON)]);
    let tok = Tokenizer::from_hf_dir(dir.path()).expect("load");
    assert_eq!(tok.vocab_size(), 4);
    assert_eq!(tok.encode("hello world", true).expect("encode"), vec![1, 2]);
    assert_eq!(
        tok.encode("hello there", false).expect("encode"),
        vec![1, 0]
    );
    assert_eq!(tok.decode(&[1, 2], false).expect("decode"), "hello world");
    assert_eq!(tok.bos_token_id(), None);
    assert_eq!(tok.eos_token_id(), None);
    assert!(tok.stop_token_ids().is_empty());
    assert!(tok.special_tokens().is_empty());
    let err = tok
        .apply_chat_template(&[ChatMessage::new("user", "hi")], true)
        .expect_err("no template");
    assert!(
        matches!(err, TokenizerError::NoChatTemplate { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
}
