//! The OpenAI API on the same model queue as the pages: `GET /v1/models`, `POST /v1/chat/completions`
//! (with the model's chat template) and `POST /v1/completions` (plain text continued as it is), each as one
//! JSON reply or as server-sent events with `stream: true`, so any OpenAI client can talk to the model,
//! steered or not. The extension field `"saekit": {"steer": [...]}` takes the
//! edits of `/api/steer`. Errors use OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, so
//! clients raise their usual exceptions; a full queue answers 503 with `Retry-After`, which those clients
//! retry with backoff.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt as _;
use saekit_model::{ChatMessage, GenerateOptions, Sampling, Tokenizer};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::api::{resolve_edits, AppState, EditRequest};
use crate::engine::{Engine, FeatureEdit};
use crate::error::ServeError;

/// The `/v1` routes, nested under `/v1` by [`crate::router`].
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/models", get(models))
        .route("/chat/completions", post(chat_completions))
        .route("/completions", post(completions))
        .method_not_allowed_fallback(|m: Method, u: Uri| async move {
            let message = format!("{m} is not allowed on /v1{u}");
            OaiError::from(ServeError::Refused { status: StatusCode::METHOD_NOT_ALLOWED, message })
        })
        // inside the nest the path has lost its `/v1` (axum's original-uri feature is off)
        .fallback(|m: Method, u: Uri| async move {
            OaiError::from(ServeError::NotFound(format!("Unknown request URL: {m} /v1{u}")))
        })
}

/// A [`ServeError`] as OpenAI's API writes it: the status is the error's own, the `type` follows from it,
/// and `param` / `code` name the field at fault where one is.
#[derive(Debug)]
pub struct OaiError {
    error: ServeError,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

impl OaiError {
    /// A bad value of the request's field `param` (400).
    fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        Self { param: Some(param), ..ServeError::BadRequest(message.into()).into() }
    }
    fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }
    fn body(&self) -> Value {
        let kind = if self.error.status().is_server_error() { "server_error" } else { "invalid_request_error" };
        let message = self.error.message();
        json!({ "error": { "message": message, "type": kind, "param": self.param, "code": self.code } })
    }
}

impl From<ServeError> for OaiError {
    fn from(error: ServeError) -> Self {
        let code = matches!(error, ServeError::Busy(_)).then_some("server_busy");
        Self { error, param: None, code }
    }
}

impl IntoResponse for OaiError {
    fn into_response(self) -> Response {
        let response = (self.error.status(), Json(self.body())).into_response();
        self.error.finish(response)
    }
}

