//! `chatforge serve`: an OpenAI-compatible HTTP server (axum on tokio) in front of the
//! continuous-batching engine, with Server-Sent Events streaming exactly as OpenAI sends them,
//! OpenAI-shaped errors, Prometheus metrics and a chat page embedded in the binary.

pub mod openai;
pub mod tools;

use crate::infer::decode::{reply_budget, TokenLogprob};
use crate::infer::engine::{Engine, Event, Request, SubmitError};
use crate::infer::generate::FinishReason;
use crate::infer::grammar::GrammarCompiler;
use crate::infer::sampler::SamplingParams;
use crate::model::LoadedModel;
use crate::tokenizer::chat::{render_with_tools, ChatTemplate, Message, Role};
use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use openai::{error_body, ChatRequest, CompletionRequest, Sampling, Usage};
use serde_json::{json, Value};
use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub model: PathBuf,
    pub host: String,
    pub port: u16,
    /// Clients must send `Authorization: Bearer KEY` when set.
    pub api_key: Option<String>,
    /// Requests decoded together.
    pub max_batch: usize,
    /// Requests waiting for a place in the batch before new ones get 429.
    pub queue: usize,
    /// The most tokens one reply may have.
    pub max_tokens_cap: usize,
    pub template: Option<ChatTemplate>,
    /// The document index chat requests are answered from, if any.
    pub retrieval: crate::tools::RetrievalArgs,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            model: PathBuf::new(),
            host: "127.0.0.1".into(),
            port: 8000,
            api_key: None,
            max_batch: 16,
            queue: 64,
            max_tokens_cap: 1024,
            template: None,
            retrieval: crate::tools::RetrievalArgs::default(),
        }
    }
}

/// An error as OpenAI sends it.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
        }
    }

    fn invalid(param: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            param: Some(param),
            ..ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }

    fn code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = error_body(&self.message, self.kind, self.param, self.code);
        (self.status, Json(body)).into_response()
    }
}

/// Latency histogram in Prometheus's cumulative form.
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    fn observe(&self, seconds: f64) {
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            if seconds <= *b {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sum_micros
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} histogram\n"));
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            out.push_str(&format!(
                "{name}_bucket{{le=\"{b}\"}} {}\n",
                c.load(Ordering::Relaxed)
            ));
        }
        let count = self.count.load(Ordering::Relaxed);
        out.push_str(&format!("{name}_bucket{{le=\"+Inf\"}} {count}\n"));
        out.push_str(&format!(
            "{name}_sum {}\n{name}_count {count}\n",
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        ));
    }
}

const LATENCY_BOUNDS: &[f64] = &[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    latency: Histogram,
    first_token: Histogram,
}

impl Metrics {
    fn count(&self, endpoint: &'static str, status: StatusCode) {
        *self
            .requests
            .lock()
            .expect("metrics lock")
            .entry((endpoint, status.as_u16()))
            .or_default() += 1;
    }
}

struct AppState {
    engine: Engine,
    lm: Arc<LoadedModel>,
    template: ChatTemplate,
    retrieval: Option<crate::tools::Retrieval>,
    model_id: String,
    api_key: Option<String>,
    max_tokens_cap: usize,
    metrics: Metrics,
    created: u64,
    next_id: AtomicU64,
}

type Shared = Arc<AppState>;

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Loads the model, starts the engine and builds the router; returns it with the model id.
pub fn build(opts: &ServeOptions) -> Result<(Router, String)> {
    crate::util::check_positive("--max-batch", opts.max_batch)?;
    crate::util::check_positive("--queue", opts.queue)?;
    crate::util::check_positive("--max-tokens-cap", opts.max_tokens_cap)?;
    let retrieval = opts.retrieval.open()?;
    let device = candle_core::Device::Cpu;
    let lm = Arc::new(crate::model::load(&opts.model, &device)?);
    let template = match &opts.template {
        Some(t) => t.clone(),
        None => lm.template()?,
    };
    // The run directory's name, or a model file's name without its extension.
    let path = std::fs::canonicalize(&opts.model).unwrap_or_else(|_| opts.model.clone());
    let name = if path.is_file() {
        path.file_stem()
    } else {
        path.file_name()
    };
    let model_id = name
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "chatforge".into());
    let engine = Engine::start(lm.clone(), opts.max_batch, opts.queue);
    let state = Arc::new(AppState {
        engine,
        lm,
        template,
        retrieval,
        model_id: model_id.clone(),
        api_key: opts.api_key.clone(),
        max_tokens_cap: opts.max_tokens_cap.max(1),
        metrics: Metrics {
            requests: Mutex::new(BTreeMap::new()),
            latency: Histogram::new(LATENCY_BOUNDS),
            first_token: Histogram::new(LATENCY_BOUNDS),
        },
        created: unix_now(),
        next_id: AtomicU64::new(1),
    });
    let router = Router::new()
        .route("/", get(|| async { Html(include_str!("ui.html")) }))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .layer(DefaultBodyLimit::max(4 << 20))
        .with_state(state);
    Ok((router, model_id))
}

