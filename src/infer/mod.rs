//! Inference: the sampler and streaming generation with the KV cache.

pub mod generate;
pub mod sampler;
