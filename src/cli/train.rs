//! Training commands: pretrain, sft, reward, rlhf and the speedrun.

use super::print_json;
use crate::data::chat::ChatFormat;
use crate::data::text::DocFormat;
use crate::model::lora::LoraConfig;
use crate::model::switches::ArchSwitches;
use crate::rlhf::{Algo, RewardSource, RlhfOptions};
use crate::speedrun::{Preset, SpeedrunOptions};
use crate::train::optim::{MatrixOptimizer, Schedule};
use crate::train::pretrain::PretrainOptions;
use crate::train::reward::RewardOptions;
use crate::train::sft::{OnError, SftOptions};
use crate::train::trainer::LoopOptions;
use crate::train::Precision;
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

/// Sets `target.field` from `args.field` for each field the user gave.
macro_rules! given {
    ($target:expr, $args:expr, $($field:ident),+ $(,)?) => {
        $( if let Some(v) = $args.$field.clone() { $target.$field = v; } )+
    };
}

/// Optimisation settings shared by the training stages. Each is left out unless given, so the
/// stage's own default (`SftOptions::default().train`, ...) stays in place.
#[derive(Args, Clone, Debug, Default)]
pub struct TrainArgs {
    /// Optimizer steps (default: the stage's).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Micro-batches per optimizer step (default 1).
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Peak learning rate (default: the stage's).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Final learning rate as a fraction of the peak (default 0.1), under either --schedule.
    #[arg(long)]
    pub min_lr_ratio: Option<f64>,
    /// Linear warmup steps (default: the stage's).
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    /// AdamW weight decay on matrices (default: 0.1 for pretraining and SFT, 0 for reward and RLHF).
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Global gradient-norm clip, 0 = off (default 1).
    #[arg(long)]
    pub grad_clip: Option<f64>,
    /// Seed of initialisation, batches and sampling (default 1337).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Evaluate every N steps (default: the stage's: pretraining 100, SFT and reward 50, RLHF 25).
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// Write the training loss to metrics.jsonl every N steps (default 10).
    #[arg(long)]
    pub log_every: Option<usize>,
    /// Write a checkpoint every N steps (default 200).
    #[arg(long)]
    pub checkpoint_every: Option<usize>,
    /// Checkpoints to keep (default 3).
    #[arg(long)]
    pub keep_checkpoints: Option<usize>,
    /// Steps in a row whose loss is not finite (each skipped) before the run stops (default 5).
    #[arg(long)]
    pub max_bad_steps: Option<usize>,
    /// Matmul precision: auto (the default: bf16 on AMX, or on AVX512-BF16 where it measures
    /// faster than f32 at startup, else f32); bf16 (the projections' matmuls with bf16 operands and f32 sums,
    /// mixed precision: the same loss curve, faster steps; refused without a bf16 kernel); or
    /// f32. The kernel that ran is printed and kept in chatforge.json; CHATFORGE_MATMUL=
    /// avx512-bf16 or f32 caps the choice.
    #[arg(long, value_enum)]
    pub precision: Option<Precision>,
    /// The update of the transformer blocks' weight matrices: adamw (the default) or muon
    /// (momentum made orthogonal, as nanochat and modded-nanogpt train; embeddings, head and
    /// gains keep AdamW). The speedrun uses it for pretraining only.
    #[arg(long, value_enum)]
    pub optimizer: Option<MatrixOptimizer>,
    /// Muon's peak learning rate (default 0.02), scaled by the same schedule as --lr.
    #[arg(long)]
    pub muon_lr: Option<f64>,
    /// The learning rate's fall after warmup: cosine (the default) or warmdown (the peak held,
    /// then a straight line to the floor over the last 40% of steps).
    #[arg(long, value_enum)]
    pub schedule: Option<Schedule>,
    /// Continue from the run's last checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Stop right after this step's checkpoint, as if killed (for testing resume).
    #[arg(long, hide = true)]
    pub halt_after: Option<usize>,
}

impl TrainArgs {
    /// The stage's loop options (`stage`) with the given flags over them.
    pub fn over(&self, stage: LoopOptions) -> Result<LoopOptions> {
        let mut o = stage;
        given!(
            o,
            self,
            steps,
            grad_accum,
            lr,
            min_lr_ratio,
            warmup_steps,
            weight_decay,
            grad_clip,
            seed,
            eval_every,
            log_every,
            checkpoint_every,
            keep_checkpoints,
            max_bad_steps,
            precision,
            optimizer,
            muon_lr,
            schedule
        );
        o.validate()?;
        o.resume |= self.resume;
        // Under mpirun, rank 0 alone shows progress.
        o.quiet |= !crate::dist::is_leader();
        o.halt_after = self.halt_after.or(o.halt_after);
        Ok(o)
    }
}

/// Model and batch shape for pretraining.
#[derive(Args, Clone, Debug)]
pub struct ShapeArgs {
    /// Model config.json (Hugging Face Llama fields); default: a ~2M-parameter model sized for CPUs.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long, default_value_t = PretrainOptions::default().batch_size)]
    pub batch_size: usize,
    #[arg(long, default_value_t = PretrainOptions::default().seq_len)]
    pub seq_len: usize,
    /// Validation tokens per evaluation.
    #[arg(long, default_value_t = PretrainOptions::default().eval_tokens)]
    pub eval_tokens: usize,
    #[command(flatten)]
    pub switches: ArchSwitches,
}

impl ShapeArgs {
    pub(super) fn options(
        &self,
        train: &TrainArgs,
        stage: PretrainOptions,
    ) -> Result<PretrainOptions> {
        Ok(PretrainOptions {
            config: self.config.clone(),
            batch_size: self.batch_size,
            seq_len: self.seq_len,
            eval_tokens: self.eval_tokens,
            switches: stage.switches.merged(&self.switches),
            train: train.over(stage.train.clone())?,
            ..stage
        })
    }
}

#[derive(Args)]
pub struct PretrainArgs {
    /// Shard directory from `chatforge tokenize`.
    #[arg(long)]
    data: PathBuf,
    /// Run directory to write.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    pub(super) shape: ShapeArgs,
    #[command(flatten)]
    pub(super) train: TrainArgs,
}

pub fn pretrain(a: PretrainArgs) -> Result<()> {
    let opts = a.shape.options(
        &a.train,
        PretrainOptions {
            data: a.data,
            out: a.out,
            ..Default::default()
        },
    )?;
    let mut report = serde_json::to_value(crate::train::pretrain::pretrain(&opts)?)?;
    report.as_object_mut().map(|o| o.remove("losses"));
    print_json(&report)
}

#[derive(Args)]
pub struct SftArgs {
    /// The model to start from: a chatforge run, a Hugging Face model directory (single or
    /// sharded safetensors), or a LoRA adapter directory. Convert a GGUF file with
    /// `chatforge export --format hf` first.
    #[arg(long)]
    base: PathBuf,
    /// Conversation files: OpenAI messages, Alpaca or ShareGPT, as JSONL or a JSON array.
    #[arg(long, num_args = 1.., required = true)]
    data: Vec<PathBuf>,
    /// Run directory to write.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_enum, default_value_t = SftOptions::default().format)]
    format: ChatFormat,
    /// Chat template: chatforge, chatml or llama3 (default: from the tokenizer's special tokens).
    #[arg(long)]
    template: Option<String>,
    #[arg(long, default_value_t = SftOptions::default().batch_size)]
    batch_size: usize,
    /// Longest conversation in tokens (default: the model's context).
    #[arg(long)]
    max_len: Option<usize>,
    /// Fraction of conversations held out for validation.
    #[arg(long, default_value_t = SftOptions::default().val_fraction)]
    val_fraction: f64,
    /// Held-out conversation files instead of a fraction of --data.
    #[arg(long, num_args = 1..)]
    val_data: Vec<PathBuf>,
    /// What to do with unusable records (no assistant turn, unknown role, over the length).
    #[arg(long, value_enum, default_value_t = SftOptions::default().on_error)]
    on_error: OnError,
    /// Pretraining shards to mix into each batch (limits forgetting).
    #[arg(long)]
    mix_pretrain: Option<PathBuf>,
    /// Fraction of each batch taken from --mix-pretrain.
    #[arg(long, default_value_t = SftOptions::default().mix_fraction)]
    mix_fraction: f64,
    #[command(flatten)]
    lora: LoraArgs,
    #[command(flatten)]
    train: TrainArgs,
}

/// LoRA instead of full fine-tuning.
#[derive(Args)]
struct LoraArgs {
    /// Train LoRA adapters of this rank on frozen base weights instead of every weight.
    #[arg(long)]
    lora_rank: Option<usize>,
    /// LoRA scale numerator: updates are multiplied by alpha / rank.
    #[arg(long, default_value_t = LoraConfig::DEFAULT_ALPHA, requires = "lora_rank")]
    lora_alpha: f64,
    /// Projections that get adapters (comma-separated: q_proj, k_proj, v_proj, o_proj,
    /// gate_proj, up_proj, down_proj, or all-linear).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "all-linear",
        requires = "lora_rank"
    )]
    lora_targets: Vec<String>,
    /// Keep only the adapters (PEFT layout); do not also write merged weights.
    #[arg(long, requires = "lora_rank")]
    lora_separate: bool,
}

