//! Inference: the sampler, the one decoding core (`decode`) with its grammar constraint
//! (`grammar`), and its drivers: whole replies (`generate`), the terminal chat (`chat`) and the
//! server's continuous-batching engine (`engine`).

pub mod chat;
pub mod decode;
pub mod engine;
pub mod generate;
pub mod grammar;
pub mod sampler;
