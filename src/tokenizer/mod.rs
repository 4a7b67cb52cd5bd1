//! Byte-level BPE tokenizer: training, loading and saving (`tokenizer.json`, the `tokenizers`
//! crate's format, which also does the encoding), and the reserved special tokens of the chat format.

pub mod bpe;
pub mod byte_level;
pub mod chat;
pub mod sentencepiece;

use anyhow::{bail, Result};
use serde_json::json;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Special tokens reserved for the chat format, in id order after the learned vocabulary.
/// `<|bos|>` starts every document; tool and document tokens carry calculator calls and retrieved
/// passages (`crate::tools`); the spares keep the id layout stable when later stages need more.
pub const CHAT_SPECIAL_TOKENS: [&str; 16] = [
    "<|bos|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|system_start|>",
    "<|system_end|>",
    "<|pad|>",
    "<|tool_start|>",
    "<|tool_end|>",
    "<|output_start|>",
    "<|output_end|>",
    "<|document_start|>",
    "<|document_end|>",
    "<|reserved_6|>",
    "<|reserved_7|>",
];

pub const BOS: &str = "<|bos|>";

/// The pre-tokenizer regex that splits text into words before BPE.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SplitPattern {
    /// GPT-2's split (letters, numbers and punctuation runs with an optional leading space).
    Gpt2,
    /// GPT-4's split: numbers in groups of at most three digits, punctuation kept apart from
    /// letters, newlines grouped; CJK runs stay whole words.
    Gpt4,
    /// GPT-4's split with every digit its own word (as Llama 2, Qwen2 and SmolLM split): a small
    /// vocabulary then never learns a token per number, so arithmetic is learned on digits and
    /// carries over to numbers not seen in training.
    Digits,
}

impl SplitPattern {
    pub fn regex(self) -> &'static str {
        match self {
            SplitPattern::Gpt2 => {
                r"'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
            }
            // GPT-4's pattern with its possessive quantifiers written as plain ones: with these
            // alternatives the two match the same strings.
            SplitPattern::Gpt4 => {
                r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"
            }
            SplitPattern::Digits => {
                r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"
            }
        }
    }

    /// The split a `tokenizer.json` pre-tokenizer regex is, if it is one of ours.
    pub fn of_regex(regex: &str) -> Option<SplitPattern> {
        [SplitPattern::Gpt2, SplitPattern::Gpt4, SplitPattern::Digits]
            .into_iter()
            .find(|p| p.regex() == regex)
    }

    /// The name llama.cpp gives this split in a GGUF file's `tokenizer.ggml.pre`.
    pub fn gguf_pre(self) -> &'static str {
        match self {
            SplitPattern::Gpt2 => "gpt-2",
            SplitPattern::Gpt4 => "llama-bpe",
            SplitPattern::Digits => "qwen2",
        }
    }
}

/// Options for [`Tokenizer::train`].
#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// Total vocabulary: 256 byte tokens + merges + special tokens.
    pub vocab_size: usize,
    pub pattern: SplitPattern,
    pub special_tokens: Vec<String>,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            vocab_size: 2048,
            pattern: SplitPattern::Digits,
            special_tokens: CHAT_SPECIAL_TOKENS.iter().map(|s| s.to_string()).collect(),
        }
    }
}

/// What training did, for the user.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TrainReport {
    pub distinct_words: usize,
    pub total_words: u64,
    pub merges: usize,
    pub vocab_size: usize,
    pub seconds: f64,
}

/// A trained or loaded tokenizer.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// The same tokenizer with special-token parsing off: text that merely looks like a special
    /// token (user content) is encoded as ordinary text.
    plain: tokenizers::Tokenizer,
    /// UTF-8 bytes each token stands for (0 for special tokens), for bits-per-byte.
    token_bytes: Vec<u32>,
    special: HashMap<String, u32>,
    merges: Vec<(String, String)>,
    /// Pieces are SentencePiece's (`▁` for a space, `<0xXX>` bytes) rather than byte-level BPE's.
    sentencepiece: bool,
    /// The token a plain prompt starts with: chatforge's `<|bos|>`, or the one a loaded model's
    /// file asks for.
    bos: Option<u32>,
}

