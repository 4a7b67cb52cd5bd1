//! The one decoding core. Every caller decodes through [`Decoder`]: single-stream generation and
//! the terminal chat, batched evaluation, RL rollouts, the reward model's sampling and the serving
//! engine. It owns prefill, the decode step over a batch of rows sharing one left-padded KV cache,
//! stop ids and stop strings, penalties, logit bias, cancellation and the context check, so a
//! feature that lives in the decoding loop (a tool call, a grammar) is added here once.
//!
//! Rows join between steps (prefilled together, left-padded to the longest prompt, then appended
//! to the batch's cache) and leave between steps (their cache rows are dropped), which is what
//! continuous batching in the server needs and what keeps a finished row from costing compute in
//! a batch of evaluation prompts. A join may be prefilled in pieces between decode steps
//! ([`Decoder::begin_join`], [`Decoder::prefill`]): the server's running streams then keep their
//! pace while a long prompt comes in, instead of stalling for the whole prompt.

use super::grammar::{Allowed, Constraint, Grammars};
use super::sampler::{Sampler, SamplingParams};
use crate::model::{KvCache, Llama};
use crate::tokenizer::Tokenizer;
use crate::tools::{ToolTokens, MAX_CALL_TOKENS};
use anyhow::{bail, Result};
use candle_core::Tensor;
use std::collections::{HashMap, VecDeque};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop token or a stop string.
    Stop,
    /// `max_tokens` or the context window.
    Length,
    /// The caller cancelled (Ctrl-C in the chat, a client that went away).
    Cancelled,
}

/// One prompt to decode.
#[derive(Clone, Debug)]
pub struct Request {
    /// The caller's name for this row; replies and text come back under it.
    pub key: usize,
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// Token ids that end the reply (end of turn, end of text); not part of it.
    pub stop_ids: Vec<u32>,
}

/// A finished reply.
#[derive(Clone, Debug)]
pub struct Reply {
    pub key: usize,
    pub tokens: Vec<u32>,
    /// The reply's text, cut before a stop string.
    pub text: String,
    pub finish_reason: FinishReason,
    /// The stop id that ended the reply, if one did.
    pub stop_token: Option<u32>,
    pub prompt_tokens: usize,
    /// Indices into `tokens` that the core wrote rather than the model sampled: calculator
    /// outputs. Training on a reply leaves them out.
    pub forced: Vec<usize>,
    /// One per token when the request asked for log-probabilities (forced tokens too: how
    /// likely the model found them).
    pub logprobs: Vec<TokenLogprob>,
}

/// A reply token's natural-log probability under the model (its raw logits: before temperature,
/// penalties and bias, as OpenAI reports them), with the most likely alternatives when asked for.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
    /// The most likely tokens at this position, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// The log-probability of `id` and of the `top` most likely tokens under `logits`.
pub fn token_logprob(logits: &[f32], id: u32, top: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // Summed in f64: an f32 running sum over 49,152 logits drifted by 1e-4 a token, which added
    // up over a reply (`eval` scores with this function too, so the two agree either way).
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let log_sum = max as f64 + sum.ln();
    let lp = |i: usize| (logits[i] as f64 - log_sum) as f32;
    let mut order: Vec<usize> = (0..logits.len()).collect();
    let top = top.min(logits.len());
    if top > 0 && top < order.len() {
        order.select_nth_unstable_by(top - 1, |&a, &b| logits[b].total_cmp(&logits[a]));
    }
    order.truncate(top);
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    TokenLogprob {
        id,
        logprob: logits
            .get(id as usize)
            .map_or(f32::NEG_INFINITY, |_| lp(id as usize)),
        top: order.into_iter().map(|i| (i as u32, lp(i))).collect(),
    }
}

/// What a call into the decoder produced, in order.
#[derive(Clone, Debug)]
pub enum Update {
    /// Text that is now certain (complete UTF-8, and not the start of a stop string), with the
    /// log-probabilities of the tokens added since the last update when the request asked.
    Text {
        key: usize,
        text: String,
        logprobs: Vec<TokenLogprob>,
    },
    Done(Reply),
}

/// The context check every caller shares: how many tokens a reply to an `n`-token prompt may have.
pub fn reply_budget(n: usize, context: usize, max_tokens: usize) -> Result<usize> {
    if n == 0 {
        bail!("the prompt is empty");
    }
    if n >= context {
        bail!("the prompt is {n} tokens but the model's context is {context}: shorten the prompt");
    }
    Ok(max_tokens.min(context - n))
}

