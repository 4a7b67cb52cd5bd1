//! Evaluation: multiple choice by log-likelihood (ARC, HellaSwag, MMLU), generative arithmetic
//! (GSM8K), the curriculum's checkable families with chat-level checks, and few-shot probes.
//! Every task runs against an [`Evaluatee`], so tests can score scripted models with known answers.

pub mod curriculum;
pub mod model;
pub mod paired;
pub mod report;

use crate::tokenizer::chat::{Message, Role};
use anyhow::{bail, Context, Result};
use model::{Evaluatee, Prompt};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// One multiple-choice question.
#[derive(Clone, Debug)]
pub struct Choice {
    pub context: String,
    pub options: Vec<String>,
    pub answer: usize,
}

pub(super) fn read_jsonl(path: &Path) -> Result<Vec<Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        out.push(
            serde_json::from_str(line).map_err(|e| {
                anyhow::anyhow!("{}:{}: not valid JSON ({e})", path.display(), i + 1)
            })?,
        );
    }
    if out.is_empty() {
        bail!("{} holds no records", path.display());
    }
    Ok(out)
}

pub(super) fn field<'a>(v: &'a Value, path: &Path, line: usize, name: &str) -> Result<&'a Value> {
    v.get(name)
        .ok_or_else(|| anyhow::anyhow!("{}:{line}: no \"{name}\" field", path.display()))
}

/// ARC JSONL: `{"question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}`.
pub fn load_arc(path: &Path) -> Result<Vec<Choice>> {
    read_jsonl(path)?
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let q = field(v, path, i + 1, "question")?;
            let stem = q["stem"].as_str().unwrap_or_default();
            let choices = q["choices"].as_array().cloned().unwrap_or_default();
            let key = field(v, path, i + 1, "answerKey")?
                .as_str()
                .unwrap_or_default();
            let answer = choices
                .iter()
                .position(|c| c["label"].as_str() == Some(key))
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "{}:{}: answerKey {key:?} is not a choice label",
                        path.display(),
                        i + 1
                    )
                })?;
            Ok(Choice {
                context: format!("Question: {stem}\nAnswer:"),
                options: choices
                    .iter()
                    .map(|c| format!(" {}", c["text"].as_str().unwrap_or_default()))
                    .collect(),
                answer,
            })
        })
        .collect()
}

/// HellaSwag JSONL: `{"ctx", "endings": [..4], "label"}`.
pub fn load_hellaswag(path: &Path) -> Result<Vec<Choice>> {
    read_jsonl(path)?
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let label = field(v, path, i + 1, "label")?;
            let answer = label
                .as_u64()
                .or_else(|| label.as_str().and_then(|s| s.parse().ok()))
                .ok_or_else(|| {
                    anyhow::anyhow!("{}:{}: label must be a number", path.display(), i + 1)
                })? as usize;
            let endings: Vec<String> = field(v, path, i + 1, "endings")?
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|e| format!(" {}", e.as_str().unwrap_or_default()))
                        .collect()
                })
                .unwrap_or_default();
            if answer >= endings.len() {
                bail!(
                    "{}:{}: label {answer} but only {} endings",
                    path.display(),
                    i + 1,
                    endings.len()
                );
            }
            Ok(Choice {
                context: field(v, path, i + 1, "ctx")?
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                options: endings,
                answer,
            })
        })
        .collect()
}

/// MMLU/CMMLU CSV rows: `question, A, B, C, D, answer` (a header row is skipped).
pub fn load_mmlu(path: &Path) -> Result<Vec<Choice>> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_path(path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = Vec::new();
    for (i, rec) in reader.records().enumerate() {
        let rec = rec.with_context(|| format!("{}:{}: bad CSV", path.display(), i + 1))?;
        if rec.len() < 6 {
            bail!(
                "{}:{}: expected question,A,B,C,D,answer",
                path.display(),
                i + 1
            );
        }
        let n = rec.len();
        let key = rec[n - 1].trim();
        let Some(answer) = ["A", "B", "C", "D"].iter().position(|k| *k == key) else {
            if i == 0 {
                continue; // header
            }
            bail!("{}:{}: answer {key:?} is not A-D", path.display(), i + 1);
        };
        let q = &rec[n - 6];
        let opts: Vec<&str> = (n - 5..n - 1).map(|j| &rec[j]).collect();
        out.push(Choice {
            context: format!(
                "{q}\nA. {}\nB. {}\nC. {}\nD. {}\nAnswer:",
                opts[0], opts[1], opts[2], opts[3]
            ),
            options: vec![" A".into(), " B".into(), " C".into(), " D".into()],
            answer,
        });
    }
    Ok(out)
}

