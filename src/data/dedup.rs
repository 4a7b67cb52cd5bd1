//! Duplicate removal: exact duplicates by a hash of the normalised text, near-duplicates by MinHash
//! over character 5-gram shingles (which work for Chinese as well as for spaced languages) with LSH
//! banding, each candidate confirmed by its estimated Jaccard similarity. The first occurrence of a
//! group is kept.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

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
    let mut out = String::with_capacity(text.len());
    for word in text.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        if word.is_ascii() {
            out.extend(word.chars().map(|c| c.to_ascii_lowercase()));
        } else {
            out.push_str(&word.to_lowercase());
        }
    }
    out
}

/// The MinHash permutations: `v = a·h + b (mod 2³²)` with odd `a`, a bijection of the 32-bit
/// shingle hash per slot, so the slot minimum is a min-hash.
fn permutations(opts: &DedupOptions) -> (Vec<u32>, Vec<u32>) {
    (0..(opts.bands * opts.rows) as u64)
        .map(|i| {
            let r = splitmix(opts.seed ^ i.wrapping_mul(0x1000_0001));
            ((r as u32) | 1, (r >> 32) as u32)
        })
        .unzip()
}

#[inline(always)]
fn minhash_portable(shingles: &[u32], a: &[u32], b: &[u32]) -> Vec<u32> {
    let mut slots = vec![u32::MAX; a.len()];
    for &h in shingles {
        for ((slot, &a), &b) in slots.iter_mut().zip(a).zip(b) {
            *slot = (*slot).min(a.wrapping_mul(h).wrapping_add(b));
        }
    }
    slots
}

/// The same loop compiled for AVX2, where 8 slots update per instruction.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn minhash_avx2(shingles: &[u32], a: &[u32], b: &[u32]) -> Vec<u32> {
    minhash_portable(shingles, a, b)
}

fn minhash(shingles: &[u32], a: &[u32], b: &[u32]) -> Vec<u32> {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { minhash_avx2(shingles, a, b) };
    }
    minhash_portable(shingles, a, b)
}

/// Hashes of a normalised text's character shingles (the whole text if it is shorter).
fn shingle_hashes(normalised: &str, n: usize) -> Vec<u32> {
    let chars: Vec<char> = normalised.chars().collect();
    let n = n.max(1);
    let windows = chars.len().saturating_sub(n) + 1;
    (0..windows)
        .map(|start| {
            let end = (start + n).min(chars.len());
            let h = chars[start..end]
                .iter()
                .fold(0xcbf2_9ce4_8422_2325u64, |h, &c| {
                    (h ^ c as u64).wrapping_mul(0x0100_0000_01b3)
                });
            let h = splitmix(h);
            (h ^ (h >> 32)) as u32
        })
        .collect()
}

/// MinHash signature of a normalised text's character shingles.
pub fn signature(normalised: &str, opts: &DedupOptions) -> Vec<u32> {
    let (a, b) = permutations(opts);
    minhash(&shingle_hashes(normalised, opts.shingle), &a, &b)
}

/// Fraction of equal signature slots: an unbiased estimate of the Jaccard similarity.
pub fn estimated_jaccard(a: &[u32], b: &[u32]) -> f64 {
    let same = a.iter().zip(b).filter(|(x, y)| x == y).count();
    same as f64 / a.len().max(1) as f64
}

/// What [`Deduplicator::check`] needs of a document; computing it is the costly, parallel part.
#[derive(Serialize, Deserialize)]
pub struct Fingerprint {
    exact: (u64, usize),
    signature: Vec<u32>,
}

/// Streaming duplicate removal: documents are checked in order against everything kept so far.
/// Memory grows with the kept documents (about 0.7 KB each: a 16-bit copy of the signature and one
/// LSH table entry per band), not with their text.
pub struct Deduplicator {
    opts: DedupOptions,
    a: Vec<u32>,
    b: Vec<u32>,
    exact: HashMap<(u64, usize), u64>,
    /// (band, hash of the band's rows) → index among kept documents.
    bands: HashMap<u64, u32>,
    /// The high 16 bits of each kept document's signature, back to back.
    kept_signatures: Vec<u16>,
    /// Index among all checked documents of each kept one.
    kept_index: Vec<u64>,
    pub report: DedupReport,
}

