//! Data commands: the tokenizer, token shards, the data pipeline's stages and the curriculum.

use super::print_json;
use crate::data::shards::{self, TokenizeOptions};
use crate::data::text::{DocFormat, ReadOptions};
use crate::train::sft::OnError;
use anyhow::Result;
use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum TokenizerCommand {
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

/// Input files and how they are cut into documents.
#[derive(Args)]
pub struct InputArgs {
    /// Input files (plain text, JSONL or Parquet).
    #[arg(long, num_args = 1.., required = true)]
    input: Vec<PathBuf>,
    /// How files are cut into documents.
    #[arg(long, value_enum, default_value_t = ReadOptions::default().format)]
    format: DocFormat,
    /// JSONL field or Parquet column holding the text.
    #[arg(long, default_value_t = ReadOptions::default().text_field)]
    text_field: String,
}

#[derive(Args)]
pub struct TokenizerTrainArgs {
    #[command(flatten)]
    input: InputArgs,
    /// Vocabulary size including the 256 byte tokens and the special tokens.
    #[arg(long, default_value_t = crate::tokenizer::TrainOptions::default().vocab_size)]
    vocab_size: usize,
    #[arg(long)]
    out: PathBuf,
    /// Pre-tokenizer split.
    #[arg(long, value_enum, default_value_t = crate::tokenizer::TrainOptions::default().pattern)]
    pattern: crate::tokenizer::SplitPattern,
    /// Replace the chat special tokens with these (comma-separated), e.g. "<|endoftext|>".
    #[arg(long, value_delimiter = ',')]
    special_tokens: Option<Vec<String>>,
    /// Compare the learned merges with a reference merges.txt (one "a b" pair per line).
    #[arg(long)]
    compare_merges: Option<PathBuf>,
}

pub fn tokenizer(c: TokenizerCommand) -> Result<()> {
    use crate::tokenizer::{Tokenizer, TrainOptions};
    match c {
        TokenizerCommand::Train(a) => {
            let d = TrainOptions::default();
            let opts = TrainOptions {
                vocab_size: a.vocab_size,
                pattern: a.pattern,
                special_tokens: a.special_tokens.unwrap_or(d.special_tokens),
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
                let expected = crate::tokenizer::read_merges_file(&reference)?;
                let (in_order, anywhere) =
                    crate::tokenizer::compare_merges(tok.merges(), &expected);
                println!(
                    "reference merges: {in_order}/{n} reproduced in order, {anywhere}/{n} present",
                    n = expected.len()
                );
            }
        }
        TokenizerCommand::Encode { tokenizer, text } => {
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
    }
    Ok(())
}

#[derive(Args)]
pub struct TokenizeArgs {
    #[arg(long)]
    tokenizer: PathBuf,
    #[command(flatten)]
    input: InputArgs,
    /// Output shard directory.
    #[arg(long)]
    out: PathBuf,
    /// Fraction of documents held out for validation.
    #[arg(long, default_value_t = TokenizeOptions::default().val_fraction)]
    val_fraction: f64,
    #[arg(long, default_value_t = TokenizeOptions::default().seed)]
    seed: u64,
    /// Tokens per shard file.
    #[arg(long, default_value_t = TokenizeOptions::default().max_tokens_per_shard)]
    shard_tokens: u64,
}

pub fn tokenize(a: TokenizeArgs) -> Result<()> {
    let tok = crate::tokenizer::Tokenizer::load(&a.tokenizer)?;
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
    print_json(&meta)
}

/// Documents a data stage reads.
#[derive(Args)]
pub struct DocArgs {
    /// Input files (plain text, JSONL or Parquet).
    #[arg(long, num_args = 1.., required = true)]
    input: Vec<PathBuf>,
    #[command(flatten)]
    read: ReadArgs,
}

/// How a data stage reads its files.
#[derive(Args)]
pub struct ReadArgs {
    #[arg(long, value_enum, default_value_t = ReadOptions::default().format)]
    format: DocFormat,
    /// JSONL field or Parquet column holding the text.
    #[arg(long, default_value_t = ReadOptions::default().text_field)]
    text_field: String,
    /// A record that cannot be read (bad JSON or UTF-8, missing field, corrupt Parquet): stop with
    /// an error naming it, or skip it and count it in the report.
    #[arg(long, value_enum, default_value_t = ReadOptions::default().on_error)]
    on_error: OnError,
}

impl ReadArgs {
    fn options(&self) -> ReadOptions {
        ReadOptions {
            format: self.format,
            text_field: self.text_field.clone(),
            on_error: self.on_error,
        }
    }
}

#[derive(Subcommand)]
pub enum DataCommand {
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
        #[arg(long, default_value_t = crate::data::mix::MixOptions::default().val_fraction)]
        val_fraction: f64,
        #[arg(long, default_value_t = crate::data::mix::MixOptions::default().seed)]
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
        #[arg(long, default_value_t = crate::data::clean::CleanOptions::default().min_chars)]
        min_chars: usize,
        /// A line found in at least this many documents is boilerplate (2 or more).
        #[arg(long, default_value_t = crate::data::clean::CleanOptions::default().repeated_line_documents)]
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
        #[arg(long, default_value_t = crate::data::dedup::DedupOptions::default().threshold)]
        threshold: f64,
    },
}

pub fn data(c: DataCommand) -> Result<()> {
    use crate::data::{clean, dedup, mix, prepare, quality};
    match c {
        DataCommand::Clean {
            docs,
            out,
            min_chars,
            repeated_line_documents,
        } => {
            let opts = clean::CleanOptions {
                min_chars,
                repeated_line_documents: repeated_line_documents.max(2),
            };
            let run = clean::clean_files(&docs.input, &docs.read.options(), &out, &opts)?;
            print_stage_report(&run, &run.io)
        }
        DataCommand::QualityTrain {
            good,
            bad,
            out,
            read,
            epochs,
            seed,
        } => {
            let m = quality::train_files(&good, &bad, &read.options(), &out, epochs, seed)?;
            println!(
                "{}",
                serde_json::json!({"heldout_accuracy": m.heldout_accuracy, "heldout_auc": m.heldout_auc,
                    "train_documents": m.train_documents, "heldout_documents": m.heldout_documents,
                    "model": out})
            );
            Ok(())
        }
        DataCommand::QualityFilter {
            model,
            docs,
            out,
            threshold,
            alpha,
            seed,
        } => {
            let rule = quality::KeepRule {
                threshold,
                alpha,
                seed,
            };
            let r = quality::filter_files(&model, &docs.input, &docs.read.options(), &out, rule)?;
            print_stage_report(&r, &r.io)
        }
        DataCommand::Dedup {
            docs,
            out,
            threshold,
        } => {
            let opts = dedup::DedupOptions {
                threshold,
                ..Default::default()
            };
            let run = dedup::dedup_files(&docs.input, &docs.read.options(), &out, &opts)?;
            print_stage_report(&run, &run.io)
        }
        DataCommand::Prepare { config } => {
            let report = prepare::prepare(&prepare::PrepareConfig::load(&config)?)?;
            if crate::dist::is_leader() {
                print!("{}", prepare::render_report(&report));
            }
            Ok(())
        }
        DataCommand::Mix {
            sources,
            tokenizer,
            out,
            total_tokens,
            val_fraction,
            seed,
            read,
        } => {
            let sources = sources
                .iter()
                .map(|s| {
                    let mut src = mix::Source::parse(s)?;
                    src.format = read.format;
                    src.text_field = read.text_field.clone();
                    Ok(src)
                })
                .collect::<Result<Vec<_>>>()?;
            let tok = crate::tokenizer::Tokenizer::load(&tokenizer)?;
            let opts = mix::MixOptions {
                total_tokens,
                val_fraction,
                seed,
                on_error: read.on_error,
                ..Default::default()
            };
            let manifest = mix::mix(&tok, &sources, &out, &opts, None)?;
            print!("{}", mix::render_manifest(&manifest));
            Ok(())
        }
    }
}

/// Prints a data stage's report as JSON, telling the user on stderr when records were left out.
fn print_stage_report<T: serde::Serialize>(report: &T, io: &crate::data::StageIo) -> Result<()> {
    let skipped = &io.skipped;
    if skipped.records > 0 {
        eprintln!(
            "warning: skipped {} unreadable records ({:?}); first: {}",
            skipped.records,
            skipped.reasons,
            skipped.examples.first().map(String::as_str).unwrap_or("")
        );
    }
    print_json(report)
}

#[derive(Args)]
pub struct CurriculumArgs {
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Multiplies every count (1 = about 1.5 MB of pretraining text).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
}

pub fn curriculum(a: CurriculumArgs) -> Result<()> {
    if !(a.scale > 0.0 && a.scale.is_finite()) {
        anyhow::bail!("--scale must be positive, got {}", a.scale);
    }
    let size = crate::data::curriculum::CurriculumSize::scaled(a.scale);
    let counts = crate::data::curriculum::generate(&a.out, a.seed, &size)?;
    print_json(&counts)?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}
