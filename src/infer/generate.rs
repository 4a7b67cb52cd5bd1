//! Streaming text generation with the KV cache.

use super::sampler::{Sampler, SamplingParams};
use crate::model::LoadedModel;
use anyhow::{bail, Result};
use candle_core::Tensor;

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// Prepend `<|bos|>` to the prompt (as every training document starts with it).
    pub add_bos: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_tokens: 200,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            add_bos: true,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// End-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` or the context window.
    Length,
    /// The caller cancelled (Ctrl-C in the chat).
    Cancelled,
}

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

/// The largest char boundary at or below `i`.
fn floor_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Generates a continuation of `prompt` (text; `<|bos|>` prepended when `add_bos`), calling
/// `on_text` with each new piece of text as soon as it is certain.
pub fn generate(
    lm: &LoadedModel,
    prompt: &str,
    opts: &GenerateOptions,
    on_text: impl FnMut(&str) -> Result<()>,
) -> Result<Generation> {
    let mut ids = Vec::new();
    if opts.add_bos {
        ids.extend(lm.tokenizer.bos_id());
    }
    ids.extend(lm.tokenizer.encode(prompt)?);
    generate_from_ids(lm, &ids, opts, &stop_ids(lm), None, on_text)
}

/// Generates after `ids`, stopping at any of `stops`, a stop string, `max_tokens`, the context, or
/// when `cancel` becomes true. Text is streamed only once it is complete UTF-8 and cannot be the
/// start of a stop string.
pub fn generate_from_ids(
    lm: &LoadedModel,
    ids: &[u32],
    opts: &GenerateOptions,
    stops: &[u32],
    cancel: Option<&std::sync::atomic::AtomicBool>,
    mut on_text: impl FnMut(&str) -> Result<()>,
) -> Result<Generation> {
    opts.sampling.validate()?;
    let start = std::time::Instant::now();
    if ids.is_empty() {
        bail!("the prompt is empty");
    }
    let context = lm.model.config.max_position_embeddings;
    if ids.len() >= context {
        bail!(
            "the prompt is {} tokens but the model's context is {context}: shorten the prompt",
            ids.len()
        );
    }
    let budget = opts.max_tokens.min(context - ids.len());
    let mut sampler = Sampler::new(opts.sampling.clone());
    let mut cache = lm.model.new_cache(1);
    let device = lm.model.device().clone();
    let mut input = Tensor::from_vec(ids.to_vec(), (1, ids.len()), &device)?;
    let mut stream = TextStream::new(opts.stop.clone());
    let mut finish = FinishReason::Length;
    let mut prefill_seconds = 0.0;
    for step in 0..budget {
        if cancel.is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed)) {
            finish = FinishReason::Cancelled;
            break;
        }
        let logits: Vec<f32> = lm
            .model
            .forward_last(&input, Some(&mut cache))?
            .squeeze(0)?
            .to_vec1()?;
        let next = sampler.sample(&logits);
        if step == 0 {
            prefill_seconds = start.elapsed().as_secs_f64();
        }
        if stops.contains(&next) {
            finish = FinishReason::Stop;
            break;
        }
        input = Tensor::from_vec(vec![next], (1, 1), &device)?;
        let (delta, stopped) = stream.push(&lm.tokenizer, next)?;
        if !delta.is_empty() {
            on_text(&delta)?;
        }
        if stopped {
            finish = FinishReason::Stop;
            break;
        }
    }
    let rest = stream.finish();
    if !rest.is_empty() {
        on_text(&rest)?;
    }
    let (final_text, out_ids) = stream.into_parts();
    Ok(Generation {
        text: final_text,
        tokens: out_ids,
        prompt_tokens: ids.len(),
        finish_reason: finish,
        seconds: start.elapsed().as_secs_f64(),
        prefill_seconds,
    })
}

/// Turns sampled tokens into text pieces that are safe to show: complete UTF-8 characters that
/// cannot be the start of a stop string. Shared by the single-sequence generator and the engine.
pub struct TextStream {
    ids: Vec<u32>,
    text: String,
    emitted: usize,
    stop: Vec<String>,
    max_stop: usize,
}

impl TextStream {
    pub fn new(stop: Vec<String>) -> TextStream {
        let stop: Vec<String> = stop.into_iter().filter(|s| !s.is_empty()).collect();
        let max_stop = stop.iter().map(|s| s.len()).max().unwrap_or(0);
        TextStream {
            ids: Vec::new(),
            text: String::new(),
            emitted: 0,
            stop,
            max_stop,
        }
    }

    /// Adds a token; returns the newly safe text and whether a stop string ended the text (which
    /// is then cut before it).
    pub fn push(
        &mut self,
        tokenizer: &crate::tokenizer::Tokenizer,
        id: u32,
    ) -> Result<(String, bool)> {
        self.ids.push(id);
        let text = tokenizer.decode(&self.ids)?;
        if let Some(pos) = self.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
            self.text = text[..pos].to_string();
            return Ok((self.finish(), true));
        }
        self.text = text;
        if self.text.ends_with('\u{FFFD}') {
            return Ok((String::new(), false)); // a multi-byte character is not complete yet
        }
        let safe = floor_boundary(
            &self.text,
            self.text
                .len()
                .saturating_sub(self.max_stop.saturating_sub(1)),
        );
        if safe > self.emitted {
            let delta = self.text[self.emitted..safe].to_string();
            self.emitted = safe;
            return Ok((delta, false));
        }
        Ok((String::new(), false))
    }

    /// The text not shown yet (held back as a possible stop-string start); call at the end.
    pub fn finish(&mut self) -> String {
        let start = self.emitted.min(self.text.len());
        self.emitted = self.text.len();
        self.text[start..].to_string()
    }

    pub fn tokens(&self) -> usize {
        self.ids.len()
    }

    pub fn into_parts(self) -> (String, Vec<u32>) {
        (self.text, self.ids)
    }
}
