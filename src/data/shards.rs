//! Binary token shards: a 32-byte header then little-endian u16 or u32 tokens, memory-mapped for
//! reading. A shard directory holds `meta.json` (splits, counts, statistics), the shard files and a
//! copy of the tokenizer that made them.

use crate::data::text::{self, DocFormat};
use crate::tokenizer::Tokenizer;
use crate::util;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"CFTOKENS";
const HEADER_LEN: usize = 32;
const VERSION: u32 = 1;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SplitMeta {
    pub files: Vec<String>,
    pub tokens: u64,
    /// UTF-8 bytes of the documents (for bits per byte).
    pub bytes: u64,
    pub documents: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ShardsMeta {
    pub format: String,
    pub vocab_size: usize,
    pub token_size: u32,
    pub train: SplitMeta,
    pub val: SplitMeta,
    pub sources: Vec<String>,
    /// Entropy of the train split's unigram token distribution, nats per token: the loss of a model
    /// that ignores context. A language model must beat it.
    pub unigram_entropy_nats: f64,
    /// Cross-entropy of the train unigram distribution (add-one smoothed) on the val split.
    pub unigram_val_nats: f64,
}

/// Options for [`tokenize_files`].
#[derive(Clone, Debug)]
pub struct TokenizeOptions {
    pub format: DocFormat,
    pub text_field: String,
    /// Fraction of documents that go to the validation split.
    pub val_fraction: f64,
    pub seed: u64,
    pub max_tokens_per_shard: u64,
}

impl Default for TokenizeOptions {
    fn default() -> Self {
        TokenizeOptions {
            format: DocFormat::Auto,
            text_field: "text".into(),
            val_fraction: 0.05,
            seed: 0,
            max_tokens_per_shard: 100_000_000,
        }
    }
}

/// Writes one split's shard files, rolling over at a size limit. Files are written under a
/// temporary name and renamed when complete.
pub(crate) struct SplitWriter {
    dir: PathBuf,
    name: &'static str,
    token_size: u32,
    vocab_size: usize,
    max_tokens: u64,
    current: Option<(std::io::BufWriter<std::fs::File>, PathBuf, u64)>,
    pub(crate) meta: SplitMeta,
}

/// Bytes per token on disk: u16 when the vocabulary fits.
pub(crate) fn token_size_for(vocab_size: usize) -> u32 {
    if vocab_size <= u16::MAX as usize + 1 {
        2
    } else {
        4
    }
}

impl SplitWriter {
    pub(crate) fn new(
        dir: &Path,
        name: &'static str,
        vocab_size: usize,
        max_tokens: u64,
    ) -> SplitWriter {
        SplitWriter {
            dir: dir.to_path_buf(),
            name,
            token_size: token_size_for(vocab_size),
            vocab_size,
            max_tokens: max_tokens.max(1),
            current: None,
            meta: SplitMeta::default(),
        }
    }

    pub(crate) fn push(&mut self, tokens: &[u32], bytes: u64) -> Result<()> {
        self.meta.documents += 1;
        self.meta.bytes += bytes;
        for &t in tokens {
            if self.current.as_ref().is_none_or(|c| c.2 >= self.max_tokens) {
                self.finish_file()?;
                let file_name = format!("{}_{:04}.bin", self.name, self.meta.files.len());
                let path = self.dir.join(&file_name);
                let tmp = util::temp_path(&path);
                let mut w = std::io::BufWriter::new(
                    std::fs::File::create(&tmp)
                        .with_context(|| format!("cannot create {}", tmp.display()))?,
                );
                w.write_all(&header(self.token_size, 0, self.vocab_size))?;
                self.current = Some((w, path, 0));
                self.meta.files.push(file_name);
            }
            let (w, _, n) = self.current.as_mut().expect("file just opened");
            if self.token_size == 2 {
                w.write_all(&(t as u16).to_le_bytes())?;
            } else {
                w.write_all(&t.to_le_bytes())?;
            }
            *n += 1;
            self.meta.tokens += 1;
        }
        Ok(())
    }

    pub(crate) fn finish_file(&mut self) -> Result<()> {
        if let Some((w, path, n)) = self.current.take() {
            let mut f = w.into_inner().map_err(|e| e.into_error())?;
            f.seek(SeekFrom::Start(0))?;
            f.write_all(&header(self.token_size, n, self.vocab_size))?;
            f.sync_all()?;
            std::fs::rename(util::temp_path(&path), &path)
                .with_context(|| format!("cannot finish {}", path.display()))?;
        }
        Ok(())
    }
}

impl Drop for SplitWriter {
    /// A writer dropped with a file still open (an error mid-way) removes that partial file.
    fn drop(&mut self) {
        if let Some((_, path, _)) = self.current.take() {
            let _ = std::fs::remove_file(util::temp_path(&path));
        }
    }
}

fn header(token_size: u32, tokens: u64, vocab_size: usize) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&token_size.to_le_bytes());
    h[16..24].copy_from_slice(&tokens.to_le_bytes());
    h[24..28].copy_from_slice(&(vocab_size as u32).to_le_bytes());
    h
}

