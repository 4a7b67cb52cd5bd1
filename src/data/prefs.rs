//! Preference data for reward models and DPO: responses to one prompt ranked best first. Reads
//! K-wise rankings (the curriculum's), `prompt`/`chosen`/`rejected` pairs (plain or TRL's
//! conversational form), ShareGPT DPO records and Anthropic HH full transcripts, detected per record.

use super::chat::{for_each_record, parse_messages, BadRecord};
use super::curriculum::tasks::Answer;
use crate::tokenizer::chat::{Message, Role};
use anyhow::{bail, Result};
use serde_json::Value;
use std::path::Path;

/// One prompt with two or more responses, best first.
#[derive(Clone, Debug, PartialEq)]
pub struct Comparison {
    /// The conversation up to the response (ends with a user turn).
    pub prompt: Vec<Message>,
    pub responses: Vec<String>,
    /// The curriculum's task family, when the record names one.
    pub family: Option<String>,
}

impl Comparison {
    /// Every (better, worse) index pair: K(K-1)/2 of them.
    pub fn pairs(&self) -> Vec<(usize, usize)> {
        let k = self.responses.len();
        (0..k)
            .flat_map(|i| (i + 1..k).map(move |j| (i, j)))
            .collect()
    }
}

#[derive(Debug)]
pub struct PrefFile {
    pub comparisons: Vec<Comparison>,
    pub bad: Vec<BadRecord>,
}

/// A prompt given as a string (one user turn) or as a message list.
fn prompt_of(v: &Value) -> Result<Vec<Message>, String> {
    match v {
        Value::String(s) => Ok(vec![Message::new(Role::User, s.clone())]),
        Value::Array(items) => parse_messages(items, "role", "content"),
        _ => Err("\"prompt\" must be a string or a list of messages".into()),
    }
}

/// A response given as a string, a `{"from","value"}`/`{"role","content"}` object, or a message
/// list whose last assistant turn is the response.
fn response_of(v: &Value, field: &str) -> Result<String, String> {
    let text = match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o
            .get("value")
            .or_else(|| o.get("content"))
            .and_then(|t| t.as_str())
            .map(String::from),
        Value::Array(items) => parse_messages(items, "role", "content")
            .ok()
            .and_then(|m| m.into_iter().rev().find(|m| m.role == Role::Assistant))
            .map(|m| m.content),
        _ => None,
    };
    text.ok_or_else(|| format!("\"{field}\" holds no response text"))
}

/// Splits an Anthropic HH transcript ("\n\nHuman: ...\n\nAssistant: ...") into messages.
fn hh_transcript(text: &str) -> Option<Vec<Message>> {
    let mut msgs: Vec<Message> = Vec::new();
    let mut rest = text;
    loop {
        let next_h = rest.find("\n\nHuman:");
        let next_a = rest.find("\n\nAssistant:");
        let (at, role, tag_len) = match (next_h, next_a) {
            (Some(h), Some(a)) if h < a => (h, Role::User, 8),
            (Some(h), None) => (h, Role::User, 8),
            (_, Some(a)) => (a, Role::Assistant, 12),
            (None, None) => break,
        };
        if let Some(last) = msgs.last_mut() {
            last.content = rest[..at].trim().to_string();
        }
        msgs.push(Message::new(role, String::new()));
        rest = &rest[at + tag_len..];
    }
    let last = msgs.last_mut()?;
    last.content = rest.trim().to_string();
    Some(msgs)
}

/// Converts one record to a comparison, or says what is wrong with it.
pub fn parse_preference(v: &Value) -> Result<Comparison, String> {
    let family = v.get("family").and_then(|f| f.as_str()).map(String::from);
    let (prompt, responses) = if let Some(list) = v.get("responses") {
        let prompt = prompt_of(v.get("prompt").ok_or("rankings need a \"prompt\"")?)?;
        let list = list.as_array().ok_or("\"responses\" must be a list")?;
        let responses = list
            .iter()
            .map(|r| response_of(r, "responses"))
            .collect::<Result<Vec<_>, _>>()?;
        (prompt, responses)
    } else {
        let (chosen, rejected) = match (v.get("chosen"), v.get("rejected")) {
            (Some(c), Some(r)) => (c, r),
            _ => {
                return Err(
                    "expected \"responses\" (a ranking) or \"chosen\" and \"rejected\" fields"
                        .into(),
                )
            }
        };
        let prompt = if let Some(p) = v.get("prompt") {
            prompt_of(p)?
        } else if let Some(conv) = v.get("conversations").and_then(|c| c.as_array()) {
            parse_messages(conv, "from", "value")?
        } else if let (Some(c), Some(r)) = (chosen.as_str(), rejected.as_str()) {
            // Anthropic HH: two full transcripts sharing everything but the last reply.
            let c = hh_transcript(c).ok_or("\"chosen\" is not a Human:/Assistant: transcript")?;
            let r = hh_transcript(r).ok_or("\"rejected\" is not a Human:/Assistant: transcript")?;
            let (cl, rl) = (c.last().expect("nonempty"), r.last().expect("nonempty"));
            if cl.role != Role::Assistant || rl.role != Role::Assistant {
                return Err("a transcript does not end with an Assistant: turn".into());
            }
            return finish(
                c[..c.len() - 1].to_vec(),
                vec![cl.content.clone(), rl.content.clone()],
                family,
            );
        } else {
            return Err("pairs need a \"prompt\" or \"conversations\" field".into());
        };
        (
            prompt,
            vec![
                response_of(chosen, "chosen")?,
                response_of(rejected, "rejected")?,
            ],
        )
    };
    finish(prompt, responses, family)
}

