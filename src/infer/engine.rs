//! The serving engine: one thread owns the model and decodes every active request together,
//! one token per request per step (continuous batching). New requests are prefilled on their own
//! and join the batch between steps; finished or abandoned requests leave it between steps. The
//! batch shares one left-padded KV cache whose rows are appended and removed as requests come and
//! go, so a decode step is a single forward pass whatever the mix of lengths.
//!
//! While others decode, a new prompt is prefilled in pieces between their steps (chunked prefill),
//! each piece sized to take about half a decode step ([`PieceSizer`]): a 2,000-token prompt
//! joining no longer stalls every running stream for the seconds its prefill takes.

use super::decode::{Decoder, FinishReason, Request as Row, TokenLogprob, Update};
use super::sampler::SamplingParams;
use crate::model::LoadedModel;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Instant;
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
    /// A piece of the reply, with its tokens' log-probabilities when the request asked.
    Text {
        text: String,
        logprobs: Vec<TokenLogprob>,
    },
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
    /// Panics caught in a prefill or decode step: each failed the requests in flight and the
    /// engine went on with a fresh cache.
    pub restarts: AtomicU64,
    /// False once the engine thread has ended (it should not, while the server runs).
    pub alive: std::sync::atomic::AtomicBool,
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
        stats.alive.store(true, Ordering::Relaxed);
        let thread_stats = stats.clone();
        let max_batch = max_batch.max(1);
        std::thread::Builder::new()
            .name("chatforge-engine".into())
            // The engine thread is the only one computing: it lives on rayon's pool, so its
            // matrix products split without handing the work off (`util::on_compute_pool`).
            .spawn(move || {
                /// Marks the engine dead however its thread ends.
                struct Alive<'a>(&'a EngineStats);
                impl Drop for Alive<'_> {
                    fn drop(&mut self) {
                        self.0.alive.store(false, Ordering::Relaxed);
                    }
                }
                let _alive = Alive(&thread_stats);
                crate::util::on_compute_pool(|| run(&lm, rx, max_batch, &thread_stats))
            })
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

/// Runs `work` on the decoder; an error fails every request in flight, and so does a panic,
/// which is counted as a restart: the decoder is emptied and the next request starts on a fresh
/// cache, so one bad step never ends serving.
fn supervised(
    decoder: &mut Decoder,
    clients: &mut HashMap<usize, UnboundedSender<Event>>,
    stats: &EngineStats,
    work: impl FnOnce(&mut Decoder) -> anyhow::Result<()>,
) {
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(decoder)));
    let message = match outcome {
        Ok(Ok(())) => return,
        Ok(Err(e)) => format!("{e:#}"),
        Err(panic) => {
            stats.restarts.fetch_add(1, Ordering::Relaxed);
            let m = crate::util::panic_message(panic.as_ref());
            eprintln!(
                "engine: a step panicked ({m}); failing the requests in flight and restarting"
            );
            format!("internal error: the decoding engine panicked ({m}); it has restarted, retry the request")
        }
    };
    for key in decoder.abandon() {
        if let Some(c) = clients.remove(&key) {
            let _ = c.send(Event::Failed(message.clone()));
        }
    }
}

/// A decode step at which to panic, for testing supervision (`CHATFORGE_TEST_PANIC_AT_STEP`).
fn injected_fault() -> Option<u64> {
    std::env::var("CHATFORGE_TEST_PANIC_AT_STEP")
        .ok()
        .and_then(|v| v.parse().ok())
}

/// How many prompt positions to prefill between two decode steps: as many as take about half the
/// last decode steps' time, so that the gap between a running stream's tokens grows by about half
/// while a prompt comes in, not by the whole prefill. Both times are running averages.
#[derive(Default)]
struct PieceSizer {
    step_seconds: Option<f64>,
    seconds_per_position: Option<f64>,
}

