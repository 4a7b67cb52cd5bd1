//! Inference: the sampler, the one decoding core (`decode`) and its drivers: whole replies
//! (`generate`), the terminal chat (`chat`) and the server's continuous-batching engine (`engine`).

pub mod chat;
pub mod decode;
pub mod engine;
pub mod generate;
pub mod sampler;
