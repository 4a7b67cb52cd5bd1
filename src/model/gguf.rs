//! GGUF files (llama.cpp, Ollama): architectures `llama` (SmolLM2, Llama 2/3, Mistral), `qwen2`
//! (with its q/k/v biases), `qwen3` (per-head query/key norms), `gemma3` and `phi3` (fused
//! projections, cut apart as they are read) into the same [`Llama`] that chatforge trains.
//!
//! Projection weights stay in their quantized block format (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the
//! K-quants, F16, F32) and are multiplied quantized; norms are dequantized. The embedding stays
//! quantized too: its rows are dequantized as they are looked up, from the output head's matrix
//! when the two are tied. The tokenizer comes from `tokenizer.ggml.*` (GPT-2-style BPE, or
//! SentencePiece), the chat template from `tokenizer.chat_template`.

use super::llama::{Block, Embedding, Head, Llama, Proj};
use super::{LlamaConfig, LoadedModel};
use crate::tokenizer::Tokenizer;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Tensor};
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// Whether `path` names a GGUF file (by its magic bytes).
pub fn is_gguf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    path.is_file()
        && std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .is_ok()
        && &magic == b"GGUF"
}

struct Reader<'a> {
    path: &'a Path,
    file: std::fs::File,
    content: gguf_file::Content,
    device: Device,
}