fn finish(
    prompt: Vec<Message>,
    responses: Vec<String>,
    family: Option<String>,
) -> Result<Comparison, String> {
    if prompt.last().map(|m| m.role) != Some(Role::User) {
        return Err("the prompt must end with a user turn".into());
    }
    if responses.len() < 2 {
        return Err("a comparison needs at least two responses".into());
    }
    Ok(Comparison {
        prompt,
        responses,
        family,
    })
}

/// Reads preference records from a JSONL or JSON-array file.
pub fn read_pref_file(path: &Path) -> Result<PrefFile> {
    let mut out = PrefFile {
        comparisons: Vec::new(),
        bad: Vec::new(),
    };
    for_each_record(
        path,
        "preference records",
        |loc, v| match parse_preference(v) {
            Ok(c) => out.comparisons.push(c),
            Err(reason) => out.bad.push(BadRecord {
                location: loc,
                reason,
            }),
        },
    )?;
    if out.comparisons.is_empty() {
        match out.bad.first() {
            Some(b) => bail!(
                "{} holds no usable preference records; {}: {}",
                path.display(),
                b.location,
                b.reason
            ),
            None => bail!("{} holds no preference records", path.display()),
        }
    }
    Ok(out)
}

/// A prompt for reinforcement learning, with the curriculum's checker answer when there is one
/// (used to measure, never shown to the policy).
#[derive(Clone, Debug)]
pub struct RlPrompt {
    pub messages: Vec<Message>,
    pub family: Option<String>,
    pub answer: Option<Answer>,
}

/// Reads RL prompts: `{"messages": [...]}` or `{"prompt": "..." | [...]}` records, optionally with
/// the curriculum's `answer` and `family`. A record that is not usable is an error naming it.
pub fn read_prompt_file(path: &Path) -> Result<Vec<RlPrompt>> {
    let mut out = Vec::new();
    let mut first_error: Option<String> = None;
    for_each_record(path, "prompts", |loc, v| {
        let messages = match (v.get("messages"), v.get("prompt")) {
            (Some(Value::Array(items)), _) => parse_messages(items, "role", "content"),
            (_, Some(p)) => prompt_of(p),
            _ => Err("no \"messages\" or \"prompt\" field".into()),
        };
        let answer = match v.get("answer") {
            Some(a) => serde_json::from_value::<Answer>(a.clone())
                .map(Some)
                .map_err(|e| format!("\"answer\" is not a curriculum answer ({e})")),
            None => Ok(None),
        };
        match (messages, answer) {
            (Ok(messages), Ok(answer)) if messages.last().map(|m| m.role) == Some(Role::User) => {
                out.push(RlPrompt {
                    messages,
                    family: v.get("family").and_then(|f| f.as_str()).map(String::from),
                    answer,
                })
            }
            (Ok(_), Ok(_)) => {
                first_error.get_or_insert(format!("{loc}: the prompt must end with a user turn"));
            }
            (Err(e), _) | (_, Err(e)) => {
                first_error.get_or_insert(format!("{loc}: {e}"));
            }
        }
    })?;
    if let Some(e) = first_error {
        bail!("{e}");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn four_formats_give_the_same_comparison() {
        let want = Comparison {
            prompt: vec![Message::new(Role::User, "hi")],
            responses: vec!["hello".into(), "go away".into()],
            family: None,
        };
        let records = [
            json!({"prompt": "hi", "chosen": "hello", "rejected": "go away"}),
            json!({"prompt": [{"role": "user", "content": "hi"}], "responses": ["hello", "go away"]}),
            json!({"conversations": [{"from": "human", "value": "hi"}],
                   "chosen": {"from": "gpt", "value": "hello"}, "rejected": {"from": "gpt", "value": "go away"}}),
            json!({"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}),
            json!({"prompt": [{"role": "user", "content": "hi"}],
                   "chosen": [{"role": "assistant", "content": "hello"}],
                   "rejected": [{"role": "assistant", "content": "go away"}]}),
        ];
        for r in &records {
            assert_eq!(parse_preference(r).unwrap(), want, "{r}");
        }
    }

    #[test]
    fn hh_transcripts_keep_earlier_turns_in_the_prompt() {
        let r = json!({"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: good",
                       "rejected": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: bad"});
        let c = parse_preference(&r).unwrap();
        assert_eq!(c.prompt.len(), 3);
        assert_eq!(c.prompt[1], Message::new(Role::Assistant, "b"));
        assert_eq!(c.responses, vec!["good", "bad"]);
    }

    #[test]
    fn rankings_give_all_pairs_and_bad_records_say_why() {
        let c = parse_preference(
            &json!({"prompt": "q", "responses": ["a", "b", "c", "d"], "family": "fact"}),
        )
        .unwrap();
        assert_eq!(c.pairs().len(), 6);
        assert_eq!(c.family.as_deref(), Some("fact"));
        assert!(parse_preference(&json!({"prompt": "q", "chosen": "a"}))
            .unwrap_err()
            .contains("\"chosen\" and \"rejected\""));
        assert!(
            parse_preference(&json!({"prompt": "q", "responses": ["a"]}))
                .unwrap_err()
                .contains("at least two")
        );
    }

    #[test]
    fn the_shared_dpo_demo_reads_completely() {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/data/prefs/dpo_en_demo.json");
        if !p.exists() {
            eprintln!("skipping: ../shared/data is absent");
            return;
        }
        let f = read_pref_file(&p).unwrap();
        assert_eq!(f.comparisons.len() + f.bad.len(), 300);
        assert!(f.comparisons.len() >= 290, "{:?}", f.bad.first());
    }
}
