//! Streaming document readers for plain text, JSONL and Parquet, with a policy for bad records,
//! and a chunked driver that reads on one thread while the caller processes the previous chunk.

use super::OnError;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};

/// How a file is cut into documents.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum DocFormat {
    /// By extension: `.jsonl` as JSONL, `.parquet` as Parquet, anything else as paragraphs.
    Auto,
    /// Documents separated by one or more blank lines.
    Paragraphs,
    /// One document per line.
    Lines,
    /// One JSON object per line; the text is in a configurable field (default `text`).
    Jsonl,
    /// A Parquet file (FineWeb, most Hugging Face datasets); the text is a string column.
    Parquet,
}

impl DocFormat {
    pub fn resolve(self, path: &Path) -> DocFormat {
        match self {
            DocFormat::Auto => match path.extension().and_then(|e| e.to_str()) {
                Some("jsonl") => DocFormat::Jsonl,
                Some("parquet") => DocFormat::Parquet,
                _ => DocFormat::Paragraphs,
            },
            other => other,
        }
    }
}

/// How to read documents: the format, the JSONL field or Parquet column, and what to do with a
/// record that cannot be read.
#[derive(Clone, Debug)]
pub struct ReadOptions {
    pub format: DocFormat,
    pub text_field: String,
    pub on_error: OnError,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            format: DocFormat::Auto,
            text_field: "text".into(),
            on_error: OnError::Fail,
        }
    }
}

/// Records left out under [`OnError::Skip`], by reason, with the first few messages.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct Skipped {
    pub records: usize,
    pub reasons: BTreeMap<String, usize>,
    pub examples: Vec<String>,
}

impl Skipped {
    fn add(&mut self, reason: &str, message: String) {
        self.records += 1;
        *self.reasons.entry(reason.to_string()).or_default() += 1;
        if self.examples.len() < 5 {
            self.examples.push(message);
        }
    }

    pub fn merge(&mut self, other: Skipped) {
        self.records += other.records;
        for (k, v) in other.reasons {
            *self.reasons.entry(k).or_default() += v;
        }
        for e in other.examples {
            if self.examples.len() < 5 {
                self.examples.push(e);
            }
        }
    }
}

/// Applies the error policy: fails with `message`, or counts it under `reason` and goes on.
fn bad_record(
    opts: &ReadOptions,
    skipped: &mut Skipped,
    reason: &str,
    message: String,
) -> Result<()> {
    match opts.on_error {
        OnError::Fail => bail!("{message} (or pass --on-error skip to leave such records out)"),
        OnError::Skip => {
            skipped.add(reason, message);
            Ok(())
        }
    }
}

/// Reads documents from `path` one at a time and hands each to `sink` with the number of input
/// bytes consumed so far (for progress), failing on the first bad record. Memory stays at one
/// document plus the read buffer.
pub fn read_documents(
    path: &Path,
    format: DocFormat,
    text_field: &str,
    sink: impl FnMut(String, u64) -> Result<()>,
) -> Result<usize> {
    let opts = ReadOptions {
        format,
        text_field: text_field.into(),
        on_error: OnError::Fail,
    };
    read_documents_with(path, &opts, &mut Skipped::default(), sink)
}

/// [`read_documents`] with an error policy; skipped records are counted in `skipped`.
pub fn read_documents_with(
    path: &Path,
    opts: &ReadOptions,
    skipped: &mut Skipped,
    mut sink: impl FnMut(String, u64) -> Result<()>,
) -> Result<usize> {
    read_located_documents(path, opts, skipped, |text, consumed, _| {
        sink(text, consumed)
    })
}

