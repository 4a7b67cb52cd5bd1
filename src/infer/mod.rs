//! Inference: the sampler, streaming generation with the KV cache, and the continuous-batching
//! engine the server uses.

pub mod batch;
pub mod chat;
pub mod engine;
pub mod generate;
pub mod sampler;
