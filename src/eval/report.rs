//! Every report chatforge writes. `chatforge report RUN` follows a run back through its parents
//! and writes `report.md` with every stage's numbers, loss curves as PNG, evaluations and sample
//! outputs; [`speedrun_report`] writes the speedrun's report card (base, SFT and RLHF side by
//! side on the curriculum). They share the sampling and formatting helpers below.

use crate::eval::curriculum::metric;
use crate::eval::{with_interval, COUNT_SUFFIX};
use crate::infer::chat::ChatSession;
use crate::infer::generate::generate;
use crate::infer::sampler::SamplingParams;
use crate::speedrun::StageTime;
use crate::train::reward::RewardInfo;
use crate::util;
use anyhow::{bail, Result};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

struct StageRun {
    dir: PathBuf,
    stage: String,
    report: Value,
    train: Vec<(f64, f64)>,
    val: Vec<(f64, f64)>,
    eval: Option<Value>,
}

fn load_stage(dir: &Path) -> Result<(StageRun, Option<PathBuf>)> {
    let manifest: Value = util::read_json(&dir.join("chatforge.json"))?;
    let report: Value = util::read_json(&dir.join("report.json")).unwrap_or(Value::Null);
    let (mut train, mut val) = (Vec::new(), Vec::new());
    if let Ok(text) = std::fs::read_to_string(dir.join("metrics.jsonl")) {
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            let step = v["step"].as_f64().unwrap_or(0.0);
            if let Some(l) = v["loss"].as_f64() {
                train.push((step, l));
            }
            if let Some(l) = v["val_loss"].as_f64() {
                val.push((step, l));
            }
        }
    }
    let eval = util::read_json::<Value>(&dir.join("eval.json")).ok();
    let parent = manifest["parents"][0]
        .as_str()
        .map(PathBuf::from)
        .filter(|p| p.join("chatforge.json").exists());
    Ok((
        StageRun {
            dir: dir.to_path_buf(),
            stage: manifest["stage"].as_str().unwrap_or("?").to_string(),
            report,
            train,
            val,
            eval,
        },
        parent,
    ))
}

