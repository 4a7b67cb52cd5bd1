//! The `chatforge` command line: parses arguments and calls the library.

use anyhow::Result;
use chatforge::data::chat::ChatFormat;
use chatforge::data::shards::{self, TokenizeOptions};
use chatforge::data::text::DocFormat;
use chatforge::infer::chat::{run_terminal, ChatSession};
use chatforge::infer::generate::{generate_from_ids, FinishReason, GenerateOptions};
use chatforge::infer::sampler::SamplingParams;
use chatforge::model::lora::LoraConfig;
use chatforge::rlhf::{rlhf, Algo, RewardSource, RlhfOptions};
use chatforge::speedrun::Preset;
use chatforge::tokenizer::chat::ChatTemplate;
use chatforge::tokenizer::{SplitPattern, Tokenizer, TrainOptions, CHAT_SPECIAL_TOKENS};
use chatforge::train::pretrain::{pretrain, PretrainOptions};
use chatforge::train::reward::{train_reward, RewardOptions};
use chatforge::train::sft::{sft, OnError, SftOptions};
use chatforge::train::trainer::LoopOptions;
use clap::{Args, Parser, Subcommand};
use std::io::IsTerminal;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "chatforge",
    version,
    about = "Build a small ChatGPT yourself: data, tokenizer, pretraining, SFT, reward model, RLHF, evaluation, chat and an OpenAI-compatible server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train or inspect a byte-level BPE tokenizer.
    #[command(subcommand)]
    Tokenizer(TokenizerCommand),
    /// Turn text or JSONL files into binary token shards with a train/validation split.
    Tokenize(TokenizeArgs),
    /// Pretrain a Llama-style model on token shards (next-token prediction).
    Pretrain(PretrainArgs),
    /// Generate text from a trained model, streaming tokens to stdout.
    Generate(GenerateArgs),
    /// Instruction-tune a pretrained run on conversations (loss on assistant tokens only).
    Sft(SftArgs),
    /// Data preparation: the whole pipeline from a config (prepare), or cleaning, quality
    /// classifier and filter, duplicate removal and weighted mixtures one by one.
    #[command(subcommand)]
    Data(DataCommand),
    /// Train a reward model on ranked or paired answers (Bradley-Terry, scalar head).
    Reward(RewardArgs),
    /// Tune a policy with human-feedback RL: PPO (default), DPO or GRPO.
    Rlhf(RlhfArgs),
    /// Talk to a model in the terminal (or pipe one message per line).
    Chat(ChatArgs),
    /// Export a model for other tools: a Hugging Face Llama directory (`--format hf`; from a GGUF
    /// file too, dequantized, to fine-tune it) or a GGUF file llama.cpp runs (`--format gguf`).
    Export(ExportArgs),
    /// Serve a model over an OpenAI-compatible HTTP API (streaming, continuous batching) with a
    /// chat page at /.
    Serve(ServeArgs),
    /// Score a model on benchmark files and the curriculum (JSON and a Markdown table).
    Eval(EvalArgs),
    /// Write RUN/report.md: every stage's numbers, loss curves (PNG), evaluations and samples.
    Report {
        /// The last run of the chain (its parents are followed through chatforge.json).
        run: PathBuf,
    },
    /// Write the built-in bilingual synthetic curriculum (pretraining text, conversations,
    /// preference rankings, RL prompts with checkers, few-shot probes).
    Curriculum(CurriculumArgs),
    /// The whole recipe on the built-in curriculum: tokenizer, pretraining, SFT, reward model,
    /// PPO, evaluation of every stage and a report card.
    Speedrun(SpeedrunArgs),
    /// Measure throughput: a training step, prefill and decode, tokenizer encode and training,
    /// the fp32 matmul ceiling (bench/compare.sh runs the peers beside these).
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Median time of AdamW training steps on random tokens (default: the GPT-2-small-like
    /// config of issue 10: 6 layers, width 384, 6 heads, context 256, vocab 8192, batch 8).
    Train {
        #[command(flatten)]
        model: chatforge::bench::TrainBenchOptions,
        #[arg(long)]
        json: bool,
    },
    /// Best fp32 GFLOP/s of an n x n matmul.
    Matmul {
        #[arg(long, default_value_t = 1024)]
        size: usize,
        #[arg(long, default_value_t = 10)]
        repeats: usize,
        #[arg(long)]
        json: bool,
    },
    /// Prefill and decode tokens/s of a model (greedy, stops disabled).
    Generate {
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value_t = 128)]
        prompt_tokens: usize,
        #[arg(long, default_value_t = 128)]
        new_tokens: usize,
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        #[arg(long)]
        json: bool,
    },
    /// Encode throughput of a tokenizer over documents, and optionally BPE training time.
    Tokenize {
        /// A tokenizer.json or a directory holding one.
        #[arg(long)]
        tokenizer: PathBuf,
        #[arg(long, num_args = 1.., required = true)]
        input: Vec<PathBuf>,
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Also time training a BPE of this vocabulary size on the same documents.
        #[arg(long)]
        train_vocab: Option<usize>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum TokenizerCommand {
    /// Train byte-level BPE on text files and write DIR/tokenizer.json.
    Train(TokenizerTrainArgs),
    /// Show how a text is split into tokens.
    Encode {
        #[arg(long)]
        tokenizer: PathBuf,
        #[arg(long)]
        text: String,
    },
}

#[derive(Args)]
struct InputArgs {
    /// Input files (plain text, JSONL or Parquet).
    #[arg(long, num_args = 1.., required = true)]
    input: Vec<PathBuf>,
    /// How files are cut into documents.
    #[arg(long, value_enum, default_value = "auto")]
    format: DocFormat,
    /// JSONL field or Parquet column holding the text.
    #[arg(long, default_value = "text")]
    text_field: String,
}

#[derive(Args)]
struct TokenizerTrainArgs {
    #[command(flatten)]
    input: InputArgs,
    /// Vocabulary size including the 256 byte tokens and the special tokens.
    #[arg(long, default_value_t = 2048)]
    vocab_size: usize,
    #[arg(long)]
    out: PathBuf,
    /// Pre-tokenizer split.
    #[arg(long, value_enum, default_value = "digits")]
    pattern: SplitPattern,
    /// Replace the chat special tokens with these (comma-separated), e.g. "<|endoftext|>".
    #[arg(long, value_delimiter = ',')]
    special_tokens: Option<Vec<String>>,
    /// Compare the learned merges with a reference merges.txt (one "a b" pair per line).
    #[arg(long)]
    compare_merges: Option<PathBuf>,
}

#[derive(Args)]
struct TokenizeArgs {
    #[arg(long)]
    tokenizer: PathBuf,
    #[command(flatten)]
    input: InputArgs,
    /// Output shard directory.
    #[arg(long)]
    out: PathBuf,
    /// Fraction of documents held out for validation.
    #[arg(long, default_value_t = 0.05)]
    val_fraction: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Tokens per shard file.
    #[arg(long, default_value_t = 100_000_000)]
    shard_tokens: u64,
}

/// Optimisation settings shared by the training stages.
#[derive(Args, Clone)]
struct TrainArgs {
    /// Optimizer steps.
    #[arg(long)]
    steps: Option<usize>,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Peak learning rate.
    #[arg(long)]
    lr: Option<f64>,
    /// Final learning rate as a fraction of the peak.
    #[arg(long, default_value_t = 0.1)]
    min_lr_ratio: f64,
    #[arg(long)]
    warmup_steps: Option<usize>,
    /// AdamW weight decay on matrices (default: the stage's, 0.1 for pretraining and SFT, 0 for
    /// reward and RLHF).
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Global gradient-norm clip (0 = off).
    #[arg(long, default_value_t = 1.0)]
    grad_clip: f64,
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    #[arg(long, default_value_t = 100)]
    eval_every: usize,
    #[arg(long, default_value_t = 200)]
    checkpoint_every: usize,
    /// Checkpoints to keep.
    #[arg(long, default_value_t = 3)]
    keep_checkpoints: usize,
    /// Steps in a row whose loss is not finite (each skipped) before the run stops.
    #[arg(long, default_value_t = 5)]
    max_bad_steps: usize,
    /// Matmul precision: f32; bf16 (the projections' matmuls with bf16 operands and f32 sums on
    /// AMX tiles, mixed precision: the same loss curve, about 1.6x faster steps; refused without
    /// AMX); or auto (bf16 where the CPU has AMX, else f32). Default: f32, except `speedrun`,
    /// which uses auto to fit its time budget.
    #[arg(long, value_enum)]
    precision: Option<chatforge::train::Precision>,
    /// Continue from the run's last checkpoint.
    #[arg(long)]
    resume: bool,
    /// Stop right after this step's checkpoint, as if killed (for testing resume).
    #[arg(long, hide = true)]
    halt_after: Option<usize>,
}

impl TrainArgs {
    /// Loop options with this stage's defaults for the unset values.
    fn loop_options(&self, steps: usize, lr: f64, warmup: usize) -> LoopOptions {
        self.loop_options_from(&LoopOptions {
            steps,
            lr,
            warmup_steps: warmup,
            ..Default::default()
        })
    }

    /// Loop options with a stage's defaults (`d`) for the unset values.
    fn loop_options_from(&self, d: &LoopOptions) -> LoopOptions {
        LoopOptions {
            steps: self.steps.unwrap_or(d.steps),
            grad_accum: self.grad_accum,
            lr: self.lr.unwrap_or(d.lr),
            min_lr_ratio: self.min_lr_ratio,
            warmup_steps: self.warmup_steps.unwrap_or(d.warmup_steps),
            weight_decay: self.weight_decay.unwrap_or(d.weight_decay),
            grad_clip: self.grad_clip,
            seed: self.seed,
            eval_every: self.eval_every.max(1),
            log_every: 10,
            checkpoint_every: self.checkpoint_every.max(1),
            keep_checkpoints: self.keep_checkpoints,
            max_bad_steps: self.max_bad_steps,
            precision: self.precision.unwrap_or(chatforge::train::Precision::F32),
            resume: self.resume,
            halt_after: self.halt_after,
            quiet: false,
        }
    }
}

/// Model and batch shape for pretraining.
#[derive(Args, Clone)]
struct ShapeArgs {
    /// Model config.json (Hugging Face Llama fields); default: a ~2M-parameter model sized for CPUs.
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// Validation tokens per evaluation.
    #[arg(long, default_value_t = 32768)]
    eval_tokens: usize,
}

#[derive(Args)]
struct PretrainArgs {
    /// Shard directory from `chatforge tokenize`.
    #[arg(long)]
    data: PathBuf,
    /// Run directory to write.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    shape: ShapeArgs,
    #[command(flatten)]
    train: TrainArgs,
}

#[derive(Args)]
struct SamplingArgs {
    /// Maximum new tokens.
    #[arg(long, default_value_t = 200)]
    max_tokens: usize,
    /// 0 = greedy and deterministic.
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    /// Sample among the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus sampling threshold (1 = off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when this text appears (repeatable); it is not printed.
    #[arg(long)]
    stop: Vec<String>,
}

impl SamplingArgs {
    fn options(&self) -> GenerateOptions {
        GenerateOptions {
            max_tokens: self.max_tokens,
            sampling: SamplingParams {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                seed: self.seed,
            },
            stop: self.stop.clone(),
            add_bos: true,
        }
    }
}

#[derive(Args)]
struct GenerateArgs {
    /// A run directory, one of its checkpoints, or a GGUF file.
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    prompt: String,
    /// Send the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Print timing and the finish reason as JSON on stderr at the end.
    #[arg(long)]
    stats: bool,
    /// Print one JSON object (prompt and generated token ids, text, prefill and decode speed)
    /// instead of streaming the text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct SftArgs {
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
    #[arg(long, value_enum, default_value = "auto")]
    format: ChatFormat,
    /// Chat template: chatforge, chatml or llama3 (default: from the tokenizer's special tokens).
    #[arg(long)]
    template: Option<String>,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Longest conversation in tokens (default: the model's context).
    #[arg(long)]
    max_len: Option<usize>,
    /// Fraction of conversations held out for validation.
    #[arg(long, default_value_t = 0.05)]
    val_fraction: f64,
    /// Held-out conversation files instead of a fraction of --data.
    #[arg(long, num_args = 1..)]
    val_data: Vec<PathBuf>,
    /// What to do with unusable records (no assistant turn, unknown role, over the length).
    #[arg(long, value_enum, default_value = "skip")]
    on_error: OnError,
    /// Pretraining shards to mix into each batch (limits forgetting).
    #[arg(long)]
    mix_pretrain: Option<PathBuf>,
    /// Fraction of each batch taken from --mix-pretrain.
    #[arg(long, default_value_t = 0.1)]
    mix_fraction: f64,
    /// Train LoRA adapters of this rank on frozen base weights instead of every weight.
    #[arg(long)]
    lora_rank: Option<usize>,
    /// LoRA scale numerator: updates are multiplied by alpha / rank.
    #[arg(long, default_value_t = 16.0, requires = "lora_rank")]
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
    #[command(flatten)]
    train: TrainArgs,
}

/// Documents a data stage reads.
#[derive(Args)]
struct DocArgs {
    /// Input files (plain text, JSONL or Parquet).
    #[arg(long, num_args = 1.., required = true)]
    input: Vec<PathBuf>,
    #[command(flatten)]
    read: ReadArgs,
}

/// How a data stage reads its files.
#[derive(Args)]
struct ReadArgs {
    #[arg(long, value_enum, default_value = "auto")]
    format: DocFormat,
    /// JSONL field or Parquet column holding the text.
    #[arg(long, default_value = "text")]
    text_field: String,
    /// A record that cannot be read (bad JSON or UTF-8, missing field, corrupt Parquet): stop with
    /// an error naming it, or skip it and count it in the report.
    #[arg(long, value_enum, default_value = "fail")]
    on_error: OnError,
}

impl ReadArgs {
    fn options(&self) -> chatforge::data::text::ReadOptions {
        chatforge::data::text::ReadOptions {
            format: self.format,
            text_field: self.text_field.clone(),
            on_error: self.on_error,
        }
    }
}

#[derive(Args)]
struct ExportArgs {
    /// The model to export: a run, a Hugging Face or LoRA adapter directory, or (to hf) a GGUF file.
    #[arg(long)]
    model: PathBuf,
    /// Output format: hf (a Hugging Face Llama directory) or gguf (a file llama.cpp runs).
    #[arg(long, default_value = "hf")]
    format: String,
    /// Output directory (hf) or file (gguf).
    #[arg(long)]
    out: PathBuf,
    /// GGUF weight type for matrices (norms stay f32).
    #[arg(long, value_enum, default_value = "q8-0")]
    quant: chatforge::model::export::GgufQuant,
}

#[derive(Args)]
struct ServeArgs {
    /// The model: a run directory (from pretrain, sft or rlhf) or one of its checkpoints.
    #[arg(long)]
    model: PathBuf,
    /// Address to bind; the default serves this machine only.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (0 picks a free one; the address is printed).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on API requests.
    #[arg(long, env = "CHATFORGE_API_KEY")]
    api_key: Option<String>,
    /// Requests decoded together in one batch.
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Requests waiting for a place before new ones get HTTP 429.
    #[arg(long, default_value_t = 64)]
    queue: usize,
    /// The most tokens one reply may have.
    #[arg(long, default_value_t = 1024)]
    max_tokens_cap: usize,
    /// Chat template: chatforge, chatml or llama3 (default: from the tokenizer).
    #[arg(long)]
    template: Option<String>,
}

#[derive(Subcommand)]
enum DataCommand {
    /// The whole pipeline from a TOML config: clean, quality-filter and deduplicate each source in
    /// one pass, train or load a tokenizer, and write the weighted mixture as token shards
    /// (see docs/DATA.md for the config).
    Prepare {
        #[arg(long)]
        config: PathBuf,
    },
    /// Mix sources by weight into token shards with a manifest; sources below their natural share
    /// are subsampled, sources above it repeated.
    Mix {
        /// NAME:WEIGHT:PATH[,PATH...], e.g. web:0.6:web.jsonl (repeat for each source).
        #[arg(long = "source", num_args = 1.., required = true)]
        sources: Vec<String>,
        /// Tokenizer (tokenizer.json or a directory holding one).
        #[arg(long)]
        tokenizer: PathBuf,
        /// Output shard directory.
        #[arg(long)]
        out: PathBuf,
        /// Training tokens to write; default: the sources' training tokens added up.
        #[arg(long)]
        total_tokens: Option<u64>,
        #[arg(long, default_value_t = 0.01)]
        val_fraction: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[command(flatten)]
        read: ReadArgs,
    },
    /// Train the GPT-3-style quality classifier (hashed n-grams, logistic regression) on a
    /// reference corpus (--good) against raw web text (--bad); reports held-out accuracy and AUC.
    QualityTrain {
        #[arg(long, num_args = 1.., required = true)]
        good: Vec<PathBuf>,
        #[arg(long, num_args = 1.., required = true)]
        bad: Vec<PathBuf>,
        /// Model JSON to write.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        read: ReadArgs,
        #[arg(long, default_value_t = 3)]
        epochs: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Keep documents the quality model scores well: GPT-3's Pareto rule, or --threshold.
    QualityFilter {
        #[arg(long)]
        model: PathBuf,
        #[command(flatten)]
        docs: DocArgs,
        /// Output JSONL file.
        #[arg(long)]
        out: PathBuf,
        /// Keep documents scoring above this instead of the Pareto rule.
        #[arg(long)]
        threshold: Option<f64>,
        /// α of the Pareto rule (GPT-3 used 9).
        #[arg(long, default_value_t = 9.0)]
        alpha: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Clean documents: NFC, control characters, navigation/footer, timestamp and symbol lines,
    /// lines repeated across documents, a minimum length; tags each with its language. Writes
    /// JSONL ({"text", "lang"}) and OUT.report.json.
    Clean {
        #[command(flatten)]
        docs: DocArgs,
        /// Output JSONL file.
        #[arg(long)]
        out: PathBuf,
        /// Drop documents shorter than this many characters after cleaning.
        #[arg(long, default_value_t = 100)]
        min_chars: usize,
        /// A line found in at least this many documents is boilerplate.
        #[arg(long, default_value_t = 3)]
        repeated_line_documents: usize,
    },
    /// Remove exact and near-duplicate documents (MinHash + LSH over character 5-grams); writes
    /// the kept documents as JSONL and OUT.report.json with the counts.
    Dedup {
        #[command(flatten)]
        docs: DocArgs,
        /// Output JSONL file.
        #[arg(long)]
        out: PathBuf,
        /// Estimated Jaccard similarity at which two documents count as duplicates.
        #[arg(long, default_value_t = 0.8)]
        threshold: f64,
    },
}

#[derive(Args)]
struct RewardArgs {
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
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Longest conversation in tokens; longer ones lose the start of the prompt (default: the context).
    #[arg(long)]
    max_len: Option<usize>,
    /// Fraction of comparisons held out.
    #[arg(long, default_value_t = 0.1)]
    val_fraction: f64,
    /// Held-out preference files instead of a fraction of --data.
    #[arg(long, num_args = 1..)]
    val_data: Vec<PathBuf>,
    #[arg(long, value_enum, default_value = "skip")]
    on_error: OnError,
    /// RL prompts: the base model's answers to them define reward 0 (default: held-out responses).
    #[arg(long)]
    norm_prompts: Option<PathBuf>,
    /// How many of --norm-prompts to answer.
    #[arg(long, default_value_t = 64)]
    norm_samples: usize,
    /// Train only the top N Transformer blocks (with the final norm and the score head); lower
    /// blocks and the embeddings keep the base model's weights. Default: all.
    #[arg(long)]
    train_layers: Option<usize>,
    #[command(flatten)]
    train: TrainArgs,
}

#[derive(Args)]
struct RlhfArgs {
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
    #[arg(long, value_enum, default_value = "ppo")]
    algo: Algo,
    /// Prompts per rollout batch.
    #[arg(long, default_value_t = 16)]
    rollout_prompts: usize,
    /// Samples per prompt for GRPO (and PPO with --prompt-baseline).
    #[arg(long, default_value_t = 4)]
    group_size: usize,
    /// PPO: sample --group-size answers per prompt and score each against the mean of the others.
    #[arg(long)]
    prompt_baseline: bool,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Sampling temperature of rollouts.
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// Passes over each rollout batch.
    #[arg(long, default_value_t = 2)]
    epochs: usize,
    /// Sequences (or DPO pairs) per optimizer step.
    #[arg(long, default_value_t = 8)]
    minibatch: usize,
    /// PPO/GRPO ratio clip ε.
    #[arg(long, default_value_t = 0.2)]
    clip: f64,
    #[arg(long, default_value_t = 0.2)]
    value_clip: f64,
    /// Weight of the value loss (it trains the value head, which reads the policy's hidden state).
    #[arg(long, default_value_t = 0.1)]
    vf_coef: f64,
    /// The value head's learning rate as a multiple of --lr (it starts from scratch).
    #[arg(long, default_value_t = 30.0)]
    value_lr_scale: f64,
    #[arg(long, default_value_t = 1.0)]
    gamma: f64,
    /// GAE λ.
    #[arg(long, default_value_t = 0.95)]
    lambda: f64,
    /// β: KL penalty to the SFT model.
    #[arg(long, default_value_t = 0.05)]
    kl_coef: f64,
    /// Adapt β towards this KL per response (nats).
    #[arg(long)]
    target_kl: Option<f64>,
    #[arg(long, default_value_t = 10000.0)]
    kl_horizon: f64,
    /// PPO-ptx: pretraining shards whose LM loss is mixed in.
    #[arg(long)]
    ptx_data: Option<PathBuf>,
    #[arg(long, default_value_t = 0.0)]
    ptx_coef: f64,
    /// PPO/GRPO reward: the reward model or the prompts' programmatic checker ("answer").
    #[arg(long, value_enum, default_value = "model")]
    reward_source: RewardSource,
    /// DPO β.
    #[arg(long, default_value_t = 0.1)]
    dpo_beta: f64,
    /// Held-out prompts answered at each evaluation.
    #[arg(long, default_value_t = 64)]
    eval_samples: usize,
    #[command(flatten)]
    train: TrainArgs,
}

#[derive(Args)]
struct ChatArgs {
    /// A run directory (SFT or later) or one of its checkpoints.
    #[arg(long)]
    model: PathBuf,
    /// Chat template: chatforge, chatml or llama3 (default: from the tokenizer).
    #[arg(long)]
    template: Option<String>,
    /// System prompt.
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    sampling: SamplingArgs,
}

#[derive(Args)]
struct EvalArgs {
    #[arg(long)]
    model: PathBuf,
    /// KIND:FILE, repeatable. Kinds: arc, hellaswag, mmlu (CSV), gsm8k, curriculum (rl_prompts_*.jsonl),
    /// probes (fewshot_probes.jsonl), bpb (a shard directory).
    #[arg(long, required = true)]
    task: Vec<String>,
    /// In-context examples (taken from the start of each file) for multiple choice and base-model GSM8K.
    #[arg(long, default_value_t = 0)]
    shots: usize,
    /// Score at most N items per task.
    #[arg(long)]
    limit: Option<usize>,
    /// Chain-of-thought prompting for GSM8K.
    #[arg(long)]
    cot: bool,
    /// Treat the model as a base model (few-shot text prompts) even if it has a chat template.
    #[arg(long)]
    base: bool,
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Write the results as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write each curriculum prompt with the model's reply and the checker's verdict here (JSONL).
    #[arg(long)]
    answers: Option<PathBuf>,
}

#[derive(Args)]
struct CurriculumArgs {
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Multiplies every count (1 = about 1.5 MB of pretraining text).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
}

#[derive(Args)]
struct SpeedrunArgs {
    /// Size of the curriculum run: tiny (under 3 minutes) or small (about 30 minutes).
    #[arg(long, value_enum, default_value = "small")]
    preset: Preset,
    /// Output directory; rerunning with the same one resumes at the first unfinished stage.
    #[arg(long, default_value = "runs/speedrun")]
    out: PathBuf,
    /// Pretrain on these text files instead of the built-in curriculum (tokenizer, shards,
    /// pretraining and samples only; the --steps, --lr... flags apply).
    #[arg(long, num_args = 1..)]
    input: Vec<PathBuf>,
    #[arg(long, value_enum, default_value = "auto")]
    format: DocFormat,
    /// Vocabulary size in --input mode.
    #[arg(long, default_value_t = 2048)]
    vocab_size: usize,
    #[command(flatten)]
    shape: ShapeArgs,
    #[command(flatten)]
    train: TrainArgs,
    /// Prompt for the closing samples in --input mode.
    #[arg(long, default_value = "")]
    prompt: String,
}

fn pretrain_options(
    shape: &ShapeArgs,
    t: &TrainArgs,
    data: PathBuf,
    out: PathBuf,
) -> PretrainOptions {
    PretrainOptions {
        data,
        out,
        config: shape.config.clone(),
        batch_size: shape.batch_size,
        seq_len: shape.seq_len,
        eval_tokens: shape.eval_tokens,
        train: t.loop_options(1000, 3e-3, 50),
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Tokenizer(TokenizerCommand::Train(a)) => {
            let opts = TrainOptions {
                vocab_size: a.vocab_size,
                pattern: a.pattern,
                special_tokens: a
                    .special_tokens
                    .unwrap_or_else(|| CHAT_SPECIAL_TOKENS.iter().map(|s| s.to_string()).collect()),
            };
            let (tok, report) = Tokenizer::train_on_files(
                &a.input.input,
                a.input.format,
                &a.input.text_field,
                &opts,
            )?;
            let file = tok.save(&a.out)?;
            println!("{}", serde_json::to_string(&report)?);
            if tok.vocab_size() < a.vocab_size {
                eprintln!(
                    "note: the corpus ran out of pairs to merge; vocabulary is {} instead of {}",
                    tok.vocab_size(),
                    a.vocab_size
                );
            }
            eprintln!("wrote {}", file.display());
            if let Some(reference) = a.compare_merges {
                let expected = chatforge::tokenizer::read_merges_file(&reference)?;
                let (in_order, anywhere) =
                    chatforge::tokenizer::compare_merges(tok.merges(), &expected);
                println!(
                    "reference merges: {in_order}/{n} reproduced in order, {anywhere}/{n} present",
                    n = expected.len()
                );
            }
        }
        Command::Tokenizer(TokenizerCommand::Encode { tokenizer, text }) => {
            let tok = Tokenizer::load(&tokenizer)?;
            let ids = tok.encode(&text)?;
            let pieces: Vec<String> = ids
                .iter()
                .map(|&i| tok.decode(&[i]).unwrap_or_default())
                .collect();
            println!(
                "{}",
                serde_json::json!({"ids": ids, "pieces": pieces, "count": ids.len()})
            );
        }
        Command::Tokenize(a) => {
            let tok = Tokenizer::load(&a.tokenizer)?;
            let meta = shards::tokenize_files(
                &tok,
                &a.input.input,
                &a.out,
                &TokenizeOptions {
                    format: a.input.format,
                    text_field: a.input.text_field,
                    val_fraction: a.val_fraction,
                    seed: a.seed,
                    max_tokens_per_shard: a.shard_tokens,
                },
            )?;
            println!("{}", serde_json::to_string_pretty(&meta)?);
        }
        Command::Pretrain(a) => {
            let opts = pretrain_options(&a.shape, &a.train, a.data, a.out);
            let mut report = serde_json::to_value(pretrain(&opts)?)?;
            report.as_object_mut().map(|o| o.remove("losses"));
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Command::Generate(a) => {
            let lm = chatforge::model::load(&a.model, &candle_core::Device::Cpu)?;
            let opts = a.sampling.options();
            let mut stops = chatforge::infer::generate::stop_ids(&lm);
            let ids = if a.chat {
                let template = lm.template()?;
                stops.extend(template.stop_ids(&lm.tokenizer));
                let m = [chatforge::tokenizer::chat::Message::new(
                    chatforge::tokenizer::chat::Role::User,
                    a.prompt.clone(),
                )];
                chatforge::tokenizer::chat::render(&lm.tokenizer, &template, &m, true)?.ids
            } else {
                let mut ids: Vec<u32> = lm.tokenizer.bos_id().into_iter().collect();
                ids.extend(lm.tokenizer.encode(&a.prompt)?);
                ids
            };
            let mut out = std::io::stdout();
            if !a.json && !a.chat {
                print!("{}", a.prompt);
            }
            let g = generate_from_ids(&lm, &ids, &opts, &stops, None, |piece| {
                if !a.json {
                    print!("{piece}");
                    out.flush()?;
                }
                Ok(())
            })?;
            let decode_tokens = g.tokens.len().saturating_sub(1);
            let timing = serde_json::json!({"prompt_tokens": g.prompt_tokens, "completion_tokens": g.tokens.len(),
                "finish_reason": g.finish_reason, "seconds": g.seconds,
                "prefill_tokens_per_s": g.prompt_tokens as f64 / g.prefill_seconds.max(1e-9),
                "decode_tokens_per_s": decode_tokens as f64 / (g.seconds - g.prefill_seconds).max(1e-9),
                "peak_rss_mb": chatforge::util::peak_rss_mb()});
            if a.json {
                let mut j = timing;
                j["prompt_ids"] = serde_json::json!(ids);
                j["ids"] = serde_json::json!(g.tokens);
                j["text"] = serde_json::json!(g.text);
                println!("{j}");
            } else {
                println!();
                if a.stats {
                    eprintln!("{timing}");
                } else if g.finish_reason == FinishReason::Length
                    && g.tokens.len() < opts.max_tokens
                {
                    eprintln!("(stopped at the model's context length)");
                }
            }
        }
        Command::Sft(a) => {
            let train = a.train.loop_options_from(&SftOptions::default().train);
            let opts = SftOptions {
                base: a.base,
                data: a.data,
                out: a.out,
                format: a.format,
                template: a.template,
                batch_size: a.batch_size,
                max_len: a.max_len,
                val_fraction: a.val_fraction,
                val_data: a.val_data,
                on_error: a.on_error,
                mix_pretrain: a.mix_pretrain,
                mix_fraction: a.mix_fraction,
                lora: match a.lora_rank {
                    Some(rank) => Some(LoraConfig {
                        merge: !a.lora_separate,
                        ..LoraConfig::new(rank, a.lora_alpha, &a.lora_targets)?
                    }),
                    None => None,
                },
                train,
            };
            println!("{}", serde_json::to_string_pretty(&sft(&opts)?)?);
        }
        Command::Data(DataCommand::Clean {
            docs,
            out,
            min_chars,
            repeated_line_documents,
        }) => {
            let opts = chatforge::data::clean::CleanOptions {
                min_chars,
                repeated_line_documents: repeated_line_documents.max(2),
            };
            let run = chatforge::data::clean::clean_files(
                &docs.input,
                &docs.read.options(),
                &out,
                &opts,
            )?;
            print_stage_report(&run, &run.io)?;
        }
        Command::Data(DataCommand::QualityTrain {
            good,
            bad,
            out,
            read,
            epochs,
            seed,
        }) => {
            let m = chatforge::data::quality::train_files(
                &good,
                &bad,
                &read.options(),
                &out,
                epochs,
                seed,
            )?;
            println!(
                "{}",
                serde_json::json!({"heldout_accuracy": m.heldout_accuracy, "heldout_auc": m.heldout_auc,
                    "train_documents": m.train_documents, "heldout_documents": m.heldout_documents,
                    "model": out})
            );
        }
        Command::Data(DataCommand::QualityFilter {
            model,
            docs,
            out,
            threshold,
            alpha,
            seed,
        }) => {
            let r = chatforge::data::quality::filter_files(
                &model,
                &docs.input,
                &docs.read.options(),
                &out,
                chatforge::data::quality::KeepRule {
                    threshold,
                    alpha,
                    seed,
                },
            )?;
            print_stage_report(&r, &r.io)?;
        }
        Command::Data(DataCommand::Dedup {
            docs,
            out,
            threshold,
        }) => {
            let opts = chatforge::data::dedup::DedupOptions {
                threshold,
                ..Default::default()
            };
            let run = chatforge::data::dedup::dedup_files(
                &docs.input,
                &docs.read.options(),
                &out,
                &opts,
            )?;
            print_stage_report(&run, &run.io)?;
        }
        Command::Data(DataCommand::Prepare { config }) => {
            let config = chatforge::data::prepare::PrepareConfig::load(&config)?;
            let report = chatforge::data::prepare::prepare(&config)?;
            print!("{}", chatforge::data::prepare::render_report(&report));
        }
        Command::Data(DataCommand::Mix {
            sources,
            tokenizer,
            out,
            total_tokens,
            val_fraction,
            seed,
            read,
        }) => {
            let sources = sources
                .iter()
                .map(|s| {
                    let mut src = chatforge::data::mix::Source::parse(s)?;
                    src.format = read.format;
                    src.text_field = read.text_field.clone();
                    Ok(src)
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let tok = chatforge::tokenizer::Tokenizer::load(&tokenizer)?;
            let opts = chatforge::data::mix::MixOptions {
                total_tokens,
                val_fraction,
                seed,
                on_error: read.on_error,
                ..Default::default()
            };
            let manifest = chatforge::data::mix::mix(&tok, &sources, &out, &opts, None)?;
            print!("{}", chatforge::data::mix::render_manifest(&manifest));
        }
        Command::Reward(a) => {
            let train = a.train.loop_options_from(&RewardOptions::default().train);
            let opts = RewardOptions {
                base: a.base,
                data: a.data,
                val_data: a.val_data,
                out: a.out,
                batch_size: a.batch_size,
                max_len: a.max_len,
                val_fraction: a.val_fraction,
                on_error: a.on_error,
                norm_prompts: a.norm_prompts,
                norm_samples: a.norm_samples,
                train_layers: a.train_layers,
                train,
            };
            println!("{}", serde_json::to_string_pretty(&train_reward(&opts)?)?);
        }
        Command::Rlhf(a) => {
            let train = a.train.loop_options_from(&RlhfOptions::default().train);
            let opts = RlhfOptions {
                algo: a.algo,
                policy: a.policy,
                reward: a.reward,
                prompts: a.prompts,
                eval_prompts: a.eval_prompts,
                prefs: a.prefs,
                val_prefs: a.val_prefs,
                out: a.out,
                rollout_prompts: a.rollout_prompts,
                group_size: a.group_size,
                prompt_baseline: a.prompt_baseline,
                max_new_tokens: a.max_new_tokens,
                temperature: a.temperature,
                epochs: a.epochs,
                minibatch: a.minibatch,
                clip: a.clip,
                value_clip: a.value_clip,
                vf_coef: a.vf_coef,
                value_lr_scale: a.value_lr_scale,
                gamma: a.gamma,
                lambda: a.lambda,
                kl_coef: a.kl_coef,
                target_kl: a.target_kl,
                kl_horizon: a.kl_horizon,
                ptx_data: a.ptx_data,
                ptx_coef: a.ptx_coef,
                reward_source: a.reward_source,
                dpo_beta: a.dpo_beta,
                eval_samples: a.eval_samples,
                train,
            };
            println!("{}", serde_json::to_string_pretty(&rlhf(&opts)?)?);
        }
        Command::Chat(a) => {
            let lm = chatforge::model::load(&a.model, &candle_core::Device::Cpu)?;
            let template = a
                .template
                .as_deref()
                .map(ChatTemplate::by_name)
                .transpose()?;
            let mut session = ChatSession::new(&lm, template, a.sampling.options())?;
            session.system = a.system;
            let stdin = std::io::stdin();
            let interactive = stdin.is_terminal();
            run_terminal(&mut session, &mut stdin.lock(), interactive)?;
        }
        Command::Export(a) => match a.format.as_str() {
            "hf" => {
                chatforge::model::export::export_hf(&a.model, &a.out)?;
                eprintln!(
                    "wrote a Hugging Face model directory to {}",
                    a.out.display()
                );
            }
            "gguf" => {
                chatforge::model::export::export_gguf(&a.model, &a.out, a.quant)?;
                eprintln!("wrote {}", a.out.display());
            }
            other => anyhow::bail!("--format {other}: use hf or gguf"),
        },
        Command::Serve(a) => {
            let template = a
                .template
                .as_deref()
                .map(ChatTemplate::by_name)
                .transpose()?;
            chatforge::serve::serve(&chatforge::serve::ServeOptions {
                model: a.model,
                host: a.host,
                port: a.port,
                api_key: a.api_key,
                max_batch: a.max_batch,
                queue: a.queue,
                max_tokens_cap: a.max_tokens_cap,
                template,
            })?;
        }
        Command::Eval(a) => {
            let lm = chatforge::model::load(&a.model, &candle_core::Device::Cpu)?;
            let opts = chatforge::eval::EvalOptions {
                tasks: a.task,
                shots: a.shots,
                limit: a.limit,
                chat: a.base.then_some(false),
                cot: a.cot,
                max_tokens: a.max_tokens,
                batch_size: a.batch_size,
                answers: a.answers,
            };
            let results = chatforge::eval::run(&lm, &opts)?;
            print!("{}", chatforge::eval::markdown(&results));
            if let Some(out) = a.out {
                chatforge::util::write_json_atomic(&out, &results)?;
            }
        }
        Command::Report { run } => {
            let path = chatforge::eval::report::report(&run)?;
            println!("{}", path.display());
        }
        Command::Curriculum(a) => {
            if !(a.scale > 0.0 && a.scale.is_finite()) {
                anyhow::bail!("--scale must be positive, got {}", a.scale);
            }
            let size = chatforge::data::curriculum::CurriculumSize::scaled(a.scale);
            let counts = chatforge::data::curriculum::generate(&a.out, a.seed, &size)?;
            println!("{}", serde_json::to_string_pretty(&counts)?);
            eprintln!("wrote {}", a.out.display());
        }
        Command::Bench(b) => run_bench(b)?,
        Command::Speedrun(mut a) => {
            a.train.precision = a
                .train
                .precision
                .or(Some(chatforge::train::Precision::Auto));
            let opts = chatforge::speedrun::SpeedrunOptions {
                out: a.out.clone(),
                preset: a.preset,
                seed: a.train.seed,
                inputs: a.input,
                vocab_size: a.vocab_size,
                format: a.format,
                pretrain: pretrain_options(&a.shape, &a.train, PathBuf::new(), PathBuf::new()),
                prompt: a.prompt,
                quiet: false,
            };
            chatforge::speedrun::speedrun(&opts)?;
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    // The server keeps its own threads and runs the model on the engine's (see `Engine::start`).
    let result = if matches!(cli.command, Command::Serve(_)) {
        run(cli)
    } else {
        chatforge::util::on_compute_pool(|| run(cli))
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

// Training allocates and frees many large tensors per step; glibc returns them to the OS and pays
// page faults to get them back. mimalloc keeps them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Tells mimalloc never to hand freed memory back to the OS. By default it purges after 10 ms, and
/// a training step frees and reallocates its activations (hundreds of MB) every step: the kernel
/// then zeroed the pages again on each fault, a quarter of the step's time (measured with
/// `perf`; `bench train` went from 1.9 to 1.6 s/step, system time 6.3 to 1.5 s). The cost is
/// that the process keeps its peak memory. `MIMALLOC_PURGE_DELAY` still overrides this.
fn keep_freed_memory() {
    // `mi_option_purge_delay` in mimalloc's option enum (mimalloc.h, v2 and v3 alike), which
    // libmimalloc-sys's bindings leave out: it sits between `eager_commit_delay` (14) and
    // `use_numa_nodes` (16).
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one integer option; mimalloc reads it on later frees.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
}

/// Prints a data stage's report as JSON, telling the user on stderr when records were left out.
fn print_stage_report<T: serde::Serialize>(
    report: &T,
    io: &chatforge::data::StageIo,
) -> anyhow::Result<()> {
    let skipped = &io.skipped;
    if skipped.records > 0 {
        eprintln!(
            "warning: skipped {} unreadable records ({:?}); first: {}",
            skipped.records,
            skipped.reasons,
            skipped.examples.first().map(String::as_str).unwrap_or("")
        );
    }
    println!("{}", serde_json::to_string_pretty(report)?);
    Ok(())
}

fn print_bench<T: serde::Serialize>(json: bool, value: &T, rows: Vec<Vec<String>>) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        print!(
            "{}",
            chatforge::util::text_table(&["measure", "value"], &rows)
        );
    }
    Ok(())
}

fn run_bench(b: BenchCommand) -> Result<()> {
    use chatforge::bench;
    let row = |k: &str, v: String| vec![k.to_string(), v];
    match b {
        BenchCommand::Train { model, json } => {
            let r = bench::train(&model)?;
            let rows = vec![
                row(
                    "parameters",
                    chatforge::util::human_count(r.parameters as f64),
                ),
                row("tokens per step", r.tokens_per_step.to_string()),
                row("median s/step", format!("{:.3}", r.median_step_seconds)),
                row("  forward", format!("{:.3}", r.median_forward_seconds)),
                row("  backward", format!("{:.3}", r.median_backward_seconds)),
                row("  clip + AdamW", format!("{:.3}", r.median_update_seconds)),
                row("tokens/s", format!("{:.0}", r.tokens_per_second)),
                row("GFLOP/s", format!("{:.1}", r.gflop_per_second)),
                row("peak RSS MB", format!("{:.0}", r.peak_rss_mb)),
            ];
            print_bench(json, &r, rows)
        }
        BenchCommand::Matmul {
            size,
            repeats,
            json,
        } => {
            let r = bench::matmul(size, repeats)?;
            let rows = vec![
                row("size", size.to_string()),
                row("GFLOP/s (fp32)", format!("{:.1}", r.gflop_per_second)),
                row(
                    "GFLOP/s (bf16, AMX)",
                    r.bf16_gflop_per_second
                        .map_or("no AMX on this CPU".into(), |g| format!("{g:.1}")),
                ),
            ];
            print_bench(json, &r, rows)
        }
        BenchCommand::Generate {
            model,
            prompt_tokens,
            new_tokens,
            repeats,
            json,
        } => {
            let r = bench::generate(&model, prompt_tokens, new_tokens, repeats)?;
            let rows = vec![
                row("prompt tokens", prompt_tokens.to_string()),
                row("new tokens", new_tokens.to_string()),
                row(
                    "prefill tokens/s",
                    format!("{:.1}", r.prefill_tokens_per_second),
                ),
                row(
                    "decode tokens/s",
                    format!("{:.1}", r.decode_tokens_per_second),
                ),
                row("peak RSS MB", format!("{:.0}", r.peak_rss_mb)),
            ];
            print_bench(json, &r, rows)
        }
        BenchCommand::Tokenize {
            tokenizer,
            input,
            repeats,
            train_vocab,
            json,
        } => {
            let r = bench::tokenize(&tokenizer, &input, repeats, train_vocab)?;
            let mut rows = vec![
                row("documents", r.documents.to_string()),
                row("MB", format!("{:.1}", r.megabytes)),
                row("encode MB/s", format!("{:.2}", r.encode_mb_per_second)),
                row(
                    "encode tokens/s",
                    format!("{:.0}", r.encode_tokens_per_second),
                ),
            ];
            if let (Some(v), Some(s)) = (r.train_vocab, r.train_seconds) {
                rows.push(row(
                    &format!("BPE training to {v} tokens, s"),
                    format!("{s:.2}"),
                ));
            }
            print_bench(json, &r, rows)
        }
    }
}
