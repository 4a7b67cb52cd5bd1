//! `chatforge speedrun`: the whole InstructGPT recipe on the built-in curriculum in one command:
//! curriculum → tokenizer → shards → pretraining → SFT → reward model → PPO, each stage measured,
//! then `report.md`/`report.json`. Every stage leaves its output under `--out`; a rerun skips the
//! finished stages and resumes the interrupted one from its last checkpoint.
//!
//! With `--input FILE...` it instead pretrains on the user's own text (tokenizer, shards,
//! pretraining and samples).

use crate::data::curriculum::{self, CurriculumSize};
use crate::data::shards::{self, TokenizeOptions};
use crate::data::text::DocFormat;
use crate::eval::curriculum::metric;
use crate::eval::{self, EvalOptions};
use crate::infer::chat::ChatSession;
use crate::infer::generate::generate;
use crate::infer::sampler::SamplingParams;
use crate::model::{self, LlamaConfig};
use crate::rlhf::{rlhf, Algo, RlhfOptions};
use crate::tokenizer::{Tokenizer, TrainOptions};
use crate::train::pretrain::{pretrain, PretrainOptions, PretrainReport};
use crate::train::reward::{train_reward, RewardInfo, RewardOptions};
use crate::train::sft::{sft, SftOptions};
use crate::train::trainer::LoopOptions;
use crate::util;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// Every stage in under 3 minutes on 2 cores: checks the pipeline, not a useful model.
    Tiny,
    /// About half an hour on 2 cores: the best model that budget allows.
    Small,
}

/// Sizes and step counts of a preset.
#[derive(Clone, Debug, Serialize)]
pub struct PresetSpec {
    pub curriculum_scale: f64,
    pub vocab_size: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub context: usize,
    pub pretrain_steps: usize,
    pub pretrain_batch: usize,
    pub pretrain_lr: f64,
    pub sft_steps: usize,
    pub sft_batch: usize,
    pub sft_lr: f64,
    pub reward_steps: usize,
    pub reward_lr: f64,
    pub ppo_steps: usize,
    pub ppo_lr: f64,
    /// Prompts per PPO rollout batch; each gets `PPO_ANSWERS_PER_PROMPT` answers.
    pub rollout_prompts: usize,
    /// Held-out prompts per evaluation.
    pub eval_prompts: usize,
    pub max_new_tokens: usize,
}

impl Preset {
    pub fn spec(self) -> PresetSpec {
        match self {
            Preset::Tiny => PresetSpec {
                curriculum_scale: 0.1,
                vocab_size: 512,
                hidden: 96,
                intermediate: 256,
                layers: 2,
                heads: 4,
                kv_heads: 2,
                context: 192,
                pretrain_steps: 250,
                pretrain_batch: 8,
                pretrain_lr: 5e-3,
                sft_steps: 250,
                sft_batch: 8,
                sft_lr: 3e-3,
                reward_steps: 80,
                reward_lr: 1e-3,
                ppo_steps: 16,
                ppo_lr: 3e-5,
                rollout_prompts: 4,
                eval_prompts: 32,
                max_new_tokens: 48,
            },
            Preset::Small => PresetSpec {
                curriculum_scale: 2.0,
                vocab_size: 2048,
                hidden: 256,
                intermediate: 704,
                layers: 6,
                heads: 8,
                kv_heads: 4,
                context: 256,
                pretrain_steps: 1200,
                pretrain_batch: 16,
                pretrain_lr: 3e-3,
                sft_steps: 500,
                sft_batch: 16,
                sft_lr: 1e-3,
                reward_steps: 300,
                reward_lr: 3e-4,
                ppo_steps: 120,
                ppo_lr: 3e-5,
                rollout_prompts: 16,
                eval_prompts: 128,
                max_new_tokens: 96,
            },
        }
    }
}

#[derive(Clone, Debug)]
pub struct SpeedrunOptions {
    pub out: PathBuf,
    pub preset: Preset,
    pub seed: u64,
    /// Pretrain on these text files instead of running the curriculum pipeline.
    pub inputs: Vec<PathBuf>,
    pub vocab_size: usize,
    pub format: DocFormat,
    /// Settings of the text-file mode's pretraining.
    pub pretrain: PretrainOptions,
    pub prompt: String,
    pub quiet: bool,
}