/// A row of the batch: one reply being decoded.
struct Row {
    key: usize,
    params: SamplingParams,
    sampler: Sampler,
    stream: TextStream,
    counts: HashMap<u32, u32>,
    stop_ids: Vec<u32>,
    budget: usize,
    last: u32,
    prompt_tokens: usize,
    /// The calculator call being written (between its tool tokens), if one is.
    call: Option<Vec<u32>>,
    /// Tokens the core feeds next instead of sampling: a call's output.
    pending: VecDeque<u32>,
    forced: Vec<usize>,
    logprobs: Vec<TokenLogprob>,
    /// How many of `logprobs` an update has carried.
    logprobs_sent: usize,
    /// The grammar the reply must match, if any.
    constraint: Option<Constraint>,
}

/// Why a row ended, and the stop id that ended it.
type Ending = (FinishReason, Option<u32>);

impl Row {
    /// Applies logit bias and penalties, samples the next token and streams the text it completes.
    /// A finished calculator call queues its output, which the following steps feed instead of
    /// sampling.
    fn advance(
        &mut self,
        tokenizer: &Tokenizer,
        tools: Option<&ToolTokens>,
        logits: Vec<f32>,
        out: &mut Vec<Update>,
    ) -> Result<Option<Ending>> {
        // Read before sampling changes the logits (grammar, bias, penalties).
        let raw = self.params.logprobs.map(|top| (logits.clone(), top));
        let next = match self.pending.pop_front() {
            Some(t) => {
                self.forced.push(self.stream.tokens());
                t
            }
            None => {
                let mut logits = logits;
                if self.constrain(&mut logits)? {
                    return Ok(Some((FinishReason::Stop, None)));
                }
                let next = self.sample(logits);
                if self.stop_ids.contains(&next) {
                    return Ok(Some((FinishReason::Stop, Some(next))));
                }
                if let Some(c) = self.constraint.as_mut() {
                    c.consume(next)?;
                }
                if let Some(t) = tools {
                    self.track_call(tokenizer, t, next)?;
                }
                next
            }
        };
        if let Some((logits, top)) = raw {
            self.logprobs.push(token_logprob(&logits, next, top));
        }
        *self.counts.entry(next).or_default() += 1;
        self.last = next;
        let (delta, stopped) = self.stream.push(tokenizer, next)?;
        if !delta.is_empty() {
            let logprobs = self.unsent_logprobs();
            out.push(Update::Text {
                key: self.key,
                text: delta,
                logprobs,
            });
        }
        if stopped {
            return Ok(Some((FinishReason::Stop, None)));
        }
        if self.stream.tokens() >= self.budget {
            return Ok(Some((FinishReason::Length, None)));
        }
        Ok(None)
    }

    /// Masks the tokens the row's grammar does not allow here; the stop tokens stay only where
    /// the grammar may end. True when the grammar is complete and the reply must end.
    fn constrain(&mut self, logits: &mut [f32]) -> Result<bool> {
        let Some(c) = self.constraint.as_mut() else {
            return Ok(false);
        };
        let (mask, can_end) = match c.allowed(logits.len())? {
            Allowed::End => return Ok(true),
            Allowed::Tokens { mask, can_end } => (mask, can_end),
        };
        let stops: Vec<(u32, f32)> = self
            .stop_ids
            .iter()
            .filter_map(|&id| logits.get(id as usize).map(|&l| (id, l)))
            .collect();
        for (l, ok) in logits.iter_mut().zip(mask) {
            if !ok {
                *l = f32::NEG_INFINITY;
            }
        }
        for (id, l) in stops {
            logits[id as usize] = if can_end { l } else { f32::NEG_INFINITY };
        }
        Ok(false)
    }

    fn unsent_logprobs(&mut self) -> Vec<TokenLogprob> {
        let unsent = self.logprobs[self.logprobs_sent..].to_vec();
        self.logprobs_sent = self.logprobs.len();
        unsent
    }

