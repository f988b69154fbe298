//! Bad checkpoints give clear errors that name the file and the field or
//! tensor at fault, never a panic.

use kvd_tests::env::tiny_models;
use kvd_trainer::checkpoint::Checkpoint;
use kvd_trainer::error::ModelError;
use kvd_trainer::gguf::GgufError;
use std::path::{Path, PathBuf};
use tch::{Device, Kind};

/// A private copy of a tiny checkpoint to break.
fn copy_of(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dst = tmp.path().join(name);
    std::fs::create_dir_all(&dst).expect("mkdir");
    for entry in std::fs::read_dir(tiny_models().join(name)).expect("tiny model dir") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), dst.join(entry.file_name())).expect("copy");
    }
    (tmp, dst)
}

fn load(path: &Path) -> Result<(), ModelError> {
    Checkpoint::open(path)?
        .load_model(Kind::Float, Device::Cpu)
        .map(|_| ())
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let p = dir.join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).expect("read")).expect("json");
    f(json.as_object_mut().expect("object"));
    std::fs::write(&p, serde_json::to_string_pretty(&json).expect("json")).expect("write");
}

fn assert_mentions(err: &ModelError, parts: &[&str]) {
    let msg = err.to_string();
    for p in parts {
        assert!(msg.contains(p), "error {msg:?} does not mention {p:?}");
    }
}

#[test]
fn missing_shard_names_the_file() {
    let (_t, dir) = copy_of("llama");
    let shard = dir.join("model-00003-of-00020.safetensors");
    std::fs::remove_file(&shard).expect("rm");
    let err = load(&dir).expect_err("must fail");
    assert!(matches!(err, ModelError::Io { .. }), "{err:?}");
    assert_mentions(&err, &[shard.to_str().expect("utf-8")]);
}

#[test]
fn missing_weights_file_names_the_directory() {
    let (_t, dir) = copy_of("qwen2");
    std::fs::remove_file(dir.join("model.safetensors")).expect("rm");
    let err = load(&dir).expect_err("must fail");
    assert_mentions(&err, &[dir.to_str().expect("utf-8"), "model.safetensors"]);
}

#[test]
fn truncated_weights_file_names_the_file() {
    let (_t, dir) = copy_of("qwen2");
    let file = dir.join("model.safetensors");
    let bytes = std::fs::read(&file).expect("read");
    std::fs::write(&file, &bytes[..bytes.len() / 2]).expect("write");
    let err = load(&dir).expect_err("must fail");
    assert!(matches!(err, ModelError::Safetensors { .. }), "{err:?}");
    assert_mentions(&err, &[file.to_str().expect("utf-8")]);
}

#[test]
fn unknown_architecture_is_named() {
    let (_t, dir) = copy_of("mistral");
    edit_config(&dir, |c| {
        c.insert("model_type".into(), "gpt_neox".into());
    });
    let err = load(&dir).expect_err("must fail");
    assert!(
        matches!(err, ModelError::UnknownArchitecture { .. }),
        "{err:?}"
    );
    assert_mentions(&err, &["config.json", "gpt_neox"]);
}

#[test]
fn missing_config_field_is_named() {
    let (_t, dir) = copy_of("llama");
    edit_config(&dir, |c| {
        c.remove("hidden_size");
    });
    let err = load(&dir).expect_err("must fail");
    assert!(matches!(err, ModelError::MissingField { .. }), "{err:?}");
    assert_mentions(&err, &["config.json", "hidden_size"]);
}

#[test]
fn wrongly_typed_config_field_is_named() {
    let (_t, dir) = copy_of("llama");
    edit_config(&dir, |c| {
        c.insert("num_attention_heads".into(), "four".into());
    });
    let err = load(&dir).expect_err("must fail");
    assert_mentions(&err, &["config.json", "num_attention_heads", "four"]);
}

#[test]
fn config_that_disagrees_with_weights_names_the_weight() {
    let (_t, dir) = copy_of("qwen2");
    edit_config(&dir, |c| {
        c.insert("intermediate_size".into(), 128.into());
    });
    let err = load(&dir).expect_err("must fail");
    assert!(matches!(err, ModelError::WeightShape { .. }), "{err:?}");
    assert_mentions(&err, &["model.safetensors", "mlp.gate_proj.weight", "128"]);
}

