//! Inference: the sampler and streaming generation with the KV cache.

pub mod batch;
pub mod chat;
pub mod generate;
pub mod sampler;
