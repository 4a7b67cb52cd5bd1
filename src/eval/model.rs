//! What the evaluation harness needs from a model, and its implementation for loaded models.

use crate::infer::decode::token_logprob;
use crate::infer::generate::{generate_batch, FinishReason};
use crate::infer::sampler::SamplingParams;
use crate::model::LoadedModel;
use crate::tokenizer::chat::{render, ChatTemplate, Message};
use anyhow::Result;
use candle_core::Tensor;

/// A prompt for generation: raw text (base models, few-shot) or a conversation (chat models).
#[derive(Clone, Debug)]
pub enum Prompt {
    Text(String),
    Chat(Vec<Message>),
}

#[derive(Clone, Debug)]
pub struct Completion {
    pub text: String,
    /// Ended by the end-of-turn/end-of-text token rather than the length limit.
    pub stopped: bool,
}

/// The two questions every task asks a model.
pub trait Evaluatee {
    /// Log-probability (natural log) of each continuation after its context.
    fn loglikelihood(&mut self, requests: &[(String, String)]) -> Result<Vec<f64>>;
    /// Greedy completions, each ending at `max_tokens`, an end-of-turn/end-of-text token or one
    /// of the `stop` strings (cut from the text).
    fn generate(
        &mut self,
        prompts: &[Prompt],
        max_tokens: usize,
        stop: &[String],
    ) -> Result<Vec<Completion>>;
}

/// A chatforge model evaluated in batches.
pub struct ModelEvaluatee<'a> {
    pub lm: &'a LoadedModel,
    pub template: Option<ChatTemplate>,
    pub batch_size: usize,
    /// Prompts cut from the left to leave room for the answer (as lm-evaluation-harness does).
    pub truncated_prompts: usize,
    /// Shows items done, rate and ETA for the task being scored.
    pub progress: indicatif::ProgressBar,
}

/// A progress bar for one task's items (hidden when stderr is not a terminal).
pub fn task_progress(name: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(0);
    pb.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{name} {{bar:25}} {{pos}}/{{len}} [{{elapsed_precise}} < {{eta_precise}}] {{per_sec}}"
        ))
        .expect("valid template"),
    );
    pb
}

impl ModelEvaluatee<'_> {
    fn text_ids(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids: Vec<u32> = self.lm.tokenizer.bos_id().into_iter().collect();
        ids.extend(self.lm.tokenizer.encode(text)?);
        Ok(ids)
    }
}

impl Evaluatee for ModelEvaluatee<'_> {
    fn loglikelihood(&mut self, requests: &[(String, String)]) -> Result<Vec<f64>> {
        let context = self.lm.model.config.max_position_embeddings;
        let mut seqs = Vec::with_capacity(requests.len());
        for (ctx, cont) in requests {
            let mut ids = self.text_ids(ctx)?;
            let cont_ids = self.lm.tokenizer.encode(cont)?;
            let n = cont_ids.len().max(1);
            ids.extend(cont_ids);
            // Keep the end: the continuation and as much context as fits.
            if ids.len() > context + 1 {
                ids.drain(..ids.len() - context - 1);
            }
            seqs.push((ids, n));
        }
        let device = self.lm.model.device().clone();
        let model = &self.lm.model;
        let mut out = Vec::with_capacity(seqs.len());
        self.progress.inc_length(seqs.len() as u64);
        for chunk in seqs.chunks(self.batch_size.max(1)) {
            let len = chunk.iter().map(|(s, _)| s.len()).max().unwrap_or(2).max(2);
            let mut x = Vec::new();
            for (s, _) in chunk {
                x.extend((0..len - 1).map(|t| s.get(t).copied().unwrap_or(0)));
            }
            // Scored as decoding scores: through a KV cache (the attention a token gets does
            // not depend on its batch) and with the decoder's log-probabilities, so a reply's
            // log-likelihood here is the sum of the `logprobs` `serve` reported for it.
            let b = chunk.len();
            let mut cache = model.new_cache(b);
            let hidden = model.hidden(
                &Tensor::from_vec(x, (b, len - 1), &device)?,
                Some(&mut cache),
            )?;
            self.progress.inc(chunk.len() as u64);
            for (i, (s, n)) in chunk.iter().enumerate() {
                let end = s.len() - 1;
                let start = end.saturating_sub(*n);
                let logits: Vec<Vec<f32>> = model
                    .logits(&hidden.get(i)?.narrow(0, start, end - start)?)?
                    .to_vec2()?;
                let ll = logits
                    .iter()
                    .zip(&s[start + 1..=end])
                    .map(|(row, &target)| token_logprob(row, target, 0).logprob as f64)
                    .sum();
                out.push(ll);
            }
        }
        Ok(out)
    }

    fn generate(
        &mut self,
        prompts: &[Prompt],
        max_tokens: usize,
        stop: &[String],
    ) -> Result<Vec<Completion>> {
        let mut ids = Vec::with_capacity(prompts.len());
        for p in prompts {
            ids.push(match p {
                Prompt::Text(t) => self.text_ids(t)?,
                Prompt::Chat(m) => {
                    let template = match &self.template {
                        Some(t) => t.clone(),
                        None => self.lm.template()?,
                    };
                    render(&self.lm.tokenizer, &template, m, true)?.ids
                }
            });
        }
        // Leave room for the answer: cut long prompts from the left, keeping their first token.
        let context = self.lm.model.config.max_position_embeddings;
        let keep = context.saturating_sub(max_tokens.min(context / 2)).max(2);
        for p in ids.iter_mut() {
            if p.len() > keep {
                let first = p[0];
                p.drain(..p.len() - keep + 1);
                p.insert(0, first);
                self.truncated_prompts += 1;
            }
        }
        let mut stops = crate::infer::generate::stop_ids(self.lm);
        if let Ok(t) = ChatTemplate::detect(&self.lm.tokenizer) {
            stops.extend(t.stop_ids(&self.lm.tokenizer));
        }
        let greedy = SamplingParams {
            stop: stop.to_vec(),
            ..SamplingParams::greedy(max_tokens)
        };
        // A chat reply only counts as stopped at the template's end-of-turn token (a base model
        // that starts a new document has not learned the format).
        let end_of_turn = match &self.template {
            Some(t) => t.stop_ids(&self.lm.tokenizer),
            None => ChatTemplate::detect(&self.lm.tokenizer)
                .map(|t| t.stop_ids(&self.lm.tokenizer))
                .unwrap_or_default(),
        };
        let mut out = Vec::with_capacity(prompts.len());
        self.progress.inc_length(prompts.len() as u64);
        for (chunk, kinds) in ids
            .chunks(self.batch_size.max(1))
            .zip(prompts.chunks(self.batch_size.max(1)))
        {
            for (o, p) in
                generate_batch(&self.lm.model, &self.lm.tokenizer, chunk, &greedy, &stops)?
                    .into_iter()
                    .zip(kinds)
            {
                let stopped = match p {
                    Prompt::Chat(_) => o.stop_token.is_some_and(|t| end_of_turn.contains(&t)),
                    Prompt::Text(_) => o.finish_reason == FinishReason::Stop,
                };
                out.push(Completion {
                    stopped,
                    text: o.text,
                });
            }
            self.progress.inc(chunk.len() as u64);
        }
        Ok(out)
    }
}