/// 200 while the engine runs (with how often it restarted after a panic), 503 once it has stopped.
async fn health(State(state): State<Shared>) -> Response {
    let s = &state.engine.stats;
    let restarts = s.restarts.load(Ordering::Relaxed);
    if s.alive.load(Ordering::Relaxed) {
        Json(json!({"status": "ok", "engine_restarts": restarts})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "engine stopped", "engine_restarts": restarts})),
        )
            .into_response()
    }
}

/// Serves until Ctrl-C.
pub fn serve(opts: &ServeOptions) -> Result<()> {
    let (router, model_id) = build(opts)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind((opts.host.as_str(), opts.port))
            .await
            .with_context(|| format!("cannot listen on {}:{}", opts.host, opts.port))?;
        let addr = listener.local_addr()?;
        eprintln!("chatforge serve: model {model_id:?} on http://{addr} (chat page at /, API at /v1; Ctrl-C stops)");
        axum::serve(listener, router)
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
        Ok(())
    })
}

impl AppState {
    /// The model's grammar compiler, which the engine shares.
    fn grammars(&self) -> Result<&GrammarCompiler> {
        self.lm.grammars.get(&self.lm.tokenizer)
    }
}

fn check_key(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &state.api_key else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given == Some(key.as_str()) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "missing or wrong API key: send the header `Authorization: Bearer KEY`",
        )
        .code("invalid_api_key"))
    }
}

/// Parses a request body; malformed JSON or wrong field types become a 400 naming the problem.
pub fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            format!("the request body is not valid: {e}"),
        )
    })
}

async fn models(State(state): State<Shared>, headers: HeaderMap) -> Response {
    if let Err(e) = check_key(&state, &headers) {
        return e.into_response();
    }
    Json(json!({"object": "list", "data": [{
        "id": state.model_id, "object": "model", "created": state.created, "owned_by": "chatforge",
        "context_length": state.lm.model.config.max_position_embeddings,
    }]}))
    .into_response()
}

/// `POST /tokenize` (llama.cpp's server's): `{"content", "add_special", "parse_special",
/// "with_pieces"}` → `{"tokens": [id...]}`, or `[{"id", "piece"}...]` with pieces.
async fn tokenize(State(state): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    #[derive(serde::Deserialize)]
    struct TokenizeRequest {
        content: String,
        #[serde(default)]
        add_special: bool,
        #[serde(default = "yes")]
        parse_special: bool,
        #[serde(default)]
        with_pieces: bool,
    }
    fn yes() -> bool {
        true
    }
    let result = (|| {
        check_key(&state, &headers)?;
        let req: TokenizeRequest = parse_body(&body)?;
        let tok = &state.lm.tokenizer;
        let mut ids: Vec<u32> = match req.add_special {
            true => tok.bos_id().into_iter().collect(),
            false => Vec::new(),
        };
        let encoded = match req.parse_special {
            true => tok.encode(&req.content),
            false => tok.encode_plain(&req.content),
        };
        ids.extend(encoded.map_err(|e| ApiError::invalid("content", format!("{e:#}")))?);
        let tokens = match req.with_pieces {
            true => ids
                .iter()
                .map(|&id| {
                    let piece = String::from_utf8_lossy(&tok.piece_bytes(id)).into_owned();
                    json!({"id": id, "piece": piece})
                })
                .collect(),
            false => ids.iter().map(|&id| json!(id)).collect::<Vec<_>>(),
        };
        Ok::<_, ApiError>(json!({ "tokens": tokens }))
    })();
    counted(&state, "/tokenize", result)
}

