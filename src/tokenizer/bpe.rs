//! Byte-level BPE training.
//!
//! We train merges ourselves (and hand the result to the `tokenizers` crate for encoding) because the
//! tie-breaking rule must be fixed and documented: when two pairs are equally frequent the pair whose
//! byte strings are lexicographically greater wins. `tokenizers`' own trainer breaks ties by internal
//! ids, which depend on alphabet order, so its merges differ from the reference implementations.

use super::byte_level::bytes_to_unicode;
use rayon::prelude::*;
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, HashSet};

/// One merge candidate in the priority queue. Entries go stale when counts change; a popped entry
/// is only used if its count still matches the live count.
#[derive(PartialEq, Eq)]
struct Candidate {
    count: u64,
    left: Vec<u8>,
    right: Vec<u8>,
    pair: (u32, u32),
}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        self.count
            .cmp(&other.count)
            .then_with(|| self.left.cmp(&other.left))
            .then_with(|| self.right.cmp(&other.right))
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Counts pre-tokens ("words") in `chunks`, splitting each chunk with `pattern`.
/// Text that the pattern does not match is kept as its own word, as the encoder does.
pub fn count_words(chunks: &[&str], pattern: &fancy_regex::Regex) -> HashMap<Vec<u8>, u64> {
    chunks
        .par_iter()
        .fold(HashMap::new, |mut counts: HashMap<Vec<u8>, u64>, chunk| {
            let mut last = 0;
            for m in pattern.find_iter(chunk).flatten() {
                if m.start() > last {
                    *counts
                        .entry(chunk.as_bytes()[last..m.start()].to_vec())
                        .or_default() += 1;
                }
                if !m.as_str().is_empty() {
                    *counts.entry(m.as_str().as_bytes().to_vec()).or_default() += 1;
                }
                last = m.end();
            }
            if last < chunk.len() {
                *counts.entry(chunk.as_bytes()[last..].to_vec()).or_default() += 1;
            }
            counts
        })
        .reduce(HashMap::new, |mut a, b| {
            for (k, v) in b {
                *a.entry(k).or_default() += v;
            }
            a
        })
}

/// Learns up to `num_merges` merges over the byte alphabet from word counts.
/// Returns the merges as pairs of byte strings, in the order they were learned.
pub fn learn_merges(words: &HashMap<Vec<u8>, u64>, num_merges: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut token_bytes: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    // Sorted so that the run does not depend on hash-map iteration order.
    let mut word_list: Vec<(&Vec<u8>, u64)> = words.iter().map(|(w, c)| (w, *c)).collect();
    word_list.sort();
    let mut seqs: Vec<Vec<u32>> = word_list
        .iter()
        .map(|(w, _)| w.iter().map(|&b| b as u32).collect())
        .collect();
    let freqs: Vec<u64> = word_list.iter().map(|(_, c)| *c).collect();

    let mut pair_counts: HashMap<(u32, u32), u64> = HashMap::new();
    let mut pair_words: HashMap<(u32, u32), HashSet<usize>> = HashMap::new();
    for (wi, seq) in seqs.iter().enumerate() {
        for p in seq.windows(2) {
            let pair = (p[0], p[1]);
            *pair_counts.entry(pair).or_default() += freqs[wi];
            pair_words.entry(pair).or_default().insert(wi);
        }
    }
    let candidate = |pair: (u32, u32), count: u64, tb: &[Vec<u8>]| Candidate {
        count,
        left: tb[pair.0 as usize].clone(),
        right: tb[pair.1 as usize].clone(),
        pair,
    };
    let mut heap: BinaryHeap<Candidate> = pair_counts
        .iter()
        .map(|(&p, &c)| candidate(p, c, &token_bytes))
        .collect();

    let mut merges = Vec::with_capacity(num_merges);
    while merges.len() < num_merges {
        let Some(best) = heap.pop() else { break };
        let live = pair_counts.get(&best.pair).copied().unwrap_or(0);
        if live == 0 || live != best.count {
            continue;
        }
        let new_id = token_bytes.len() as u32;
        let mut merged = best.left.clone();
        merged.extend_from_slice(&best.right);
        token_bytes.push(merged);
        merges.push((best.left.clone(), best.right.clone()));

        let affected = pair_words.remove(&best.pair).unwrap_or_default();
        let mut affected: Vec<usize> = affected.into_iter().collect();
        affected.sort_unstable();
        let mut touched: HashSet<(u32, u32)> = HashSet::new();
        for wi in affected {
            let old = &seqs[wi];
            let mut new = Vec::with_capacity(old.len());
            let mut i = 0;
            while i < old.len() {
                if i + 1 < old.len() && (old[i], old[i + 1]) == best.pair {
                    new.push(new_id);
                    i += 2;
                } else {
                    new.push(old[i]);
                    i += 1;
                }
            }
            if new.len() == old.len() {
                continue;
            }
            let f = freqs[wi];
            for p in old.windows(2) {
                let pair = (p[0], p[1]);
                if let Some(c) = pair_counts.get_mut(&pair) {
                    *c -= f;
                }
                touched.insert(pair);
            }
            for p in new.windows(2) {
                let pair = (p[0], p[1]);
                *pair_counts.entry(pair).or_default() += f;
                pair_words.entry(pair).or_default().insert(wi);
                touched.insert(pair);
            }
            seqs[wi] = new;
        }
        pair_counts.remove(&best.pair);
        for pair in touched {
            if let Some(&c) = pair_counts.get(&pair) {
                if c > 0 {
                    heap.push(candidate(pair, c, &token_bytes));
                }
            }
        }
    }
    merges
}

/// Renders a byte string in the GPT-2 byte-level alphabet (the form tokenizer.json stores).
pub fn to_byte_level(bytes: &[u8]) -> String {
    let table = bytes_to_unicode();
    bytes.iter().map(|&b| table[b as usize]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn most_frequent_pair_is_merged_first_and_ties_go_to_the_greater_pair() {
        let mut words = HashMap::new();
        words.insert(b"abab".to_vec(), 3);
        words.insert(b"cd".to_vec(), 3);
        words.insert(b"xy".to_vec(), 3);
        let merges = learn_merges(&words, 4);
        // (a,b) occurs 6 times: first. Then (ab,ab), (c,d) and (x,y) tie at 3 and go in
        // descending byte order.
        let expected: Vec<(Vec<u8>, Vec<u8>)> = [("a", "b"), ("x", "y"), ("c", "d"), ("ab", "ab")]
            .iter()
            .map(|(a, b)| (a.as_bytes().to_vec(), b.as_bytes().to_vec()))
            .collect();
        assert_eq!(merges, expected);
    }

    #[test]
    fn overlapping_pairs_merge_left_to_right() {
        let mut words = HashMap::new();
        words.insert(b"aaa".to_vec(), 1);
        let merges = learn_merges(&words, 2);
        assert_eq!(merges[0], (b"a".to_vec(), b"a".to_vec()));
        assert_eq!(merges[1], (b"aa".to_vec(), b"a".to_vec()));
    }

    #[test]
    fn stops_when_nothing_is_left_to_merge() {
        let mut words = HashMap::new();
        words.insert(b"ab".to_vec(), 1);
        assert_eq!(learn_merges(&words, 10).len(), 1);
    }
}
