//! Instruction tuning end to end on a tiny model, the chat session, and SFT's bad-input handling.

mod common;

use chatforge::data::chat::ChatFormat;
use chatforge::infer::chat::ChatSession;
use chatforge::infer::generate::FinishReason;
use chatforge::infer::sampler::SamplingParams;
use chatforge::train::pretrain::{pretrain, PretrainOptions};
use chatforge::train::sft::{sft, OnError, SftOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

const ANIMALS: [(&str, &str); 6] = [
    ("cat", "meow"),
    ("dog", "woof"),
    ("cow", "moo"),
    ("duck", "quack"),
    ("sheep", "baa"),
    ("owl", "hoot"),
];

/// "What does the cat say?" -> "The cat says meow." in three formats across two files.
fn write_conversations(dir: &Path) -> Vec<PathBuf> {
    let mut messages = String::new();
    let mut alpaca = Vec::new();
    for round in 0..20 {
        for (i, (animal, sound)) in ANIMALS.iter().enumerate() {
            let q = format!("What does the {animal} say?");
            let a = format!("The {animal} says {sound}.");
            if (round + i) % 2 == 0 {
                messages.push_str(
                    &serde_json::json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                        .to_string(),
                );
                messages.push('\n');
            } else {
                alpaca.push(serde_json::json!({"instruction": q, "input": "", "output": a}));
            }
        }
    }
    let m = dir.join("animals.jsonl");
    std::fs::write(&m, messages).unwrap();
    let a = dir.join("animals_alpaca.json");
    std::fs::write(&a, serde_json::to_string(&alpaca).unwrap()).unwrap();
    vec![m, a]
}

fn sft_options(base: &Path, data: Vec<PathBuf>, out: &Path) -> SftOptions {
    SftOptions {
        base: base.to_path_buf(),
        data,
        out: out.to_path_buf(),
        batch_size: 8,
        val_fraction: 0.1,
        train: common::quiet_loop(200, 1e-2),
        ..Default::default()
    }
}

#[test]
fn sft_lowers_assistant_loss_and_the_chat_answers_and_stops() {
    let dir = tempfile::tempdir().unwrap();
    let base = common::base_run(dir.path());
    let data = write_conversations(dir.path());
    let out = dir.path().join("sft");
    let report = sft(&sft_options(&base, data, &out)).unwrap();
    assert_eq!(report.train_examples + report.val_examples, 120);
    assert!(
        report.val_loss < report.val_loss_before * 0.5,
        "val loss {} -> {}",
        report.val_loss_before,
        report.val_loss
    );
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("chatforge.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["stage"], "sft");
    assert_eq!(manifest["parents"][0], base.display().to_string());

    let lm = chatforge::model::load(&out, &candle_core::Device::Cpu).unwrap();
    let greedy = SamplingParams::greedy(30);
    let mut chat = ChatSession::new(&lm, None, greedy).unwrap();
    let cancel = AtomicBool::new(false);
    let mut streamed = String::new();
    let r = chat
        .reply("What does the dog say?", &cancel, |p| {
            streamed.push_str(p);
            Ok(())
        })
        .unwrap();
    assert_eq!(
        r.finish_reason,
        FinishReason::Stop,
        "did not stop: {:?}",
        r.text
    );
    assert_eq!(r.text, "The dog says woof.");
    assert_eq!(streamed, r.text);
    // The second turn follows the first (which the 64-token context may push out).
    let r2 = chat
        .reply("What does the owl say?", &cancel, |_| Ok(()))
        .unwrap();
    assert_eq!(r2.text, "The owl says hoot.");
    assert_eq!(chat.history.len() + r2.dropped_messages, 4);
    // A cancelled reply stops at once.
    cancel.store(true, std::sync::atomic::Ordering::SeqCst);
    let r3 = chat
        .reply("What does the cow say?", &cancel, |_| Ok(()))
        .unwrap();
    assert_eq!(r3.finish_reason, FinishReason::Cancelled);
}

#[test]
fn long_histories_drop_the_oldest_turns() {
    let dir = tempfile::tempdir().unwrap();
    let base = common::base_run(dir.path());
    let lm = chatforge::model::load(&base, &candle_core::Device::Cpu).unwrap();
    let opts = SamplingParams {
        max_tokens: 8,
        ..Default::default()
    };
    let mut chat = ChatSession::new(&lm, None, opts).unwrap();
    let cancel = AtomicBool::new(false);
    let mut dropped = 0;
    for i in 0..8 {
        let r = chat
            .reply(&format!("message number {i} here"), &cancel, |_| Ok(()))
            .unwrap();
        dropped += r.dropped_messages;
    }
    assert!(dropped > 0, "a 64-token context cannot hold 8 exchanges");
    assert_eq!(
        chat.history.last().unwrap().role,
        chatforge::tokenizer::chat::Role::Assistant
    );
    let err = chat
        .reply(&"word ".repeat(200), &cancel, |_| Ok(()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("too long"), "{err}");
}

#[test]
fn bad_conversations_are_skipped_with_a_count_or_fail_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let base = common::base_run(dir.path());
    let mut data = write_conversations(dir.path());
    let bad = dir.path().join("bad.jsonl");
    let long = "the cat ".repeat(100);
    std::fs::write(
        &bad,
        format!(
            "{}\n{}\n{}\n",
            serde_json::json!({"messages": [{"role": "user", "content": "no answer"}]}),
            serde_json::json!({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}),
            serde_json::json!({"messages": [{"role": "user", "content": long}, {"role": "assistant", "content": "y"}]}),
        ),
    )
    .unwrap();
    data.push(bad.clone());
    let mut o = sft_options(&base, data.clone(), &dir.path().join("s1"));
    o.train.steps = 2;
    let r = sft(&o).unwrap();
    assert_eq!(r.skipped, 3);

    let mut o = sft_options(&base, data, &dir.path().join("s2"));
    o.on_error = OnError::Fail;
    let err = sft(&o).unwrap_err().to_string();
    assert!(
        err.contains("bad.jsonl:1") && err.contains("no assistant turn"),
        "{err}"
    );

    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let err = sft(&sft_options(&base, vec![empty], &dir.path().join("s3")))
        .unwrap_err()
        .to_string();
    assert!(err.contains("empty"), "{err}");

    let mut o = sft_options(&base, vec![bad], &dir.path().join("s4"));
    o.format = ChatFormat::Sharegpt;
    let err = sft(&o).unwrap_err().to_string();
    assert!(err.contains("no usable"), "{err}");
}

#[test]
fn a_base_without_chat_tokens_is_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let (shards, cfg) = common::tiny_shards_with(dir.path(), vec!["<|bos|>".into()]);
    let base = dir.path().join("base");
    pretrain(&PretrainOptions {
        data: shards,
        out: base.clone(),
        config: Some(cfg),
        batch_size: 2,
        seq_len: 16,
        eval_tokens: 64,
        switches: Default::default(),
        train: common::quiet_loop(2, 1e-3),
    })
    .unwrap();
    let data = write_conversations(dir.path());
    let err = sft(&sft_options(&base, data, &dir.path().join("s")))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no chat special tokens") && err.contains("chatforge tokenizer train"),
        "{err}"
    );
}