impl Reader<'_> {
    fn meta(&self, key: &str) -> Option<&gguf_file::Value> {
        self.content.metadata.get(key)
    }

    fn meta_u32(&self, key: &str) -> Result<u32> {
        self.meta(key)
            .ok_or_else(|| anyhow!("{}: metadata `{key}` is missing", self.path.display()))?
            .to_u32()
            .map_err(|e| anyhow!("{}: metadata `{key}`: {e}", self.path.display()))
    }

    /// Refuses a tensor whose shape is not `want` (candle's order, rows first): a crafted or
    /// mismatched file is named here instead of indexing out of bounds later.
    fn expect_shape(&self, name: &str, want: &[usize]) -> Result<()> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| anyhow!("{}: tensor `{name}` is missing", self.path.display()))?;
        let got = info.shape.dims();
        if got != want {
            bail!(
                "{}: tensor `{name}` has shape {got:?}, but the metadata calls for {want:?}",
                self.path.display()
            );
        }
        Ok(())
    }

    fn has(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    fn qtensor(&mut self, name: &str) -> Result<QTensor> {
        if !self.has(name) {
            bail!("{}: tensor `{name}` is missing", self.path.display());
        }
        self.content
            .tensor(&mut self.file, name, &self.device)
            .map_err(|e| anyhow!("{}: cannot read tensor `{name}`: {e}", self.path.display()))
    }

    fn dense(&mut self, name: &str) -> Result<Tensor> {
        let q = self.qtensor(name)?;
        Ok(q.dequantize(&self.device)?.to_dtype(DType::F32)?)
    }

    fn proj(&mut self, name: &str, bias: bool) -> Result<Proj> {
        let q = self.qtensor(&format!("{name}.weight"))?;
        let bias = if bias {
            Some(self.dense(&format!("{name}.bias"))?)
        } else {
            None
        };
        quantized_proj(q, bias)
    }

    /// A q or k projection whose rows llama.cpp's converter interleaved for its rotary layout
    /// (pairs (0, d/2), (1, d/2+1), ... made adjacent); the rows are put back in Hugging Face
    /// order, block by block, so the one rotary embedding of [`Llama`] applies.
    /// A matrix's raw blocks: its type, `[rows, cols]`, the bytes per row, and the bytes.
    fn raw_rows(&mut self, wname: &str) -> Result<(GgmlDType, [usize; 2], usize, Vec<u8>)> {
        let info = self
            .content
            .tensor_infos
            .get(wname)
            .ok_or_else(|| anyhow!("{}: tensor `{wname}` is missing", self.path.display()))?;
        let dtype = info.ggml_dtype;
        let dims = info.shape.dims().to_vec();
        let [rows, cols] = dims[..] else {
            bail!("{}: tensor `{wname}` is not a matrix", self.path.display());
        };
        if !cols.is_multiple_of(dtype.block_size()) {
            bail!(
                "{}: tensor `{wname}` has {cols} columns, not whole blocks of {}",
                self.path.display(),
                dtype.block_size()
            );
        }
        let row_bytes = cols / dtype.block_size() * dtype.type_size();
        let size = rows
            .checked_mul(row_bytes)
            .filter(|&n| n as u64 <= self.file.metadata().map(|m| m.len()).unwrap_or(0))
            .ok_or_else(|| {
                anyhow!(
                    "{}: tensor `{wname}` is larger than the file",
                    self.path.display()
                )
            })?;
        let offset = self.content.tensor_data_offset + info.offset;
        let mut raw = vec![0u8; size];
        self.file.seek(SeekFrom::Start(offset))?;
        self.file
            .read_exact(&mut raw)
            .with_context(|| format!("{}: tensor `{wname}` is cut short", self.path.display()))?;
        Ok((dtype, [rows, cols], row_bytes, raw))
    }

    /// A q or k projection whose rows llama.cpp's converter interleaved for its rotary layout
    /// (pairs (0, d/2), (1, d/2+1), ... made adjacent); the rows are put back in Hugging Face
    /// order, block by block, so the one rotary embedding of [`Llama`] applies.
    fn unpermuted_proj(&mut self, name: &str, heads: usize, bias: bool) -> Result<Proj> {
        let wname = format!("{name}.weight");
        let (dtype, [rows, cols], row_bytes, raw) = self.raw_rows(&wname)?;
        if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
            bail!(
                "{}: tensor `{wname}` ({rows} x {cols}) does not split into {heads} heads of even size",
                self.path.display(),
            );
        }
        let d = rows / heads;
        let mut out = vec![0u8; raw.len()];
        for h in 0..heads {
            for i in 0..d / 2 {
                for j in 0..2 {
                    let from = h * d + 2 * i + j;
                    let to = h * d + j * (d / 2) + i;
                    out[to * row_bytes..(to + 1) * row_bytes]
                        .copy_from_slice(&raw[from * row_bytes..(from + 1) * row_bytes]);
                }
            }
        }
        let dims = vec![rows, cols];
        let q =
            candle_core::quantized::ggml_file::qtensor_from_ggml(dtype, &out, dims, &self.device)?;
        let bias = if bias {
            Some(self.dense(&format!("{name}.bias"))?)
        } else {
            None
        };
        // Through the same kernel choice as every other projection (q and k once went to candle's
        // scalar Q4_1 loop, 15% of decode time).
        quantized_proj(q, bias)
    }

    /// A fused matrix (Phi-3's `attn_qkv`, `ffn_up` holding gate then up) cut into projections
    /// of `parts` rows each, still quantized: a row's blocks are whole, so rows split cleanly.
    fn split_proj(&mut self, name: &str, parts: &[usize]) -> Result<Vec<Proj>> {
        let wname = format!("{name}.weight");
        let (dtype, [rows, cols], row_bytes, raw) = self.raw_rows(&wname)?;
        if parts.iter().sum::<usize>() != rows {
            bail!(
                "{}: tensor `{wname}` has {rows} rows, but the metadata calls for {parts:?}",
                self.path.display()
            );
        }
        let mut start = 0;
        let mut out = Vec::with_capacity(parts.len());
        for &n in parts {
            let bytes = &raw[start * row_bytes..(start + n) * row_bytes];
            let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
                dtype,
                bytes,
                vec![n, cols],
                &self.device,
            )?;
            out.push(quantized_proj(q, None)?);
            start += n;
        }
        Ok(out)
    }
}

/// GPT-2-style vocabularies split text the way llama.cpp does for their `tokenizer.ggml.pre`:
/// no space added in front (candle's generic fallback adds one), and SmolLM's one-digit numbers.
fn fix_pre_tokenizer(r: &Reader, inner: &mut tokenizers::Tokenizer) {
    use tokenizers::pre_tokenizers::{
        byte_level::ByteLevel,
        digits::Digits,
        sequence::Sequence,
        split::{Split, SplitPattern as SplitRegex},
        PreTokenizerWrapper,
    };
    use tokenizers::SplitDelimiterBehavior::Isolated;
    let text = |k: &str| r.meta(k).and_then(|v| v.to_string().ok()).cloned();
    if text("tokenizer.ggml.model").as_deref() != Some("gpt2") {
        return;
    }
    let pre = text("tokenizer.ggml.pre").unwrap_or_default();
    if matches!(pre.as_str(), "qwen2" | "llama3" | "smaug-bpe" | "lfm2") {
        return; // candle builds these as their tokenizer.json files do
    }
    let prefix = r
        .meta("tokenizer.ggml.add_space_prefix")
        .and_then(|v| v.to_bool().ok())
        .unwrap_or(false);
    let byte_level: PreTokenizerWrapper = ByteLevel::new(prefix, true, true).into();
    let wrapper = match pre.as_str() {
        "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level]).into(),
        // Llama 3's split, which chatforge's GPT-4 split also exports as.
        "llama-bpe" => {
            let regex = crate::tokenizer::SplitPattern::Gpt4.regex();
            match Split::new(SplitRegex::Regex(regex.into()), Isolated, false) {
                Ok(split) => Sequence::new(vec![
                    split.into(),
                    ByteLevel::new(false, false, false).into(),
                ])
                .into(),
                Err(_) => byte_level,
            }
        }
        _ => byte_level,
    };
    inner.with_pre_tokenizer(Some(wrapper));
}

