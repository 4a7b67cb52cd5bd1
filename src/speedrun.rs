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
use crate::eval::{self, EvalOptions};
use crate::infer::generate::generate;
use crate::infer::sampler::SamplingParams;
use crate::model::switches::ArchSwitches;
use crate::model::{self, LlamaConfig};
use crate::rlhf::{rlhf, Algo, RewardSource, RlhfOptions};
use crate::tokenizer::{Tokenizer, TrainOptions};
use crate::train::pretrain::{pretrain, PretrainOptions};
use crate::train::reward::{train_reward, RewardOptions};
use crate::train::sft::{sft, SftOptions};
use crate::train::trainer::LoopOptions;
use crate::util;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeMap;
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
    /// The architecture switches the preset's measurements chose (the command line's win).
    pub switches: ArchSwitches,
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
    /// GRPO steps with the checker as reward, on the sums and chicken-and-rabbit prompts.
    pub checker_rl_steps: usize,
    pub checker_rl_lr: f64,
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
                switches: ArchSwitches::default(),
                pretrain_steps: 350,
                pretrain_batch: 8,
                pretrain_lr: 5e-3,
                sft_steps: 250,
                sft_batch: 8,
                sft_lr: 3e-3,
                reward_steps: 80,
                reward_lr: 1e-3,
                ppo_steps: 16,
                ppo_lr: 3e-5,
                checker_rl_steps: 8,
                checker_rl_lr: 3e-5,
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
                switches: ArchSwitches::default(),
                pretrain_steps: 1100,
                pretrain_batch: 16,
                pretrain_lr: 3e-3,
                sft_steps: 500,
                sft_batch: 16,
                sft_lr: 1e-3,
                // Padding each length group only to its own longest row halved the reward
                // model's step; 450 steps at 5e-4 rank 0.887 of held-out pairs where 300 at 3e-4
                // ranked 0.857 (same SFT model and rankings, seed 1337).
                reward_steps: 450,
                reward_lr: 5e-4,
                ppo_steps: 120,
                ppo_lr: 3e-5,
                checker_rl_steps: 120,
                checker_rl_lr: 3e-5,
                rollout_prompts: 16,
                eval_prompts: 128,
                // The longest reference reply is 101 tokens (an English chicken-and-rabbit
                // solution with its four calculator calls); a test keeps this above it.
                max_new_tokens: 128,
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
            pretrain: PretrainOptions::default(),
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
    /// The stages this run has (the curriculum's or the text mode's), for "[n/N]".
    stages: usize,
}