/// The one model this server offers: the model's name from its file (`/api/info`'s `model.name`).
fn model_id(s: &AppState) -> Option<String> {
    s.queue.as_ref()?;
    s.model_info.get("name").and_then(Value::as_str).map(str::to_string)
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

async fn models(State(s): State<Arc<AppState>>) -> Json<Value> {
    let data: Vec<Value> = model_id(&s)
        .into_iter()
        .map(|id| json!({ "id": id, "object": "model", "created": 0, "owned_by": "saekit" }))
        .collect();
    Json(json!({ "object": "list", "data": data }))
}

/// What chat and text completions share: the model, sampling, stops, streaming and the steering extension.
#[derive(Deserialize)]
struct GenParams {
    model: String,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    seed: Option<i64>,
    stop: Option<Stop>,
    n: Option<u64>,
    frequency_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    saekit: Option<SaekitExtension>,
}

#[derive(Deserialize)]
struct ChatRequest {
    messages: Vec<RequestMessage>,
    logprobs: Option<bool>,
    top_logprobs: Option<u32>,
    tools: Option<Value>,
    #[serde(flatten)]
    gen: GenParams,
}

#[derive(Deserialize)]
struct CompletionRequest {
    prompt: TextPrompt,
    /// A number of top log-probabilities here (a flag in the chat API).
    logprobs: Option<u32>,
    echo: Option<bool>,
    suffix: Option<String>,
    best_of: Option<u64>,
    #[serde(flatten)]
    gen: GenParams,
}

/// `prompt` as OpenAI takes it: a string, or a list of them (one completion each; only one is served).
#[derive(Deserialize)]
#[serde(untagged)]
enum TextPrompt {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

#[derive(Deserialize)]
struct RequestMessage {
    role: String,
    content: Option<Content>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SaekitExtension {
    #[serde(default)]
    steer: Vec<EditRequest>,
}

/// What the model continues: chat messages through the chat template, or text as it is.
enum Prompt {
    Chat(Vec<ChatMessage>),
    Text(String),
}

/// A checked request, ready for the model worker.
struct ChatJob {
    prompt: Prompt,
    opts: GenerateOptions,
    stops: Vec<String>,
    edits: Vec<FeatureEdit>,
    /// With `logprobs: true`: how many of the likeliest tokens to list beside each chosen one.
    top_logprobs: Option<usize>,
}

/// Most alternatives per token OpenAI's API lists (`top_logprobs`).
const MAX_TOP_LOGPROBS: u32 = 20;

fn parse_request<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
    what: &str,
) -> Result<T, OaiError> {
    let body = body.map_err(|r| ServeError::Refused { status: r.status(), message: r.body_text() })?;
    serde_json::from_slice(&body)
        .map_err(|e| ServeError::BadRequest(format!("the request body is not a valid {what} request: {e}")).into())
}

fn messages_of(req: &[RequestMessage]) -> Result<Vec<ChatMessage>, OaiError> {
    if req.is_empty() {
        return Err(OaiError::invalid("messages", "messages must contain at least one message"));
    }
    let mut out = Vec::with_capacity(req.len());
    for (i, m) in req.iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            r => {
                return Err(OaiError::invalid(
                    "messages",
                    format!("messages[{i}]: role '{r}' is not supported: use system, user or assistant"),
                ))
            }
        };
        let content = match &m.content {
            None => String::new(),
            Some(Content::Text(t)) => t.clone(),
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => text.push_str(t),
                        (k, _) => {
                            return Err(OaiError::invalid(
                                "messages",
                                format!("messages[{i}]: content parts of type '{k}' are not supported (text only)"),
                            ))
                        }
                    }
                }
                text
            }
        };
        out.push(ChatMessage { role: role.into(), content });
    }
    Ok(out)
}

async fn check_chat(s: &Arc<AppState>, req: &ChatRequest) -> Result<ChatJob, OaiError> {
    let messages = messages_of(&req.messages)?;
    let top_logprobs = match (req.logprobs.unwrap_or(false), req.top_logprobs) {
        (false, Some(_)) => return Err(OaiError::invalid("top_logprobs", "top_logprobs needs logprobs: true")),
        (_, Some(n)) if n > MAX_TOP_LOGPROBS => {
            return Err(OaiError::invalid("top_logprobs", format!("top_logprobs is at most {MAX_TOP_LOGPROBS}")))
        }
        (true, _) if req.gen.stream == Some(true) => {
            return Err(OaiError::invalid("logprobs", "logprobs are not supported with stream: true"))
        }
        (true, n) => Some(n.unwrap_or(0) as usize),
        (false, None) => None,
    };
    if req.tools.as_ref().is_some_and(|t| !t.is_null() && t.as_array().is_none_or(|a| !a.is_empty())) {
        return Err(OaiError::invalid("tools", "tools are not supported"));
    }
    let mut job = check_params(s, &req.gen, Prompt::Chat(messages)).await?;
    job.top_logprobs = top_logprobs;
    Ok(job)
}

async fn check_completion(s: &Arc<AppState>, req: &CompletionRequest) -> Result<ChatJob, OaiError> {
    let text = match &req.prompt {
        TextPrompt::One(t) => t.clone(),
        TextPrompt::Many(v) if v.len() == 1 => v[0].clone(),
        TextPrompt::Many(_) => return Err(OaiError::invalid("prompt", "prompt takes one string (a list of one)")),
    };
    if text.is_empty() {
        return Err(OaiError::invalid("prompt", "prompt must not be empty"));
    }
    if text.chars().count() > s.limits.max_text_chars {
        return Err(OaiError::invalid(
            "prompt",
            format!("prompt is longer than {} characters", s.limits.max_text_chars),
        ));
    }
    if req.logprobs.is_some_and(|n| n > 0) {
        return Err(OaiError::invalid("logprobs", "logprobs are not supported"));
    }
    if req.echo == Some(true) {
        return Err(OaiError::invalid("echo", "echo is not supported"));
    }
    if req.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(OaiError::invalid("suffix", "suffix (insertion) is not supported"));
    }
    if req.best_of.is_some_and(|n| n != 1) {
        return Err(OaiError::invalid("best_of", "only best_of = 1 is supported"));
    }
    check_params(s, &req.gen, Prompt::Text(text)).await
}

