//! RLHF (InstructGPT step 3): PPO against a reward model with a KL penalty to the SFT model, and
//! the two common alternatives, DPO (from preference pairs, no sampling) and GRPO (group-normalised
//! rewards, no value head). All three run in the shared training loop and are measured the same
//! way on held-out prompts: reward, the curriculum's checker, refusals and KL to the start model.

pub mod dpo;
pub mod losses;
pub mod onpolicy;
pub mod rollout;

use crate::data::prefs::{read_prompt_file, RlPrompt};
use crate::model::Llama;
use crate::tokenizer::chat::ChatTemplate;
use crate::tokenizer::Tokenizer;
use crate::train::reward::RewardModel;
use crate::train::trainer::{train, LoopOptions, LoopReport, RunSpec, Stage, Start};
use anyhow::{bail, Result};
use candle_core::Device;
use rollout::{response_logprobs, Sampling};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Algo {
    /// Proximal policy optimisation with a value head and a KL-penalised reward (InstructGPT).
    Ppo,
    /// Direct preference optimisation on chosen/rejected pairs against the frozen start model.
    Dpo,
    /// Group relative policy optimisation: several samples per prompt, advantages normalised in
    /// the group, KL as a loss term.
    Grpo,
}

/// Where PPO's and GRPO's reward comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RewardSource {
    /// The reward model's score.
    Model,
    /// The curriculum's programmatic checker: 1 if correct, else 0.
    Checker,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RlhfOptions {
    pub algo: Algo,
    /// The SFT run: the starting policy and the frozen reference.
    pub policy: PathBuf,
    pub reward: Option<PathBuf>,
    /// Training prompts (PPO, GRPO).
    pub prompts: Option<PathBuf>,
    /// Held-out prompts for measuring; default: every tenth of --prompts.
    pub eval_prompts: Option<PathBuf>,
    /// Preference files (DPO).
    pub prefs: Vec<PathBuf>,
    pub val_prefs: Vec<PathBuf>,
    pub out: PathBuf,
    /// Prompts sampled per rollout batch.
    pub rollout_prompts: usize,
    /// Samples per prompt (GRPO's group; PPO's with `prompt_baseline`).
    pub group_size: usize,
    /// PPO: sample `group_size` answers per prompt and score each against the others' mean.
    pub prompt_baseline: bool,
    /// PPO: learn a value head and take GAE advantages against it. Off (needs
    /// `prompt_baseline`): no value head; each token's advantage is its return (the
    /// group-relative score plus the KL penalties that follow), scaled to unit spread.
    pub critic: bool,
    pub max_new_tokens: usize,
    /// Strings that end a sampled answer, as in `generate --stop`.
    #[serde(default)]
    pub stop: Vec<String>,
    pub temperature: f64,
    /// Passes over each rollout batch.
    pub epochs: usize,
    /// Sequences per optimizer step (PPO/GRPO) or pairs per step (DPO).
    pub minibatch: usize,
    pub clip: f64,
    pub value_clip: f64,
    pub vf_coef: f64,
    /// The value head's learning rate as a multiple of the policy's: it starts from scratch.
    pub value_lr_scale: f64,
    pub gamma: f64,
    pub lambda: f64,
    /// β: the KL penalty (PPO: in the reward; GRPO: in the loss).
    pub kl_coef: f64,
    /// Adaptive KL controller target (per response, nats); off when unset.
    pub target_kl: Option<f64>,
    pub kl_horizon: f64,
    /// PPO-ptx: pretraining shards whose LM loss is mixed in with weight `ptx_coef`.
    pub ptx_data: Option<PathBuf>,
    pub ptx_coef: f64,
    pub reward_source: RewardSource,
    pub dpo_beta: f64,
    /// Held-out prompts answered at each evaluation.
    pub eval_samples: usize,
    #[serde(skip)]
    pub train: LoopOptions,
}