/// The tokenizer `tokenizer.ggml.*` describes: GPT-2-style byte-level BPE through candle's
/// reader, SentencePiece BPE (`llama`) and unigram (`t5`) through [`sentencepiece`].
fn tokenizer(r: &Reader) -> Result<Tokenizer> {
    use crate::tokenizer::sentencepiece::{self, Algorithm, PieceKind, Vocabulary};
    use candle_core::quantized::tokenizer::TokenizerFromGguf;
    let kind = r
        .meta("tokenizer.ggml.model")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    let algorithm = match kind.as_str() {
        "gpt2" => {
            let mut inner =
                tokenizers::Tokenizer::from_gguf(&r.content).map_err(|e| anyhow!("{e}"))?;
            fix_pre_tokenizer(r, &mut inner);
            return Tokenizer::from_tokenizers(inner);
        }
        "llama" => Algorithm::Bpe,
        "t5" => Algorithm::Unigram,
        other => bail!("tokenizer.ggml.model \"{other}\" is not supported (gpt2, llama or t5)"),
    };
    let array = |key: &str| -> Result<&Vec<gguf_file::Value>> {
        match r.meta(key) {
            Some(gguf_file::Value::Array(a)) => Ok(a),
            _ => bail!("metadata `{key}` is missing or not a list"),
        }
    };
    let pieces = array("tokenizer.ggml.tokens")?
        .iter()
        .map(|v| v.to_string().cloned())
        .collect::<candle_core::Result<Vec<String>>>()?;
    let scores = match r.meta("tokenizer.ggml.scores") {
        Some(_) => array("tokenizer.ggml.scores")?
            .iter()
            .map(|v| v.to_f32())
            .collect::<candle_core::Result<Vec<f32>>>()?,
        None => vec![0.0; pieces.len()],
    };
    let kinds = match r.meta("tokenizer.ggml.token_type") {
        Some(_) => array("tokenizer.ggml.token_type")?
            .iter()
            .map(|v| v.to_i32().map(|c| PieceKind::from_gguf(c as u32)))
            .collect::<candle_core::Result<Vec<PieceKind>>>()?,
        None => vec![PieceKind::Normal; pieces.len()],
    };
    let flag = |key: &str, default: bool| {
        r.meta(key)
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(default)
    };
    let vocabulary = Vocabulary {
        pieces,
        scores,
        kinds,
        unknown: r.meta_u32("tokenizer.ggml.unknown_token_id").ok(),
        // llama.cpp's default for SentencePiece files that do not say.
        add_space_prefix: flag("tokenizer.ggml.add_space_prefix", true),
    };
    let mut tok = Tokenizer::from_tokenizers(sentencepiece::build(&vocabulary, algorithm)?)?;
    if flag("tokenizer.ggml.add_bos_token", true) {
        if let Ok(bos) = r.meta_u32("tokenizer.ggml.bos_token_id") {
            tok = tok.with_bos(bos);
        }
    }
    Ok(tok)
}

/// A quantized projection: Q4_1, Q8_0 (and Q4_0, Q5_0 as Q8_0) through our AVX2 kernel, other
/// types through candle's `QMatMul`.
fn quantized_proj(q: QTensor, bias: Option<Tensor>) -> Result<Proj> {
    if let Some(format) = super::quant::BlockFormat::of(q.dtype()) {
        let (rows, cols) = q.shape().dims2()?;
        let blocks = super::quant::as_q8_0(q.dtype(), &q.data()?).into_owned();
        let weight = super::quant::QuantMatrix::new(format, rows, cols, &blocks)?;
        return Ok(Proj::Block {
            weight: std::sync::Arc::new(weight),
            bias,
        });
    }
    Ok(Proj::Quantized {
        weight: QMatMul::from_qtensor(q)?,
        bias,
    })
}

