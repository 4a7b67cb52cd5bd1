//! Commands that use a model: generate, chat, serve, eval and export.

use crate::infer::generate::{generate_from_ids, stop_ids, FinishReason};
use crate::infer::sampler::SamplingParams;
use crate::serve::ServeOptions;
use crate::tokenizer::chat::{render, ChatTemplate, Message, Role};
use crate::tools::RetrievalArgs;
use anyhow::{bail, Result};
use clap::Args;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;

fn load(model: &std::path::Path) -> Result<crate::model::LoadedModel> {
    crate::model::load(model, &candle_core::Device::Cpu)
}

fn template(name: Option<&str>) -> Result<Option<ChatTemplate>> {
    name.map(ChatTemplate::by_name).transpose()
}

#[derive(Args)]
pub struct GenerateArgs {
    /// A run directory, one of its checkpoints, or a GGUF file.
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    prompt: String,
    /// Send the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    #[command(flatten)]
    pub(super) sampling: SamplingParams,
    /// What the reply must match.
    #[command(flatten)]
    constraint: crate::infer::grammar::GrammarArgs,
    /// With --chat: answer from this index's passages (see `chatforge index`).
    #[command(flatten)]
    retrieval: RetrievalArgs,
    /// Print timing and the finish reason as JSON on stderr at the end.
    #[arg(long)]
    stats: bool,
    /// Print one JSON object (prompt and generated token ids, text, prefill and decode speed)
    /// instead of streaming the text.
    #[arg(long)]
    json: bool,
}

pub fn generate(mut a: GenerateArgs) -> Result<()> {
    // Before anything is printed or loaded.
    a.sampling.validate()?;
    a.sampling.grammar = a.constraint.grammar()?;
    if a.retrieval.index.is_some() && !a.chat {
        bail!("--index answers chat questions: add --chat");
    }
    let retrieval = a.retrieval.open()?;
    let lm = load(&a.model)?;
    let mut stops = stop_ids(&lm);
    let mut sources = Vec::new();
    let ids = if a.chat {
        let template = lm.template()?;
        stops.extend(template.stop_ids(&lm.tokenizer));
        let mut m = vec![Message::new(Role::User, a.prompt.clone())];
        if let Some(r) = &retrieval {
            let context = lm.model.config.max_position_embeddings;
            (m, sources) = r.ground(&lm.tokenizer, &m, context)?;
        }
        render(&lm.tokenizer, &template, &m, true)?.ids
    } else {
        let mut ids: Vec<u32> = lm.tokenizer.bos_id().into_iter().collect();
        ids.extend(lm.tokenizer.encode(&a.prompt)?);
        ids
    };
    let mut out = std::io::stdout();
    // A plain prompt is echoed before its continuation, once decoding has started (a grammar
    // that does not compile fails first, with nothing printed).
    let mut echo = !a.json && !a.chat;
    let g = generate_from_ids(&lm, &ids, &a.sampling, &stops, None, |piece| {
        if echo {
            print!("{}", a.prompt);
            echo = false;
        }
        if !a.json {
            print!("{}", crate::tools::readable(piece));
            out.flush()?;
        }
        Ok(())
    })?;
    if echo {
        print!("{}", a.prompt);
    }
    let decode_tokens = g.tokens.len().saturating_sub(1);
    let timing = serde_json::json!({"prompt_tokens": g.prompt_tokens, "completion_tokens": g.tokens.len(),
        "finish_reason": g.finish_reason, "seconds": g.seconds,
        "prefill_tokens_per_s": g.prompt_tokens as f64 / g.prefill_seconds.max(1e-9),
        "decode_tokens_per_s": decode_tokens as f64 / (g.seconds - g.prefill_seconds).max(1e-9),
        "peak_rss_mb": crate::util::peak_rss_mb()});
    if a.json {
        let mut j = timing;
        j["prompt_ids"] = serde_json::json!(ids);
        j["ids"] = serde_json::json!(g.tokens);
        j["text"] = serde_json::json!(g.text);
        j["sources"] = serde_json::json!(sources);
        println!("{j}");
    } else {
        println!();
        // The reply's line ends before the sources go to stderr.
        out.flush()?;
        if !sources.is_empty() {
            eprintln!("(sources: {})", crate::tools::source_list(&sources));
        }
        if a.stats {
            eprintln!("{timing}");
        } else if g.finish_reason == FinishReason::Length && g.tokens.len() < a.sampling.max_tokens
        {
            eprintln!("(stopped at the model's context length)");
        }
    }
    Ok(())
}

#[derive(Args)]
pub struct ChatArgs {
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
    pub(super) sampling: SamplingParams,
    #[command(flatten)]
    retrieval: RetrievalArgs,
}

pub fn chat(a: ChatArgs) -> Result<()> {
    use crate::infer::chat::{run_terminal, ChatSession};
    let retrieval = a.retrieval.open()?;
    let lm = load(&a.model)?;
    let mut session = ChatSession::new(&lm, template(a.template.as_deref())?, a.sampling)?;
    session.system = a.system;
    session.retrieval = retrieval;
    let stdin = std::io::stdin();
    let interactive = stdin.is_terminal();
    run_terminal(&mut session, &mut stdin.lock(), interactive)
}

