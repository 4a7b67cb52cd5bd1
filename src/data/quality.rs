//! GPT-3-style quality classifier: hashed character n-gram features (so Chinese works) and word
//! unigrams, logistic regression trained to tell a reference corpus ("good") from raw web text
//! ("bad"), then documents kept by GPT-3's Pareto rule or a threshold.

use crate::util::{self, Rng};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

const BUCKETS: usize = 1 << 16;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct QualityModel {
    pub buckets: usize,
    pub bias: f32,
    pub weights: Vec<f32>,
    pub heldout_accuracy: f64,
    pub heldout_auc: f64,
    pub train_documents: usize,
    pub heldout_documents: usize,
}

fn hash(bytes: impl Iterator<Item = u64>) -> u64 {
    bytes.fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b).wrapping_mul(0x0100_0000_01b3)
    })
}

thread_local! {
    /// Per-thread dense counts over the buckets, reset after each document: counting in an array
    /// is several times faster than a hash map.
    static COUNTS: std::cell::RefCell<Vec<f32>> = std::cell::RefCell::new(vec![0.0; BUCKETS]);
}

/// L2-normalised counts of hashed character 2- and 3-grams and lower-cased words, sorted by
/// bucket (so sums, and scores, do not depend on the order features were found in).
pub fn features(text: &str) -> Vec<(usize, f32)> {
    let chars: Vec<char> = text.chars().take(20_000).collect();
    COUNTS.with_borrow_mut(|counts| {
        let mut touched: Vec<usize> = Vec::with_capacity(chars.len() * 2);
        let mut add = |h: u64| {
            let k = (h % BUCKETS as u64) as usize;
            if counts[k] == 0.0 {
                touched.push(k);
            }
            counts[k] += 1.0;
        };
        for n in [2usize, 3] {
            for w in chars.windows(n) {
                add(hash(w.iter().map(|&c| c as u64).chain([n as u64])));
            }
        }
        for word in text.split_whitespace().take(5_000) {
            if word.is_ascii() {
                add(hash(
                    word.bytes()
                        .map(|b| b.to_ascii_lowercase() as u64)
                        .chain([0xff]),
                ));
            } else {
                add(hash(
                    word.to_lowercase().bytes().map(u64::from).chain([0xff]),
                ));
            }
        }
        touched.sort_unstable();
        let norm = touched
            .iter()
            .map(|&k| counts[k] * counts[k])
            .sum::<f32>()
            .sqrt()
            .max(1e-6);
        touched
            .into_iter()
            .map(|k| {
                let v = counts[k] / norm;
                counts[k] = 0.0;
                (k, v)
            })
            .collect()
    })
}

impl QualityModel {
    /// Probability that `text` looks like the reference ("good") corpus.
    pub fn score(&self, text: &str) -> f64 {
        let z = self.bias
            + features(text)
                .iter()
                .map(|(i, v)| self.weights[*i] * v)
                .sum::<f32>();
        1.0 / (1.0 + (-z as f64).exp())
    }
}

/// Area under the ROC curve: the chance a random good document outscores a random bad one.
pub fn auc(scores: &[(f64, bool)]) -> f64 {
    let mut s = scores.to_vec();
    s.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (mut rank_sum, mut pos) = (0.0, 0usize);
    for (r, (_, good)) in s.iter().enumerate() {
        if *good {
            rank_sum += (r + 1) as f64;
            pos += 1;
        }
    }
    let neg = s.len() - pos;
    if pos == 0 || neg == 0 {
        return f64::NAN;
    }
    (rank_sum - (pos * (pos + 1)) as f64 / 2.0) / (pos * neg) as f64
}

