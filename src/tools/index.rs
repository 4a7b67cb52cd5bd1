//! The document index behind retrieval: the user's files cut into passages and searched with BM25
//! (tantivy). Text is split into lowercase words, and Chinese (any CJK run) into overlapping
//! character pairs: Chinese has no spaces, and pairs retrieve nearly as well as a word segmenter
//! on short passages without shipping a dictionary.
//!
//! Adding is incremental and atomic: files go into one tantivy commit, which replaces the index's
//! meta file in one rename, so a killed `index add` leaves the previous index as it was. Adding a
//! file again replaces its passages.

use crate::data::text::{read_located_documents, DocFormat, ReadOptions, Skipped};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tantivy::collector::TopDocs;
use tantivy::query::{BooleanQuery, Occur, Query, TermQuery};
use tantivy::schema::{
    Field, IndexRecordOption, Schema, TextFieldIndexing, TextOptions, Value, STORED, STRING,
};
use tantivy::tokenizer::{
    Language, Stemmer, StopWordFilter, TextAnalyzer, Token, TokenStream, Tokenizer,
};
use tantivy::{Index, IndexWriter, TantivyDocument, Term};

/// Bumped whenever the schema, the tokenizer or the passage rule changes.
pub const FORMAT_VERSION: u32 = 1;
const MANIFEST: &str = "chatforge-index.json";
const TOKENIZER: &str = "chatforge_words_cjk_pairs_stemmed";
/// English words too common to help ranking.
const STOP_WORDS: [&str; 24] = [
    "a", "an", "and", "are", "as", "at", "be", "by", "did", "do", "does", "for", "in", "is", "it",
    "of", "on", "or", "that", "the", "to", "was", "what", "with",
];
/// A passage's size: words, with each CJK character counted as half a word.
pub const PASSAGE_WORDS: f32 = 80.0;

#[derive(Serialize, Deserialize)]
struct Manifest {
    format: String,
    version: u32,
    tokenizer: String,
    passage_words: f32,
}

/// A passage found by a search, with where it came from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Passage {
    pub file: String,
    /// The line (text, JSONL) or row (Parquet) its document starts on, from 1.
    pub line: usize,
    pub text: String,
    pub score: f32,
}

impl Passage {
    /// `file:line`, how replies name their sources.
    pub fn source(&self) -> String {
        format!("{}:{}", self.file, self.line)
    }
}

/// What an `index add` did.
#[derive(Debug, Default, Serialize)]
pub struct AddSummary {
    pub files: usize,
    pub documents: usize,
    pub passages: usize,
    pub total_passages: u64,
}

struct Fields {
    text: Field,
    file: Field,
    key: Field,
    line: Field,
}

/// An open index.
pub struct DocumentIndex {
    index: Index,
    fields: Fields,
    reader: tantivy::IndexReader,
}

fn schema() -> (Schema, Fields) {
    let mut b = Schema::builder();
    let indexing = TextFieldIndexing::default()
        .set_tokenizer(TOKENIZER)
        .set_index_option(IndexRecordOption::WithFreqs);
    let text = b.add_text_field(
        "text",
        TextOptions::default()
            .set_indexing_options(indexing)
            .set_stored(),
    );
    let file = b.add_text_field("file", STORED);
    // The canonical path: adding a file again deletes its passages by this term.
    let key = b.add_text_field("key", STRING);
    let line = b.add_u64_field("line", STORED);
    (
        b.build(),
        Fields {
            text,
            file,
            key,
            line,
        },
    )
}