impl Tokenizer {
    /// Trains byte-level BPE on text chunks (documents; chunk boundaries never merge).
    pub fn train(chunks: &[&str], opts: &TrainOptions) -> Result<(Tokenizer, TrainReport)> {
        let start = std::time::Instant::now();
        let min = 256 + opts.special_tokens.len();
        if opts.vocab_size < min {
            bail!(
                "vocab size {} is too small: it must be at least {min} (256 byte tokens + {} special tokens)",
                opts.vocab_size,
                opts.special_tokens.len()
            );
        }
        let pattern = fancy_regex::Regex::new(opts.pattern.regex())?;
        let mut pieces: Vec<&str> = Vec::new();
        for chunk in chunks {
            for part in split_on_specials(chunk, &opts.special_tokens) {
                pieces.extend(split_for_counting(part, 1 << 16));
            }
        }
        let words = bpe::count_words(&pieces, &pattern);
        if words.is_empty() {
            bail!("the training text is empty");
        }
        let num_merges = opts.vocab_size - min;
        let merges = bpe::learn_merges(&words, num_merges);
        let merges: Vec<(String, String)> = merges
            .iter()
            .map(|(a, b)| (bpe::to_byte_level(a), bpe::to_byte_level(b)))
            .collect();
        let tok = Self::build(&merges, opts.pattern.regex(), &opts.special_tokens)?;
        let report = TrainReport {
            distinct_words: words.len(),
            total_words: words.values().sum(),
            merges: merges.len(),
            vocab_size: tok.vocab_size(),
            seconds: start.elapsed().as_secs_f64(),
        };
        Ok((tok, report))
    }

    /// Trains on the documents of text or JSONL files (each document is a chunk merges never cross).
    pub fn train_on_files(
        paths: &[PathBuf],
        format: crate::data::text::DocFormat,
        text_field: &str,
        opts: &TrainOptions,
    ) -> Result<(Tokenizer, TrainReport)> {
        let docs = crate::data::text::read_all_documents(paths, format, text_field)?;
        let chunks: Vec<&str> = docs.iter().map(|s| s.as_str()).collect();
        Self::train(&chunks, opts)
    }