/// Accuracy by summed log-likelihood and by log-likelihood per byte of the option (acc_norm).
/// The `shots` in-context examples come from `dev` when given, else from the start of `items`
/// (which are then not scored).
pub fn score_choices(
    m: &mut dyn Evaluatee,
    items: &[Choice],
    dev: Option<&[Choice]>,
    shots: usize,
    limit: Option<usize>,
) -> Result<BTreeMap<String, f64>> {
    let (examples, eval) = match dev {
        Some(d) => (&d[..shots.min(d.len())], items),
        None => {
            let k = shots.min(items.len().saturating_sub(1));
            (&items[..k], &items[k..])
        }
    };
    let prefix: String = examples
        .iter()
        .map(|c| format!("{}{}\n\n", c.context, c.options[c.answer]))
        .collect();
    let eval = &eval[..limit.unwrap_or(eval.len()).min(eval.len())];
    let requests: Vec<(String, String)> = eval
        .iter()
        .flat_map(|c| {
            c.options
                .iter()
                .map(|o| (format!("{prefix}{}", c.context), o.clone()))
        })
        .collect();
    let lls = m.loglikelihood(&requests)?;
    let (mut acc, mut acc_norm, mut k) = (0usize, 0usize, 0usize);
    for c in eval {
        let ll = &lls[k..k + c.options.len()];
        k += c.options.len();
        let best = argmax(ll.iter().copied());
        let best_norm = argmax(
            ll.iter()
                .zip(&c.options)
                .map(|(l, o)| l / o.len().max(1) as f64),
        );
        acc += usize::from(best == c.answer);
        acc_norm += usize::from(best_norm == c.answer);
    }
    let n = eval.len().max(1) as f64;
    Ok(BTreeMap::from([
        ("n".into(), eval.len() as f64),
        ("acc".into(), acc as f64 / n),
        ("acc_norm".into(), acc_norm as f64 / n),
    ]))
}

fn argmax(xs: impl Iterator<Item = f64>) -> usize {
    let mut best = (0, f64::NEG_INFINITY);
    for (i, x) in xs.enumerate() {
        if x > best.1 {
            best = (i, x);
        }
    }
    best.0
}

/// The number after `####` if present, else the last number in the text.
pub fn final_number(text: &str) -> Option<f64> {
    let tail = text.rsplit_once("####").map(|(_, t)| t).unwrap_or(text);
    let mut nums = Vec::new();
    let mut cur = String::new();
    for c in tail.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_digit() || c == '.' || (c == '-' && cur.is_empty()) {
            cur.push(c);
        } else if c == ',' && !cur.is_empty() {
            continue; // 1,000
        } else {
            if let Ok(n) = cur.trim_end_matches('.').parse::<f64>() {
                nums.push(n);
            }
            cur.clear();
        }
    }
    if text.contains("####") {
        nums.first().copied()
    } else {
        nums.last().copied()
    }
}

/// What starts the next question in few-shot GSM8K prompts.
const FEW_SHOT_SEPARATOR: &str = "\n\nQuestion:";

