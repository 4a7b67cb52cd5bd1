//! The model: a Llama-family decoder-only Transformer used for training, inference and real models.

pub mod bf16;
pub mod config;
pub mod export;
pub mod gguf;
pub mod hub;
pub mod kernels;
pub mod llama;
pub mod lora;
pub mod quant;
pub mod switches;

pub use config::LlamaConfig;
pub use llama::{KvCache, Llama};

use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};

/// A model with its tokenizer, loaded from a run or checkpoint directory or a GGUF file.
pub struct LoadedModel {
    pub model: Llama,
    pub tokenizer: Tokenizer,
    /// Where it came from: a run directory or a model file.
    pub dir: PathBuf,
    /// The model's own Jinja chat template, when it ships one (GGUF `tokenizer.chat_template`).
    pub chat_template: Option<String>,
    /// The grammar compiler for this tokenizer, built once at the first constrained request.
    pub grammars: crate::infer::grammar::Grammars,
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
    let dir = &hub::resolve(dir)?;
    if gguf::is_gguf(dir) {
        bail!(
            "{} is a GGUF file: its quantized weights can be run but not trained; convert it first with `chatforge export --model {} --format hf --out DIR` and train from DIR",
            dir.display(),
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
    if !is_adapter_only(dir) {
        weight_files(dir)?;
    }
    if !dir.join("tokenizer.json").exists() {
        bail!(
            "{} is not a model directory chatforge can read: tokenizer.json is missing",
            dir.display()
        );
    }
    Ok((config, Tokenizer::load(dir)?))
}

/// A directory of LoRA adapters (PEFT's `adapter_config.json`) without merged weights: loading
/// it loads the base model it names and attaches the adapters.
pub fn is_adapter_only(dir: &Path) -> bool {
    dir.join("adapter_config.json").exists()
        && !dir.join("model.safetensors").exists()
        && !dir.join("model.safetensors.index.json").exists()
}

/// Loads the base model an adapter directory names and attaches its adapters.
fn load_adapters(dir: &Path, device: &Device) -> Result<LoadedModel> {
    let config_file = dir.join("adapter_config.json");
    let (cfg, base) = lora::LoraConfig::read_peft(&config_file)?;
    let mut base_dir = PathBuf::from(&base);
    if base_dir.is_relative() && dir.join(&base_dir).exists() {
        base_dir = dir.join(&base_dir);
    }
    let mut lm = load(&base_dir, device).with_context(|| {
        format!(
            "{}: cannot load the base model {base:?} it names",
            config_file.display()
        )
    })?;
    let weights = dir.join("adapter_model.safetensors");
    // SAFETY: as in `load`.
    let vb =
        unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, device) }
            .with_context(|| format!("cannot read the adapters {}", weights.display()))?;
    lm.model
        .attach_lora(&cfg, vb.pp(lora::PEFT_PREFIX))
        .with_context(|| {
            format!(
                "{} does not fit the base model {}",
                weights.display(),
                base_dir.display()
            )
        })?;
    if dir.join("tokenizer.json").exists() {
        lm.tokenizer = Tokenizer::load(dir)?;
    }
    lm.dir = dir.to_path_buf();
    Ok(lm)
}

/// Every weight of the model at `dir` under its Hugging Face name: read from its safetensors
/// files, or computed (adapters merged) for an adapter directory.
pub fn weight_tensors(
    dir: &Path,
) -> Result<std::collections::HashMap<String, candle_core::Tensor>> {
    let dir = &hub::resolve(dir)?;
    if is_adapter_only(dir) {
        return Ok(load(dir, &Device::Cpu)?
            .model
            .named_weights()?
            .into_iter()
            .collect());
    }
    let mut tensors = std::collections::HashMap::new();
    for f in weight_files(dir)? {
        tensors.extend(
            candle_core::safetensors::load(&f, &Device::Cpu)
                .with_context(|| format!("cannot read weights {}", f.display()))?,
        );
    }
    Ok(tensors)
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

/// Writes the model's weights as one f32 `model.safetensors` under Hugging Face names (written
/// to a temporary name and renamed).
pub fn save_weights(model: &Llama, path: &Path) -> Result<()> {
    let tensors: std::collections::HashMap<String, candle_core::Tensor> =
        model.named_weights()?.into_iter().collect();
    crate::util::write_atomic_with(path, |tmp| {
        candle_core::safetensors::save(&tensors, tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))
    })
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
    let dir = &hub::resolve(dir)?;
    if gguf::is_gguf(dir) {
        return gguf::load(dir, device);
    }
    if dir.is_dir() && is_adapter_only(dir) {
        return load_adapters(dir, device);
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
    let vb = var_builder(&weights, &config, device)
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
        grammars: Default::default(),
    })
}

/// Weights with fused projections (Phi-3's `qkv_proj` and `gate_up_proj`) read under the split
/// names the model asks for: each projection is its rows of the fused matrix.
struct SplitFused {
    tensors: candle_core::safetensors::MmapedSafetensors,
    config: LlamaConfig,
}

impl SplitFused {
    /// The fused tensor and row range that hold `name`, when it is a split projection.
    fn source(&self, name: &str) -> Option<(String, usize, usize)> {
        let c = &self.config;
        let (q, kv, ff) = (
            c.num_attention_heads * c.head_size(),
            c.kv_heads() * c.head_size(),
            c.intermediate_size,
        );
        let (prefix, leaf) = name.rsplit_once('.')?;
        let (block, proj) = prefix.rsplit_once('.')?;
        let (fused, start, rows) = match proj {
            "q_proj" => ("qkv_proj", 0, q),
            "k_proj" => ("qkv_proj", q, kv),
            "v_proj" => ("qkv_proj", q + kv, kv),
            "gate_proj" => ("gate_up_proj", 0, ff),
            "up_proj" => ("gate_up_proj", ff, ff),
            _ => return None,
        };
        Some((format!("{block}.{fused}.{leaf}"), start, rows))
    }
}

impl candle_nn::var_builder::SimpleBackend for SplitFused {
    fn get(
        &self,
        shape: candle_core::Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &shape {
            candle_core::bail!("{name} has shape {:?}, expected {shape:?}", t.shape());
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        match self.source(name) {
            Some((fused, start, rows)) => self
                .tensors
                .load(&fused, dev)?
                .narrow(0, start, rows)?
                .contiguous()?
                .to_dtype(dtype),
            None => self.tensors.load(name, dev)?.to_dtype(dtype),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        match self.source(name) {
            Some((fused, _, _)) => self.tensors.get(&fused).is_ok(),
            None => self.tensors.get(name).is_ok(),
        }
    }
}

/// The weights in `files` for a model of `config`, as [`Llama::new`] asks for them; fused
/// projections (Phi-3) are split on the way.
pub fn var_builder(
    files: &[PathBuf],
    config: &LlamaConfig,
    device: &Device,
) -> Result<candle_nn::VarBuilder<'static>> {
    // SAFETY: the files are mapped read-only; chatforge writes them only by atomic rename.
    let tensors = unsafe { candle_core::safetensors::MmapedSafetensors::multi(files) }?;
    if tensors
        .get("model.layers.0.self_attn.qkv_proj.weight")
        .is_ok()
    {
        let split = SplitFused {
            tensors,
            config: config.clone(),
        };
        return Ok(candle_nn::VarBuilder::from_backend(
            Box::new(split),
            DType::F32,
            device.clone(),
        ));
    }
    // SAFETY: as above. bf16 and f16 weights are converted to f32 as they are read.
    Ok(unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(files, DType::F32, device) }?)
}
