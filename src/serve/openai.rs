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
    /// Fields of OpenAI's API this server does not implement yet. They are read only so that a
    /// request using them is refused by name instead of answered as if they were honoured.
    #[serde(flatten)]
    pub unsupported: Unsupported,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Unsupported {
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    pub functions: Option<Value>,
    pub function_call: Option<Value>,
    pub logprobs: Option<Value>,
    pub top_logprobs: Option<Value>,
    pub response_format: Option<Value>,
}

impl Unsupported {
    /// The first field given that would change the reply, with what to do instead.
    pub fn first(&self) -> Option<(&'static str, &'static str)> {
        let given = |v: &Option<Value>| v.as_ref().is_some_and(|v| !v.is_null());
        let off = [Value::Bool(false), Value::from(0)];
        let not_off = |v: &Option<Value>| given(v) && !v.as_ref().is_some_and(|v| off.contains(v));
        let plain_text = self
            .response_format
            .as_ref()
            .is_none_or(|f| f.is_null() || f["type"] == "text");
        [
            (given(&self.tools), "tools", "function calling is not supported yet; send the request without tools"),
            (given(&self.tool_choice), "tool_choice", "function calling is not supported yet; send the request without tool_choice"),
            (given(&self.functions), "functions", "function calling is not supported yet; send the request without functions"),
            (given(&self.function_call), "function_call", "function calling is not supported yet; send the request without function_call"),
            (not_off(&self.logprobs), "logprobs", "log-probabilities are not supported yet; leave logprobs out or false"),
            (given(&self.top_logprobs), "top_logprobs", "log-probabilities are not supported yet; leave top_logprobs out"),
            (!plain_text, "response_format", "structured output is not supported yet; leave response_format out or {\"type\": \"text\"}"),
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
