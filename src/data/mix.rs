//! Source mixtures, GPT-3 style: sources are sampled by weight, not by size. Each source is
//! tokenized once to a temporary token file; then every source's training documents are repeated
//! (weight above its natural share) or subsampled (below it) to hit its share of the training
//! tokens, all documents are shuffled together, and written as token shards with a `manifest.json`
//! that records sources, weights, counts and the configuration, so a run can be reproduced.

use super::shards::{self, ShardsMeta, SplitWriter};
use super::text::{self, DocFormat, ReadOptions, Skipped};
use super::OnError;
use crate::tokenizer::Tokenizer;
use crate::util::{self, Rng};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// One source of a mixture.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Source {
    pub name: String,
    pub files: Vec<PathBuf>,
    /// Relative weight; weights are normalised to shares of the training tokens.
    pub weight: f64,
    #[serde(default = "default_format")]
    pub format: DocFormat,
    #[serde(default = "default_text_field")]
    pub text_field: String,
}

pub(crate) fn default_format() -> DocFormat {
    DocFormat::Auto
}

pub(crate) fn default_text_field() -> String {
    "text".into()
}

impl Source {
    /// Parses `NAME:WEIGHT:PATH[,PATH...]` (the `--source` argument).
    pub fn parse(spec: &str) -> Result<Source> {
        let mut parts = spec.splitn(3, ':');
        let (Some(name), Some(weight), Some(paths)) = (parts.next(), parts.next(), parts.next())
        else {
            bail!("--source {spec:?}: expected NAME:WEIGHT:PATH[,PATH...], e.g. web:0.6:c4.jsonl");
        };
        let weight: f64 = weight.parse().map_err(|_| {
            anyhow::anyhow!("--source {spec:?}: the weight {weight:?} is not a number")
        })?;
        Ok(Source {
            name: name.into(),
            files: paths.split(',').map(PathBuf::from).collect(),
            weight,
            format: DocFormat::Auto,
            text_field: "text".into(),
        })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MixOptions {
    /// Training tokens to write; default: the sum of the sources' training tokens.
    pub total_tokens: Option<u64>,
    /// Fraction of each source's documents held out for validation (written once, never repeated).
    pub val_fraction: f64,
    pub seed: u64,
    pub max_tokens_per_shard: u64,
    pub on_error: OnError,
}

impl Default for MixOptions {
    fn default() -> Self {
        MixOptions {
            total_tokens: None,
            val_fraction: 0.01,
            seed: 0,
            max_tokens_per_shard: 100_000_000,
            on_error: OnError::Fail,
        }
    }
}

/// What happened to one source.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SourceReport {
    pub name: String,
    pub files: Vec<PathBuf>,
    pub weight: f64,
    /// The share of training tokens the weight asks for.
    pub target_share: f64,
    pub documents: u64,
    pub bytes: u64,
    /// Training tokens available (before repetition or subsampling).
    pub tokens: u64,
    pub val_documents: u64,
    pub val_tokens: u64,
    /// Times the source's training tokens are used: above 1 repeats, below 1 subsamples.
    pub epochs: f64,
    pub train_documents_written: u64,
    pub train_tokens_written: u64,
    /// The share of training tokens the source actually got.
    pub achieved_share: f64,
    pub skipped: Skipped,
}

/// `manifest.json` of a mixture.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MixManifest {
    pub format: String,
    pub vocab_size: usize,
    pub train_tokens: u64,
    pub val_tokens: u64,
    pub options: MixOptions,
    pub sources: Vec<SourceReport>,
    /// The configuration that asked for this mixture (from `data prepare`), verbatim.
    pub config: Option<serde_json::Value>,
    pub seconds: f64,
}

/// One source's documents tokenized to a temporary file.
struct Tokenized {
    path: PathBuf,
    /// (start token, token count, text bytes, held out) per document.
    docs: Vec<(u64, u32, u32, bool)>,
    skipped: Skipped,
}

