//! Duplicate removal: exact duplicates by a hash of the normalised text, near-duplicates by MinHash
//! over character 5-gram shingles (which work for Chinese as well as for spaced languages) with LSH
//! banding, each candidate confirmed by its estimated Jaccard similarity. The first occurrence of a
//! group is kept.

use rayon::prelude::*;
use serde::Serialize;
use std::collections::{HashMap, HashSet};

#[derive(Clone, Debug, Serialize)]
pub struct DedupOptions {
    /// Estimated Jaccard similarity at or above which two documents are near-duplicates.
    pub threshold: f64,
    /// Characters per shingle.
    pub shingle: usize,
    /// LSH bands × rows per band = MinHash permutations.
    pub bands: usize,
    pub rows: usize,
    pub seed: u64,
}

impl Default for DedupOptions {
    fn default() -> Self {
        // 20 bands of 5 rows: a pair at Jaccard 0.8 shares a band with probability 1 − (1 − 0.8⁵)²⁰
        // ≈ 0.9996; pairs below the threshold that collide are rejected by the signature check.
        DedupOptions {
            threshold: 0.8,
            shingle: 5,
            bands: 20,
            rows: 5,
            seed: 0x5eed,
        }
    }
}

/// Why a document was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Keep,
    /// Same normalised text as the document at this index.
    Exact(usize),
    /// Estimated Jaccard ≥ threshold with the document at this index.
    Near(usize),
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct DedupReport {
    pub documents_in: usize,
    pub documents_out: usize,
    pub exact_duplicates: usize,
    pub near_duplicates: usize,
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn fnv1a(bytes: impl Iterator<Item = u8>) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Lower case with runs of whitespace collapsed: what "the same text" means here.
pub fn normalise(text: &str) -> String {
    text.split_whitespace()
        .map(|w| w.to_lowercase())
        .collect::<Vec<_>>()
        .join(" ")
}

/// MinHash signature of a normalised text's character shingles.
pub fn signature(normalised: &str, opts: &DedupOptions) -> Vec<u64> {
    let chars: Vec<char> = normalised.chars().collect();
    let n = opts.shingle.max(1);
    let perms = opts.bands * opts.rows;
    let mut sig = vec![u64::MAX; perms];
    let seeds: Vec<u64> = (0..perms as u64)
        .map(|i| splitmix(opts.seed ^ i.wrapping_mul(0x1000_0001)))
        .collect();
    let windows = chars.len().saturating_sub(n) + 1;
    for start in 0..windows {
        let end = (start + n).min(chars.len());
        let h = chars[start..end]
            .iter()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, &c| {
                (h ^ c as u64).wrapping_mul(0x0100_0000_01b3)
            });
        for (slot, s) in sig.iter_mut().zip(&seeds) {
            let v = splitmix(h ^ s);
            if v < *slot {
                *slot = v;
            }
        }
    }
    sig
}

/// Fraction of equal signature slots: an unbiased estimate of the Jaccard similarity.
pub fn estimated_jaccard(a: &[u64], b: &[u64]) -> f64 {
    let same = a.iter().zip(b).filter(|(x, y)| x == y).count();
    same as f64 / a.len().max(1) as f64
}

/// One verdict per document, in order.
pub fn deduplicate(docs: &[String], opts: &DedupOptions) -> (Vec<Verdict>, DedupReport) {
    let normalised: Vec<String> = docs.par_iter().map(|d| normalise(d)).collect();
    let signatures: Vec<Vec<u64>> = normalised.par_iter().map(|d| signature(d, opts)).collect();
    let mut exact: HashMap<(u64, usize), usize> = HashMap::new();
    let mut buckets: HashMap<(usize, u64), Vec<usize>> = HashMap::new();
    let mut verdicts = Vec::with_capacity(docs.len());
    let mut report = DedupReport {
        documents_in: docs.len(),
        ..Default::default()
    };
    for (i, d) in normalised.iter().enumerate() {
        let key = (fnv1a(d.bytes()), d.len());
        if let Some(&first) = exact.get(&key) {
            verdicts.push(Verdict::Exact(first));
            report.exact_duplicates += 1;
            continue;
        }
        let sig = &signatures[i];
        let band_keys: Vec<(usize, u64)> = (0..opts.bands)
            .map(|b| {
                let rows = &sig[b * opts.rows..(b + 1) * opts.rows];
                (b, fnv1a(rows.iter().flat_map(|x| x.to_le_bytes())))
            })
            .collect();
        let mut seen = HashSet::new();
        let near = band_keys
            .iter()
            .filter_map(|k| buckets.get(k))
            .flatten()
            .copied()
            .filter(|&j| seen.insert(j))
            .find(|&j| estimated_jaccard(sig, &signatures[j]) >= opts.threshold);
        match near {
            Some(j) => {
                verdicts.push(Verdict::Near(j));
                report.near_duplicates += 1;
            }
            None => {
                exact.insert(key, i);
                for k in band_keys {
                    buckets.entry(k).or_default().push(i);
                }
                verdicts.push(Verdict::Keep);
            }
        }
    }
    report.documents_out = verdicts.iter().filter(|v| **v == Verdict::Keep).count();
    (verdicts, report)
}

