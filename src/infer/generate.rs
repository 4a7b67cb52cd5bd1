//! Generation for callers that want whole replies: one prompt streamed to a callback (generate,
//! chat, the report's samples) or many prompts decoded together (eval, RL rollouts, the reward
//! model's sampling). Both are thin drivers of the one decoding core in [`super::decode`].

use super::decode::{Decoder, Reply, Request, Update};
pub use super::decode::{FinishReason, TextStream};
use super::sampler::SamplingParams;
use crate::model::{Llama, LoadedModel};
use crate::tokenizer::Tokenizer;
use anyhow::Result;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Clone, Debug, serde::Serialize)]
pub struct Generation {
    pub text: String,
    pub tokens: Vec<u32>,
    pub prompt_tokens: usize,
    pub finish_reason: FinishReason,
    pub seconds: f64,
    /// Time to the first new token (the prompt's forward pass and one sample).
    pub prefill_seconds: f64,
}

/// Ids that end generation: the config's EOS ids and `<|bos|>` (a new document).
pub fn stop_ids(lm: &LoadedModel) -> Vec<u32> {
    stop_ids_of(&lm.model, &lm.tokenizer)
}

/// [`stop_ids`] for a model and tokenizer held apart (as in training).
pub fn stop_ids_of(
    model: &crate::model::Llama,
    tokenizer: &crate::tokenizer::Tokenizer,
) -> Vec<u32> {
    let mut ids = Vec::new();
    match &model.config.eos_token_id {
        Some(serde_json::Value::Number(n)) => ids.extend(n.as_u64().map(|x| x as u32)),
        Some(serde_json::Value::Array(a)) => {
            ids.extend(a.iter().filter_map(|v| v.as_u64()).map(|x| x as u32))
        }
        _ => {}
    }
    ids.extend(tokenizer.bos_id());
    ids.extend(tokenizer.special_id("<|assistant_end|>"));
    ids
}

/// Generates a continuation of `prompt` (text, after `<|bos|>` where the tokenizer has one),
/// calling `on_text` with each new piece of text as soon as it is certain.
pub fn generate(
    lm: &LoadedModel,
    prompt: &str,
    params: &SamplingParams,
    on_text: impl FnMut(&str) -> Result<()>,
) -> Result<Generation> {
    let mut ids: Vec<u32> = lm.tokenizer.bos_id().into_iter().collect();
    ids.extend(lm.tokenizer.encode(prompt)?);
    generate_from_ids(lm, &ids, params, &stop_ids(lm), None, on_text)
}

/// Generates after `ids`, stopping at any of `stops`, a stop string, `max_tokens`, the context, or
/// when `cancel` becomes true. Text is streamed only once it is complete UTF-8 and cannot be the
/// start of a stop string.
pub fn generate_from_ids(
    lm: &LoadedModel,
    ids: &[u32],
    params: &SamplingParams,
    stops: &[u32],
    cancel: Option<&AtomicBool>,
    mut on_text: impl FnMut(&str) -> Result<()>,
) -> Result<Generation> {
    let start = std::time::Instant::now();
    let mut decoder = Decoder::of(lm);
    let mut updates = Vec::new();
    let request = Request {
        key: 0,
        prompt: ids.to_vec(),
        params: params.clone(),
        stop_ids: stops.to_vec(),
    };
    decoder.join(vec![request], &mut updates)?;
    let prefill_seconds = start.elapsed().as_secs_f64();
    let mut reply = None;
    loop {
        for u in updates.drain(..) {
            match u {
                Update::Text { text, .. } => on_text(&text)?,
                Update::Done(r) => reply = Some(r),
            }
        }
        if reply.is_some() {
            break;
        }
        if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            decoder.cancel(|_| true, &mut updates)?;
        } else {
            decoder.step(&mut updates)?;
        }
    }
    let reply = reply.expect("the loop ends with a reply");
    Ok(Generation {
        text: reply.text,
        tokens: reply.tokens,
        prompt_tokens: reply.prompt_tokens,
        finish_reason: reply.finish_reason,
        seconds: start.elapsed().as_secs_f64(),
        prefill_seconds,
    })
}

/// Decodes every prompt to the end, together in one batch; row `i` samples with seed
/// `params.seed + i`. Replies come back in the prompts' order.
pub fn generate_batch(
    model: &Llama,
    tokenizer: &Tokenizer,
    prompts: &[Vec<u32>],
    params: &SamplingParams,
    stops: &[u32],
) -> Result<Vec<Reply>> {
    let mut decoder = Decoder::new(model, tokenizer);
    let requests = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| Request {
            key: i,
            prompt: p.clone(),
            params: SamplingParams {
                seed: params.seed.wrapping_add(i as u64),
                ..params.clone()
            },
            stop_ids: stops.to_vec(),
        })
        .collect();
    let mut updates = Vec::new();
    decoder.join(requests, &mut updates)?;
    let mut replies: Vec<Option<Reply>> = vec![None; prompts.len()];
    loop {
        for u in updates.drain(..) {
            if let Update::Done(r) = u {
                let key = r.key;
                replies[key] = Some(r);
            }
        }
        if decoder.is_empty() {
            break;
        }
        decoder.step(&mut updates)?;
    }
    Ok(replies.into_iter().flatten().collect())
}