fn tokenize_source(
    tokenizer: &Tokenizer,
    source: &Source,
    index: usize,
    tmp_dir: &Path,
    opts: &MixOptions,
) -> Result<Tokenized> {
    let bos = tokenizer
        .bos_id()
        .context("the tokenizer has no <|bos|> token; train it with `chatforge tokenizer train`")?;
    let path = tmp_dir.join(format!("source_{index}.u32"));
    let mut w = std::io::BufWriter::new(
        std::fs::File::create(&path)
            .with_context(|| format!("cannot create {}", path.display()))?,
    );
    let read = ReadOptions {
        format: source.format,
        text_field: source.text_field.clone(),
        on_error: opts.on_error,
    };
    // Each source has its own held-out stream, so adding a source does not move another's split.
    let seed = opts.seed ^ util::Rng::new(index as u64 + 1).next_u64();
    let mut docs = Vec::new();
    let mut next = 0u64;
    let label = format!("tokenize {}", source.name);
    let summary = text::for_each_chunk(&source.files, &read, &label, 4 << 20, |chunk| {
        let bytes: Vec<u32> = chunk.iter().map(|d| d.len() as u32).collect();
        for (ids, bytes) in tokenizer.encode_batch(chunk)?.into_iter().zip(bytes) {
            let n = ids.len() as u32 + 1;
            w.write_all(&bos.to_le_bytes())?;
            for t in ids {
                w.write_all(&t.to_le_bytes())?;
            }
            let held = shards::is_val(docs.len() as u64, seed, opts.val_fraction);
            docs.push((next, n, bytes, held));
            next += n as u64;
        }
        Ok(())
    })?;
    w.flush()?;
    // A source too small for its held-out draw still trains on something.
    if docs.iter().all(|d| d.3) {
        if let Some(last) = docs.last_mut() {
            last.3 = false;
        }
    }
    Ok(Tokenized {
        path,
        docs,
        skipped: summary.skipped,
    })
}

/// Documents (by index) of one source to write, in a seeded order: every training document
/// `floor(epochs)` times, then a seeded sample of them up to the remaining target tokens.
fn plan_source(t: &Tokenized, target_tokens: f64, rng: &mut Rng) -> Vec<u32> {
    let train: Vec<u32> = (0..t.docs.len() as u32)
        .filter(|&i| !t.docs[i as usize].3)
        .collect();
    let available: u64 = train.iter().map(|&i| t.docs[i as usize].1 as u64).sum();
    if available == 0 {
        return Vec::new();
    }
    let full = (target_tokens / available as f64).floor() as usize;
    let mut plan = Vec::with_capacity(train.len() * (full + 1));
    for _ in 0..full {
        plan.extend_from_slice(&train);
    }
    let mut remaining = target_tokens - (full as u64 * available) as f64;
    let mut order = train;
    rng.shuffle(&mut order);
    for i in order {
        let n = t.docs[i as usize].1 as f64;
        // Take a document while it brings the total closer to the target.
        if remaining <= n / 2.0 {
            break;
        }
        plan.push(i);
        remaining -= n;
    }
    plan
}