impl SftArgs {
    pub fn options(self) -> Result<SftOptions> {
        let stage = SftOptions::default();
        let lora = match self.lora.lora_rank {
            Some(rank) => Some(LoraConfig {
                merge: !self.lora.lora_separate,
                ..LoraConfig::new(rank, self.lora.lora_alpha, &self.lora.lora_targets)?
            }),
            None => None,
        };
        Ok(SftOptions {
            base: self.base,
            data: self.data,
            out: self.out,
            format: self.format,
            template: self.template,
            batch_size: self.batch_size,
            max_len: self.max_len,
            val_fraction: self.val_fraction,
            val_data: self.val_data,
            on_error: self.on_error,
            mix_pretrain: self.mix_pretrain,
            mix_fraction: self.mix_fraction,
            lora,
            train: self.train.over(stage.train)?,
        })
    }
}

pub fn sft(a: SftArgs) -> Result<()> {
    print_json(&crate::train::sft::sft(&a.options()?)?)
}

#[derive(Args)]
pub struct RewardArgs {
    /// The run to start from (usually the SFT model).
    #[arg(long)]
    base: PathBuf,
    /// Preference files: rankings, prompt/chosen/rejected pairs, ShareGPT DPO or Anthropic HH.
    #[arg(long, num_args = 1.., required = true)]
    data: Vec<PathBuf>,
    /// Reward-model directory to write.
    #[arg(long)]
    out: PathBuf,
    /// Prompts (comparisons) per batch; each brings all its ranked responses.
    #[arg(long, default_value_t = RewardOptions::default().batch_size)]
    batch_size: usize,
    /// Longest conversation in tokens; longer ones lose the start of the prompt (default: the context).
    #[arg(long)]
    max_len: Option<usize>,
    /// Fraction of comparisons held out.
    #[arg(long, default_value_t = RewardOptions::default().val_fraction)]
    val_fraction: f64,
    /// Held-out preference files instead of a fraction of --data.
    #[arg(long, num_args = 1..)]
    val_data: Vec<PathBuf>,
    #[arg(long, value_enum, default_value_t = RewardOptions::default().on_error)]
    on_error: OnError,
    /// RL prompts: the base model's answers to them define reward 0 (default: held-out responses).
    #[arg(long)]
    norm_prompts: Option<PathBuf>,
    /// How many of --norm-prompts to answer.
    #[arg(long, default_value_t = RewardOptions::default().norm_samples)]
    norm_samples: usize,
    /// Train only the top N Transformer blocks (with the final norm and the score head); lower
    /// blocks and the embeddings keep the base model's weights. Default: all.
    #[arg(long)]
    train_layers: Option<usize>,
    #[command(flatten)]
    train: TrainArgs,
}

