//! `chatforge data prepare --config data.toml`: the whole pretraining-data pipeline in one pass
//! per source (read → clean → quality filter → duplicate removal, fused so each document is
//! read and parsed once), then a tokenizer (given or trained on the kept text) and the weighted
//! mixture as token shards. Finished sources are not redone: a rerun with the same settings only
//! reloads their duplicate index from the kept text.
//!
//! Under mpirun the blocks of each source go round-robin to the ranks, which clean, score and
//! fingerprint their own (the costly part); every rank then takes the order-dependent decisions
//! (the keep rule's draws, the duplicate index) over all blocks in order, so each holds the whole
//! index and the output is a single process's. Rank 0 alone writes.

use super::clean::{clean_documents, CleanOptions, CleanStats, Cleaned};
use super::dedup::{DedupOptions, DedupReport, Deduplicator, Fingerprint, Verdict};
use super::mix::{MixManifest, MixOptions, Source};
use super::quality::{self, KeepRule, Keeper, QualityModel};
use super::text::{self, DocFormat, ReadOptions, Skipped};
use super::OnError;
use crate::tokenizer::{Tokenizer, TrainOptions};
use crate::util;
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The configuration file. Relative paths are relative to the file's directory.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrepareConfig {
    /// Output directory.
    pub out: PathBuf,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "default_on_error")]
    pub on_error: OnError,
    #[serde(default)]
    pub clean: CleanSection,
    #[serde(default)]
    pub quality: Option<QualitySection>,
    #[serde(default)]
    pub dedup: DedupSection,
    #[serde(default)]
    pub tokenizer: TokenizerSection,
    #[serde(default)]
    pub mix: MixSection,
    #[serde(rename = "source")]
    pub sources: Vec<SourceSection>,
}