/// OpenAI's defaults where the request is silent: temperature 1, top_p 1, a fresh seed, as many tokens as
/// the server allows.
async fn check_params(s: &Arc<AppState>, req: &GenParams, prompt: Prompt) -> Result<ChatJob, OaiError> {
    let Some(id) = model_id(s) else {
        return Err(ServeError::NoModel("the chat API is").into());
    };
    if req.model != id {
        let message = format!("The model '{}' does not exist; this server has '{id}' (GET /v1/models)", req.model);
        return Err(OaiError::from(ServeError::NotFound(message)).code("model_not_found"));
    }
    let lim = &s.limits;
    let temperature = req.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(OaiError::invalid("temperature", "temperature must be between 0 and 2"));
    }
    let top_p = req.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(OaiError::invalid("top_p", "top_p must be in (0, 1]"));
    }
    let max_new_tokens = req.max_completion_tokens.or(req.max_tokens).unwrap_or(lim.max_new_tokens as u64);
    if max_new_tokens == 0 || max_new_tokens > lim.max_new_tokens as u64 {
        return Err(OaiError::invalid(
            "max_tokens",
            format!("max_tokens must be between 1 and {}", lim.max_new_tokens),
        ));
    }
    let seed = match req.seed {
        Some(v) if v < 0 => return Err(OaiError::invalid("seed", "seed must be a non-negative integer")),
        Some(v) => v as u64,
        None => rand::random(),
    };
    let stops = match &req.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if stops.len() > 4 || stops.iter().any(|s| s.is_empty() || s.chars().count() > 100) {
        return Err(OaiError::invalid("stop", "stop takes up to 4 non-empty strings of at most 100 characters"));
    }
    if req.n.is_some_and(|n| n != 1) {
        return Err(OaiError::invalid("n", "only n = 1 is supported"));
    }
    for (name, v) in [("frequency_penalty", req.frequency_penalty), ("presence_penalty", req.presence_penalty)] {
        if v.is_some_and(|v| v != 0.0) {
            return Err(OaiError::invalid(name, format!("{name} is not supported (leave it 0)")));
        }
    }
    let steer = req.saekit.as_ref().map_or(&[][..], |x| &x.steer[..]);
    // an edit the request got wrong is a bad value of `saekit.steer` here, as OpenAI reports bad fields
    let (edits, _) = resolve_edits(s, steer).await.map_err(|e| match e.status().is_client_error() {
        true => OaiError::invalid("saekit.steer", e.message()).code("invalid_steer"),
        false => e.into(),
    })?;
    let sampling = if temperature == 0.0 { Sampling::Greedy } else { Sampling::TopP { temperature, top_p } };
    let opts = GenerateOptions { max_new_tokens: max_new_tokens as usize, sampling, seed, stop_at_eos: true };
    Ok(ChatJob { prompt, opts, stops, edits, top_logprobs: None })
}

/// What the model worker reports, in order: `Rejected`, or `Started`, `Delta`s, then `Done` or `Failed`.
enum ChatEvent {
    Rejected(OaiError),
    Started { prompt_tokens: usize },
    Delta(String),
    Done { finish_reason: &'static str, completion_tokens: usize, logprobs: Option<Vec<Value>> },
    Failed(ServeError),
}

/// The reply's text as it grows: decodes all tokens so far (a character may span tokens), holds back a
/// trailing incomplete character and any tail that could begin a stop string, and cuts at the first stop.
struct TextStream {
    ids: Vec<u32>,
    emitted: usize,
    stops: Vec<String>,
}

struct Step {
    delta: String,
    stop: bool,
}

impl TextStream {
    fn new(stops: Vec<String>) -> Self {
        Self { ids: Vec::new(), emitted: 0, stops }
    }