const STAGE_NAMES: [&str; 10] = [
    "curriculum",
    "tokenizer",
    "shards",
    "pretrain",
    "eval base",
    "sft",
    "eval sft",
    "reward",
    "rlhf (ppo)",
    "rl (checker)",
];
/// The `--input` text mode: the first half of the recipe on the user's own files.
const TEXT_STAGE_NAMES: [&str; 4] = ["tokenizer", "shards", "pretrain", "samples"];
/// Sampled answers per PPO prompt (the leave-one-out baseline's group).
const PPO_ANSWERS_PER_PROMPT: usize = 4;
/// The curriculum families whose answers a checker verifies exactly: the verifiable-reward stage
/// trains on these.
const CHECKED_FAMILIES: [&str; 4] = [
    "arithmetic",
    "arithmetic_steps",
    "chicken_rabbit",
    "chicken_rabbit_direct",
];

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
                "[{}/{}] {name}: done already ({})",
                self.stage_no,
                self.stages,
                done.display()
            );
            return Ok(());
        }
        eprintln!("[{}/{}] {name}", self.stage_no, self.stages);
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
            // `--precision` and `--schedule` reach every training stage (evaluation stays f32).
            precision: self.opts.pretrain.train.precision,
            schedule: self.opts.pretrain.train.schedule,
            resume: true,
            quiet: self.opts.quiet,
            ..Default::default()
        }
    }

    /// The settings both RL stages share: rollouts of `PPO_ANSWERS_PER_PROMPT` answers to the
    /// preset's prompts per batch, held-out measurement, no weight decay.
    fn rl_options(&self, out: &Path, steps: usize, lr: f64) -> RlhfOptions {
        let s = &self.spec;
        RlhfOptions {
            out: out.to_path_buf(),
            rollout_prompts: s.rollout_prompts,
            group_size: PPO_ANSWERS_PER_PROMPT,
            minibatch: 16,
            max_new_tokens: s.max_new_tokens,
            eval_samples: s.eval_prompts,
            train: LoopOptions {
                weight_decay: 0.0,
                log_every: 1,
                ..self.loop_options(steps, lr, 2, 2)
            },
            ..Default::default()
        }
    }

    /// Evaluates `run` into `eval/NAME.json` (and its answers) unless that exists: evaluating
    /// an RL stage is cheap next to training it.
    fn evaluate_once(&self, what: &str, run: &Path, name: &str, with_index: bool) -> Result<()> {
        let path = self.path(&format!("eval/{name}.json"));
        if path.exists() {
            return Ok(());
        }
        eprintln!("      evaluating {what}");
        let answers = self.path(&format!("eval/{name}_answers.jsonl"));
        write_eval(&path, &self.evaluate(run, &answers, with_index)?)
    }

    /// Curriculum, few-shot and (for the base model) bits-per-byte evaluation of one model.
    /// Every curriculum reply and verdict goes to `answers` (JSONL).
    /// With `with_index`, only the curriculum prompts, answered with passages from `index/`.
    fn evaluate(
        &self,
        run: &Path,
        answers: &Path,
        with_index: bool,
    ) -> Result<BTreeMap<String, BTreeMap<String, f64>>> {
        let lm = model::load(run, &candle_core::Device::Cpu)?;
        if let Some(dir) = answers.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut tasks = vec![format!(
            "curriculum:{}",
            self.data("rl_prompts_heldout.jsonl").display()
        )];
        if !with_index {
            tasks.push(format!(
                "probes:{}",
                self.data("fewshot_probes.jsonl").display()
            ));
            tasks.push(format!("bpb:{}", self.path("shards").display()));
        }
        let results = eval::run(
            &lm,
            &EvalOptions {
                tasks,
                shots: 0,
                limit: None,
                chat: Some(true),
                cot: false,
                max_tokens: self.spec.max_new_tokens,
                // Each batch decodes until its longest reply ends; 64 rows share those steps
                // (the small preset's SFT model: 12 s against 16 rows' 18 s, the same replies).
                batch_size: 64,
                answers: Some(answers.to_path_buf()),
                retrieval: crate::tools::RetrievalArgs {
                    index: with_index.then(|| self.path("index")),
                    ..Default::default()
                },
            },
        )?;
        // Short keys: the files are the same for every stage.
        Ok(results
            .into_iter()
            .map(|(k, v)| (k.split(':').next().unwrap_or(&k).to_string(), v))
            .collect())
    }
}

/// The speedrun's tokenizer: byte-level BPE trained on the curriculum's pretraining text.
fn curriculum_tokenizer(
    data_dir: &Path,
    vocab_size: usize,
) -> Result<(Tokenizer, crate::tokenizer::TrainReport)> {
    Tokenizer::train_on_files(
        &[data_dir.join("pretrain_train.txt")],
        DocFormat::Paragraphs,
        "text",
        &TrainOptions {
            vocab_size,
            ..Default::default()
        },
    )
}

/// The longest assistant reply of a chat file in tokens, its end-of-turn token included. The
/// answer budget of rollouts and evaluation must cover it, or a right answer is cut short and
/// scored wrong (at 96 tokens half the English chicken-and-rabbit solutions were).
pub fn longest_reply_tokens(tok: &Tokenizer, chats: &Path) -> Result<usize> {
    use crate::data::chat::{read_chat_file, ChatFormat};
    use crate::tokenizer::chat::Role;
    let mut longest = 0;
    for conversation in read_chat_file(chats, ChatFormat::Messages)?.conversations {
        for m in conversation.iter().filter(|m| m.role == Role::Assistant) {
            longest = longest.max(tok.encode(&m.content)?.len() + 1);
        }
    }
    Ok(longest)
}