    fn sample(&mut self, mut logits: Vec<f32>) -> u32 {
        let p = &self.params;
        for &(t, b) in &p.logit_bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += b;
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &n) in &self.counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * n as f32;
                }
            }
        }
        self.sampler.sample(&logits)
    }

    /// Follows a calculator call through the sampled token `next`; at its end token (or when it
    /// runs too long) queues the output span.
    fn track_call(&mut self, tokenizer: &Tokenizer, t: &ToolTokens, next: u32) -> Result<()> {
        if next == t.start {
            self.call = Some(Vec::new());
            return Ok(());
        }
        let Some(call) = self.call.as_mut() else {
            return Ok(());
        };
        if next != t.end {
            call.push(next);
            if call.len() <= MAX_CALL_TOKENS {
                return Ok(());
            }
        }
        let call = self.call.take().unwrap_or_default();
        let output = if call.len() > MAX_CALL_TOKENS {
            // Close the call for the model, then answer it.
            let cut = format!("error: the call is longer than {MAX_CALL_TOKENS} tokens");
            let mut ids = vec![t.end];
            ids.extend(t.output(tokenizer, Err(cut))?);
            ids
        } else {
            t.output(tokenizer, Ok(&tokenizer.decode(&call)?))?
        };
        self.pending.extend(output);
        Ok(())
    }

    fn finish(mut self, (finish_reason, stop_token): Ending, out: &mut Vec<Update>) {
        let rest = self.stream.finish();
        let logprobs = self.unsent_logprobs();
        if !rest.is_empty() || !logprobs.is_empty() {
            out.push(Update::Text {
                key: self.key,
                text: rest,
                logprobs,
            });
        }
        let (text, tokens) = self.stream.into_parts();
        out.push(Update::Done(Reply {
            key: self.key,
            tokens,
            text,
            finish_reason,
            stop_token,
            prompt_tokens: self.prompt_tokens,
            forced: self.forced,
            logprobs: self.logprobs,
        }));
    }
}

/// Prompts being prefilled: they join the batch once their last piece is in `cache`.
struct Joining {
    rows: Vec<Row>,
    /// The prompts, left-padded to `width` tokens, row after row.
    ids: Vec<u32>,
    width: usize,
    /// Positions already in `cache`.
    done: usize,
    cache: KvCache,
}

/// A batch of replies being decoded together on one KV cache.
pub struct Decoder<'m> {
    model: &'m Llama,
    tokenizer: &'m Tokenizer,
    rows: Vec<Row>,
    cache: Option<KvCache>,
    joining: Option<Joining>,
    /// The calculator's tokens, where the tokenizer has them.
    tools: Option<ToolTokens>,
    /// Compiles requests' grammars: the loaded model's shared compiler, or this decoder's own.
    shared_grammars: Option<&'m Grammars>,
    own_grammars: Grammars,
}

impl<'m> Decoder<'m> {
    pub fn new(model: &'m Llama, tokenizer: &'m Tokenizer) -> Self {
        Decoder {
            model,
            tokenizer,
            rows: Vec::new(),
            cache: None,
            joining: None,
            tools: ToolTokens::of(tokenizer),
            shared_grammars: None,
            own_grammars: Grammars::default(),
        }
    }

    /// A decoder for a loaded model, sharing its grammar compiler.
    pub fn of(lm: &'m crate::model::LoadedModel) -> Self {
        Decoder {
            shared_grammars: Some(&lm.grammars),
            ..Decoder::new(&lm.model, &lm.tokenizer)
        }
    }

