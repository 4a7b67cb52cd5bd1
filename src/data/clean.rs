//! Cleaning web text: Unicode NFC, control characters, line-level boilerplate (navigation and
//! footer lines, lines that are mostly symbols or a date/timestamp, lines repeated across many
//! documents), a minimum length, and a language tag (English, Chinese or other).

use rayon::prelude::*;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use unicode_normalization::UnicodeNormalization;

#[derive(Clone, Debug, Serialize)]
pub struct CleanOptions {
    /// A line seen in at least this many documents is boilerplate.
    pub repeated_line_documents: usize,
    /// Documents shorter than this many characters after cleaning are dropped.
    pub min_chars: usize,
}

impl Default for CleanOptions {
    fn default() -> Self {
        CleanOptions {
            repeated_line_documents: 3,
            min_chars: 100,
        }
    }
}

/// Why a line was removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LineDrop {
    Navigation,
    Symbols,
    Timestamp,
    Repeated,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    En,
    Zh,
    Other,
}

#[derive(Clone, Debug, Serialize)]
pub struct Cleaned {
    /// None when the document was dropped as too short.
    pub text: Option<String>,
    pub language: Language,
    pub dropped_lines: BTreeMap<LineDrop, usize>,
}

const NAVIGATION: [&str; 16] = [
    "home",
    "about us",
    "contact us",
    "privacy policy",
    "terms of use",
    "terms of service",
    "all rights reserved",
    "copyright",
    "©",
    "subscribe",
    "sign in",
    "log in",
    "click here",
    "read more",
    "skip to content",
    "cookie",
];

/// Whether a short line looks like site navigation or a footer.
fn is_navigation(line: &str) -> bool {
    let lower = line.to_lowercase();
    let words = lower.split_whitespace().count();
    let separators = lower.matches(['|', '»', '›', '•']).count();
    if separators >= 2 && words <= 20 {
        return true;
    }
    words <= 12 && NAVIGATION.iter().any(|n| lower.contains(n))
}

/// Whether letters (of any script) are under a third of the non-space characters.
fn is_mostly_symbols(line: &str) -> bool {
    let chars: Vec<char> = line.chars().filter(|c| !c.is_whitespace()).collect();
    let letters = chars.iter().filter(|c| c.is_alphabetic()).count();
    !chars.is_empty() && letters * 3 < chars.len()
}

/// Whether a line is only a date or time stamp ("Posted on 12 March 2021, 10:45").
fn is_timestamp(line: &str) -> bool {
    const MONTHS: [&str; 12] = [
        "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
    ];
    let lower = line.to_lowercase();
    let words: Vec<&str> = lower.split_whitespace().collect();
    if words.is_empty() || words.len() > 8 {
        return false;
    }
    let digits = lower.chars().filter(|c| c.is_ascii_digit()).count();
    let has_clock = lower.contains(':') && digits >= 3;
    let has_date = words
        .iter()
        .any(|w| MONTHS.iter().any(|m| w.starts_with(m)))
        || lower.matches(['/', '-']).count() >= 2
        || lower.contains('年');
    digits >= 2 && (has_clock || has_date)
}

