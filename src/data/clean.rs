//! Cleaning web text: Unicode NFC, control characters, line-level boilerplate (navigation and
//! footer lines, lines that are mostly symbols or a date/timestamp, lines repeated across many
//! documents), a minimum length, and a language tag (English, Chinese or other).

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LineDrop {
    Navigation,
    Symbols,
    Timestamp,
    Repeated,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    En,
    Zh,
    Other,
}

impl Language {
    pub fn code(&self) -> &'static str {
        match self {
            Language::En => "en",
            Language::Zh => "zh",
            Language::Other => "other",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
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
    // Most text is already NFC; the quick check skips the costly recomposition.
    if unicode_normalization::is_nfc_quick(text.chars()) == unicode_normalization::IsNormalized::Yes
    {
        strip_controls(text)
    } else {
        strip_controls(&text.nfc().collect::<String>())
    }
}

/// Control characters other than tab removed, lines joined by `\n` with trailing spaces trimmed.
fn strip_controls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for (i, line) in text.lines().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let start = out.len();
        out.extend(line.chars().filter(|c| !c.is_control() || *c == '\t'));
        let kept = out[start..].trim_end().len();
        out.truncate(start + kept);
    }
    out
}

/// English, Chinese or other. The script is counted first (cheap); only text written mostly in
/// Latin letters needs whatlang's trigram model, and its first 600 bytes decide.
pub fn language_of(text: &str) -> Language {
    let (mut latin, mut han, mut kana, mut other) = (0usize, 0usize, 0usize, 0usize);
    for c in text.chars().filter(|c| c.is_alphabetic()).take(1000) {
        match c {
            'a'..='z' | 'A'..='Z' | '\u{c0}'..='\u{24f}' => latin += 1,
            '\u{4e00}'..='\u{9fff}' | '\u{3400}'..='\u{4dbf}' | '\u{f900}'..='\u{faff}' => han += 1,
            '\u{3040}'..='\u{30ff}' => kana += 1,
            _ => other += 1,
        }
    }
    let letters = latin + han + kana + other;
    if letters == 0 {
        return Language::Other;
    }
    if han * 2 > letters {
        // Japanese mixes kana into its Han characters; Chinese has none.
        return if kana * 20 < han {
            Language::Zh
        } else {
            Language::Other
        };
    }
    if latin * 2 <= letters {
        return Language::Other;
    }
    // English function words make up about half of running English text and almost none of
    // other languages' text; only unclear cases pay for whatlang (a fixed cost per call).
    let (mut words, mut common) = (0usize, 0usize);
    for w in text.split_whitespace().take(200) {
        words += 1;
        let w = w.trim_matches(|c: char| !c.is_alphanumeric());
        if w.len() <= 5 && is_english_function_word(&w.to_ascii_lowercase()) {
            common += 1;
        }
    }
    if words >= 20 {
        if common * 4 >= words {
            return Language::En;
        }
        if common * 20 <= words {
            return Language::Other;
        }
    }
    let mut cut = text.len().min(600);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    match whatlang::detect(&text[..cut]).map(|i| i.lang()) {
        Some(whatlang::Lang::Eng) => Language::En,
        _ => Language::Other,
    }
}

fn is_english_function_word(w: &str) -> bool {
    matches!(
        w,
        "the"
            | "of"
            | "and"
            | "to"
            | "a"
            | "in"
            | "is"
            | "it"
            | "you"
            | "that"
            | "he"
            | "was"
            | "for"
            | "on"
            | "are"
            | "with"
            | "as"
            | "i"
            | "his"
            | "they"
            | "be"
            | "at"
            | "one"
            | "have"
            | "this"
            | "from"
            | "or"
            | "had"
            | "by"
            | "but"
            | "not"
            | "what"
            | "all"
            | "were"
            | "we"
            | "when"
            | "your"
            | "can"
            | "said"
            | "there"
            | "use"
            | "an"
            | "each"
            | "which"
            | "she"
            | "do"
            | "how"
            | "their"
            | "if"
            | "will"
            | "up"
            | "other"
            | "about"
            | "out"
            | "many"
            | "then"
            | "them"
            | "these"
            | "so"
            | "some"
            | "her"
            | "would"
            | "make"
            | "like"
            | "him"
            | "into"
            | "time"
            | "has"
            | "look"
            | "two"
            | "more"
            | "go"
            | "see"
            | "no"
            | "way"
            | "could"
            | "my"
            | "than"
            | "been"
            | "who"
            | "its"
            | "now"
            | "did"
            | "get"
            | "made"
            | "may"
            | "very"
            | "after"
            | "our"
            | "me"
    )
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
#[derive(Clone, Debug, Default, Serialize)]
pub struct CleanStats {
    pub documents_in: usize,
    pub documents_out: usize,
    pub too_short: usize,
    pub dropped_lines: BTreeMap<LineDrop, usize>,
    pub languages: BTreeMap<String, usize>,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl CleanStats {
    /// Counts one cleaned document; returns its text when it is kept.
    pub fn count<'a>(&mut self, original_bytes: usize, c: &'a Cleaned) -> Option<&'a str> {
        self.documents_in += 1;
        self.bytes_in += original_bytes as u64;
        for (k, n) in &c.dropped_lines {
            *self.dropped_lines.entry(*k).or_default() += n;
        }
        match &c.text {
            Some(t) => {
                self.documents_out += 1;
                self.bytes_out += t.len() as u64;
                *self.languages.entry(c.language.code().into()).or_default() += 1;
                Some(t)
            }
            None => {
                self.too_short += 1;
                None
            }
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct CleanRun {
    #[serde(flatten)]
    pub io: super::StageIo,
    pub options: CleanOptions,
    #[serde(flatten)]
    pub stats: CleanStats,
}

/// Streams documents from files, cleans them block by block and writes the kept ones as JSONL
/// (`{"text", "lang"}`) under a temporary name renamed at the end, with `OUT.report.json` beside
/// it. Lines repeated across documents are counted within each block of [`super::CHUNK_BYTES`].
pub fn clean_files(
    inputs: &[std::path::PathBuf],
    read: &super::text::ReadOptions,
    out: &std::path::Path,
    opts: &CleanOptions,
) -> anyhow::Result<CleanRun> {
    let start = std::time::Instant::now();
    let mut stats = CleanStats::default();
    let summary = super::stream_to_jsonl(inputs, read, "clean", out, |docs| {
        let cleaned = clean_documents(&docs, opts);
        Ok(docs
            .iter()
            .zip(&cleaned)
            .filter_map(|(d, c)| {
                let t = stats.count(d.len(), c)?;
                Some(serde_json::json!({"text": t, "lang": c.language}))
            })
            .collect())
    })?;
    let run = CleanRun {
        io: super::StageIo::finish(inputs, out, summary, start),
        options: opts.clone(),
        stats,
    };
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