impl Default for RlhfOptions {
    fn default() -> Self {
        RlhfOptions {
            algo: Algo::Ppo,
            policy: PathBuf::new(),
            reward: None,
            prompts: None,
            eval_prompts: None,
            prefs: Vec::new(),
            val_prefs: Vec::new(),
            out: PathBuf::new(),
            rollout_prompts: 16,
            group_size: 4,
            prompt_baseline: false,
            critic: true,
            max_new_tokens: 64,
            stop: Vec::new(),
            temperature: 1.0,
            epochs: 2,
            minibatch: 8,
            clip: 0.2,
            value_clip: 0.2,
            vf_coef: 0.1,
            value_lr_scale: 30.0,
            gamma: 1.0,
            lambda: 0.95,
            kl_coef: 0.05,
            target_kl: None,
            kl_horizon: 10_000.0,
            ptx_data: None,
            ptx_coef: 0.0,
            reward_source: RewardSource::Model,
            dpo_beta: 0.1,
            eval_samples: 64,
            train: LoopOptions {
                steps: 100,
                lr: 1e-4,
                warmup_steps: 5,
                eval_every: 25,
                weight_decay: 0.0,
                ..Default::default()
            },
        }
    }
}

/// Held-out measurement of a policy: greedy answers scored by the reward model and the checker,
/// refusal rates, and KL to the reference on sampled answers.
pub struct PolicyEval {
    pub prompts: Vec<RlPrompt>,
    pub reference: Llama,
    pub reward: Option<RewardModel>,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    pub stops: Vec<u32>,
    pub stop: Vec<String>,
    pub max_new_tokens: usize,
    pub seed: u64,
}

impl PolicyEval {
    pub fn sampling(&self) -> Sampling<'_> {
        Sampling {
            tokenizer: &self.tokenizer,
            template: &self.template,
            stops: &self.stops,
            stop: &self.stop,
            max_new_tokens: self.max_new_tokens,
        }
    }

    pub fn measure(&self, model: &Llama) -> Result<Vec<(String, f64)>> {
        let prompts: Vec<&RlPrompt> = self.prompts.iter().collect();
        let s = self.sampling();
        let greedy = s.sample(model, &prompts, 1, 0.0, self.seed)?;
        let mut m = Vec::new();
        if let Some(rm) = &self.reward {
            let items: Vec<_> = greedy
                .iter()
                .map(|g| (prompts[g.prompt].messages.as_slice(), g.text.as_str()))
                .collect();
            let r = rm.score(&items)?;
            m.push(("reward".into(), mean(&r)));
        }
        let mut tally = crate::eval::curriculum::Tally::default();
        for g in &greedy {
            let item = crate::eval::curriculum::Item::from_rl_prompt(prompts[g.prompt]);
            tally.add(&item, &g.text, g.stopped);
        }
        let n = greedy.len().max(1) as f64;
        m.extend(
            tally
                .metrics()
                .into_iter()
                .filter(|(k, _)| k != crate::eval::curriculum::metric::N),
        );
        m.push((
            "length".into(),
            greedy.iter().map(|g| g.row.len as f64).sum::<f64>() / n,
        ));
        // KL(policy‖reference) per response, estimated on the policy's own samples.
        let sampled = s.sample(model, &prompts, 1, 1.0, self.seed ^ 0x5eed)?;
        let rows: Vec<_> = sampled.iter().map(|x| &x.row).collect();
        let pad = self.tokenizer.special_id("<|pad|>").unwrap_or(0);
        let lp = response_logprobs(model, &rows, pad)?;
        let rl = response_logprobs(&self.reference, &rows, pad)?;
        let kl: Vec<f64> = rows
            .iter()
            .zip(lp.iter().zip(&rl))
            .map(|(row, (a, b))| row.sampled_log_ratio(a, b))
            .collect();
        m.push(("kl".into(), mean(&kl)));
        Ok(m)
    }
}

pub fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len().max(1) as f64
}

#[derive(Clone, Debug, Serialize)]
pub struct RlhfReport {
    pub algo: Algo,
    pub steps: usize,
    pub eval_before: BTreeMap<String, f64>,
    pub eval_after: BTreeMap<String, f64>,
    pub tokens_per_second: f64,
    pub seconds: f64,
    /// Peak resident memory of the process (MB).
    pub peak_rss_mb: f64,
    /// Prompts (training and held-out) cut from the left to fit the context.
    pub truncated_prompts: usize,
    /// Steps skipped for a non-finite loss.
    pub skipped_steps: usize,
    #[serde(skip)]
    pub losses: Vec<(usize, f64)>,
}