impl RewardArgs {
    pub fn options(self) -> Result<RewardOptions> {
        Ok(RewardOptions {
            base: self.base,
            data: self.data,
            val_data: self.val_data,
            out: self.out,
            batch_size: self.batch_size,
            max_len: self.max_len,
            val_fraction: self.val_fraction,
            on_error: self.on_error,
            norm_prompts: self.norm_prompts,
            norm_samples: self.norm_samples,
            train_layers: self.train_layers,
            train: self.train.over(RewardOptions::default().train)?,
        })
    }
}

pub fn reward(a: RewardArgs) -> Result<()> {
    print_json(&crate::train::reward::train_reward(&a.options()?)?)
}

/// `chatforge rlhf`: every setting but the paths and the algorithm is left out unless given, so
/// `RlhfOptions::default()` holds the defaults.
#[derive(Args)]
pub struct RlhfArgs {
    /// The SFT run: the starting policy and the frozen KL reference.
    #[arg(long)]
    policy: PathBuf,
    /// Reward model from `chatforge reward` (PPO; GRPO with --reward-source model; measuring).
    #[arg(long)]
    reward: Option<PathBuf>,
    /// Training prompts: JSONL with "messages" or "prompt" (and optionally the curriculum's "answer").
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Held-out prompts for measuring (default: every tenth of --prompts).
    #[arg(long)]
    eval_prompts: Option<PathBuf>,
    /// Preference files for DPO.
    #[arg(long, num_args = 1..)]
    prefs: Vec<PathBuf>,
    /// Held-out preference files for DPO (default: every tenth pair).
    #[arg(long, num_args = 1..)]
    val_prefs: Vec<PathBuf>,
    /// Run directory to write.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_enum, default_value_t = RlhfOptions::default().algo)]
    algo: Algo,
    /// Prompts per rollout batch (default 16).
    #[arg(long)]
    rollout_prompts: Option<usize>,
    /// Samples per prompt for GRPO and PPO with --prompt-baseline (default 4).
    #[arg(long)]
    group_size: Option<usize>,
    /// PPO: sample --group-size answers per prompt and score each against the mean of the others.
    #[arg(long)]
    prompt_baseline: bool,
    /// PPO with --prompt-baseline: no value head; the other answers' mean is the only baseline.
    #[arg(long)]
    no_critic: bool,
    /// Stop a sampled answer when this text appears (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// The most tokens of a sampled answer (default 64).
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// Sampling temperature of rollouts (default 1).
    #[arg(long)]
    temperature: Option<f64>,
    /// Passes over each rollout batch (default 2).
    #[arg(long)]
    epochs: Option<usize>,
    /// Sequences (or DPO pairs) per optimizer step (default 8).
    #[arg(long)]
    minibatch: Option<usize>,
    /// PPO/GRPO ratio clip ε (default 0.2).
    #[arg(long)]
    clip: Option<f64>,
    /// PPO value clip (default 0.2).
    #[arg(long)]
    value_clip: Option<f64>,
    /// Weight of the value loss (it trains the value head, which reads the policy's hidden
    /// state; default 0.1).
    #[arg(long)]
    vf_coef: Option<f64>,
    /// The value head's learning rate as a multiple of --lr (it starts from scratch; default 30).
    #[arg(long)]
    value_lr_scale: Option<f64>,
    /// Discount γ (default 1).
    #[arg(long)]
    gamma: Option<f64>,
    /// GAE λ (default 0.95).
    #[arg(long)]
    lambda: Option<f64>,
    /// β: KL penalty to the SFT model (default 0.05).
    #[arg(long)]
    kl_coef: Option<f64>,
    /// Adapt β towards this KL per response (nats).
    #[arg(long)]
    target_kl: Option<f64>,
    /// Steps over which the adaptive controller moves β (default 10000).
    #[arg(long)]
    kl_horizon: Option<f64>,
    /// PPO-ptx: pretraining shards whose LM loss is mixed in.
    #[arg(long)]
    ptx_data: Option<PathBuf>,
    /// PPO-ptx weight (default 0).
    #[arg(long)]
    ptx_coef: Option<f64>,
    /// PPO/GRPO reward: the reward model or the prompts' programmatic checker ("answer").
    #[arg(long, value_enum, default_value_t = RlhfOptions::default().reward_source)]
    reward_source: RewardSource,
    /// DPO β (default 0.1).
    #[arg(long)]
    dpo_beta: Option<f64>,
    /// Held-out prompts answered at each evaluation (default 64).
    #[arg(long)]
    eval_samples: Option<usize>,
    #[command(flatten)]
    train: TrainArgs,
}