fn write_eval(path: &Path, results: &BTreeMap<String, BTreeMap<String, f64>>) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    util::write_json_atomic(path, results)
}

/// Runs the curriculum pipeline (or the text-file mode) and writes the report; returns its path.
pub fn speedrun(opts: &SpeedrunOptions) -> Result<PathBuf> {
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("cannot create {}", opts.out.display()))?;
    let text_mode = !opts.inputs.is_empty();
    let mut p = Pipeline {
        opts,
        spec: opts.preset.spec(),
        times: util::read_json(&opts.out.join("stages.json")).unwrap_or_default(),
        stage_no: 0,
        stages: if text_mode {
            TEXT_STAGE_NAMES.len()
        } else {
            STAGE_NAMES.len()
        },
    };
    if text_mode {
        speedrun_text(&mut p)?;
        return Ok(opts.out.join("base"));
    }
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
    // The knowledge base's index, for the evaluation with retrieval: a second or less, so it is
    // no stage of its own. Built into a temporary folder and renamed, so it is whole or absent.
    let index_dir = p.path("index");
    if !index_dir.exists() {
        let tmp = p.path("index.partial");
        let _ = std::fs::remove_dir_all(&tmp);
        let mut index = crate::tools::index::DocumentIndex::open_or_create(&tmp)?;
        index.add(
            &[p.data(curriculum::KNOWLEDGE_FILE)],
            &crate::data::text::ReadOptions::default(),
        )?;
        drop(index);
        std::fs::rename(&tmp, &index_dir)?;
    }
    let tok_dir = p.path("tokenizer");
    p.stage("tokenizer", &tok_dir.join("tokenizer.json"), |p| {
        let (tok, r) = curriculum_tokenizer(&data_dir, p.spec.vocab_size)?;
        tok.save(&tok_dir)?;
        eprintln!(
            "      {} merges, vocab {} in {:.1}s",
            r.merges, r.vocab_size, r.seconds
        );
        let longest = longest_reply_tokens(&tok, &p.data("sft_train.jsonl"))?;
        let budget = p.spec.max_new_tokens;
        eprintln!(
            "      answers get {budget} new tokens; the longest reference reply has {longest}"
        );
        if longest > budget {
            eprintln!(
                "      warning: replies longer than {budget} tokens are cut and scored wrong"
            );
        }
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
        let switches = s.switches.merged(&p.opts.pretrain.switches);
        switches.apply(&mut config, "the preset's model")?;
        let config_path = p.path("model_config.json");
        util::write_json_atomic(&config_path, &config)?;
        let r = pretrain(&PretrainOptions {
            data: shard_dir.clone(),
            out: base.clone(),
            config: Some(config_path),
            batch_size: s.pretrain_batch,
            seq_len: s.context,
            eval_tokens: 16_384,
            switches,
            train: LoopOptions {
                // Muon, when asked, for pretraining only: its rate is not on the fine-tuning
                // stages' scale.
                optimizer: p.opts.pretrain.train.optimizer,
                muon_lr: p.opts.pretrain.train.muon_lr,
                ..p.loop_options(s.pretrain_steps, s.pretrain_lr, s.pretrain_steps / 10, 4)
            },
        })?;
        Ok(Some(r.tokens_per_second))
    })?;
    p.stage("eval base", &p.path("eval/base.json"), |p| {
        write_eval(
            &p.path("eval/base.json"),
            &p.evaluate(&base, &p.path("eval/base_answers.jsonl"), false)?,
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
            // Held-out loss at the start, the middle and the end: each pass over the 2,600
            // held-out conversations costs as much as 40 training steps.
            train: p.loop_options(s.sft_steps, s.sft_lr, s.sft_steps / 15, 2),
            ..Default::default()
        })?;
        Ok(Some(r.tokens_per_second))
    })?;
    p.stage("eval sft", &p.path("eval/sft.json"), |p| {
        write_eval(
            &p.path("eval/sft.json"),
            &p.evaluate(&sft_dir, &p.path("eval/sft_answers.jsonl"), false)?,
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
                ..p.loop_options(s.reward_steps, s.reward_lr, s.reward_steps / 10, 2)
            },
            ..Default::default()
        })?;
        Ok(Some(r.tokens_per_second))
    })?;
    let rl_dir = p.path("rlhf");
    let rlvr_dir = p.path("rlvr");
    // The checker stage starts from PPO's model: when PPO runs again, so does everything after it.
    let ppo_reruns = !rl_dir.join("rlhf_report.json").exists();
    if ppo_reruns {
        for stale in ["rlhf", "rlvr", "final_index"].map(|n| p.path(&format!("eval/{n}.json"))) {
            if stale.exists() {
                std::fs::remove_file(&stale)?;
            }
        }
        if rlvr_dir.exists() {
            std::fs::remove_dir_all(&rlvr_dir)?;
        }
    }
    p.stage("rlhf (ppo)", &rl_dir.join("rlhf_report.json"), |p| {
        let s = &p.spec;
        let r = rlhf(&RlhfOptions {
            algo: Algo::Ppo,
            policy: sft_dir.clone(),
            reward: Some(rm_dir.clone()),
            prompts: Some(p.data("rl_prompts_train.jsonl")),
            eval_prompts: Some(p.data("rl_prompts_heldout.jsonl")),
            // Scoring each answer against the other answers to its prompt removes how easy the
            // prompt is from the advantage; with one answer per prompt PPO traded checker accuracy
            // for reward on the small preset (0.289 -> 0.242), with four it did not.
            prompt_baseline: true,
            // With that baseline a value head added nothing but noise: its explained variance
            // stayed below 0 on both seeds. Without it (and without centring the advantages),
            // from the same seed-2 models, PPO raised harmful-request refusals (+19 −4) and
            // left false refusals alone (+7 −11), where with it both rose (+19 −6, +13 −3).
            critic: false,
            // One pass over each rollout, not two: with two, PPO's own sampling seed decided
            // whether it found answers to look-alikes that the reward model scored above a
            // refusal of a harmful request (from one SFT and reward model, seeds 1337, 3 and 2:
            // refusals +18 −1, +29 −0 and +2 −14). With one: +28 −0 and +20 −0 on seeds 2 and
            // 3, and look-alike refusals not significantly changed.
            epochs: 1,
            ..p.rl_options(&rl_dir, s.ppo_steps, s.ppo_lr)
        })?;
        util::write_json_atomic(&rl_dir.join("rlhf_report.json"), &r)?;
        Ok(Some(r.tokens_per_second))
    })?;
    p.evaluate_once("the RLHF model", &rl_dir, "rlhf", false)?;
    // Verifiable rewards, as nanochat does on GSM8K: GRPO from the PPO model on the sums and
    // chicken-and-rabbit prompts, rewarded by the curriculum's checker alone.
    p.stage("rl (checker)", &rlvr_dir.join("rlhf_report.json"), |p| {
        let s = &p.spec;
        let prompts = |split: &str| -> Result<PathBuf> {
            let out = p.data(&format!("rl_checked_{split}.jsonl"));
            keep_families(
                &p.data(&format!("rl_prompts_{split}.jsonl")),
                &out,
                &CHECKED_FAMILIES,
            )?;
            Ok(out)
        };
        let r = rlhf(&RlhfOptions {
            algo: Algo::Grpo,
            policy: rl_dir.clone(),
            reward_source: RewardSource::Checker,
            prompts: Some(prompts("train")?),
            eval_prompts: Some(prompts("heldout")?),
            ..p.rl_options(&rlvr_dir, s.checker_rl_steps, s.checker_rl_lr)
        })?;
        util::write_json_atomic(&rlvr_dir.join("rlhf_report.json"), &r)?;
        Ok(Some(r.tokens_per_second))
    })?;
    p.evaluate_once("the checker-rewarded model", &rlvr_dir, "rlvr", false)?;
    let final_with_index = "the final model with the knowledge-base index";
    p.evaluate_once(final_with_index, &rlvr_dir, "final_index", true)?;
    let report = crate::eval::report::speedrun_report(
        &opts.out,
        &json!({"preset": opts.preset, "seed": opts.seed, "spec": p.spec}),
        &p.times,
        &STAGE_NAMES,
    )?;
    if let Err(e) = eval::report::report(&rlvr_dir) {
        eprintln!("(no per-stage report: {e:#})");
    }
    eprintln!(
        "\nreport: {}\nnext: chatforge chat --model {}",
        report.display(),
        rlvr_dir.display()
    );
    Ok(report)
}

