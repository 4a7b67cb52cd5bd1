//! Rows of a batch grouped by length, so that each group is padded only to its own longest row.
//!
//! Chat batches mix two-token replies with hundred-token solutions. Padded to the batch's
//! longest row, half of what the reward model and SFT computed was padding. Losses that are sums
//! over rows (SFT's masked token sum, the reward model's pair scores) come out the same when the
//! rows run as several shorter forward passes, so grouping changes the work, not the result.

/// A new group must save at least this many padded tokens: each forward pass costs a fixed
/// amount (kernel launches, autograd nodes) on top of its tokens.
const TOKENS_PER_EXTRA_PASS: usize = 128;

/// Indices of `lens`, split into groups of similar length that minimise padded tokens plus
/// [`TOKENS_PER_EXTRA_PASS`] per group. Every index appears once; each group lists its rows
/// shortest first.
pub fn length_groups(lens: &[usize]) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.sort_by_key(|&i| lens[i]);
    let n = order.len();
    // cost[i]: least cost of the shortest i rows; cut[i]: where its last group starts.
    let mut cost = vec![0usize; n + 1];
    let mut cut = vec![0usize; n + 1];
    for end in 1..=n {
        let longest = lens[order[end - 1]];
        let (start, c) = (0..end)
            .map(|start| {
                (
                    start,
                    cost[start] + (end - start) * longest + TOKENS_PER_EXTRA_PASS,
                )
            })
            .min_by_key(|&(_, c)| c)
            .expect("end >= 1");
        cost[end] = c;
        cut[end] = start;
    }
    let mut groups = Vec::new();
    let mut end = n;
    while end > 0 {
        groups.push(order[cut[end]..end].to_vec());
        end = cut[end];
    }
    groups.reverse();
    groups
}

/// Tokens a batch of `lens` computes when every row is padded to the longest.
pub fn padded_tokens(lens: &[usize]) -> usize {
    lens.len() * lens.iter().copied().max().unwrap_or(0)
}

/// Tokens the groups of [`length_groups`] compute.
pub fn grouped_tokens(lens: &[usize], groups: &[Vec<usize>]) -> usize {
    groups
        .iter()
        .map(|g| g.len() * g.iter().map(|&i| lens[i]).max().unwrap_or(0))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::Rng;

    #[test]
    fn every_row_lands_in_exactly_one_group() {
        let mut rng = Rng::new(7);
        for n in [0usize, 1, 2, 17, 48] {
            let lens: Vec<usize> = (0..n).map(|_| 1 + rng.below(200) as usize).collect();
            let mut seen: Vec<usize> = length_groups(&lens).concat();
            seen.sort();
            assert_eq!(seen, (0..n).collect::<Vec<_>>(), "n = {n}");
        }
    }

    #[test]
    fn mixed_lengths_split_and_equal_lengths_do_not() {
        // Curt and full replies, as in a reward-model batch: padding all to 150 wastes most.
        let mixed: Vec<usize> = [5usize, 150].repeat(24);
        let groups = length_groups(&mixed);
        assert_eq!(groups.len(), 2, "{groups:?}");
        assert!(groups[0].iter().all(|&i| mixed[i] == 5));
        assert!(grouped_tokens(&mixed, &groups) * 10 < padded_tokens(&mixed) * 6);
        // Rows of one length gain nothing from a second pass.
        assert_eq!(length_groups(&[64; 16]).len(), 1);
        // A short row is not worth its own pass when it saves fewer tokens than a pass costs.
        assert_eq!(length_groups(&[100, 100, 100, 40]).len(), 1);
    }

    #[test]
    fn grouping_never_computes_more_than_padding_everything() {
        let mut rng = Rng::new(11);
        for _ in 0..50 {
            let lens: Vec<usize> = (0..32).map(|_| 1 + rng.below(250) as usize).collect();
            let groups = length_groups(&lens);
            assert!(grouped_tokens(&lens, &groups) <= padded_tokens(&lens));
        }
    }
}
