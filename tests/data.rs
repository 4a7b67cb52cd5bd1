//! `chatforge data prepare` as a user runs it: a TOML config with a noisy web source (JSONL with
//! boilerplate, duplicates and a broken line), a book source (plain text) and a Chinese source
//! (Parquet), through clean → quality filter → dedup → tokenizer → weighted mixture.

mod common;

use chatforge::data::shards::ShardSet;
use common::prepare_fixture::{sentence, write_fixture, CONFIG};
use std::process::{Command, Output};

fn chatforge(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_chatforge"))
        .args(args)
        .output()
        .expect("run chatforge")
}

#[test]
fn prepare_cleans_filters_dedups_and_mixes_by_weight() {
    let dir = tempfile::tempdir().unwrap();
    write_fixture(dir.path());
    let config = dir.path().join("data.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let out = chatforge(&["data", "prepare", "--config", config.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    for name in ["web", "books", "zh", "share written"] {
        assert!(stdout.contains(name), "table lacks {name}:\n{stdout}");
    }
    let prepared = dir.path().join("prepared");
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(prepared.join("prepare_report.json")).unwrap(),
    )
    .unwrap();
    let web = &report["sources"][0];
    assert_eq!(web["documents_read"], 120);
    assert_eq!(web["skipped"]["reasons"]["invalid_json"], 1);
    assert!(web["exact_duplicates"].as_u64().unwrap() >= 10, "{web}");
    assert!(web["near_duplicates"].as_u64().unwrap() >= 8, "{web}");
    assert!(web["quality_dropped"].as_u64().unwrap() >= 35, "{web}");
    let kept_web = std::fs::read_to_string(prepared.join("kept/web.jsonl")).unwrap();
    assert_eq!(
        kept_web.lines().count() as u64,
        web["documents_out"].as_u64().unwrap()
    );
    for noise in ["Home |", "Posted on", "BREAKING", "Copyright", "BUY NOW"] {
        assert!(!kept_web.contains(noise), "kept {noise:?}");
    }
    assert!(kept_web.contains(&sentence(59, 5)));
    assert_eq!(report["sources"][2]["documents_out"], 50, "parquet source");

    // The shards train a model as they are, and the shares follow the weights.
    let set = ShardSet::open(&prepared.join("shards")).unwrap();
    assert!(set.train.total_tokens() > 1000);
    for (i, share) in [0.5, 0.3, 0.2].iter().enumerate() {
        let got = report["mixture"]["sources"][i]["achieved_share"]
            .as_f64()
            .unwrap();
        assert!(
            (got - share).abs() < 0.03,
            "source {i}: share {got}, wanted {share}"
        );
    }
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(prepared.join("shards/manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["config"]["source"][2]["text_field"], "content");

    // A rerun does not redo finished sources and gives the same shards.
    let before = std::fs::read(prepared.join("shards/train_0000.bin")).unwrap();
    let again = chatforge(&["data", "prepare", "--config", config.to_str().unwrap()]);
    assert!(again.status.success());
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert_eq!(stderr.matches("already prepared").count(), 3, "{stderr}");
    assert!(stderr.contains("shards: already written"), "{stderr}");
    assert_eq!(
        before,
        std::fs::read(prepared.join("shards/train_0000.bin")).unwrap()
    );
    // A new weight redoes only the mixture.
    std::fs::write(&config, CONFIG.replace("weight = 0.2", "weight = 0.7")).unwrap();
    let reweighted = chatforge(&["data", "prepare", "--config", config.to_str().unwrap()]);
    assert!(reweighted.status.success());
    let stderr = String::from_utf8_lossy(&reweighted.stderr);
    assert_eq!(stderr.matches("already prepared").count(), 3, "{stderr}");
    assert!(!stderr.contains("shards: already written"), "{stderr}");
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(prepared.join("prepare_report.json")).unwrap(),
    )
    .unwrap();
    let zh_share = report["mixture"]["sources"][2]["achieved_share"]
        .as_f64()
        .unwrap();
    assert!((zh_share - 0.7 / 1.5).abs() < 0.03, "{zh_share}");
}

#[test]
fn bad_configs_name_the_file_and_what_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    let run = |text: &str| {
        std::fs::write(&config, text).unwrap();
        let out = chatforge(&["data", "prepare", "--config", config.to_str().unwrap()]);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!stderr.contains("panicked"), "{stderr}");
        stderr
    };
    let e = run("out = \"o\"\n[[source]]\nname = \"web\"\nfiles = [\"w.jsonl\"]\nweigth = 1.0\n");
    assert!(e.contains("bad.toml") && e.contains("weigth"), "{e}");
    let e = run("out = \"o\"\n");
    assert!(e.contains("bad.toml") && e.contains("source"), "{e}");
    let e = run("out = \"o\"\n[[source]]\nname = \"web\"\nfiles = [\"missing.jsonl\"]\nweight = 1.0\nquality_filter = true\n");
    assert!(e.contains("[quality]"), "{e}");
    let e =
        run("out = \"o\"\n[[source]]\nname = \"web\"\nfiles = [\"missing.jsonl\"]\nweight = 1.0\n");
    assert!(e.contains("missing.jsonl"), "{e}");
}