/// Trains on labelled documents (true = good) with seeded SGD; every tenth is held out.
pub fn train(docs: Vec<(String, bool)>, epochs: usize, seed: u64) -> Result<QualityModel> {
    // Every tenth of each class is held out, so both classes are measured.
    let (good, bad): (Vec<_>, Vec<_>) = docs.into_iter().partition(|d| d.1);
    let (mut train, mut held) = util::hold_out_every(good, 10);
    let (bad_train, bad_held) = util::hold_out_every(bad, 10);
    train.extend(bad_train);
    held.extend(bad_held);
    for (name, set) in [("training", &train), ("held-out", &held)] {
        if !set.iter().any(|d| d.1) || !set.iter().any(|d| !d.1) {
            bail!("the {name} split needs both good and bad documents: give more of each");
        }
    }
    let feats: Vec<(Vec<(usize, f32)>, f32)> = train
        .iter()
        .map(|(t, g)| (features(t), if *g { 1.0 } else { 0.0 }))
        .collect();
    // Balance the classes so a large bad set does not just teach "everything is bad".
    let pos = feats.iter().filter(|f| f.1 > 0.5).count() as f32;
    let neg = feats.len() as f32 - pos;
    let (wp, wn) = (
        feats.len() as f32 / (2.0 * pos),
        feats.len() as f32 / (2.0 * neg),
    );
    let mut w = vec![0f32; BUCKETS];
    let mut b = 0f32;
    let mut rng = Rng::new(seed);
    let mut order: Vec<usize> = (0..feats.len()).collect();
    for epoch in 0..epochs {
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let lr = 0.5 / (1.0 + epoch as f32);
        for &i in &order {
            let (x, y) = &feats[i];
            let z = b + x.iter().map(|(k, v)| w[*k] * v).sum::<f32>();
            let p = 1.0 / (1.0 + (-z).exp());
            let g = (p - y) * if *y > 0.5 { wp } else { wn };
            for (k, v) in x {
                w[*k] -= lr * (g * v + 1e-6 * w[*k]);
            }
            b -= lr * g;
        }
    }
    let mut model = QualityModel {
        buckets: BUCKETS,
        bias: b,
        weights: w,
        heldout_accuracy: 0.0,
        heldout_auc: 0.0,
        train_documents: train.len(),
        heldout_documents: held.len(),
    };
    let scored: Vec<(f64, bool)> = held.iter().map(|(t, g)| (model.score(t), *g)).collect();
    model.heldout_accuracy =
        scored.iter().filter(|(s, g)| (*s > 0.5) == *g).count() as f64 / scored.len() as f64;
    model.heldout_auc = auc(&scored);
    Ok(model)
}

/// GPT-3's rule: keep a document when its score exceeds 1 − a Pareto(α) draw (numpy's
/// `pareto`, a Lomax sample), so most good documents and a few bad ones survive.
pub fn pareto_keep(score: f64, alpha: f64, rng: &mut Rng) -> bool {
    let u = 1.0 - rng.next_f64();
    let draw = u.powf(-1.0 / alpha) - 1.0;
    score > 1.0 - draw
}