/// Loads a GGUF model and its tokenizer.
pub fn load(path: &Path, device: &Device) -> Result<LoadedModel> {
    let mut file = std::fs::File::open(path)
        .with_context(|| format!("cannot open the model file {}", path.display()))?;
    let content = gguf_file::Content::read(&mut file).map_err(|e| {
        anyhow!(
            "{}: not a readable GGUF file ({e}); is the download complete?",
            path.display()
        )
    })?;
    let file_len = file.metadata()?.len();
    for (name, info) in &content.tensor_infos {
        let bytes =
            info.shape.elem_count() / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
        if content.tensor_data_offset + info.offset + bytes as u64 > file_len {
            bail!(
                "{}: tensor `{name}` runs past the end of the file; the file is truncated (download it again)",
                path.display()
            );
        }
        if matches!(info.ggml_dtype, GgmlDType::BF16) {
            bail!(
                "{}: tensor `{name}` is {:?}, a type chatforge does not read yet; use an F16, Q8_0, Q4_0/Q4_1 or K-quant file",
                path.display(),
                info.ggml_dtype
            );
        }
    }
    let mut r = Reader {
        path,
        file,
        content,
        device: device.clone(),
    };
    let arch = r
        .meta("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    if !matches!(
        arch.as_str(),
        "llama" | "qwen2" | "qwen3" | "gemma3" | "phi3"
    ) {
        bail!(
            "{}: architecture {arch:?} is not supported (supported: llama, qwen2, qwen3, gemma3, phi3)",
            path.display()
        );
    }
    let gemma = arch == "gemma3";
    // Phi-3 is Llama with fused q/k/v and gate/up matrices, cut apart as they are read: from
    // then on it is a Llama, as its Hugging Face directories are (`config::LlamaConfig::load`).
    let phi3 = arch == "phi3";
    if phi3 && r.has("rope_factors_long.weight") {
        bail!(
            "{}: this Phi-3 uses long-context rotary scaling (rope_factors_long), which chatforge does not support yet; the 4k-context Phi-3 files load",
            path.display()
        );
    }
    let key = |k: &str| format!("{arch}.{k}");
    let hidden = r.meta_u32(&key("embedding_length"))? as usize;
    let heads = r.meta_u32(&key("attention.head_count"))? as usize;
    let kv_heads = r
        .meta_u32(&key("attention.head_count_kv"))
        .map(|v| v as usize)
        .unwrap_or(heads);
    let embed_dims = r
        .content
        .tensor_infos
        .get("token_embd.weight")
        .map(|i| i.shape.dims().to_vec())
        .ok_or_else(|| anyhow!("{}: tensor `token_embd.weight` is missing", path.display()))?;
    let [vocab_size, _] = embed_dims[..] else {
        bail!(
            "{}: tensor `token_embd.weight` has shape {embed_dims:?}, not [vocab, hidden]",
            path.display()
        );
    };
    let eps = r
        .meta(&key("attention.layer_norm_rms_epsilon"))
        .and_then(|v| v.to_f32().ok())
        .unwrap_or(1e-5) as f64;
    let theta = r
        .meta(&key("rope.freq_base"))
        .and_then(|v| v.to_f32().ok())
        .unwrap_or(10_000.0) as f64;
    let eos = r.meta_u32("tokenizer.ggml.eos_token_id").ok();
    let meta_f64 = |k: &str| r.meta(&key(k)).and_then(|v| v.to_f32().ok()).map(f64::from);
    // Gemma 3 as llama.cpp runs it: local layers over `attention.sliding_window` positions with
    // every sixth layer global, and a rotary base of 10,000 on the local ones.
    let family = match gemma {
        true => super::config::FamilyFields {
            sliding_window: Some(r.meta_u32(&key("attention.sliding_window"))? as usize),
            sliding_window_pattern: Some(6),
            rope_local_base_freq: Some(10_000.0),
            final_logit_softcapping: meta_f64("final_logit_softcapping"),
            attn_logit_softcapping: meta_f64("attn_logit_softcapping"),
            ..Default::default()
        },
        false => Default::default(),
    };
    if let Some(kind) = r
        .meta(&key("rope.scaling.type"))
        .and_then(|v| v.to_string().ok())
        .filter(|k| k.as_str() != "none")
    {
        bail!(
            "{}: rotary scaling \"{kind}\" is not supported yet (only the default rotary embedding)",
            path.display()
        );
    }
    let config = LlamaConfig {
        architectures: vec![match arch.as_str() {
            "qwen2" => "Qwen2ForCausalLM".into(),
            "qwen3" => "Qwen3ForCausalLM".into(),
            "gemma3" => "Gemma3ForCausalLM".into(),
            _ => "LlamaForCausalLM".into(),
        }],
        model_type: match arch.as_str() {
            "gemma3" => "gemma3_text".into(),
            "phi3" => "llama".into(),
            _ => arch.clone(),
        },
        vocab_size,
        hidden_size: hidden,
        intermediate_size: r.meta_u32(&key("feed_forward_length"))? as usize,
        num_hidden_layers: r.meta_u32(&key("block_count"))? as usize,
        num_attention_heads: heads,
        num_key_value_heads: Some(kv_heads),
        // Qwen3's heads are not hidden / heads wide; the file says how wide.
        head_dim: r
            .meta_u32(&key("attention.key_length"))
            .ok()
            .map(|d| d as usize),
        // Attention over a window of `sliding_window` tokens (Phi-3) equals full attention over a
        // context no longer than that.
        max_position_embeddings: match (phi3, r.meta_u32(&key("attention.sliding_window"))) {
            (true, Ok(w)) => (w as usize).min(r.meta_u32(&key("context_length"))? as usize),
            _ => r.meta_u32(&key("context_length"))? as usize,
        },
        rms_norm_eps: eps,
        rope_theta: theta,
        tie_word_embeddings: !r.has("output.weight"),
        attention_bias: r.has("blk.0.attn_q.bias"),
        mlp_bias: false,
        hidden_act: match gemma {
            true => "gelu_pytorch_tanh".into(),
            false => "silu".into(),
        },
        bos_token_id: r.meta_u32("tokenizer.ggml.bos_token_id").ok(),
        eos_token_id: eos.map(|e| serde_json::json!(e)),
        torch_dtype: None,
        family,
    };
    config
        .validate(&path.display().to_string())
        .map_err(|e| anyhow!("{e}"))?;
    // Every tensor the model reads has the shape the metadata implies.
    let c = &config;
    let (hid, q_rows, kv_rows) = (
        c.hidden_size,
        c.num_attention_heads * c.head_size(),
        c.kv_heads() * c.head_size(),
    );
    r.expect_shape("token_embd.weight", &[c.vocab_size, hid])?;
    r.expect_shape("output_norm.weight", &[hid])?;
    if !c.tie_word_embeddings {
        r.expect_shape("output.weight", &[c.vocab_size, hid])?;
    }
    for i in 0..c.num_hidden_layers {
        let ff = c.intermediate_size;
        let projections = match phi3 {
            true => vec![
                ("attn_qkv.weight", vec![q_rows + 2 * kv_rows, hid]),
                ("ffn_up.weight", vec![2 * ff, hid]),
            ],
            false => vec![
                ("attn_q.weight", vec![q_rows, hid]),
                ("attn_k.weight", vec![kv_rows, hid]),
                ("attn_v.weight", vec![kv_rows, hid]),
                ("ffn_gate.weight", vec![ff, hid]),
                ("ffn_up.weight", vec![ff, hid]),
            ],
        };
        for (name, shape) in [
            ("attn_norm.weight", vec![hid]),
            ("ffn_norm.weight", vec![hid]),
            ("attn_output.weight", vec![hid, q_rows]),
            ("ffn_down.weight", vec![hid, ff]),
        ]
        .into_iter()
        .chain(projections)
        {
            r.expect_shape(&format!("blk.{i}.{name}"), &shape)?;
        }
        if c.qk_norm() {
            for name in ["attn_q_norm.weight", "attn_k_norm.weight"] {
                r.expect_shape(&format!("blk.{i}.{name}"), &[c.head_size()])?;
            }
        }
        if gemma {
            for name in ["post_attention_norm.weight", "post_ffw_norm.weight"] {
                r.expect_shape(&format!("blk.{i}.{name}"), &[hid])?;
            }
        }
        if c.attention_bias {
            for (name, n) in [("q", q_rows), ("k", kv_rows), ("v", kv_rows)] {
                r.expect_shape(&format!("blk.{i}.attn_{name}.bias"), &[n])?;
            }
        }
    }
    let bias = config.attention_bias;
    let mut layers = Vec::with_capacity(config.num_hidden_layers);
    for i in 0..config.num_hidden_layers {
        let b = format!("blk.{i}");
        // llama.cpp's converter interleaves q/k rows for llama; qwen2 keeps Hugging Face order.
        let [q, k, v, gate, up] = if phi3 {
            let (q_rows, kv_rows) = (heads * config.head_size(), kv_heads * config.head_size());
            let ff = config.intermediate_size;
            let mut qkv = r.split_proj(&format!("{b}.attn_qkv"), &[q_rows, kv_rows, kv_rows])?;
            let mut gate_up = r.split_proj(&format!("{b}.ffn_up"), &[ff, ff])?;
            let (up, gate) = (gate_up.remove(1), gate_up.remove(0));
            let (v, k, q) = (qkv.remove(2), qkv.remove(1), qkv.remove(0));
            [q, k, v, gate, up]
        } else {
            let (q, k) = if arch == "llama" {
                (
                    r.unpermuted_proj(&format!("{b}.attn_q"), heads, bias)?,
                    r.unpermuted_proj(&format!("{b}.attn_k"), kv_heads, bias)?,
                )
            } else {
                (
                    r.proj(&format!("{b}.attn_q"), bias)?,
                    r.proj(&format!("{b}.attn_k"), bias)?,
                )
            };
            [
                q,
                k,
                r.proj(&format!("{b}.attn_v"), bias)?,
                r.proj(&format!("{b}.ffn_gate"), false)?,
                r.proj(&format!("{b}.ffn_up"), false)?,
            ]
        };
        let mut block = Block::new(
            &config,
            r.dense(&format!("{b}.attn_norm.weight"))?,
            r.dense(&format!("{b}.ffn_norm.weight"))?,
            [
                q,
                k,
                v,
                r.proj(&format!("{b}.attn_output"), false)?,
                gate,
                up,
                r.proj(&format!("{b}.ffn_down"), false)?,
            ],
        );
        if config.qk_norm() {
            block = block.with_qk_norm(
                r.dense(&format!("{b}.attn_q_norm.weight"))?,
                r.dense(&format!("{b}.attn_k_norm.weight"))?,
            );
        }
        // llama.cpp's converter has already added Gemma's one to these norm weights.
        if gemma {
            block = block.with_output_norms(
                r.dense(&format!("{b}.post_attention_norm.weight"))?,
                r.dense(&format!("{b}.post_ffw_norm.weight"))?,
            );
        }
        layers.push(block);
    }
    let head_name = if config.tie_word_embeddings {
        "token_embd.weight"
    } else {
        "output.weight"
    };
    let quant_head = quantized_proj(r.qtensor(head_name)?, None)?;
    let embed = match (&quant_head, config.tie_word_embeddings) {
        (Proj::Block { weight, .. }, true) => Embedding::Rows(weight.clone()),
        _ => {
            let q = r.qtensor("token_embd.weight")?;
            Embedding::Quantized {
                blocks: q.data()?.into_owned(),
                dtype: q.dtype(),
                rows: config.vocab_size,
                cols: config.hidden_size,
            }
        }
    };
    let norm = r.dense("output_norm.weight")?;
    let tokenizer = crate::util::panic_to_error(|| tokenizer(&r)).with_context(|| {
        format!(
            "{}: cannot build the tokenizer from its metadata",
            path.display()
        )
    })?;
    if tokenizer.vocab_size() > config.vocab_size {
        bail!(
            "{}: the tokenizer has {} tokens but the embedding has {} rows",
            path.display(),
            tokenizer.vocab_size(),
            config.vocab_size
        );
    }
    let chat_template = r
        .meta("tokenizer.chat_template")
        .and_then(|v| v.to_string().ok())
        .cloned();
    let model = Llama::assemble(config, embed, layers, norm, Head::Quantized(quant_head));
    Ok(LoadedModel {
        model,
        tokenizer,
        dir: path.to_path_buf(),
        chat_template,
        grammars: Default::default(),
    })
}
