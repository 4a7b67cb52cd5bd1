//! Conversation data for instruction tuning: OpenAI `messages`, Alpaca and ShareGPT records, in
//! JSONL or JSON-array files, detected per record or chosen with `--format`.

use crate::tokenizer::chat::{Message, Role};
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
pub enum ChatFormat {
    /// Decide per record from its fields.
    Auto,
    /// `{"messages": [{"role", "content"}]}` (OpenAI).
    Messages,
    /// `{"instruction", "input", "output"}` with optional `system` and `history`.
    Alpaca,
    /// `{"conversations": [{"from", "value"}]}`.
    Sharegpt,
}

/// A record that could not be used, with where it is and why.
#[derive(Clone, Debug)]
pub struct BadRecord {
    pub location: String,
    pub reason: String,
}

/// The conversations of a file and the records that were unusable.
#[derive(Debug)]
pub struct ChatFile {
    pub conversations: Vec<Vec<Message>>,
    pub bad: Vec<BadRecord>,
}

fn text_of(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        // OpenAI content parts: [{"type": "text", "text": "..."}]
        Value::Array(parts) => Some(
            parts
                .iter()
                .filter_map(|p| p.get("text").and_then(|t| t.as_str()))
                .collect::<Vec<_>>()
                .join(""),
        ),
        _ => None,
    }
}

fn parse_role(name: &str) -> Option<Role> {
    match name {
        "system" | "developer" => Some(Role::System),
        "user" | "human" => Some(Role::User),
        "assistant" | "gpt" | "chatgpt" | "bot" | "model" => Some(Role::Assistant),
        "document" => Some(Role::Document),
        _ => None,
    }
}

/// Converts a list of `{role_key, text_key}` objects to messages (OpenAI or ShareGPT style).
pub fn parse_messages(
    items: &[Value],
    role_key: &str,
    text_key: &str,
) -> std::result::Result<Vec<Message>, String> {
    let mut msgs = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let role_name = item
            .get(role_key)
            .and_then(|r| r.as_str())
            .ok_or_else(|| format!("message {}: no \"{role_key}\"", i + 1))?;
        let role = parse_role(role_name).ok_or_else(|| {
            format!(
                "message {}: unknown role \"{role_name}\" (expected system, user or assistant)",
                i + 1
            )
        })?;
        let content = item
            .get(text_key)
            .and_then(text_of)
            .ok_or_else(|| format!("message {}: no text in \"{text_key}\"", i + 1))?;
        msgs.push(Message::new(role, content));
    }
    Ok(msgs)
}

/// Converts one record to a conversation, or says what is wrong with it.
pub fn parse_record(v: &Value, format: ChatFormat) -> std::result::Result<Vec<Message>, String> {
    let format = match format {
        ChatFormat::Auto => {
            if v.get("messages").is_some() {
                ChatFormat::Messages
            } else if v.get("conversations").is_some() {
                ChatFormat::Sharegpt
            } else if v.get("instruction").is_some() {
                ChatFormat::Alpaca
            } else {
                return Err(
                    "no \"messages\", \"conversations\" or \"instruction\" field; see --format"
                        .into(),
                );
            }
        }
        f => f,
    };
    let mut msgs = Vec::new();
    match format {
        ChatFormat::Messages | ChatFormat::Sharegpt => {
            let (list, role_key, text_key) = if format == ChatFormat::Messages {
                ("messages", "role", "content")
            } else {
                ("conversations", "from", "value")
            };
            let items = v
                .get(list)
                .and_then(|m| m.as_array())
                .ok_or_else(|| format!("\"{list}\" is missing or not a list"))?;
            msgs = parse_messages(items, role_key, text_key)?;
        }
        ChatFormat::Alpaca => {
            let field = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_string();
            if let Some(sys) = v
                .get("system")
                .and_then(|s| s.as_str())
                .filter(|s| !s.is_empty())
            {
                msgs.push(Message::new(Role::System, sys));
            }
            if let Some(history) = v.get("history").and_then(|h| h.as_array()) {
                for pair in history {
                    let pair = pair
                        .as_array()
                        .filter(|p| p.len() == 2)
                        .ok_or("\"history\" entries must be [question, answer] pairs")?;
                    msgs.push(Message::new(Role::User, pair[0].as_str().unwrap_or("")));
                    msgs.push(Message::new(
                        Role::Assistant,
                        pair[1].as_str().unwrap_or(""),
                    ));
                }
            }
            let (instruction, input) = (field("instruction"), field("input"));
            let user = if input.trim().is_empty() {
                instruction
            } else {
                format!("{instruction}\n\n{input}")
            };
            msgs.push(Message::new(Role::User, user));
            msgs.push(Message::new(Role::Assistant, field("output")));
        }
        ChatFormat::Auto => unreachable!("resolved above"),
    }
    if !msgs
        .iter()
        .any(|m| m.role == Role::Assistant && !m.content.trim().is_empty())
    {
        return Err("no assistant turn to learn from".into());
    }
    Ok(msgs)
}