    /// Assembles the `tokenizers` pipeline: regex split, byte-level mapping, BPE with our merges.
    fn build(merges: &[(String, String)], pattern: &str, specials: &[String]) -> Result<Tokenizer> {
        let table = byte_level::bytes_to_unicode();
        let mut vocab = serde_json::Map::new();
        for (i, c) in table.iter().enumerate() {
            vocab.insert(c.to_string(), json!(i));
        }
        let mut next = 256usize;
        for (a, b) in merges {
            vocab.insert(format!("{a}{b}"), json!(next));
            next += 1;
        }
        let added: Vec<_> = specials
            .iter()
            .enumerate()
            .map(|(i, s)| {
                json!({"id": next + i, "content": s, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}
            ]},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": false, "vocab": vocab,
                      "merges": merges.iter().map(|(a, b)| json!([a, b])).collect::<Vec<_>>()}
        });
        let inner: tokenizers::Tokenizer = spec
            .to_string()
            .parse()
            .map_err(|e| anyhow::anyhow!("cannot build tokenizer: {e}"))?;
        Self::from_inner(inner)
    }

    /// Wraps a `tokenizers` tokenizer built elsewhere (a GGUF file's metadata).
    pub fn from_tokenizers(inner: tokenizers::Tokenizer) -> Result<Tokenizer> {
        Self::from_inner(inner)
    }

    fn from_inner(inner: tokenizers::Tokenizer) -> Result<Tokenizer> {
        let vocab_size = inner.get_vocab_size(true);
        let mut token_bytes = vec![0u32; vocab_size];
        let mut special = HashMap::new();
        for (id, tok) in inner.get_added_tokens_decoder() {
            // Added tokens that are ordinary text (SentencePiece's user-defined pieces) are not.
            if tok.special {
                special.insert(tok.content.clone(), id);
            }
        }
        let model = serde_json::to_value(inner.get_model()).unwrap_or_default();
        let sentencepiece = model["byte_fallback"] == true || model["type"] == "Unigram";
        for (piece, id) in inner.get_vocab(false) {
            if (id as usize) < vocab_size && !special.contains_key(&piece) {
                token_bytes[id as usize] =
                    piece_bytes(sentencepiece, &piece).map_or(piece.len(), |b| b.len()) as u32;
            }
        }
        let merges = match Some(model) {
            Some(v) => v["merges"]
                .as_array()
                .map(|m| {
                    m.iter()
                        .filter_map(|p| match p {
                            serde_json::Value::Array(ab) if ab.len() == 2 => {
                                Some((ab[0].as_str()?.to_string(), ab[1].as_str()?.to_string()))
                            }
                            serde_json::Value::String(s) => {
                                let (a, b) = s.split_once(' ')?;
                                Some((a.to_string(), b.to_string()))
                            }
                            _ => None,
                        })
                        .collect()
                })
                .unwrap_or_default(),
            None => Vec::new(),
        };
        let mut plain = inner.clone();
        plain.set_encode_special_tokens(true);
        let bos = special.get(BOS).copied();
        Ok(Tokenizer {
            inner,
            plain,
            token_bytes,
            special,
            merges,
            sentencepiece,
            bos,
        })
    }

    /// The tokenizer with `id` as the token every plain prompt starts with (a GGUF file's
    /// `add_bos_token`).
    pub fn with_bos(mut self, id: u32) -> Self {
        self.bos = Some(id);
        self
    }

    /// Loads `tokenizer.json` from a file or from a directory that holds one.
    pub fn load(path: &Path) -> Result<Tokenizer> {
        let file = tokenizer_file(path);
        if !file.exists() {
            bail!(
                "no tokenizer at {}: expected a tokenizer.json file or a directory holding one (make one with `chatforge tokenizer train`)",
                path.display()
            );
        }
        crate::util::panic_to_error(|| {
            let inner =
                tokenizers::Tokenizer::from_file(&file).map_err(|e| anyhow::anyhow!("{e}"))?;
            Self::from_inner(inner)
        })
        .map_err(|e| anyhow::anyhow!("{} is not a valid tokenizer.json: {e:#}", file.display()))
    }

    /// Which of our pre-tokenizer splits this tokenizer uses (`None` for other pipelines).
    pub fn split_pattern(&self) -> Option<SplitPattern> {
        let pre = serde_json::to_value(self.inner.get_pre_tokenizer()?).ok()?;
        let first = match pre["type"].as_str()? {
            "Sequence" => pre["pretokenizers"].get(0)?.clone(),
            _ => pre,
        };
        SplitPattern::of_regex(first["pattern"]["Regex"].as_str()?)
    }

    /// Saves `tokenizer.json` into `dir` (atomically).
    pub fn save(&self, dir: &Path) -> Result<PathBuf> {
        let file = dir.join("tokenizer.json");
        let text = self
            .inner
            .to_string(true)
            .map_err(|e| anyhow::anyhow!("cannot serialise tokenizer: {e}"))?;
        crate::util::write_atomic(&file, text.as_bytes())?;
        Ok(file)
    }

    /// Encodes text; special-token strings in the text become their special ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| anyhow::anyhow!("cannot encode text: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encodes text with special-token strings treated as ordinary text (for untrusted content).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .plain
            .encode_fast(text, false)
            .map_err(|e| anyhow::anyhow!("cannot encode text: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encodes many documents in parallel.
    pub fn encode_batch(&self, texts: Vec<String>) -> Result<Vec<Vec<u32>>> {
        let encs = self
            .inner
            .encode_batch_fast(texts, false)
            .map_err(|e| anyhow::anyhow!("cannot encode text: {e}"))?;
        Ok(encs.iter().map(|e| e.get_ids().to_vec()).collect())
    }

    /// Decodes ids to text, special tokens included. Invalid UTF-8 (a cut multi-byte char) becomes U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| anyhow::anyhow!("cannot decode tokens: {e}"))
    }

    pub fn vocab_size(&self) -> usize {
        self.token_bytes.len()
    }

    /// Whether every token id means the same token in `other` (so ids can pass between models).
    pub fn same_ids_as(&self, other: &Tokenizer) -> bool {
        let n = self.vocab_size();
        n == other.vocab_size()
            && (0..n as u32).all(|i| self.id_to_token(i) == other.id_to_token(i))
    }

    pub fn special_id(&self, token: &str) -> Option<u32> {
        self.special.get(token).copied()
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    pub fn is_special(&self, id: u32) -> bool {
        self.token_bytes.get(id as usize) == Some(&0)
    }

    /// UTF-8 bytes per token id (0 for special tokens).
    pub fn token_bytes(&self) -> &[u32] {
        &self.token_bytes
    }

    /// Learned merges in byte-level notation, in rank order.
    pub fn merges(&self) -> &[(String, String)] {
        &self.merges
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The bytes one token stands for (a piece of a UTF-8 character for some tokens); a special
    /// token's own text. What OpenAI's `logprobs` report as `bytes`.
    pub fn piece_bytes(&self, id: u32) -> Vec<u8> {
        let Some(piece) = self.inner.id_to_token(id) else {
            return Vec::new();
        };
        if self.is_special(id) {
            return piece.into_bytes();
        }
        piece_bytes(self.sentencepiece, &piece).unwrap_or_else(|| piece.into_bytes())
    }
}

/// Reads a merges.txt file: one "left right" pair per line (a `#version` header is skipped).
/// The bytes a vocabulary piece stands for; `None` where a byte-level piece has a character
/// outside the byte alphabet (then its UTF-8 is the best guess).
fn piece_bytes(sentencepiece: bool, piece: &str) -> Option<Vec<u8>> {
    match sentencepiece {
        true => Some(sentencepiece::piece_bytes(piece)),
        false => piece.chars().map(byte_level::unicode_to_byte).collect(),
    }
}

pub fn read_merges_file(path: &Path) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read merges file {}: {e}", path.display()))?;
    let mut merges = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.is_empty() || line.starts_with("#version") {
            continue;
        }
        let (a, b) = line.split_once(' ').ok_or_else(|| {
            anyhow::anyhow!(
                "{}:{}: expected two tokens separated by a space",
                path.display(),
                i + 1
            )
        })?;
        merges.push((a.to_string(), b.to_string()));
    }
    Ok(merges)
}

