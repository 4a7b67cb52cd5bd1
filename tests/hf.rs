//! Hugging Face model directories: bf16 weights in shards with an index, `tokenizer_config.json`
//! with its chat template, and architectures outside the Llama family refused by name.

mod common;

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;

/// Rewrites a chatforge run as a Hugging Face directory: bf16 weights split over two shards with
/// `model.safetensors.index.json`, and a chat template in `tokenizer_config.json`.
fn as_hf_directory(run: &std::path::Path, out: &std::path::Path) {
    std::fs::create_dir_all(out).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(run.join(f), out.join(f)).unwrap();
    }
    let tensors =
        candle_core::safetensors::load(run.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut shards: [HashMap<String, Tensor>; 2] = [HashMap::new(), HashMap::new()];
    let mut weight_map = serde_json::Map::new();
    for (i, name) in names.iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i % 2 + 1);
        shards[i % 2].insert(
            (*name).clone(),
            tensors[*name].to_dtype(DType::BF16).unwrap(),
        );
        weight_map.insert((*name).clone(), serde_json::json!(file));
    }
    for (i, shard) in shards.iter().enumerate() {
        candle_core::safetensors::save(
            shard,
            out.join(format!("model-0000{}-of-00002.safetensors", i + 1)),
        )
        .unwrap();
    }
    std::fs::write(
        out.join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": weight_map}).to_string(),
    )
    .unwrap();
    let template = "{% for m in messages %}<|user_start|>{{ m['content'] }}<|user_end|>{% endfor %}{% if add_generation_prompt %}<|assistant_start|>{% endif %}";
    std::fs::write(
        out.join("tokenizer_config.json"),
        serde_json::json!({"chat_template": template}).to_string(),
    )
    .unwrap();
}

#[test]
fn sharded_bf16_directory_with_a_chat_template_loads_as_the_same_model() {
    let dir = tempfile::tempdir().unwrap();
    let run = common::base_run(dir.path());
    let hf = dir.path().join("hf");
    as_hf_directory(&run, &hf);
    let original = chatforge::model::load(&run, &Device::Cpu).unwrap();
    let loaded = chatforge::model::load(&hf, &Device::Cpu).unwrap();
    assert!(original.chat_template.is_none());
    let template = loaded.template().unwrap();
    assert!(matches!(
        template,
        chatforge::tokenizer::chat::ChatTemplate::Jinja(_)
    ));
    let ids = Tensor::new(&[[1u32, 40, 41, 42, 43, 44]], &Device::Cpu).unwrap();
    let a: Vec<f32> = original
        .model
        .forward_last(&ids, None)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let b: Vec<f32> = loaded
        .model
        .forward_last(&ids, None)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    // bf16 keeps about 3 significant digits of each weight.
    let scale = a.iter().map(|x| x.abs()).fold(0f32, f32::max);
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(
        worst < 0.05 * scale,
        "logits differ by {worst} (scale {scale})"
    );
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .max_by(|x, y| x.1.total_cmp(y.1))
            .unwrap()
            .0
    };
    assert_eq!(argmax(&a), argmax(&b));
    // The directory's own template renders the prompt.
    let r = chatforge::tokenizer::chat::render(
        &loaded.tokenizer,
        &template,
        &[chatforge::tokenizer::chat::Message::new(
            chatforge::tokenizer::chat::Role::User,
            "hi",
        )],
        true,
    )
    .unwrap();
    let text = loaded.tokenizer.decode(&r.ids).unwrap();
    assert!(
        text.contains("<|user_start|>hi<|user_end|><|assistant_start|>"),
        "{text}"
    );

    // A missing shard is named.
    std::fs::remove_file(hf.join("model-00002-of-00002.safetensors")).unwrap();
    let e = format!(
        "{:#}",
        chatforge::model::load(&hf, &Device::Cpu).err().unwrap()
    );
    assert!(e.contains("model-00002-of-00002.safetensors"), "{e}");
}

#[test]
fn other_architectures_are_refused_by_name() {
    let Some(gpt2) = common::shared_data("hf-tiny-gpt2") else {
        return;
    };
    let e = format!(
        "{:#}",
        chatforge::model::load(&gpt2, &Device::Cpu).err().unwrap()
    );
    assert!(
        e.contains("GPT2Model") && e.contains("not supported"),
        "{e}"
    );
}