#[test]
fn unsupported_rope_type_is_named() {
    let (_t, dir) = copy_of("mistral");
    edit_config(&dir, |c| {
        c.insert(
            "rope_parameters".into(),
            serde_json::json!({"rope_type": "yarn", "factor": 4.0}),
        );
    });
    let err = load(&dir).expect_err("must fail");
    assert_mentions(&err, &["config.json", "rope_parameters.rope_type", "yarn"]);
}

#[test]
fn missing_config_json_is_named() {
    let (_t, dir) = copy_of("mistral");
    std::fs::remove_file(dir.join("config.json")).expect("rm");
    let err = load(&dir).expect_err("must fail");
    assert_mentions(&err, &["config.json"]);
}

#[test]
fn nonexistent_path_is_named() {
    let err = load(Path::new("/nonexistent/model.gguf")).expect_err("must fail");
    assert_mentions(&err, &["/nonexistent/model.gguf"]);
}

#[test]
fn unsupported_gguf_tensor_type_names_the_tensor() {
    let path = tiny_models().join("gguf/f64.gguf");
    let err = load(&path).expect_err("must fail");
    assert!(
        matches!(
            err,
            ModelError::Gguf(GgufError::UnsupportedTensorType { .. })
        ),
        "{err:?}"
    );
    assert_mentions(
        &err,
        &[path.to_str().expect("utf-8"), "blk.1.ffn_up.weight", "F64"],
    );
}

#[test]
fn truncated_gguf_names_the_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("cut.gguf");
    let bytes = std::fs::read(tiny_models().join("gguf/llama.gguf")).expect("read");
    std::fs::write(&path, &bytes[..bytes.len() - 1000]).expect("write");
    let err = load(&path).expect_err("must fail");
    assert!(
        matches!(err, ModelError::Gguf(GgufError::Truncated { .. })),
        "{err:?}"
    );
    assert_mentions(&err, &[path.to_str().expect("utf-8")]);
}

#[test]
fn tokenizer_larger_than_embedding_is_a_vocab_mismatch() {
    use tokenizers::models::wordlevel::WordLevel;
    let (_t, dir) = copy_of("qwen2");
    // The tiny model has 96 embedding rows; this tokenizer knows 200 tokens.
    let vocab = (0..200u32).map(|i| (format!("w{i}"), i)).collect();
    let model = WordLevel::builder()
        .vocab(vocab)
        .unk_token("w0".into())
        .build()
        .expect("wordlevel");
    tokenizers::Tokenizer::new(model)
        .save(dir.join("tokenizer.json"), false)
        .expect("save tokenizer");
    let err = Checkpoint::open(&dir)
        .and_then(|c| c.load(Kind::Float, Device::Cpu))
        .map(|_| ())
        .expect_err("must fail");
    assert!(matches!(err, ModelError::VocabMismatch { .. }), "{err:?}");
    assert_mentions(&err, &["200", "96", dir.to_str().expect("utf-8")]);
}

/// A checkpoint written to a bucket that does not exist (a real S3-protocol
/// server) fails with a storage error that names the URL and the bucket.
#[test]
fn a_checkpoint_write_to_a_missing_bucket_names_it() {
    use kvd_test_stores::moto::MotoServer;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root");
    let moto = MotoServer::start(root, "kvd-ckpt").expect("start moto_server (make setup)");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let url = "s3://no-such-bucket-kvd/run/step-00000001/rank-0.safetensors";
    let e = rt
        .block_on(kvd_trainer::checkpointer::parts::put_url(
            url,
            vec![1, 2, 3],
            &moto.options(),
        ))
        .expect_err("no bucket");
    let s = e.to_string();
    assert!(matches!(e, ModelError::Storage(_)), "{s}");
    assert!(
        s.contains(url) && s.contains("bucket (container) `no-such-bucket-kvd` does not exist"),
        "{s}"
    );
    // The bucket that exists takes the same write.
    let ok = moto.url("run/step-00000001/rank-0.safetensors");
    rt.block_on(kvd_trainer::checkpointer::parts::put_url(
        &ok,
        vec![1, 2, 3],
        &moto.options(),
    ))
    .expect("write to the bucket that exists");
}