impl Default for SpeedrunOptions {
    fn default() -> Self {
        SpeedrunOptions {
            out: PathBuf::from("runs/speedrun"),
            preset: Preset::Small,
            seed: LoopOptions::default().seed,
            inputs: Vec::new(),
            vocab_size: crate::tokenizer::TrainOptions::default().vocab_size,
            format: DocFormat::Auto,
            // bf16 where the CPU has AMX: what fits the small preset in its half hour.
            pretrain: PretrainOptions {
                train: LoopOptions {
                    precision: crate::train::Precision::Auto,
                    ..Default::default()
                },
                ..Default::default()
            },
            prompt: String::new(),
            quiet: false,
        }
    }
}

/// What one stage took, kept in `stages.json` so a resumed run still reports every stage.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StageTime {
    pub seconds: f64,
    pub tokens_per_second: Option<f64>,
    /// The process's peak resident memory when the stage ended (stages share one process, so
    /// this is the largest of this stage and the earlier ones run by the same invocation).
    #[serde(default)]
    pub peak_rss_mb: Option<f64>,
}

struct Pipeline<'a> {
    opts: &'a SpeedrunOptions,
    spec: PresetSpec,
    times: BTreeMap<String, StageTime>,
    stage_no: usize,
}

const STAGE_NAMES: [&str; 9] = [
    "curriculum",
    "tokenizer",
    "shards",
    "pretrain",
    "eval base",
    "sft",
    "eval sft",
    "reward",
    "rlhf (ppo)",
];
const STAGES: usize = STAGE_NAMES.len();
/// Sampled answers per PPO prompt (the leave-one-out baseline's group).
const PPO_ANSWERS_PER_PROMPT: usize = 4;

impl Pipeline<'_> {
    fn path(&self, name: &str) -> PathBuf {
        self.opts.out.join(name)
    }

    fn data(&self, name: &str) -> PathBuf {
        self.opts.out.join("data").join(name)
    }

    /// Runs `work` unless `done` exists already; records its time and rate.
    fn stage(
        &mut self,
        name: &str,
        done: &Path,
        work: impl FnOnce(&Self) -> Result<Option<f64>>,
    ) -> Result<()> {
        self.stage_no += 1;
        if done.exists() {
            eprintln!(
                "[{}/{STAGES}] {name}: done already ({})",
                self.stage_no,
                done.display()
            );
            return Ok(());
        }
        eprintln!("[{}/{STAGES}] {name}", self.stage_no);
        let start = Instant::now();
        let tps = work(self).with_context(|| format!("speedrun stage {name}"))?;
        let t = StageTime {
            seconds: start.elapsed().as_secs_f64(),
            tokens_per_second: tps,
            peak_rss_mb: Some(util::peak_rss_mb()),
        };
        eprintln!("      {name} took {:.1}s", t.seconds);
        self.times.insert(name.to_string(), t);
        util::write_json_atomic(&self.path("stages.json"), &self.times)
    }

    fn loop_options(&self, steps: usize, lr: f64, warmup: usize, evals: usize) -> LoopOptions {
        LoopOptions {
            steps,
            lr,
            warmup_steps: warmup,
            eval_every: (steps / evals.max(1)).max(1),
            checkpoint_every: (steps / 4).max(10),
            keep_checkpoints: 1,
            seed: self.opts.seed,
            // `--precision` reaches every training stage (evaluation stays f32).
            precision: self.opts.pretrain.train.precision,
            resume: true,
            quiet: self.opts.quiet,
            ..Default::default()
        }
    }

    /// Curriculum, few-shot and (for the base model) bits-per-byte evaluation of one model.
    /// Every curriculum reply and verdict goes to `answers` (JSONL).
    fn evaluate(
        &self,
        run: &Path,
        answers: &Path,
    ) -> Result<BTreeMap<String, BTreeMap<String, f64>>> {
        let lm = model::load(run, &candle_core::Device::Cpu)?;
        if let Some(dir) = answers.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut tasks = vec![
            format!(
                "curriculum:{}",
                self.data("rl_prompts_heldout.jsonl").display()
            ),
            format!("probes:{}", self.data("fewshot_probes.jsonl").display()),
        ];
        tasks.push(format!("bpb:{}", self.path("shards").display()));
        let results = eval::run(
            &lm,
            &EvalOptions {
                tasks,
                shots: 0,
                limit: None,
                chat: Some(true),
                cot: false,
                max_tokens: self.spec.max_new_tokens,
                batch_size: 16,
                answers: Some(answers.to_path_buf()),
            },
        )?;
        // Short keys: the files are the same for every stage.
        Ok(results
            .into_iter()
            .map(|(k, v)| (k.split(':').next().unwrap_or(&k).to_string(), v))
            .collect())
    }
}

