//! The serving engine: one thread owns the model and decodes every active request together,
//! one token per request per step (continuous batching). New requests are prefilled on their own
//! and join the batch between steps; finished or abandoned requests leave it between steps. The
//! batch shares one left-padded KV cache whose rows are appended and removed as requests come and
//! go, so a decode step is a single forward pass whatever the mix of lengths.

use super::generate::{FinishReason, TextStream};
use super::sampler::{Sampler, SamplingParams};
use crate::model::{KvCache, LoadedModel};
use anyhow::Result;
use candle_core::Tensor;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use tokio::sync::mpsc::UnboundedSender;

/// One generation request.
pub struct Request {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Token ids that end the reply (end of turn, end of text).
    pub stop_ids: Vec<u32>,
    /// Strings that end the reply (not included in it).
    pub stop: Vec<String>,
    /// OpenAI's penalties: subtracted from a token's logit once if it appeared in the reply
    /// (presence) and once per appearance (frequency).
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Added to the logits of these tokens at every step (OpenAI's `logit_bias`).
    pub logit_bias: Vec<(u32, f32)>,
    /// Where the reply goes, piece by piece. When the receiver is dropped (the client went away)
    /// the request leaves the batch at the next step.
    pub events: UnboundedSender<Event>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    Text(String),
    Done {
        finish_reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Failed(String),
}

/// Counters the server exports as metrics.
#[derive(Default)]
pub struct EngineStats {
    pub queued: AtomicUsize,
    pub active: AtomicUsize,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    pub decode_steps: AtomicU64,
    pub cancelled: AtomicU64,
}

pub enum SubmitError {
    /// The queue is full: try again later.
    Busy,
    /// The engine thread has stopped.
    Stopped,
}

pub struct Engine {
    queue: SyncSender<Request>,
    pub stats: Arc<EngineStats>,
    pub max_batch: usize,
}

impl Engine {
    /// Starts the engine thread: at most `max_batch` requests decode together, and at most
    /// `queue` more wait for a place.
    pub fn start(lm: Arc<LoadedModel>, max_batch: usize, queue: usize) -> Engine {
        let (tx, rx) = std::sync::mpsc::sync_channel(queue.max(1));
        let stats = Arc::new(EngineStats::default());
        let thread_stats = stats.clone();
        let max_batch = max_batch.max(1);
        std::thread::Builder::new()
            .name("chatforge-engine".into())
            // The engine thread is the only one computing: it lives on rayon's pool, so its
            // matrix products split without handing the work off (`util::on_compute_pool`).
            .spawn(move || crate::util::on_compute_pool(|| run(&lm, rx, max_batch, &thread_stats)))
            .expect("spawn the engine thread");
        Engine {
            queue: tx,
            stats,
            max_batch,
        }
    }

    pub fn submit(&self, request: Request) -> std::result::Result<(), SubmitError> {
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        match self.queue.try_send(request) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                Err(match e {
                    TrySendError::Full(_) => SubmitError::Busy,
                    TrySendError::Disconnected(_) => SubmitError::Stopped,
                })
            }
        }
    }
}

/// A request in the batch.
struct Row {
    request: Request,
    sampler: Sampler,
    stream: TextStream,
    counts: HashMap<u32, u32>,
    last: u32,
    budget: usize,
}

impl Row {
    /// Samples the next token from this row's logits and sends the text it completes; returns
    /// why the row is finished, if it is.
    fn advance(&mut self, lm: &LoadedModel, mut logits: Vec<f32>) -> Result<Option<FinishReason>> {
        let r = &self.request;
        for &(t, b) in &r.logit_bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += b;
            }
        }
        if r.presence_penalty != 0.0 || r.frequency_penalty != 0.0 {
            for (&t, &n) in &self.counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= r.presence_penalty + r.frequency_penalty * n as f32;
                }
            }
        }
        let next = self.sampler.sample(&logits);
        if r.stop_ids.contains(&next) {
            return Ok(Some(FinishReason::Stop));
        }
        *self.counts.entry(next).or_default() += 1;
        self.last = next;
        let (delta, stopped) = self.stream.push(&lm.tokenizer, next)?;
        if !delta.is_empty() && r.events.send(Event::Text(delta)).is_err() {
            return Ok(Some(FinishReason::Cancelled));
        }
        if stopped {
            return Ok(Some(FinishReason::Stop));
        }
        if self.stream.tokens() >= self.budget {
            return Ok(Some(FinishReason::Length));
        }
        Ok(None)
    }

    fn finish(mut self, reason: FinishReason, stats: &EngineStats) {
        let rest = self.stream.finish();
        if !rest.is_empty() {
            let _ = self.request.events.send(Event::Text(rest));
        }
        stats
            .completion_tokens
            .fetch_add(self.stream.tokens() as u64, Ordering::Relaxed);
        if reason == FinishReason::Cancelled {
            stats.cancelled.fetch_add(1, Ordering::Relaxed);
        }
        let _ = self.request.events.send(Event::Done {
            finish_reason: reason,
            prompt_tokens: self.request.prompt.len(),
            completion_tokens: self.stream.tokens(),
        });
    }
}

