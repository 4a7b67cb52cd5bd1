//! Batched generation: many prompts decoded together with one left-padded KV cache, so each
//! decode step is one forward pass for the whole batch.

use super::generate::FinishReason;
use super::sampler::{Sampler, SamplingParams};
use crate::model::Llama;
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Result};
use candle_core::Tensor;

#[derive(Clone, Debug)]
pub struct BatchOutput {
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    /// The stop token that ended the row, if one did.
    pub stop_token: Option<u32>,
}

/// Generates up to `max_tokens` after each prompt; row `i` samples with seed `sampling.seed + i`.
pub fn generate_batch(
    model: &Llama,
    tokenizer: &Tokenizer,
    prompts: &[Vec<u32>],
    max_tokens: usize,
    sampling: &SamplingParams,
    stops: &[u32],
) -> Result<Vec<BatchOutput>> {
    sampling.validate()?;
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    if prompts.iter().any(|p| p.is_empty()) {
        bail!("empty prompt in batch");
    }
    let context = model.config.max_position_embeddings;
    let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    if longest >= context {
        bail!("a prompt is {longest} tokens but the model's context is {context}");
    }
    let steps = max_tokens.min(context - longest);
    let pad_id = tokenizer.special_id("<|pad|>").unwrap_or(0);
    let pads: Vec<usize> = prompts.iter().map(|p| longest - p.len()).collect();
    let mut rows = Vec::with_capacity(prompts.len() * longest);
    for (p, &n) in prompts.iter().zip(&pads) {
        rows.extend(std::iter::repeat_n(pad_id, n));
        rows.extend_from_slice(p);
    }
    let device = model.device().clone();
    let b = prompts.len();
    let mut input = Tensor::from_vec(rows, (b, longest), &device)?;
    let mut cache = model.new_padded_cache(pads);
    let mut samplers: Vec<Sampler> = (0..b)
        .map(|i| {
            let mut p = sampling.clone();
            p.seed = sampling.seed.wrapping_add(i as u64);
            Sampler::new(p)
        })
        .collect();
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); b];
    let mut done: Vec<Option<u32>> = vec![None; b];
    for _ in 0..steps {
        let logits: Vec<Vec<f32>> = model.forward_last(&input, Some(&mut cache))?.to_vec2()?;
        let mut next = Vec::with_capacity(b);
        for i in 0..b {
            if done[i].is_some() {
                next.push(pad_id);
                continue;
            }
            let t = samplers[i].sample(&logits[i]);
            if stops.contains(&t) {
                done[i] = Some(t);
            } else {
                out[i].push(t);
            }
            next.push(t);
        }
        if done.iter().all(|d| d.is_some()) {
            break;
        }
        input = Tensor::from_vec(next, (b, 1), &device)?;
    }
    out.into_iter()
        .zip(done)
        .map(|(tokens, d)| {
            Ok(BatchOutput {
                text: tokenizer.decode(&tokens)?,
                tokens,
                finish_reason: if d.is_some() {
                    FinishReason::Stop
                } else {
                    FinishReason::Length
                },
                stop_token: d,
            })
        })
        .collect()
}
