//! The `chatforge` command line: clap definitions, one file per command group, each turning its
//! flags into the library's options and calling the library. A flag the user leaves out keeps the
//! library's default: flags either take their default from the library's `Default` or are
//! `Option`s merged over it, so every default is written once, in the module that owns the option.

mod bench;
mod data;
mod index;
mod infer;
mod train;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

pub use train::TrainArgs;

#[derive(Parser)]
#[command(
    name = "chatforge",
    version,
    about = "Build a small ChatGPT yourself: data, tokenizer, pretraining, SFT, reward model, RLHF, evaluation, chat and an OpenAI-compatible server"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per process: the size of the larger variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub enum Command {
    /// Train or inspect a byte-level BPE tokenizer.
    #[command(subcommand)]
    Tokenizer(data::TokenizerCommand),
    /// Turn text or JSONL files into binary token shards with a train/validation split.
    Tokenize(data::TokenizeArgs),
    /// Pretrain a Llama-style model on token shards (next-token prediction).
    Pretrain(train::PretrainArgs),
    /// Generate text from a trained model, streaming tokens to stdout.
    Generate(infer::GenerateArgs),
    /// Instruction-tune a pretrained run on conversations (loss on assistant tokens only).
    Sft(train::SftArgs),
    /// Data preparation: the whole pipeline from a config (prepare), or cleaning, quality
    /// classifier and filter, duplicate removal and weighted mixtures one by one.
    #[command(subcommand)]
    Data(data::DataCommand),
    /// Train a reward model on ranked or paired answers (Bradley-Terry, scalar head).
    Reward(train::RewardArgs),
    /// Tune a policy with human-feedback RL: PPO (default), DPO or GRPO.
    Rlhf(train::RlhfArgs),
    /// Talk to a model in the terminal (or pipe one message per line).
    Chat(infer::ChatArgs),
    /// Export a model for other tools: a Hugging Face Llama directory (`--format hf`; from a GGUF
    /// file too, dequantized, to fine-tune it) or a GGUF file llama.cpp runs (`--format gguf`).
    Export(infer::ExportArgs),
    /// Serve a model over an OpenAI-compatible HTTP API (streaming, continuous batching) with a
    /// chat page at /.
    Serve(infer::ServeArgs),
    /// Score a model on benchmark files and the curriculum (JSON and a Markdown table).
    Eval(infer::EvalArgs),
    /// Write RUN/report.md: every stage's numbers, loss curves (PNG), evaluations and samples.
    Report {
        /// The last run of the chain (its parents are followed through chatforge.json).
        run: PathBuf,
    },
    /// Write the built-in bilingual synthetic curriculum (pretraining text, conversations,
    /// preference rankings, RL prompts with checkers, few-shot probes).
    Curriculum(data::CurriculumArgs),
    /// The whole recipe on the built-in curriculum: tokenizer, pretraining, SFT, reward model,
    /// PPO, evaluation of every stage and a report card.
    Speedrun(train::SpeedrunArgs),
    /// Measure throughput: a training step, prefill and decode, tokenizer encode and training,
    /// the fp32 matmul ceiling (bench/compare.sh runs the peers beside these).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Documents for retrieval: `index add` files, `index search` them.
    #[command(subcommand)]
    Index(index::IndexCommand),
}

impl Cli {
    /// Whether the command runs its own threads (the server) rather than the compute pool.
    pub fn owns_threads(&self) -> bool {
        matches!(self.command, Command::Serve(_))
    }

    /// Whether the command can run as one of several ranks under mpirun (the training stages and
    /// `data prepare`).
    pub fn runs_distributed(&self) -> bool {
        matches!(
            self.command,
            Command::Pretrain(_)
                | Command::Sft(_)
                | Command::Reward(_)
                | Command::Rlhf(_)
                | Command::Data(data::DataCommand::Prepare { .. })
        )
    }

