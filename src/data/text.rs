//! Streaming document readers for plain text and JSONL.

use anyhow::{bail, Context, Result};
use std::io::BufRead;
use std::path::Path;

/// How a file is cut into documents.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
pub enum DocFormat {
    /// `.jsonl` files as JSONL, anything else as paragraphs.
    Auto,
    /// Documents separated by one or more blank lines.
    Paragraphs,
    /// One document per line.
    Lines,
    /// One JSON object per line; the text is in a configurable field (default `text`).
    Jsonl,
}

impl DocFormat {
    pub fn resolve(self, path: &Path) -> DocFormat {
        match self {
            DocFormat::Auto => {
                if path.extension().is_some_and(|e| e == "jsonl") {
                    DocFormat::Jsonl
                } else {
                    DocFormat::Paragraphs
                }
            }
            other => other,
        }
    }
}

/// Reads documents from `path` one at a time and hands each to `sink` with the number of input
/// bytes consumed so far (for progress). Memory stays at one document plus the read buffer.
pub fn read_documents(
    path: &Path,
    format: DocFormat,
    text_field: &str,
    mut sink: impl FnMut(String, u64) -> Result<()>,
) -> Result<usize> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot open input file {}", path.display()))?;
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    let format = format.resolve(path);
    let mut docs = 0usize;
    let mut consumed = 0u64;
    let mut line = Vec::new();
    let mut paragraph = String::new();
    let mut line_no = 0usize;
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
        let text = std::str::from_utf8(&line).map_err(|e| {
            anyhow::anyhow!(
                "{}:{line_no}: not valid UTF-8 (byte {} of the line); convert the file to UTF-8",
                path.display(),
                e.valid_up_to() + 1
            )
        })?;
        match format {
            DocFormat::Lines => {
                let t = text.trim_end_matches(['\n', '\r']);
                if !t.trim().is_empty() {
                    sink(t.to_string(), consumed)?;
                    docs += 1;
                }
            }
            DocFormat::Paragraphs | DocFormat::Auto => {
                if text.trim().is_empty() {
                    if !paragraph.is_empty() {
                        let doc = std::mem::take(&mut paragraph);
                        sink(doc.trim_end_matches(['\n', '\r']).to_string(), consumed)?;
                        docs += 1;
                    }
                } else {
                    paragraph.push_str(text);
                }
            }
            DocFormat::Jsonl => {
                if text.trim().is_empty() {
                    continue;
                }
                let value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
                    anyhow::anyhow!(
                        "{}:{line_no}: not a JSON object ({e}); each line of a JSONL file must be one object like {{\"{text_field}\": \"...\"}}",
                        path.display()
                    )
                })?;
                match value.get(text_field) {
                    Some(serde_json::Value::String(s)) => {
                        if !s.trim().is_empty() {
                            sink(s.clone(), consumed)?;
                            docs += 1;
                        }
                    }
                    Some(_) => bail!(
                        "{}:{line_no}: field \"{text_field}\" is not a string",
                        path.display()
                    ),
                    None => bail!(
                        "{}:{line_no}: no \"{text_field}\" field; choose the text field with --text-field",
                        path.display()
                    ),
                }
            }
        }
    }
    if !paragraph.trim().is_empty() {
        sink(
            paragraph.trim_end_matches(['\n', '\r']).to_string(),
            consumed,
        )?;
        docs += 1;
    }
    Ok(docs)
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
}