/// A JSON reply or an error, counted in the metrics under `endpoint`.
fn counted(state: &AppState, endpoint: &'static str, result: Result<Value, ApiError>) -> Response {
    let status = result
        .as_ref()
        .map_or_else(|e| e.status, |_| StatusCode::OK);
    state.metrics.count(endpoint, status);
    match result {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `POST /detokenize`: `{"tokens": [id...]}` → `{"content": text}`.
async fn detokenize(State(state): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    #[derive(serde::Deserialize)]
    struct DetokenizeRequest {
        tokens: Vec<u32>,
    }
    let result = (|| {
        check_key(&state, &headers)?;
        let req: DetokenizeRequest = parse_body(&body)?;
        let vocab = state.lm.tokenizer.vocab_size();
        if let Some((i, id)) = req
            .tokens
            .iter()
            .enumerate()
            .find(|(_, &id)| id as usize >= vocab)
        {
            return Err(ApiError::invalid(
                "tokens",
                format!("tokens[{i}] = {id} is not a token id (the vocabulary has {vocab})"),
            ));
        }
        let content = state
            .lm
            .tokenizer
            .decode(&req.tokens)
            .map_err(|e| ApiError::invalid("tokens", format!("{e:#}")))?;
        Ok(json!({ "content": content }))
    })();
    counted(&state, "/detokenize", result)
}

async fn metrics(State(state): State<Shared>) -> Response {
    let s = &state.engine.stats;
    let mut out = String::new();
    out.push_str("# HELP chatforge_requests_total HTTP requests by endpoint and status.\n# TYPE chatforge_requests_total counter\n");
    for ((endpoint, status), n) in state.metrics.requests.lock().expect("metrics lock").iter() {
        out.push_str(&format!(
            "chatforge_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}\n"
        ));
    }
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let count = |a: &std::sync::atomic::AtomicUsize| a.load(Ordering::Relaxed) as u64;
    let series: [(&str, &str, &str, u64); 8] = [
        (
            "chatforge_prompt_tokens_total",
            "counter",
            "Prompt tokens processed.",
            load(&s.prompt_tokens),
        ),
        (
            "chatforge_completion_tokens_total",
            "counter",
            "Tokens generated.",
            load(&s.completion_tokens),
        ),
        (
            "chatforge_decode_steps_total",
            "counter",
            "Batched decode steps.",
            load(&s.decode_steps),
        ),
        (
            "chatforge_engine_restarts_total",
            "counter",
            "Panics in a prefill or decode step (each failed the requests in flight).",
            load(&s.restarts),
        ),
        (
            "chatforge_cancelled_total",
            "counter",
            "Requests whose client went away.",
            load(&s.cancelled),
        ),
        (
            "chatforge_queue_depth",
            "gauge",
            "Requests waiting for a place in the batch.",
            count(&s.queued),
        ),
        (
            "chatforge_active_requests",
            "gauge",
            "Requests being decoded.",
            count(&s.active),
        ),
        (
            "chatforge_max_batch",
            "gauge",
            "Requests decoded together at most.",
            state.engine.max_batch as u64,
        ),
    ];
    for (name, kind, help, v) in series {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
        ));
    }
    state.metrics.latency.render(
        "chatforge_request_duration_seconds",
        "Time from request to last token.",
        &mut out,
    );
    state.metrics.first_token.render(
        "chatforge_time_to_first_token_seconds",
        "Time from request to first token.",
        &mut out,
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// A validated request, ready for the engine.
struct Prepared {
    prompt: Vec<u32>,
    params: SamplingParams,
    stream: bool,
    include_usage: bool,
    /// Choices to sample (OpenAI's `n`).
    n: usize,
    /// The tools the model was offered: its replies are read for calls.
    tools: Vec<tools::Tool>,
    /// The passages retrieved for a chat request, sent with the reply as `sources`.
    sources: Vec<crate::tools::index::Passage>,
}

/// The request's sampling fields over the library's defaults, checked by the rules every caller
/// shares ([`SamplingParams::check`]), and the prompt checked against the context.
fn prepare(
    state: &AppState,
    kind: Kind,
    s: Sampling,
    prompt: Vec<u32>,
) -> Result<Prepared, ApiError> {
    if s.model != state.model_id {
        return Err(ApiError {
            param: Some("model"),
            ..ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!(
                    "the model {:?} does not exist; this server has {:?} (see /v1/models)",
                    s.model, state.model_id
                ),
            )
        }
        .code("model_not_found"));
    }
    let n = s.n.unwrap_or(1);
    if n == 0 || n > state.engine.max_batch as u64 {
        return Err(ApiError::invalid(
            "n",
            format!(
                "n must be from 1 to {} (the server's --max-batch), got {n}",
                state.engine.max_batch
            ),
        ));
    }
    if let Some((field, why)) = s.unsupported.first() {
        return Err(
            ApiError::invalid(field, format!("{field}: {why}")).code("unsupported_parameter")
        );
    }
    let logprobs = openai::requested_logprobs(kind == Kind::Chat, &s.logprobs, &s.top_logprobs)
        .map_err(|(field, message)| ApiError::invalid(field, message))?;
    let grammar = openai::requested_grammar(&s.response_format)
        .map_err(|message| ApiError::invalid("response_format", message))?;
    if let Some(g) = &grammar {
        // Compiled here too, so that a bad schema is the client's 400, not a failed reply.
        state
            .grammars()
            .and_then(|c| c.matcher(g))
            .map_err(|e| ApiError::invalid("response_format", format!("{e:#}")))?;
    }
    let vocab = state.lm.model.config.vocab_size;
    let mut logit_bias = Vec::new();
    for (k, &b) in s.logit_bias.iter().flatten() {
        let id: u32 = k
            .parse()
            .ok()
            .filter(|&i: &u32| (i as usize) < vocab)
            .ok_or_else(|| {
                ApiError::invalid(
                    "logit_bias",
                    format!("logit_bias key {k:?} is not a token id below {vocab}"),
                )
            })?;
        logit_bias.push((id, b));
    }
    logit_bias.sort_by_key(|x| x.0);
    let requested = s.max_completion_tokens.or(s.max_tokens);
    if requested == Some(0) {
        return Err(ApiError::invalid(
            "max_tokens",
            "max_tokens must be at least 1",
        ));
    }
    let d = SamplingParams::DEFAULT;
    let params = SamplingParams {
        // Without max_tokens a reply may fill the context, up to the server's cap.
        max_tokens: requested
            .map(|m| m.min(usize::MAX as u64) as usize)
            .unwrap_or(usize::MAX)
            .min(state.max_tokens_cap),
        temperature: s.temperature.unwrap_or(d.temperature),
        top_k: s.top_k.map_or(d.top_k, |k| k as usize),
        top_p: s.top_p.unwrap_or(d.top_p),
        seed: s
            .seed
            .unwrap_or_else(|| unix_now() ^ state.next_id.load(Ordering::Relaxed)),
        stop: s.stop.map(|s| s.into_vec()).unwrap_or_default(),
        presence_penalty: s.presence_penalty.unwrap_or(d.presence_penalty),
        frequency_penalty: s.frequency_penalty.unwrap_or(d.frequency_penalty),
        logit_bias,
        logprobs,
        grammar,
    };
    params
        .check()
        .map_err(|e| ApiError::invalid(e.field, e.message))?;
    let context = state.lm.model.config.max_position_embeddings;
    reply_budget(prompt.len(), context, params.max_tokens).map_err(|e| {
        ApiError::invalid("messages", format!("{e:#}")).code("context_length_exceeded")
    })?;
    Ok(Prepared {
        prompt,
        params,
        stream: s.stream,
        include_usage: s.stream_options.is_some_and(|o| o.include_usage),
        n: n as usize,
        tools: Vec::new(),
        sources: Vec::new(),
    })
}

/// A chat request's prompt ids, with the retrieved passages when the server has an index.
fn chat_prompt(
    state: &AppState,
    req: &ChatRequest,
    offered: &[tools::Tool],
) -> Result<(Vec<u32>, Vec<crate::tools::index::Passage>), ApiError> {
    if req.messages.is_empty() {
        return Err(ApiError::invalid("messages", "messages must not be empty"));
    }
    let mut messages = Vec::with_capacity(req.messages.len() + 1);
    for (i, m) in req.messages.iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => Role::System,
            "user" | "tool" => Role::User,
            "assistant" => Role::Assistant,
            "document" => Role::Document,
            other => {
                return Err(ApiError::invalid(
                    "messages",
                    format!(
                        "messages[{i}]: role {other:?} is not supported (system, user, assistant, tool, document)"
                    ),
                ))
            }
        };
        let text = match &m.content {
            Some(c) => c
                .text()
                .map_err(|e| ApiError::invalid("messages", format!("messages[{i}]: {e}")))?,
            None => String::new(),
        };
        let text = match m.role.as_str() {
            // A tool's result goes back in a user turn, as the Hermes convention has it.
            "tool" => tools::response_text(&text),
            "assistant" => {
                let mut text = text;
                for (k, call) in m.tool_calls.iter().flatten().enumerate() {
                    let f = &call["function"];
                    let (Some(name), Some(arguments)) =
                        (f["name"].as_str(), f["arguments"].as_str())
                    else {
                        return Err(ApiError::invalid(
                            "messages",
                            format!("messages[{i}].tool_calls[{k}] needs function.name and function.arguments (a JSON string)"),
                        ));
                    };
                    if !text.is_empty() {
                        text.push('\n');
                    }
                    text.push_str(&tools::call_text(name, arguments));
                }
                text
            }
            _ => text,
        };
        messages.push(Message::new(role, text));
    }
    // A template that lays out tools itself gets them; for any other the Hermes text goes into
    // the system message.
    let own_layout = !offered.is_empty() && state.template.renders_tools();
    let listed = own_layout.then(|| tools::as_openai(offered));
    if let Some(list) = &listed {
        crate::tokenizer::chat::check_tools(&state.lm.tokenizer, list)
            .map_err(|e| ApiError::invalid("tools", format!("{e:#}")))?;
    }
    if !offered.is_empty() && !own_layout {
        let about = tools::system_text(offered);
        match messages.first_mut() {
            Some(first) if first.role == Role::System => {
                first.content = format!("{}\n\n{about}", first.content)
            }
            _ => messages.insert(0, Message::new(Role::System, about)),
        }
    }
    let mut sources = Vec::new();
    if let Some(r) = &state.retrieval {
        let context = state.lm.model.config.max_position_embeddings;
        let grounded = r
            .ground(&state.lm.tokenizer, &messages, context)
            .map_err(|e| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    format!("retrieval failed: {e:#}"),
                )
            })?;
        messages = grounded.0;
        sources = grounded.1;
    }
    let ids = render_with_tools(
        &state.lm.tokenizer,
        &state.template,
        &messages,
        listed.as_ref(),
        true,
    )
    .map(|r| r.ids)
    .map_err(|e| ApiError::invalid("messages", format!("{e:#}")))?;
    Ok((ids, sources))
}