    /// The subcommand as typed (for messages).
    pub fn command_name(&self) -> String {
        std::env::args()
            .skip(1)
            .find(|a| !a.starts_with('-'))
            .unwrap_or_default()
    }

    pub fn run(self) -> Result<()> {
        match self.command {
            Command::Tokenizer(c) => data::tokenizer(c),
            Command::Tokenize(a) => data::tokenize(a),
            Command::Data(c) => data::data(c),
            Command::Curriculum(a) => data::curriculum(a),
            Command::Pretrain(a) => train::pretrain(a),
            Command::Sft(a) => train::sft(a),
            Command::Reward(a) => train::reward(a),
            Command::Rlhf(a) => train::rlhf(a),
            Command::Speedrun(a) => train::speedrun(a),
            Command::Generate(a) => infer::generate(a),
            Command::Chat(a) => infer::chat(a),
            Command::Serve(a) => infer::serve(a),
            Command::Eval(a) => infer::eval(a),
            Command::Export(a) => infer::export(a),
            Command::Report { run } => {
                println!("{}", crate::eval::report::report(&run)?.display());
                Ok(())
            }
            Command::Bench(b) => bench::bench(b),
            Command::Index(c) => index::index(c),
        }
    }
}

/// Prints a report as indented JSON on stdout (rank 0 alone under mpirun).
fn print_json<T: serde::Serialize>(value: &T) -> Result<()> {
    if !crate::dist::is_leader() {
        return Ok(());
    }
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    //! A flag left out keeps the library's default: each command parsed bare gives the options
    //! of the stage's `Default`, and a flag given replaces exactly its field.
    use super::*;
    use crate::rlhf::RlhfOptions;
    use crate::speedrun::SpeedrunOptions;
    use crate::train::pretrain::PretrainOptions;
    use crate::train::reward::RewardOptions;
    use crate::train::sft::SftOptions;

    fn parse(args: &[&str]) -> Command {
        let mut all = vec!["chatforge"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all)
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
            .command
    }

    fn same<T: std::fmt::Debug>(a: &T, b: &T) {
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
    }

    const SFT: [&str; 7] = ["sft", "--base", "b", "--data", "d", "--out", "o"];

    fn sft(extra: &[&str]) -> SftOptions {
        let args: Vec<&str> = SFT.iter().chain(extra).copied().collect();
        match parse(&args) {
            Command::Sft(a) => a.options().unwrap(),
            _ => unreachable!(),
        }
    }

    #[test]
    fn sft_without_flags_keeps_the_stages_defaults() {
        let o = sft(&[]);
        let d = SftOptions {
            base: "b".into(),
            data: vec!["d".into()],
            out: "o".into(),
            ..Default::default()
        };
        same(&o, &d);
        // The stage's own interval, not the pretraining one the shared flags once imposed.
        assert_eq!(o.train.eval_every, 50);
        assert_ne!(
            o.train.eval_every,
            PretrainOptions::default().train.eval_every
        );
    }

    #[test]
    fn a_given_flag_replaces_only_its_field() {
        let o = sft(&["--eval-every", "7", "--grad-clip", "0.5", "--seed", "9"]);
        let d = SftOptions::default().train;
        assert_eq!(
            (o.train.eval_every, o.train.grad_clip, o.train.seed),
            (7, 0.5, 9)
        );
        assert_eq!((o.train.steps, o.train.lr), (d.steps, d.lr));
        assert_eq!(o.train.checkpoint_every, d.checkpoint_every);
        let err = match parse(&[&SFT[..], &["--eval-every", "0"]].concat()) {
            Command::Sft(a) => a.options().unwrap_err().to_string(),
            _ => unreachable!(),
        };
        assert!(err.contains("--eval-every"), "{err}");
    }

    #[test]
    fn reward_rlhf_pretrain_and_speedrun_keep_their_defaults() {
        match parse(&["reward", "--base", "b", "--data", "d", "--out", "o"]) {
            Command::Reward(a) => {
                let o = a.options().unwrap();
                same(&o.train, &RewardOptions::default().train);
                assert_eq!(o.train.eval_every, 50);
                assert_eq!(o.batch_size, RewardOptions::default().batch_size);
            }
            _ => unreachable!(),
        }
        match parse(&["rlhf", "--policy", "p", "--out", "o"]) {
            Command::Rlhf(a) => {
                let o = a.options().unwrap();
                let d = RlhfOptions {
                    policy: "p".into(),
                    out: "o".into(),
                    ..Default::default()
                };
                same(&o, &d);
                assert_eq!(o.train.eval_every, 25);
            }
            _ => unreachable!(),
        }
        match parse(&["rlhf", "--policy", "p", "--out", "o", "--kl-coef", "0.2"]) {
            Command::Rlhf(a) => assert_eq!(a.options().unwrap().kl_coef, 0.2),
            _ => unreachable!(),
        }
        match parse(&["pretrain", "--data", "s", "--out", "o"]) {
            Command::Pretrain(a) => {
                let o = a
                    .shape
                    .options(&a.train, PretrainOptions::default())
                    .unwrap();
                same(&o.train, &PretrainOptions::default().train);
            }
            _ => unreachable!(),
        }
        match parse(&["speedrun"]) {
            Command::Speedrun(a) => same(&a.options().unwrap(), &SpeedrunOptions::default()),
            _ => unreachable!(),
        }
    }

    #[test]
    fn architecture_switches_parse_on_and_off() {
        use crate::model::switches::GateActivation;
        let pretrain = |extra: &[&str]| {
            let args = [&["pretrain", "--data", "s", "--out", "o"], extra].concat();
            match parse(&args) {
                Command::Pretrain(a) => {
                    a.shape
                        .options(&a.train, PretrainOptions::default())
                        .unwrap()
                        .switches
                }
                _ => unreachable!(),
            }
        };
        let s = pretrain(&[
            "--qk-norm",
            "--activation",
            "relu2",
            "--logit-softcap",
            "15",
        ]);
        assert_eq!(s.qk_norm, Some(true));
        assert_eq!(s.activation, Some(GateActivation::Relu2));
        assert_eq!(s.logit_softcap, Some(15.0));
        assert_eq!((s.untied_head, s.zero_init), (None, None));
        let s = pretrain(&["--qk-norm", "false", "--zero-init", "--untied-head", "true"]);
        assert_eq!(
            (s.qk_norm, s.zero_init, s.untied_head),
            (Some(false), Some(true), Some(true))
        );
        match parse(&["speedrun", "--qk-norm", "false"]) {
            Command::Speedrun(a) => {
                assert_eq!(a.options().unwrap().pretrain.switches.qk_norm, Some(false))
            }
            _ => unreachable!(),
        }
    }

    #[test]
    fn generate_chat_and_serve_take_the_librarys_sampling_defaults() {
        use crate::infer::sampler::SamplingParams;
        match parse(&["generate", "--model", "m", "--prompt", "p"]) {
            Command::Generate(a) => same(&a.sampling, &SamplingParams::default()),
            _ => unreachable!(),
        }
        match parse(&["chat", "--model", "m", "--temperature", "0", "--stop", "x"]) {
            Command::Chat(a) => {
                assert_eq!(a.sampling.temperature, 0.0);
                assert_eq!(a.sampling.stop, vec!["x".to_string()]);
                assert_eq!(a.sampling.max_tokens, SamplingParams::DEFAULT.max_tokens);
            }
            _ => unreachable!(),
        }
        match parse(&["serve", "--model", "m"]) {
            Command::Serve(a) => {
                let d = crate::serve::ServeOptions::default();
                assert_eq!(
                    (a.port, a.max_batch, a.queue),
                    (d.port, d.max_batch, d.queue)
                );
                assert_eq!((a.host, a.max_tokens_cap), (d.host, d.max_tokens_cap));
            }
            _ => unreachable!(),
        }
    }
}
