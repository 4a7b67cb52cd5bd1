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

/// Writes the Hugging Face directory `out` for the run or checkpoint directory `run`.
pub fn export_hf(run: &Path, out: &Path) -> Result<()> {
    if super::gguf::is_gguf(run) {
        bail!(
            "{}: exporting a GGUF file to Hugging Face format is not supported yet; export a chatforge run",
            run.display()
        );
    }
    let lm = super::load(run, &candle_core::Device::Cpu)?;
    let weights = super::weight_files(run)?;
    if weights.len() != 1 {
        bail!("{}: export reads a single model.safetensors", run.display());
    }
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
    let mut config = serde_json::to_value(&lm.model.config)?;
    config["torch_dtype"] = json!("float32");
    config["bos_token_id"] = json!(tok.bos_id());
    config["eos_token_id"] = json!(stops);
    crate::util::write_json_atomic(&out.join("config.json"), &config)?;
    copy_atomic(&weights[0], &out.join("model.safetensors"))?;
    copy_atomic(
        &crate::tokenizer::tokenizer_file(run),
        &out.join("tokenizer.json"),
    )?;
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

fn copy_atomic(from: &Path, to: &Path) -> Result<()> {
    crate::util::write_atomic_with(to, |tmp| {
        std::fs::copy(from, tmp)
            .with_context(|| format!("cannot copy {} to {}", from.display(), tmp.display()))?;
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
