//! Data: reading documents from text and JSONL files, and binary token shards.

pub mod chat;
pub mod clean;
pub mod curriculum;
pub mod dedup;
pub mod prefs;
pub mod quality;
pub mod shards;
pub mod text;