impl DocumentIndex {
    /// Opens the index in `dir`, refusing a folder that is not one or was written by another version.
    pub fn open(dir: &Path) -> Result<DocumentIndex> {
        let manifest_path = dir.join(MANIFEST);
        let raw = std::fs::read_to_string(&manifest_path).with_context(|| {
            format!(
                "{} is not a chatforge index (no {MANIFEST}): create one with `chatforge index add --index {} FILE...`",
                dir.display(),
                dir.display()
            )
        })?;
        let m: Manifest = serde_json::from_str(&raw)
            .with_context(|| format!("{}: not a valid index manifest", manifest_path.display()))?;
        if m.version != FORMAT_VERSION || m.tokenizer != TOKENIZER {
            bail!(
                "{} was written by index format {} ({}); this chatforge reads format {FORMAT_VERSION}: \
                 build it again with `chatforge index add --index NEW_DIR FILE...`",
                dir.display(),
                m.version,
                m.tokenizer
            );
        }
        // The manifest is written first: a run killed before tantivy's first commit leaves it alone.
        let index = if dir.join("meta.json").exists() {
            Index::open_in_dir(dir)
        } else {
            Index::create_in_dir(dir, schema().0)
        }
        .with_context(|| format!("cannot open the index in {}", dir.display()))?;
        Self::from_index(index)
    }

    /// Opens the index in `dir`, creating an empty one if the folder has none.
    pub fn open_or_create(dir: &Path) -> Result<DocumentIndex> {
        if !dir.join(MANIFEST).exists() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create the index folder {}", dir.display()))?;
            if std::fs::read_dir(dir)?.next().is_some() {
                bail!(
                    "{} is not empty and holds no chatforge index: choose an empty or new folder for --index",
                    dir.display()
                );
            }
            let m = Manifest {
                format: "chatforge document index".into(),
                version: FORMAT_VERSION,
                tokenizer: TOKENIZER.into(),
                passage_words: PASSAGE_WORDS,
            };
            let json = serde_json::to_string_pretty(&m)?;
            crate::util::write_atomic(&dir.join(MANIFEST), json.as_bytes())?;
        }
        Self::open(dir)
    }

    fn from_index(index: Index) -> Result<DocumentIndex> {
        index.tokenizers().register(TOKENIZER, analyzer());
        let schema = index.schema();
        let field = |name: &str| {
            schema
                .get_field(name)
                .with_context(|| format!("the index has no field {name}: build it again"))
        };
        let fields = Fields {
            text: field("text")?,
            file: field("file")?,
            key: field("key")?,
            line: field("line")?,
        };
        let reader = index.reader()?;
        Ok(DocumentIndex {
            index,
            fields,
            reader,
        })
    }

    /// Passages in the index.
    pub fn len(&self) -> u64 {
        self.reader.searcher().num_docs()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Cuts `files` into passages and adds them in one commit; a file added before is replaced.
    /// Every file is read before anything is written, so a bad file changes nothing.
    pub fn add(&mut self, files: &[PathBuf], read: &ReadOptions) -> Result<AddSummary> {
        let mut summary = AddSummary::default();
        let mut pending = Vec::new();
        for path in files {
            let key = std::fs::canonicalize(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let mut passages = Vec::new();
            let mut skipped = Skipped::default();
            // In text files a passage cites its own line; a JSONL or Parquet record its record's.
            let by_line = !matches!(
                read.format.resolve(path),
                DocFormat::Jsonl | DocFormat::Parquet
            );
            let docs = read_located_documents(path, read, &mut skipped, |text, _, line| {
                let mut newlines = 0;
                let mut counted = 0;
                for (at, p) in split_passages_at(&text, PASSAGE_WORDS) {
                    if by_line {
                        newlines += text[counted..at].matches('\n').count();
                        counted = at;
                    }
                    passages.push((line + newlines, p));
                }
                Ok(())
            })?;
            if passages.is_empty() {
                bail!(
                    "{}: no text to index (the file is empty or has only blank records)",
                    path.display()
                );
            }
            summary.files += 1;
            summary.documents += docs;
            summary.passages += passages.len();
            pending.push((path.display().to_string(), key, passages));
        }
        let mut writer: IndexWriter = self.index.writer_with_num_threads(1, 50_000_000)?;
        for (file, key, passages) in pending {
            let key = key.to_string_lossy().to_string();
            writer.delete_term(Term::from_field_text(self.fields.key, &key));
            for (line, text) in passages {
                let mut doc = TantivyDocument::default();
                doc.add_text(self.fields.text, &text);
                doc.add_text(self.fields.file, &file);
                doc.add_text(self.fields.key, &key);
                doc.add_u64(self.fields.line, line as u64);
                writer.add_document(doc)?;
            }
        }
        writer.commit().context("cannot commit the index")?;
        writer.wait_merging_threads()?;
        self.reader.reload()?;
        summary.total_passages = self.len();
        Ok(summary)
    }

    /// The `k` passages that best match `query` (BM25), best first.
    pub fn search(&self, query: &str, k: usize) -> Result<Vec<Passage>> {
        let terms = terms(query);
        if terms.is_empty() || k == 0 {
            return Ok(Vec::new());
        }
        let clauses: Vec<(Occur, Box<dyn Query>)> = terms
            .into_iter()
            .map(|t| {
                let term = Term::from_field_text(self.fields.text, &t);
                let q: Box<dyn Query> =
                    Box::new(TermQuery::new(term, IndexRecordOption::WithFreqs));
                (Occur::Should, q)
            })
            .collect();
        let query = BooleanQuery::new(clauses);
        let searcher = self.reader.searcher();
        let top = searcher.search(&query, &TopDocs::with_limit(k).order_by_score())?;
        let mut out = Vec::with_capacity(top.len());
        for (score, address) in top {
            let doc: TantivyDocument = searcher.doc(address)?;
            let text = |f: Field| {
                doc.get_first(f)
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_string()
            };
            out.push(Passage {
                file: text(self.fields.file),
                line: doc
                    .get_first(self.fields.line)
                    .and_then(|v| v.as_u64())
                    .unwrap_or(0) as usize,
                text: text(self.fields.text),
                score,
            });
        }
        Ok(out)
    }
}

fn is_cjk(c: char) -> bool {
    matches!(c,
        '\u{3040}'..='\u{30ff}' | '\u{3400}'..='\u{4dbf}' | '\u{4e00}'..='\u{9fff}'
        | '\u{f900}'..='\u{faff}' | '\u{ac00}'..='\u{d7af}')
}

/// The index's terms for `text`, with byte offsets: lowercase words of letters and digits, and
/// for each run of CJK characters its overlapping pairs (the character alone when the run has one).
fn analyse(text: &str) -> Vec<(usize, usize, String)> {
    let mut out = Vec::new();
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let end_of = |i: usize| chars.get(i).map_or(text.len(), |&(b, _)| b);
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i].1;
        if is_cjk(c) {
            let start = i;
            while i < chars.len() && is_cjk(chars[i].1) {
                i += 1;
            }
            if i - start == 1 {
                out.push((chars[start].0, end_of(i), c.to_string()));
            }
            for j in start..i.saturating_sub(1) {
                let pair: String = [chars[j].1, chars[j + 1].1].iter().collect();
                out.push((chars[j].0, end_of(j + 2), pair));
            }
        } else if c.is_alphanumeric() {
            let start = i;
            while i < chars.len() && chars[i].1.is_alphanumeric() && !is_cjk(chars[i].1) {
                i += 1;
            }
            let word = text[chars[start].0..end_of(i)].to_lowercase();
            out.push((chars[start].0, end_of(i), word));
        } else {
            i += 1;
        }
    }
    out
}

