//! Function calling (OpenAI's `tools`, `tool_choice`, `tool_calls` and `tool` messages) for any
//! model, in the Hermes convention that Qwen and Hermes models are trained on: the tools'
//! signatures go into the system message, a call is `<tool_call>{"name", "arguments"}</tool_call>`
//! in the reply, and a result comes back as `<tool_response>…</tool_response>` in a user turn.
//! A model whose own chat template reads `tools` gets the list there instead, laid out as it was
//! trained on (`tokenizer::chat::render_with_tools`).
//!
//! `tool_choice: "required"` or a named function binds the reply with a grammar (the decoding
//! core's `response_format` machinery), so even a model never trained on tools calls one with
//! arguments that match its schema. With `"auto"` the model decides, and its reply is read for
//! calls in that format or as a bare `{"name", "arguments"|"parameters"}` object (Llama 3's).

use crate::infer::grammar::Grammar;
use serde_json::{json, Value};

pub const CALL_START: &str = "<tool_call>";
pub const CALL_END: &str = "</tool_call>";

/// A function the client offers.
#[derive(Clone, Debug, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: String,
    /// JSON schema of the arguments object.
    pub parameters: Value,
}

/// Whether and how the model must call.
#[derive(Clone, Debug, PartialEq)]
pub enum ToolChoice {
    None,
    Auto,
    Required,
    Named(String),
}

/// A call read from a reply.
#[derive(Clone, Debug, PartialEq)]
pub struct Call {
    pub name: String,
    /// The arguments as a JSON text, as OpenAI sends them.
    pub arguments: String,
}

/// The request's tools and choice; errors name the field and say what is wrong.
pub fn parse(
    tools: &Option<Value>,
    choice: &Option<Value>,
) -> Result<(Vec<Tool>, ToolChoice), (&'static str, String)> {
    let mut out = Vec::new();
    let listed = tools.as_ref().filter(|v| !v.is_null());
    for (i, t) in listed
        .map(|v| {
            v.as_array()
                .ok_or(("tools", "tools must be a list".to_string()))
        })
        .transpose()?
        .into_iter()
        .flatten()
        .enumerate()
    {
        let f = &t["function"];
        if t["type"] != "function" || !f.is_object() {
            return Err((
                "tools",
                format!("tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}"),
            ));
        }
        let Some(name) = f["name"].as_str().filter(|n| !n.is_empty()) else {
            return Err(("tools", format!("tools[{i}].function needs a \"name\"")));
        };
        let parameters = match &f["parameters"] {
            Value::Null => json!({"type": "object", "properties": {}}),
            p if p.is_object() => p.clone(),
            _ => {
                return Err((
                    "tools",
                    format!("tools[{i}].function.parameters must be a JSON schema object"),
                ))
            }
        };
        out.push(Tool {
            name: name.to_string(),
            description: f["description"].as_str().unwrap_or_default().to_string(),
            parameters,
        });
    }
    let choice = match choice.as_ref().filter(|v| !v.is_null()) {
        None if out.is_empty() => ToolChoice::None,
        None => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err((
                    "tool_choice",
                    format!("tool_choice {other:?} is not one of \"none\", \"auto\", \"required\""),
                ))
            }
        },
        Some(v) => match v["function"]["name"].as_str() {
            Some(name) if v["type"] == "function" => ToolChoice::Named(name.to_string()),
            _ => {
                return Err((
                    "tool_choice",
                    "tool_choice must be a string or {\"type\": \"function\", \"function\": {\"name\": ...}}".into(),
                ))
            }
        },
    };
    match &choice {
        ToolChoice::Required | ToolChoice::Named(_) if out.is_empty() => {
            return Err((
                "tool_choice",
                "tool_choice asks for a call but no tools were given".into(),
            ))
        }
        ToolChoice::Named(name) if !out.iter().any(|t| &t.name == name) => {
            return Err((
                "tool_choice",
                format!("tool_choice names {name:?}, which is not among the tools"),
            ))
        }
        _ => {}
    }
    Ok((out, choice))
}

/// The tools as OpenAI lists them, for a chat template that lays them out itself.
pub fn as_openai(tools: &[Tool]) -> Value {
    tools
        .iter()
        .map(|t| {
            json!({"type": "function", "function": {
                "name": t.name, "description": t.description, "parameters": t.parameters}})
        })
        .collect()
}

/// What the system message says about the tools (the Hermes convention's content).
pub fn system_text(tools: &[Tool]) -> String {
    let listed = as_openai(tools);
    let signatures: Vec<String> = listed
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| t.to_string())
        .collect();
    format!(
        "You can call functions to help with the user's request. Their signatures, one per line, \
         between <tools> and </tools>:\n<tools>\n{}\n</tools>\n\nTo call one, reply with a JSON \
         object holding the function's name and its arguments between {CALL_START} and \
         {CALL_END}:\n{CALL_START}\n{{\"name\": \"function name\", \"arguments\": {{...}}}}\n{CALL_END}",
        signatures.join("\n")
    )
}

/// An earlier assistant call as the model wrote it.
pub fn call_text(name: &str, arguments: &str) -> String {
    let arguments: Value =
        serde_json::from_str(arguments).unwrap_or(Value::String(arguments.into()));
    format!(
        "{CALL_START}\n{}\n{CALL_END}",
        json!({"name": name, "arguments": arguments})
    )
}

/// A tool's result as the user turn that carries it back.
pub fn response_text(content: &str) -> String {
    format!("<tool_response>\n{content}\n</tool_response>")
}

