//! Knowledge and tools from outside the weights. A model's knowledge stops at its training data and
//! a small model miscopies digits, so it reads retrieved passages (`index`, shown to it as a
//! document turn) and calls a calculator (`calculator`, run by the decoding core between tool
//! tokens, in the style of nanochat's calculator).
//!
//! The call protocol, in chatforge's chat format:
//! `<|tool_start|>12 + 30<|tool_end|><|output_start|>42<|output_end|>` inside an assistant turn.
//! The model writes the call and its end token; the core evaluates it and forces the output span,
//! which the loss never trains on (SFT masks it, RL rollouts leave it out of the policy's tokens).

pub mod calculator;
pub mod index;

use crate::tokenizer::chat::{Message, Role};
use crate::tokenizer::Tokenizer;
use anyhow::Result;
use index::{DocumentIndex, Passage};
use std::path::PathBuf;

pub const TOOL_START: &str = "<|tool_start|>";
pub const TOOL_END: &str = "<|tool_end|>";
pub const OUTPUT_START: &str = "<|output_start|>";
pub const OUTPUT_END: &str = "<|output_end|>";
pub const DOCUMENT_START: &str = "<|document_start|>";
pub const DOCUMENT_END: &str = "<|document_end|>";

/// Longest call the core waits for before answering it with an error, in tokens.
pub const MAX_CALL_TOKENS: usize = 128;

/// The ids of the tool tokens, where the tokenizer has them (chatforge tokenizers trained since
/// they were reserved; other models have none and never call the calculator).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ToolTokens {
    pub start: u32,
    pub end: u32,
    pub output_start: u32,
    pub output_end: u32,
}

impl ToolTokens {
    pub fn of(tok: &Tokenizer) -> Option<ToolTokens> {
        Some(ToolTokens {
            start: tok.special_id(TOOL_START)?,
            end: tok.special_id(TOOL_END)?,
            output_start: tok.special_id(OUTPUT_START)?,
            output_end: tok.special_id(OUTPUT_END)?,
        })
    }

    /// The forced output span: the calculator's answer to `call`, or `error` when the call was
    /// cut off.
    pub fn output(&self, tok: &Tokenizer, call: Result<&str, String>) -> Result<Vec<u32>> {
        let answer = match call {
            Ok(c) => calculator::answer(c.trim()),
            Err(e) => e,
        };
        let mut ids = vec![self.output_start];
        ids.extend(tok.encode_plain(&answer)?);
        ids.push(self.output_end);
        Ok(ids)
    }
}

/// A calculator call written in a reply: `<|tool_start|>expr<|tool_end|>` and its output.
pub fn call_text(expression: &str) -> String {
    format!(
        "{TOOL_START}{expression}{TOOL_END}{OUTPUT_START}{}{OUTPUT_END}",
        calculator::answer(expression)
    )
}

/// A reply's text for people: each call and its output become `[expr = value]`.
pub fn readable(text: &str) -> String {
    text.replace(TOOL_START, "[")
        .replace(TOOL_END, "")
        .replace(OUTPUT_START, " = ")
        .replace(OUTPUT_END, "]")
}

/// Retrieval for a conversation: which index, how many passages, how many tokens they may take.
#[derive(Clone, Debug, clap::Args)]
pub struct RetrievalArgs {
    /// A document index (`chatforge index add`): each question is answered with its best passages
    #[arg(long)]
    pub index: Option<PathBuf>,
    /// Passages retrieved per question
    #[arg(long, default_value_t = Retrieval::DEFAULT_TOP_K)]
    pub passages: usize,
    /// Most prompt tokens the passages may take (the lowest-ranked go first)
    #[arg(long, default_value_t = Retrieval::DEFAULT_DOCUMENT_TOKENS)]
    pub document_tokens: usize,
    /// Passages scoring below this fraction of the best passage's score are left out (0 keeps
    /// all of the top passages)
    #[arg(long, default_value_t = Retrieval::DEFAULT_MIN_SCORE_RATIO)]
    pub min_score_ratio: f32,
}

impl Default for RetrievalArgs {
    fn default() -> Self {
        RetrievalArgs {
            index: None,
            passages: Retrieval::DEFAULT_TOP_K,
            document_tokens: Retrieval::DEFAULT_DOCUMENT_TOKENS,
            min_score_ratio: Retrieval::DEFAULT_MIN_SCORE_RATIO,
        }
    }
}