/// Which endpoint, for the response shapes.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completion,
}

impl Kind {
    fn endpoint(self) -> &'static str {
        match self {
            Kind::Chat => "/v1/chat/completions",
            Kind::Completion => "/v1/completions",
        }
    }
}

async fn chat_completions(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let result = async {
        check_key(&state, &headers)?;
        let req: ChatRequest = parse_body(&body)?;
        let (offered, choice) = tools::parse(&req.sampling.tools, &req.sampling.tool_choice)
            .map_err(|(field, message)| ApiError::invalid(field, message))?;
        // With tool_choice "none" the model is not told of the tools.
        let offered = match choice {
            tools::ToolChoice::None => Vec::new(),
            _ => offered,
        };
        let (prompt, sources) = chat_prompt(&state, &req, &offered)?;
        let forced = tools::grammar(&offered, &choice);
        let mut p = prepare(&state, Kind::Chat, req.sampling, prompt)?;
        if let Some(g) = forced {
            if p.params.grammar.is_some() {
                return Err(ApiError::invalid(
                    "tool_choice",
                    "a required tool call and response_format cannot be combined; drop one",
                ));
            }
            state
                .grammars()
                .and_then(|c| c.matcher(&g))
                .map_err(|e| ApiError::invalid("tools", format!("{e:#}")))?;
            p.params.grammar = Some(g);
        }
        p.sources = sources;
        p.tools = offered;
        Ok::<_, ApiError>(p)
    }
    .await;
    respond(state, Kind::Chat, result).await
}

