//! The `tiny` speedrun end to end: every stage runs, each has the effect it should (directions
//! with margins, fixed seeds), and a rerun resumes instead of starting over.

use chatforge::speedrun::{speedrun, Preset, SpeedrunOptions};
use serde_json::Value;
use std::path::Path;

mod common;

fn options(out: &Path) -> SpeedrunOptions {
    SpeedrunOptions {
        out: out.to_path_buf(),
        preset: Preset::Tiny,
        seed: 1337,
        quiet: true,
        ..Default::default()
    }
}

fn metric(report: &Value, stage: &str, task: &str, key: &str) -> f64 {
    report["eval"][stage][task][key]
        .as_f64()
        .unwrap_or_else(|| panic!("report lacks eval.{stage}.{task}.{key}"))
}

#[test]
fn tiny_speedrun_runs_every_stage_with_its_effect_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let report_path = speedrun(&options(&out)).unwrap();
    let md = std::fs::read_to_string(&report_path).unwrap();
    for section in [
        "## Stages",
        "## Before and after",
        "## Changes between stages",
        "## Reward model",
        "## RLHF (PPO)",
        "## Verifiable rewards",
    ] {
        assert!(md.contains(section), "report.md lacks {section}");
    }
    // Every rate carries its 95% interval; the stage-to-stage changes are paired per family.
    let accuracy_row = md
        .lines()
        .find(|l| l.starts_with("| checker accuracy, all held-out prompts |"))
        .expect("an accuracy row");
    assert_eq!(accuracy_row.matches(" [").count(), 5, "{accuracy_row}");
    assert!(md.contains("| all | ") && md.contains("base → sft"), "{md}");
    // The RL sections show what their stage measured: accuracy for the checker stage, and no
    // row empty in both columns.
    let rl_sections = &md[md.find("## RLHF (PPO)").unwrap()..md.find("## Few-shot").unwrap()];
    assert!(rl_sections.contains("| accuracy | "), "{rl_sections}");
    assert!(
        !rl_sections.lines().any(|l| l.ends_with("| - | - |")),
        "{rl_sections}"
    );
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    // Pretraining: held-out loss far below the unigram baseline.
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("shards/meta.json")).unwrap())
            .unwrap();
    let unigram = meta["unigram_val_nats"].as_f64().unwrap();
    let base_loss = metric(&r, "base", "bpb", "loss");
    assert!(
        base_loss < 0.7 * unigram,
        "base {base_loss} vs unigram {unigram}"
    );
    // SFT: the model learns the chat format and to stop at the end of its turn.
    let stops = (
        metric(&r, "base", "curriculum", "stops_at_end_of_turn"),
        metric(&r, "sft", "curriculum", "stops_at_end_of_turn"),
    );
    assert!(stops.1 > stops.0 + 0.4, "stops at end of turn {stops:?}");
    // SFT learns the answers: its loss on held-out assistant turns falls by a third or more. The
    // tiny preset's 24 held-out questions resolve checker accuracy only in steps of 0.04, one
    // answer, which moves with the matmul precision; it must not fall.
    let sft: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("sft/report.json")).unwrap())
            .unwrap();
    let val_loss = |key: &str| {
        sft[key]
            .as_array()
            .and_then(|m| m.iter().find(|p| p[0] == "val_loss"))
            .and_then(|p| p[1].as_f64())
            .unwrap_or_else(|| panic!("sft/report.json lacks {key}.val_loss"))
    };
    let answer_loss = (val_loss("eval_before"), val_loss("eval"));
    assert!(
        answer_loss.1 < 0.67 * answer_loss.0,
        "held-out answer loss {answer_loss:?}"
    );
    let accuracy = (
        metric(&r, "base", "curriculum", "accuracy"),
        metric(&r, "sft", "curriculum", "accuracy"),
    );
    assert!(accuracy.1 >= accuracy.0, "checker accuracy {accuracy:?}");
    // In-context learning: on some probe the base model does better with examples (1 or 4) than
    // with none.
    let probes = r["eval"]["base"]["probes"].as_object().unwrap();
    let acc = |key: String| probes[&key].as_f64().unwrap();
    let gain = probes
        .keys()
        .filter_map(|k| k.strip_suffix("/k=0"))
        .map(|p| acc(format!("{p}/k=1")).max(acc(format!("{p}/k=4"))) - acc(format!("{p}/k=0")))
        .fold(f64::MIN, f64::max);
    assert!(gain > 0.2, "few-shot gain from 0 to 1 or 4 examples {gain}");
    // Reward model: well above chance on held-out rankings.
    let rm = r["reward_model"]["heldout_accuracy"].as_f64().unwrap();
    assert!(rm > 0.65, "reward model held-out accuracy {rm}");
    // RLHF: PPO measured on held-out prompts; at this size and budget the reward change is within
    // noise, so the test holds it to staying near the SFT model: no collapse, small KL.
    let rl = &r["rlhf"];
    let reward = (
        rl["eval_before"]["reward"].as_f64().unwrap(),
        rl["eval_after"]["reward"].as_f64().unwrap(),
    );
    assert!(reward.1 > reward.0 - 0.5, "held-out reward {reward:?}");
    let kl = rl["eval_after"]["kl"].as_f64().unwrap();
    assert!(kl.abs() < 5.0, "KL to the SFT model {kl}");
    let stop = (
        rl["eval_before"]["stops_at_end_of_turn"].as_f64().unwrap(),
        rl["eval_after"]["stops_at_end_of_turn"].as_f64().unwrap(),
    );
    assert!(stop.1 >= stop.0 - 0.1, "stop rate {stop:?}");
    // The checker-rewarded stage trains and measures on the verifiable families only, and stays
    // near the PPO model it starts from.
    let checked = &r["rl_checker"];
    for split in ["train", "heldout"] {
        let file =
            std::fs::read_to_string(out.join(format!("data/rl_checked_{split}.jsonl"))).unwrap();
        assert!(file.lines().count() > 0, "no checked {split} prompts");
        for line in file.lines() {
            let family = serde_json::from_str::<Value>(line).unwrap()["family"].clone();
            let family = family.as_str().unwrap();
            assert!(
                family.starts_with("arithmetic") || family.starts_with("chicken_rabbit"),
                "{family} in the checker stage's prompts"
            );
        }
    }
    let kl = checked["eval_after"]["kl"].as_f64().unwrap();
    assert!(kl.abs() < 5.0, "KL to the PPO model {kl}");
    assert!(
        md.contains("RL (checker)") && md.contains("rlhf → rlvr"),
        "report.md lacks the checker stage"
    );
    // The final model is evaluated again with the knowledge base's index, on the same prompts.
    // The tiny preset's held-out prompts hold one grounded question per language, which may be
    // about someone in no passage: retrieval recall is checked where there is one (and on 200
    // questions per language in tests/index.rs).
    assert!(
        md.contains("final with index"),
        "report.md lacks the index column"
    );
    let with_index: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval/final_index.json")).unwrap())
            .unwrap();
    assert_eq!(
        with_index["curriculum"]["n"],
        r["eval"]["rlvr"]["curriculum"]["n"]
    );
    for lang in ["en", "zh"] {
        if let Some(recall) = with_index["curriculum"][format!("retrieval_recall/{lang}")].as_f64()
        {
            assert!(recall >= 0.9, "retrieval recall ({lang}) {recall}");
        }
    }
    for stage in [
        "curriculum",
        "tokenizer",
        "shards",
        "pretrain",
        "sft",
        "reward",
        "rlhf (ppo)",
        "rl (checker)",
    ] {
        assert!(
            r["stages"][stage]["seconds"].as_f64().is_some(),
            "no time for {stage}"
        );
    }

    // A rerun skips finished stages: remove the RLHF stage and only it and the stage that starts
    // from it are redone.
    let sft_weights = out.join("sft/model.safetensors");
    let before = std::fs::metadata(&sft_weights).unwrap().modified().unwrap();
    std::fs::remove_dir_all(out.join("rlhf")).unwrap();
    std::fs::remove_file(out.join("eval/rlhf.json")).unwrap();
    speedrun(&options(&out)).unwrap();
    assert_eq!(
        std::fs::metadata(&sft_weights).unwrap().modified().unwrap(),
        before,
        "the finished SFT stage was redone"
    );
    assert!(out.join("rlhf/model.safetensors").exists());
    assert!(out.join("rlvr/model.safetensors").exists());
    let again: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(
        again["rlhf"]["eval_after"], r["rlhf"]["eval_after"],
        "rollouts are seeded"
    );
    assert_eq!(
        again["rl_checker"]["eval_after"], r["rl_checker"]["eval_after"],
        "the checker stage was redone from the same PPO model"
    );
}