/// NFC, control characters other than newline and tab removed, trailing spaces trimmed.
pub fn normalise_text(text: &str) -> String {
    text.nfc()
        .filter(|c| !c.is_control() || *c == '\n' || *c == '\t')
        .collect::<String>()
        .lines()
        .map(|l| l.trim_end())
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn language_of(text: &str) -> Language {
    match whatlang::detect(text).map(|i| i.lang()) {
        Some(whatlang::Lang::Eng) => Language::En,
        Some(whatlang::Lang::Cmn) => Language::Zh,
        _ => Language::Other,
    }
}

/// Cleans a batch of documents; lines repeated across documents are counted over the batch.
pub fn clean_documents(docs: &[String], opts: &CleanOptions) -> Vec<Cleaned> {
    let normalised: Vec<String> = docs.par_iter().map(|d| normalise_text(d)).collect();
    // In how many documents each (trimmed, non-empty) line appears.
    let mut line_docs: HashMap<&str, usize> = HashMap::new();
    for d in &normalised {
        let unique: HashSet<&str> = d.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
        for l in unique {
            *line_docs.entry(l).or_default() += 1;
        }
    }
    normalised
        .par_iter()
        .map(|d| {
            let mut dropped: BTreeMap<LineDrop, usize> = BTreeMap::new();
            let mut kept = Vec::new();
            for line in d.lines() {
                let t = line.trim();
                if t.is_empty() {
                    kept.push("");
                    continue;
                }
                let why = if line_docs.get(t).copied().unwrap_or(0) >= opts.repeated_line_documents
                {
                    Some(LineDrop::Repeated)
                } else if is_navigation(t) {
                    Some(LineDrop::Navigation)
                } else if is_timestamp(t) {
                    Some(LineDrop::Timestamp)
                } else if is_mostly_symbols(t) {
                    Some(LineDrop::Symbols)
                } else {
                    None
                };
                match why {
                    Some(w) => *dropped.entry(w).or_default() += 1,
                    None => kept.push(line),
                }
            }
            let text = kept.join("\n");
            // Collapse the blank lines left where lines were removed.
            let text = text
                .split("\n\n")
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .collect::<Vec<_>>()
                .join("\n\n");
            let language = language_of(&text);
            Cleaned {
                text: (text.chars().count() >= opts.min_chars).then_some(text),
                language,
                dropped_lines: dropped,
            }
        })
        .collect()
}

/// What `chatforge data clean` reports.
#[derive(Clone, Debug, Serialize)]
pub struct CleanRun {
    pub inputs: Vec<std::path::PathBuf>,
    pub output: std::path::PathBuf,
    pub options: CleanOptions,
    pub documents_in: usize,
    pub documents_out: usize,
    pub too_short: usize,
    pub dropped_lines: BTreeMap<LineDrop, usize>,
    pub languages: BTreeMap<String, usize>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub seconds: f64,
    pub megabytes_per_second: f64,
}

/// Cleans documents from files and writes the kept ones as JSONL (`{"text", "lang"}`) under a
/// temporary name renamed at the end, with `OUT.report.json` beside it.
pub fn clean_files(
    inputs: &[std::path::PathBuf],
    format: super::text::DocFormat,
    text_field: &str,
    out: &std::path::Path,
    opts: &CleanOptions,
) -> anyhow::Result<CleanRun> {
    let start = std::time::Instant::now();
    let docs = super::text::read_all_documents(inputs, format, text_field)?;
    let cleaned = clean_documents(&docs, opts);
    let mut run = CleanRun {
        inputs: inputs.to_vec(),
        output: out.to_path_buf(),
        options: opts.clone(),
        documents_in: docs.len(),
        documents_out: 0,
        too_short: 0,
        dropped_lines: BTreeMap::new(),
        languages: BTreeMap::new(),
        bytes_in: docs.iter().map(|d| d.len() as u64).sum(),
        bytes_out: 0,
        seconds: 0.0,
        megabytes_per_second: 0.0,
    };
    crate::util::write_atomic_with(out, |tmp| {
        use std::io::Write;
        let mut w = std::io::BufWriter::new(std::fs::File::create(tmp)?);
        for c in &cleaned {
            for (k, n) in &c.dropped_lines {
                *run.dropped_lines.entry(*k).or_default() += n;
            }
            match &c.text {
                Some(t) => {
                    run.documents_out += 1;
                    run.bytes_out += t.len() as u64;
                    *run.languages
                        .entry(
                            serde_json::to_value(&c.language)?
                                .as_str()
                                .unwrap_or("?")
                                .into(),
                        )
                        .or_default() += 1;
                    writeln!(w, "{}", serde_json::json!({"text": t, "lang": c.language}))?;
                }
                None => run.too_short += 1,
            }
        }
        w.flush()?;
        Ok(())
    })?;
    run.seconds = start.elapsed().as_secs_f64();
    run.megabytes_per_second = run.bytes_in as f64 / 1e6 / run.seconds.max(1e-9);
    super::write_sidecar_report(out, &run)?;
    Ok(run)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ARTICLE: [&str; 4] = [
        "The river otter is a semiaquatic mammal native to North America. It lives along waterways and coasts, where it hunts fish, crayfish and frogs.",
        "Otters have thick fur that traps air and keeps them warm in cold water. A young otter learns to swim from its mother during its first summer.",
        "Populations declined sharply in the twentieth century because of trapping and pollution, but reintroduction programmes have restored them in many states.",
        "Today the species is listed as least concern, although local populations still suffer where rivers are polluted or dammed.",
    ];

    /// Paragraph `k` of page `i`'s article: every page has its own article.
    fn paragraph(k: usize, i: usize) -> String {
        format!("{} (Field report {i}, section {k}.)", ARTICLE[k])
    }

    /// An article with navigation, a timestamp, symbol rows and an unrelated news snippet that the
    /// site injects into every page.
    fn page(i: usize) -> String {
        format!(
            "Home | News | Sports | Weather | Contact Us\n\
             Posted on 12 March 2021, 10:4{}\n\
             {}\n\n{}\n\
             BREAKING: Stocks fell sharply on Tuesday as investors weighed new tariffs on imported steel.\n\
             {}\n\n{}\n\
             ====== *** ======\n\
             Copyright © 2021 Example Media. All rights reserved.\u{0007}\n",
            i % 10,
            paragraph(0, i),
            paragraph(1, i),
            paragraph(2, i),
            paragraph(3, i)
        )
    }

    #[test]
    fn boilerplate_lines_are_removed_and_the_article_kept() {
        let docs: Vec<String> = (0..5).map(page).collect();
        let out = clean_documents(&docs, &CleanOptions::default());
        for (i, c) in out.iter().enumerate() {
            let text = c.text.as_deref().expect("the article is long enough");
            for k in 0..ARTICLE.len() {
                let para = paragraph(k, i);
                assert!(text.contains(&para), "lost article text: {para}");
            }
            for noise in [
                "Home |",
                "Posted on",
                "BREAKING",
                "***",
                "Copyright",
                "\u{0007}",
            ] {
                assert!(!text.contains(noise), "kept {noise:?} in:\n{text}");
            }
            assert_eq!(c.language, Language::En);
            assert!(
                c.dropped_lines[&LineDrop::Repeated] >= 2,
                "{:?}",
                c.dropped_lines
            );
        }
        // The timestamp differs per page, so a rule (not repetition) catches it.
        assert_eq!(out[0].dropped_lines.get(&LineDrop::Timestamp), Some(&1));
    }

    #[test]
    fn nfc_short_documents_and_languages() {
        assert_eq!(normalise_text("cafe\u{301}\u{0}"), "café");
        let zh = "有一天，小明在河边遇到一只鸭子。鸭子看起来很饿。小明知道鸭子吃鱼，就拿来一些鱼。鸭子吃饱了，跟着小明回家。他们成了好朋友。".repeat(2);
        let out = clean_documents(
            &[zh, "Too short.".into()],
            &CleanOptions {
                min_chars: 40,
                ..Default::default()
            },
        );
        assert_eq!(out[0].language, Language::Zh);
        assert!(out[0].text.is_some());
        assert!(out[1].text.is_none());
    }
}
