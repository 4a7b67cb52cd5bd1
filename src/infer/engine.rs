//! The serving engine: one thread owns the model and decodes every active request together,
//! one token per request per step (continuous batching). New requests are prefilled on their own
//! and join the batch between steps; finished or abandoned requests leave it between steps. The
//! batch shares one left-padded KV cache whose rows are appended and removed as requests come and
//! go, so a decode step is a single forward pass whatever the mix of lengths.

use super::decode::{Decoder, FinishReason, Request as Row, Update};
use super::sampler::SamplingParams;
use crate::model::LoadedModel;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use tokio::sync::mpsc::UnboundedSender;

/// One generation request.
pub struct Request {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// Token ids that end the reply (end of turn, end of text).
    pub stop_ids: Vec<u32>,
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

fn run(lm: &LoadedModel, queue: Receiver<Request>, max_batch: usize, stats: &EngineStats) {
    let mut decoder = Decoder::new(&lm.model, &lm.tokenizer);
    let mut clients: HashMap<usize, UnboundedSender<Event>> = HashMap::new();
    let mut next_key = 0usize;
    let mut updates = Vec::new();
    loop {
        // Admit waiting requests between steps; sleep on the queue when there is nothing to do.
        while decoder.len() < max_batch {
            let request = if decoder.is_empty() {
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
            let key = next_key;
            next_key = next_key.wrapping_add(1);
            stats
                .prompt_tokens
                .fetch_add(request.prompt.len() as u64, Ordering::Relaxed);
            let row = Row {
                key,
                prompt: request.prompt,
                params: request.params,
                stop_ids: request.stop_ids,
            };
            // A request the decoder refuses (or whose prefill fails) fails alone.
            if let Err(e) = decoder.join(vec![row], &mut updates) {
                let _ = request.events.send(Event::Failed(format!("{e:#}")));
                continue;
            }
            clients.insert(key, request.events);
            deliver(&mut updates, &mut clients, stats);
        }
        stats.active.store(decoder.len(), Ordering::Relaxed);
        if decoder.is_empty() {
            continue;
        }
        let gone = |key: usize| clients.get(&key).is_none_or(|c| c.is_closed());
        let mut stepped = decoder.cancel(gone, &mut updates);
        if stepped.is_ok() && !decoder.is_empty() {
            stepped = decoder.step(&mut updates);
            stats.decode_steps.fetch_add(1, Ordering::Relaxed);
        }
        if let Err(e) = stepped {
            // A failed step fails its batch, not the server.
            for key in decoder.abandon() {
                if let Some(c) = clients.remove(&key) {
                    let _ = c.send(Event::Failed(format!("{e:#}")));
                }
            }
        }
        deliver(&mut updates, &mut clients, stats);
        stats.active.store(decoder.len(), Ordering::Relaxed);
    }
}

/// Sends the decoder's updates to their clients and counts finished replies.
fn deliver(
    updates: &mut Vec<Update>,
    clients: &mut HashMap<usize, UnboundedSender<Event>>,
    stats: &EngineStats,
) {
    for u in updates.drain(..) {
        match u {
            Update::Text { key, text } => {
                if let Some(c) = clients.get(&key) {
                    // A closed channel is noticed before the next step.
                    let _ = c.send(Event::Text(text));
                }
            }
            Update::Done(reply) => {
                stats
                    .completion_tokens
                    .fetch_add(reply.tokens.len() as u64, Ordering::Relaxed);
                if reply.finish_reason == FinishReason::Cancelled {
                    stats.cancelled.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(c) = clients.remove(&reply.key) {
                    let _ = c.send(Event::Done {
                        finish_reason: reply.finish_reason,
                        prompt_tokens: reply.prompt_tokens,
                        completion_tokens: reply.tokens.len(),
                    });
                }
            }
        }
    }
}