async fn completions(State(state): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let result = async {
        check_key(&state, &headers)?;
        let req: CompletionRequest = parse_body(&body)?;
        if req.sampling.tools.as_ref().is_some_and(|t| !t.is_null()) {
            return Err(ApiError::invalid(
                "tools",
                "tools are for /v1/chat/completions",
            ));
        }
        let prompts = req.prompt.into_vec();
        if prompts.len() != 1 {
            return Err(ApiError::invalid("prompt", "send exactly one prompt"));
        }
        let tok = &state.lm.tokenizer;
        let mut ids: Vec<u32> = tok.bos_id().into_iter().collect();
        ids.extend(
            tok.encode(&prompts[0])
                .map_err(|e| ApiError::invalid("prompt", format!("{e:#}")))?,
        );
        prepare(&state, Kind::Completion, req.sampling, ids)
    }
    .await;
    respond(state, Kind::Completion, result).await
}

async fn respond(state: Shared, kind: Kind, prepared: Result<Prepared, ApiError>) -> Response {
    let p = match prepared {
        Ok(p) => p,
        Err(e) => {
            state.metrics.count(kind.endpoint(), e.status);
            return e.into_response();
        }
    };
    let started = Instant::now();
    let logprobs = p.params.logprobs.is_some();
    let mut stop_ids = state.template.stop_ids(&state.lm.tokenizer);
    stop_ids.extend(crate::infer::generate::stop_ids(&state.lm));
    // One engine request per choice, on seeds seed, seed + 1, ...; their events merge into one
    // channel tagged with the choice's index. A client that goes away drops `rx`, each forwarder
    // then ends and drops its request's channel, and the engine lets the rows go.
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    for index in 0..p.n {
        let (choice_tx, mut choice_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut params = p.params.clone();
        params.seed = params.seed.wrapping_add(index as u64);
        let request = Request {
            prompt: p.prompt.clone(),
            params,
            stop_ids: stop_ids.clone(),
            events: choice_tx,
        };
        if let Err(e) = state.engine.submit(request) {
            let error = match e {
                SubmitError::Busy => ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "server_overloaded",
                    "the request queue is full; retry after a moment",
                )
                .code("queue_full"),
                SubmitError::Stopped => ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    "the engine has stopped",
                ),
            };
            state.metrics.count(kind.endpoint(), error.status);
            return error.into_response();
        }
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(event) = choice_rx.recv().await {
                if tx.send((index, event)).is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);
    let id_number = state.next_id.fetch_add(1, Ordering::Relaxed);
    let id = match kind {
        Kind::Chat => format!("chatcmpl-{id_number:x}{:x}", state.created),
        Kind::Completion => format!("cmpl-{id_number:x}{:x}", state.created),
    };
    state.metrics.count(kind.endpoint(), StatusCode::OK);
    // `sources` only where the server has an index (null: left out).
    let sources = match &state.retrieval {
        Some(_) => serde_json::to_value(&p.sources).unwrap_or(Value::Null),
        None => Value::Null,
    };
    let reply = Reply {
        state,
        kind,
        id,
        rx,
        started,
        n: p.n,
        logprobs,
        tools: p.tools,
        sources,
    };
    if p.stream {
        stream_response(reply, p.include_usage)
    } else {
        full_response(reply).await
    }
}