/// GSM8K JSONL (`question`, `answer` ending in `#### N`): chat prompt for chat models, few-shot
/// text for base models; `cot` asks for step-by-step reasoning.
pub fn score_gsm8k(
    m: &mut dyn Evaluatee,
    path: &Path,
    chat: bool,
    cot: bool,
    shots: usize,
    limit: Option<usize>,
    max_tokens: usize,
) -> Result<BTreeMap<String, f64>> {
    let rows = read_jsonl(path)?;
    let mut items = Vec::new();
    for (i, v) in rows.iter().enumerate() {
        let q = field(v, path, i + 1, "question")?
            .as_str()
            .unwrap_or_default()
            .to_string();
        let a = field(v, path, i + 1, "answer")?
            .as_str()
            .unwrap_or_default()
            .to_string();
        let n = final_number(&a).ok_or_else(|| {
            anyhow::anyhow!("{}:{}: answer has no final number", path.display(), i + 1)
        })?;
        items.push((q, a, n));
    }
    let shots = if chat {
        0
    } else {
        shots.min(items.len().saturating_sub(1))
    };
    let prefix: String = items[..shots]
        .iter()
        .map(|(q, a, n)| {
            if cot {
                format!("Question: {q}\nAnswer: {a}\n\n")
            } else {
                format!("Question: {q}\nAnswer: #### {n}\n\n")
            }
        })
        .collect();
    let eval = &items[shots..];
    let eval = &eval[..limit.unwrap_or(eval.len()).min(eval.len())];
    let prompts: Vec<Prompt> = eval
        .iter()
        .map(|(q, _, _)| {
            if chat {
                let ask = if cot {
                    format!("{q} Think step by step.")
                } else {
                    q.clone()
                };
                Prompt::Chat(vec![Message::new(Role::User, ask)])
            } else {
                Prompt::Text(format!("{prefix}Question: {q}\nAnswer:"))
            }
        })
        .collect();
    // A base model writes the next few-shot question after its answer: stop there.
    let stop = if chat {
        Vec::new()
    } else {
        vec![FEW_SHOT_SEPARATOR.to_string()]
    };
    let outs = m.generate(&prompts, max_tokens, &stop)?;
    let correct = outs
        .iter()
        .zip(eval)
        .filter(|(o, (_, _, n))| {
            let text = if chat {
                o.text.as_str()
            } else {
                o.text.split(FEW_SHOT_SEPARATOR).next().unwrap_or("")
            };
            final_number(text).is_some_and(|x| (x - n).abs() < 1e-6)
        })
        .count();
    Ok(BTreeMap::from([
        ("n".into(), eval.len() as f64),
        ("accuracy".into(), correct as f64 / eval.len().max(1) as f64),
    ]))
}

/// The curriculum's RL/held-out prompts with their checkers: accuracy per family, and the
/// chat-level checks (stops at end of turn, refusal on harmful, false refusal on benign, language).
/// With `answers`, each prompt's reply and verdict is pushed there (for reading what failed).
pub fn score_curriculum(
    m: &mut dyn Evaluatee,
    path: &Path,
    limit: Option<usize>,
    max_tokens: usize,
    retrieval: Option<(
        &crate::tools::Retrieval,
        &crate::tokenizer::Tokenizer,
        usize,
    )>,
    mut answers: Option<&mut Vec<serde_json::Value>>,
) -> Result<BTreeMap<String, f64>> {
    let mut items = curriculum::load(path)?;
    items.truncate(limit.unwrap_or(items.len()));
    // With an index, each prompt gets its passages, and items that name the passage holding
    // their answer measure whether retrieval found it (recall at the number of passages).
    let mut recall: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut prompts = Vec::with_capacity(items.len());
    for item in &items {
        let Some((r, tok, context)) = retrieval else {
            prompts.push(Prompt::Chat(item.messages.clone()));
            continue;
        };
        let (grounded, passages) = r.ground(tok, &item.messages, context)?;
        if let (Some(source), Some(lang)) = (&item.source, item.lang) {
            let name = serde_json::to_value(lang)?
                .as_str()
                .unwrap_or("?")
                .to_string();
            let e = recall.entry(name).or_default();
            e.0 += 1;
            e.1 += usize::from(passages.iter().any(|p| &p.text == source));
        }
        prompts.push(Prompt::Chat(grounded));
    }
    let outs = m.generate(&prompts, max_tokens, &[])?;
    let mut tally = curriculum::Tally::default();
    for (item, o) in items.iter().zip(&outs) {
        let pass = tally.add(item, &o.text, o.stopped);
        if let Some(list) = answers.as_deref_mut() {
            list.push(serde_json::json!({
                "family": item.family, "lang": item.lang,
                "prompt": item.messages.last().map(|m| m.content.as_str()).unwrap_or_default(),
                "reply": o.text, "stopped": o.stopped, "pass": pass,
            }));
        }
    }
    let mut metrics = tally.metrics();
    let mut counts = tally.counts();
    for (lang, (n, found)) in recall {
        let name = format!("{}/{lang}", curriculum::metric::RETRIEVAL_RECALL);
        metrics.insert(name.clone(), found as f64 / n.max(1) as f64);
        counts.insert(name, (n, found));
    }
    for (name, (n, _)) in counts {
        metrics.insert(format!("{name}{COUNT_SUFFIX}"), n as f64);
    }
    Ok(metrics)
}