/// Tokenizes each source, then writes the weighted mixture as token shards under `out` with
/// `meta.json` (readable by `chatforge pretrain --data`) and `manifest.json`.
pub fn mix(
    tokenizer: &Tokenizer,
    sources: &[Source],
    out: &Path,
    opts: &MixOptions,
    config: Option<serde_json::Value>,
) -> Result<MixManifest> {
    let start = std::time::Instant::now();
    if sources.is_empty() {
        bail!("a mixture needs at least one source");
    }
    for s in sources {
        if !(s.weight > 0.0 && s.weight.is_finite()) {
            bail!(
                "source {:?}: weight {} must be a positive number",
                s.name,
                s.weight
            );
        }
        if s.files.is_empty() {
            bail!("source {:?} has no files", s.name);
        }
    }
    let mut names = std::collections::HashSet::new();
    if let Some(dup) = sources.iter().find(|s| !names.insert(s.name.as_str())) {
        bail!(
            "two sources are called {:?}; give each its own name",
            dup.name
        );
    }
    if sources.len() > u16::MAX as usize {
        bail!("at most {} sources", u16::MAX);
    }
    if !(0.0..1.0).contains(&opts.val_fraction) {
        bail!("val_fraction must be in [0, 1), got {}", opts.val_fraction);
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    // meta.json marks a finished directory: remove it before replacing the shards.
    let _ = std::fs::remove_file(out.join("meta.json"));
    let tmp_dir = out.join(".mix-tmp");
    std::fs::create_dir_all(&tmp_dir)?;
    let result = write_mixture(tokenizer, sources, out, &tmp_dir, opts, config, start);
    let _ = std::fs::remove_dir_all(&tmp_dir);
    result
}

fn write_mixture(
    tokenizer: &Tokenizer,
    sources: &[Source],
    out: &Path,
    tmp_dir: &Path,
    opts: &MixOptions,
    config: Option<serde_json::Value>,
    start: std::time::Instant,
) -> Result<MixManifest> {
    let vocab_size = tokenizer.vocab_size();
    let tokenized: Vec<Tokenized> = sources
        .iter()
        .enumerate()
        .map(|(i, s)| tokenize_source(tokenizer, s, i, tmp_dir, opts))
        .collect::<Result<_>>()?;
    let train_tokens =
        |t: &Tokenized| -> u64 { t.docs.iter().filter(|d| !d.3).map(|d| d.1 as u64).sum() };
    for (s, t) in sources.iter().zip(&tokenized) {
        if train_tokens(t) == 0 {
            bail!(
                "source {:?} has no training documents (files: {}); check the paths, format and text field",
                s.name,
                s.files
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    let natural: u64 = tokenized.iter().map(train_tokens).sum();
    let total = opts.total_tokens.unwrap_or(natural) as f64;
    let weight_sum: f64 = sources.iter().map(|s| s.weight).sum();
    let mut rng = Rng::new(opts.seed);
    let mut entries: Vec<(u16, u32)> = Vec::new();
    for (i, t) in tokenized.iter().enumerate() {
        let target = total * sources[i].weight / weight_sum;
        entries.extend(
            plan_source(t, target, &mut rng)
                .into_iter()
                .map(|d| (i as u16, d)),
        );
    }
    rng.shuffle(&mut entries);

    let maps: Vec<memmap2::Mmap> = tokenized
        .iter()
        .map(|t| {
            let f = std::fs::File::open(&t.path)?;
            // SAFETY: the file is ours, complete, and not modified while mapped.
            Ok(unsafe { memmap2::Mmap::map(&f)? })
        })
        .collect::<Result<_>>()?;
    let tokens_of = |source: usize, doc: u32| -> (Vec<u32>, u64) {
        let (start, n, bytes, _) = tokenized[source].docs[doc as usize];
        let raw = &maps[source][start as usize * 4..(start as usize + n as usize) * 4];
        let ids = raw
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        (ids, bytes as u64)
    };
    let mut train = SplitWriter::new(out, "train", vocab_size, opts.max_tokens_per_shard);
    let mut val = SplitWriter::new(out, "val", vocab_size, opts.max_tokens_per_shard);
    let mut train_counts = vec![0u64; vocab_size];
    let mut val_counts = vec![0u64; vocab_size];
    let mut written = vec![(0u64, 0u64); sources.len()];
    let pb = ProgressBar::new(entries.len() as u64).with_style(
        ProgressStyle::with_template("write shards {bar:30} {pos}/{len} documents ETA {eta}")
            .expect("valid template"),
    );
    for (k, &(source, doc)) in entries.iter().enumerate() {
        let (ids, bytes) = tokens_of(source as usize, doc);
        for &t in &ids {
            train_counts[t as usize] += 1;
        }
        written[source as usize].0 += 1;
        written[source as usize].1 += ids.len() as u64;
        train.push(&ids, bytes)?;
        if k % 4096 == 0 {
            pb.set_position(k as u64);
        }
    }
    pb.finish_and_clear();
    for (i, t) in tokenized.iter().enumerate() {
        for (d, entry) in t.docs.iter().enumerate() {
            if entry.3 {
                let (ids, bytes) = tokens_of(i, d as u32);
                for &tok in &ids {
                    val_counts[tok as usize] += 1;
                }
                val.push(&ids, bytes)?;
            }
        }
    }
    train.finish_file()?;
    val.finish_file()?;
    let written_total: u64 = written.iter().map(|w| w.1).sum();
    let reports: Vec<SourceReport> = sources
        .iter()
        .zip(&tokenized)
        .zip(&written)
        .map(|((s, t), &(docs_written, tokens_written))| {
            let available = train_tokens(t);
            let target_share = s.weight / weight_sum;
            SourceReport {
                name: s.name.clone(),
                files: s.files.clone(),
                weight: s.weight,
                target_share,
                documents: t.docs.len() as u64,
                bytes: t.docs.iter().map(|d| d.2 as u64).sum(),
                tokens: available,
                val_documents: t.docs.iter().filter(|d| d.3).count() as u64,
                val_tokens: t.docs.iter().filter(|d| d.3).map(|d| d.1 as u64).sum(),
                epochs: total * target_share / available as f64,
                train_documents_written: docs_written,
                train_tokens_written: tokens_written,
                achieved_share: tokens_written as f64 / written_total.max(1) as f64,
                skipped: t.skipped.clone(),
            }
        })
        .collect();
    let (unigram_entropy_nats, unigram_val_nats) =
        shards::unigram_stats(&train_counts, &val_counts);
    tokenizer.save(out)?;
    let manifest = MixManifest {
        format: "chatforge-mix-v1".into(),
        vocab_size,
        train_tokens: train.meta.tokens,
        val_tokens: val.meta.tokens,
        options: opts.clone(),
        sources: reports,
        config,
        seconds: start.elapsed().as_secs_f64(),
    };
    util::write_json_atomic(&out.join("manifest.json"), &manifest)?;
    let meta = ShardsMeta {
        format: "chatforge-shards-v1".into(),
        vocab_size,
        token_size: shards::token_size_for(vocab_size),
        train: std::mem::take(&mut train.meta),
        val: std::mem::take(&mut val.meta),
        sources: sources.iter().map(|s| s.name.clone()).collect(),
        unigram_entropy_nats,
        unigram_val_nats,
    };
    // Written last: its presence means the directory is complete.
    util::write_json_atomic(&out.join("meta.json"), &meta)?;
    Ok(manifest)
}

/// The mixture as a table for people.
pub fn render_manifest(m: &MixManifest) -> String {
    let rows: Vec<Vec<String>> = m
        .sources
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                format!("{:.3}", s.target_share),
                s.documents.to_string(),
                s.tokens.to_string(),
                format!("{:.2}", s.epochs),
                s.train_tokens_written.to_string(),
                format!("{:.3}", s.achieved_share),
                s.val_tokens.to_string(),
                s.skipped.records.to_string(),
            ]
        })
        .collect();
    let mut notes = String::new();
    for s in m.sources.iter().filter(|s| s.epochs > 4.0) {
        notes.push_str(&format!(
            "note: source {} is repeated {:.1} times; a model memorises text it sees that often \
             (GPT-3 saw its best sources at most about 3 times)\n",
            s.name, s.epochs
        ));
    }
    format!(
        "{}{notes}\n{} training and {} validation tokens written in {:.1} s\n",
        util::text_table(
            &[
                "source",
                "target share",
                "documents",
                "train tokens",
                "epochs",
                "tokens written",
                "share written",
                "val tokens",
                "skipped",
            ],
            &rows
        ),
        m.train_tokens,
        m.val_tokens,
        m.seconds
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::shards::ShardSet;
    use crate::tokenizer::TrainOptions;

    fn write_source(dir: &Path, name: &str, docs: usize, word: &str) -> PathBuf {
        let p = dir.join(format!("{name}.txt"));
        let text: Vec<String> = (0..docs)
            .map(|i| format!("{word} number {i} {}", word.repeat(1 + i % 5)))
            .collect();
        std::fs::write(&p, text.join("\n\n")).unwrap();
        p
    }

    #[test]
    fn weights_set_token_shares_by_repeating_and_subsampling() {
        let dir = tempfile::tempdir().unwrap();
        // "web" is 10x larger than "books", but books gets 3x web's weight.
        let web = write_source(dir.path(), "web", 2000, "web ");
        let books = write_source(dir.path(), "books", 200, "book ");
        let (tok, _) = Tokenizer::train(
            &["web number book number 0123456789"],
            &TrainOptions {
                vocab_size: 300,
                ..Default::default()
            },
        )
        .unwrap();
        let sources = vec![
            Source::parse(&format!("web:1:{}", web.display())).unwrap(),
            Source::parse(&format!("books:3:{}", books.display())).unwrap(),
        ];
        let opts = MixOptions {
            val_fraction: 0.05,
            seed: 3,
            ..Default::default()
        };
        let out = dir.path().join("mix");
        let m = mix(&tok, &sources, &out, &opts, None).unwrap();
        let (w, b) = (&m.sources[0], &m.sources[1]);
        assert!(
            (w.achieved_share - 0.25).abs() < 0.01,
            "{}",
            w.achieved_share
        );
        assert!(
            (b.achieved_share - 0.75).abs() < 0.01,
            "{}",
            b.achieved_share
        );
        assert!(
            w.epochs < 0.5 && b.epochs > 2.0,
            "{} {}",
            w.epochs,
            b.epochs
        );
        assert!(w.train_documents_written < w.documents && b.train_documents_written > b.documents);
        // The total is the sources' natural size unless asked otherwise.
        let natural = w.tokens + b.tokens;
        assert!((m.train_tokens as f64 / natural as f64 - 1.0).abs() < 0.01);

        // The shards are a normal shard directory; validation documents are never repeated.
        let set = ShardSet::open(&out).unwrap();
        assert_eq!(set.train.total_tokens() as u64, m.train_tokens);
        assert_eq!(set.val.meta.documents, w.val_documents + b.val_documents);
        assert!(w.val_documents > 0 && b.val_documents > 0);
        let manifest: serde_json::Value = util::read_json(&out.join("manifest.json")).unwrap();
        assert_eq!(manifest["sources"][1]["name"], "books");
        assert_eq!(manifest["options"]["seed"], 3);
        assert!(!out.join(".mix-tmp").exists());

        // Same seed, same shards; another seed, another order.
        let again = dir.path().join("again");
        mix(&tok, &sources, &again, &opts, None).unwrap();
        let read = |d: &Path| std::fs::read(d.join("train_0000.bin")).unwrap();
        assert_eq!(read(&out), read(&again));
        let other = dir.path().join("other");
        mix(
            &tok,
            &sources,
            &other,
            &MixOptions {
                seed: 4,
                ..opts.clone()
            },
            None,
        )
        .unwrap();
        assert_ne!(read(&out), read(&other));

        // An explicit total scales every source.
        let half = dir.path().join("half");
        let m2 = mix(
            &tok,
            &sources,
            &half,
            &MixOptions {
                total_tokens: Some(natural / 2),
                ..opts.clone()
            },
            None,
        )
        .unwrap();
        assert!((m2.train_tokens as f64 / (natural / 2) as f64 - 1.0).abs() < 0.02);
    }

    #[test]
    fn bad_mixtures_say_what_to_fix() {
        let dir = tempfile::tempdir().unwrap();
        let (tok, _) = Tokenizer::train(
            &["abc"],
            &TrainOptions {
                vocab_size: 280,
                ..Default::default()
            },
        )
        .unwrap();
        let empty = dir.path().join("empty.txt");
        std::fs::write(&empty, "\n\n").unwrap();
        let good = write_source(dir.path(), "good", 10, "a ");
        let err = |sources: Vec<Source>| {
            mix(
                &tok,
                &sources,
                &dir.path().join("o"),
                &MixOptions::default(),
                None,
            )
            .unwrap_err()
            .to_string()
        };
        let src = |spec: String| Source::parse(&spec).unwrap();
        assert!(err(vec![src(format!("e:1:{}", empty.display()))])
            .contains("\"e\" has no training documents"));
        assert!(err(vec![src(format!("g:0:{}", good.display()))]).contains("positive"));
        assert!(err(vec![
            src(format!("g:1:{}", good.display())),
            src(format!("g:1:{}", good.display()))
        ])
        .contains("two sources are called"));
        assert!(Source::parse("web:heavy:x.jsonl")
            .unwrap_err()
            .to_string()
            .contains("not a number"));
        assert!(Source::parse("web.jsonl")
            .unwrap_err()
            .to_string()
            .contains("NAME:WEIGHT:PATH"));
        assert!(!dir.path().join("o").join("meta.json").exists());
    }
}