/// Whether document `index` belongs to the validation split: a hash of the index against the fraction,
/// so the split is the same whatever the batch sizes, and the first document always seeds it.
pub(crate) fn is_val(index: u64, seed: u64, fraction: f64) -> bool {
    if fraction <= 0.0 {
        return false;
    }
    index == 0 || util::Rng::new(seed ^ index.wrapping_mul(0x9E37_79B9)).next_f64() < fraction
}

/// Tokenizes documents from `inputs` into shards under `out` (each document starts with `<|bos|>`).
pub fn tokenize_files(
    tokenizer: &Tokenizer,
    inputs: &[PathBuf],
    out: &Path,
    opts: &TokenizeOptions,
) -> Result<ShardsMeta> {
    if inputs.is_empty() {
        bail!("no input files given");
    }
    if !(0.0..1.0).contains(&opts.val_fraction) {
        bail!(
            "--val-fraction must be in [0, 1), got {}",
            opts.val_fraction
        );
    }
    let total_bytes = text::total_size(inputs)?;
    let bos = tokenizer
        .bos_id()
        .context("the tokenizer has no <|bos|> token; train it with `chatforge tokenizer train`")?;
    let vocab_size = tokenizer.vocab_size();
    let token_size = token_size_for(vocab_size);
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    // A previous run's meta.json must not describe shards we are about to replace.
    let _ = std::fs::remove_file(out.join("meta.json"));
    let writer = |name| SplitWriter::new(out, name, vocab_size, opts.max_tokens_per_shard);
    let mut train = writer("train");
    let mut val = writer("val");
    let mut train_counts = vec![0u64; vocab_size];
    let mut val_counts = vec![0u64; vocab_size];

    let pb = ProgressBar::new(total_bytes).with_style(
        ProgressStyle::with_template(
            "tokenize {bar:30} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        )
        .expect("valid template"),
    );
    let mut doc_index = 0u64;
    let mut done_before = 0u64;
    let mut batch: Vec<String> = Vec::new();
    let mut batch_bytes = 0usize;
    let mut flush = |batch: &mut Vec<String>, doc_index: &mut u64| -> Result<()> {
        let docs = std::mem::take(batch);
        let lens: Vec<u64> = docs.iter().map(|d| d.len() as u64).collect();
        let encoded = tokenizer.encode_batch(docs)?;
        for (ids, bytes) in encoded.into_iter().zip(lens) {
            let mut tokens = Vec::with_capacity(ids.len() + 1);
            tokens.push(bos);
            tokens.extend(ids);
            let (w, counts) = if is_val(*doc_index, opts.seed, opts.val_fraction) {
                (&mut val, &mut val_counts)
            } else {
                (&mut train, &mut train_counts)
            };
            for &t in &tokens {
                counts[t as usize] += 1;
            }
            w.push(&tokens, bytes)?;
            *doc_index += 1;
        }
        Ok(())
    };
    for path in inputs {
        text::read_documents(path, opts.format, &opts.text_field, |doc, consumed| {
            batch_bytes += doc.len();
            batch.push(doc);
            pb.set_position(done_before + consumed);
            if batch_bytes > 4 << 20 {
                flush(&mut batch, &mut doc_index)?;
                batch_bytes = 0;
            }
            Ok(())
        })?;
        done_before += std::fs::metadata(path)?.len();
    }
    flush(&mut batch, &mut doc_index)?;
    pb.finish_and_clear();
    train.finish_file()?;
    val.finish_file()?;
    if train.meta.tokens == 0 {
        let files = inputs
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        if doc_index > 0 {
            bail!(
                "all {doc_index} document(s) of {files} went to the validation split, none to training: with --format paragraphs a document ends at a blank line, so use --format lines for text without blank lines, add documents, or lower --val-fraction"
            );
        }
        bail!("the corpus is empty: no documents found in {files}");
    }
    let (unigram_entropy_nats, unigram_val_nats) = unigram_stats(&train_counts, &val_counts);
    tokenizer.save(out)?;
    let meta = ShardsMeta {
        format: "chatforge-shards-v1".into(),
        vocab_size,
        token_size,
        train: std::mem::take(&mut train.meta),
        val: std::mem::take(&mut val.meta),
        sources: inputs.iter().map(|p| p.display().to_string()).collect(),
        unigram_entropy_nats,
        unigram_val_nats,
    };
    util::write_json_atomic(&out.join("meta.json"), &meta)?;
    Ok(meta)
}

pub(crate) fn unigram_stats(train: &[u64], val: &[u64]) -> (f64, f64) {
    let total: u64 = train.iter().sum();
    let entropy = train
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / total as f64;
            -p * p.ln()
        })
        .sum();
    let smoothed_total = (total + train.len() as u64) as f64;
    let val_total: u64 = val.iter().sum();
    let cross = if val_total == 0 {
        f64::NAN
    } else {
        val.iter()
            .zip(train)
            .filter(|(&v, _)| v > 0)
            .map(|(&v, &c)| v as f64 * -((c + 1) as f64 / smoothed_total).ln())
            .sum::<f64>()
            / val_total as f64
    };
    (entropy, cross)
}

