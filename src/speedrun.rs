//! `chatforge speedrun`: the whole current pipeline in one command (tokenizer, shards, pretraining,
//! a sample), with every stage's numbers printed.

use crate::data::shards::{self, TokenizeOptions};
use crate::data::text::DocFormat;
use crate::infer::generate::{generate, GenerateOptions};
use crate::model;
use crate::tokenizer::{Tokenizer, TrainOptions};
use crate::train::pretrain::{pretrain, PretrainOptions, PretrainReport};
use anyhow::Result;
use std::io::Write;
use std::path::PathBuf;

#[derive(Clone, Debug)]
pub struct SpeedrunOptions {
    pub inputs: Vec<PathBuf>,
    pub out: PathBuf,
    pub vocab_size: usize,
    pub format: DocFormat,
    pub pretrain: PretrainOptions,
    pub prompt: String,
}

pub fn speedrun(opts: &SpeedrunOptions) -> Result<PretrainReport> {
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
        let mut sampling = GenerateOptions::default();
        sampling.sampling.top_k = 50;
        sampling.sampling.seed = seed;
        sampling.max_tokens = 120;
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