/// What `chatforge data dedup` reports.
#[derive(Clone, Debug, Serialize)]
pub struct DedupRun {
    pub inputs: Vec<std::path::PathBuf>,
    pub output: std::path::PathBuf,
    pub options: DedupOptions,
    #[serde(flatten)]
    pub report: DedupReport,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub seconds: f64,
    pub megabytes_per_second: f64,
}

/// Reads documents, removes duplicates and writes the kept ones as JSONL (`{"text": ...}`) under a
/// temporary name renamed at the end, with `OUT.report.json` beside it.
pub fn dedup_files(
    inputs: &[std::path::PathBuf],
    format: super::text::DocFormat,
    text_field: &str,
    out: &std::path::Path,
    opts: &DedupOptions,
) -> anyhow::Result<DedupRun> {
    if !(opts.threshold > 0.0 && opts.threshold <= 1.0) {
        anyhow::bail!("--threshold must be in (0, 1], got {}", opts.threshold);
    }
    let start = std::time::Instant::now();
    let docs = super::text::read_all_documents(inputs, format, text_field)?;
    let (verdicts, report) = deduplicate(&docs, opts);
    let bytes_in: u64 = docs.iter().map(|d| d.len() as u64).sum();
    let mut bytes_out = 0u64;
    crate::util::write_atomic_with(out, |tmp| {
        use std::io::Write;
        let mut w = std::io::BufWriter::new(std::fs::File::create(tmp)?);
        for (d, v) in docs.iter().zip(&verdicts) {
            if *v == Verdict::Keep {
                bytes_out += d.len() as u64;
                writeln!(w, "{}", serde_json::json!({ "text": d }))?;
            }
        }
        w.flush()?;
        Ok(())
    })?;
    let seconds = start.elapsed().as_secs_f64();
    let run = DedupRun {
        inputs: inputs.to_vec(),
        output: out.to_path_buf(),
        options: opts.clone(),
        report,
        bytes_in,
        bytes_out,
        seconds,
        megabytes_per_second: bytes_in as f64 / 1e6 / seconds.max(1e-9),
    };
    super::write_sidecar_report(out, &run)?;
    Ok(run)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::Rng;

    fn random_doc(rng: &mut Rng, vocab: &[String], words: usize) -> Vec<String> {
        (0..words)
            .map(|_| vocab[rng.below(vocab.len() as u64) as usize].clone())
            .collect()
    }

    #[test]
    fn planted_near_duplicates_are_found_with_few_false_positives() {
        let mut rng = Rng::new(7);
        let vocab: Vec<String> = (0..5000)
            .map(|i| {
                let len = 3 + (i % 6);
                (0..len)
                    .map(|k| (b'a' + ((i * 7 + k * 13) % 26) as u8) as char)
                    .collect::<String>()
                    + &i.to_string()
            })
            .collect();
        let originals: Vec<Vec<String>> = (0..1000)
            .map(|_| random_doc(&mut rng, &vocab, 200))
            .collect();
        let mut docs: Vec<String> = originals.iter().map(|w| w.join(" ")).collect();
        // 100 planted copies with 5% of their words replaced.
        let mut planted = Vec::new();
        for k in 0..100 {
            let mut words = originals[k * 7].clone();
            for _ in 0..10 {
                let at = rng.below(words.len() as u64) as usize;
                words[at] = vocab[rng.below(vocab.len() as u64) as usize].clone();
            }
            planted.push((docs.len(), k * 7));
            docs.push(words.join(" "));
        }
        // Exact copies with other spacing and case are exact duplicates.
        docs.push(docs[3].to_uppercase().replace(' ', "  "));
        let (verdicts, report) = deduplicate(&docs, &DedupOptions::default());
        let found = planted
            .iter()
            .filter(|(i, orig)| verdicts[*i] == Verdict::Near(*orig))
            .count();
        assert!(found >= 95, "recall {found}/100");
        let false_pos = verdicts[..1000]
            .iter()
            .filter(|v| **v != Verdict::Keep)
            .count();
        assert!(
            false_pos < 10,
            "{false_pos} of 1000 distinct documents dropped"
        );
        assert_eq!(verdicts[docs.len() - 1], Verdict::Exact(3));
        assert_eq!(report.exact_duplicates, 1);
        assert_eq!(report.documents_in, 1101);
        assert_eq!(
            report.documents_out + report.exact_duplicates + report.near_duplicates,
            1101
        );
    }

    #[test]
    fn chinese_near_duplicates_and_the_estimate() {
        let a = "小明有一个红色的风筝。有一天，小明带着风筝去公园。风很大，风筝飞到了树上。小明很难过。后来一只狗来帮忙。";
        let b = "小明有一个蓝色的风筝。有一天，小明带着风筝去公园。风很大，风筝飞到了树上。小明很难过。后来一只狗来帮忙。";
        let c = "有一天，小红在河边遇到一只鸭子。鸭子看起来很饿。小红知道鸭子吃鱼，就拿来一些鱼。";
        let o = DedupOptions {
            threshold: 0.7,
            ..Default::default()
        };
        let (v, _) = deduplicate(&[a.into(), b.into(), c.into()], &o);
        assert_eq!(v, vec![Verdict::Keep, Verdict::Near(0), Verdict::Keep]);
        let (sa, sc) = (signature(a, &o), signature(c, &o));
        assert!(estimated_jaccard(&sa, &sa) == 1.0);
        assert!(estimated_jaccard(&sa, &sc) < 0.2);
    }
}