/// Splits prompts into training and held-out sets (every tenth held out) unless given apart.
fn prompt_sets(opts: &RlhfOptions) -> Result<(Vec<RlPrompt>, Vec<RlPrompt>)> {
    let train = match &opts.prompts {
        Some(p) => read_prompt_file(p)?,
        None => Vec::new(),
    };
    let (train, mut held) = match &opts.eval_prompts {
        Some(p) => (train, read_prompt_file(p)?),
        None => crate::util::hold_out_every(train, 10),
    };
    // Spread the measured prompts over the file (it is grouped by task family).
    if held.len() > opts.eval_samples {
        held = crate::util::spread_indices(held.len(), opts.eval_samples)
            .into_iter()
            .map(|i| held[i].clone())
            .collect();
    }
    Ok((train, held))
}

/// Runs the chosen algorithm from the SFT policy and writes the tuned policy.
impl RlhfOptions {
    /// Every numeric option in its range, each refused by its flag's name (a zero horizon once
    /// made β NaN).
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("--kl-horizon", self.kl_horizon),
            ("--temperature", self.temperature),
            ("--dpo-beta", self.dpo_beta),
            ("--value-lr-scale", self.value_lr_scale),
        ];
        for (flag, v) in positive {
            if !(v > 0.0 && v.is_finite()) {
                bail!("{flag} must be a positive number, got {v}");
            }
        }
        let non_negative = [
            ("--kl-coef", self.kl_coef),
            ("--clip", self.clip),
            ("--value-clip", self.value_clip),
            ("--vf-coef", self.vf_coef),
            ("--ptx-coef", self.ptx_coef),
        ];
        for (flag, v) in non_negative {
            if !(v >= 0.0 && v.is_finite()) {
                bail!("{flag} must be 0 or more, got {v}");
            }
        }
        for (flag, v) in [("--gamma", self.gamma), ("--lambda", self.lambda)] {
            if !(0.0..=1.0).contains(&v) {
                bail!("{flag} must be between 0 and 1, got {v}");
            }
        }
        if self.algo == Algo::Ppo && !self.critic && !self.prompt_baseline {
            bail!(
                "--no-critic leaves PPO without a baseline: add --prompt-baseline, whose \
                 other answers to the same prompt then serve as the baseline"
            );
        }
        if let Some(t) = self.target_kl.filter(|t| !(*t > 0.0 && t.is_finite())) {
            bail!("--target-kl must be a positive number, got {t}");
        }
        let counts = [
            ("--rollout-prompts", self.rollout_prompts),
            ("--group-size", self.group_size),
            ("--max-new-tokens", self.max_new_tokens),
            ("--epochs", self.epochs),
            ("--minibatch", self.minibatch),
            ("--eval-samples", self.eval_samples),
        ];
        for (flag, v) in counts {
            if v == 0 {
                bail!("{flag} must be at least 1");
            }
        }
        if self.algo == Algo::Grpo && self.group_size < 2 {
            bail!("--group-size must be at least 2 for GRPO (advantages compare answers to one prompt)");
        }
        Ok(())
    }
}

