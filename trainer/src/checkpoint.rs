//! Opening a model checkpoint as users have it: an HF directory (config.json,
//! tokenizer.json, single or sharded safetensors) or a GGUF file.

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::model::Model;
use crate::tokenizer::Tokenizer;
use crate::weights::{GgufWeights, SafetensorsDir};
use std::path::{Path, PathBuf};
use tch::{Device, Kind};

/// A checkpoint on disk, not yet loaded.
pub enum Checkpoint {
    /// An HF model directory.
    HfDir(PathBuf),
    /// A GGUF file (weights, config and tokenizer in one).
    Gguf(Box<GgufFile>),
}

impl Checkpoint {
    /// Opens `path`: a directory with `config.json`, or a `.gguf` file.
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_dir() {
            let config = path.join("config.json");
            if !config.exists() {
                return Err(ModelError::Io {
                    path: config,
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "an HF model directory needs config.json",
                    ),
                });
            }
            return Ok(Checkpoint::HfDir(path.to_path_buf()));
        }
        if !path.exists() {
            return Err(ModelError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no such file or directory",
                ),
            });
        }
        Ok(Checkpoint::Gguf(Box::new(GgufFile::open(path)?)))
    }

    /// Path of the checkpoint.
    pub fn path(&self) -> &Path {
        match self {
            Checkpoint::HfDir(d) => d,
            Checkpoint::Gguf(f) => f.path(),
        }
    }

    /// The model configuration.
    pub fn config(&self) -> Result<ModelConfig> {
        match self {
            Checkpoint::HfDir(d) => ModelConfig::from_hf_file(&d.join("config.json")),
            Checkpoint::Gguf(f) => ModelConfig::from_gguf(f),
        }
    }

    /// Loads the weights into a model of `kind` on `device`.
    pub fn load_model(&self, kind: Kind, device: Device) -> Result<Model> {
        let cfg = self.config()?;
        match self {
            Checkpoint::HfDir(d) => Model::load(cfg, &SafetensorsDir::open(d)?, kind, device),
            Checkpoint::Gguf(f) => {
                let src = GgufWeights::new(f, cfg.arch, cfg.num_heads, cfg.num_kv_heads);
                Model::load(cfg, &src, kind, device)
            }
        }
    }

    /// The checkpoint's tokenizer.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        Ok(match self {
            Checkpoint::HfDir(d) => Tokenizer::from_hf_dir(d)?,
            Checkpoint::Gguf(f) => Tokenizer::from_gguf(f)?,
        })
    }

    /// Loads model and tokenizer and checks that every token id has an embedding row.
    pub fn load(&self, kind: Kind, device: Device) -> Result<(Model, Tokenizer)> {
        let tokenizer = self.tokenizer()?;
        let cfg = self.config()?;
        if tokenizer.vocab_size() > cfg.vocab_size {
            return Err(ModelError::VocabMismatch {
                path: self.path().to_path_buf(),
                name: "embed_tokens.weight".into(),
                tokenizer: tokenizer.vocab_size(),
                embedding: cfg.vocab_size,
            });
        }
        Ok((self.load_model(kind, device)?, tokenizer))
    }
}
