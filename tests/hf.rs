//! Hugging Face model directories: bf16 weights in shards with an index, `tokenizer_config.json`
//! with its chat template, and architectures outside the Llama family refused by name.

mod common;

/// The animals the fine-tuning conversations ask about, with their sounds.
const ANIMALS: [(&str, &str); 4] = [
    ("cat", "meow"),
    ("dog", "woof"),
    ("cow", "moo"),
    ("owl", "hoot"),
];

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
    assert_transformers_agrees(&run, dir.path());
}

/// A model trained with the speedrun switches that Hugging Face's classes know (squared ReLU,
/// query/key norms, so a Qwen3, an untied head, zero-started outputs) exports to a directory
/// transformers runs to the same greedy tokens.
#[test]
fn a_switched_model_exports_to_transformers_unchanged() {
    use chatforge::model::switches::{ArchSwitches, GateActivation};
    if !common::python_has("transformers, torch", "pip install transformers torch") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let switches = ArchSwitches {
        activation: Some(GateActivation::Relu2),
        qk_norm: Some(true),
        untied_head: Some(true),
        zero_init: Some(true),
        logit_softcap: None,
    };
    let run = common::base_run_with(dir.path(), switches);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "qwen3");
    assert_eq!(config["hidden_act"], "relu2");
    assert_eq!(config["tie_word_embeddings"], false);
    assert_transformers_agrees(&run, dir.path());
}

