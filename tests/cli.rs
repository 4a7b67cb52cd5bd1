//! The command line as a user meets it: bad input gets a clear error naming the file and what is
//! wrong, a non-zero exit, and no output left looking valid.

mod common;

use std::path::Path;
use std::process::{Command, Output};

fn chatforge(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_chatforge"))
        .args(args)
        .output()
        .expect("run chatforge")
}

fn fails_with(args: &[&str], needles: &[&str]) -> String {
    let out = chatforge(args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "expected failure for {args:?}");
    assert!(!stderr.contains("panicked"), "panic for {args:?}: {stderr}");
    for n in needles {
        assert!(
            stderr.contains(n),
            "{args:?}: stderr lacks {n:?}:\n{stderr}"
        );
    }
    stderr
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A finished three-step run of the tiny model, made through the command line.
fn pretrain_three_steps(shards: &Path, cfg: &Path, run: &Path) {
    let out = chatforge(&[
        "pretrain",
        "--data",
        s(shards),
        "--out",
        s(run),
        "--config",
        s(cfg),
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--eval-every",
        "3",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn missing_and_empty_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tok");
    fails_with(
        &[
            "tokenizer",
            "train",
            "--input",
            "/no/such/corpus.txt",
            "--out",
            s(&out),
        ],
        &["/no/such/corpus.txt"],
    );
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "\n \n").unwrap();
    fails_with(
        &["tokenizer", "train", "--input", s(&empty), "--out", s(&out)],
        &["empty", "empty.txt"],
    );
    assert!(!out.join("tokenizer.json").exists());
}

#[test]
fn bad_jsonl_line_and_small_vocab() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"text\": \"fine\"}\n{\"text\": \"also fine\"}\n{oops\n",
    )
    .unwrap();
    let out = dir.path().join("tok");
    fails_with(
        &["tokenizer", "train", "--input", s(&bad), "--out", s(&out)],
        &["bad.jsonl:3", "JSON"],
    );
    let good = dir.path().join("good.txt");
    std::fs::write(&good, "hello world").unwrap();
    fails_with(
        &[
            "tokenizer",
            "train",
            "--input",
            s(&good),
            "--vocab-size",
            "100",
            "--out",
            s(&out),
        ],
        &["vocab size 100", "at least 272"],
    );
}

#[test]
fn pipeline_errors_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let (shards, cfg) = common::tiny_shards(dir.path());

    // Heads that do not divide the width.
    let mut c = common::tiny_config(320, 64);
    c.num_attention_heads = 5;
    let bad_cfg = dir.path().join("bad.json");
    std::fs::write(&bad_cfg, serde_json::to_string(&c).unwrap()).unwrap();
    let run = dir.path().join("run_bad");
    fails_with(
        &[
            "pretrain",
            "--data",
            s(&shards),
            "--out",
            s(&run),
            "--config",
            s(&bad_cfg),
            "--steps",
            "2",
        ],
        &["bad.json", "does not divide"],
    );
    assert!(!run.join("model.safetensors").exists());

    // Not a shard directory.
    fails_with(
        &[
            "pretrain",
            "--data",
            s(dir.path()),
            "--out",
            s(&run),
            "--steps",
            "2",
        ],
        &["meta.json", "chatforge tokenize"],
    );

    // A real run, then generation errors.
    let run = dir.path().join("run");
    pretrain_three_steps(&shards, &cfg, &run);
    let long = "word ".repeat(300);
    fails_with(
        &["generate", "--model", s(&run), "--prompt", &long],
        &["prompt is", "context is 64"],
    );
    fails_with(
        &[
            "generate",
            "--model",
            s(&dir.path().join("nope")),
            "--prompt",
            "hi",
        ],
        &["nope", "not found"],
    );
    fails_with(
        &[
            "generate",
            "--model",
            s(&run),
            "--prompt",
            "hi",
            "--top-p",
            "0",
        ],
        &["--top-p"],
    );

    // Weights that do not fit the config next to them.
    let mut bigger = common::tiny_config(320, 64);
    bigger.hidden_size = 64;
    std::fs::write(
        run.join("config.json"),
        serde_json::to_string(&bigger).unwrap(),
    )
    .unwrap();
    fails_with(
        &["generate", "--model", s(&run), "--prompt", "hi"],
        &["model.safetensors", "incompatible config"],
    );
}