impl PieceSizer {
    /// Before any measurement: small, so that the first piece, whose cost is not known yet,
    /// cannot open a long gap in the running streams.
    const FIRST_PIECE: usize = 8;
    const SMALLEST: usize = 4;
    /// Past this the piece costs what the whole prompt would, per position.
    const LARGEST: usize = 2048;

    fn positions(&self, decoding: usize) -> usize {
        if decoding == 0 {
            // Nobody is waiting on a step: the whole prompt at once.
            return usize::MAX;
        }
        match (self.step_seconds, self.seconds_per_position) {
            (Some(step), Some(per)) if per > 0.0 => {
                ((0.5 * step / per) as usize).clamp(Self::SMALLEST, Self::LARGEST)
            }
            _ => Self::FIRST_PIECE,
        }
    }

    fn average(old: Option<f64>, new: f64) -> Option<f64> {
        Some(old.map_or(new, |o| 0.7 * o + 0.3 * new))
    }

    fn stepped(&mut self, seconds: f64) {
        self.step_seconds = Self::average(self.step_seconds, seconds);
    }

    fn prefilled(&mut self, positions: usize, seconds: f64) {
        if positions > 0 {
            let per = seconds / positions as f64;
            self.seconds_per_position = Self::average(self.seconds_per_position, per);
        }
    }
}

fn run(lm: &LoadedModel, queue: Receiver<Request>, max_batch: usize, stats: &EngineStats) {
    let fault_at = injected_fault();
    let mut decoder = Decoder::of(lm);
    let mut clients: HashMap<usize, UnboundedSender<Event>> = HashMap::new();
    let mut next_key = 0usize;
    let mut updates = Vec::new();
    let mut sizer = PieceSizer::default();
    loop {
        // Admit waiting requests between steps, one prefill at a time; sleep on the queue when
        // there is nothing to do.
        while decoder.len() < max_batch && decoder.prefill_left() == 0 {
            let request = if decoder.is_empty() {
                // Idle: hand the batch's freed memory (KV caches, activations) back to the OS,
                // so a burst of traffic does not leave the server at its peak size.
                // SAFETY: asks the allocator to release pages it holds free; no pointers change.
                unsafe { libmimalloc_sys::mi_collect(true) };
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
            // A request the decoder refuses fails alone, before it joins.
            if let Err(e) = decoder.check(&row) {
                let _ = request.events.send(Event::Failed(format!("{e:#}")));
                continue;
            }
            clients.insert(key, request.events);
            supervised(&mut decoder, &mut clients, stats, |d| {
                d.begin_join(vec![row])
            });
        }
        if decoder.prefill_left() > 0 {
            let positions = sizer.positions(decoder.decoding());
            let (left, start) = (decoder.prefill_left(), Instant::now());
            supervised(&mut decoder, &mut clients, stats, |d| {
                d.prefill(positions, &mut updates)
            });
            sizer.prefilled(left.min(positions), start.elapsed().as_secs_f64());
            deliver(&mut updates, &mut clients, stats);
        }
        stats.active.store(decoder.len(), Ordering::Relaxed);
        if decoder.is_empty() {
            continue;
        }
        let gone: Vec<usize> = decoder
            .keys()
            .filter(|k| clients.get(k).is_none_or(|c| c.is_closed()))
            .collect();
        let start = Instant::now();
        let mut stepped = false;
        supervised(&mut decoder, &mut clients, stats, |d| {
            d.cancel(|k| gone.contains(&k), &mut updates)?;
            if d.decoding() == 0 {
                return Ok(());
            }
            let step = stats.decode_steps.fetch_add(1, Ordering::Relaxed) + 1;
            if fault_at == Some(step) {
                panic!("injected fault at decode step {step}");
            }
            stepped = true;
            d.step(&mut updates)
        });
        if stepped {
            sizer.stepped(start.elapsed().as_secs_f64());
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
            Update::Text {
                key,
                text,
                logprobs,
            } => {
                if let Some(c) = clients.get(&key) {
                    // A closed channel is noticed before the next step.
                    let _ = c.send(Event::Text { text, logprobs });
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