/// Exports `run` to Hugging Face's layout under `dir` and checks that transformers renders the
/// same chat prompts and decodes the same greedy tokens.
fn assert_transformers_agrees(run: &std::path::Path, dir: &std::path::Path) {
    let hf = dir.join("exported");
    common::export(run, &["--format", "hf"], &hf);
    // chatforge's greedy tokens (no stopping, so every position is compared).
    let lm = chatforge::model::load(run, &Device::Cpu).unwrap();
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
        let opts = chatforge::infer::sampler::SamplingParams::greedy(12);
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
    let jobs_path = dir.join("jobs.json");
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

/// LoRA fine-tuning of a sharded bf16 Hugging Face directory: only the adapters train, the
/// adapter directory alone loads as the same model as the merged weights, and a killed run
/// resumes exactly.
#[test]
fn lora_fine_tunes_a_sharded_directory_and_its_adapters_load_alone() {
    use chatforge::model::lora::LoraConfig;
    use chatforge::train::sft::{sft, SftOptions};
    let dir = tempfile::tempdir().unwrap();
    let run = common::base_run(dir.path());
    let hf = dir.path().join("hf");
    as_hf_directory(&run, &hf);
    std::fs::remove_file(hf.join("tokenizer_config.json")).unwrap();
    let data = common::animal_conversations(dir.path(), "animals.jsonl", &ANIMALS, 20);
    let opts = |out: &str, steps: usize| SftOptions {
        base: hf.clone(),
        data: vec![data.clone()],
        out: dir.path().join(out),
        batch_size: 8,
        val_fraction: 0.1,
        lora: Some(LoraConfig::new(4, 8.0, &["all-linear".into()]).unwrap()),
        train: chatforge::train::trainer::LoopOptions {
            checkpoint_every: 10,
            ..common::quiet_loop(steps, 1e-2)
        },
        ..Default::default()
    };
    let report = sft(&opts("lora", 40)).unwrap();
    assert!(
        report.val_loss < report.val_loss_before * 0.7,
        "val loss {} -> {}",
        report.val_loss_before,
        report.val_loss
    );
    assert!(
        report.trained_parameters * 5 < report.model_parameters,
        "{} of {} weights trained",
        report.trained_parameters,
        report.model_parameters
    );
    let out = dir.path().join("lora");
    let peft: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(peft["peft_type"], "LORA");
    assert_eq!(peft["r"], 4);
    assert_eq!(peft["target_modules"].as_array().unwrap().len(), 7);
    let adapters =
        candle_core::safetensors::load(out.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    assert!(adapters.contains_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"));
    assert!(adapters.keys().all(|k| k.contains(".lora_")));

    // The adapters alone (no merged weights) give the merged model's logits; the base's differ.
    let alone = dir.path().join("alone");
    std::fs::create_dir_all(&alone).unwrap();
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "config.json",
        "tokenizer.json",
    ] {
        std::fs::copy(out.join(f), alone.join(f)).unwrap();
    }
    let ids = Tensor::new(&[[1u32, 40, 41, 42, 43, 44]], &Device::Cpu).unwrap();
    let logits = |p: &std::path::Path| -> Vec<f32> {
        let lm = chatforge::model::load(p, &Device::Cpu).unwrap();
        let l = lm.model.forward_last(&ids, None).unwrap();
        l.flatten_all().unwrap().to_vec1().unwrap()
    };
    let (merged, separate, base) = (logits(&out), logits(&alone), logits(&hf));
    let gap = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    assert!(
        gap(&merged, &separate) < 1e-3,
        "{}",
        gap(&merged, &separate)
    );
    assert!(gap(&merged, &base) > 0.1, "the adapters changed nothing");

    // Killed after step 20 and resumed: the same losses as the uninterrupted run.
    let mut first = opts("killed", 40);
    first.train.halt_after = Some(20);
    sft(&first).unwrap();
    let mut again = opts("killed", 40);
    again.train.resume = true;
    let resumed = sft(&again).unwrap();
    assert_eq!(resumed.losses.first().unwrap().0, 21);
    for (step, loss) in &resumed.losses {
        let expected = report.losses[step - 1].1;
        assert!(
            (loss - expected).abs() < 1e-4,
            "step {step}: {loss} vs {expected}"
        );
    }
}

/// The adapters chatforge writes load in PEFT on top of the base in transformers and give the
/// same greedy tokens (pip `peft`, `transformers` and `torch`; skipped when missing).
#[test]
fn peft_loads_the_adapters() {
    if !common::python_has(
        "peft, transformers, torch",
        "pip install peft transformers torch",
    ) {
        return;
    }
    use chatforge::model::lora::LoraConfig;
    use chatforge::train::sft::{sft, SftOptions};
    let dir = tempfile::tempdir().unwrap();
    let run = common::base_run(dir.path());
    let hf = dir.path().join("hf");
    common::export(&run, &["--format", "hf"], &hf);
    let out = dir.path().join("lora");
    let mut lora = LoraConfig::new(
        4,
        8.0,
        &["q_proj".into(), "v_proj".into(), "down_proj".into()],
    )
    .unwrap();
    lora.merge = false;
    sft(&SftOptions {
        base: hf.clone(),
        data: vec![common::animal_conversations(
            dir.path(),
            "animals.jsonl",
            &ANIMALS,
            20,
        )],
        out: out.clone(),
        batch_size: 8,
        lora: Some(lora),
        train: common::quiet_loop(30, 1e-2),
        ..Default::default()
    })
    .unwrap();
    assert!(!out.join("model.safetensors").exists());
    let lm = chatforge::model::load(&out, &Device::Cpu).unwrap();
    let prompt = lm
        .tokenizer
        .encode("<|bos|><|user_start|>What does the dog say?<|user_end|><|assistant_start|>")
        .unwrap();
    let opts = chatforge::infer::sampler::SamplingParams::greedy(10);
    let ours =
        chatforge::infer::generate::generate_from_ids(&lm, &prompt, &opts, &[], None, |_| Ok(()))
            .unwrap()
            .tokens;
    let script = r#"
import json, sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
model = PeftModel.from_pretrained(base, sys.argv[2]).eval()
ids = torch.tensor([json.loads(sys.argv[3])])
with torch.no_grad():
    g = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=int(sys.argv[4]),
                       do_sample=False, eos_token_id=None, pad_token_id=0)
print(json.dumps(g[0, ids.shape[1]:].tolist()))
"#;
    let o = std::process::Command::new("python3")
        .args([
            "-c",
            script,
            hf.to_str().unwrap(),
            out.to_str().unwrap(),
            &serde_json::to_string(&prompt).unwrap(),
            &ours.len().to_string(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let theirs: Vec<u32> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(ours, theirs);
}

/// `--model owner/name` reads a Hub model from the Hugging Face cache (`HF_HOME`) without the
/// network when it is there, and names the model and the fix when it is not.
#[test]
fn hub_model_ids_load_from_the_cache_and_fail_clearly_offline() {
    let dir = tempfile::tempdir().unwrap();
    let run = common::base_run(dir.path());
    // The layout hf-hub and huggingface_hub share: refs/main names a snapshot directory.
    let hf_home = dir.path().join("hf_home");
    let repo = hf_home.join("hub/models--tiny-org--tiny-llama");
    let snapshot = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        std::fs::copy(run.join(f), snapshot.join(f)).unwrap();
    }
    let generate = |model: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_chatforge"))
            .current_dir(dir.path())
            .env("HF_HOME", &hf_home)
            .env("HF_HUB_OFFLINE", "1")
            .args([
                "generate",
                "--model",
                model,
                "--prompt",
                "the cat",
                "--max-tokens",
                "5",
                "--temperature",
                "0",
            ])
            .output()
            .unwrap()
    };
    let ok = generate("tiny-org/tiny-llama");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let local = std::process::Command::new(env!("CARGO_BIN_EXE_chatforge"))
        .args([
            "generate",
            "--model",
            run.to_str().unwrap(),
            "--prompt",
            "the cat",
            "--max-tokens",
            "5",
            "--temperature",
            "0",
        ])
        .output()
        .unwrap();
    assert_eq!(ok.stdout, local.stdout);
    let missing = generate("tiny-org/other-model");
    assert!(!missing.status.success());
    let e = String::from_utf8_lossy(&missing.stderr);
    assert!(
        e.contains("tiny-org/other-model") && e.contains("HF_HUB_OFFLINE"),
        "{e}"
    );
}

/// A tool-calling template renders the text transformers renders: `tojson` as Python's
/// `json.dumps` (spaces after `,` and `:`, `'`, `<`, `>` and `&` as they are, the client's key
/// order, `indent`), and the Python string methods Qwen3's template calls.
#[test]
fn chat_templates_render_tools_as_transformers_does() {
    use chatforge::tokenizer::chat::{Message, Role};
    if !common::python_has("transformers", "pip install transformers") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (shards, _) = common::tiny_shards(dir.path());
    let tok = chatforge::tokenizer::Tokenizer::load(&shards).unwrap();
    let template =
        "{%- if tools %}<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools>\n\
        {{ tools[0].function | tojson(indent=4) }}\n{%- endif %}\
        {%- for m in messages %}<|{{ m.role }}|>\
        {%- if m.content.startswith('Note:') %}[note]{% endif %}{{ m.content.strip() }}\
        {%- if m.content.endswith('?') %}{{ ' (question)' }}{% endif %}\n{%- endfor %}\
        {%- if add_generation_prompt %}<|assistant|>{% endif %}";
    let tools = serde_json::json!([{"type": "function", "function": {
        "name": "lookup", "description": "Finds a user's <name> & age; ünïcode too",
        "parameters": {"type": "object", "required": ["name"],
                       "properties": {"name": {"type": "string"}, "limit": {"type": "number", "default": 1.5}}}}}]);
    let messages = vec![
        Message::new(Role::System, "Note: be brief.  "),
        Message::new(Role::User, "  Who is 'Ada'?"),
    ];
    let ours =
        chatforge::tokenizer::chat::jinja_text(template, &messages, Some(&tools), true, &tok)
            .unwrap();
    let job = dir.path().join("job.json");
    let wire: Vec<serde_json::Value> = messages
        .iter()
        .map(|m| serde_json::json!({"role": m.role.as_str(), "content": m.content}))
        .collect();
    std::fs::write(
        &job,
        serde_json::json!({"template": template, "messages": wire, "tools": tools,
                           "add_generation_prompt": true, "bos_token": ""})
        .to_string(),
    )
    .unwrap();
    let out = common::python_client("jinja_render.py", &[job.display().to_string()], "");
    let theirs: String = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(ours, theirs);
    assert!(
        ours.contains(r#"{"type": "function", "function": {"name": "lookup""#),
        "{ours}"
    );
}