fn default_on_error() -> OnError {
    OnError::Skip
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CleanSection {
    pub min_chars: usize,
    pub repeated_line_documents: usize,
}

impl Default for CleanSection {
    fn default() -> Self {
        let d = CleanOptions::default();
        CleanSection {
            min_chars: d.min_chars,
            repeated_line_documents: d.repeated_line_documents,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QualitySection {
    /// A model from `chatforge data quality-train`; or give `good` and `bad` to train one here.
    pub model: Option<PathBuf>,
    #[serde(default)]
    pub good: Vec<PathBuf>,
    #[serde(default)]
    pub bad: Vec<PathBuf>,
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    pub threshold: Option<f64>,
}

fn default_alpha() -> f64 {
    9.0
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DedupSection {
    pub enabled: bool,
    pub threshold: f64,
}

impl Default for DedupSection {
    fn default() -> Self {
        DedupSection {
            enabled: true,
            threshold: DedupOptions::default().threshold,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenizerSection {
    /// An existing tokenizer (a `tokenizer.json` or a directory holding one).
    pub path: Option<PathBuf>,
    /// Vocabulary of the tokenizer trained on the kept text when `path` is not given.
    pub vocab_size: usize,
    /// Bytes of kept text (spread over sources by weight) the tokenizer is trained on.
    pub train_bytes: u64,
}

impl Default for TokenizerSection {
    fn default() -> Self {
        TokenizerSection {
            path: None,
            vocab_size: 8192,
            train_bytes: 32 << 20,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MixSection {
    pub total_tokens: Option<u64>,
    pub val_fraction: Option<f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSection {
    pub name: String,
    pub files: Vec<PathBuf>,
    pub weight: f64,
    #[serde(default = "super::mix::default_format")]
    pub format: DocFormat,
    #[serde(default = "super::mix::default_text_field")]
    pub text_field: String,
    /// Run the quality classifier on this source (GPT-3 filtered only its web crawl).
    #[serde(default)]
    pub quality_filter: bool,
}

impl PrepareConfig {
    /// Reads and checks a TOML configuration; errors name the file and the field.
    pub fn load(path: &Path) -> Result<PrepareConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the config {}", path.display()))?;
        let mut c: PrepareConfig =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        c.resolve_paths(base);
        c.check()
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(c)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.out);
        if let Some(q) = &mut self.quality {
            if let Some(m) = &mut q.model {
                fix(m);
            }
            q.good.iter_mut().for_each(fix);
            q.bad.iter_mut().for_each(fix);
        }
        if let Some(p) = &mut self.tokenizer.path {
            fix(p);
        }
        for s in &mut self.sources {
            s.files.iter_mut().for_each(fix);
        }
    }

    fn check(&self) -> Result<()> {
        if self.sources.is_empty() {
            bail!("no [[source]] sections: add at least one with name, files and weight");
        }
        for s in &self.sources {
            if s.name.is_empty()
                || !s
                    .name
                    .chars()
                    .all(|c| c.is_alphanumeric() || "-_".contains(c))
            {
                bail!(
                    "source name {:?}: use letters, digits, '-' and '_' only",
                    s.name
                );
            }
            if s.files.is_empty() {
                bail!("source {:?}: `files` is empty", s.name);
            }
            if s.quality_filter && self.quality.is_none() {
                bail!(
                    "source {:?} sets quality_filter but there is no [quality] section",
                    s.name
                );
            }
        }
        if let Some(q) = &self.quality {
            if q.model.is_none() && (q.good.is_empty() || q.bad.is_empty()) {
                bail!("[quality] needs `model`, or both `good` and `bad` files to train one");
            }
        }
        if !(self.dedup.threshold > 0.0 && self.dedup.threshold <= 1.0) {
            bail!(
                "[dedup] threshold must be in (0, 1], got {}",
                self.dedup.threshold
            );
        }
        Ok(())
    }
}

/// What happened to one source in the fused pass (`OUT/kept/NAME.jsonl.report.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SourcePass {
    /// A hash of the settings this pass used; a rerun with other settings redoes it.
    pub key: String,
    pub name: String,
    pub documents_read: usize,
    pub bytes_read: u64,
    pub skipped: serde_json::Value,
    pub clean: serde_json::Value,
    pub quality_dropped: usize,
    pub quality_mean_kept: Option<f64>,
    pub exact_duplicates: usize,
    pub near_duplicates: usize,
    pub documents_out: usize,
    pub bytes_out: u64,
    pub seconds: f64,
    pub megabytes_per_second: f64,
}

/// `OUT/prepare_report.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PrepareReport {
    pub sources: Vec<SourcePass>,
    pub quality_model: Option<PathBuf>,
    pub tokenizer: PathBuf,
    pub shards: PathBuf,
    pub mixture: MixManifest,
    pub seconds: f64,
}

/// The per-document stages of one source, applied block by block.
struct Pipeline<'a> {
    clean: CleanOptions,
    quality: Option<(&'a QualityModel, Keeper)>,
    dedup: Option<&'a mut Deduplicator>,
    clean_stats: CleanStats,
    dedup_before: DedupReport,
}

impl Pipeline<'_> {
    /// Returns the kept documents of a block, in order.
    fn run(&mut self, docs: Vec<String>) -> Vec<String> {
        let cleaned = clean_documents(&docs, &self.clean);
        let mut survivors: Vec<String> = Vec::with_capacity(docs.len());
        let texts: Vec<Option<String>> = docs
            .iter()
            .zip(cleaned)
            .map(|(d, c)| {
                self.clean_stats
                    .count(d.len(), &c)
                    .is_some()
                    .then(|| c.text.unwrap())
            })
            .collect();
        let texts: Vec<String> = texts.into_iter().flatten().collect();
        match &mut self.quality {
            Some((model, keeper)) => {
                let scores: Vec<f64> = texts.par_iter().map(|t| model.score(t)).collect();
                for (t, s) in texts.into_iter().zip(scores) {
                    if keeper.keep(s) {
                        survivors.push(t);
                    }
                }
            }
            None => survivors = texts,
        }
        match &mut self.dedup {
            Some(d) => {
                let fps: Vec<Fingerprint> =
                    survivors.par_iter().map(|t| d.fingerprint(t)).collect();
                survivors
                    .into_iter()
                    .zip(&fps)
                    .filter(|(_, fp)| d.check(fp) == Verdict::Keep)
                    .map(|(t, _)| t)
                    .collect()
            }
            None => survivors,
        }
    }
}

/// What a rank makes of one block under mpirun: the order-free part of [`Pipeline::run`].
#[derive(Default, Serialize, Deserialize)]
struct PreparedBlock {
    /// Each document's size before cleaning, and what cleaning made of it.
    cleaned: Vec<(usize, Cleaned)>,
    /// Quality scores of the documents cleaning kept (empty without a quality model).
    scores: Vec<f64>,
    /// Fingerprints of the documents cleaning kept (empty without dedup).
    fingerprints: Vec<Fingerprint>,
}

impl Pipeline<'_> {
    /// Cleaning, quality scores and fingerprints of a block: no state, so any rank may do it.
    fn prepare_block(&self, docs: Vec<String>) -> PreparedBlock {
        let cleaned = clean_documents(&docs, &self.clean);
        let texts: Vec<&str> = cleaned.iter().filter_map(|c| c.text.as_deref()).collect();
        PreparedBlock {
            scores: match &self.quality {
                Some((model, _)) => texts.par_iter().map(|t| model.score(t)).collect(),
                None => Vec::new(),
            },
            fingerprints: match &self.dedup {
                Some(d) => texts.par_iter().map(|t| d.fingerprint(t)).collect(),
                None => Vec::new(),
            },
            cleaned: docs.iter().map(|d| d.len()).zip(cleaned).collect(),
        }
    }

    /// The rest of [`Pipeline::run`] in document order: counts, the keep rule and the duplicate
    /// index. Each sees its documents in the same order as in `run`, so the result is the same.
    fn decide(&mut self, block: PreparedBlock) -> Vec<String> {
        let (mut scores, mut fingerprints) =
            (block.scores.into_iter(), block.fingerprints.into_iter());
        let mut kept = Vec::new();
        for (bytes, cleaned) in &block.cleaned {
            let Some(text) = self.clean_stats.count(*bytes, cleaned) else {
                continue;
            };
            let (score, fingerprint) = (scores.next(), fingerprints.next());
            if let (Some((_, keeper)), Some(s)) = (&mut self.quality, score) {
                if !keeper.keep(s) {
                    continue;
                }
            }
            if let (Some(d), Some(fp)) = (&mut self.dedup, fingerprint) {
                if d.check(&fp) != Verdict::Keep {
                    continue;
                }
            }
            kept.push(text.to_string());
        }
        kept
    }
}

/// A source's pass split across ranks: blocks go round-robin, one per rank per round; each round
/// is gathered and decided in order on every rank, and rank 0 writes `kept`.
fn stream_across_ranks(
    files: &[PathBuf],
    read: &ReadOptions,
    label: &str,
    kept: &Path,
    pipeline: &mut Pipeline,
) -> Result<(text::ReadSummary, usize, u64)> {
    let world = crate::dist::world();
    let (mut documents_out, mut bytes_out) = (0usize, 0u64);
    let mut pass = |out: &mut dyn std::io::Write| -> Result<text::ReadSummary> {
        let mut round: Vec<Vec<String>> = Vec::new();
        let mut decide_round = |round: &mut Vec<Vec<String>>| -> Result<()> {
            let mine = match round.get_mut(world.rank()) {
                Some(docs) => pipeline.prepare_block(std::mem::take(docs)),
                None => PreparedBlock::default(),
            };
            let blocks = crate::dist::gather(world, &mine)?;
            for block in blocks.into_iter().take(round.len()) {
                for t in pipeline.decide(block) {
                    documents_out += 1;
                    bytes_out += t.len() as u64;
                    serde_json::to_writer(&mut *out, &serde_json::json!({ "text": t }))?;
                    out.write_all(b"\n")?;
                }
            }
            round.clear();
            Ok(())
        };
        let summary = text::for_each_chunk(files, read, label, super::block_bytes(), |docs| {
            round.push(docs);
            if round.len() == world.size() {
                decide_round(&mut round)?;
            }
            Ok(())
        })?;
        if !round.is_empty() {
            decide_round(&mut round)?;
        }
        Ok(summary)
    };
    let summary = if world.rank() == 0 {
        util::write_atomic_with(kept, |tmp| {
            let mut w = std::io::BufWriter::new(std::fs::File::create(tmp)?);
            let summary = pass(&mut w)?;
            std::io::Write::flush(&mut w)?;
            Ok(summary)
        })?
    } else {
        pass(&mut std::io::sink())?
    };
    Ok((summary, documents_out, bytes_out))
}

/// Runs the whole pipeline; returns the report (also written to `OUT/prepare_report.json`).
///
/// Under mpirun every rank runs the source passes (each its share of the blocks); rank 0 alone
/// trains the quality classifier and the tokenizer and writes the mixture, and the other ranks
/// return its report.
pub fn prepare(config: &PrepareConfig) -> Result<PrepareReport> {
    let start = std::time::Instant::now();
    let out = &config.out;
    let world = crate::dist::world();
    let leader = world.rank() == 0;
    // Rank 0 alone tells what happens.
    macro_rules! say {
        ($($arg:tt)*) => { if leader { eprintln!($($arg)*) } };
    }
    std::fs::create_dir_all(out.join("kept"))
        .with_context(|| format!("cannot create {}", out.display()))?;
    if leader {
        util::write_atomic(
            &out.join("config.json"),
            serde_json::to_string_pretty(config)?.as_bytes(),
        )?;
    }

    // 1. The quality model. Every stage has a key (a hash of what decides its output); a stage
    // whose key matches the one recorded by the last run is not redone.
    let (quality_model, quality_path, quality_key) = match &config.quality {
        None => (None, None, String::new()),
        Some(q) => {
            let (path, key) = match &q.model {
                Some(m) => {
                    let bytes = std::fs::read(m)
                        .with_context(|| format!("[quality] model {}", m.display()))?;
                    (
                        m.clone(),
                        util::fingerprint(&String::from_utf8_lossy(&bytes)),
                    )
                }
                None => {
                    let path = out.join("quality.json");
                    let key = util::fingerprint(&serde_json::to_string(&(q, config.seed))?);
                    if leader && !stage_is_current(&path, &key) {
                        say!("training the quality classifier ...");
                        let m = quality::train_files(
                            &q.good,
                            &q.bad,
                            &ReadOptions {
                                on_error: config.on_error,
                                ..Default::default()
                            },
                            &path,
                            3,
                            config.seed,
                        )?;
                        say!(
                            "quality classifier: held-out accuracy {:.3}, AUC {:.3}",
                            m.heldout_accuracy,
                            m.heldout_auc
                        );
                        mark_stage(&path, &key)?;
                    }
                    (path, key)
                }
            };
            let rule = (q.alpha, q.threshold);
            (
                // Under mpirun the other ranks load it once rank 0 has written it.
                leader.then(|| quality::load_model(&path)).transpose()?,
                Some(path),
                util::fingerprint(&format!("{key}{rule:?}")),
            )
        }
    };

    let quality_model = match &quality_path {
        Some(path) if world.size() > 1 => {
            crate::dist::gather(world, &())?;
            match quality_model {
                Some(m) => Some(m),
                None => Some(quality::load_model(path)?),
            }
        }
        _ => quality_model,
    };

    // 2. One fused pass per source; the duplicate index spans sources.
    let dedup_opts = DedupOptions {
        threshold: config.dedup.threshold,
        seed: DedupOptions::default().seed ^ config.seed,
        ..Default::default()
    };
    let mut dedup = Deduplicator::new(&dedup_opts)?;
    let clean = CleanOptions {
        min_chars: config.clean.min_chars,
        repeated_line_documents: config.clean.repeated_line_documents.max(2),
    };
    let mut passes = Vec::new();
    let mut kept_files = Vec::new();
    for (i, source) in config.sources.iter().enumerate() {
        let kept = out.join("kept").join(format!("{}.jsonl", source.name));
        // Everything that decides this source's output, including the sources before it (their
        // documents are in the duplicate index).
        // Weights only matter to the mixture, so changing one does not redo this pass.
        let inputs: Vec<_> = config.sources[..=i]
            .iter()
            .map(|s| (&s.name, &s.files, s.format, &s.text_field, s.quality_filter))
            .collect();
        let key = util::fingerprint(&serde_json::to_string(&(
            inputs,
            &config.clean,
            &quality_key,
            &config.dedup,
            config.seed,
            config.on_error,
        ))?);
        let report_path = {
            let mut p = kept.clone().into_os_string();
            p.push(".report.json");
            PathBuf::from(p)
        };
        if let Ok(done) = util::read_json::<SourcePass>(&report_path) {
            if done.key == key && kept.exists() {
                say!(
                    "source {}: already prepared, reloading its duplicate index",
                    source.name
                );
                if config.dedup.enabled {
                    let read = ReadOptions::default();
                    text::for_each_chunk(
                        std::slice::from_ref(&kept),
                        &read,
                        "reload",
                        super::CHUNK_BYTES,
                        |docs| {
                            let fps: Vec<Fingerprint> =
                                docs.par_iter().map(|t| dedup.fingerprint(t)).collect();
                            fps.iter().for_each(|fp| {
                                dedup.check(fp);
                            });
                            Ok(())
                        },
                    )?;
                }
                passes.push(done);
                kept_files.push(kept);
                continue;
            }
        }
        let pass = run_source(
            source,
            &kept,
            config,
            &clean,
            quality_model.as_ref().filter(|_| source.quality_filter),
            config.dedup.enabled.then_some(&mut dedup),
            key,
        )?;
        if leader {
            super::write_sidecar_report(&kept, &pass)?;
        }
        say!(
            "source {}: {} → {} documents ({:.1} MB/s)",
            source.name,
            pass.documents_read,
            pass.documents_out,
            pass.megabytes_per_second
        );
        passes.push(pass);
        kept_files.push(kept);
    }

    if !leader {
        // Rank 0 trains the tokenizer and writes the mixture and the report; wait for them.
        crate::dist::gather(world, &())?;
        return util::read_json(&out.join("prepare_report.json"));
    }

    // 3. The tokenizer.
    let sources_key: String = passes.iter().map(|p| p.key.as_str()).collect();
    let (tokenizer, tokenizer_path, tokenizer_key) = match &config.tokenizer.path {
        Some(p) => {
            let tok =
                Tokenizer::load(p).with_context(|| format!("[tokenizer] path {}", p.display()))?;
            let file = crate::tokenizer::tokenizer_file(p);
            let bytes = std::fs::read(&file)?;
            let key = util::fingerprint(&String::from_utf8_lossy(&bytes));
            (tok, p.clone(), key)
        }
        None => {
            let dir = out.join("tokenizer");
            let key = util::fingerprint(&format!(
                "{sources_key}{}",
                serde_json::to_string(&config.tokenizer)?
            ));
            if !stage_is_current(&dir.join("tokenizer.json"), &key) {
                say!(
                    "training a {}-token tokenizer on the kept text ...",
                    config.tokenizer.vocab_size
                );
                let sample = tokenizer_sample(config, &kept_files)?;
                let chunks: Vec<&str> = sample.iter().map(String::as_str).collect();
                let (tok, _) = Tokenizer::train(
                    &chunks,
                    &TrainOptions {
                        vocab_size: config.tokenizer.vocab_size,
                        ..Default::default()
                    },
                )?;
                tok.save(&dir)?;
                mark_stage(&dir.join("tokenizer.json"), &key)?;
            }
            (Tokenizer::load(&dir)?, dir, key)
        }
    };

    // 4. The mixture.
    let shards_dir = out.join("shards");
    let sources: Vec<Source> = config
        .sources
        .iter()
        .zip(&kept_files)
        .map(|(s, k)| Source {
            name: s.name.clone(),
            files: vec![k.clone()],
            weight: s.weight,
            format: DocFormat::Jsonl,
            text_field: "text".into(),
        })
        .collect();
    let defaults = MixOptions::default();
    let mix_opts = MixOptions {
        total_tokens: config.mix.total_tokens,
        val_fraction: config.mix.val_fraction.unwrap_or(defaults.val_fraction),
        seed: config.seed,
        ..defaults
    };
    let mix_key = util::fingerprint(&format!(
        "{sources_key}{tokenizer_key}{}",
        serde_json::to_string(&(&config.mix, config.seed, &config.sources))?
    ));
    let manifest_path = shards_dir.join("manifest.json");
    let mixture = match util::read_json::<MixManifest>(&manifest_path) {
        Ok(m)
            if stage_is_current(&manifest_path, &mix_key)
                && shards_dir.join("meta.json").exists() =>
        {
            say!("shards: already written");
            m
        }
        _ => {
            let m = super::mix::mix(
                &tokenizer,
                &sources,
                &shards_dir,
                &mix_opts,
                Some(serde_json::to_value(config)?),
            )?;
            mark_stage(&manifest_path, &mix_key)?;
            m
        }
    };
    let report = PrepareReport {
        sources: passes,
        quality_model: quality_path,
        tokenizer: tokenizer_path,
        shards: shards_dir,
        mixture,
        seconds: start.elapsed().as_secs_f64(),
    };
    util::write_json_atomic(&out.join("prepare_report.json"), &report)?;
    if world.size() > 1 {
        crate::dist::gather(world, &())?;
    }
    Ok(report)
}

/// `PATH.key` records the key of the run that wrote `PATH`.
fn key_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".key");
    PathBuf::from(p)
}

fn stage_is_current(path: &Path, key: &str) -> bool {
    path.exists() && std::fs::read_to_string(key_path(path)).is_ok_and(|k| k == key)
}

fn mark_stage(path: &Path, key: &str) -> Result<()> {
    util::write_atomic(&key_path(path), key.as_bytes())
}

/// The fused pass over one source, writing its kept documents as JSONL (atomically).
fn run_source(
    source: &SourceSection,
    kept: &Path,
    config: &PrepareConfig,
    clean: &CleanOptions,
    model: Option<&QualityModel>,
    dedup: Option<&mut Deduplicator>,
    key: String,
) -> Result<SourcePass> {
    let start = std::time::Instant::now();
    let read = ReadOptions {
        format: source.format,
        text_field: source.text_field.clone(),
        on_error: config.on_error,
    };
    let rule = config.quality.as_ref().map(|q| KeepRule {
        threshold: q.threshold,
        alpha: q.alpha,
        seed: config.seed,
    });
    let dedup_before = dedup.as_ref().map(|d| d.report.clone()).unwrap_or_default();
    let mut pipeline = Pipeline {
        clean: clean.clone(),
        quality: model.zip(rule).map(|(m, r)| (m, Keeper::new(r))),
        dedup,
        clean_stats: CleanStats::default(),
        dedup_before,
    };
    let mut bytes_out = 0u64;
    let mut documents_out = 0usize;
    let label = format!("prepare {}", source.name);
    let summary = if crate::dist::world().size() > 1 {
        let (summary, documents, bytes) =
            stream_across_ranks(&source.files, &read, &label, kept, &mut pipeline)?;
        (documents_out, bytes_out) = (documents, bytes);
        summary
    } else {
        super::stream_to_jsonl(&source.files, &read, &label, kept, |docs| {
            Ok(pipeline
                .run(docs)
                .into_iter()
                .map(|t| {
                    documents_out += 1;
                    bytes_out += t.len() as u64;
                    serde_json::json!({ "text": t })
                })
                .collect())
        })?
    };
    let seconds = start.elapsed().as_secs_f64();
    let (exact, near) = match &pipeline.dedup {
        Some(d) => (
            d.report.exact_duplicates - pipeline.dedup_before.exact_duplicates,
            d.report.near_duplicates - pipeline.dedup_before.near_duplicates,
        ),
        None => (0, 0),
    };
    Ok(SourcePass {
        key,
        name: source.name.clone(),
        documents_read: summary.documents,
        bytes_read: summary.bytes,
        skipped: serde_json::to_value(&summary.skipped)?,
        clean: serde_json::to_value(&pipeline.clean_stats)?,
        quality_dropped: pipeline.quality.as_ref().map_or(0, |q| q.1.dropped),
        quality_mean_kept: pipeline.quality.as_ref().map(|q| q.1.mean_kept()),
        exact_duplicates: exact,
        near_duplicates: near,
        documents_out,
        bytes_out,
        seconds,
        megabytes_per_second: summary.bytes as f64 / 1e6 / seconds.max(1e-9),
    })
}

/// Kept text to train the tokenizer on: each source contributes by weight, up to the budget.
fn tokenizer_sample(config: &PrepareConfig, kept: &[PathBuf]) -> Result<Vec<String>> {
    let total_weight: f64 = config.sources.iter().map(|s| s.weight).sum();
    let mut sample = Vec::new();
    for (s, file) in config.sources.iter().zip(kept) {
        let budget = (config.tokenizer.train_bytes as f64 * s.weight / total_weight) as u64;
        let mut taken = 0u64;
        let mut skipped = Skipped::default();
        let _ = text::read_documents_with(file, &ReadOptions::default(), &mut skipped, |d, _| {
            if taken >= budget {
                bail!("budget reached");
            }
            taken += d.len() as u64;
            sample.push(d);
            Ok(())
        });
    }
    if sample.is_empty() {
        bail!("no documents survived cleaning, filtering and duplicate removal; nothing to train a tokenizer on");
    }
    Ok(sample)
}

/// The pipeline's results as tables for people.
pub fn render_report(r: &PrepareReport) -> String {
    let rows: Vec<Vec<String>> = r
        .sources
        .iter()
        .map(|s| {
            let clean = |k: &str| s.clean.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
            vec![
                s.name.clone(),
                s.documents_read.to_string(),
                s.skipped
                    .get("records")
                    .and_then(|v| v.as_u64())
                    .unwrap_or(0)
                    .to_string(),
                clean("too_short").to_string(),
                s.quality_dropped.to_string(),
                s.exact_duplicates.to_string(),
                s.near_duplicates.to_string(),
                s.documents_out.to_string(),
                format!("{:.1}", s.bytes_read as f64 / 1e6),
                format!("{:.1}", s.bytes_out as f64 / 1e6),
                format!("{:.1}", s.megabytes_per_second),
            ]
        })
        .collect();
    format!(
        "{}\n{}\nshards: {}  tokenizer: {}  total {:.1} s\n",
        util::text_table(
            &[
                "source",
                "docs in",
                "unreadable",
                "too short",
                "low quality",
                "exact dup",
                "near dup",
                "docs out",
                "MB in",
                "MB out",
                "MB/s",
            ],
            &rows
        ),
        super::mix::render_manifest(&r.mixture),
        r.shards.display(),
        r.tokenizer.display(),
        r.seconds
    )
}