#[derive(Args)]
pub struct ServeArgs {
    /// The model: a run directory (from pretrain, sft or rlhf) or one of its checkpoints.
    #[arg(long)]
    model: PathBuf,
    /// Address to bind; the default serves this machine only.
    #[arg(long, default_value_t = ServeOptions::default().host)]
    pub(super) host: String,
    /// Port (0 picks a free one; the address is printed).
    #[arg(long, default_value_t = ServeOptions::default().port)]
    pub(super) port: u16,
    /// Require `Authorization: Bearer KEY` on API requests.
    #[arg(long, env = "CHATFORGE_API_KEY")]
    api_key: Option<String>,
    /// Requests decoded together in one batch.
    #[arg(long, default_value_t = ServeOptions::default().max_batch)]
    pub(super) max_batch: usize,
    /// Requests waiting for a place before new ones get HTTP 429.
    #[arg(long, default_value_t = ServeOptions::default().queue)]
    pub(super) queue: usize,
    /// The most tokens one reply may have.
    #[arg(long, default_value_t = ServeOptions::default().max_tokens_cap)]
    pub(super) max_tokens_cap: usize,
    /// Chat template: chatforge, chatml or llama3 (default: from the tokenizer).
    #[arg(long)]
    template: Option<String>,
    #[command(flatten)]
    retrieval: RetrievalArgs,
}

pub fn serve(a: ServeArgs) -> Result<()> {
    crate::serve::serve(&ServeOptions {
        model: a.model,
        host: a.host,
        port: a.port,
        api_key: a.api_key,
        max_batch: a.max_batch,
        queue: a.queue,
        max_tokens_cap: a.max_tokens_cap,
        template: template(a.template.as_deref())?,
        retrieval: a.retrieval,
    })
}

#[derive(Args)]
pub struct EvalArgs {
    #[arg(long)]
    model: PathBuf,
    /// KIND:FILE, repeatable. Kinds: arc, hellaswag, mmlu (CSV), gsm8k, curriculum (rl_prompts_*.jsonl),
    /// probes (fewshot_probes.jsonl), loglikelihood ({"context", "continuation"} JSONL; each
    /// score goes to --answers), bpb (a shard directory).
    #[arg(long, required = true)]
    task: Vec<String>,
    /// In-context examples (taken from the start of each file) for multiple choice and base-model GSM8K.
    #[arg(long, default_value_t = crate::eval::EvalOptions::default().shots)]
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
    #[arg(long, default_value_t = crate::eval::EvalOptions::default().max_tokens)]
    max_tokens: usize,
    #[arg(long, default_value_t = crate::eval::EvalOptions::default().batch_size)]
    batch_size: usize,
    /// Write the results as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write each curriculum prompt with the model's reply and the checker's verdict here (JSONL).
    #[arg(long)]
    answers: Option<PathBuf>,
    /// Curriculum prompts are answered with passages from --index.
    #[command(flatten)]
    retrieval: RetrievalArgs,
}

pub fn eval(a: EvalArgs) -> Result<()> {
    let lm = load(&a.model)?;
    let opts = crate::eval::EvalOptions {
        tasks: a.task,
        shots: a.shots,
        limit: a.limit,
        chat: a.base.then_some(false),
        cot: a.cot,
        max_tokens: a.max_tokens,
        batch_size: a.batch_size,
        answers: a.answers,
        retrieval: a.retrieval,
    };
    let results = crate::eval::run(&lm, &opts)?;
    print!("{}", crate::eval::markdown(&results));
    if let Some(out) = a.out {
        crate::util::write_json_atomic(&out, &results)?;
    }
    Ok(())
}

/// What `export` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// A Hugging Face Llama directory.
    Hf,
    /// A GGUF file llama.cpp runs.
    Gguf,
}

#[derive(Args)]
pub struct ExportArgs {
    /// The model to export: a run, a Hugging Face or LoRA adapter directory, or (to hf) a GGUF file.
    #[arg(long)]
    model: PathBuf,
    #[arg(long, value_enum, default_value_t = ExportFormat::Hf)]
    format: ExportFormat,
    /// Output directory (hf) or file (gguf).
    #[arg(long)]
    out: PathBuf,
    /// GGUF weight type for matrices (norms stay f32).
    #[arg(long, value_enum, default_value_t = crate::model::export::GgufQuant::Q8_0)]
    quant: crate::model::export::GgufQuant,
}

pub fn export(a: ExportArgs) -> Result<()> {
    match a.format {
        ExportFormat::Hf => {
            crate::model::export::export_hf(&a.model, &a.out)?;
            eprintln!(
                "wrote a Hugging Face model directory to {}",
                a.out.display()
            );
        }
        ExportFormat::Gguf => {
            crate::model::export::export_gguf(&a.model, &a.out, a.quant)?;
            eprintln!("wrote {}", a.out.display());
        }
    }
    Ok(())
}
