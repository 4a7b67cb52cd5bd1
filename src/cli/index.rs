//! `chatforge index`: the document index that retrieval answers from.

use crate::data::text::{DocFormat, ReadOptions};
use crate::tools::index::DocumentIndex;
use crate::tools::Retrieval;
use anyhow::Result;
use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum IndexCommand {
    /// Cut files into passages and add them to an index (created if new); a file added again is
    /// replaced.
    Add(AddArgs),
    /// The passages that best match a query, with file and line.
    Search(SearchArgs),
}

#[derive(Args)]
pub struct AddArgs {
    /// The index folder.
    #[arg(long)]
    index: PathBuf,
    /// Text, Markdown, JSONL or Parquet files.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// How files are cut into documents (auto: by extension).
    #[arg(long, value_enum, default_value_t = ReadOptions::default().format)]
    format: DocFormat,
    /// The JSONL field or Parquet column holding the text.
    #[arg(long, default_value_t = ReadOptions::default().text_field)]
    text_field: String,
}

#[derive(Args)]
pub struct SearchArgs {
    #[arg(long)]
    index: PathBuf,
    query: String,
    /// Passages to show.
    #[arg(long, default_value_t = Retrieval::DEFAULT_TOP_K)]
    top_k: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn index(c: IndexCommand) -> Result<()> {
    match c {
        IndexCommand::Add(a) => {
            let read = ReadOptions {
                format: a.format,
                text_field: a.text_field,
                ..ReadOptions::default()
            };
            let mut index = DocumentIndex::open_or_create(&a.index)?;
            let s = index.add(&a.files, &read)?;
            eprintln!(
                "added {} passages from {} documents in {} files to {} ({} passages in all)",
                s.passages,
                s.documents,
                s.files,
                a.index.display(),
                s.total_passages
            );
            Ok(())
        }
        IndexCommand::Search(a) => {
            let index = DocumentIndex::open(&a.index)?;
            let hits = index.search(&a.query, a.top_k)?;
            if a.json {
                return super::print_json(&hits);
            }
            if hits.is_empty() {
                println!("no passage matches {:?}", a.query);
            }
            for (i, h) in hits.iter().enumerate() {
                let mut text: String = h.text.chars().take(300).collect();
                if text.len() < h.text.len() {
                    text.push('…');
                }
                println!(
                    "{}. {}  (score {:.2})\n   {text}\n",
                    i + 1,
                    h.source(),
                    h.score
                );
            }
            Ok(())
        }
    }
}