impl RetrievalArgs {
    pub fn open(&self) -> Result<Option<Retrieval>> {
        let Some(dir) = &self.index else {
            return Ok(None);
        };
        crate::util::check_positive("--passages", self.passages)?;
        crate::util::check_positive("--document-tokens", self.document_tokens)?;
        crate::util::check_range("--min-score-ratio", self.min_score_ratio.into(), 0.0..=1.0)?;
        Ok(Some(Retrieval {
            index: DocumentIndex::open(dir)?,
            top_k: self.passages,
            document_tokens: self.document_tokens,
            min_score_ratio: self.min_score_ratio,
        }))
    }
}

/// An open index with the per-question limits.
pub struct Retrieval {
    pub index: DocumentIndex,
    pub top_k: usize,
    pub document_tokens: usize,
    pub min_score_ratio: f32,
}

impl Retrieval {
    pub const DEFAULT_TOP_K: usize = 3;
    pub const DEFAULT_DOCUMENT_TOKENS: usize = 512;
    /// A passage that shares the question's rare words (a name) scores far above one that shares
    /// only common words (7.9 against 0.8 for "Where does Rendar live?" on the speedrun's
    /// knowledge base), and a small model reads one passage far better than it picks the right
    /// one among several (docs/CURRICULUM.md). A floor of 0.5 shows such a question its passage
    /// alone; on prose the scores lie closer (wiki_demo.txt's questions keep a second passage at
    /// 0.63 of the best). Off by default: the speedrun's model is trained on passages with others
    /// beside them, and the floor is only worth its cost with a curriculum that trains on one.
    pub const DEFAULT_MIN_SCORE_RATIO: f32 = 0.0;

    /// The best passages for `question` that fit the token budget together, best first, leaving
    /// out those below `min_score_ratio` of the best; a model with a `context`-token window gives
    /// them at most a quarter of it, so that the question and a worked answer still fit beside
    /// them.
    pub fn passages(
        &self,
        tok: &Tokenizer,
        question: &str,
        context: usize,
    ) -> Result<Vec<Passage>> {
        let budget = self.document_tokens.min(context / 4);
        let mut out = Vec::new();
        let mut used = 0;
        let hits = self.index.search(question, self.top_k)?;
        let floor = hits.first().map_or(0.0, |p| p.score * self.min_score_ratio);
        for p in hits.into_iter().filter(|p| p.score >= floor) {
            let n = tok.encode_plain(&p.text)?.len() + 2;
            if used + n > budget {
                if out.is_empty() {
                    // The best passage alone is over the budget: keep its start.
                    let mut p = p;
                    p.text = truncate_to_tokens(tok, &p.text, budget)?;
                    out.push(p);
                }
                break;
            }
            used += n;
            out.push(p);
        }
        Ok(out)
    }

    /// `messages` with the passages for its last user message inserted before it as a document
    /// turn; the passages come back for the reply's sources.
    pub fn ground(
        &self,
        tok: &Tokenizer,
        messages: &[Message],
        context: usize,
    ) -> Result<(Vec<Message>, Vec<Passage>)> {
        let Some(last_user) = messages.iter().rposition(|m| m.role == Role::User) else {
            return Ok((messages.to_vec(), Vec::new()));
        };
        let passages = self.passages(tok, &messages[last_user].content, context)?;
        let mut out = messages.to_vec();
        if !passages.is_empty() {
            out.insert(last_user, documents_message(&passages));
        }
        Ok((out, passages))
    }
}

/// `file:line` of each passage, once each, for showing under a reply.
pub fn source_list(passages: &[Passage]) -> String {
    let mut names: Vec<String> = Vec::new();
    for p in passages {
        let name = p.source();
        if !names.contains(&name) {
            names.push(name);
        }
    }
    names.join(", ")
}

/// The document turn holding `passages`.
pub fn documents_message(passages: &[Passage]) -> Message {
    let texts: Vec<&str> = passages.iter().map(|p| p.text.as_str()).collect();
    Message::new(Role::Document, texts.join("\n\n"))
}

fn truncate_to_tokens(tok: &Tokenizer, text: &str, n: usize) -> Result<String> {
    let ids = tok.encode_plain(text)?;
    let cut = &ids[..ids.len().min(n.saturating_sub(2))];
    Ok(tok.decode(cut)?.trim_end_matches('\u{FFFD}').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_read_as_bracketed_sums() {
        let t = format!("So {} apples.", call_text("12 + 30"));
        assert_eq!(readable(&t), "So [12 + 30 = 42] apples.");
    }
}
