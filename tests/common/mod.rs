//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod prepare_fixture;
pub mod server;

use std::path::PathBuf;

/// Says why a test cannot run on this machine. Under CI (`CI=true`) the test fails instead:
/// `.ci/run` installs everything the tests need, so a missing dependency there is a bug.
pub fn skip(reason: &str) {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI must run this test, but {reason}");
    }
    eprintln!("SKIP: {reason}");
}

/// The shared data folder (../shared/data from the repository root), or None with a printed notice
/// so the skipping test says why (a failure under CI).
pub fn shared_data(rel: &str) -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data")
        .join(rel);
    if p.exists() {
        Some(p)
    } else {
        skip(&format!(
            "{} is absent (the shared data folder is not beside this checkout)",
            p.display()
        ));
        None
    }
}

/// A small multilingual corpus written by the test itself.
pub fn mixed_corpus() -> String {
    let mut s = String::new();
    for i in 0..40 {
        s.push_str(&format!(
            "Once upon a time, the cat number {i} sat on the mat. It was happy.\n\
             小猫坐在垫子上。它很开心！第{i}天。\n\
             fn add(a: i32, b: i32) -> i32 {{ a + b }} // returns {}\n\
             Emoji time 🎉🐱 and café naïve résumé.\n\n",
            i * 7
        ));
    }
    s
}

use chatforge::data::shards::{tokenize_files, TokenizeOptions};
use chatforge::model::LlamaConfig;
use chatforge::tokenizer::{Tokenizer, TrainOptions};
use std::path::Path;

/// A tiny model config for fast tests.
pub fn tiny_config(vocab: usize, context: usize) -> LlamaConfig {
    let mut c = LlamaConfig::small(vocab, context);
    c.hidden_size = 32;
    c.intermediate_size = 64;
    c.num_hidden_layers = 2;
    c.num_attention_heads = 4;
    c.num_key_value_heads = Some(2);
    c
}

/// Writes a corpus, trains a tokenizer on it and tokenizes it into `dir/shards`; returns the
/// shard directory and the path of a tiny model config written next to it.
pub fn tiny_shards(dir: &Path) -> (PathBuf, PathBuf) {
    tiny_shards_with(dir, TrainOptions::default().special_tokens)
}

/// [`tiny_shards`] with a tokenizer that reserves `special_tokens`.
pub fn tiny_shards_with(dir: &Path, special_tokens: Vec<String>) -> (PathBuf, PathBuf) {
    let corpus = mixed_corpus();
    let input = dir.join("corpus.txt");
    std::fs::write(&input, &corpus).unwrap();
    let (tok, _) = Tokenizer::train(
        &[corpus.as_str()],
        &TrainOptions {
            vocab_size: 320,
            special_tokens,
            ..Default::default()
        },
    )
    .unwrap();
    let shards = dir.join("shards");
    tokenize_files(
        &tok,
        &[input],
        &shards,
        &TokenizeOptions {
            val_fraction: 0.1,
            ..Default::default()
        },
    )
    .unwrap();
    let cfg = dir.join("tiny.json");
    std::fs::write(
        &cfg,
        serde_json::to_string(&tiny_config(tok.vocab_size(), 64)).unwrap(),
    )
    .unwrap();
    (shards, cfg)
}

/// Training-loop options for quick, silent test runs.
pub fn quiet_loop(steps: usize, lr: f64) -> chatforge::train::trainer::LoopOptions {
    chatforge::train::trainer::LoopOptions {
        steps,
        lr,
        warmup_steps: 5,
        eval_every: 1000,
        checkpoint_every: 1000,
        quiet: true,
        ..Default::default()
    }
}

/// A tiny base model pretrained for 40 steps on [`mixed_corpus`], at `dir/base`.
pub fn base_run(dir: &Path) -> PathBuf {
    base_run_with(dir, Default::default())
}

/// [`base_run`] with architecture switches.
pub fn base_run_with(dir: &Path, switches: chatforge::model::switches::ArchSwitches) -> PathBuf {
    let (shards, cfg) = tiny_shards(dir);
    let out = dir.join("base");
    chatforge::train::pretrain::pretrain(&chatforge::train::pretrain::PretrainOptions {
        data: shards,
        out: out.clone(),
        config: Some(cfg),
        batch_size: 8,
        seq_len: 32,
        eval_tokens: 1024,
        switches,
        train: quiet_loop(40, 1e-2),
    })
    .unwrap();
    out
}