#[test]
fn generate_streams_and_is_deterministic_at_temperature_zero() {
    let dir = tempfile::tempdir().unwrap();
    let (shards, cfg) = common::tiny_shards(dir.path());
    let run = dir.path().join("run");
    let out = chatforge(&[
        "pretrain",
        "--data",
        s(&shards),
        "--out",
        s(&run),
        "--config",
        s(&cfg),
        "--steps",
        "30",
        "--batch-size",
        "8",
        "--seq-len",
        "32",
        "--lr",
        "0.01",
        "--eval-every",
        "30",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["val_loss"].as_f64().unwrap() < report["unigram_val_nats"].as_f64().unwrap());
    let gen = || {
        let o = chatforge(&[
            "generate",
            "--model",
            s(&run),
            "--prompt",
            "Once upon",
            "--temperature",
            "0",
            "--max-tokens",
            "20",
            "--stats",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let stats: serde_json::Value =
            serde_json::from_str(String::from_utf8_lossy(&o.stderr).trim()).unwrap();
        (String::from_utf8(o.stdout).unwrap(), stats)
    };
    let (a, stats) = gen();
    let (b, _) = gen();
    assert_eq!(a, b);
    assert!(a.starts_with("Once upon"));
    assert!(stats["completion_tokens"].as_u64().unwrap() <= 20);

    // --json-schema binds the reply (the tiny model knows no JSON); --regex too.
    let schema = dir.path().join("schema.json");
    std::fs::write(
        &schema,
        r#"{"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9},
            "ok": {"type": "boolean"}}, "required": ["n", "ok"], "additionalProperties": false}"#,
    )
    .unwrap();
    for seed in ["1", "2", "3"] {
        let o = chatforge(&[
            "generate",
            "--model",
            s(&run),
            "--prompt",
            "Once upon",
            "--json",
            "--temperature",
            "1",
            "--seed",
            seed,
            "--max-tokens",
            "60",
            "--json-schema",
            s(&schema),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let reply: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let text = reply["text"].as_str().unwrap();
        let v: serde_json::Value =
            serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
        assert!(
            v["n"].as_u64().is_some_and(|n| n <= 9) && v["ok"].is_boolean(),
            "{v}"
        );
        assert_eq!(v.as_object().unwrap().len(), 2, "{v}");
    }
    let o = chatforge(&[
        "generate",
        "--model",
        s(&run),
        "--prompt",
        "x",
        "--json",
        "--max-tokens",
        "6",
        "--regex",
        "(yes|no)",
    ]);
    let reply: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        ["yes", "no"].contains(&reply["text"].as_str().unwrap()),
        "{reply}"
    );
    // Bad constraints are named before anything is printed.
    std::fs::write(dir.path().join("bad.json"), r#"{"type": "strin"}"#).unwrap();
    let bad = s(&dir.path().join("bad.json")).to_string();
    for (args, needle) in [
        (vec!["--json-schema", bad.as_str()], "strin"),
        (
            vec!["--json-schema", "/no/such/schema.json"],
            "/no/such/schema.json",
        ),
        (vec!["--regex", "(unclosed"], "grammar"),
    ] {
        let mut all = vec!["generate", "--model", s(&run), "--prompt", "Once upon"];
        all.extend(args);
        fails_with(&all, &[needle]);
        let o = chatforge(&all);
        assert!(
            o.stdout.is_empty(),
            "printed {:?}",
            String::from_utf8_lossy(&o.stdout)
        );
    }
}

#[test]
fn eval_scores_curriculum_files_and_names_bad_task_specs() {
    let dir = tempfile::tempdir().unwrap();
    let (shards, cfg) = common::tiny_shards(dir.path());
    let run = dir.path().join("run");
    pretrain_three_steps(&shards, &cfg, &run);
    let cur = dir.path().join("cur");
    let o = chatforge(&[
        "curriculum",
        "--out",
        s(&cur),
        "--seed",
        "1",
        "--scale",
        "0.05",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let results = dir.path().join("results.json");
    let rl = format!("curriculum:{}", s(&cur.join("rl_prompts_heldout.jsonl")));
    let probes = format!("probes:{}", s(&cur.join("fewshot_probes.jsonl")));
    let bpb = format!("bpb:{}", s(&shards));
    let o = chatforge(&[
        "eval",
        "--model",
        s(&run),
        "--task",
        &rl,
        "--task",
        &probes,
        "--task",
        &bpb,
        "--limit",
        "8",
        "--max-tokens",
        "8",
        "--out",
        s(&results),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let table = String::from_utf8(o.stdout).unwrap();
    assert!(table.starts_with("| task | metric | value |"), "{table}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&results).unwrap()).unwrap();
    assert_eq!(v[&rl]["n"], 8.0);
    // The command gives what the library gives for the same options: every flag reached it.
    let lm = chatforge::model::load(&run, &candle_core::Device::Cpu).unwrap();
    let expected = chatforge::eval::run(
        &lm,
        &chatforge::eval::EvalOptions {
            tasks: vec![rl.clone(), probes.clone(), bpb.clone()],
            limit: Some(8),
            max_tokens: 8,
            ..Default::default()
        },
    )
    .unwrap();
    for (task, metrics) in &expected {
        for (name, want) in metrics {
            let got = v[task][name].as_f64().unwrap_or(f64::NAN);
            assert!(
                (got - want).abs() < 1e-6 || (got.is_nan() && want.is_nan()),
                "{task} {name}: command {got}, library {want}"
            );
            // A rate's count is not a row of its own: the rate's row shows its interval.
            match name.strip_suffix(chatforge::eval::COUNT_SUFFIX) {
                Some(rate) => assert!(
                    table.contains(&format!("| {rate} | {:.3} [", metrics[rate])),
                    "{rate} has no interval in {table}"
                ),
                None => assert!(
                    table.contains(&format!("| {name} |")),
                    "{name} missing from {table}"
                ),
            }
        }
    }
    // Bits per byte follows from the loss: nats per token over bytes per token, in bits.
    let (loss, bits) = (
        v[&bpb]["loss"].as_f64().unwrap(),
        v[&bpb]["bits_per_byte"].as_f64().unwrap(),
    );
    assert!(
        loss > 0.0 && bits > 0.0 && bits < loss / std::f64::consts::LN_2,
        "{loss} {bits}"
    );
    fails_with(
        &["eval", "--model", s(&run), "--task", "arc"],
        &["KIND:FILE"],
    );
    fails_with(
        &["eval", "--model", s(&run), "--task", "quiz:x.jsonl"],
        &["unknown task kind"],
    );
    fails_with(
        &[
            "eval",
            "--model",
            s(&run),
            "--task",
            "gsm8k:/no/gsm8k.jsonl",
        ],
        &["/no/gsm8k.jsonl"],
    );
}

#[test]
fn reward_and_rlhf_refuse_bad_input_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let (shards, cfg) = common::tiny_shards(dir.path());
    let run = dir.path().join("base");
    pretrain_three_steps(&shards, &cfg, &run);
    let missing = dir.path().join("nope.jsonl");
    fails_with(
        &[
            "reward",
            "--base",
            s(&run),
            "--data",
            s(&missing),
            "--out",
            s(&dir.path().join("rm")),
        ],
        &["nope.jsonl"],
    );
    let bad = dir.path().join("prefs.jsonl");
    std::fs::write(&bad, "{\"prompt\": \"q\", \"chosen\": \"a\"}\n{not json\n").unwrap();
    fails_with(
        &[
            "reward",
            "--base",
            s(&run),
            "--data",
            s(&bad),
            "--out",
            s(&dir.path().join("rm")),
        ],
        &["prefs.jsonl:2", "not valid JSON"],
    );
    std::fs::write(&bad, "{\"prompt\": \"q\", \"chosen\": \"a\"}\n").unwrap();
    fails_with(
        &[
            "reward",
            "--base",
            s(&run),
            "--data",
            s(&bad),
            "--out",
            s(&dir.path().join("rm")),
        ],
        &["prefs.jsonl:1", "\"rejected\""],
    );
    // A policy used as a reward model: no score head.
    let prompts = dir.path().join("p.jsonl");
    std::fs::write(&prompts, "{\"prompt\": \"hi\"}\n").unwrap();
    fails_with(
        &[
            "rlhf",
            "--policy",
            s(&run),
            "--reward",
            s(&run),
            "--prompts",
            s(&prompts),
            "--out",
            s(&dir.path().join("rl")),
        ],
        &["not a reward model", "chatforge reward"],
    );
    fails_with(
        &[
            "rlhf",
            "--algo",
            "dpo",
            "--policy",
            s(&run),
            "--out",
            s(&dir.path().join("rl")),
        ],
        &["--prefs"],
    );
    // Numeric options out of range are named (a zero horizon once made β NaN).
    for (flag, value) in [
        ("--kl-horizon", "0"),
        ("--gamma", "1.5"),
        ("--minibatch", "0"),
    ] {
        fails_with(
            &[
                "rlhf",
                "--policy",
                s(&run),
                "--reward-source",
                "checker",
                "--prompts",
                s(&prompts),
                "--out",
                s(&dir.path().join("rl")),
                flag,
                value,
            ],
            &[flag],
        );
    }
}

#[test]
fn data_dedup_drops_copies_and_reports_why() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("docs.txt");
    let story = "Lily had a red kite. On Monday, Lily took the kite to the park. The wind was strong, so the kite flew into a tree.";
    let other = "The cow said moo and looked hungry. Tom knew that a cow eats grass, so Tom brought some grass for it.";
    std::fs::write(
        &input,
        format!(
            "{story}\n\n{other}\n\n{}\n\n{}\n",
            story.to_uppercase(),
            story.replace("Monday", "Sunday")
        ),
    )
    .unwrap();
    let out = dir.path().join("kept.jsonl");
    let o = chatforge(&[
        "data",
        "dedup",
        "--input",
        s(&input),
        "--out",
        s(&out),
        "--threshold",
        "0.7",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), 2);
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("kept.jsonl.report.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(report["exact_duplicates"], 1);
    assert_eq!(report["near_duplicates"], 1);
    fails_with(
        &[
            "data",
            "dedup",
            "--input",
            s(&input),
            "--out",
            s(&out),
            "--threshold",
            "1.5",
        ],
        &["--threshold"],
    );
}

#[test]
fn quality_filter_refuses_a_file_that_is_not_a_model() {
    let dir = tempfile::tempdir().unwrap();
    let docs = dir.path().join("docs.jsonl");
    std::fs::write(&docs, "{\"text\": \"hello there\"}\n").unwrap();
    fails_with(
        &[
            "data",
            "quality-filter",
            "--model",
            s(&docs),
            "--input",
            s(&docs),
            "--out",
            s(&dir.path().join("q.jsonl")),
        ],
        &["docs.jsonl", "not a quality model", "quality-train"],
    );
}

/// Numbers out of range are refused by their flag's name before any work, across commands.
#[test]
fn numeric_options_out_of_range_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let (shards, cfg) = common::tiny_shards(dir.path());
    let run = dir.path().join("run");
    pretrain_three_steps(&shards, &cfg, &run);
    let conv = dir.path().join("c.jsonl");
    std::fs::write(
        &conv,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"yo\"}]}\n",
    )
    .unwrap();
    let sft = |flag: &str, value: &str| {
        let out = dir.path().join(format!("sft{}", flag.replace('-', "")));
        fails_with(
            &[
                "sft",
                "--base",
                s(&run),
                "--data",
                s(&conv),
                "--out",
                s(&out),
                flag,
                value,
            ],
            &[flag],
        );
    };
    sft("--val-fraction", "1.5");
    sft("--mix-fraction", "2");
    sft("--lr", "0");
    sft("--min-lr-ratio", "3");
    let task = format!("bpb:{}", s(&shards));
    fails_with(
        &[
            "eval",
            "--model",
            s(&run),
            "--task",
            &task,
            "--batch-size",
            "0",
        ],
        &["--batch-size"],
    );
    fails_with(
        &[
            "serve",
            "--model",
            s(&run),
            "--port",
            "0",
            "--max-batch",
            "0",
        ],
        &["--max-batch"],
    );
}