/// Few-shot probes (`probe`, `k`, `prompt`, `answer`): exact match of the first line of the
/// completion, per probe and k.
pub fn score_probes(
    m: &mut dyn Evaluatee,
    path: &Path,
    limit: Option<usize>,
) -> Result<BTreeMap<String, f64>> {
    let rows = read_jsonl(path)?;
    let rows = &rows[..limit.unwrap_or(rows.len()).min(rows.len())];
    let prompts: Vec<Prompt> = rows
        .iter()
        .map(|v| Prompt::Text(v["prompt"].as_str().unwrap_or_default().to_string()))
        .collect();
    let outs = m.generate(&prompts, 8, &[])?;
    let mut per: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for (v, o) in rows.iter().zip(&outs) {
        let key = format!(
            "{}/k={}",
            v["probe"].as_str().unwrap_or("?"),
            v["k"].as_u64().unwrap_or(0)
        );
        let got = o.text.lines().next().unwrap_or("").trim();
        let e = per.entry(key).or_default();
        e.0 += 1;
        e.1 += usize::from(got == v["answer"].as_str().unwrap_or_default());
    }
    Ok(per
        .into_iter()
        .map(|(k, (n, ok))| (format!("accuracy/{k}"), ok as f64 / n as f64))
        .collect())
}

/// Log-likelihoods of given continuations (`{"context", "continuation"}` per line): the natural
/// log-probability of each continuation's tokens after its context, the number a server's
/// `logprobs` sum to. Each goes to `answers` with its line; the metric is their mean.
pub fn score_loglikelihood(
    m: &mut dyn Evaluatee,
    path: &Path,
    limit: Option<usize>,
    answers: Option<&mut Vec<Value>>,
) -> Result<BTreeMap<String, f64>> {
    let rows = read_jsonl(path)?;
    let rows = &rows[..limit.unwrap_or(rows.len()).min(rows.len())];
    let mut requests = Vec::with_capacity(rows.len());
    for (i, v) in rows.iter().enumerate() {
        let text = |name: &str| -> Result<String> {
            field(v, path, i + 1, name)?
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| {
                    anyhow::anyhow!("{}:{}: \"{name}\" must be a string", path.display(), i + 1)
                })
        };
        requests.push((text("context")?, text("continuation")?));
    }
    let scores = m.loglikelihood(&requests)?;
    if let Some(answers) = answers {
        for (i, ((context, continuation), s)) in requests.iter().zip(&scores).enumerate() {
            answers.push(serde_json::json!({"line": i + 1, "context": context,
                "continuation": continuation, "loglikelihood": s}));
        }
    }
    Ok(BTreeMap::from([
        ("n".into(), scores.len() as f64),
        (
            "mean_loglikelihood".into(),
            scores.iter().sum::<f64>() / scores.len() as f64,
        ),
    ]))
}

/// Options of a `chatforge eval` run.
#[derive(Clone, Debug)]
pub struct EvalOptions {
    /// `kind:path` pairs: arc, hellaswag, mmlu, gsm8k, curriculum, probes, loglikelihood, bpb (a
    /// shard directory).
    pub tasks: Vec<String>,
    pub shots: usize,
    pub limit: Option<usize>,
    /// Ask chat models through the chat template (GSM8K); default: when the tokenizer has one.
    pub chat: Option<bool>,
    pub cot: bool,
    pub max_tokens: usize,
    pub batch_size: usize,
    /// Write every curriculum prompt's reply and verdict here (JSONL).
    pub answers: Option<std::path::PathBuf>,
    /// Curriculum prompts are answered with passages from this index, if given.
    pub retrieval: crate::tools::RetrievalArgs,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            tasks: Vec::new(),
            shots: 0,
            limit: None,
            chat: None,
            cot: false,
            max_tokens: 256,
            batch_size: 16,
            answers: None,
            retrieval: crate::tools::RetrievalArgs::default(),
        }
    }
}