pub fn rlhf(opts: &RlhfOptions) -> Result<RlhfReport> {
    opts.validate()?;
    let (config, tok) = crate::model::load_config_and_tokenizer(&opts.policy)
        .map_err(|e| anyhow::anyhow!("--policy: {e:#}"))?;
    let template = ChatTemplate::detect(&tok)
        .map_err(|e| anyhow::anyhow!("policy {}: {e}", opts.policy.display()))?;
    let reference = crate::model::load(&opts.policy, &Device::Cpu)?;
    let reward = match &opts.reward {
        Some(dir) => {
            let rm = RewardModel::load(dir).map_err(|e| anyhow::anyhow!("--reward: {e:#}"))?;
            // The reward model scores the policy's token ids as they are.
            let (n, m) = (rm.tokenizer.vocab_size(), tok.vocab_size());
            if !rm.tokenizer.same_ids_as(&tok) {
                bail!(
                    "--reward {} has a different tokenizer ({n} tokens) from the policy {} ({m} tokens); train the reward model from the policy's base or SFT run",
                    dir.display(),
                    opts.policy.display(),
                );
            }
            Some(rm)
        }
        None => None,
    };
    let needs_rm = opts.algo != Algo::Dpo && opts.reward_source == RewardSource::Model;
    if needs_rm && reward.is_none() {
        bail!(
            "--algo {:?} needs --reward (a reward model from `chatforge reward`)",
            opts.algo
        );
    }
    let (train_prompts, eval_prompts) = prompt_sets(opts)?;
    let context = config.max_position_embeddings;
    if opts.algo != Algo::Dpo && opts.max_new_tokens >= context {
        bail!(
            "--max-new-tokens {} leaves no room for a prompt in the policy's context of {context} tokens; use fewer",
            opts.max_new_tokens
        );
    }
    let room = rollout::prompt_room(context, opts.max_new_tokens);
    let mut truncated_prompts = 0;
    for p in train_prompts.iter().chain(&eval_prompts) {
        let ids = crate::tokenizer::chat::render(&tok, &template, &p.messages, true)?.ids;
        truncated_prompts += usize::from(ids.len() > room);
    }
    if truncated_prompts > 0 && opts.algo != Algo::Dpo {
        eprintln!(
            "warning: {truncated_prompts} prompts are longer than the {room} tokens the context ({context}) leaves beside --max-new-tokens {}; their start is cut off",
            opts.max_new_tokens
        );
    }
    if opts.algo != Algo::Dpo && train_prompts.is_empty() {
        bail!(
            "--algo {:?} needs --prompts (JSONL with \"messages\" or \"prompt\")",
            opts.algo
        );
    }
    if opts.algo != Algo::Dpo
        && opts.reward_source == RewardSource::Checker
        && train_prompts.iter().any(|p| p.answer.is_none())
    {
        bail!("--reward-source checker needs an \"answer\" in every prompt record (the curriculum's rl_prompts files have one)");
    }
    let stops = crate::infer::generate::stop_ids_of(&reference.model, &tok);
    let eval = PolicyEval {
        prompts: eval_prompts,
        reference: reference.model,
        reward,
        tokenizer: reference.tokenizer,
        template: template.clone(),
        stops,
        stop: opts.stop.clone(),
        max_new_tokens: opts.max_new_tokens,
        seed: opts.train.seed,
    };
    let data = serde_json::json!({"prompts": opts.prompts, "eval_prompts": opts.eval_prompts,
        "prefs": opts.prefs, "train_prompts": train_prompts.len(), "eval_prompt_count": eval.prompts.len()});
    let mut parents = vec![opts.policy.display().to_string()];
    parents.extend(opts.reward.iter().map(|r| r.display().to_string()));
    let spec = RunSpec {
        stage: "rlhf",
        out: &opts.out,
        config: &config,
        tokenizer: &tok,
        start: Start::From(opts.policy.clone()),
        hyper: serde_json::to_value(opts)?,
        parents,
        data,
        lora: None,
        batch_size: opts.minibatch,
    };
    let mut stage: Box<dyn Stage> = match opts.algo {
        Algo::Dpo => Box::new(dpo::DpoStage::new(opts, &tok, &template, eval)?),
        Algo::Ppo | Algo::Grpo => Box::new(onpolicy::OnPolicy::new(
            opts,
            config.hidden_size,
            train_prompts,
            eval,
        )?),
    };
    let r: LoopReport = train(&opts.train, spec, stage.as_mut())?;
    Ok(RlhfReport {
        algo: opts.algo,
        steps: r.steps,
        eval_before: r.eval_before.into_iter().collect(),
        eval_after: r.eval.into_iter().collect(),
        tokens_per_second: r.tokens_per_second,
        seconds: r.seconds,
        peak_rss_mb: r.peak_rss_mb,
        truncated_prompts,
        skipped_steps: r.skipped_steps,
        losses: r.losses,
    })
}