/// [`read_documents_with`] that also tells where each document starts: its first line (text and
/// JSONL) or its row (Parquet), counted from 1, for citing a passage's source.
pub fn read_located_documents(
    path: &Path,
    opts: &ReadOptions,
    skipped: &mut Skipped,
    mut sink: impl FnMut(String, u64, usize) -> Result<()>,
) -> Result<usize> {
    let format = opts.format.resolve(path);
    if format == DocFormat::Parquet {
        return read_parquet(path, opts, skipped, sink);
    }
    let text_field = opts.text_field.as_str();
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot open input file {}", path.display()))?;
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    let mut docs = 0usize;
    let mut consumed = 0u64;
    let mut line = Vec::new();
    let mut paragraph = String::new();
    let mut line_no = 0usize;
    let mut paragraph_line = 0usize;
    loop {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        consumed += n as u64;
        line_no += 1;
        let text = match std::str::from_utf8(&line) {
            Ok(t) => t,
            Err(e) => {
                bad_record(
                    opts,
                    skipped,
                    "invalid_utf8",
                    format!(
                        "{}:{line_no}: not valid UTF-8 (byte {} of the line); convert the file to UTF-8",
                        path.display(),
                        e.valid_up_to() + 1
                    ),
                )?;
                continue;
            }
        };
        match format {
            DocFormat::Lines => {
                let t = text.trim_end_matches(['\n', '\r']);
                if !t.trim().is_empty() {
                    sink(t.to_string(), consumed, line_no)?;
                    docs += 1;
                }
            }
            DocFormat::Paragraphs | DocFormat::Auto | DocFormat::Parquet => {
                if text.trim().is_empty() {
                    if !paragraph.is_empty() {
                        let doc = std::mem::take(&mut paragraph);
                        sink(
                            doc.trim_end_matches(['\n', '\r']).to_string(),
                            consumed,
                            paragraph_line,
                        )?;
                        docs += 1;
                    }
                } else {
                    if paragraph.is_empty() {
                        paragraph_line = line_no;
                    }
                    paragraph.push_str(text);
                }
            }
            DocFormat::Jsonl => {
                if text.trim().is_empty() {
                    continue;
                }
                let value: serde_json::Value = match serde_json::from_str(text) {
                    Ok(v) => v,
                    Err(e) => {
                        bad_record(opts, skipped, "invalid_json", format!(
                            "{}:{line_no}: not a JSON object ({e}); each line of a JSONL file must be one object like {{\"{text_field}\": \"...\"}}",
                            path.display()
                        ))?;
                        continue;
                    }
                };
                match value.get(text_field) {
                    Some(serde_json::Value::String(s)) => {
                        if !s.trim().is_empty() {
                            sink(s.clone(), consumed, line_no)?;
                            docs += 1;
                        }
                    }
                    Some(_) => bad_record(
                        opts,
                        skipped,
                        "field_not_a_string",
                        format!(
                            "{}:{line_no}: field \"{text_field}\" is not a string",
                            path.display()
                        ),
                    )?,
                    None => bad_record(
                        opts,
                        skipped,
                        "missing_field",
                        format!(
                            "{}:{line_no}: no \"{text_field}\" field; choose the text field with --text-field",
                            path.display()
                        ),
                    )?,
                }
            }
        }
    }
    if !paragraph.trim().is_empty() {
        sink(
            paragraph.trim_end_matches(['\n', '\r']).to_string(),
            consumed,
            paragraph_line,
        )?;
        docs += 1;
    }
    Ok(docs)
}

