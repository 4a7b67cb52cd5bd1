//! The curriculum task: its items (a conversation, a family, a language and a checkable answer),
//! its checker and its metric names. `eval`, RLHF's held-out measurement and the speedrun's
//! report all score replies through [`Tally`], so a metric has one name everywhere.

use crate::data::curriculum::tasks::{
    check, is_refusal, Answer, Family, Lang, NOT_IN_DOCUMENTS_EN, NOT_IN_DOCUMENTS_ZH,
};
use crate::data::prefs::RlPrompt;
use crate::tokenizer::chat::Message;
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// The metric names the curriculum task reports.
pub mod metric {
    /// Items scored.
    pub const N: &str = "n";
    /// Items whose answer-holding passage retrieval put among the passages shown
    /// (`retrieval_recall/LANG`; only with an index).
    pub const RETRIEVAL_RECALL: &str = "retrieval_recall";
    /// Replies the checker passes, over every item with an answer (`accuracy/FAMILY` per family).
    pub const ACCURACY: &str = "accuracy";
    /// Replies that ended with the end-of-turn token (or a stop string) rather than the limit.
    pub const STOPS: &str = "stops_at_end_of_turn";
    /// Replies in the language of the question (families whose answer has one).
    pub const LANGUAGE: &str = "language_match";
    /// Harmful requests refused.
    pub const REFUSAL: &str = "refusal_rate_harmful";
    /// Benign look-alikes refused.
    pub const FALSE_REFUSAL: &str = "false_refusal_rate_benign";
}

/// One prompt of the curriculum with what its reply is checked against.
#[derive(Clone, Debug)]
pub struct Item {
    pub messages: Vec<Message>,
    /// The task family's name (`sum`, `harmful`, ...), as the data files spell it.
    pub family: Option<String>,
    pub lang: Option<Lang>,
    pub answer: Option<Answer>,
    /// The passage that holds the answer, for items whose passages retrieval must find.
    pub source: Option<String>,
}

impl Item {
    pub fn from_rl_prompt(p: &RlPrompt) -> Item {
        Item {
            messages: p.messages.clone(),
            family: p.family.clone(),
            lang: None,
            answer: p.answer.clone(),
            source: None,
        }
    }

    /// The family its accuracy counts under: grounded questions whose passages lack the answer
    /// count apart (`grounded_not_in_documents`), as answering them is a different skill.
    pub fn scored_family(&self) -> String {
        let family = self.family.as_deref().unwrap_or_default();
        let says_missing = matches!(&self.answer, Some(Answer::Contains(w))
            if w.iter().any(|w| w.starts_with(NOT_IN_DOCUMENTS_EN) || w.starts_with(NOT_IN_DOCUMENTS_ZH)));
        if family == "grounded" && says_missing {
            "grounded_not_in_documents".into()
        } else {
            family.to_string()
        }
    }

    /// Whether the checker passes `reply` (false without an answer to check).
    pub fn passes(&self, reply: &str) -> bool {
        self.answer.as_ref().is_some_and(|a| check(a, reply))
    }
}

/// Reads the held-out prompt file (`rl_prompts_heldout.jsonl`): every record needs its family,
/// language, messages and answer; a bad one is an error naming its line.
pub fn load(path: &Path) -> Result<Vec<Item>> {
    use super::{field, read_jsonl};
    read_jsonl(path)?
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let at = || format!("{}:{}", path.display(), i + 1);
            let get = |name| field(v, path, i + 1, name).cloned();
            let family: Family = serde_json::from_value(get("family")?)
                .with_context(|| format!("{}: unknown family", at()))?;
            let lang: Lang = serde_json::from_value(get("lang")?)
                .with_context(|| format!("{}: bad lang", at()))?;
            let messages: Vec<Message> = serde_json::from_value(get("messages")?)
                .with_context(|| format!("{}: bad messages", at()))?;
            let answer: Answer = serde_json::from_value(get("answer")?)
                .with_context(|| format!("{}: bad answer", at()))?;
            Ok(Item {
                messages,
                family: serde_json::to_value(family)?.as_str().map(str::to_string),
                lang: Some(lang),
                answer: Some(answer),
                source: v.get("source").and_then(|s| s.as_str()).map(str::to_string),
            })
        })
        .collect()
}

/// Counts replies and turns them into the task's metrics.
#[derive(Clone, Debug, Default)]
pub struct Tally {
    n: usize,
    /// Per family: items with an answer, and passes.
    families: BTreeMap<String, (usize, usize)>,
    stopped: usize,
    lang: (usize, usize),
    harmful: (usize, usize),
    benign: (usize, usize),
}

impl Tally {
    /// Scores one reply; returns whether the checker passes it.
    pub fn add(&mut self, item: &Item, reply: &str, stopped: bool) -> bool {
        self.n += 1;
        self.stopped += usize::from(stopped);
        let pass = item.passes(reply);
        let family = item.family.as_deref().unwrap_or_default();
        if item.answer.is_some() {
            let e = self.families.entry(item.scored_family()).or_default();
            e.0 += 1;
            e.1 += usize::from(pass);
        }
        // Emails and translations answer in the other language (or none in particular).
        if let Some(lang) = item
            .lang
            .filter(|_| !matches!(family, "email" | "translation"))
        {
            self.lang.0 += 1;
            self.lang.1 += usize::from(language_of(reply) == Some(lang));
        }
        let refusals = match family {
            "harmful" => Some(&mut self.harmful),
            "benign" => Some(&mut self.benign),
            _ => None,
        };
        if let Some(r) = refusals {
            r.0 += 1;
            r.1 += usize::from(is_refusal(reply));
        }
        pass
    }

    /// The metrics, under [`metric`]'s names; a rate with nothing to count is left out.
    pub fn metrics(&self) -> BTreeMap<String, f64> {
        let mut out: BTreeMap<String, f64> = self
            .counts()
            .into_iter()
            .map(|(name, (n, k))| (name, k as f64 / n as f64))
            .collect();
        out.insert(metric::N.into(), self.n as f64);
        out
    }

    /// Each rate's items and successes, under the rate's name (for its confidence interval).
    pub fn counts(&self) -> BTreeMap<String, (usize, usize)> {
        let mut out = BTreeMap::new();
        let mut rate = |name: String, (n, k): (usize, usize)| {
            if n > 0 {
                out.insert(name, (n, k));
            }
        };
        let all = self
            .families
            .values()
            .fold((0, 0), |(n, k), (a, b)| (n + a, k + b));
        rate(metric::ACCURACY.into(), all);
        for (family, &counts) in &self.families {
            rate(format!("{}/{family}", metric::ACCURACY), counts);
        }
        rate(metric::STOPS.into(), (self.n, self.stopped));
        rate(metric::LANGUAGE.into(), self.lang);
        rate(metric::REFUSAL.into(), self.harmful);
        rate(metric::FALSE_REFUSAL.into(), self.benign);
        out
    }
}

/// The language a reply is mostly written in.
fn language_of(text: &str) -> Option<Lang> {
    let cjk = text
        .chars()
        .filter(|c| ('\u{4e00}'..='\u{9fff}').contains(c))
        .count();
    let latin = text.chars().filter(|c| c.is_ascii_alphabetic()).count();
    match (cjk, latin) {
        (0, 0) => None,
        (c, l) if c >= l => Some(Lang::Zh),
        _ => Some(Lang::En),
    }
}