    /// Rows decoding or being prefilled.
    pub fn len(&self) -> usize {
        self.rows.len() + self.joining.as_ref().map_or(0, |j| j.rows.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rows decoding (not counting a join being prefilled).
    pub fn decoding(&self) -> usize {
        self.rows.len()
    }

    /// Prompt positions of the join in progress not yet prefilled (0 when there is none).
    pub fn prefill_left(&self) -> usize {
        self.joining.as_ref().map_or(0, |j| j.width - j.done)
    }

    /// The keys of the rows decoding, in batch order, then those being prefilled.
    pub fn keys(&self) -> impl Iterator<Item = usize> + '_ {
        let joining = self.joining.iter().flat_map(|j| j.rows.iter());
        self.rows.iter().chain(joining).map(|r| r.key)
    }

    /// The rules a request must meet (sampling ranges, the context); its reply's token budget.
    pub fn check(&self, r: &Request) -> Result<usize> {
        r.params.validate()?;
        let context = self.model.config.max_position_embeddings;
        reply_budget(r.prompt.len(), context, r.params.max_tokens)
    }

    /// Prefills `requests` together (left-padded to the longest prompt), samples each one's first
    /// token, and adds the unfinished ones to the batch. A request that breaks a rule (sampling
    /// ranges, the context) fails the call before any work.
    pub fn join(&mut self, requests: Vec<Request>, out: &mut Vec<Update>) -> Result<()> {
        self.begin_join(requests)?;
        self.prefill(usize::MAX, out)
    }

    /// Starts a join of `requests` (see [`Decoder::join`]) whose prompts [`Decoder::prefill`]
    /// then feeds in pieces. One join at a time.
    pub fn begin_join(&mut self, requests: Vec<Request>) -> Result<()> {
        if self.joining.is_some() {
            bail!("a join is still being prefilled");
        }
        if requests.is_empty() {
            return Ok(());
        }
        let mut rows = Vec::with_capacity(requests.len());
        let mut prompts = Vec::with_capacity(requests.len());
        for r in requests {
            let budget = self.check(&r)?;
            let constraint = match &r.params.grammar {
                Some(g) => {
                    let grammars = self.shared_grammars.unwrap_or(&self.own_grammars);
                    Some(Constraint::new(grammars.get(self.tokenizer)?, g)?)
                }
                None => None,
            };
            rows.push(Row {
                key: r.key,
                sampler: Sampler::new(r.params.clone()),
                stream: TextStream::new(r.params.stop.clone()),
                params: r.params,
                counts: HashMap::new(),
                stop_ids: r.stop_ids,
                budget,
                last: 0,
                prompt_tokens: r.prompt.len(),
                call: None,
                pending: VecDeque::new(),
                forced: Vec::new(),
                logprobs: Vec::new(),
                logprobs_sent: 0,
                constraint,
            });
            prompts.push(r.prompt);
        }
        let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let pad_id = self.tokenizer.special_id("<|pad|>").unwrap_or(0);
        let pads: Vec<usize> = prompts.iter().map(|p| width - p.len()).collect();
        let mut ids = Vec::with_capacity(prompts.len() * width);
        for (p, &n) in prompts.iter().zip(&pads) {
            ids.extend(std::iter::repeat_n(pad_id, n));
            ids.extend_from_slice(p);
        }
        self.joining = Some(Joining {
            rows,
            ids,
            width,
            done: 0,
            cache: self.model.new_padded_cache(pads),
        });
        Ok(())
    }

    /// Prefills up to `positions` more positions of the join in progress (at least one). After
    /// the last piece it samples each joining row's first token and adds the unfinished rows to
    /// the batch.
    pub fn prefill(&mut self, positions: usize, out: &mut Vec<Update>) -> Result<()> {
        let Some(mut j) = self.joining.take() else {
            return Ok(());
        };
        let take = (j.width - j.done).min(positions.max(1));
        let batch = j.rows.len();
        let piece: Vec<u32> = j
            .ids
            .chunks(j.width)
            .flat_map(|row| &row[j.done..j.done + take])
            .copied()
            .collect();
        let input = Tensor::from_vec(piece, (batch, take), self.model.device())?;
        j.done += take;
        if j.done < j.width {
            self.model.hidden(&input, Some(&mut j.cache))?;
            self.joining = Some(j);
            return Ok(());
        }
        let logits: Vec<Vec<f32>> = self
            .model
            .forward_last(&input, Some(&mut j.cache))?
            .to_vec2()?;
        let Joining {
            rows, mut cache, ..
        } = j;
        let mut keep = Vec::with_capacity(rows.len());
        let mut kept_rows = Vec::with_capacity(rows.len());
        for (i, (mut row, l)) in rows.into_iter().zip(logits).enumerate() {
            let ending = if row.budget == 0 {
                Some((FinishReason::Length, None))
            } else {
                row.advance(self.tokenizer, self.tools.as_ref(), l, out)?
            };
            match ending {
                Some(e) => row.finish(e, out),
                None => {
                    keep.push(i);
                    kept_rows.push(row);
                }
            }
        }
        if kept_rows.is_empty() {
            return Ok(());
        }
        if keep.len() < batch {
            cache.select_rows(&keep)?;
        }
        match self.cache.as_mut() {
            Some(c) => c.append_rows(cache)?,
            None => self.cache = Some(cache),
        }
        self.rows.extend(kept_rows);
        Ok(())
    }

    /// One decode step: one token for every row in one forward pass; finished rows leave.
    pub fn step(&mut self, out: &mut Vec<Update>) -> Result<()> {
        let Some(cache) = self.cache.as_mut() else {
            return Ok(());
        };
        let input: Vec<u32> = self.rows.iter().map(|r| r.last).collect();
        let input = Tensor::from_vec(input, (self.rows.len(), 1), self.model.device())?;
        let logits: Vec<Vec<f32>> = self.model.forward_last(&input, Some(cache))?.to_vec2()?;
        let mut endings = Vec::new();
        for (i, (row, l)) in self.rows.iter_mut().zip(logits).enumerate() {
            if let Some(e) = row.advance(self.tokenizer, self.tools.as_ref(), l, out)? {
                endings.push((i, e));
            }
        }
        self.remove(endings, out)
    }

    /// Ends the rows whose keys `cancelled` picks, with [`FinishReason::Cancelled`]. A join being
    /// prefilled ends when all its rows are picked (a row of a join that goes on leaves once it
    /// has joined).
    pub fn cancel(
        &mut self,
        cancelled: impl Fn(usize) -> bool,
        out: &mut Vec<Update>,
    ) -> Result<()> {
        if self
            .joining
            .as_ref()
            .is_some_and(|j| j.rows.iter().all(|r| cancelled(r.key)))
        {
            let j = self.joining.take().expect("checked above");
            for row in j.rows {
                row.finish((FinishReason::Cancelled, None), out);
            }
        }
        let endings = self
            .rows
            .iter()
            .enumerate()
            .filter(|(_, r)| cancelled(r.key))
            .map(|(i, _)| (i, (FinishReason::Cancelled, None)))
            .collect();
        self.remove(endings, out)
    }

    /// Drops every row without a reply (after a failed step), a join in progress too, and returns
    /// their keys.
    pub fn abandon(&mut self) -> Vec<usize> {
        self.cache = None;
        let joining = self.joining.take().into_iter().flat_map(|j| j.rows);
        self.rows.drain(..).chain(joining).map(|r| r.key).collect()
    }

    /// Finishes the rows at `endings` (indices in batch order) and drops their cache rows.
    fn remove(&mut self, endings: Vec<(usize, Ending)>, out: &mut Vec<Update>) -> Result<()> {
        if endings.is_empty() {
            return Ok(());
        }
        let keep: Vec<usize> = (0..self.rows.len())
            .filter(|i| !endings.iter().any(|(e, _)| e == i))
            .collect();
        match self.cache.as_mut() {
            Some(c) if !keep.is_empty() => c.select_rows(&keep)?,
            _ => self.cache = None,
        }
        let mut rows: Vec<Option<Row>> = self.rows.drain(..).map(Some).collect();
        for (i, ending) in endings {
            if let Some(row) = rows[i].take() {
                row.finish(ending, out);
            }
        }
        self.rows = rows.into_iter().flatten().collect();
        Ok(())
    }
}

/// The largest char boundary at or below `i`.
fn floor_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Turns sampled tokens into text pieces that are safe to show: complete UTF-8 characters that
/// cannot be the start of a stop string.
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
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<(String, bool)> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::TrainOptions;