impl Deduplicator {
    pub fn new(opts: &DedupOptions) -> anyhow::Result<Deduplicator> {
        if !(opts.threshold > 0.0 && opts.threshold <= 1.0) {
            anyhow::bail!("--threshold must be in (0, 1], got {}", opts.threshold);
        }
        if opts.bands == 0 || opts.rows == 0 {
            anyhow::bail!("dedup needs at least one band of at least one row");
        }
        let (a, b) = permutations(opts);
        Ok(Deduplicator {
            opts: opts.clone(),
            a,
            b,
            exact: HashMap::new(),
            bands: HashMap::new(),
            kept_signatures: Vec::new(),
            kept_index: Vec::new(),
            report: DedupReport::default(),
        })
    }

    /// The fingerprint of one document; pure, so a batch can be computed in parallel.
    pub fn fingerprint(&self, text: &str) -> Fingerprint {
        let normalised = normalise(text);
        let shingles = shingle_hashes(&normalised, self.opts.shingle);
        Fingerprint {
            exact: (fnv1a(normalised.bytes()), normalised.len()),
            signature: minhash(&shingles, &self.a, &self.b),
        }
    }

    /// The verdict on the next document; indices in verdicts count all checked documents.
    pub fn check(&mut self, fp: &Fingerprint) -> Verdict {
        let index = self.report.documents_in as u64;
        self.report.documents_in += 1;
        if let Some(&first) = self.exact.get(&fp.exact) {
            self.report.exact_duplicates += 1;
            return Verdict::Exact(first as usize);
        }
        let perms = self.a.len();
        let rows = self.opts.rows;
        let band_keys: Vec<u64> = (0..self.opts.bands)
            .map(|band| {
                let r = &fp.signature[band * rows..(band + 1) * rows];
                splitmix(fnv1a(r.iter().flat_map(|x| x.to_le_bytes())) ^ band as u64)
            })
            .collect();
        let high: Vec<u16> = fp.signature.iter().map(|v| (v >> 16) as u16).collect();
        let mut tried: Vec<u32> = Vec::new();
        for key in &band_keys {
            let Some(&k) = self.bands.get(key) else {
                continue;
            };
            if tried.contains(&k) {
                continue;
            }
            tried.push(k);
            let stored = &self.kept_signatures[k as usize * perms..(k as usize + 1) * perms];
            let same = stored.iter().zip(&high).filter(|(x, y)| x == y).count();
            if same as f64 / perms as f64 >= self.opts.threshold {
                self.report.near_duplicates += 1;
                return Verdict::Near(self.kept_index[k as usize] as usize);
            }
        }
        let k = self.kept_index.len() as u32;
        self.exact.insert(fp.exact, index);
        for key in band_keys {
            self.bands.entry(key).or_insert(k);
        }
        self.kept_signatures.extend(high);
        self.kept_index.push(index);
        self.report.documents_out += 1;
        Verdict::Keep
    }
}

/// One verdict per document, in order.
pub fn deduplicate(docs: &[String], opts: &DedupOptions) -> (Vec<Verdict>, DedupReport) {
    let mut d = Deduplicator::new(opts).expect("valid dedup options");
    let fps: Vec<Fingerprint> = docs.par_iter().map(|t| d.fingerprint(t)).collect();
    let verdicts = fps.iter().map(|fp| d.check(fp)).collect();
    (verdicts, d.report)
}

/// What `chatforge data dedup` reports.
#[derive(Clone, Debug, Serialize)]
pub struct DedupRun {
    #[serde(flatten)]
    pub io: super::StageIo,
    pub options: DedupOptions,
    #[serde(flatten)]
    pub report: DedupReport,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// Streams documents, removes duplicates and writes the kept ones as JSONL (`{"text": ...}`) under
/// a temporary name renamed at the end, with `OUT.report.json` beside it.
pub fn dedup_files(
    inputs: &[std::path::PathBuf],
    read: &super::text::ReadOptions,
    out: &std::path::Path,
    opts: &DedupOptions,
) -> anyhow::Result<DedupRun> {
    let mut dedup = Deduplicator::new(opts)?;
    let start = std::time::Instant::now();
    let mut bytes_out = 0u64;
    let summary = super::stream_to_jsonl(inputs, read, "dedup", out, |docs| {
        let fps: Vec<Fingerprint> = docs.par_iter().map(|t| dedup.fingerprint(t)).collect();
        Ok(docs
            .into_iter()
            .zip(&fps)
            .filter(|(_, fp)| dedup.check(fp) == Verdict::Keep)
            .map(|(d, _)| {
                bytes_out += d.len() as u64;
                serde_json::json!({ "text": d })
            })
            .collect())
    })?;
    let run = DedupRun {
        bytes_in: summary.bytes,
        io: super::StageIo::finish(inputs, out, summary, start),
        options: opts.clone(),
        report: dedup.report,
        bytes_out,
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