/// A reply under way: its choices' events, tagged with their index, and what shapes the body.
struct Reply {
    state: Shared,
    kind: Kind,
    id: String,
    rx: tokio::sync::mpsc::UnboundedReceiver<(usize, Event)>,
    started: Instant,
    /// Choices (OpenAI's `n`).
    n: usize,
    /// Whether the request asked for log-probabilities.
    logprobs: bool,
    /// The tools offered; empty when replies are plain text.
    tools: Vec<tools::Tool>,
    sources: Value,
}

impl Reply {
    /// The one delta of a choice held back because tools were offered: its text, or its calls
    /// (true) as `tool_calls` deltas with their index.
    fn held_chunk(
        &self,
        choice: usize,
        (text, logprobs): (String, Vec<TokenLogprob>),
        offset: &mut usize,
    ) -> (Value, bool) {
        let (message, called) = self.message(choice, text.clone());
        if !called {
            let lp = self.logprobs_json(&logprobs, offset);
            let d = json!({"content": text});
            return (
                json!({"index": choice, "delta": d, "logprobs": lp, "finish_reason": null}),
                false,
            );
        }
        let calls: Vec<Value> = message["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
            .map(|(k, c)| {
                let mut c = c.clone();
                c["index"] = json!(k);
                c
            })
            .collect();
        let mut d = json!({ "tool_calls": calls });
        if let Some(content) = message["content"].as_str() {
            d["content"] = json!(content);
        }
        (
            json!({"index": choice, "delta": d, "logprobs": null, "finish_reason": null}),
            true,
        )
    }

    /// A chat choice's message: its text, or the calls it makes (true) when tools were offered.
    fn message(&self, choice: usize, text: String) -> (Value, bool) {
        if self.tools.is_empty() {
            return (json!({"role": "assistant", "content": text}), false);
        }
        let (content, calls) = tools::extract(&text, &self.tools);
        if calls.is_empty() {
            return (json!({"role": "assistant", "content": text}), false);
        }
        let calls: Vec<Value> = calls
            .iter()
            .enumerate()
            .map(|(k, c)| {
                json!({"id": format!("call_{}{choice}{k}", self.id.trim_start_matches("chatcmpl-")), "type": "function",
                       "function": {"name": c.name, "arguments": c.arguments}})
            })
            .collect();
        let message = json!({"role": "assistant", "content": content, "tool_calls": calls});
        (message, true)
    }

    /// The log-probabilities of a piece of choice text in the endpoint's shape, or null when the
    /// request did not ask for them.
    fn logprobs_json(&self, tokens: &[TokenLogprob], offset: &mut usize) -> Value {
        match self.logprobs {
            true => openai::logprobs_json(
                self.kind == Kind::Chat,
                &self.state.lm.tokenizer,
                tokens,
                offset,
            ),
            false => Value::Null,
        }
    }
}

async fn full_response(mut r: Reply) -> Response {
    let mut texts = vec![String::new(); r.n];
    let mut token_logprobs = vec![Vec::new(); r.n];
    let mut finishes: Vec<Option<FinishReason>> = vec![None; r.n];
    let (mut prompt_tokens, mut completion_tokens) = (0, 0);
    let mut first = true;
    while let Some((i, event)) = r.rx.recv().await {
        match event {
            Event::Text { text, logprobs } => {
                if first {
                    let seconds = r.started.elapsed().as_secs_f64();
                    r.state.metrics.first_token.observe(seconds);
                    first = false;
                }
                texts[i].push_str(&text);
                token_logprobs[i].extend(logprobs);
            }
            Event::Done {
                finish_reason,
                prompt_tokens: p,
                completion_tokens: c,
            } => {
                finishes[i] = Some(finish_reason);
                prompt_tokens = p;
                completion_tokens += c;
                if finishes.iter().all(Option::is_some) {
                    break;
                }
            }
            Event::Failed(message) => {
                return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
                    .into_response()
            }
        }
    }
    if finishes.iter().any(Option::is_none) {
        return ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "the engine dropped the request",
        )
        .into_response();
    }
    let seconds = r.started.elapsed().as_secs_f64();
    r.state.metrics.latency.observe(seconds);
    let choices: Vec<Value> = (0..r.n)
        .map(|i| {
            let mut finish = finishes[i].map(finish_name);
            let lp = r.logprobs_json(&token_logprobs[i], &mut 0);
            let text = std::mem::take(&mut texts[i]);
            match r.kind {
                Kind::Chat => {
                    let (message, called) = r.message(i, text);
                    if called {
                        finish = Some("tool_calls");
                    }
                    json!({"index": i, "message": message, "logprobs": lp, "finish_reason": finish})
                }
                Kind::Completion => {
                    json!({"index": i, "text": text, "logprobs": lp, "finish_reason": finish})
                }
            }
        })
        .collect();
    // The prompt is counted once, as OpenAI does for n > 1.
    let usage = Usage::new(prompt_tokens, completion_tokens);
    let object = match r.kind {
        Kind::Chat => "chat.completion",
        Kind::Completion => "text_completion",
    };
    let mut body = json!({
        "id": r.id, "object": object, "created": unix_now(), "model": r.state.model_id,
        "choices": choices, "usage": usage,
    });
    // `sources`, beside OpenAI's fields: the passages the reply was grounded on.
    if !r.sources.is_null() && r.kind == Kind::Chat {
        body["sources"] = r.sources;
    }
    Json(body).into_response()
}