/// Calls `take(location, record)` for each record of a `.jsonl` file (one per line) or a `.json`
/// file (an array). `what` names the records in errors ("conversations").
pub fn for_each_record(
    path: &Path,
    what: &str,
    mut take: impl FnMut(String, &Value),
) -> Result<()> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read {what} file {}", path.display()))?;
    if text.trim().is_empty() {
        bail!("{} is empty: it holds no {what}", path.display());
    }
    if text.trim_start().starts_with('[') {
        let records: Vec<Value> = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a valid JSON array of records", path.display()))?;
        for (i, r) in records.iter().enumerate() {
            take(format!("{} record {}", path.display(), i + 1), r);
        }
    } else {
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(line).map_err(|e| {
                anyhow::anyhow!("{}:{}: not valid JSON ({e})", path.display(), i + 1)
            })?;
            take(format!("{}:{}", path.display(), i + 1), &v);
        }
    }
    Ok(())
}

/// Reads a `.jsonl` file (one record per line) or a `.json` file (an array of records).
pub fn read_chat_file(path: &Path, format: ChatFormat) -> Result<ChatFile> {
    let mut out = ChatFile {
        conversations: Vec::new(),
        bad: Vec::new(),
    };
    for_each_record(path, "conversations", |loc, v| {
        match parse_record(v, format) {
            Ok(c) => out.conversations.push(c),
            Err(reason) => out.bad.push(BadRecord {
                location: loc,
                reason,
            }),
        }
    })?;
    if out.conversations.is_empty() && out.bad.is_empty() {
        bail!("{} holds no conversations", path.display());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn three_formats_become_the_same_conversation() {
        let m = json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]});
        let s = json!({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]});
        let a = json!({"instruction": "hi", "input": "", "output": "hello"});
        let expected = vec![
            Message::new(Role::User, "hi"),
            Message::new(Role::Assistant, "hello"),
        ];
        for r in [m, s, a] {
            assert_eq!(parse_record(&r, ChatFormat::Auto).unwrap(), expected);
        }
        let a = json!({"instruction": "Translate", "input": "cat", "output": "猫", "system": "s"});
        let c = parse_record(&a, ChatFormat::Alpaca).unwrap();
        assert_eq!(c[0], Message::new(Role::System, "s"));
        assert_eq!(c[1].content, "Translate\n\ncat");
    }

    #[test]
    fn bad_records_say_why() {
        let no_assistant = json!({"messages": [{"role": "user", "content": "hi"}]});
        assert!(parse_record(&no_assistant, ChatFormat::Auto)
            .unwrap_err()
            .contains("no assistant turn"));
        let unknown = json!({"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]});
        let e = parse_record(&unknown, ChatFormat::Auto).unwrap_err();
        assert!(
            e.contains("unknown role \"wizard\"") && e.contains("message 1"),
            "{e}"
        );
        assert!(parse_record(&json!({"text": "x"}), ChatFormat::Auto)
            .unwrap_err()
            .contains("--format"));
    }

    #[test]
    fn files_report_bad_records_by_location_and_empty_files_fail() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.jsonl");
        std::fs::write(
            &p,
            "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}]}\n\
             {\"messages\": [{\"role\": \"user\", \"content\": \"a\"}]}\n",
        )
        .unwrap();
        let f = read_chat_file(&p, ChatFormat::Auto).unwrap();
        assert_eq!(f.conversations.len(), 1);
        assert_eq!(f.bad.len(), 1);
        assert!(f.bad[0].location.ends_with("c.jsonl:2"));
        let e = dir.path().join("e.json");
        std::fs::write(&e, "  \n").unwrap();
        assert!(read_chat_file(&e, ChatFormat::Auto)
            .unwrap_err()
            .to_string()
            .contains("empty"));
    }
}