#[test]
fn piped_chat_prints_one_reply_per_message() {
    let dir = tempfile::tempdir().unwrap();
    let base = common::base_run(dir.path());
    let data = write_conversations(dir.path());
    let out = dir.path().join("sft");
    sft(&sft_options(&base, data, &out)).unwrap();
    let saved = dir.path().join("conv.json");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_chatforge"))
        .args([
            "chat",
            "--model",
            out.to_str().unwrap(),
            "--temperature",
            "0",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    write!(
        child.stdin.take().unwrap(),
        "What does the cat say?\n/save {}\n/reset\nWhat does the duck say?\n",
        saved.display()
    )
    .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8(o.stdout).unwrap();
    assert_eq!(stdout, "The cat says meow.\nThe duck says quack.\n");
    let conv: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&saved).unwrap()).unwrap();
    assert_eq!(conv["messages"].as_array().unwrap().len(), 2);
}

#[test]
fn sft_resumes_exactly_and_mixes_pretraining_rows() {
    let dir = tempfile::tempdir().unwrap();
    let base = common::base_run(dir.path());
    let data = write_conversations(dir.path());
    let shards = dir.path().join("shards");
    let opts = |out: &str| {
        let mut o = sft_options(&base, data.clone(), &dir.path().join(out));
        o.train.steps = 8;
        o.train.checkpoint_every = 4;
        o.mix_pretrain = Some(shards.clone());
        o.mix_fraction = 0.25;
        o
    };
    let full = sft(&opts("full")).unwrap();
    let mut first = opts("killed");
    first.train.halt_after = Some(4);
    sft(&first).unwrap();
    let mut again = opts("killed");
    again.train.resume = true;
    let resumed = sft(&again).unwrap();
    assert_eq!(resumed.losses.first().unwrap().0, 5);
    for (step, loss) in &resumed.losses {
        let expected = full.losses[step - 1].1;
        assert!(
            (loss - expected).abs() < 1e-5,
            "step {step}: {loss} vs {expected}"
        );
    }
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("full/chatforge.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["hyperparameters"]["stage"]["mix_fraction"], 0.25);
}

/// `chatforge sft` without `--eval-every` evaluates at SFT's own interval (50), not at the
/// pretraining default (100) that the shared training flags used to impose on every stage.
#[test]
fn sft_on_the_command_line_evaluates_at_the_stages_own_interval() {
    let dir = tempfile::tempdir().unwrap();
    let base = common::base_run(dir.path());
    let data = write_conversations(dir.path());
    let out = dir.path().join("sft");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_chatforge"))
        .args(["sft", "--base", base.to_str().unwrap(), "--data"])
        .args(data.iter().map(|p| p.to_str().unwrap()))
        .args(["--out", out.to_str().unwrap(), "--steps", "100"])
        .args(["--batch-size", "4", "--checkpoint-every", "100"])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let eval_steps: Vec<u64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("val_loss").is_some() && v.get("loss").is_none())
        .filter_map(|v| v["step"].as_u64())
        .collect();
    assert!(eval_steps.contains(&50), "evaluated at {eval_steps:?}");
    assert!(eval_steps.contains(&100), "evaluated at {eval_steps:?}");
}