/// The grammar that makes the reply one call (of the named tool, or of any of them).
pub fn grammar(tools: &[Tool], choice: &ToolChoice) -> Option<Grammar> {
    let allowed: Vec<&Tool> = match choice {
        ToolChoice::Required => tools.iter().collect(),
        ToolChoice::Named(name) => tools.iter().filter(|t| &t.name == name).collect(),
        ToolChoice::None | ToolChoice::Auto => return None,
    };
    let calls: Vec<Value> = allowed
        .iter()
        .map(|t| {
            json!({"type": "object",
                   "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                   "required": ["name", "arguments"], "additionalProperties": false})
        })
        .collect();
    let mut schema = match calls.len() {
        1 => calls[0].clone(),
        _ => json!({ "anyOf": calls }),
    };
    // One call in the compact form the convention shows, without stray whitespace.
    schema["x-guidance"] =
        json!({"whitespace_flexible": false, "key_separator": ": ", "item_separator": ", "});
    Some(Grammar::Lark(format!(
        "start: {:?} call {:?}\ncall: %json {}",
        format!("{CALL_START}\n"),
        format!("\n{CALL_END}"),
        schema
    )))
}

/// The calls in a reply, and the text around them (`None` when there is none).
pub fn extract(text: &str, tools: &[Tool]) -> (Option<String>, Vec<Call>) {
    let mut calls = Vec::new();
    let mut rest_text = String::new();
    let mut rest = text;
    while let Some(at) = rest.find(CALL_START) {
        let after = &rest[at + CALL_START.len()..];
        let Some(end) = after.find(CALL_END) else {
            break;
        };
        match read_call(after[..end].trim(), tools) {
            Some(call) => {
                rest_text.push_str(&rest[..at]);
                calls.push(call);
            }
            None => rest_text.push_str(&rest[..at + CALL_START.len() + end + CALL_END.len()]),
        }
        rest = &after[end + CALL_END.len()..];
    }
    rest_text.push_str(rest);
    if calls.is_empty() {
        // Llama 3's style: the whole reply is one call object.
        if let Some(call) = read_call(text.trim(), tools) {
            return (None, vec![call]);
        }
    }
    let content = rest_text.trim();
    ((!content.is_empty()).then(|| content.to_string()), calls)
}

/// `{"name": ..., "arguments" | "parameters": {...}}` naming one of the tools.
fn read_call(text: &str, tools: &[Tool]) -> Option<Call> {
    let v: Value = serde_json::from_str(text).ok()?;
    let name = v["name"].as_str()?;
    if !tools.iter().any(|t| t.name == name) {
        return None;
    }
    let arguments = match v.get("arguments").or_else(|| v.get("parameters")) {
        Some(Value::String(s)) => s.clone(),
        Some(a) => a.to_string(),
        None => "{}".into(),
    };
    Some(Call {
        name: name.to_string(),
        arguments,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Vec<Tool> {
        let (tools, _) = parse(
            &Some(
                json!([{"type": "function", "function": {"name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                               "required": ["city"]}}}]),
            ),
            &None,
        )
        .unwrap();
        tools
    }

    #[test]
    fn calls_are_read_in_both_styles_and_unknown_names_stay_text() {
        let tools = weather();
        let (content, calls) = extract(
            "Let me look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
            &tools,
        );
        assert_eq!(content.as_deref(), Some("Let me look."));
        assert_eq!(
            calls,
            [Call {
                name: "get_weather".into(),
                arguments: r#"{"city":"Paris"}"#.into()
            }]
        );
        let (content, calls) = extract(
            r#"{"name": "get_weather", "parameters": {"city": "Oslo"}}"#,
            &tools,
        );
        assert_eq!((content, calls.len()), (None, 1));
        let text = "<tool_call>{\"name\": \"rm_rf\", \"arguments\": {}}</tool_call>";
        let (content, calls) = extract(text, &tools);
        assert!(calls.is_empty());
        assert_eq!(content.as_deref(), Some(text));
        // A call written back into history reads as the same call.
        let again = call_text("get_weather", r#"{"city":"Paris"}"#);
        assert_eq!(
            extract(&again, &tools).1[0].arguments,
            r#"{"city":"Paris"}"#
        );
    }

    #[test]
    fn tool_choice_is_checked_against_the_tools() {
        let tools = Some(json!([{"type": "function", "function": {"name": "f"}}]));
        assert_eq!(parse(&tools, &None).unwrap().1, ToolChoice::Auto);
        assert_eq!(parse(&None, &None).unwrap().1, ToolChoice::None);
        let named = Some(json!({"type": "function", "function": {"name": "f"}}));
        assert_eq!(
            parse(&tools, &named).unwrap().1,
            ToolChoice::Named("f".into())
        );
        for (t, c) in [
            (tools.clone(), Some(json!("sometimes"))),
            (
                tools.clone(),
                Some(json!({"type": "function", "function": {"name": "g"}})),
            ),
            (None, Some(json!("required"))),
            (Some(json!([{"type": "function", "function": {}}])), None),
            (Some(json!({"name": "f"})), None),
        ] {
            assert!(parse(&t, &c).is_err(), "{t:?} {c:?}");
        }
        assert!(grammar(&weather(), &ToolChoice::Auto).is_none());
        assert!(matches!(
            grammar(&weather(), &ToolChoice::Required),
            Some(Grammar::Lark(_))
        ));
    }
}
