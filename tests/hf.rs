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
    let last_logits = |lm: &chatforge::model::LoadedModel| -> Vec<f32> {
        let l = lm.model.forward_last(&ids, None).unwrap();
        l.flatten_all().unwrap().to_vec1().unwrap()
    };
    let (a, b) = (last_logits(&original), last_logits(&loaded));
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

/// `chatforge export --format hf` gives a directory transformers loads as it is: the same prompt
/// ids from its chat template and the same greedy tokens (pip `transformers` and `torch`; skipped
/// when they are missing).
#[test]
fn exported_directory_gives_transformers_the_same_greedy_tokens() {
    if !common::python_has("transformers, torch", "pip install transformers torch") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let run = common::base_run(dir.path());
    let hf = dir.path().join("exported");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_chatforge"))
        .args([
            "export",
            "--model",
            run.to_str().unwrap(),
            "--format",
            "hf",
            "--out",
            hf.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(status.success());
    // chatforge's greedy tokens (no stopping, so every position is compared).
    let lm = chatforge::model::load(&run, &Device::Cpu).unwrap();
    let template = lm.template().unwrap();
    let mut jobs = Vec::new();
    let mut ours = Vec::new();
    for message in ["the cat sat", "小猫坐在垫子上", "fn add(a: i32)"] {
        let m = [chatforge::tokenizer::chat::Message::new(
            chatforge::tokenizer::chat::Role::User,
            message,
        )];
        let prompt = chatforge::tokenizer::chat::render(&lm.tokenizer, &template, &m, true)
            .unwrap()
            .ids;
        let opts = chatforge::infer::generate::GenerateOptions {
            max_tokens: 12,
            sampling: chatforge::infer::sampler::SamplingParams {
                temperature: 0.0,
                ..Default::default()
            },
            ..Default::default()
        };
        let g =
            chatforge::infer::generate::generate_from_ids(&lm, &prompt, &opts, &[], None, |_| {
                Ok(())
            })
            .unwrap();
        jobs.push(
            serde_json::json!({"message": message, "prompt_ids": prompt, "n": g.tokens.len()}),
        );
        ours.push((prompt, g.tokens));
    }
    let jobs_path = dir.path().join("jobs.json");
    std::fs::write(&jobs_path, serde_json::to_string(&jobs).unwrap()).unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/clients/transformers_parity.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg(&hf)
        .arg(&jobs_path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let theirs: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    for ((prompt, tokens), t) in ours.iter().zip(&theirs) {
        let template_ids: Vec<u32> = serde_json::from_value(t["template_ids"].clone()).unwrap();
        assert_eq!(
            &template_ids, prompt,
            "the exported chat template renders differently"
        );
        let ids: Vec<u32> = serde_json::from_value(t["ids"].clone()).unwrap();
        assert_eq!(&ids, tokens, "greedy tokens differ");
    }
}
