//! Whether one stage answers the same held-out prompts better than another, beyond chance.
//!
//! Two stages are scored on the same prompts, so their verdicts pair up: only the prompts one
//! passes and the other fails say anything about a change. McNemar's exact test asks whether the
//! gained and lost prompts split more unevenly than a fair coin would split them. Comparing the
//! two rates' intervals instead would ignore the pairing and miss real changes.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// One family's verdicts before and after, paired by prompt.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PairedChange {
    pub prompts: usize,
    /// Failed before, passed after.
    pub gained: usize,
    /// Passed before, failed after.
    pub lost: usize,
}

impl PairedChange {
    /// The change in pass rate.
    pub fn delta(&self) -> f64 {
        (self.gained as f64 - self.lost as f64) / self.prompts.max(1) as f64
    }

    /// McNemar's exact two-sided p-value: the chance of a split at least this uneven between
    /// gained and lost prompts if each discordant prompt went either way with probability ½.
    pub fn p_value(&self) -> f64 {
        let n = self.gained + self.lost;
        let k = self.gained.min(self.lost);
        if n == 0 {
            return 1.0;
        }
        // Σ_{i ≤ k} C(n, i) / 2^n in logs, so that large n does not underflow.
        let mut ln_term = n as f64 * 0.5f64.ln();
        let mut terms = vec![ln_term];
        for i in 0..k {
            ln_term += ((n - i) as f64).ln() - ((i + 1) as f64).ln();
            terms.push(ln_term);
        }
        let max = terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let tail = max.exp() * terms.iter().map(|t| (t - max).exp()).sum::<f64>();
        (2.0 * tail).min(1.0)
    }

    /// "better" or "worse" when the test says so at the 5% level, else "no clear change".
    pub fn verdict(&self) -> &'static str {
        match (self.p_value() < 0.05, self.gained > self.lost) {
            (true, true) => "better",
            (true, false) => "worse",
            (false, _) => "no clear change",
        }
    }
}

/// Reads an answers file (`eval --answers`, one `{"family", "prompt", "pass", ...}` per line).
fn verdicts(path: &Path) -> Result<Vec<(String, String, bool)>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the answers file {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let v: Value = serde_json::from_str(l)
                .with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
            let Some(pass) = v["pass"].as_bool() else {
                bail!("{}:{}: the field `pass` is missing", path.display(), i + 1);
            };
            let family = v["family"].as_str().unwrap_or("?").to_string();
            let prompt = v["prompt"].as_str().unwrap_or_default().to_string();
            Ok((family, prompt, pass))
        })
        .collect()
}

/// The paired changes from `before` to `after`, per family and over all prompts (`all`). The
/// files must hold the same prompts in the same order.
pub fn compare(before: &Path, after: &Path) -> Result<BTreeMap<String, PairedChange>> {
    let (a, b) = (verdicts(before)?, verdicts(after)?);
    if a.len() != b.len() {
        bail!(
            "{} has {} answers and {} has {}; pair only evaluations of the same prompts",
            before.display(),
            a.len(),
            after.display(),
            b.len()
        );
    }
    let mut out: BTreeMap<String, PairedChange> = BTreeMap::new();
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        if (&x.0, &x.1) != (&y.0, &y.1) {
            bail!(
                "line {} asks different prompts in {} and {}",
                i + 1,
                before.display(),
                after.display()
            );
        }
        for key in [x.0.as_str(), "all"] {
            let c = out.entry(key.to_string()).or_default();
            c.prompts += 1;
            c.gained += usize::from(!x.2 && y.2);
            c.lost += usize::from(x.2 && !y.2);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(gained: usize, lost: usize) -> PairedChange {
        PairedChange {
            prompts: 200,
            gained,
            lost,
        }
    }

    /// Exact binomial tails: 10 gained and 0 lost is p = 2/1024; 9 against 1, 22/1024; an even
    /// split is 1; a large uneven split is tiny without underflowing to a wrong answer.
    #[test]
    fn mcnemar_p_values_are_the_exact_binomial_tails() {
        assert!((change(10, 0).p_value() - 2.0 / 1024.0).abs() < 1e-12);
        assert!((change(1, 9).p_value() - 22.0 / 1024.0).abs() < 1e-12);
        assert_eq!(change(5, 5).p_value(), 1.0);
        let big = change(700, 500).p_value();
        assert!(big > 0.0 && big < 1e-7, "{big}");
        assert_eq!(change(10, 0).verdict(), "better");
        assert_eq!(change(1, 9).verdict(), "worse");
        assert_eq!(change(6, 3).verdict(), "no clear change");
    }

    #[test]
    fn compare_pairs_prompts_and_refuses_different_ones() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, rows: &[(&str, &str, bool)]| {
            let p = dir.path().join(name);
            let text: Vec<String> = rows
                .iter()
                .map(|(f, q, pass)| {
                    serde_json::json!({"family": f, "prompt": q, "pass": pass}).to_string()
                })
                .collect();
            std::fs::write(&p, text.join("\n")).unwrap();
            p
        };
        let a = write(
            "a",
            &[
                ("fact", "q1", false),
                ("fact", "q2", true),
                ("sum", "q3", true),
            ],
        );
        let b = write(
            "b",
            &[
                ("fact", "q1", true),
                ("fact", "q2", true),
                ("sum", "q3", false),
            ],
        );
        let c = compare(&a, &b).unwrap();
        assert_eq!((c["fact"].gained, c["fact"].lost), (1, 0));
        assert_eq!((c["sum"].gained, c["sum"].lost), (0, 1));
        assert_eq!(
            (c["all"].prompts, c["all"].gained, c["all"].lost),
            (3, 1, 1)
        );
        let other = write(
            "c",
            &[
                ("fact", "q9", true),
                ("fact", "q2", true),
                ("sum", "q3", true),
            ],
        );
        let e = compare(&a, &other).unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
        let short = write("d", &[("fact", "q1", true)]);
        assert!(compare(&a, &short).is_err());
    }
}
