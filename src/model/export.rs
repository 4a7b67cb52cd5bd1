//! `chatforge export --format hf`: a run as a Hugging Face Llama directory that `transformers`
//! loads as it is: `config.json` (already in Hugging Face's names), `model.safetensors` (already
//! under Hugging Face's tensor names), `tokenizer.json`, and `tokenizer_config.json` and
//! `generation_config.json` with the chat template and the special tokens.

use crate::tokenizer::chat::ChatTemplate;
use anyhow::{bail, Context, Result};
use serde_json::json;
use std::path::Path;

/// Our chat format as a Jinja template, the form `transformers` applies.
pub const CHATFORGE_JINJA: &str = "<|bos|>{% for m in messages %}{% if m['role'] == 'system' %}<|system_start|>{{ m['content'] }}<|system_end|>{% elif m['role'] == 'user' %}<|user_start|>{{ m['content'] }}<|user_end|>{% else %}<|assistant_start|>{{ m['content'] }}<|assistant_end|>{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant_start|>{% endif %}";

/// Writes the Hugging Face directory `out` for the model at `run`: a run or checkpoint
/// directory, a Hugging Face directory, a LoRA adapter directory, or a GGUF file (dequantized to
/// f32, so it can be fine-tuned).
pub fn export_hf(run: &Path, out: &Path) -> Result<()> {
    let lm = super::load(run, &candle_core::Device::Cpu)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let tok = &lm.tokenizer;
    let template = match lm.template() {
        Ok(ChatTemplate::Chatforge) => Some(CHATFORGE_JINJA.to_string()),
        Ok(ChatTemplate::Jinja(t)) => Some(t),
        _ => None,
    };
    let mut stops = crate::infer::generate::stop_ids(&lm);
    if let Ok(t) = lm.template() {
        stops.extend(t.stop_ids(tok));
    }
    stops.sort_unstable();
    stops.dedup();
    if let (Some(cap), false) = (
        lm.model.config.family.final_logit_softcapping,
        lm.model.config.is_gemma3(),
    ) {
        eprintln!(
            "note: {} soft-caps its logits at {cap}; chatforge reads that from config.json, but transformers' {} class ignores final_logit_softcapping",
            run.display(),
            lm.model.config.model_type
        );
    }
    let mut config = serde_json::to_value(&lm.model.config)?;
    config["torch_dtype"] = json!("float32");
    config["bos_token_id"] = json!(tok.bos_id());
    config["eos_token_id"] = json!(stops);
    crate::util::write_json_atomic(&out.join("config.json"), &config)?;
    super::save_weights(&lm.model, &out.join("model.safetensors"))?;
    tok.save(out)?;
    let name = |id: Option<u32>| id.and_then(|i| tok.id_to_token(i));
    let end_of_turn = tok
        .special_id("<|assistant_end|>")
        .or(stops.first().copied());
    let tokenizer_config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name(tok.bos_id()),
        "eos_token": name(end_of_turn),
        "pad_token": name(tok.special_id("<|pad|>")),
        "add_bos_token": false,
        "clean_up_tokenization_spaces": false,
        "model_max_length": lm.model.config.max_position_embeddings,
        "chat_template": template,
    });
    crate::util::write_json_atomic(&out.join("tokenizer_config.json"), &tokenizer_config)?;
    crate::util::write_json_atomic(
        &out.join("generation_config.json"),
        &json!({"bos_token_id": tok.bos_id(), "eos_token_id": stops, "pad_token_id": tok.special_id("<|pad|>")}),
    )?;
    Ok(())
}

/// Weight types `export --format gguf` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum GgufQuant {
    F32,
    Q8_0,
    Q4_0,
}

