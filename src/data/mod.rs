//! Data: reading documents (text, JSONL, Parquet), cleaning, quality filtering, duplicate removal,
//! source mixtures, and binary token shards.

pub mod chat;
pub mod clean;
pub mod curriculum;
pub mod dedup;
pub mod mix;
pub mod prefs;
pub mod prepare;
pub mod quality;
pub mod shards;
pub mod text;

/// What to do with a record that cannot be used (bad JSON or UTF-8, a missing field, a corrupt
/// file; in chat data: no assistant turn, unknown role, too long).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Leave it out and report how many were left out, and why.
    #[serde(alias = "Skip")]
    Skip,
    /// Stop with an error naming the file and record.
    #[serde(alias = "Fail")]
    Fail,
}

/// Documents are processed in blocks of about this many bytes: big enough to keep both cores busy
/// and to see lines repeated across documents, small enough to bound memory.
pub const CHUNK_BYTES: usize = 16 << 20;

/// The block size streaming stages read in: [`CHUNK_BYTES`], or `CHATFORGE_BLOCK_BYTES` (tests
/// use small blocks to cover block edges and their spread over ranks).
pub fn block_bytes() -> usize {
    std::env::var("CHATFORGE_BLOCK_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(CHUNK_BYTES)
}

/// Writes `OUT.report.json` beside a data stage's output `OUT` (atomically).
pub fn write_sidecar_report<T: serde::Serialize>(
    out: &std::path::Path,
    report: &T,
) -> anyhow::Result<()> {
    let mut path = out.as_os_str().to_owned();
    path.push(".report.json");
    crate::util::write_json_atomic(std::path::Path::new(&path), report)
}

/// What every streaming data stage reports about its input and output (flattened into its report).
#[derive(Clone, Debug, serde::Serialize)]
pub struct StageIo {
    pub inputs: Vec<std::path::PathBuf>,
    pub output: std::path::PathBuf,
    pub skipped: text::Skipped,
    pub seconds: f64,
    /// Document text read per second.
    pub megabytes_per_second: f64,
}

impl StageIo {
    pub fn finish(
        inputs: &[std::path::PathBuf],
        output: &std::path::Path,
        summary: text::ReadSummary,
        start: std::time::Instant,
    ) -> StageIo {
        let seconds = start.elapsed().as_secs_f64();
        StageIo {
            inputs: inputs.to_vec(),
            output: output.to_path_buf(),
            megabytes_per_second: summary.bytes as f64 / 1e6 / seconds.max(1e-9),
            skipped: summary.skipped,
            seconds,
        }
    }
}

/// Streams `inputs` block by block through `process`, which returns the records to keep, and
/// writes them as JSONL to `out` (under a temporary name renamed at the end).
pub fn stream_to_jsonl(
    inputs: &[std::path::PathBuf],
    read: &text::ReadOptions,
    label: &str,
    out: &std::path::Path,
    mut process: impl FnMut(Vec<String>) -> anyhow::Result<Vec<serde_json::Value>>,
) -> anyhow::Result<text::ReadSummary> {
    use std::io::Write;
    crate::util::write_atomic_with(out, |tmp| {
        let mut w = std::io::BufWriter::new(std::fs::File::create(tmp)?);
        let summary = text::for_each_chunk(inputs, read, label, block_bytes(), |docs| {
            for record in process(docs)? {
                serde_json::to_writer(&mut w, &record)?;
                w.write_all(b"\n")?;
            }
            Ok(())
        })?;
        w.flush()?;
        Ok(summary)
    })
}