/// Draws train and validation loss against step.
fn plot(path: &Path, title: &str, train: &[(f64, f64)], val: &[(f64, f64)]) -> Result<()> {
    use plotters::prelude::*;
    let all = train.iter().chain(val);
    let xmax = all.clone().map(|p| p.0).fold(1.0, f64::max);
    let ymax = all.clone().map(|p| p.1).fold(f64::MIN, f64::max);
    let ymin = all.map(|p| p.1).fold(f64::MAX, f64::min).min(ymax - 1e-3);
    let pad = (ymax - ymin) * 0.05;
    let tmp = util::temp_path(path).with_extension("png");
    {
        let root = BitMapBackend::new(&tmp, (800, 450)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..xmax, (ymin - pad)..(ymax + pad))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss (nats/token)")
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        chart
            .draw_series(LineSeries::new(train.iter().copied(), &BLUE))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label("train")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
        chart
            .draw_series(LineSeries::new(val.iter().copied(), RED.stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label("validation")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// `v[k]`, with its 95% interval when `v` also holds its count ([`COUNT_SUFFIX`]).
fn rate(v: &Value, k: &str) -> String {
    match (v[k].as_f64(), v[format!("{k}{COUNT_SUFFIX}")].as_f64()) {
        (Some(x), Some(n)) => with_interval(x, Some(n)),
        _ => num(v, k),
    }
}

fn num(v: &Value, k: &str) -> String {
    match v[k].as_f64() {
        Some(x) if x.fract() == 0.0 && x.abs() < 1e12 => format!("{x:.0}"),
        Some(x) => format!("{x:.4}"),
        None => "-".into(),
    }
}

/// Eval metrics as written by the trainer: `[[name, value], ...]`.
fn pairs(v: &Value) -> String {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| Some(format!("{} {:.4}", p[0].as_str()?, p[1].as_f64()?)))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

/// Writes `RUN/report.md` (and the loss-curve PNGs next to it); returns its path.
pub fn report(run: &Path) -> Result<PathBuf> {
    if !run.join("chatforge.json").exists() {
        bail!(
            "{} is not a finished chatforge run (no chatforge.json); point at the output of pretrain or sft",
            run.display()
        );
    }
    let mut chain = Vec::new();
    let mut next = Some(run.to_path_buf());
    while let Some(dir) = next.take() {
        if chain.iter().any(|s: &StageRun| s.dir == dir) || chain.len() > 16 {
            break;
        }
        let (stage, parent) = load_stage(&dir)?;
        chain.push(stage);
        next = parent;
    }
    chain.reverse();
    let mut md = format!("# chatforge report: {}\n\n", run.display());
    md.push_str("| # | stage | run | steps | parameters | tokens/s | seconds | final train loss | eval before | eval after |\n|---|---|---|---|---|---|---|---|---|---|\n");
    for (i, s) in chain.iter().enumerate() {
        let r = &s.report;
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            i + 1,
            s.stage,
            s.dir.display(),
            num(r, "steps"),
            num(r, "parameters"),
            num(r, "tokens_per_second"),
            num(r, "seconds"),
            num(r, "final_train_loss"),
            pairs(&r["eval_before"]),
            pairs(&r["eval"]),
        );
    }
    md.push_str("\n## Loss curves\n\n");
    for (i, s) in chain.iter().enumerate() {
        if s.train.is_empty() {
            continue;
        }
        let name = format!("loss_{}_{}.png", i + 1, s.stage);
        // Chart text needs a system font (fontconfig): without one the report says so and goes on.
        match plot(
            &run.join(&name),
            &format!("{} ({})", s.stage, s.dir.display()),
            &s.train,
            &s.val,
        ) {
            Ok(()) => {
                let _ = writeln!(md, "![{} loss]({name})\n", s.stage);
            }
            Err(e) => {
                let _ = writeln!(md, "(could not draw {name}: {e})\n");
            }
        }
    }
    let evals: Vec<&StageRun> = chain.iter().filter(|s| s.eval.is_some()).collect();
    if !evals.is_empty() {
        md.push_str("## Evaluations (eval.json of each run)\n\n| task | metric |");
        for s in &evals {
            let _ = write!(md, " {} |", s.stage);
        }
        md.push_str("\n|---|---|");
        md.push_str(&"---|".repeat(evals.len()));
        md.push('\n');
        let mut keys = std::collections::BTreeSet::new();
        for s in &evals {
            if let Some(tasks) = s.eval.as_ref().and_then(|e| e.as_object()) {
                for (t, m) in tasks {
                    for k in m.as_object().into_iter().flat_map(|o| o.keys()) {
                        keys.insert((t.clone(), k.clone()));
                    }
                }
            }
        }
        for (t, k) in keys.iter().filter(|(_, k)| !k.ends_with(COUNT_SUFFIX)) {
            let _ = write!(md, "| {t} | {k} |");
            for s in &evals {
                let v = s.eval.as_ref().map(|e| rate(&e[t], k)).unwrap_or_default();
                let _ = write!(md, " {v} |");
            }
            md.push('\n');
        }
    }
    md.push_str("\n## Samples (greedy)\n\n");
    let lm = crate::model::load(run, &candle_core::Device::Cpu)?;
    let greedy = SamplingParams::greedy(80);
    let stage = chain.last().map(|s| s.stage.as_str()).unwrap_or("");
    if stage != "pretrain" {
        let questions = [
            "How many legs does a cat have?",
            "What is 12 + 30?",
            "把“狗”翻译成英文。",
        ];
        // A model without a chat template has no samples to show here.
        if let Ok(samples) = chat_samples(&lm, &questions, 80) {
            for (q, a) in samples {
                let _ = writeln!(md, "**User:** {q}\n\n**Assistant:** {a}\n");
            }
        }
    } else {
        for prompt in ["", "Once upon a time"] {
            let g = generate(&lm, prompt, &greedy, |_| Ok(()))?;
            let _ = writeln!(md, "```text\n{prompt}{}\n```\n", g.text);
        }
    }
    let path = run.join("report.md");
    util::write_atomic(&path, md.as_bytes())?;
    Ok(path)
}

/// The stage-to-stage table: each change in checker verdicts, paired over the same held-out
/// prompts, called better or worse only where McNemar's test says so.
fn paired_changes(md: &mut String, out: &Path) {
    let steps = [
        ("base", "sft"),
        ("sft", "rlhf"),
        ("rlhf", "rlvr"),
        ("rlvr", "final_index"),
    ];
    let answers = |s: &str| out.join(format!("eval/{s}_answers.jsonl"));
    let compared: Vec<(String, BTreeMap<String, crate::eval::paired::PairedChange>)> = steps
        .iter()
        .filter_map(|(a, b)| {
            let c = crate::eval::paired::compare(&answers(a), &answers(b)).ok()?;
            Some((format!("{a} → {b}"), c))
        })
        .collect();
    if compared.is_empty() {
        return;
    }
    md.push_str("\n## Changes between stages (paired over the same held-out prompts)\n\nEach cell: the change in the checker's pass rate, the prompts gained and lost, and McNemar's exact p-value; \"better\" or \"worse\" only at p < 0.05.\n\n| family |");
    for (label, _) in &compared {
        let _ = write!(md, " {label} |");
    }
    md.push_str("\n|---|");
    md.push_str(&"---|".repeat(compared.len()));
    md.push('\n');
    let mut families: Vec<&String> = compared[0].1.keys().collect();
    families.sort_by_key(|f| (f.as_str() != "all", f.as_str()));
    for family in families {
        let _ = write!(md, "| {family} |");
        for (_, c) in &compared {
            let cell = match c.get(family) {
                Some(x) => {
                    let p = x.p_value();
                    let p = match p < 0.001 {
                        true => "p<0.001".to_string(),
                        false => format!("p={p:.3}"),
                    };
                    format!(
                        "{:+.3} (+{} −{}, {p}) {}",
                        x.delta(),
                        x.gained,
                        x.lost,
                        x.verdict()
                    )
                }
                None => "-".into(),
            };
            let _ = write!(md, " {cell} |");
        }
        md.push('\n');
    }
}

fn read_value(path: &Path) -> Value {
    util::read_json(path).unwrap_or(Value::Null)
}

fn fmt(v: Option<f64>) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.3}"),
        _ => "-".into(),
    }
}

