//! Training: optimizer and schedule, checkpoints, and one file per stage.

pub mod checkpoint;
pub mod optim;
pub mod pretrain;
pub mod reward;
pub mod sft;
pub mod trainer;
