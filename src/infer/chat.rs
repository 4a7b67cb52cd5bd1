//! A multi-turn chat session: keeps the history, fits it into the context window by dropping the
//! oldest turns, and streams each reply.

use super::generate::{generate_from_ids, FinishReason};
use super::sampler::SamplingParams;
use crate::model::LoadedModel;
use crate::tokenizer::chat::{render, ChatTemplate, Message, Role};
use crate::tools::index::Passage;
use crate::tools::Retrieval;
use anyhow::{bail, Result};
use std::sync::atomic::AtomicBool;

pub struct ChatSession<'a> {
    lm: &'a LoadedModel,
    pub template: ChatTemplate,
    pub system: Option<String>,
    pub history: Vec<Message>,
    pub options: SamplingParams,
    /// Where each question's passages come from, if anywhere.
    pub retrieval: Option<Retrieval>,
    stops: Vec<u32>,
}

#[derive(Clone, Debug)]
pub struct Reply {
    pub text: String,
    pub finish_reason: FinishReason,
    /// Earlier messages dropped to fit the context before this reply.
    pub dropped_messages: usize,
    pub tokens: usize,
    pub seconds: f64,
    /// The passages the model was shown for this question.
    pub sources: Vec<Passage>,
}

impl<'a> ChatSession<'a> {
    pub fn new(
        lm: &'a LoadedModel,
        template: Option<ChatTemplate>,
        options: SamplingParams,
    ) -> Result<Self> {
        let template = match template {
            Some(t) => t,
            None => lm.template()?,
        };
        let stops = template.stop_ids(&lm.tokenizer);
        if stops.is_empty() {
            bail!("the tokenizer has no end-of-turn token for this chat template");
        }
        Ok(ChatSession {
            lm,
            template,
            system: None,
            history: Vec::new(),
            options,
            retrieval: None,
            stops,
        })
    }

    pub fn reset(&mut self) {
        self.history.clear();
    }

    /// The conversation as it would be sent: system message, then history.
    pub fn messages(&self) -> Vec<Message> {
        let mut m = Vec::new();
        if let Some(s) = &self.system {
            m.push(Message::new(Role::System, s.clone()));
        }
        m.extend(self.history.iter().cloned());
        m
    }

    /// Answers `user`, streaming the reply through `on_text`. A cancelled reply is kept in the
    /// history as far as it got.
    pub fn reply(
        &mut self,
        user: &str,
        cancel: &AtomicBool,
        on_text: impl FnMut(&str) -> Result<()>,
    ) -> Result<Reply> {
        let context = self.lm.model.config.max_position_embeddings;
        let mut sources = Vec::new();
        if let Some(r) = &self.retrieval {
            let question = [Message::new(Role::User, user)];
            let (grounded, passages) = r.ground(&self.lm.tokenizer, &question, context)?;
            self.history.extend(grounded);
            sources = passages;
        } else {
            self.history.push(Message::new(Role::User, user));
        }
        // Leave room for a reply: the requested length, but at most half the context.
        let reserve = self.options.max_tokens.min(context / 2).max(1);
        let mut dropped = 0;
        let ids = loop {
            let r = render(&self.lm.tokenizer, &self.template, &self.messages(), true)?;
            if r.ids.len() + reserve <= context {
                break r.ids;
            }
            let question = self.history.len() - 1 - usize::from(!sources.is_empty());
            if question == 0 {
                let n = r.ids.len();
                self.history.truncate(question);
                bail!(
                    "the message is {n} tokens with its headers, too long for the model's {context}-token context (with {reserve} left for the reply)"
                );
            }
            // Drop the oldest exchange: everything up to the next question (its documents, or
            // the user message itself).
            let starts = |i: usize| {
                let role = self.history[i].role;
                role == Role::Document
                    || (role == Role::User && self.history[i - 1].role != Role::Document)
            };
            let next = (1..self.history.len()).find(|&i| starts(i)).unwrap_or(1);
            self.history.drain(..next);
            dropped += next;
        };
        let g = generate_from_ids(
            self.lm,
            &ids,
            &self.options,
            &self.stops,
            Some(cancel),
            on_text,
        )?;
        self.history
            .push(Message::new(Role::Assistant, g.text.clone()));
        Ok(Reply {
            text: g.text,
            finish_reason: g.finish_reason,
            dropped_messages: dropped,
            tokens: g.tokens.len(),
            seconds: g.seconds,
            sources,
        })
    }
}