/// Whether `python3` can import all of `modules`; prints a SKIP line naming them when not.
pub fn python_has(modules: &str, install: &str) -> bool {
    let ok = std::process::Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        skip(&format!(
            "it needs the Python packages {modules} ({install})"
        ));
    }
    ok
}

/// `chatforge eval --task loglikelihood` on `model`: the log-likelihood of each (context,
/// continuation) pair.
pub fn eval_loglikelihoods(model: &Path, pairs: &[(String, String)]) -> Vec<f64> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("continuations.jsonl");
    let lines: Vec<String> = pairs
        .iter()
        .map(|(c, t)| serde_json::json!({"context": c, "continuation": t}).to_string() + "\n")
        .collect();
    std::fs::write(&file, lines.concat()).unwrap();
    let answers = dir.path().join("scores.jsonl");
    let task = format!("loglikelihood:{}", file.display());
    chatforge_ok(&[
        "eval".as_ref(),
        "--model".as_ref(),
        model.as_os_str(),
        "--task".as_ref(),
        task.as_ref(),
        "--answers".as_ref(),
        answers.as_os_str(),
    ]);
    std::fs::read_to_string(&answers)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["loglikelihood"].as_f64().unwrap()
        })
        .collect()
}

/// Runs the chatforge binary on `args`, asserting that it succeeds (its stderr in the message).
pub fn chatforge_ok<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> std::process::Output {
    run_ok(std::process::Command::new(env!("CARGO_BIN_EXE_chatforge")).args(args))
}

/// Runs a command, asserting that it succeeds (the command and its stderr in the message).
pub fn run_ok(command: &mut std::process::Command) -> std::process::Output {
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `chatforge export --model MODEL --out OUT` with the given format options, asserting success.
pub fn export(model: &Path, format: &[&str], out: &Path) {
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_chatforge"))
        .arg("export")
        .arg("--model")
        .arg(model)
        .args(format)
        .arg("--out")
        .arg(out)
        .status()
        .unwrap();
    assert!(status.success(), "chatforge export {format:?} failed");
}

/// Pretraining options for the tiny shards: lr 1e-2, checkpoints every 4 steps (2 kept), quiet.
pub fn tiny_pretrain(
    shards: &Path,
    cfg: &Path,
    out: &Path,
    steps: usize,
) -> chatforge::train::pretrain::PretrainOptions {
    chatforge::train::pretrain::PretrainOptions {
        data: shards.to_path_buf(),
        out: out.to_path_buf(),
        config: Some(cfg.to_path_buf()),
        batch_size: 8,
        seq_len: 32,
        eval_tokens: 2048,
        switches: Default::default(),
        train: chatforge::train::trainer::LoopOptions {
            steps,
            lr: 1e-2,
            warmup_steps: 5,
            eval_every: 1000,
            checkpoint_every: 4,
            keep_checkpoints: 2,
            quiet: true,
            ..Default::default()
        },
    }
}

/// Runs the client script `tests/clients/SCRIPT` with python3 on `args`; asserts that it exits 0
/// and prints `expect`, shows its output and returns it.
pub fn python_client(script: &str, args: &[String], expect: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/clients")
        .join(script);
    let out = std::process::Command::new("python3")
        .arg(path)
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{script}: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(expect), "{script}: {stdout}");
    eprintln!("{stdout}");
    stdout.into_owned()
}

/// "What does the cat say? (ROUND)" → "The cat says meow." for each of `animals` and `rounds`
/// rounds, as OpenAI messages JSONL in `dir/NAME`.
pub fn animal_conversations(
    dir: &Path,
    name: &str,
    animals: &[(&str, &str)],
    rounds: usize,
) -> PathBuf {
    let mut lines = String::new();
    for round in 0..rounds {
        for (animal, sound) in animals {
            let q = format!("What does the {animal} say? ({round})");
            let a = format!("The {animal} says {sound}.");
            lines.push_str(
                &serde_json::json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                    .to_string(),
            );
            lines.push('\n');
        }
    }
    let path = dir.join(name);
    std::fs::write(&path, lines).unwrap();
    path
}

/// 40 RL prompts whose checker wants a 猫 in the answer (a token a tiny base model rarely writes).
pub fn write_cat_prompts(dir: &Path) -> PathBuf {
    let mut s = String::new();
    for i in 0..40 {
        s.push_str(
            &serde_json::json!({"prompt": format!("Tell me story {i}."), "answer": {"contains": ["猫"]}})
                .to_string(),
        );
        s.push('\n');
    }
    let p = dir.join("cat_prompts.jsonl");
    std::fs::write(&p, s).unwrap();
    p
}