/// The index's analyser: [`analyse`], then English stop words out and English stems (Chinese
/// pairs pass through the stemmer unchanged), so "emerge" finds "emerged".
fn analyzer() -> TextAnalyzer {
    TextAnalyzer::builder(WordsAndCjkPairs)
        .filter(StopWordFilter::remove(STOP_WORDS.map(String::from)))
        .filter(Stemmer::new(Language::English))
        .build()
}

/// The distinct terms of a query, as the index holds them.
fn terms(query: &str) -> Vec<String> {
    let mut seen = std::collections::BTreeSet::new();
    let mut analyzer = analyzer();
    let mut stream = analyzer.token_stream(query);
    let mut out = Vec::new();
    while stream.advance() {
        let t = stream.token().text.clone();
        if seen.insert(t.clone()) {
            out.push(t);
        }
    }
    out
}

/// [`analyse`] as a tantivy tokenizer.
#[derive(Clone)]
struct WordsAndCjkPairs;

struct Tokens {
    tokens: Vec<Token>,
    next: usize,
}

impl Tokenizer for WordsAndCjkPairs {
    type TokenStream<'a> = Tokens;
    fn token_stream<'a>(&'a mut self, text: &'a str) -> Tokens {
        let tokens = analyse(text)
            .into_iter()
            .enumerate()
            .map(|(position, (from, to, text))| Token {
                offset_from: from,
                offset_to: to,
                position,
                text,
                position_length: 1,
            })
            .collect();
        Tokens { tokens, next: 0 }
    }
}