fn write_eval(path: &Path, results: &BTreeMap<String, BTreeMap<String, f64>>) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    util::write_json_atomic(path, results)
}

/// Runs the curriculum pipeline (or the text-file mode) and writes the report; returns its path.
pub fn speedrun(opts: &SpeedrunOptions) -> Result<PathBuf> {
    if !opts.inputs.is_empty() {
        speedrun_text(opts)?;
        return Ok(opts.out.join("base"));
    }
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("cannot create {}", opts.out.display()))?;
    let spec = opts.preset.spec();
    let times = util::read_json(&opts.out.join("stages.json")).unwrap_or_default();
    let mut p = Pipeline {
        opts,
        spec,
        times,
        stage_no: 0,
    };
    let data_dir = p.path("data");
    p.stage("curriculum", &data_dir.join("manifest.json"), |p| {
        let c = curriculum::generate(
            &data_dir,
            p.opts.seed,
            &CurriculumSize::scaled(p.spec.curriculum_scale),
        )?;
        eprintln!("      {}", serde_json::to_string(&c)?);
        Ok(None)
    })?;
    let tok_dir = p.path("tokenizer");
    p.stage("tokenizer", &tok_dir.join("tokenizer.json"), |p| {
        let (tok, r) = Tokenizer::train_on_files(
            &[p.data("pretrain_train.txt")],
            DocFormat::Paragraphs,
            "text",
            &TrainOptions {
                vocab_size: p.spec.vocab_size,
                ..Default::default()
            },
        )?;
        tok.save(&tok_dir)?;
        eprintln!(
            "      {} merges, vocab {} in {:.1}s",
            r.merges, r.vocab_size, r.seconds
        );
        Ok(None)
    })?;
    let shard_dir = p.path("shards");
    p.stage("shards", &shard_dir.join("meta.json"), |p| {
        let tok = Tokenizer::load(&tok_dir)?;
        let meta = shards::tokenize_files(
            &tok,
            &[p.data("pretrain_train.txt")],
            &shard_dir,
            &TokenizeOptions {
                format: DocFormat::Paragraphs,
                seed: p.opts.seed,
                ..Default::default()
            },
        )?;
        eprintln!(
            "      {} train / {} val tokens",
            meta.train.tokens, meta.val.tokens
        );
        Ok(None)
    })?;
    let base = p.path("base");
    p.stage("pretrain", &base.join("report.json"), |p| {
        let tok = Tokenizer::load(&tok_dir)?;
        let s = &p.spec;
        let mut config = LlamaConfig::small(tok.vocab_size(), s.context);
        config.hidden_size = s.hidden;
        config.intermediate_size = s.intermediate;
        config.num_hidden_layers = s.layers;
        config.num_attention_heads = s.heads;
        config.num_key_value_heads = Some(s.kv_heads);
        let config_path = p.path("model_config.json");
        util::write_json_atomic(&config_path, &config)?;
        let r = pretrain(&PretrainOptions {
            data: shard_dir.clone(),
            out: base.clone(),
            config: Some(config_path),
            batch_size: s.pretrain_batch,
            seq_len: s.context,
            eval_tokens: 16_384,
            train: p.loop_options(s.pretrain_steps, s.pretrain_lr, s.pretrain_steps / 10, 4),
        })?;
        Ok(Some(r.tokens_per_second))
    })?;
    p.stage("eval base", &p.path("eval/base.json"), |p| {
        write_eval(
            &p.path("eval/base.json"),
            &p.evaluate(&base, &p.path("eval/base_answers.jsonl"))?,
        )?;
        Ok(None)
    })?;
    let sft_dir = p.path("sft");
    p.stage("sft", &sft_dir.join("report.json"), |p| {
        let s = &p.spec;
        let r = sft(&SftOptions {
            base: base.clone(),
            data: vec![p.data("sft_train.jsonl")],
            val_data: vec![p.data("sft_heldout.jsonl")],
            out: sft_dir.clone(),
            batch_size: s.sft_batch,
            mix_pretrain: Some(shard_dir.clone()),
            mix_fraction: 0.1,
            train: p.loop_options(s.sft_steps, s.sft_lr, s.sft_steps / 15, 4),
            ..Default::default()
        })?;
        Ok(Some(r.tokens_per_second))
    })?;
    p.stage("eval sft", &p.path("eval/sft.json"), |p| {
        write_eval(
            &p.path("eval/sft.json"),
            &p.evaluate(&sft_dir, &p.path("eval/sft_answers.jsonl"))?,
        )?;
        Ok(None)
    })?;
    let rm_dir = p.path("reward");
    p.stage("reward", &rm_dir.join("reward.json"), |p| {
        let s = &p.spec;
        let r = train_reward(&RewardOptions {
            base: sft_dir.clone(),
            data: vec![p.data("prefs_rankings_train.jsonl")],
            val_data: vec![p.data("prefs_rankings_heldout.jsonl")],
            out: rm_dir.clone(),
            batch_size: 8,
            norm_prompts: Some(p.data("rl_prompts_train.jsonl")),
            norm_samples: 64,
            train: LoopOptions {
                weight_decay: 0.0,
                ..p.loop_options(s.reward_steps, s.reward_lr, s.reward_steps / 10, 4)
            },
            ..Default::default()
        })?;
        Ok(Some(r.tokens_per_second))
    })?;
    let rl_dir = p.path("rlhf");
    p.stage("rlhf (ppo)", &rl_dir.join("rlhf_report.json"), |p| {
        let s = &p.spec;
        let r = rlhf(&RlhfOptions {
            algo: Algo::Ppo,
            policy: sft_dir.clone(),
            reward: Some(rm_dir.clone()),
            prompts: Some(p.data("rl_prompts_train.jsonl")),
            eval_prompts: Some(p.data("rl_prompts_heldout.jsonl")),
            out: rl_dir.clone(),
            rollout_prompts: s.rollout_prompts,
            // Scoring each answer against the other answers to its prompt removes how easy the
            // prompt is from the advantage; with one answer per prompt PPO traded checker accuracy
            // for reward on the small preset (0.289 -> 0.242), with four it did not.
            prompt_baseline: true,
            group_size: PPO_ANSWERS_PER_PROMPT,
            minibatch: 16,
            max_new_tokens: s.max_new_tokens,
            eval_samples: s.eval_prompts,
            train: LoopOptions {
                weight_decay: 0.0,
                log_every: 1,
                ..p.loop_options(s.ppo_steps, s.ppo_lr, 2, 2)
            },
            ..Default::default()
        })?;
        util::write_json_atomic(&rl_dir.join("rlhf_report.json"), &r)?;
        Ok(Some(r.tokens_per_second))
    })?;
    // Evaluating RLHF is cheap next to training it; it is redone when missing.
    let rl_eval = p.path("eval/rlhf.json");
    if !rl_eval.exists() {
        eprintln!("      evaluating the RLHF model");
        write_eval(
            &rl_eval,
            &p.evaluate(&rl_dir, &p.path("eval/rlhf_answers.jsonl"))?,
        )?;
    }
    let report = write_report(&p)?;
    if let Err(e) = eval::report::report(&rl_dir) {
        eprintln!("(no per-stage report: {e:#})");
    }
    eprintln!(
        "\nreport: {}\nnext: chatforge chat --model {}",
        report.display(),
        rl_dir.display()
    );
    Ok(report)
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
const ROWS: [(&str, &str, &str); 14] = [
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

fn write_report(p: &Pipeline) -> Result<PathBuf> {
    let evals: Vec<(&str, Value)> = ["base", "sft", "rlhf"]
        .iter()
        .map(|s| (*s, read_value(&p.path(&format!("eval/{s}.json")))))
        .collect();
    let rl: Value = read_value(&p.path("rlhf/rlhf_report.json"));
    let rm: RewardInfo = util::read_json(&p.path("reward/reward.json")).unwrap_or_default();
    let meta: Value = read_value(&p.path("shards/meta.json"));
    let mut md = format!(
        "# chatforge speedrun ({:?} preset, seed {})\n\n",
        p.opts.preset, p.opts.seed
    );
    md.push_str(
        "## Stages\n\n| stage | seconds | tokens/s | peak RSS MB so far |\n|---|---|---|---|\n",
    );
    let total: f64 = p.times.values().map(|t| t.seconds).sum();
    for name in STAGE_NAMES {
        let Some(t) = p.times.get(name) else {
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
    md.push_str("## Before and after (held-out prompts, greedy)\n\n| metric | base | SFT | RLHF |\n|---|---|---|---|\n");
    let get = |e: &Value, task: &str, k: &str| e[task][k].as_f64();
    for (label, task, key) in ROWS {
        let _ = write!(md, "| {label} |");
        for (_, e) in &evals {
            let _ = write!(md, " {} |", fmt(get(e, task, key)));
        }
        md.push('\n');
    }
    let _ = writeln!(
        md,
        "| held-out loss, nats/token (unigram baseline {}) | {} | {} | {} |",
        fmt(meta["unigram_val_nats"].as_f64()),
        fmt(get(&evals[0].1, "bpb", "loss")),
        fmt(get(&evals[1].1, "bpb", "loss")),
        fmt(get(&evals[2].1, "bpb", "loss")),
    );
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
    for k in [
        "reward",
        metric::ACCURACY,
        "kl",
        metric::REFUSAL,
        metric::FALSE_REFUSAL,
        metric::STOPS,
        "length",
    ] {
        let _ = writeln!(
            md,
            "| {k} | {} | {} |",
            fmt(rl["eval_before"][k].as_f64()),
            fmt(rl["eval_after"][k].as_f64())
        );
    }
    let _ = writeln!(
        md,
        "\nPolicy, frozen reference, reward model and value head held together: peak RSS {:.0} MB. Prompts cut to fit the context: {}. Steps skipped for a non-finite loss: {}.",
        rl["peak_rss_mb"].as_f64().unwrap_or(f64::NAN),
        rl["truncated_prompts"].as_u64().unwrap_or(0),
        rl["skipped_steps"].as_u64().unwrap_or(0)
    );
    md.push_str("\n## Few-shot probes (in-context learning)\n\n| probe | base | SFT | RLHF |\n|---|---|---|---|\n");
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
        for (_, e) in &evals {
            let _ = write!(md, " {} |", fmt(get(e, "probes", k)));
        }
        md.push('\n');
    }
    md.push_str("\n## Stories from the base model (temperature 0.8, seed 1)\n\n");
    let stories = story_samples(&p.path("base"))?;
    for (prompt, text) in &stories {
        let _ = writeln!(md, "```text\n{prompt}{text}\n```\n");
    }
    md.push_str("\n## Samples from the final model (greedy)\n\n");
    let samples = chat_samples(&p.path("rlhf"))?;
    for (q, a) in &samples {
        let _ = writeln!(md, "**User:** {q}\n\n**Assistant:** {a}\n");
    }
    let _ = writeln!(
        md,
        "Loss curves and per-stage settings: [rlhf/report.md](rlhf/report.md). Every held-out prompt with each stage's reply and the checker's verdict: `eval/{{base,sft,rlhf}}_answers.jsonl`. Talk to it: `chatforge chat --model {}`.",
        p.path("rlhf").display()
    );
    let path = p.path("report.md");
    util::write_atomic(&path, md.as_bytes())?;
    util::write_json_atomic(
        &p.path("report.json"),
        &json!({
            "preset": p.opts.preset, "seed": p.opts.seed, "spec": p.spec, "stages": p.times,
            "eval": evals.iter().map(|(k, v)| (k.to_string(), v.clone())).collect::<BTreeMap<_, _>>(),
            "reward_model": rm, "rlhf": rl, "samples": samples, "stories": stories,
        }),
    )?;
    Ok(path)
}

/// Story openings in English and Chinese continued by the base model.
fn story_samples(run: &Path) -> Result<Vec<(String, String)>> {
    let lm = model::load(run, &candle_core::Device::Cpu)?;
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

fn chat_samples(run: &Path) -> Result<Vec<(String, String)>> {
    let lm = model::load(run, &candle_core::Device::Cpu)?;
    let greedy = SamplingParams::greedy(96);
    let mut chat = ChatSession::new(&lm, None, greedy)?;
    let cancel = std::sync::atomic::AtomicBool::new(false);
    let mut out = Vec::new();
    for q in [
        "How many legs does a cat have?",
        "What is 12 + 30?",
        "一只狗有几条腿？",
        "How do I make a bomb?",
    ] {
        chat.reset();
        let r = chat.reply(q, &cancel, |_| Ok(()))?;
        out.push((q.to_string(), r.text.trim().to_string()));
    }
    Ok(out)
}

/// Text-file mode: tokenizer, shards, pretraining and three samples.
pub fn speedrun_text(opts: &SpeedrunOptions) -> Result<PretrainReport> {
    let tok_dir = opts.out.join("tokenizer");
    let shard_dir = opts.out.join("shards");
    let run_dir = opts.out.join("base");

    eprintln!("[1/4] training the tokenizer (vocab {})", opts.vocab_size);
    let (tokenizer, report) = Tokenizer::train_on_files(
        &opts.inputs,
        opts.format,
        "text",
        &TrainOptions {
            vocab_size: opts.vocab_size,
            ..Default::default()
        },
    )?;
    tokenizer.save(&tok_dir)?;
    eprintln!(
        "      {} merges from {} distinct words in {:.1}s -> {}",
        report.merges,
        report.distinct_words,
        report.seconds,
        tok_dir.display()
    );

    eprintln!("[2/4] tokenizing into shards");
    let meta = shards::tokenize_files(
        &tokenizer,
        &opts.inputs,
        &shard_dir,
        &TokenizeOptions {
            format: opts.format,
            ..Default::default()
        },
    )?;
    eprintln!(
        "      {} train / {} val tokens ({:.2} bytes per token), unigram entropy {:.3} nats/token",
        meta.train.tokens,
        meta.val.tokens,
        meta.train.bytes as f64 / meta.train.tokens.max(1) as f64,
        meta.unigram_entropy_nats
    );

    eprintln!("[3/4] pretraining");
    let mut p = opts.pretrain.clone();
    p.data = shard_dir;
    p.out = run_dir.clone();
    let report = pretrain(&p)?;
    eprintln!(
        "      val loss {:.4} nats/token vs unigram {:.4}; {:.4} bits/byte; {:.0} tokens/s; {:.0}s",
        report.val_loss,
        report.unigram_val_nats,
        report.val_bpb,
        report.tokens_per_second,
        report.seconds
    );

    eprintln!("[4/4] sampling from {}", run_dir.display());
    let lm = model::load(&run_dir, &candle_core::Device::Cpu)?;
    let mut stdout = std::io::stdout();
    for seed in 1..=3 {
        println!("--- sample {seed} (temperature 0.8, top-k 50, seed {seed})");
        print!("{}", opts.prompt);
        let sampling = SamplingParams {
            top_k: 50,
            seed,
            max_tokens: 120,
            ..SamplingParams::DEFAULT
        };
        generate(&lm, &opts.prompt, &sampling, |piece| {
            print!("{piece}");
            stdout.flush()?;
            Ok(())
        })?;
        println!();
    }
    eprintln!(
        "\nnext: chatforge generate --model {} --prompt \"...\"",
        run_dir.display()
    );
    Ok(report)
}
