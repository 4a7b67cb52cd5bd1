//! The report card: `chatforge report RUN` follows a run back through its parents and writes
//! `report.md` with every stage's numbers, loss curves as PNG, evaluations and sample outputs.

use crate::infer::chat::ChatSession;
use crate::infer::generate::generate;
use crate::infer::sampler::SamplingParams;
use crate::util;
use anyhow::{bail, Result};
use serde_json::Value;
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
        for (t, k) in keys {
            let _ = write!(md, "| {t} | {k} |");
            for s in &evals {
                let v = s.eval.as_ref().map(|e| num(&e[&t], &k)).unwrap_or_default();
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
        if let Ok(mut chat) = ChatSession::new(&lm, None, greedy.clone()) {
            let cancel = std::sync::atomic::AtomicBool::new(false);
            for q in [
                "How many legs does a cat have?",
                "What is 12 + 30?",
                "把“狗”翻译成英文。",
            ] {
                chat.reset();
                let r = chat.reply(q, &cancel, |_| Ok(()))?;
                let _ = writeln!(md, "**User:** {q}\n\n**Assistant:** {}\n", r.text.trim());
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