/// The terminal front end of `chatforge chat`: one user message per line from `input`, replies
/// streamed to stdout, slash commands, Ctrl-C stopping the current reply. With `interactive`
/// false (piped input) it prints only the replies, one after another.
pub fn run_terminal(
    session: &mut ChatSession,
    input: &mut dyn std::io::BufRead,
    interactive: bool,
) -> Result<()> {
    use std::io::Write;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    let cancel = Arc::new(AtomicBool::new(false));
    let generating = Arc::new(AtomicBool::new(false));
    {
        let (cancel, generating) = (cancel.clone(), generating.clone());
        // Ctrl-C stops the reply being written; at the prompt it only says how to leave.
        let _ = ctrlc::set_handler(move || {
            if generating.load(Ordering::SeqCst) {
                cancel.store(true, Ordering::SeqCst);
            } else {
                eprint!("\n(/quit or Ctrl-D leaves)\n> ");
            }
        });
    }
    let mut stdout = std::io::stdout();
    if interactive {
        eprintln!(
            "chatforge chat: {} (context {} tokens). /help for commands; Ctrl-C stops a reply; /quit or Ctrl-D leaves.",
            session.lm.dir.display(),
            session.lm.model.config.max_position_embeddings
        );
    }
    let mut line = String::new();
    loop {
        if interactive {
            eprint!("> ");
        }
        line.clear();
        if input.read_line(&mut line)? == 0 {
            if interactive {
                eprintln!();
            }
            return Ok(());
        }
        let text = line.trim_end_matches(['\n', '\r']);
        if text.trim().is_empty() {
            continue;
        }
        if let Some(cmd) = text.strip_prefix('/') {
            let (name, arg) = cmd.split_once(' ').unwrap_or((cmd, ""));
            let arg = arg.trim();
            match name {
                "quit" | "exit" => return Ok(()),
                "reset" => {
                    session.reset();
                    eprintln!("(conversation cleared)");
                }
                "system" => {
                    session.system = (!arg.is_empty()).then(|| arg.to_string());
                    eprintln!("(system prompt {})", if arg.is_empty() { "cleared" } else { "set" });
                }
                "temp" => {
                    let mut options = session.options.clone();
                    match arg.parse::<f64>() {
                        Ok(t) => {
                            options.temperature = t;
                            match options.check() {
                                Ok(()) => {
                                    session.options = options;
                                    eprintln!("(temperature {t})");
                                }
                                Err(e) => eprintln!("({e}; e.g. /temp 0.7)"),
                            }
                        }
                        Err(_) => eprintln!("(usage: /temp X with X from 0 to 2, e.g. /temp 0.7)"),
                    }
                }
                "save" => {
                    if arg.is_empty() {
                        eprintln!("(usage: /save FILE)");
                    } else {
                        let doc = serde_json::json!({"messages": session.messages()});
                        match crate::util::write_json_atomic(std::path::Path::new(arg), &doc) {
                            Ok(()) => eprintln!("(saved {} messages to {arg})", doc["messages"].as_array().map_or(0, |m| m.len())),
                            Err(e) => eprintln!("(cannot save: {e:#})"),
                        }
                    }
                }
                "help" => eprintln!(
                    "/reset  clear the conversation\n/system TEXT  set the system prompt (empty clears it)\n/temp X  sampling temperature (0 = greedy)\n/save FILE  write the conversation as JSON\n/quit  leave"
                ),
                other => eprintln!("(unknown command /{other}; /help lists them)"),
            }
            continue;
        }
        cancel.store(false, Ordering::SeqCst);
        generating.store(true, Ordering::SeqCst);
        let result = session.reply(text, &cancel, |piece| {
            print!("{}", crate::tools::readable(piece));
            stdout.flush()?;
            Ok(())
        });
        generating.store(false, Ordering::SeqCst);
        println!();
        match result {
            Ok(r) => {
                if !r.sources.is_empty() {
                    eprintln!("(sources: {})", crate::tools::source_list(&r.sources));
                }
                if r.dropped_messages > 0 {
                    eprintln!(
                        "(dropped the {} oldest messages to fit the context)",
                        r.dropped_messages
                    );
                }
                match r.finish_reason {
                    FinishReason::Cancelled => eprintln!("(stopped)"),
                    FinishReason::Length => eprintln!("(reply cut at {} tokens)", r.tokens),
                    FinishReason::Stop => {}
                }
            }
            Err(e) => {
                if !interactive {
                    return Err(e);
                }
                eprintln!("error: {e:#}");
            }
        }
    }
}