    /// A greedy row with room for `budget` tokens.
    fn greedy_row(stop_ids: Vec<u32>, budget: usize) -> Row {
        let params = SamplingParams {
            temperature: 0.0,
            ..SamplingParams::DEFAULT
        };
        Row {
            key: 0,
            sampler: Sampler::new(params.clone()),
            stream: TextStream::new(Vec::new()),
            params,
            counts: HashMap::new(),
            stop_ids,
            budget,
            last: 0,
            prompt_tokens: 1,
            call: None,
            pending: VecDeque::new(),
            forced: Vec::new(),
            logprobs: Vec::new(),
            logprobs_sent: 0,
            constraint: None,
        }
    }

    fn tokenizer(text: &str) -> Tokenizer {
        let opts = TrainOptions {
            vocab_size: 300,
            ..Default::default()
        };
        Tokenizer::train(&[text], &opts).unwrap().0
    }

    /// Logits whose greedy choice is `id`.
    fn pointing_at(vocab: usize, id: u32) -> Vec<f32> {
        let mut l = vec![0.0; vocab];
        l[id as usize] = 10.0;
        l
    }

    #[test]
    fn a_calculator_call_gets_its_output_forced_and_marked() {
        let tok = tokenizer("one plus two is three. 12 + 30 = 42");
        let tools = ToolTokens::of(&tok).expect("chatforge tokenizers reserve the tool tokens");
        let mut row = greedy_row(vec![tok.special_id("<|assistant_end|>").unwrap()], 100);
        let vocab = tok.vocab_size();
        let mut out = Vec::new();
        // The model writes "<|tool_start|>12+30<|tool_end|>".
        let mut written = vec![tools.start];
        written.extend(tok.encode_plain("12+30").unwrap());
        written.push(tools.end);
        for &id in &written {
            let ending = row.advance(&tok, Some(&tools), pointing_at(vocab, id), &mut out);
            assert_eq!(ending.unwrap(), None);
        }
        // Whatever the model would say next, the core writes the output span.
        let junk = tok.encode_plain("9").unwrap()[0];
        while !row.pending.is_empty() {
            row.advance(&tok, Some(&tools), pointing_at(vocab, junk), &mut out)
                .unwrap();
        }
        let expected_output = tools.output(&tok, Ok("12+30")).unwrap();
        let n = written.len();
        assert_eq!(
            row.forced,
            (n..n + expected_output.len()).collect::<Vec<_>>()
        );
        assert_eq!(row.stream.ids[n..], expected_output[..]);
        assert!(row
            .stream
            .text
            .ends_with("<|tool_end|><|output_start|>42<|output_end|>"));
        // The model then continues on its own: sampled tokens are not forced.
        row.advance(&tok, Some(&tools), pointing_at(vocab, junk), &mut out)
            .unwrap();
        assert_eq!(row.forced.len(), expected_output.len());
        // Without tool tokens (another model's tokenizer) nothing is forced.
        let mut plain = greedy_row(Vec::new(), 100);
        for &id in &written {
            plain
                .advance(&tok, None, pointing_at(vocab, id), &mut out)
                .unwrap();
        }
        assert!(plain.pending.is_empty() && plain.forced.is_empty());
    }