fn finish_name(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length => "length",
        FinishReason::Stop | FinishReason::Cancelled => "stop",
    }
}

/// The chunks of a streamed reply, as OpenAI sends them: each choice's role first, then content
/// deltas tagged with their choice's index, a chunk with each choice's `finish_reason`, the usage
/// chunk when asked for, then `[DONE]`; one id throughout.
fn stream_response(r: Reply, include_usage: bool) -> Response {
    let created = unix_now();
    let model = r.state.model_id.clone();
    let (kind, id) = (r.kind, r.id.clone());
    let chunk = move |choice: Value, usage: Option<Value>| -> Value {
        let object = match kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        };
        let mut body = json!({"id": id, "object": object, "created": created, "model": model,
                              "choices": [choice]});
        if choice_is_empty(&body) {
            body["choices"] = json!([]);
        }
        if include_usage {
            body["usage"] = usage.unwrap_or(Value::Null);
        }
        body
    };
    let to_event = |body: &Value| SseEvent::default().data(body.to_string());
    let delta = move |i: usize, text: Option<&str>, lp: Value, finish: Option<&str>| -> Value {
        match kind {
            Kind::Chat => {
                let d = match text {
                    Some(t) => json!({"content": t}),
                    None => json!({}),
                };
                json!({"index": i, "delta": d, "logprobs": lp, "finish_reason": finish})
            }
            Kind::Completion => {
                json!({"index": i, "text": text.unwrap_or(""), "logprobs": lp, "finish_reason": finish})
            }
        }
    };
    // The state machine: 0 = role chunks not sent, 1 = streaming, 2 = [DONE] next, 3 = ended.
    struct StreamState {
        r: Reply,
        phase: u8,
        pending: VecDeque<SseEvent>,
        first: bool,
        /// Characters streamed so far per choice (the completions API's `text_offset`).
        offsets: Vec<usize>,
        /// Choices not finished yet, and the usage summed over those that have.
        running: usize,
        usage: (usize, usize),
        /// With tools offered, each choice's text and log-probabilities are held until it ends:
        /// only then is it known to be text or calls.
        held: Vec<(String, Vec<TokenLogprob>)>,
    }
    let init = StreamState {
        held: vec![(String::new(), Vec::new()); r.n],
        phase: if kind == Kind::Chat { 0 } else { 1 },
        pending: VecDeque::new(),
        first: true,
        offsets: vec![0; r.n],
        running: r.n,
        usage: (0, 0),
        r,
    };
    let stream = futures_util::stream::unfold(init, move |mut st| {
        let chunk = chunk.clone();
        async move {
            loop {
                if let Some(e) = st.pending.pop_front() {
                    return Some((Ok::<_, std::convert::Infallible>(e), st));
                }
                match st.phase {
                    0 => {
                        st.phase = 1;
                        for i in 0..st.r.n {
                            let role = json!({"index": i, "delta": {"role": "assistant", "content": ""},
                                              "logprobs": null, "finish_reason": null});
                            let mut first = chunk(role, None);
                            // The role chunk carries the sources, so a page can show them at once.
                            if i == 0 && !st.r.sources.is_null() {
                                first["sources"] = std::mem::take(&mut st.r.sources);
                            }
                            st.pending.push_back(to_event(&first));
                        }
                    }
                    1 => match st.r.rx.recv().await {
                        Some((i, Event::Text { text, logprobs })) => {
                            if st.first {
                                let seconds = st.r.started.elapsed().as_secs_f64();
                                st.r.state.metrics.first_token.observe(seconds);
                                st.first = false;
                            }
                            if !st.r.tools.is_empty() {
                                st.held[i].0.push_str(&text);
                                st.held[i].1.extend(logprobs);
                                continue;
                            }
                            let lp = st.r.logprobs_json(&logprobs, &mut st.offsets[i]);
                            let body = chunk(delta(i, Some(&text), lp, None), None);
                            return Some((Ok(to_event(&body)), st));
                        }
                        Some((
                            i,
                            Event::Done {
                                finish_reason,
                                prompt_tokens,
                                completion_tokens,
                            },
                        )) => {
                            let mut finish = Some(finish_name(finish_reason));
                            if !st.r.tools.is_empty() {
                                let held = std::mem::take(&mut st.held[i]);
                                let (body, called) = st.r.held_chunk(i, held, &mut st.offsets[i]);
                                if called {
                                    finish = Some("tool_calls");
                                }
                                st.pending.push_back(to_event(&chunk(body, None)));
                            }
                            st.pending.push_back(to_event(&chunk(
                                delta(i, None, Value::Null, finish),
                                None,
                            )));
                            st.usage = (prompt_tokens, st.usage.1 + completion_tokens);
                            st.running -= 1;
                            if st.running > 0 {
                                continue;
                            }
                            let seconds = st.r.started.elapsed().as_secs_f64();
                            st.r.state.metrics.latency.observe(seconds);
                            if include_usage {
                                let usage =
                                    serde_json::to_value(Usage::new(st.usage.0, st.usage.1))
                                        .unwrap_or(Value::Null);
                                st.pending
                                    .push_back(to_event(&chunk(Value::Null, Some(usage))));
                            }
                            st.phase = 2;
                        }
                        Some((_, Event::Failed(message))) => {
                            let body = error_body(&message, "server_error", None, None);
                            st.pending
                                .push_back(SseEvent::default().data(body.to_string()));
                            st.phase = 2;
                        }
                        None => st.phase = 2,
                    },
                    2 => {
                        st.phase = 3;
                        return Some((Ok(SseEvent::default().data("[DONE]")), st));
                    }
                    _ => return None,
                }
            }
        }
    });
    Sse::new(stream).into_response()
}

