//! The OpenAI wire format: request bodies (lenient about fields we do not use, strict about the
//! ones we do), responses, stream chunks and errors.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// `content` is a string or, in newer clients, a list of parts of which we read the text ones.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Clone, Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

impl Content {
    pub fn text(&self) -> Result<String, String> {
        match self {
            Content::Text(t) => Ok(t.clone()),
            Content::Parts(parts) => parts
                .iter()
                .map(|p| match (&*p.kind, &p.text) {
                    ("text", Some(t)) => Ok(t.clone()),
                    (kind, _) => Err(format!(
                        "content parts of type {kind:?} are not supported; send text"
                    )),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(|v| v.join("")),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
    /// An assistant turn's calls: `[{"id", "type": "function", "function": {"name", "arguments"}}]`.
    #[serde(default)]
    pub tool_calls: Option<Vec<Value>>,
}

/// One string or a list of them (`stop`, and `prompt` of the completions endpoint).
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// What both endpoints share.
#[derive(Clone, Debug, Deserialize)]
pub struct Sampling {
    pub model: String,
    pub max_tokens: Option<u64>,
    /// The newer name for `max_tokens`.
    pub max_completion_tokens: Option<u64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// Not in OpenAI's API, but llama.cpp and vLLM accept it.
    pub top_k: Option<u64>,
    pub stop: Option<OneOrMany>,
    pub seed: Option<u64>,
    pub n: Option<u64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    /// Token id (as a string) → bias added to its logit, -100 to 100.
    pub logit_bias: Option<std::collections::HashMap<String, f32>>,
    /// Chat: `true` to report each token's log-probability. Completions: how many alternatives.
    pub logprobs: Option<Value>,
    /// Chat: how many alternatives per token (0 to 20), with `logprobs: true`.
    pub top_logprobs: Option<Value>,
    /// `{"type": "text" | "json_object" | "json_schema", "json_schema": {"schema": ...}}`.
    pub response_format: Option<Value>,
    /// Functions the model may call (chat only): `[{"type": "function", "function": {...}}]`.
    pub tools: Option<Value>,
    /// `"none"`, `"auto"`, `"required"` or `{"type": "function", "function": {"name"}}`.
    pub tool_choice: Option<Value>,
    /// Fields of OpenAI's API this server does not implement yet. They are read only so that a
    /// request using them is refused by name instead of answered as if they were honoured.
    #[serde(flatten)]
    pub unsupported: Unsupported,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Unsupported {
    pub functions: Option<Value>,
    pub function_call: Option<Value>,
}

impl Unsupported {
    /// The first field given that would change the reply, with what to do instead.
    pub fn first(&self) -> Option<(&'static str, &'static str)> {
        let given = |v: &Option<Value>| v.as_ref().is_some_and(|v| !v.is_null());
        [
            (
                given(&self.functions),
                "functions",
                "the legacy functions field is not supported; send tools",
            ),
            (
                given(&self.function_call),
                "function_call",
                "the legacy function_call field is not supported; send tool_choice",
            ),
        ]
        .into_iter()
        .find(|(on, _, _)| *on)
        .map(|(_, field, why)| (field, why))
    }
}

#[derive(Clone, Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

#[derive(Clone, Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: OneOrMany,
    #[serde(flatten)]
    pub sampling: Sampling,
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Usage {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`.
pub fn error_body(message: &str, kind: &str, param: Option<&str>, code: Option<&str>) -> Value {
    json!({"error": {"message": message, "type": kind, "param": param, "code": code}})
}

/// The grammar `response_format` asks for: none for text, any JSON object for `json_object`, the
/// schema of `json_schema`. The error says what is wrong.
pub fn requested_grammar(
    response_format: &Option<Value>,
) -> Result<Option<crate::infer::grammar::Grammar>, String> {
    use crate::infer::grammar::Grammar;
    let Some(format) = response_format.as_ref().filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Grammar::JsonSchema(json!({"type": "object"})))),
        Some("json_schema") => match format.get("json_schema").and_then(|j| j.get("schema")) {
            Some(schema) => Ok(Some(Grammar::JsonSchema(schema.clone()))),
            None => Err(
                "response_format json_schema needs {\"json_schema\": {\"name\": ..., \"schema\": {...}}}"
                    .into(),
            ),
        },
        _ => Err(format!(
            "response_format type must be \"text\", \"json_object\" or \"json_schema\", got {}",
            format.get("type").unwrap_or(&Value::Null)
        )),
    }
}

/// What `logprobs` and `top_logprobs` ask for: `None` for no log-probabilities, else how many
/// alternatives per token. Chat takes `logprobs: true` with `top_logprobs: N`; completions take
/// `logprobs: N`. The error names the field and the fix.
pub fn requested_logprobs(
    chat: bool,
    logprobs: &Option<Value>,
    top_logprobs: &Option<Value>,
) -> Result<Option<usize>, (&'static str, String)> {
    use crate::infer::sampler::MAX_TOP_LOGPROBS;
    let count = |field: &'static str, v: &Value| match v.as_u64() {
        Some(n) if n as usize <= MAX_TOP_LOGPROBS => Ok(n as usize),
        _ => Err((
            field,
            format!("{field} must be an integer from 0 to {MAX_TOP_LOGPROBS}, got {v}"),
        )),
    };
    let logprobs = logprobs.as_ref().filter(|v| !v.is_null());
    let top = top_logprobs.as_ref().filter(|v| !v.is_null());
    if !chat {
        if top.is_some() {
            return Err((
                "top_logprobs",
                "top_logprobs is for chat completions; on /v1/completions send logprobs: N".into(),
            ));
        }
        return logprobs.map(|v| count("logprobs", v)).transpose();
    }
    let on = match logprobs {
        None | Some(Value::Bool(false)) => false,
        Some(Value::Bool(true)) => true,
        Some(v) => {
            return Err((
                "logprobs",
                format!("logprobs must be true or false, got {v}; the number of alternatives goes in top_logprobs"),
            ))
        }
    };
    match (on, top) {
        (false, None) => Ok(None),
        (false, Some(_)) => Err(("top_logprobs", "top_logprobs needs logprobs: true".into())),
        (true, top) => Ok(Some(
            top.map(|v| count("top_logprobs", v))
                .transpose()?
                .unwrap_or(0),
        )),
    }
}

/// Log-probabilities in the shape of the endpoint: chat's `{"content": [{token, logprob, bytes,
/// top_logprobs}]}`, or the completions API's `{tokens, token_logprobs, top_logprobs,
/// text_offset}`. `offset` is the reply's length in characters so far (for `text_offset`) and
/// moves past these tokens.
pub fn logprobs_json(
    chat: bool,
    tokenizer: &crate::tokenizer::Tokenizer,
    tokens: &[crate::infer::decode::TokenLogprob],
    offset: &mut usize,
) -> Value {
    let piece = |id: u32| {
        let bytes = tokenizer.piece_bytes(id);
        (String::from_utf8_lossy(&bytes).into_owned(), bytes)
    };
    if chat {
        let content: Vec<Value> = tokens
            .iter()
            .map(|t| {
                let (token, bytes) = piece(t.id);
                let top: Vec<Value> = t
                    .top
                    .iter()
                    .map(|&(id, lp)| {
                        let (token, bytes) = piece(id);
                        json!({"token": token, "logprob": lp, "bytes": bytes})
                    })
                    .collect();
                json!({"token": token, "logprob": t.logprob, "bytes": bytes, "top_logprobs": top})
            })
            .collect();
        return json!({"content": content, "refusal": null});
    }
    let (mut names, mut lps, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
    for t in tokens {
        let (token, _) = piece(t.id);
        offsets.push(*offset);
        *offset += token.chars().count();
        names.push(token);
        lps.push(t.logprob);
        let top: serde_json::Map<String, Value> = t
            .top
            .iter()
            .map(|&(id, lp)| (piece(id).0, json!(lp)))
            .collect();
        tops.push(Value::Object(top));
    }
    json!({"tokens": names, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
}

#[cfg(test)]
mod tests {
    use super::requested_logprobs;
    use serde_json::{json, Value};

    #[test]
    fn logprobs_requests_follow_each_endpoint() {
        let ask = |chat: bool, lp: Value, top: Value| {
            let some = |v: Value| (!v.is_null()).then_some(v);
            requested_logprobs(chat, &some(lp), &some(top))
        };
        assert_eq!(ask(true, Value::Null, Value::Null), Ok(None));
        assert_eq!(ask(true, json!(false), Value::Null), Ok(None));
        assert_eq!(ask(true, json!(true), Value::Null), Ok(Some(0)));
        assert_eq!(ask(true, json!(true), json!(5)), Ok(Some(5)));
        assert_eq!(ask(false, json!(3), Value::Null), Ok(Some(3)));
        for (chat, lp, top, field) in [
            (true, json!(2), Value::Null, "logprobs"),
            (true, Value::Null, json!(2), "top_logprobs"),
            (true, json!(true), json!(21), "top_logprobs"),
            (true, json!(true), json!(-1), "top_logprobs"),
            (false, json!(true), Value::Null, "logprobs"),
            (false, json!(2), json!(2), "top_logprobs"),
        ] {
            let err = ask(chat, lp.clone(), top.clone()).unwrap_err();
            assert_eq!(err.0, field, "{lp} {top}: {}", err.1);
        }
    }
}