impl RlhfArgs {
    pub fn options(self) -> Result<RlhfOptions> {
        let mut o = RlhfOptions::default();
        given!(
            o,
            self,
            rollout_prompts,
            group_size,
            max_new_tokens,
            temperature,
            epochs,
            minibatch,
            clip,
            value_clip,
            vf_coef,
            value_lr_scale,
            gamma,
            lambda,
            kl_coef,
            kl_horizon,
            ptx_coef,
            dpo_beta,
            eval_samples
        );
        o.train = self.train.over(o.train)?;
        Ok(RlhfOptions {
            algo: self.algo,
            policy: self.policy,
            reward: self.reward,
            prompts: self.prompts,
            eval_prompts: self.eval_prompts,
            prefs: self.prefs,
            val_prefs: self.val_prefs,
            out: self.out,
            stop: self.stop,
            prompt_baseline: self.prompt_baseline || o.prompt_baseline,
            critic: o.critic && !self.no_critic,
            target_kl: self.target_kl.or(o.target_kl),
            ptx_data: self.ptx_data.or(o.ptx_data),
            reward_source: self.reward_source,
            ..o
        })
    }
}

pub fn rlhf(a: RlhfArgs) -> Result<()> {
    print_json(&crate::rlhf::rlhf(&a.options()?)?)
}