/// Streams one string column of a Parquet file in record batches (only that column is decoded).
fn read_parquet(
    path: &Path,
    opts: &ReadOptions,
    skipped: &mut Skipped,
    mut sink: impl FnMut(String, u64, usize) -> Result<()>,
) -> Result<usize> {
    use arrow_array::cast::AsArray;
    use arrow_array::Array;
    use arrow_schema::DataType;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use parquet::arrow::ProjectionMask;

    let field = opts.text_field.as_str();
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot open input file {}", path.display()))?;
    let file_len = file.metadata()?.len();
    // A damaged file fails the read, or under the skip policy ends it (the rest cannot be trusted).
    let corrupt = |skipped: &mut Skipped, what: String| {
        bad_record(
            opts,
            skipped,
            "corrupt_parquet",
            format!("{}: {what}", path.display()),
        )
    };
    // The parquet crate can panic on crafted pages: a panic is a damaged file like any other.
    let opened =
        crate::util::panic_to_error(|| Ok(ParquetRecordBatchReaderBuilder::try_new(file)?));
    let builder = match opened {
        Ok(b) => b,
        Err(e) => {
            corrupt(
                skipped,
                format!("not a readable Parquet file ({e}); check that the download is complete"),
            )?;
            return Ok(0);
        }
    };
    let schema = builder.parquet_schema();
    let columns: Vec<String> = schema.columns().iter().map(|c| c.path().string()).collect();
    let Some(index) = columns.iter().position(|c| c == field) else {
        // A whole file without the column is a configuration mistake, not a bad record.
        bail!(
            "{}: no column \"{field}\" (columns: {}); choose the text column with --text-field",
            path.display(),
            columns.join(", ")
        );
    };
    let total_rows = builder.metadata().file_metadata().num_rows().max(1) as u64;
    let mask = ProjectionMask::leaves(schema, [index]);
    let mut reader = builder
        .with_projection(mask)
        .with_batch_size(1024)
        .build()
        .with_context(|| format!("cannot read {}", path.display()))?;
    let mut docs = 0usize;
    let mut row = 0u64;
    loop {
        let next = crate::util::panic_to_error(|| Ok(reader.next().transpose()?));
        let batch = match next {
            Ok(Some(b)) => b,
            Ok(None) => break,
            Err(e) => {
                corrupt(
                    skipped,
                    format!("row {}: cannot decode ({e}); the file is damaged", row + 1),
                )?;
                break;
            }
        };
        let column = batch.column(0);
        let rows = column.len();
        let mut emit = |i: usize, text: Option<&str>| -> Result<()> {
            if let Some(t) = text {
                if !t.trim().is_empty() {
                    let consumed = (row + i as u64 + 1) * file_len / total_rows;
                    sink(t.to_string(), consumed, (row + i as u64 + 1) as usize)?;
                    docs += 1;
                }
            }
            Ok(())
        };
        match column.data_type() {
            DataType::Utf8 => {
                let a = column.as_string::<i32>();
                for i in 0..rows {
                    emit(i, a.is_valid(i).then(|| a.value(i)))?;
                }
            }
            DataType::LargeUtf8 => {
                let a = column.as_string::<i64>();
                for i in 0..rows {
                    emit(i, a.is_valid(i).then(|| a.value(i)))?;
                }
            }
            DataType::Utf8View => {
                let a = column.as_string_view();
                for i in 0..rows {
                    emit(i, a.is_valid(i).then(|| a.value(i)))?;
                }
            }
            DataType::Binary | DataType::LargeBinary => {
                for i in 0..rows {
                    if !column.is_valid(i) {
                        continue;
                    }
                    let bytes = if *column.data_type() == DataType::Binary {
                        column.as_binary::<i32>().value(i)
                    } else {
                        column.as_binary::<i64>().value(i)
                    };
                    match std::str::from_utf8(bytes) {
                        Ok(t) => emit(i, Some(t))?,
                        Err(e) => bad_record(
                            opts,
                            skipped,
                            "invalid_utf8",
                            format!(
                                "{}: row {}: column \"{field}\" is not valid UTF-8 (byte {})",
                                path.display(),
                                row + i as u64 + 1,
                                e.valid_up_to() + 1
                            ),
                        )?,
                    }
                }
            }
            other => bail!(
                "{}: column \"{field}\" holds {other}, not text; choose a string column with --text-field",
                path.display()
            ),
        }
        row += rows as u64;
    }
    Ok(docs)
}

/// What [`for_each_chunk`] read.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ReadSummary {
    pub documents: usize,
    /// UTF-8 bytes of the documents' text.
    pub bytes: u64,
    pub skipped: Skipped,
}