    #[test]
    fn logprobs_come_from_the_raw_logits_and_ride_on_the_text() {
        let tok = tokenizer("the cat sat on the mat");
        let vocab = tok.vocab_size();
        let mut row = greedy_row(Vec::new(), 3);
        let (a, b) = (u32::from(b'a'), u32::from(b't'));
        // The bias makes `a` the choice; the reported numbers ignore it.
        row.params.logit_bias = vec![(a, 50.0)];
        row.params.logprobs = Some(2);
        let mut logits = vec![0.0f32; vocab];
        logits[b as usize] = 3.0;
        logits[b'c' as usize] = 2.0;
        let log_sum = (logits.iter().map(|l| l.exp()).sum::<f32>()).ln();
        let mut out = Vec::new();
        let mut ending = None;
        while ending.is_none() {
            ending = row.advance(&tok, None, logits.clone(), &mut out).unwrap();
        }
        row.finish(ending.unwrap(), &mut out);
        let carried: Vec<TokenLogprob> = out
            .iter()
            .flat_map(|u| match u {
                Update::Text { logprobs, .. } => logprobs.clone(),
                Update::Done(_) => Vec::new(),
            })
            .collect();
        let Some(Update::Done(reply)) = out.last() else {
            panic!("the row finished: {out:?}");
        };
        assert_eq!(reply.tokens, vec![a; 3]);
        assert_eq!(carried, reply.logprobs, "every token's numbers, once");
        for t in &reply.logprobs {
            assert_eq!(t.id, a);
            assert!((t.logprob - (0.0 - log_sum)).abs() < 1e-5, "{t:?}");
            assert_eq!(
                t.top.iter().map(|x| x.0).collect::<Vec<_>>(),
                [b, u32::from(b'c')]
            );
            assert!((t.top[0].1 - (3.0 - log_sum)).abs() < 1e-5, "{t:?}");
        }
        // Not asked for: none.
        let mut plain = greedy_row(Vec::new(), 2);
        let mut out = Vec::new();
        plain.advance(&tok, None, logits, &mut out).unwrap();
        assert!(plain.logprobs.is_empty());
    }

    #[test]
    fn an_endless_call_is_closed_and_answered_with_an_error() {
        let tok = tokenizer("1 + 1");
        let tools = ToolTokens::of(&tok).unwrap();
        let mut row = greedy_row(Vec::new(), 1000);
        let vocab = tok.vocab_size();
        let one = tok.encode_plain("1").unwrap()[0];
        let mut out = Vec::new();
        row.advance(
            &tok,
            Some(&tools),
            pointing_at(vocab, tools.start),
            &mut out,
        )
        .unwrap();
        for _ in 0..=MAX_CALL_TOKENS {
            row.advance(&tok, Some(&tools), pointing_at(vocab, one), &mut out)
                .unwrap();
        }
        assert_eq!(row.pending.front(), Some(&tools.end));
        while !row.pending.is_empty() {
            row.advance(&tok, Some(&tools), pointing_at(vocab, one), &mut out)
                .unwrap();
        }
        assert!(row.stream.text.contains("error: the call is longer than"));
        assert!(row.call.is_none());
    }
}
