//! The model: a Llama-family decoder-only Transformer used for training, inference and real models.

pub mod config;
pub mod export;
pub mod gguf;
pub mod kernels;
pub mod llama;
pub mod q4_1;

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

/// Reads the config and tokenizer of a run or checkpoint directory (or a Hugging Face model
/// directory), checking that its weights are there too.
pub fn load_config_and_tokenizer(dir: &Path) -> Result<(LlamaConfig, Tokenizer)> {
    if gguf::is_gguf(dir) {
        bail!(
            "{} is a GGUF file: its quantized weights can be run but not trained; start from a chatforge run or a Hugging Face model directory",
            dir.display()
        );
    }
    if !dir.is_dir() {
        bail!(
            "model {} not found: give a run directory (from `chatforge pretrain` or `sft`), one of its checkpoints, a Hugging Face model directory or a .gguf file",
            dir.display()
        );
    }
    if !dir.join("config.json").exists() {
        bail!(
            "{} is not a model directory: config.json is missing",
            dir.display()
        );
    }
    let config = LlamaConfig::load(&dir.join("config.json"))?;
    weight_files(dir)?;
    if !dir.join("tokenizer.json").exists() {
        bail!(
            "{} is not a model directory chatforge can read: tokenizer.json is missing",
            dir.display()
        );
    }
    Ok((config, Tokenizer::load(dir)?))
}

/// The safetensors files of a directory: `model.safetensors`, or the shards listed in
/// `model.safetensors.index.json` (Hugging Face's sharded layout).
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.exists() {
        bail!(
            "{} has no weights: model.safetensors (or model.safetensors.index.json with its shards) is missing",
            dir.display()
        );
    }
    let v: serde_json::Value = crate::util::read_json(&index)?;
    let map = v["weight_map"]
        .as_object()
        .with_context(|| format!("{}: no \"weight_map\"", index.display()))?;
    let mut files: Vec<String> = map
        .values()
        .filter_map(|f| f.as_str().map(str::to_string))
        .collect();
    files.sort();
    files.dedup();
    files
        .into_iter()
        .map(|f| {
            let p = dir.join(&f);
            if p.exists() {
                Ok(p)
            } else {
                bail!("{}: shard {f} is missing", index.display())
            }
        })
        .collect()
}

/// A Hugging Face `tokenizer_config.json` chat template (a string, or named templates of which
/// "default" is taken).
fn hf_chat_template(dir: &Path) -> Option<String> {
    let v: serde_json::Value = crate::util::read_json(&dir.join("tokenizer_config.json")).ok()?;
    match &v["chat_template"] {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(named) => named
            .iter()
            .find(|t| t["name"] == "default")
            .and_then(|t| t["template"].as_str())
            .map(str::to_string),
        _ => None,
    }
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
    let weights = weight_files(dir)?;
    // SAFETY: the files are mapped read-only; chatforge writes them only by atomic rename.
    // bf16 and f16 weights are converted to f32 as they are read.
    let vb =
        unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&weights, DType::F32, device) }
            .with_context(|| format!("cannot read the weights in {}", dir.display()))?;
    let model = Llama::new(&config, vb).with_context(|| {
        format!(
            "{} do not match {} (a checkpoint from an incompatible config?)",
            weights
                .iter()
                .map(|w| w.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            dir.join("config.json").display()
        )
    })?;
    Ok(LoadedModel {
        model,
        tokenizer,
        dir: dir.to_path_buf(),
        chat_template: hf_chat_template(dir),
    })
}