/// `--input` runs on the same skip-and-resume stages as the curriculum: a rerun skips the
/// finished tokenizer, shards and pretraining and only samples again.
#[test]
fn text_mode_speedrun_runs_its_stages_and_a_rerun_skips_them() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus.txt");
    std::fs::write(&corpus, common::mixed_corpus()).unwrap();
    let cfg = dir.path().join("cfg.json");
    std::fs::write(
        &cfg,
        serde_json::to_string(&common::tiny_config(320, 64)).unwrap(),
    )
    .unwrap();
    let out = dir.path().join("run");
    let run = || {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_chatforge"))
            .args(["speedrun", "--input", corpus.to_str().unwrap()])
            .args([
                "--out",
                out.to_str().unwrap(),
                "--config",
                cfg.to_str().unwrap(),
            ])
            .args(["--vocab-size", "320", "--steps", "6", "--batch-size", "2"])
            .args(["--seq-len", "32", "--eval-tokens", "256", "--prompt", "The"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(o.status.success(), "{err}");
        (String::from_utf8_lossy(&o.stdout).to_string(), err)
    };
    let (stdout, stderr) = run();
    assert!(stdout.contains("--- sample 3"), "{stdout}");
    assert!(stderr.contains("[3/4] pretrain"), "{stderr}");
    assert!(out.join("base/report.json").exists());
    let times: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("stages.json")).unwrap()).unwrap();
    for stage in ["tokenizer", "shards", "pretrain"] {
        assert!(
            times[stage]["seconds"].as_f64().is_some(),
            "{stage}: {times}"
        );
    }
    let (stdout, stderr) = run();
    assert!(stderr.contains("[3/4] pretrain: done already"), "{stderr}");
    assert!(stdout.contains("--- sample 3"), "{stdout}");
}