    fn push(&mut self, tok: &Tokenizer, id: u32) -> anyhow::Result<Step> {
        if id == tok.eos_token_id() {
            return Ok(Step { delta: self.finish(tok)?, stop: true });
        }
        self.ids.push(id);
        let text = tok.decode(&self.ids)?;
        if let Some(cut) = self.stops.iter().filter_map(|s| text.find(s.as_str())).min() {
            let delta = text.get(self.emitted..cut).unwrap_or_default().to_string();
            self.emitted = cut.max(self.emitted);
            return Ok(Step { delta, stop: true });
        }
        let mut end = text.trim_end_matches('\u{FFFD}').len();
        let held = self.stops.iter().map(|s| partial_stop_len(&text[..end], s)).max().unwrap_or(0);
        end -= held;
        let delta = if end > self.emitted { text[self.emitted..end].to_string() } else { String::new() };
        self.emitted = end.max(self.emitted);
        Ok(Step { delta, stop: false })
    }

    /// Whatever was held back, when generation ends without a stop string.
    fn finish(&mut self, tok: &Tokenizer) -> anyhow::Result<String> {
        let text = tok.decode(&self.ids)?;
        let rest = text.get(self.emitted..).unwrap_or_default().to_string();
        self.emitted = text.len();
        Ok(rest)
    }
}

/// The length of the longest proper prefix of `stop` that `text` ends with (on a character boundary).
fn partial_stop_len(text: &str, stop: &str) -> usize {
    stop.char_indices().skip(1).map(|(i, _)| i).filter(|&i| text.ends_with(&stop[..i])).max().unwrap_or(0)
}

/// Runs on the model worker: tokenise (chat messages with the chat template, text as a plain prompt with
/// the tokenizer's BOS, as `saekit generate` does), check the context, generate, report.
fn run_chat(e: &Engine, job: ChatJob, tx: UnboundedSender<ChatEvent>) {
    let tok = e.model.tokenizer();
    let (param, ids) = match &job.prompt {
        Prompt::Chat(m) => ("messages", e.chat_prompt_ids(m)),
        Prompt::Text(t) => ("prompt", e.encode_text(t)),
    };
    let ids = match ids {
        Ok(ids) => ids,
        Err(err) => {
            let refused = err.status().is_client_error();
            let err = if refused { OaiError::invalid(param, err.message()) } else { err.into() };
            let _ = tx.send(ChatEvent::Rejected(err));
            return;
        }
    };
    let context = e.model.config().max_positions;
    if ids.len() + job.opts.max_new_tokens > context {
        let msg = format!(
            "This model's maximum context length is {context} tokens. However, you requested {} tokens ({} in the \
             messages, {} in the completion).",
            ids.len() + job.opts.max_new_tokens,
            ids.len(),
            job.opts.max_new_tokens
        );
        let _ = tx.send(ChatEvent::Rejected(OaiError::invalid(param, msg).code("context_length_exceeded")));
        return;
    }
    if tx.send(ChatEvent::Started { prompt_tokens: ids.len() }).is_err() {
        return;
    }
    let mut text = TextStream::new(job.stops);
    let mut finish_reason = "length";
    let mut failure = None;
    let mut logprobs = job.top_logprobs.map(|_| Vec::new());
    let generated = e.generate_streaming(&ids, &job.edits, &job.opts, |id, logits| {
        if let (Some(lp), Some(top)) = (logprobs.as_mut(), job.top_logprobs) {
            if id != tok.eos_token_id() {
                lp.push(token_logprobs(tok, id, logits, top));
            }
        }
        let step = match text.push(tok, id) {
            Ok(step) => step,
            Err(err) => {
                failure = Some(format!("{err:#}"));
                return false;
            }
        };
        if step.stop {
            finish_reason = "stop";
        }
        // a closed channel means the client went away: stop spending the model on it
        (step.delta.is_empty() || tx.send(ChatEvent::Delta(step.delta)).is_ok()) && !step.stop
    });
    let event = match (generated, failure) {
        (Err(err), _) => ChatEvent::Failed(err),
        (_, Some(msg)) => ChatEvent::Failed(ServeError::internal(msg)),
        (Ok(g), None) => {
            if finish_reason == "length" {
                match text.finish(tok) {
                    Ok(rest) if !rest.is_empty() => {
                        let _ = tx.send(ChatEvent::Delta(rest));
                    }
                    Ok(_) => {}
                    Err(err) => {
                        let _ = tx.send(ChatEvent::Failed(ServeError::Internal(err)));
                        return;
                    }
                }
            }
            ChatEvent::Done { finish_reason, completion_tokens: g.generated_ids.len(), logprobs }
        }
    };
    let _ = tx.send(event);
}

/// One chosen token in OpenAI's `logprobs.content` shape: its text, bytes and log-probability under the
/// model's distribution (before temperature and top-p), and the `top` likeliest tokens the same way.
fn token_logprobs(tok: &Tokenizer, id: u32, logits: &[f32], top: usize) -> Value {
    let log_z = saekit_model::log_sum_exp(logits);
    let entry = |t: u32| {
        let bytes = tok.token_bytes(t);
        json!({ "token": String::from_utf8_lossy(&bytes), "bytes": bytes, "logprob": logits[t as usize] as f64 - log_z })
    };
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    let top = top.min(order.len());
    if top > 0 {
        order.select_nth_unstable_by(top - 1, |&a, &b| {
            logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b))
        });
    }
    order.truncate(top);
    order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
    let mut chosen = entry(id);
    chosen["top_logprobs"] = Value::Array(order.into_iter().map(entry).collect());
    chosen
}