/// Runs every task against a loaded model; results keyed by task spec.
pub fn run(
    lm: &crate::model::LoadedModel,
    opts: &EvalOptions,
) -> Result<BTreeMap<String, BTreeMap<String, f64>>> {
    crate::util::check_positive("--batch-size", opts.batch_size)?;
    crate::util::check_positive("--max-tokens", opts.max_tokens)?;
    if let Some(n) = opts.limit {
        crate::util::check_positive("--limit", n)?;
    }
    let mut m = model::ModelEvaluatee {
        lm,
        template: None,
        batch_size: opts.batch_size,
        truncated_prompts: 0,
        progress: indicatif::ProgressBar::hidden(),
    };
    let chat = opts
        .chat
        .unwrap_or_else(|| crate::tokenizer::chat::ChatTemplate::detect(&lm.tokenizer).is_ok());
    let retrieval = opts.retrieval.open()?;
    let context = lm.model.config.max_position_embeddings;
    let mut results = BTreeMap::new();
    let mut answers = Vec::new();
    for spec in &opts.tasks {
        m.progress = model::task_progress(spec);
        let (kind, path) = spec.split_once(':').ok_or_else(|| {
            anyhow::anyhow!("--task {spec:?}: expected KIND:FILE, e.g. arc:ARC-Easy-test.jsonl")
        })?;
        // KIND:TEST@DEV draws the few-shot examples from a dev file.
        let (path, dev) = match path.split_once('@') {
            Some((t, d)) => (Path::new(t), Some(Path::new(d))),
            None => (Path::new(path), None),
        };
        let choices =
            |load: fn(&Path) -> Result<Vec<Choice>>| -> Result<(Vec<Choice>, Option<Vec<Choice>>)> {
                Ok((load(path)?, dev.map(load).transpose()?))
            };
        let r = match kind {
            "arc" | "hellaswag" | "mmlu" => {
                let load = match kind {
                    "arc" => load_arc,
                    "hellaswag" => load_hellaswag,
                    _ => load_mmlu,
                };
                let (items, dev_items) = choices(load)?;
                score_choices(&mut m, &items, dev_items.as_deref(), opts.shots, opts.limit)?
            }
            "gsm8k" => score_gsm8k(&mut m, path, chat, opts.cot, opts.shots, opts.limit, opts.max_tokens)?,
            "curriculum" => {
                let keep = opts.answers.is_some().then_some(&mut answers);
                let r = retrieval.as_ref().map(|r| (r, &lm.tokenizer, context));
                score_curriculum(&mut m, path, opts.limit, opts.max_tokens, r, keep)?
            }
            "probes" => score_probes(&mut m, path, opts.limit)?,
            "loglikelihood" => {
                let keep = opts.answers.is_some().then_some(&mut answers);
                score_loglikelihood(&mut m, path, opts.limit, keep)?
            }
            "bpb" => {
                let seq = lm.model.config.max_position_embeddings.min(256);
                // --limit counts windows here, like items elsewhere.
                let max_tokens = opts.limit.map_or(32_768, |n| n * seq);
                let (loss, bpb) = if path.is_dir() {
                    let shards = crate::data::shards::ShardSet::open(path)?;
                    crate::train::pretrain::evaluate(&lm.model, &shards.val, lm.tokenizer.token_bytes(), opts.batch_size, seq, max_tokens)?
                } else {
                    let windows = text_windows(lm, path, seq, max_tokens)?;
                    crate::train::pretrain::evaluate_windows(&lm.model, &windows, lm.tokenizer.token_bytes(), opts.batch_size)?
                };
                BTreeMap::from([("loss".into(), loss), ("bits_per_byte".into(), bpb)])
            }
            other => bail!("unknown task kind {other:?}: use arc, hellaswag, mmlu, gsm8k, curriculum, probes, loglikelihood or bpb"),
        };
        let mut r = r;
        r.insert("truncated_prompts".into(), m.truncated_prompts as f64);
        m.truncated_prompts = 0;
        results.insert(spec.clone(), r);
        m.progress.finish_and_clear();
    }
    if let Some(file) = &opts.answers {
        let lines: Vec<String> = answers.iter().map(|a| a.to_string() + "\n").collect();
        crate::util::write_atomic(file, lines.concat().as_bytes())?;
    }
    Ok(results)
}

/// Consecutive windows of `seq + 1` tokens over a text or JSONL file, each document starting
/// with `<|bos|>` as in training.
fn text_windows(
    lm: &crate::model::LoadedModel,
    path: &Path,
    seq: usize,
    max_tokens: usize,
) -> Result<Vec<Vec<u32>>> {
    let mut stream: Vec<u32> = Vec::new();
    crate::data::text::read_documents(
        path,
        crate::data::text::DocFormat::Auto,
        "text",
        |doc, _| {
            if stream.len() <= max_tokens + seq {
                stream.extend(lm.tokenizer.bos_id());
                stream.extend(lm.tokenizer.encode(&doc)?);
            }
            Ok(())
        },
    )?;
    let windows: Vec<Vec<u32>> = stream
        .windows(seq + 1)
        .step_by(seq)
        .take(max_tokens.div_ceil(seq).max(1))
        .map(|w| w.to_vec())
        .collect();
    if windows.is_empty() {
        bail!(
            "{} has fewer than {} tokens: too short to measure bits per byte",
            path.display(),
            seq + 1
        );
    }
    Ok(windows)
}