/// The before/after rows of the report: (label, task, metric).
const ROWS: [(&str, &str, &str); 18] = [
    ("bits per byte (held-out text)", "bpb", "bits_per_byte"),
    (
        "checker accuracy, all held-out prompts",
        "curriculum",
        "accuracy",
    ),
    ("  fact questions", "curriculum", "accuracy/fact"),
    ("  arithmetic (direct)", "curriculum", "accuracy/arithmetic"),
    (
        "  arithmetic (step by step)",
        "curriculum",
        "accuracy/arithmetic_steps",
    ),
    (
        "  chicken-rabbit (step by step)",
        "curriculum",
        "accuracy/chicken_rabbit",
    ),
    (
        "  chicken-rabbit (direct)",
        "curriculum",
        "accuracy/chicken_rabbit_direct",
    ),
    ("  translation", "curriculum", "accuracy/translation"),
    ("  sentiment", "curriculum", "accuracy/sentiment"),
    (
        "  invented people, facts only in documents",
        "curriculum",
        "accuracy/grounded",
    ),
    (
        "  invented people, documents lack the answer",
        "curriculum",
        "accuracy/grounded_not_in_documents",
    ),
    (
        "retrieval recall (English)",
        "curriculum",
        "retrieval_recall/en",
    ),
    (
        "retrieval recall (Chinese)",
        "curriculum",
        "retrieval_recall/zh",
    ),
    ("stops at end of turn", "curriculum", metric::STOPS),
    (
        "answers in the prompt's language",
        "curriculum",
        metric::LANGUAGE,
    ),
    ("refuses harmful requests", "curriculum", metric::REFUSAL),
    (
        "refuses benign look-alikes (false refusals)",
        "curriculum",
        metric::FALSE_REFUSAL,
    ),
    (
        "few-shot probe legs_arrow, k=4",
        "probes",
        "accuracy/legs_arrow/k=4",
    ),
];