#[derive(Args)]
pub struct SpeedrunArgs {
    /// Size of the curriculum run: tiny (under 3 minutes) or small (about 30 minutes).
    #[arg(long, value_enum, default_value_t = SpeedrunOptions::default().preset)]
    preset: Preset,
    /// Output directory; rerunning with the same one resumes at the first unfinished stage.
    #[arg(long, default_value_os_t = SpeedrunOptions::default().out)]
    out: PathBuf,
    /// Pretrain on these text files instead of the built-in curriculum (tokenizer, shards,
    /// pretraining and samples only; the --steps, --lr... flags apply).
    #[arg(long, num_args = 1..)]
    input: Vec<PathBuf>,
    #[arg(long, value_enum, default_value_t = SpeedrunOptions::default().format)]
    format: DocFormat,
    /// Vocabulary size in --input mode.
    #[arg(long, default_value_t = SpeedrunOptions::default().vocab_size)]
    vocab_size: usize,
    #[command(flatten)]
    shape: ShapeArgs,
    #[command(flatten)]
    train: TrainArgs,
    /// Prompt for the closing samples in --input mode.
    #[arg(long, default_value_t = SpeedrunOptions::default().prompt)]
    prompt: String,
}

impl SpeedrunArgs {
    pub fn options(self) -> Result<SpeedrunOptions> {
        let d = SpeedrunOptions::default();
        let pretrain = self.shape.options(&self.train, d.pretrain.clone())?;
        Ok(SpeedrunOptions {
            out: self.out,
            preset: self.preset,
            seed: pretrain.train.seed,
            inputs: self.input,
            vocab_size: self.vocab_size,
            format: self.format,
            pretrain,
            prompt: self.prompt,
            ..d
        })
    }
}

pub fn speedrun(a: SpeedrunArgs) -> Result<()> {
    crate::speedrun::speedrun(&a.options()?)?;
    Ok(())
}