fn choice_is_empty(body: &Value) -> bool {
    body["choices"].get(0).is_some_and(|c| c.is_null())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// No body, however broken, makes the parser panic: it is a request or a 400.
        #[test]
        fn request_parser_never_panics(body in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_body::<ChatRequest>(&body);
            let _ = parse_body::<CompletionRequest>(&body);
        }

        #[test]
        fn json_shaped_bodies_never_panic(
            model in "[a-z]{0,5}",
            role in "(user|system|assistant|tool|x)",
            content in any::<String>(),
            temp in proptest::option::of(-5.0f64..5.0),
            max in proptest::option::of(0u64..u64::MAX),
        ) {
            let body = json!({"model": model, "messages": [{"role": role, "content": content}],
                              "temperature": temp, "max_tokens": max, "stop": ["a", "b"]});
            let parsed = parse_body::<ChatRequest>(body.to_string().as_bytes());
            prop_assert!(parsed.is_ok());
        }
    }

    #[test]
    fn malformed_json_is_a_400_in_openai_shape() {
        let e = parse_body::<ChatRequest>(b"{\"model\": ").unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        let e = parse_body::<ChatRequest>(b"{\"model\": \"m\", \"messages\": 3}").unwrap_err();
        assert!(
            e.message.contains("messages") || e.message.contains("sequence"),
            "{}",
            e.message
        );
        let body = error_body("x", "invalid_request_error", Some("model"), None);
        assert_eq!(body["error"]["param"], "model");
    }
}