/// A rate's count of items sits beside it under its name plus this suffix, so that every
/// report can give the rate's 95% interval ([`with_interval`]).
pub const COUNT_SUFFIX: &str = ":n";

/// The Wilson score interval at 95% for a rate `p` measured on `n` items: unlike p ± 1.96·SE it
/// stays inside [0, 1] and is not empty at 0 or 1 successes.
pub fn wilson(p: f64, n: f64) -> (f64, f64) {
    if n <= 0.0 {
        return (0.0, 1.0);
    }
    let z = 1.959_963_984_540_054_f64;
    let z2 = z * z;
    let centre = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
    let half = z / (1.0 + z2 / n) * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// `value` with its 95% interval when `n`, the number of items it counts, is known:
/// `0.367 [0.321, 0.416]`.
pub fn with_interval(value: f64, n: Option<f64>) -> String {
    match n {
        Some(n) if (0.0..=1.0).contains(&value) => {
            let (lo, hi) = wilson(value, n);
            format!("{value:.3} [{lo:.3}, {hi:.3}]")
        }
        _ => format!("{value:.4}"),
    }
}

/// Results as a Markdown table: one row per task and metric; rates carry their 95% interval.
pub fn markdown(results: &BTreeMap<String, BTreeMap<String, f64>>) -> String {
    let mut s = String::from("| task | metric | value |\n|---|---|---|\n");
    for (task, metrics) in results {
        for (k, v) in metrics.iter().filter(|(k, _)| !k.ends_with(COUNT_SUFFIX)) {
            let n = metrics.get(&format!("{k}{COUNT_SUFFIX}")).copied();
            s.push_str(&format!("| {task} | {k} | {} |\n", with_interval(*v, n)));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::model::Completion;
    use super::*;

    /// Wilson intervals at known points: 50 of 100 gives 0.404 to 0.596; none of 10 still
    /// allows up to 0.278; more items narrow the interval.
    #[test]
    fn wilson_intervals_match_known_values() {
        let close =
            |(a, b): (f64, f64), (x, y): (f64, f64)| (a - x).abs() < 5e-4 && (b - y).abs() < 5e-4;
        assert!(
            close(wilson(0.5, 100.0), (0.4038, 0.5962)),
            "{:?}",
            wilson(0.5, 100.0)
        );
        assert!(
            close(wilson(0.0, 10.0), (0.0, 0.2775)),
            "{:?}",
            wilson(0.0, 10.0)
        );
        assert!(
            close(wilson(1.0, 10.0), (0.7225, 1.0)),
            "{:?}",
            wilson(1.0, 10.0)
        );
        let (lo, hi) = wilson(0.8, 400.0);
        let (lo2, hi2) = wilson(0.8, 40.0);
        assert!(hi - lo < (hi2 - lo2) / 2.0);
    }

    /// The Markdown table shows a rate with its interval and hides the count row.
    #[test]
    fn markdown_gives_rates_their_intervals() {
        let mut m = BTreeMap::new();
        m.insert("accuracy".to_string(), 0.5);
        m.insert(format!("accuracy{COUNT_SUFFIX}"), 100.0);
        m.insert("bits_per_byte".to_string(), 1.25);
        let mut results = BTreeMap::new();
        results.insert("curriculum".to_string(), m);
        let md = markdown(&results);
        assert!(
            md.contains("| curriculum | accuracy | 0.500 [0.404, 0.596] |"),
            "{md}"
        );
        assert!(
            md.contains("| bits_per_byte | 1.2500 |") && !md.contains(":n"),
            "{md}"
        );
    }
    use crate::data::curriculum::tasks::{Family, Lang};

    /// Prefers the option " A" (or the first option) and answers every question with "A".
    struct AlwaysA;

    impl Evaluatee for AlwaysA {
        fn loglikelihood(&mut self, requests: &[(String, String)]) -> Result<Vec<f64>> {
            Ok(requests
                .iter()
                .map(|(_, c)| if c == " A" { -1.0 } else { -5.0 })
                .collect())
        }
        fn generate(
            &mut self,
            prompts: &[Prompt],
            _: usize,
            _: &[String],
        ) -> Result<Vec<Completion>> {
            Ok(prompts
                .iter()
                .map(|_| Completion {
                    text: "A".into(),
                    stopped: true,
                })
                .collect())
        }
    }

    #[test]
    fn always_a_scores_exactly_the_fraction_of_a_answers() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("mmlu.csv");
        std::fs::write(
            &p,
            "question,A,B,C,D,answer\n1+1?,2,3,4,5,A\n2+2?,3,4,5,6,B\n\"Pick, one\",x,y,z,w,A\n3+3?,5,6,7,8,B\n",
        )
        .unwrap();
        let items = load_mmlu(&p).unwrap();
        assert_eq!(items.len(), 4);
        let r = score_choices(&mut AlwaysA, &items, None, 0, None).unwrap();
        assert_eq!(r["acc"], 0.5);
        assert_eq!(r["n"], 4.0);
        // Shots from a dev split leave every test item scored; without one they use up the first.
        assert_eq!(
            score_choices(&mut AlwaysA, &items, Some(&items[..2]), 2, None).unwrap()["n"],
            4.0
        );
        let r = score_choices(&mut AlwaysA, &items, None, 1, None).unwrap();
        assert_eq!((r["n"], r["acc"]), (3.0, 1.0 / 3.0));
    }

    /// Knows the right answer only for ARC items with an even index.
    struct Oracle(Vec<usize>);

    impl Evaluatee for Oracle {
        fn loglikelihood(&mut self, requests: &[(String, String)]) -> Result<Vec<f64>> {
            // 3 options per question.
            Ok(requests
                .iter()
                .enumerate()
                .map(|(i, _)| if self.0[i / 3] == i % 3 { -1.0 } else { -2.0 })
                .collect())
        }
        fn generate(&mut self, _: &[Prompt], _: usize, _: &[String]) -> Result<Vec<Completion>> {
            unreachable!()
        }
    }

    #[test]
    fn arc_and_hellaswag_fixtures_load_and_score() {
        let dir = tempfile::tempdir().unwrap();
        let arc = dir.path().join("arc.jsonl");
        let mut lines = String::new();
        for (i, key) in ["A", "B", "C", "A"].iter().enumerate() {
            lines.push_str(&serde_json::json!({"question": {"stem": format!("q{i}"), "choices": [
                {"text": "x", "label": "A"}, {"text": "y", "label": "B"}, {"text": "z", "label": "C"}]}, "answerKey": key}).to_string());
            lines.push('\n');
        }
        std::fs::write(&arc, lines).unwrap();
        let items = load_arc(&arc).unwrap();
        assert_eq!(
            items.iter().map(|c| c.answer).collect::<Vec<_>>(),
            vec![0, 1, 2, 0]
        );
        // The oracle picks the right option for items 0 and 2 only.
        let r = score_choices(&mut Oracle(vec![0, 0, 2, 1]), &items, None, 0, None).unwrap();
        assert_eq!(r["acc"], 0.5);
        let hs = dir.path().join("hs.jsonl");
        std::fs::write(
            &hs,
            "{\"ctx\": \"A man\", \"endings\": [\"a\", \"b\"], \"label\": \"1\"}\n",
        )
        .unwrap();
        assert_eq!(load_hellaswag(&hs).unwrap()[0].answer, 1);
        std::fs::write(
            &hs,
            "{\"ctx\": \"A man\", \"endings\": [\"a\"], \"label\": 3}\n",
        )
        .unwrap();
        assert!(load_hellaswag(&hs)
            .unwrap_err()
            .to_string()
            .contains("hs.jsonl:1"));
    }

    #[test]
    fn final_numbers_follow_gsm8k_conventions() {
        assert_eq!(final_number("so 3 + 4 = 7 apples"), Some(7.0));
        assert_eq!(final_number("work... #### 1,200"), Some(1200.0));
        assert_eq!(final_number("It costs $18."), Some(18.0));
        assert_eq!(final_number("none"), None);
    }

    /// Answers GSM8K with the right number for even items and a wrong one for odd items; records
    /// the prompts it saw.
    struct Arithmetic {
        answers: Vec<i64>,
        seen: Vec<Prompt>,
    }

    impl Evaluatee for Arithmetic {
        fn loglikelihood(&mut self, _: &[(String, String)]) -> Result<Vec<f64>> {
            unreachable!()
        }
        fn generate(
            &mut self,
            prompts: &[Prompt],
            _: usize,
            _: &[String],
        ) -> Result<Vec<Completion>> {
            self.seen.extend(prompts.iter().cloned());
            Ok((0..prompts.len())
                .map(|i| {
                    let n = self.answers[self.answers.len() - prompts.len() + i];
                    let n = if i % 2 == 0 { n } else { n + 1 };
                    // A base model runs on into the next few-shot question; that part must not count.
                    Completion {
                        text: format!(" so #### {n}\n\nQuestion: what is 2+2?\nAnswer: 4"),
                        stopped: false,
                    }
                })
                .collect())
        }
    }

    #[test]
    fn gsm8k_scores_final_numbers_in_chat_and_few_shot_modes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("gsm8k.jsonl");
        let answers: Vec<i64> = (1..=5).map(|i| i * 11).collect();
        let lines: String = answers
            .iter()
            .map(|a| format!("{}\n", serde_json::json!({"question": format!("What is {a}?"), "answer": format!("It is {a}.\n#### {a}")})))
            .collect();
        std::fs::write(&p, lines).unwrap();
        let mut chat = Arithmetic {
            answers: answers.clone(),
            seen: Vec::new(),
        };
        let r = score_gsm8k(&mut chat, &p, true, true, 0, None, 64).unwrap();
        assert_eq!((r["n"], r["accuracy"]), (5.0, 3.0 / 5.0));
        assert!(
            matches!(&chat.seen[0], Prompt::Chat(m) if m[0].content.ends_with("Think step by step."))
        );
        // Base model, two shots from the start of the file: three items scored, two right.
        let mut base = Arithmetic {
            answers: answers[2..].to_vec(),
            seen: Vec::new(),
        };
        let r = score_gsm8k(&mut base, &p, false, false, 2, None, 64).unwrap();
        assert_eq!((r["n"], r["accuracy"]), (3.0, 2.0 / 3.0));
        let Prompt::Text(t) = &base.seen[0] else {
            panic!("base prompts are text")
        };
        assert!(
            t.starts_with("Question: What is 11?\nAnswer: #### 11\n\nQuestion: What is 22?"),
            "{t}"
        );
        assert!(t.ends_with("Question: What is 33?\nAnswer:"), "{t}");
    }

    /// Answers curriculum prompts with the ideal reply for even items and rudely for odd ones.
    struct HalfRight(Vec<String>);

    impl Evaluatee for HalfRight {
        fn loglikelihood(&mut self, _: &[(String, String)]) -> Result<Vec<f64>> {
            unreachable!()
        }
        fn generate(
            &mut self,
            prompts: &[Prompt],
            _: usize,
            _: &[String],
        ) -> Result<Vec<Completion>> {
            Ok((0..prompts.len())
                .map(|i| Completion {
                    text: if i % 2 == 0 {
                        self.0[i].clone()
                    } else {
                        "no idea".into()
                    },
                    stopped: i % 2 == 0,
                })
                .collect())
        }
    }

    #[test]
    fn curriculum_scoring_counts_checker_passes_and_chat_checks() {
        use crate::data::curriculum::tasks::{make, Split};
        let mut rng = crate::util::Rng::new(5);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("rl.jsonl");
        let mut lines = String::new();
        let mut best = Vec::new();
        for i in 0..20 {
            let t = make(
                Family::Arithmetic,
                if i < 10 { Lang::En } else { Lang::Zh },
                Split::Heldout,
                &mut rng,
            );
            lines.push_str(&serde_json::json!({"family": t.family, "lang": t.lang, "messages": t.prompt, "answer": t.answer}).to_string());
            lines.push('\n');
            best.push(t.replies[0].clone());
        }
        std::fs::write(&p, lines).unwrap();
        let mut answers = Vec::new();
        let r =
            score_curriculum(&mut HalfRight(best), &p, None, 50, None, Some(&mut answers)).unwrap();
        assert_eq!(r["accuracy"], 0.5);
        assert_eq!(r["stops_at_end_of_turn"], 0.5);
        assert!(
            r["language_match"] > 0.2 && r["language_match"] <= 0.5,
            "{r:?}"
        );
        // One answer record per prompt, its verdict agreeing with the accuracy.
        assert_eq!(answers.len(), 20);
        let passed = answers.iter().filter(|a| a["pass"] == true).count();
        assert_eq!(passed, 10);
        assert_eq!(answers[0]["family"], "arithmetic");
    }
}
