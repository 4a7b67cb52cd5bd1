//! `chatforge bench`: throughput measurements printed as a table or JSON.

use crate::bench;
use anyhow::Result;
use clap::Subcommand;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Median time of AdamW training steps on random tokens (default: the GPT-2-small-like
    /// config of issue 10: 6 layers, width 384, 6 heads, context 256, vocab 8192, batch 8).
    Train {
        #[command(flatten)]
        model: crate::bench::TrainBenchOptions,
        #[arg(long)]
        json: bool,
    },
    /// Best GFLOP/s of an n x n matmul, in fp32 and on the fastest bf16 kernel.
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

fn print_bench<T: serde::Serialize>(json: bool, value: &T, rows: Vec<Vec<String>>) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        print!("{}", crate::util::text_table(&["measure", "value"], &rows));
    }
    Ok(())
}

pub fn bench(b: BenchCommand) -> Result<()> {
    let row = |k: &str, v: String| vec![k.to_string(), v];
    match b {
        BenchCommand::Train { model, json } => {
            let r = bench::train(&model)?;
            let rows = vec![
                row("matmul kernel", r.matmul_kernel.clone()),
                row("parameters", crate::util::human_count(r.parameters as f64)),
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
                row(
                    &format!("GFLOP/s ({})", r.f32_kernel),
                    format!("{:.1}", r.gflop_per_second),
                ),
                match (&r.bf16_kernel, r.bf16_gflop_per_second) {
                    (Some(k), Some(g)) => row(&format!("GFLOP/s ({k})"), format!("{g:.1}")),
                    _ => row("GFLOP/s (bf16)", "no bf16 kernel on this CPU".into()),
                },
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
                row("matmul kernel", r.matmul_kernel.clone()),
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
