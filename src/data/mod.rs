//! Data: reading documents from text and JSONL files, and binary token shards.

pub mod chat;
pub mod clean;
pub mod curriculum;
pub mod dedup;
pub mod prefs;
pub mod quality;
pub mod shards;
pub mod text;

/// Writes `OUT.report.json` beside a data stage's output `OUT` (atomically).
pub fn write_sidecar_report<T: serde::Serialize>(
    out: &std::path::Path,
    report: &T,
) -> anyhow::Result<()> {
    let mut path = out.as_os_str().to_owned();
    path.push(".report.json");
    crate::util::write_json_atomic(std::path::Path::new(&path), report)
}