/// The `--input` mode on the same skip-and-resume stages: a tokenizer and shards of the user's
/// files, pretraining, and samples from the base model.
fn speedrun_text(p: &mut Pipeline) -> Result<()> {
    let opts = p.opts;
    let tok_dir = p.path("tokenizer");
    let shard_dir = p.path("shards");
    let run_dir = p.path("base");
    p.stage("tokenizer", &tok_dir.join("tokenizer.json"), |_| {
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
        Ok(None)
    })?;
    p.stage("shards", &shard_dir.join("meta.json"), |_| {
        let meta = shards::tokenize_files(
            &Tokenizer::load(&tok_dir)?,
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
        Ok(None)
    })?;
    p.stage("pretrain", &run_dir.join("report.json"), |_| {
        let mut po = opts.pretrain.clone();
        po.data = shard_dir.clone();
        po.out = run_dir.clone();
        // A killed run resumes from its last checkpoint, like the curriculum's stages.
        po.train.resume = true;
        let report = pretrain(&po)?;
        eprintln!(
            "      val loss {:.4} nats/token vs unigram {:.4}; {:.4} bits/byte; {:.0} tokens/s; {:.0}s",
            report.val_loss,
            report.unigram_val_nats,
            report.val_bpb,
            report.tokens_per_second,
            report.seconds
        );
        Ok(Some(report.tokens_per_second))
    })?;
    // Sampling is cheap next to training: it runs every time.
    p.stage_no += 1;
    eprintln!(
        "[{}/{}] samples from {}",
        p.stage_no,
        p.stages,
        run_dir.display()
    );
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
    Ok(())
}

/// Copies the records of `families` from one prompt file to another (atomically).
fn keep_families(from: &Path, to: &Path, families: &[&str]) -> Result<()> {
    let text =
        std::fs::read_to_string(from).with_context(|| format!("cannot read {}", from.display()))?;
    let mut kept = String::new();
    for (i, line) in text.lines().enumerate() {
        let record: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not a JSON record", from.display(), i + 1))?;
        if families.contains(&record["family"].as_str().unwrap_or_default()) {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    util::write_atomic(to, kept.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The small preset's answer budget covers every reference reply of its curriculum, for two
    /// seeds: a shorter budget cuts right answers and the report scores them wrong.
    #[test]
    fn the_small_presets_answer_budget_covers_every_reference_reply() {
        let spec = Preset::Small.spec();
        for seed in [1337, 2] {
            let dir = tempfile::tempdir().unwrap();
            curriculum::generate(
                dir.path(),
                seed,
                &CurriculumSize::scaled(spec.curriculum_scale),
            )
            .unwrap();
            let (tok, _) = curriculum_tokenizer(dir.path(), spec.vocab_size).unwrap();
            let longest = longest_reply_tokens(&tok, &dir.path().join("sft_train.jsonl")).unwrap();
            assert!(
                longest > 64 && longest <= spec.max_new_tokens,
                "seed {seed}: longest reply {longest} tokens, budget {}",
                spec.max_new_tokens
            );
        }
    }
}