/// Reads documents from `inputs` in chunks of about `chunk_bytes` and hands each chunk to
/// `handle`, with a progress bar over the input bytes. A reader thread fills the next chunk while
/// `handle` works on this one, so memory holds about two chunks whatever the input size.
pub fn for_each_chunk(
    inputs: &[PathBuf],
    opts: &ReadOptions,
    label: &str,
    chunk_bytes: usize,
    mut handle: impl FnMut(Vec<String>) -> Result<()>,
) -> Result<ReadSummary> {
    if inputs.is_empty() {
        bail!("no input files given");
    }
    let total = total_size(inputs)?;
    let pb = ProgressBar::new(total).with_style(
        ProgressStyle::with_template(&format!(
            "{label} {{bar:30}} {{bytes}}/{{total_bytes}} {{bytes_per_sec}} ETA {{eta}}"
        ))
        .expect("valid template"),
    );
    if !crate::dist::is_leader() {
        // Under mpirun every rank reads; rank 0 shows the progress.
        pb.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<String>>(1);
    let result = std::thread::scope(|scope| -> Result<ReadSummary> {
        let reader = scope.spawn(|| -> Result<ReadSummary> {
            let mut summary = ReadSummary::default();
            let mut chunk = Vec::new();
            let mut bytes = 0usize;
            let mut done_before = 0u64;
            for path in inputs {
                read_documents_with(path, opts, &mut summary.skipped, |doc, consumed| {
                    bytes += doc.len();
                    summary.bytes += doc.len() as u64;
                    summary.documents += 1;
                    chunk.push(doc);
                    pb.set_position(done_before + consumed);
                    if bytes >= chunk_bytes {
                        bytes = 0;
                        // The receiver is gone only when the handler failed; its error is reported.
                        tx.send(std::mem::take(&mut chunk))
                            .map_err(|_| anyhow::anyhow!("stopped"))?;
                    }
                    Ok(())
                })?;
                done_before += std::fs::metadata(path)?.len();
            }
            if !chunk.is_empty() {
                tx.send(chunk).map_err(|_| anyhow::anyhow!("stopped"))?;
            }
            drop(tx);
            Ok(summary)
        });
        let mut handled = Ok(());
        for chunk in rx.iter() {
            handled = handle(chunk);
            if handled.is_err() {
                break;
            }
        }
        drop(rx);
        // A panic on the reader thread (a decoder bug on some input) becomes an error that
        // names it, like any unreadable input.
        let read = reader.join().unwrap_or_else(|p| {
            let why = crate::util::panic_message(p.as_ref());
            Err(anyhow::anyhow!("the reader failed on this input ({why})"))
        });
        handled?;
        read
    });
    pb.finish_and_clear();
    result
}

/// Reads every document of every file into memory (for tokenizer training), failing on an empty corpus.
pub fn read_all_documents(
    paths: &[std::path::PathBuf],
    format: DocFormat,
    text_field: &str,
) -> Result<Vec<String>> {
    if paths.is_empty() {
        bail!("no input files given");
    }
    let mut docs = Vec::new();
    for p in paths {
        read_documents(p, format, text_field, |d, _| {
            docs.push(d);
            Ok(())
        })?;
    }
    if docs.is_empty() {
        bail!(
            "the corpus is empty: no text found in {}",
            paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(docs)
}

/// Total size in bytes of the input files, checking that each exists.
pub fn total_size(paths: &[std::path::PathBuf]) -> Result<u64> {
    let mut total = 0;
    for p in paths {
        let meta = std::fs::metadata(p)
            .with_context(|| format!("cannot open input file {}", p.display()))?;
        if meta.is_dir() {
            bail!(
                "{} is a directory; give the text files inside it",
                p.display()
            );
        }
        total += meta.len();
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(content: &str, name: &str, format: DocFormat) -> Result<Vec<String>> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(name);
        std::fs::write(&p, content).unwrap();
        let mut out = Vec::new();
        read_documents(&p, format, "text", |d, _| {
            out.push(d);
            Ok(())
        })?;
        Ok(out)
    }

    #[test]
    fn paragraphs_lines_and_jsonl() {
        let t = "a b\nc\n\n\nd\n";
        assert_eq!(
            collect(t, "x.txt", DocFormat::Auto).unwrap(),
            vec!["a b\nc", "d"]
        );
        assert_eq!(
            collect(t, "x.txt", DocFormat::Lines).unwrap(),
            vec!["a b", "c", "d"]
        );
        let j = "{\"text\": \"hi\"}\n\n{\"text\": \"你好\", \"x\": 1}\n";
        assert_eq!(
            collect(j, "x.jsonl", DocFormat::Auto).unwrap(),
            vec!["hi", "你好"]
        );
    }

    #[test]
    fn bad_jsonl_names_file_and_line() {
        let j = "{\"text\": \"ok\"}\nnot json\n";
        let err = collect(j, "bad.jsonl", DocFormat::Auto)
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad.jsonl:2"), "{err}");
        let j = "{\"body\": \"ok\"}\n";
        let err = collect(j, "b.jsonl", DocFormat::Auto)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("b.jsonl:1") && err.contains("--text-field"),
            "{err}"
        );
    }

    #[test]
    fn missing_file_and_empty_corpus_are_errors() {
        let err = read_all_documents(&["/nonexistent/x.txt".into()], DocFormat::Auto, "text")
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/x.txt"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("empty.txt");
        std::fs::write(&p, "\n\n  \n").unwrap();
        let err = read_all_documents(&[p], DocFormat::Auto, "text")
            .unwrap_err()
            .to_string();
        assert!(err.contains("empty"), "{err}");
    }

    /// A Parquet file like the ones Hugging Face datasets ship: a text column among others,
    /// several row groups, zstd-compressed, with a null.
    fn write_parquet(path: &Path, texts: &[Option<&str>]) {
        use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray};
        use std::sync::Arc;
        let ids: ArrayRef = Arc::new(Int64Array::from_iter_values(0..texts.len() as i64));
        let text: ArrayRef = Arc::new(StringArray::from(texts.to_vec()));
        let batch = RecordBatch::try_from_iter([("id", ids), ("text", text)]).unwrap();
        let props = parquet::file::properties::WriterProperties::builder()
            .set_compression(parquet::basic::Compression::ZSTD(Default::default()))
            .set_max_row_group_row_count(Some(3))
            .build();
        let mut w = parquet::arrow::ArrowWriter::try_new(
            std::fs::File::create(path).unwrap(),
            batch.schema(),
            Some(props),
        )
        .unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
    }

    #[test]
    fn parquet_text_column_streams_and_bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("web.parquet");
        let texts = [
            Some("first document"),
            None,
            Some("第二篇文档"),
            Some("third\nwith two lines"),
            Some("  "),
            Some("emoji 🎉"),
            Some("last"),
        ];
        write_parquet(&p, &texts);
        let mut got = Vec::new();
        let mut last = 0;
        read_documents(&p, DocFormat::Auto, "text", |d, consumed| {
            assert!(consumed >= last, "progress goes forward");
            last = consumed;
            got.push(d);
            Ok(())
        })
        .unwrap();
        assert_eq!(
            got,
            vec![
                "first document",
                "第二篇文档",
                "third\nwith two lines",
                "emoji 🎉",
                "last"
            ]
        );
        assert_eq!(last, std::fs::metadata(&p).unwrap().len());

        let err = read_documents(&p, DocFormat::Auto, "content", |_, _| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("web.parquet") && err.contains("\"content\"") && err.contains("id, text"),
            "{err}"
        );
        let err = read_documents(&p, DocFormat::Auto, "id", |_, _| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not text"), "{err}");

        // A download cut short: the footer is gone.
        let bytes = std::fs::read(&p).unwrap();
        let cut = dir.path().join("cut.parquet");
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        let err = read_documents(&cut, DocFormat::Auto, "text", |_, _| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cut.parquet") && err.contains("--on-error skip"),
            "{err}"
        );
        let mut skipped = Skipped::default();
        let opts = ReadOptions {
            on_error: OnError::Skip,
            ..Default::default()
        };
        let n = read_documents_with(&cut, &opts, &mut skipped, |_, _| Ok(())).unwrap();
        assert_eq!((n, skipped.reasons["corrupt_parquet"]), (0, 1));
    }

    #[test]
    fn skip_policy_counts_bad_records_by_reason_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("mixed.jsonl");
        let mut content =
            b"{\"text\": \"one\"}\nnot json\n{\"body\": \"x\"}\n{\"text\": 5}\n".to_vec();
        content.extend_from_slice(b"{\"text\": \"bad \xff byte\"}\n{\"text\": \"two\"}\n");
        std::fs::write(&p, &content).unwrap();
        let opts = ReadOptions {
            on_error: OnError::Skip,
            ..Default::default()
        };
        let mut skipped = Skipped::default();
        let mut got = Vec::new();
        read_documents_with(&p, &opts, &mut skipped, |d, _| {
            got.push(d);
            Ok(())
        })
        .unwrap();
        assert_eq!(got, vec!["one", "two"]);
        assert_eq!(skipped.records, 4);
        for reason in [
            "invalid_json",
            "missing_field",
            "field_not_a_string",
            "invalid_utf8",
        ] {
            assert_eq!(skipped.reasons.get(reason), Some(&1), "{reason}");
        }
        assert!(
            skipped.examples[0].contains("mixed.jsonl:2"),
            "{:?}",
            skipped.examples
        );
        // Under the default policy the first bad record stops the read, naming its line.
        let err = read_documents(&p, DocFormat::Auto, "text", |_, _| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("mixed.jsonl:2"), "{err}");
    }

    #[test]
    fn chunks_are_bounded_and_cover_every_document_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.txt");
        let b = dir.path().join("b.jsonl");
        let docs: Vec<String> = (0..500)
            .map(|i| format!("document {i} {}", "x".repeat(i % 37)))
            .collect();
        std::fs::write(&a, docs[..300].join("\n\n")).unwrap();
        let jsonl: String = docs[300..]
            .iter()
            .map(|d| serde_json::json!({ "text": d }).to_string() + "\n")
            .collect();
        std::fs::write(&b, jsonl).unwrap();
        let mut seen = Vec::new();
        let mut chunks = 0;
        let summary = for_each_chunk(&[a, b], &ReadOptions::default(), "test", 1000, |chunk| {
            let bytes: usize = chunk.iter().map(|d| d.len()).sum();
            // A chunk closes at the first document that reaches the limit.
            assert!(bytes < 1000 + 60, "chunk of {bytes} bytes");
            chunks += 1;
            seen.extend(chunk);
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, docs);
        assert!(chunks > 10, "{chunks}");
        assert_eq!(summary.documents, 500);
        // A failing handler stops the reader and its error comes back.
        let err = for_each_chunk(
            &[dir.path().join("a.txt")],
            &ReadOptions::default(),
            "test",
            100,
            |_| anyhow::bail!("handler failed"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("handler failed"), "{err}");
    }
}