fn run(lm: &LoadedModel, queue: Receiver<Request>, max_batch: usize, stats: &EngineStats) {
    let mut rows: Vec<Row> = Vec::new();
    let mut cache: Option<KvCache> = None;
    loop {
        // Admit waiting requests between steps; sleep on the queue when there is nothing to do.
        while rows.len() < max_batch {
            let request = if rows.is_empty() {
                match queue.recv() {
                    Ok(r) => r,
                    Err(_) => return, // the server is gone
                }
            } else {
                match queue.try_recv() {
                    Ok(r) => r,
                    Err(_) => break,
                }
            };
            stats.queued.fetch_sub(1, Ordering::Relaxed);
            if request.events.is_closed() {
                stats.cancelled.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            match prefill(lm, request, stats) {
                Ok(Some((row, row_cache))) => {
                    let joined = match cache.as_mut() {
                        Some(c) => c.append_rows(row_cache),
                        None => {
                            cache = Some(row_cache);
                            Ok(())
                        }
                    };
                    if let Err(e) = joined {
                        let _ = row.request.events.send(Event::Failed(e.to_string()));
                        continue;
                    }
                    rows.push(row);
                }
                Ok(None) => {}
                Err(e) => eprintln!("engine: prefill failed: {e:#}"),
            }
        }
        stats.active.store(rows.len(), Ordering::Relaxed);
        let Some(c) = cache.as_mut() else {
            continue;
        };
        if rows.is_empty() {
            cache = None;
            continue;
        }
        if let Err(e) = step(lm, &mut rows, c, stats) {
            // A failed step fails its batch, not the server.
            for row in rows.drain(..) {
                let _ = row.request.events.send(Event::Failed(format!("{e:#}")));
            }
            cache = None;
        }
        if rows.is_empty() {
            cache = None;
        }
        stats.active.store(rows.len(), Ordering::Relaxed);
    }
}

/// Runs a new request's prompt through the model on its own and samples its first token; returns
/// the row and its one-row cache unless the request is already finished.
fn prefill(
    lm: &LoadedModel,
    request: Request,
    stats: &EngineStats,
) -> Result<Option<(Row, KvCache)>> {
    let context = lm.model.config.max_position_embeddings;
    let n = request.prompt.len();
    if n == 0 || n >= context {
        let _ = request.events.send(Event::Failed(format!(
            "the prompt is {n} tokens; it must be between 1 and {} for this model's {context}-token context",
            context - 1
        )));
        return Ok(None);
    }
    stats.prompt_tokens.fetch_add(n as u64, Ordering::Relaxed);
    let mut cache = lm.model.new_cache(1);
    let input = Tensor::from_vec(request.prompt.clone(), (1, n), lm.model.device())?;
    let logits: Vec<f32> = lm
        .model
        .forward_last(&input, Some(&mut cache))?
        .squeeze(0)?
        .to_vec1()?;
    let budget = request.max_tokens.min(context - n);
    let mut row = Row {
        sampler: Sampler::new(request.sampling.clone()),
        stream: TextStream::new(request.stop.clone()),
        counts: HashMap::new(),
        last: 0,
        budget,
        request,
    };
    if budget == 0 {
        row.finish(FinishReason::Length, stats);
        return Ok(None);
    }
    match row.advance(lm, logits)? {
        Some(reason) => {
            row.finish(reason, stats);
            Ok(None)
        }
        None => Ok(Some((row, cache))),
    }
}

/// One decode step for the whole batch; finished rows leave it.
fn step(
    lm: &LoadedModel,
    rows: &mut Vec<Row>,
    cache: &mut KvCache,
    stats: &EngineStats,
) -> Result<()> {
    let input: Vec<u32> = rows.iter().map(|r| r.last).collect();
    let input = Tensor::from_vec(input, (rows.len(), 1), lm.model.device())?;
    let logits: Vec<Vec<f32>> = lm.model.forward_last(&input, Some(cache))?.to_vec2()?;
    stats.decode_steps.fetch_add(1, Ordering::Relaxed);
    let mut keep = Vec::with_capacity(rows.len());
    let mut finished = Vec::new();
    for (i, (row, l)) in rows.iter_mut().zip(logits).enumerate() {
        let reason = if row.request.events.is_closed() {
            Some(FinishReason::Cancelled)
        } else {
            row.advance(lm, l)?
        };
        match reason {
            Some(r) => finished.push((i, r)),
            None => keep.push(i),
        }
    }
    if finished.is_empty() {
        return Ok(());
    }
    if !keep.is_empty() {
        cache.select_rows(&keep)?;
    }
    for (i, reason) in finished.into_iter().rev() {
        rows.remove(i).finish(reason, stats);
    }
    Ok(())
}