/// Reads good and bad files, trains, and writes the model JSON (atomically).
pub fn train_files(
    good: &[std::path::PathBuf],
    bad: &[std::path::PathBuf],
    read: &super::text::ReadOptions,
    out: &std::path::Path,
    epochs: usize,
    seed: u64,
) -> Result<QualityModel> {
    let mut docs: Vec<(String, bool)> = Vec::new();
    for (files, label) in [(good, true), (bad, false)] {
        let mut some = false;
        super::text::for_each_chunk(files, read, "read", super::CHUNK_BYTES, |chunk| {
            some |= !chunk.is_empty();
            docs.extend(chunk.into_iter().map(|d| (d, label)));
            Ok(())
        })?;
        if !some {
            bail!(
                "no documents in the {} files ({})",
                if label { "--good" } else { "--bad" },
                files
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    let model = train(docs, epochs.max(1), seed)?;
    util::write_json_atomic(out, &model)?;
    Ok(model)
}

/// What `chatforge data quality-filter` reports.
#[derive(Clone, Debug, Serialize)]
pub struct FilterRun {
    #[serde(flatten)]
    pub io: super::StageIo,
    pub documents_in: usize,
    pub documents_out: usize,
    pub rule: String,
    pub mean_score_kept: f64,
    pub mean_score_dropped: f64,
}

/// How documents are kept: a fixed threshold, or GPT-3's Pareto rule.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct KeepRule {
    pub threshold: Option<f64>,
    pub alpha: f64,
    pub seed: u64,
}

impl KeepRule {
    pub fn describe(&self) -> String {
        match self.threshold {
            Some(t) => format!("score > {t}"),
            None => format!(
                "score > 1 - pareto(alpha={}), seed {}",
                self.alpha, self.seed
            ),
        }
    }
}

/// Applies a [`KeepRule`] to scores in document order (the Pareto draws come from one seeded
/// stream, so a rerun keeps the same documents), with running means for the report.
pub struct Keeper {
    rule: KeepRule,
    rng: Rng,
    pub kept: usize,
    pub dropped: usize,
    sum_kept: f64,
    sum_dropped: f64,
}

impl Keeper {
    pub fn new(rule: KeepRule) -> Keeper {
        Keeper {
            rule,
            rng: Rng::new(rule.seed),
            kept: 0,
            dropped: 0,
            sum_kept: 0.0,
            sum_dropped: 0.0,
        }
    }

    pub fn keep(&mut self, score: f64) -> bool {
        let keep = match self.rule.threshold {
            Some(t) => score > t,
            None => pareto_keep(score, self.rule.alpha, &mut self.rng),
        };
        if keep {
            self.kept += 1;
            self.sum_kept += score;
        } else {
            self.dropped += 1;
            self.sum_dropped += score;
        }
        keep
    }

    pub fn mean_kept(&self) -> f64 {
        self.sum_kept / self.kept.max(1) as f64
    }

    pub fn mean_dropped(&self) -> f64 {
        self.sum_dropped / self.dropped.max(1) as f64
    }
}

/// Reads a quality model, checking that it is one of this version.
pub fn load_model(model: &std::path::Path) -> Result<QualityModel> {
    let m: QualityModel = util::read_json(model).map_err(|e| {
        anyhow::anyhow!(
            "{} is not a quality model (make one with `chatforge data quality-train`): {e:#}",
            model.display()
        )
    })?;
    if m.weights.len() != m.buckets || m.buckets != BUCKETS {
        bail!(
            "{} is not a quality model of this version ({} weights for {} buckets); retrain it with `chatforge data quality-train`",
            model.display(),
            m.weights.len(),
            m.buckets
        );
    }
    Ok(m)
}

/// Streams documents, scores them and keeps those passing the rule; writes JSONL
/// `{"text", "quality"}` and `OUT.report.json`.
pub fn filter_files(
    model: &std::path::Path,
    inputs: &[std::path::PathBuf],
    read: &super::text::ReadOptions,
    out: &std::path::Path,
    rule: KeepRule,
) -> Result<FilterRun> {
    use rayon::prelude::*;
    let m = load_model(model)?;
    let start = std::time::Instant::now();
    let mut keeper = Keeper::new(rule);
    let summary = super::stream_to_jsonl(inputs, read, "filter", out, |docs| {
        let scores: Vec<f64> = docs.par_iter().map(|d| m.score(d)).collect();
        Ok(docs
            .into_iter()
            .zip(scores)
            .filter(|(_, s)| keeper.keep(*s))
            .map(|(d, s)| serde_json::json!({"text": d, "quality": s}))
            .collect())
    })?;
    let run = FilterRun {
        documents_in: summary.documents,
        io: super::StageIo::finish(inputs, out, summary, start),
        documents_out: keeper.kept,
        rule: rule.describe(),
        mean_score_kept: keeper.mean_kept(),
        mean_score_dropped: keeper.mean_dropped(),
    };
    super::write_sidecar_report(out, &run)?;
    Ok(run)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good(i: usize) -> String {
        format!("The village of Ashford lies on a river crossing. In the year {} its people built a stone bridge, and the market that grew around it drew traders from the whole valley. Historians describe the town's growth in careful detail.", 1200 + i)
    }

    fn bad(i: usize) -> String {
        format!("CLICK HERE!!! Best deals {i} >>> buy now cheap cheap | free shipping | login | cart (0) | $$$ win win win #{i} ***")
    }

    #[test]
    fn the_classifier_separates_clean_prose_from_spam() {
        let docs: Vec<(String, bool)> = (0..200)
            .flat_map(|i| [(good(i), true), (bad(i), false)])
            .collect();
        let m = train(docs, 3, 1).unwrap();
        assert!(m.heldout_accuracy > 0.95, "{}", m.heldout_accuracy);
        assert!(m.heldout_auc > 0.99, "{}", m.heldout_auc);
        assert!(m.score(&good(999)) > 0.5 && m.score(&bad(999)) < 0.5);
        // The Pareto rule keeps nearly all high scores and few low ones.
        let mut rng = Rng::new(3);
        let kept_high = (0..1000)
            .filter(|_| pareto_keep(0.95, 9.0, &mut rng))
            .count();
        let kept_low = (0..1000)
            .filter(|_| pareto_keep(0.05, 9.0, &mut rng))
            .count();
        assert!(kept_high > 500 && kept_low < 50, "{kept_high} {kept_low}");
        assert!(train(vec![(good(1), true); 20], 1, 1).is_err());
    }

    #[test]
    fn the_worked_example_on_shared_data_trains() {
        let d = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/text");
        if !d.exists() {
            eprintln!("SKIP: ../shared/data is absent");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("q.json");
        let m = train_files(
            &[
                d.join("wiki_demo.txt"),
                d.join("tinystories_head.txt"),
                d.join("zh_classics.txt"),
            ],
            &[d.join("c4_demo.jsonl")],
            &super::super::text::ReadOptions::default(),
            &out,
            3,
            0,
        )
        .unwrap();
        assert!(m.heldout_auc > 0.9, "AUC {}", m.heldout_auc);
        let back: QualityModel = util::read_json(&out).unwrap();
        assert_eq!(back.score("Once upon a time"), m.score("Once upon a time"));
    }

    #[test]
    fn auc_counts_ordered_pairs() {
        assert_eq!(auc(&[(0.1, false), (0.9, true)]), 1.0);
        assert_eq!(auc(&[(0.9, false), (0.1, true)]), 0.0);
        assert_eq!(
            auc(&[(0.2, false), (0.4, true), (0.3, false), (0.1, true)]),
            0.5
        );
    }
}