/// How many reference merges a tokenizer reproduces: as a prefix in the same order, and anywhere.
pub fn compare_merges(ours: &[(String, String)], reference: &[(String, String)]) -> (usize, usize) {
    let in_order = ours
        .iter()
        .zip(reference)
        .take_while(|(x, y)| x == y)
        .count();
    let set: std::collections::HashSet<_> = ours.iter().collect();
    let anywhere = reference.iter().filter(|m| set.contains(m)).count();
    (in_order, anywhere)
}

/// `path` itself if it is a file, else `path/tokenizer.json`.
pub fn tokenizer_file(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join("tokenizer.json")
    } else {
        path.to_path_buf()
    }
}

/// Splits text at occurrences of special tokens (which are removed): merges never cross them.
fn split_on_specials<'a>(text: &'a str, specials: &[String]) -> Vec<&'a str> {
    let mut parts = vec![text];
    for s in specials.iter().filter(|s| !s.is_empty()) {
        parts = parts
            .into_iter()
            .flat_map(|p| p.split(s.as_str()))
            .collect();
    }
    parts.retain(|p| !p.is_empty());
    parts
}

/// Cuts long text into pieces of roughly `target` bytes for parallel counting, only at a newline
/// between two non-space chars, where both regexes split the same way with or without the cut.
fn split_for_counting(text: &str, target: usize) -> Vec<&str> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut start = 0;
    while text.len() - start > target {
        let mut cut = None;
        let mut i = start + target;
        while i + 1 < bytes.len() {
            if bytes[i] == b'\n'
                && i > 0
                && !bytes[i - 1].is_ascii_whitespace()
                && !bytes[i + 1].is_ascii_whitespace()
            {
                cut = Some(i + 1);
                break;
            }
            i += 1;
        }
        match cut {
            Some(c) => {
                out.push(&text[start..c]);
                start = c;
            }
            None => break,
        }
    }
    out.push(&text[start..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cutting_for_parallel_counting_does_not_change_word_counts() {
        let text = "Hello there.\nSecond line  here\n\nThird: 12345 words!\nend\n".repeat(50);
        for p in [SplitPattern::Gpt2, SplitPattern::Gpt4, SplitPattern::Digits] {
            let re = fancy_regex::Regex::new(p.regex()).unwrap();
            let whole = bpe::count_words(&[text.as_str()], &re);
            let pieces = split_for_counting(&text, 100);
            assert!(pieces.len() > 10);
            assert_eq!(pieces.concat(), text);
            assert_eq!(bpe::count_words(&pieces, &re), whole);
        }
    }

    #[test]
    fn specials_split_training_text() {
        let parts = split_on_specials("a<|bos|>b<|bos|><|bos|>c", &["<|bos|>".into()]);
        assert_eq!(parts, vec!["a", "b", "c"]);
    }
}