/// One memory-mapped shard file.
pub struct Shard {
    map: memmap2::Mmap,
    token_size: usize,
    len: usize,
}

impl Shard {
    pub fn open(path: &Path, vocab_size: usize) -> Result<Shard> {
        let file = std::fs::File::open(path)
            .with_context(|| format!("cannot open shard {}", path.display()))?;
        // SAFETY: shards are written once and renamed into place; nothing writes them while mapped.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("cannot map {}", path.display()))?;
        if map.len() < HEADER_LEN || &map[..8] != MAGIC {
            bail!(
                "{} is not a chatforge token shard (bad header); re-create it with `chatforge tokenize`",
                path.display()
            );
        }
        let u32_at = |i: usize| u32::from_le_bytes(map[i..i + 4].try_into().expect("4 bytes"));
        let version = u32_at(8);
        let token_size = u32_at(12) as usize;
        let len = u64::from_le_bytes(map[16..24].try_into().expect("8 bytes")) as usize;
        let shard_vocab = u32_at(24) as usize;
        if version != VERSION || !(token_size == 2 || token_size == 4) {
            bail!(
                "{}: unsupported shard version {version} or token size {token_size}",
                path.display()
            );
        }
        if map.len() != HEADER_LEN + len * token_size {
            bail!(
                "{}: header says {len} tokens but the file holds {} bytes (truncated or still being written)",
                path.display(),
                map.len()
            );
        }
        if shard_vocab != vocab_size {
            bail!(
                "{}: written for a vocabulary of {shard_vocab}, but meta.json says {vocab_size}",
                path.display()
            );
        }
        Ok(Shard {
            map,
            token_size,
            len,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, i: usize) -> u32 {
        let o = HEADER_LEN + i * self.token_size;
        if self.token_size == 2 {
            u16::from_le_bytes([self.map[o], self.map[o + 1]]) as u32
        } else {
            u32::from_le_bytes(self.map[o..o + 4].try_into().expect("4 bytes"))
        }
    }

    /// Appends tokens `start..start+n` to `out`.
    pub fn read_into(&self, start: usize, n: usize, out: &mut Vec<u32>) {
        out.extend((start..start + n).map(|i| self.get(i)));
    }
}

/// A split (train or val) of a shard directory: its shards, memory-mapped.
pub struct TokenSplit {
    pub shards: Vec<Shard>,
    pub meta: SplitMeta,
}

impl TokenSplit {
    pub fn total_tokens(&self) -> usize {
        self.shards.iter().map(|s| s.len()).sum()
    }
}

/// An opened shard directory.
pub struct ShardSet {
    pub dir: PathBuf,
    pub meta: ShardsMeta,
    pub train: TokenSplit,
    pub val: TokenSplit,
}

impl ShardSet {
    pub fn open(dir: &Path) -> Result<ShardSet> {
        let meta_path = dir.join("meta.json");
        if !meta_path.exists() {
            bail!(
                "{} is not a shard directory (no meta.json); make one with `chatforge tokenize`",
                dir.display()
            );
        }
        let meta: ShardsMeta = util::read_json(&meta_path)?;
        let open = |m: &SplitMeta| -> Result<TokenSplit> {
            let shards = m
                .files
                .iter()
                .map(|f| Shard::open(&dir.join(f), meta.vocab_size))
                .collect::<Result<Vec<_>>>()?;
            Ok(TokenSplit {
                shards,
                meta: m.clone(),
            })
        };
        Ok(ShardSet {
            dir: dir.to_path_buf(),
            train: open(&meta.train)?,
            val: open(&meta.val)?,
            meta,
        })
    }

    pub fn tokenizer(&self) -> Result<Tokenizer> {
        Tokenizer::load(&self.dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::TrainOptions;

    #[test]
    fn shards_round_trip_and_roll_over() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.txt");
        let text: String = (0..200)
            .map(|i| format!("document number {i} says hello 你好\n\n"))
            .collect();
        std::fs::write(&input, &text).unwrap();
        let (tok, _) = Tokenizer::train(
            &[text.as_str()],
            &TrainOptions {
                vocab_size: 300,
                ..Default::default()
            },
        )
        .unwrap();
        let out = dir.path().join("shards");
        let opts = TokenizeOptions {
            max_tokens_per_shard: 500,
            val_fraction: 0.1,
            ..Default::default()
        };
        let meta = tokenize_files(&tok, &[input], &out, &opts).unwrap();
        assert_eq!(meta.token_size, 2);
        assert_eq!(meta.train.documents + meta.val.documents, 200);
        assert!(
            meta.val.documents > 5 && meta.val.documents < 40,
            "{}",
            meta.val.documents
        );
        assert!(meta.train.files.len() > 1);
        let set = ShardSet::open(&out).unwrap();
        assert_eq!(set.train.total_tokens() as u64, meta.train.tokens);
        // Reassemble the first document from the first shard.
        let mut toks = Vec::new();
        set.train.shards[0].read_into(0, 12, &mut toks);
        assert_eq!(toks[0], tok.bos_id().unwrap());
        let bos_at = toks[1..].iter().position(|&t| t == toks[0]).unwrap() + 1;
        let decoded = tok.decode(&toks[1..bos_at]).unwrap();
        assert!(decoded.starts_with("document number"), "{decoded}");
        assert!(meta.unigram_entropy_nats > 1.0);
        assert!(meta.unigram_val_nats >= meta.unigram_entropy_nats * 0.9);
        // No temporary files are left behind.
        for e in std::fs::read_dir(&out).unwrap() {
            let name = e.unwrap().file_name().into_string().unwrap();
            assert!(!name.contains(".tmp"), "{name}");
        }
    }

    #[test]
    fn a_corpus_that_all_went_to_validation_says_how_to_cut_documents() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("one_paragraph.txt");
        // Lines without a blank line between them: one paragraph, one document.
        let text: String = (0..50).map(|i| format!("line {i} of the text\n")).collect();
        std::fs::write(&input, &text).unwrap();
        let (tok, _) = Tokenizer::train(&[text.as_str()], &TrainOptions::default()).unwrap();
        // A seed that sends the first document to validation.
        let seed = (0..100).find(|&s| is_val(0, s, 0.5)).unwrap();
        let opts = TokenizeOptions {
            val_fraction: 0.5,
            seed,
            ..Default::default()
        };
        let e = tokenize_files(&tok, &[input], &dir.path().join("shards"), &opts)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("one_paragraph.txt") && e.contains("--format lines"),
            "{e}"
        );
    }

    #[test]
    fn truncated_shard_is_rejected_with_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("train_0000.bin");
        let mut bytes = header(2, 10, 300).to_vec();
        bytes.extend_from_slice(&[0u8; 8]);
        std::fs::write(&p, bytes).unwrap();
        let err = Shard::open(&p, 300).err().unwrap().to_string();
        assert!(
            err.contains("train_0000.bin") && err.contains("truncated"),
            "{err}"
        );
    }
}