async fn chat_completions(State(s): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let started = async {
        let req: ChatRequest = parse_request(body, "chat")?;
        let job = check_chat(&s, &req).await?;
        start(&s, job, req.gen, Kind::Chat).await
    };
    started.await.unwrap_or_else(IntoResponse::into_response)
}

async fn completions(State(s): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let started = async {
        let req: CompletionRequest = parse_request(body, "completion")?;
        let job = check_completion(&s, &req).await?;
        start(&s, job, req.gen, Kind::Text).await
    };
    started.await.unwrap_or_else(IntoResponse::into_response)
}

async fn start(s: &Arc<AppState>, job: ChatJob, req: GenParams, kind: Kind) -> Result<Response, OaiError> {
    let queue = s.queue.as_ref().ok_or(ServeError::NoModel("the chat API is"))?;
    let (tx, mut rx) = unbounded_channel();
    // the job's own result is always Ok: it reports through `tx`
    let _done = queue.submit(move |e| {
        run_chat(e, job, tx);
        Ok(())
    })?;
    let prompt_tokens = match rx.recv().await {
        Some(ChatEvent::Started { prompt_tokens }) => prompt_tokens,
        Some(ChatEvent::Rejected(err)) => return Err(err),
        _ => return Err(ServeError::internal("the model worker stopped").into()),
    };
    let prefix = if kind == Kind::Chat { "chatcmpl" } else { "cmpl" };
    let reply = Reply {
        id: format!("{prefix}-{:016x}", rand::random::<u64>()),
        created: unix_now(),
        model: req.model.clone(),
        prompt_tokens,
        kind,
    };
    if req.stream.unwrap_or(false) {
        let include_usage = req.stream_options.and_then(|o| o.include_usage).unwrap_or(false);
        Ok(stream_reply(reply, rx, include_usage))
    } else {
        whole_reply(reply, rx).await
    }
}

/// Chat completion (a message, streamed as deltas) or text completion (text, streamed as text pieces).
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Text,
}

/// The parts of a completion every chunk repeats.
struct Reply {
    id: String,
    created: u64,
    model: String,
    prompt_tokens: usize,
    kind: Kind,
}

