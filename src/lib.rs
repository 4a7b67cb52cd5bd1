//! chatforge: the InstructGPT/ChatGPT recipe in one crate.
//! See docs/ARCHITECTURE.md for how the modules fit together.

pub mod bench;
pub mod cli;
pub mod data;
pub mod dist;
pub mod eval;
pub mod infer;
pub mod model;
pub mod rlhf;
pub mod serve;
pub mod speedrun;
pub mod tokenizer;
pub mod tools;
pub mod train;
pub mod util;