/// Writes `out` as a GGUF file that llama.cpp runs (architecture `llama`, or `qwen3` for a model
/// with per-head query/key norms): the weights (norms in f32, matrices in `quant` where their rows
/// divide into blocks), for `llama` q/k rows interleaved as llama.cpp's rotary embedding expects
/// (`qwen3` keeps Hugging Face's order), and the tokenizer (byte-level BPE vocabulary, merges,
/// special tokens) and chat template in its metadata.
pub fn export_gguf(run: &Path, out: &Path, quant: GgufQuant) -> Result<()> {
    use candle_core::quantized::{gguf_file::Value, GgmlDType, QTensor};
    if super::gguf::is_gguf(run) {
        bail!("{} is already a GGUF file", run.display());
    }
    let lm = super::load(run, &candle_core::Device::Cpu)?;
    let c = &lm.model.config;
    if c.is_gemma3() || c.family.sliding_window.is_some() {
        bail!(
            "{}: GGUF export writes the llama and qwen3 architectures; a {} model is not one yet (export --format hf, then llama.cpp's convert_hf_to_gguf.py)",
            run.display(),
            c.model_type
        );
    }
    // llama.cpp's llama and qwen3 graphs hard-code SwiGLU and plain logits.
    let mut lacking = Vec::new();
    if c.hidden_act != "silu" {
        lacking.push(format!("a {} MLP (--activation relu2)", c.hidden_act));
    }
    if let Some(cap) = c.family.final_logit_softcapping {
        lacking.push(format!("logit soft-capping at {cap} (--logit-softcap)"));
    }
    if !lacking.is_empty() {
        bail!(
            "{}: GGUF's llama and qwen3 architectures lack what this model uses: {}; export --format hf instead, which keeps it, or train without the switch",
            run.display(),
            lacking.join(" and ")
        );
    }
    let tok = &lm.tokenizer;
    let tensors: std::collections::HashMap<String, candle_core::Tensor> =
        lm.model.named_weights()?.into_iter().collect();
    let get = |name: &str| -> Result<candle_core::Tensor> {
        Ok(tensors
            .get(name)
            .with_context(|| format!("{}: tensor {name} is missing", run.display()))?
            .to_dtype(candle_core::DType::F32)?)
    };
    let dtype = match quant {
        GgufQuant::F32 => GgmlDType::F32,
        GgufQuant::Q8_0 => GgmlDType::Q8_0,
        GgufQuant::Q4_0 => GgmlDType::Q4_0,
    };
    let matrix = |t: &candle_core::Tensor| -> Result<QTensor> {
        let cols = t.dims().last().copied().unwrap_or(0);
        let d = if cols % dtype.block_size() == 0 {
            dtype
        } else {
            GgmlDType::F32
        };
        Ok(QTensor::quantize(t, d)?)
    };
    let vector =
        |t: &candle_core::Tensor| -> Result<QTensor> { Ok(QTensor::quantize(t, GgmlDType::F32)?) };
    // Hugging Face's half-split rotary layout to llama.cpp's interleaved one (its converter's permute).
    let arch = if c.qk_norm() { "qwen3" } else { "llama" };
    let interleave = |t: candle_core::Tensor, heads: usize| -> Result<candle_core::Tensor> {
        if arch != "llama" {
            return Ok(t);
        }
        let dims = t.dims().to_vec();
        let d = dims[0] / heads;
        let rest: usize = dims[1..].iter().product();
        Ok(t.reshape((heads, 2, d / 2, rest))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape(dims)?)
    };
    let (heads, kv) = (c.num_attention_heads, c.kv_heads());
    let mut out_tensors: Vec<(String, QTensor)> = vec![(
        "token_embd.weight".into(),
        matrix(&get("model.embed_tokens.weight")?)?,
    )];
    for i in 0..c.num_hidden_layers {
        let hf = |n: &str| format!("model.layers.{i}.{n}");
        let gg = |n: &str| format!("blk.{i}.{n}");
        out_tensors.push((
            gg("attn_norm.weight"),
            vector(&get(&hf("input_layernorm.weight"))?)?,
        ));
        out_tensors.push((
            gg("attn_q.weight"),
            matrix(&interleave(get(&hf("self_attn.q_proj.weight"))?, heads)?)?,
        ));
        out_tensors.push((
            gg("attn_k.weight"),
            matrix(&interleave(get(&hf("self_attn.k_proj.weight"))?, kv)?)?,
        ));
        out_tensors.push((
            gg("attn_v.weight"),
            matrix(&get(&hf("self_attn.v_proj.weight"))?)?,
        ));
        if c.attention_bias {
            out_tensors.push((
                gg("attn_q.bias"),
                vector(&interleave(get(&hf("self_attn.q_proj.bias"))?, heads)?)?,
            ));
            out_tensors.push((
                gg("attn_k.bias"),
                vector(&interleave(get(&hf("self_attn.k_proj.bias"))?, kv)?)?,
            ));
            out_tensors.push((
                gg("attn_v.bias"),
                vector(&get(&hf("self_attn.v_proj.bias"))?)?,
            ));
        }
        if c.qk_norm() {
            for (gguf, hf_name) in [("attn_q_norm", "q_norm"), ("attn_k_norm", "k_norm")] {
                out_tensors.push((
                    gg(&format!("{gguf}.weight")),
                    vector(&get(&hf(&format!("self_attn.{hf_name}.weight")))?)?,
                ));
            }
        }
        out_tensors.push((
            gg("attn_output.weight"),
            matrix(&get(&hf("self_attn.o_proj.weight"))?)?,
        ));
        out_tensors.push((
            gg("ffn_norm.weight"),
            vector(&get(&hf("post_attention_layernorm.weight"))?)?,
        ));
        out_tensors.push((
            gg("ffn_gate.weight"),
            matrix(&get(&hf("mlp.gate_proj.weight"))?)?,
        ));
        out_tensors.push((
            gg("ffn_up.weight"),
            matrix(&get(&hf("mlp.up_proj.weight"))?)?,
        ));
        out_tensors.push((
            gg("ffn_down.weight"),
            matrix(&get(&hf("mlp.down_proj.weight"))?)?,
        ));
    }
    out_tensors.push((
        "output_norm.weight".into(),
        vector(&get("model.norm.weight")?)?,
    ));
    if !c.tie_word_embeddings {
        out_tensors.push(("output.weight".into(), matrix(&get("lm_head.weight")?)?));
    }
    let vocab = tok.vocab_size();
    let mut tokens = Vec::with_capacity(c.vocab_size);
    let mut types = Vec::with_capacity(c.vocab_size);
    for id in 0..c.vocab_size as u32 {
        // Rows past the tokenizer's vocabulary (padding) get placeholder names llama.cpp accepts.
        let t = if (id as usize) < vocab {
            tok.id_to_token(id).unwrap_or_else(|| format!("[PAD{id}]"))
        } else {
            format!("[PAD{id}]")
        };
        types.push(Value::I32(if tok.is_special(id) || id as usize >= vocab {
            3
        } else {
            1
        }));
        tokens.push(Value::String(t));
    }
    let merges: Vec<Value> = tok
        .merges()
        .iter()
        .map(|(a, b)| Value::String(format!("{a} {b}")))
        .collect();
    let template = match lm.template() {
        Ok(ChatTemplate::Chatforge) => Some(CHATFORGE_JINJA.to_string()),
        Ok(ChatTemplate::Jinja(t)) => Some(t),
        _ => None,
    };
    let end_of_turn = tok
        .special_id("<|assistant_end|>")
        .or_else(|| crate::infer::generate::stop_ids(&lm).first().copied());
    let name = run
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "chatforge".into());
    let key = |k: &str| format!("{arch}.{k}");
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.name".into(), Value::String(name)),
        (
            key("context_length"),
            Value::U32(c.max_position_embeddings as u32),
        ),
        (key("embedding_length"), Value::U32(c.hidden_size as u32)),
        (key("block_count"), Value::U32(c.num_hidden_layers as u32)),
        (
            key("feed_forward_length"),
            Value::U32(c.intermediate_size as u32),
        ),
        (key("attention.head_count"), Value::U32(heads as u32)),
        (key("attention.head_count_kv"), Value::U32(kv as u32)),
        (
            key("attention.key_length"),
            Value::U32(c.head_size() as u32),
        ),
        (
            key("attention.value_length"),
            Value::U32(c.head_size() as u32),
        ),
        (
            key("rope.dimension_count"),
            Value::U32(c.head_size() as u32),
        ),
        (key("rope.freq_base"), Value::F32(c.rope_theta as f32)),
        (
            key("attention.layer_norm_rms_epsilon"),
            Value::F32(c.rms_norm_eps as f32),
        ),
        (key("vocab_size"), Value::U32(c.vocab_size as u32)),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        // The name llama.cpp knows our split by; GPT-4's for tokenizers that are not ours.
        (
            "tokenizer.ggml.pre".into(),
            Value::String(
                tok.split_pattern()
                    .unwrap_or(crate::tokenizer::SplitPattern::Gpt4)
                    .gguf_pre()
                    .into(),
            ),
        ),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
        ("tokenizer.ggml.add_eos_token".into(), Value::Bool(false)),
    ];
    if let Some(b) = tok.bos_id() {
        meta.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(b)));
    }
    if let Some(e) = end_of_turn {
        meta.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(e)));
    }
    if let Some(p) = tok.special_id("<|pad|>") {
        meta.push(("tokenizer.ggml.padding_token_id".into(), Value::U32(p)));
    }
    if let Some(t) = template {
        meta.push(("tokenizer.chat_template".into(), Value::String(t)));
    }
    crate::util::write_atomic_with(out, |tmp| {
        let mut f = std::io::BufWriter::new(std::fs::File::create(tmp)?);
        let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensor_refs: Vec<(&str, &QTensor)> =
            out_tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        candle_core::quantized::gguf_file::write(&mut f, &meta_refs, &tensor_refs)?;
        use std::io::Write;
        f.flush()?;
        Ok(())
    })
}

/// Chatforge's own template says the same as its Jinja translation.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::chat::{render, Message, Role};
    use crate::tokenizer::{Tokenizer, TrainOptions};

    #[test]
    fn the_jinja_translation_renders_the_same_tokens() {
        let (tok, _) = Tokenizer::train(
            &["hello there, how are you? 你好"],
            &TrainOptions {
                vocab_size: 300,
                ..Default::default()
            },
        )
        .unwrap();
        let messages = [
            Message::new(Role::System, "Be brief."),
            Message::new(Role::User, "hello there"),
            Message::new(Role::Assistant, "how are you?"),
            Message::new(Role::User, "你好"),
        ];
        let ours = render(&tok, &ChatTemplate::Chatforge, &messages, true).unwrap();
        let jinja = render(
            &tok,
            &ChatTemplate::Jinja(CHATFORGE_JINJA.into()),
            &messages,
            true,
        )
        .unwrap();
        assert_eq!(ours.ids, jinja.ids);
    }
}