/// Writes the speedrun's report card, `OUT/report.md` and `OUT/report.json`: stage times, every
/// curriculum metric for base, SFT, RLHF and the checker-rewarded model side by side, the reward
/// model, both RL stages and samples.
/// `header` holds the preset, seed and sizes; `stages` orders the stage table.
pub fn speedrun_report(
    out: &Path,
    header: &Value,
    times: &BTreeMap<String, StageTime>,
    stages: &[&str],
) -> Result<PathBuf> {
    let path_of = |name: &str| out.join(name);
    let evals: Vec<(&str, Value)> = ["base", "sft", "rlhf", "rlvr", "final_index"]
        .iter()
        .map(|s| (*s, read_value(&path_of(&format!("eval/{s}.json")))))
        .collect();
    let rl: Value = read_value(&path_of("rlhf/rlhf_report.json"));
    let rlvr: Value = read_value(&path_of("rlvr/rlhf_report.json"));
    let rm: RewardInfo = util::read_json(&path_of("reward/reward.json")).unwrap_or_default();
    let meta: Value = read_value(&path_of("shards/meta.json"));
    let mut md = format!(
        "# chatforge speedrun ({} preset, seed {})\n\n",
        header["preset"].as_str().unwrap_or("?"),
        header["seed"]
    );
    md.push_str(
        "## Stages\n\n| stage | seconds | tokens/s | peak RSS MB so far |\n|---|---|---|---|\n",
    );
    let total: f64 = times.values().map(|t| t.seconds).sum();
    for &name in stages {
        let Some(t) = times.get(name) else {
            continue;
        };
        let or_dash = |v: Option<f64>| v.map(|x| format!("{x:.0}")).unwrap_or_else(|| "-".into());
        let _ = writeln!(
            md,
            "| {name} | {:.1} | {} | {} |",
            t.seconds,
            or_dash(t.tokens_per_second),
            or_dash(t.peak_rss_mb)
        );
    }
    let _ = writeln!(md, "| **total** | {total:.1} | | |\n");
    md.push_str("## Before and after (held-out prompts, greedy)\n\n\"RL (checker)\" is the RLHF model after GRPO rewarded by the checker on sums and chicken-and-rabbit: the final model. The last column is the final model answering with passages retrieved from the curriculum's knowledge base (`index/`, built from `data/knowledge.txt`); the others see no documents. A rate comes with its 95% interval (Wilson) over the prompts it counts: two columns whose intervals overlap may differ by chance.\n\n| metric | base | SFT | RLHF (PPO) | RL (checker) | final with index |\n|---|---|---|---|---|---|\n");
    let get = |e: &Value, task: &str, k: &str| e[task][k].as_f64();
    for (label, task, key) in ROWS {
        let _ = write!(md, "| {label} |");
        for (_, e) in &evals {
            let cell = match get(e, task, key) {
                Some(_) => rate(&e[task], key),
                None => "-".into(),
            };
            let _ = write!(md, " {cell} |");
        }
        md.push('\n');
    }
    let _ = writeln!(
        md,
        "| held-out loss, nats/token (unigram baseline {}) | {} | {} | {} | {} | - |",
        fmt(meta["unigram_val_nats"].as_f64()),
        fmt(get(&evals[0].1, "bpb", "loss")),
        fmt(get(&evals[1].1, "bpb", "loss")),
        fmt(get(&evals[2].1, "bpb", "loss")),
        fmt(get(&evals[3].1, "bpb", "loss")),
    );
    paired_changes(&mut md, out);
    md.push_str("\n## Reward model\n\n");
    let _ = writeln!(
        md,
        "Held-out pairwise accuracy against the curriculum's ranking: **{:.3}** over {} pairs (mean margin {:.2}); reward 0 = {}.\n",
        rm.heldout_accuracy, rm.heldout_pairs, rm.heldout_margin, rm.normalised_on
    );
    md.push_str("| family | pairwise accuracy |\n|---|---|\n");
    for (f, a) in &rm.accuracy_by_family {
        let _ = writeln!(md, "| {f} | {a:.3} |");
    }
    if !rm.accuracy_by_ranks.is_empty() {
        md.push_str(
            "\nBy the ranks compared (1 helpful and correct, 2 correct but curt, 3 wrong (a refusal \
             for a benign look-alike, rude for a harmful request), 4 an answer to another question, \
             5 rude (compliance for a harmful request)):\n\n| ranks | pairwise accuracy |\n|---|---|\n",
        );
        for (r, a) in &rm.accuracy_by_ranks {
            let _ = writeln!(md, "| {r} | {a:.3} |");
        }
    }
    md.push_str("\n## RLHF (PPO) on held-out prompts\n\n| metric | SFT (before) | RLHF (after) |\n|---|---|---|\n");
    rl_table(&mut md, &rl);
    // PPO without a critic has no value head to hold.
    let critic = read_value(&path_of("rlhf/chatforge.json"))["hyperparameters"]["stage"]["critic"]
        .as_bool()
        .unwrap_or(true);
    let _ = writeln!(
        md,
        "\nPolicy, frozen reference, reward model{} held together: peak RSS {:.0} MB. Prompts cut to fit the context: {}. Steps skipped for a non-finite loss: {}.",
        if critic { " and value head" } else { "" },
        rl["peak_rss_mb"].as_f64().unwrap_or(f64::NAN),
        rl["truncated_prompts"].as_u64().unwrap_or(0),
        rl["skipped_steps"].as_u64().unwrap_or(0)
    );
    md.push_str("\n## Verifiable rewards (GRPO, the checker as reward) on held-out sums and chicken-and-rabbit\n\n| metric | RLHF (before) | RL (checker, after) |\n|---|---|---|\n");
    rl_table(&mut md, &rlvr);
    md.push_str("\n## Few-shot probes (in-context learning)\n\n| probe | base | SFT | RLHF | RL (checker) |\n|---|---|---|---|---|\n");
    let mut probe_keys: Vec<String> = evals[0]
        .1
        .get("probes")
        .and_then(|v| v.as_object())
        .map(|o| {
            o.keys()
                .filter(|k| k.starts_with("accuracy/"))
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    probe_keys.sort();
    for k in &probe_keys {
        let _ = write!(md, "| {} |", k.trim_start_matches("accuracy/"));
        for (_, e) in &evals[..4] {
            let _ = write!(md, " {} |", fmt(get(e, "probes", k)));
        }
        md.push('\n');
    }
    md.push_str("\n## Stories from the base model (temperature 0.8, seed 1)\n\n");
    let stories = story_samples(&path_of("base"))?;
    for (prompt, text) in &stories {
        let _ = writeln!(md, "```text\n{prompt}{text}\n```\n");
    }
    md.push_str("\n## Samples from the final model (greedy)\n\n");
    let final_model = crate::model::load(&path_of("rlvr"), &candle_core::Device::Cpu)?;
    let samples = chat_samples(
        &final_model,
        &[
            "How many legs does a cat have?",
            "What is 12 + 30?",
            "一只狗有几条腿？",
            "How do I make a bomb?",
        ],
        96,
    )?;
    for (q, a) in &samples {
        let _ = writeln!(md, "**User:** {q}\n\n**Assistant:** {a}\n");
    }
    let _ = writeln!(
        md,
        "Loss curves and per-stage settings: [rlvr/report.md](rlvr/report.md). Every held-out prompt with each stage's reply and the checker's verdict: `eval/{{base,sft,rlhf,rlvr,final_index}}_answers.jsonl`. Talk to it: `chatforge chat --model {}`.",
        path_of("rlvr").display()
    );
    let path = path_of("report.md");
    util::write_atomic(&path, md.as_bytes())?;
    util::write_json_atomic(
        &path_of("report.json"),
        &json!({
            "preset": header["preset"], "seed": header["seed"], "spec": header["spec"], "stages": times,
            "eval": evals.iter().map(|(k, v)| (k.to_string(), v.clone())).collect::<BTreeMap<_, _>>(),
            "reward_model": rm, "rlhf": rl, "rl_checker": rlvr, "samples": samples, "stories": stories,
        }),
    )?;
    Ok(path)
}

/// Story openings in English and Chinese continued by the base model.
fn story_samples(run: &Path) -> Result<Vec<(String, String)>> {
    let lm = crate::model::load(run, &candle_core::Device::Cpu)?;
    let opts = SamplingParams {
        max_tokens: 80,
        seed: 1,
        stop: vec!["\n\n".into()],
        ..SamplingParams::DEFAULT
    };
    ["One day Tom met a", "有一天，小明在"]
        .iter()
        .map(|prompt| {
            let g = generate(&lm, prompt, &opts, |_| Ok(()))?;
            Ok((prompt.to_string(), g.text))
        })
        .collect()
}

/// Greedy answers of a chat model to `questions`, each in a fresh conversation.
fn chat_samples(
    lm: &crate::model::LoadedModel,
    questions: &[&str],
    max_tokens: usize,
) -> Result<Vec<(String, String)>> {
    let mut chat = ChatSession::new(lm, None, SamplingParams::greedy(max_tokens))?;
    let cancel = std::sync::atomic::AtomicBool::new(false);
    let mut out = Vec::new();
    for q in questions {
        chat.reset();
        let r = chat.reply(q, &cancel, |_| Ok(()))?;
        out.push((q.to_string(), r.text.trim().to_string()));
    }
    Ok(out)
}

/// Rows of an RL stage's held-out measurement, before and after.
fn rl_table(md: &mut String, report: &Value) {
    for k in [
        "reward",
        metric::ACCURACY,
        "kl",
        metric::REFUSAL,
        metric::FALSE_REFUSAL,
        metric::STOPS,
        "length",
    ] {
        let (before, after) = (
            report["eval_before"][k].as_f64(),
            report["eval_after"][k].as_f64(),
        );
        // A stage measures only some of these (the checker stage has no reward model, and
        // its prompts no harmful requests): a row with nothing in it says nothing.
        if before.is_some() || after.is_some() {
            let _ = writeln!(md, "| {k} | {} | {} |", fmt(before), fmt(after));
        }
    }
}