impl Reply {
    fn usage(&self, completion_tokens: usize) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        })
    }

    /// The whole reply's object and its one choice.
    fn whole(&self, text: String, finish_reason: &str, completion_tokens: usize) -> Value {
        let (object, choice) = match self.kind {
            Kind::Chat => (
                "chat.completion",
                json!({ "index": 0, "message": { "role": "assistant", "content": text, "refusal": null },
                        "logprobs": null, "finish_reason": finish_reason }),
            ),
            Kind::Text => (
                "text_completion",
                json!({ "index": 0, "text": text, "logprobs": null, "finish_reason": finish_reason }),
            ),
        };
        json!({
            "id": self.id, "object": object, "created": self.created, "model": self.model,
            "system_fingerprint": "saekit", "choices": [choice], "usage": self.usage(completion_tokens),
        })
    }

    /// A streamed choice: a piece of text (none on the last chunk) and the finish reason (on it only).
    fn stream_choice(&self, text: Option<String>, finish: Option<&str>) -> Value {
        match self.kind {
            Kind::Chat => {
                let delta = text.map_or(json!({}), |t| json!({ "content": t }));
                json!([{ "index": 0, "delta": delta, "finish_reason": finish }])
            }
            Kind::Text => {
                json!([{ "index": 0, "text": text.unwrap_or_default(), "logprobs": null, "finish_reason": finish }])
            }
        }
    }

    fn chunk(&self, choices: Value, usage: Option<Value>) -> Value {
        let object = if self.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" };
        let mut v = json!({
            "id": self.id, "object": object, "created": self.created, "model": self.model,
            "system_fingerprint": "saekit", "choices": choices,
        });
        if let Some(u) = usage {
            v["usage"] = u;
        }
        v
    }
}

async fn whole_reply(reply: Reply, mut rx: UnboundedReceiver<ChatEvent>) -> Result<Response, OaiError> {
    let mut content = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            ChatEvent::Delta(d) => content.push_str(&d),
            ChatEvent::Done { finish_reason, completion_tokens, logprobs } => {
                let mut whole = reply.whole(content, finish_reason, completion_tokens);
                if let Some(lp) = logprobs {
                    whole["choices"][0]["logprobs"] = json!({ "content": lp, "refusal": null });
                }
                return Ok(Json(whole).into_response());
            }
            ChatEvent::Failed(err) => return Err(err.into()),
            ChatEvent::Started { .. } | ChatEvent::Rejected(_) => {}
        }
    }
    Err(ServeError::internal("the model worker stopped mid-reply").into())
}

/// Server-sent events as OpenAI sends them: a role chunk (chat only), content chunks, a chunk with the
/// finish reason, the usage chunk when asked (`stream_options.include_usage`), then `data: [DONE]`.
fn stream_reply(reply: Reply, rx: UnboundedReceiver<ChatEvent>, include_usage: bool) -> Response {
    let mut queued = VecDeque::new();
    if reply.kind == Kind::Chat {
        let role = json!([{ "index": 0, "delta": { "role": "assistant", "content": "" }, "finish_reason": null }]);
        queued.push_back(reply.chunk(role, None));
    }
    let state = StreamState { reply, rx, queued, finished: false, include_usage };
    let chunks = futures_util::stream::unfold(state, |mut st| async move {
        let chunk = st.next().await?;
        Some((Ok::<_, Infallible>(Event::default().data(chunk.to_string())), st))
    });
    let done = futures_util::stream::once(async { Ok::<_, Infallible>(Event::default().data("[DONE]")) });
    Sse::new(chunks.chain(done)).into_response()
}

struct StreamState {
    reply: Reply,
    rx: UnboundedReceiver<ChatEvent>,
    queued: VecDeque<Value>,
    finished: bool,
    include_usage: bool,
}

impl StreamState {
    /// The next chunk to send, `None` after the last.
    async fn next(&mut self) -> Option<Value> {
        while self.queued.is_empty() && !self.finished {
            match self.rx.recv().await {
                Some(ChatEvent::Delta(d)) => {
                    self.queued.push_back(self.reply.chunk(self.reply.stream_choice(Some(d), None), None))
                }
                Some(ChatEvent::Done { finish_reason, completion_tokens, .. }) => {
                    let last = self.reply.stream_choice(None, Some(finish_reason));
                    self.queued.push_back(self.reply.chunk(last, None));
                    if self.include_usage {
                        self.queued.push_back(self.reply.chunk(json!([]), Some(self.reply.usage(completion_tokens))));
                    }
                    self.finished = true;
                }
                // mid-stream failures arrive as an error object, as OpenAI's own stream reports them
                Some(ChatEvent::Failed(err)) => {
                    self.queued.push_back(OaiError::from(err).body());
                    self.finished = true;
                }
                Some(ChatEvent::Started { .. } | ChatEvent::Rejected(_)) => {}
                None => self.finished = true,
            }
        }
        self.queued.pop_front()
    }
}