impl TokenStream for Tokens {
    fn advance(&mut self) -> bool {
        self.next += 1;
        self.next <= self.tokens.len()
    }
    fn token(&self) -> &Token {
        &self.tokens[self.next - 1]
    }
    fn token_mut(&mut self) -> &mut Token {
        &mut self.tokens[self.next - 1]
    }
}

/// A span's size in words, a CJK character counting half.
fn weight(text: &str) -> f32 {
    let cjk = text.chars().filter(|&c| is_cjk(c)).count() as f32;
    let words = text
        .split(|c: char| c.is_whitespace() || is_cjk(c))
        .filter(|w| w.chars().any(char::is_alphanumeric))
        .count() as f32;
    words + cjk / 2.0
}

/// Cuts a document into passages of about `max_words` at sentence ends (a sentence longer than
/// that is a passage of its own).
pub fn split_passages(text: &str, max_words: f32) -> Vec<String> {
    split_passages_at(text, max_words)
        .into_iter()
        .map(|(_, p)| p)
        .collect()
}

/// [`split_passages`] with each passage's byte offset in `text`.
pub fn split_passages_at(text: &str, max_words: f32) -> Vec<(usize, String)> {
    let mut sentences: Vec<(usize, &str)> = Vec::new();
    let mut start = 0;
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        let end = i + c.len_utf8();
        let next_space = chars.peek().is_none_or(|&(_, n)| n.is_whitespace());
        let ends =
            matches!(c, '。' | '！' | '？' | '\n') || (matches!(c, '.' | '!' | '?') && next_space);
        if ends {
            sentences.push((start, &text[start..end]));
            start = end;
        }
    }
    sentences.push((start, &text[start..]));
    let mut out = Vec::new();
    let mut current = String::new();
    let mut current_at = 0;
    for (at, s) in sentences {
        if s.trim().is_empty() {
            continue;
        }
        if !current.is_empty() && weight(&current) + weight(s) > max_words {
            out.push((current_at, std::mem::take(&mut current).trim().to_string()));
        }
        if current.is_empty() {
            // Where the passage's text starts, past leading blanks.
            current_at = at + (s.len() - s.trim_start().len());
        }
        current.push_str(s);
    }
    if !current.trim().is_empty() {
        out.push((current_at, current.trim().to_string()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_lowercased_and_chinese_is_cut_into_pairs() {
        let t: Vec<String> = analyse("The Cat, 猫有四条腿; x 狗")
            .into_iter()
            .map(|(_, _, t)| t)
            .collect();
        assert_eq!(t, ["the", "cat", "猫有", "有四", "四条", "条腿", "x", "狗"]);
        assert_eq!(
            terms("When did the anarchists emerge? 猫有"),
            ["when", "anarchist", "emerg", "猫有"]
        );
    }

    #[test]
    fn passages_break_at_sentence_ends_within_the_size() {
        let doc = "One two three. Four five six. Seven eight nine ten. 猫有四条腿。狗也有。";
        let p = split_passages(doc, 7.0);
        assert_eq!(p[0], "One two three. Four five six.");
        assert_eq!(p[1], "Seven eight nine ten. 猫有四条腿。");
        assert_eq!(p[2], "狗也有。");
        assert_eq!(p.concat().replace(' ', ""), doc.replace(' ', ""));
        let at: Vec<usize> = split_passages_at(doc, 7.0)
            .iter()
            .map(|(a, _)| *a)
            .collect();
        assert_eq!(&doc[at[1]..at[1] + 5], "Seven");
        assert_eq!(&doc[at[2]..], "狗也有。");
        // 3.14 is not a sentence end.
        assert_eq!(split_passages("Pi is 3.14 or so.", 2.0).len(), 1);
    }
}
