//! The model: a Llama-family decoder-only Transformer used for training, inference and real models.

pub mod config;
pub mod gguf;
pub mod kernels;
pub mod llama;

pub use config::LlamaConfig;
pub use llama::{KvCache, Llama};

use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};

/// A model with its tokenizer, loaded from a run or checkpoint directory or a GGUF file.
pub struct LoadedModel {
    pub model: Llama,
    pub tokenizer: Tokenizer,
    /// Where it came from: a run directory or a model file.
    pub dir: PathBuf,
    /// The model's own Jinja chat template, when it ships one (GGUF `tokenizer.chat_template`).
    pub chat_template: Option<String>,
}

impl LoadedModel {
    /// The chat template to use: the model's own when it has one, else the one its special
    /// tokens call for.
    pub fn template(&self) -> Result<crate::tokenizer::chat::ChatTemplate> {
        match &self.chat_template {
            Some(t) => Ok(crate::tokenizer::chat::ChatTemplate::Jinja(t.clone())),
            None => crate::tokenizer::chat::ChatTemplate::detect(&self.tokenizer),
        }
    }
}

/// Reads the config and tokenizer of a run or checkpoint directory, checking that its weights are
/// there too.
pub fn load_config_and_tokenizer(dir: &Path) -> Result<(LlamaConfig, Tokenizer)> {
    if !dir.is_dir() {
        bail!(
            "model {} not found: give a run directory (from `chatforge pretrain` or `sft`) or one of its checkpoints",
            dir.display()
        );
    }
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        if !dir.join(f).exists() {
            bail!(
                "{} is not a chatforge model directory: {f} is missing",
                dir.display()
            );
        }
    }
    Ok((
        LlamaConfig::load(&dir.join("config.json"))?,
        Tokenizer::load(dir)?,
    ))
}

/// Loads `config.json`, `model.safetensors` and `tokenizer.json` from a run or checkpoint
/// directory, or a `.gguf` file.
pub fn load(dir: &Path, device: &Device) -> Result<LoadedModel> {
    if gguf::is_gguf(dir) {
        return gguf::load(dir, device);
    }
    let (config, tokenizer) = load_config_and_tokenizer(dir)?;
    if tokenizer.vocab_size() > config.vocab_size {
        bail!(
            "{}: tokenizer.json has {} tokens but config.json says vocab_size {}",
            dir.display(),
            tokenizer.vocab_size(),
            config.vocab_size
        );
    }
    let weights = dir.join("model.safetensors");
    // SAFETY: the file is mapped read-only and written only by atomic rename.
    let vb =
        unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, device) }
            .with_context(|| format!("cannot read {}", weights.display()))?;
    let model = Llama::new(&config, vb).with_context(|| {
        format!(
            "{} does not match {} (a checkpoint from an incompatible config?)",
            weights.display(),
            dir.join("config.json").display()
        )
    })?;
    Ok(LoadedModel {
        model,
        tokenizer,
        dir: dir.to_path_buf(),
        chat_template: None,
    })
}
