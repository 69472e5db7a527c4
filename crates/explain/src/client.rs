//! A blocking client for `POST {endpoint}/chat/completions`, the one call autointerp needs.
//!
//! Retries (with exponential backoff, honouring `Retry-After`) what a server says is temporary: 429, any
//! 5xx, timeouts and refused or dropped connections. Stops at once, with a message saying what to fix, on
//! 401/403 (the key) and 404 (the URL or the model name): every later request would fail the same way.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// One chat message as the API takes it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The message's text.
    pub content: String,
}

impl Message {
    /// A system message.
    pub fn system(c: impl Into<String>) -> Self {
        Self { role: "system".into(), content: c.into() }
    }
    /// A user message.
    pub fn user(c: impl Into<String>) -> Self {
        Self { role: "user".into(), content: c.into() }
    }
    /// An assistant message (a worked example's answer).
    pub fn assistant(c: impl Into<String>) -> Self {
        Self { role: "assistant".into(), content: c.into() }
    }
}

/// Where the chat API is and how patiently to call it.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// The API base, as OpenAI clients take it: `http://127.0.0.1:8000/v1`.
    pub endpoint: String,
    /// The model to ask for (the request's `model`).
    pub model: String,
    /// Sent as a bearer token when given.
    pub api_key: Option<String>,
    /// Whole-request limit (connect, send, generate, read).
    pub timeout: Duration,
    /// Attempts after the first for a temporary failure.
    pub retries: u32,
    /// The first backoff; each retry doubles it (capped at a minute).
    pub backoff: Duration,
}

/// One reply of the chat API.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChatReply {
    /// The assistant's message.
    pub text: String,
    /// Prompt tokens, as the API reports them.
    pub prompt_tokens: u64,
    /// Completion tokens, as the API reports them.
    pub completion_tokens: u64,
    /// The first token's likeliest alternatives and their log-probabilities, when they were asked for
    /// ([`ChatClient::first_token_logprobs`]).
    pub top_logprobs: Vec<(String, f64)>,
}

/// Why a chat request gave no reply.
#[derive(Debug, Clone, PartialEq)]
pub enum ChatError {
    /// Nothing later can succeed (bad key, wrong URL or model): stop the whole run.
    Fatal(String),
    /// This request failed (after retries, or the server refused it as malformed).
    Failed(String),
}

impl std::fmt::Display for ChatError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChatError::Fatal(m) | ChatError::Failed(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for ChatError {}

/// A blocking client of an OpenAI-compatible chat completions API, with retries and backoff.
pub struct ChatClient {
    agent: ureq::Agent,
    url: String,
    opts: ClientOptions,
}

/// What one attempt came to.
enum Attempt {
    Done(ChatReply),
    Retry { why: String, after: Option<Duration> },
    Stop(ChatError),
}

impl ChatClient {
    /// A client for `opts.endpoint` (plain http only); refuses what cannot be a chat API's URL.
    pub fn new(opts: ClientOptions) -> Result<ChatClient, ChatError> {
        let base = opts.endpoint.trim_end_matches('/');
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(ChatError::Fatal(format!("--endpoint {base}: give a URL such as http://127.0.0.1:8000/v1")));
        }
        if base.starts_with("https://") {
            return Err(ChatError::Fatal(format!(
                "--endpoint {base}: this build speaks plain http only; reach an https API through a local \
                 OpenAI-compatible proxy (e.g. LiteLLM) on http://127.0.0.1"
            )));
        }
        let agent: ureq::Agent =
            ureq::Agent::config_builder().timeout_global(Some(opts.timeout)).http_status_as_error(false).build().into();
        Ok(ChatClient { agent, url: format!("{base}/chat/completions"), opts })
    }

    /// The model the client asks for.
    pub fn model(&self) -> &str {
        &self.opts.model
    }

    /// One chat completion at temperature 0 (delphi's default for explainer and scorers), retried as the
    /// module doc says.
    pub fn chat(&self, messages: &[Message], max_tokens: u32) -> Result<ChatReply, ChatError> {
        let body = json!({
            "model": self.opts.model,
            "messages": messages,
            "temperature": 0,
            "max_tokens": max_tokens,
            "seed": 0,
        });
        self.send(body.to_string())
    }

    /// One token at temperature 0 with the `top` likeliest first tokens and their log-probabilities
    /// (`logprobs: true`, `top_logprobs`; delphi's `log_prob` scoring), retried as [`ChatClient::chat`].
    pub fn first_token_logprobs(&self, messages: &[Message], top: u32) -> Result<ChatReply, ChatError> {
        let body = json!({
            "model": self.opts.model,
            "messages": messages,
            "temperature": 0,
            "max_tokens": 1,
            "seed": 0,
            "logprobs": true,
            "top_logprobs": top,
        });
        self.send(body.to_string())
    }

    fn send(&self, body: String) -> Result<ChatReply, ChatError> {
        let mut wait = self.opts.backoff;
        let mut last = String::new();
        for attempt in 0..=self.opts.retries {
            match self.attempt(&body) {
                Attempt::Done(r) => return Ok(r),
                Attempt::Stop(e) => return Err(e),
                Attempt::Retry { why, after } => {
                    last = why;
                    if attempt < self.opts.retries {
                        let pause = after.unwrap_or(wait).min(Duration::from_secs(60));
                        tracing::debug!(attempt, ?pause, "retrying: {last}");
                        std::thread::sleep(pause);
                        wait = (wait * 2).min(Duration::from_secs(60));
                    }
                }
            }
        }
        Err(ChatError::Failed(format!("{} after {} attempts: {last}", self.url, self.opts.retries + 1)))
    }

    fn attempt(&self, body: &str) -> Attempt {
        let mut req = self.agent.post(&self.url).header("Content-Type", "application/json");
        if let Some(k) = &self.opts.api_key {
            req = req.header("Authorization", format!("Bearer {k}"));
        }
        let mut resp = match req.send(body) {
            Ok(r) => r,
            Err(e) => return Attempt::Retry { why: format!("{e}"), after: None },
        };
        let status = resp.status().as_u16();
        let after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(Duration::from_secs_f64);
        let text = match resp.body_mut().read_to_string() {
            Ok(t) => t,
            Err(e) => return Attempt::Retry { why: format!("reading the reply: {e}"), after: None },
        };
        classify(status, &text, after, &self.url, &self.opts.model)
    }
}

/// Turn a status and body into a reply, a retry or a stop.
fn classify(status: u16, text: &str, after: Option<Duration>, url: &str, model: &str) -> Attempt {
    let message = || {
        serde_json::from_str::<Value>(text)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| text.chars().take(300).collect())
    };
    match status {
        200 => match parse_reply(text) {
            Ok(r) => Attempt::Done(r),
            Err(e) => Attempt::Stop(ChatError::Failed(format!("{url}: {e}"))),
        },
        401 | 403 => Attempt::Stop(ChatError::Fatal(format!(
            "{url} answered {status}: {}; check the API key (--api-key-env, default $OPENAI_API_KEY)",
            message()
        ))),
        404 => Attempt::Stop(ChatError::Fatal(format!(
            "{url} answered 404: {}; check --endpoint (it should end in /v1) and --model '{model}'",
            message()
        ))),
        408 | 409 | 429 | 500..=599 => Attempt::Retry { why: format!("{status}: {}", message()), after },
        _ => Attempt::Stop(ChatError::Failed(format!("{url} answered {status}: {}", message()))),
    }
}

fn parse_reply(text: &str) -> Result<ChatReply, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("the reply is not JSON: {e}"))?;
    let content = v["choices"][0]["message"]["content"].as_str().ok_or_else(|| {
        format!("the reply has no choices[0].message.content: {}", text.chars().take(200).collect::<String>())
    })?;
    let n = |k: &str| v["usage"][k].as_u64().unwrap_or(0);
    let top = v["choices"][0]["logprobs"]["content"][0]["top_logprobs"].as_array().cloned().unwrap_or_default();
    let top_logprobs =
        top.iter().filter_map(|t| Some((t["token"].as_str()?.to_string(), t["logprob"].as_f64()?))).collect();
    Ok(ChatReply {
        text: content.to_string(),
        prompt_tokens: n("prompt_tokens"),
        completion_tokens: n("completion_tokens"),
        top_logprobs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first token's alternatives as OpenAI's chat API returns them (`logprobs.content[0].top_logprobs`).
    #[test]
    fn first_token_alternatives_are_read_from_openais_shape() {
        let reply = r#"{"choices":[{"message":{"content":" Yes"},"logprobs":{"content":[{"token":" Yes","logprob":-0.3,
            "bytes":[32,89,101,115],"top_logprobs":[{"token":" Yes","logprob":-0.3,"bytes":[32,89,101,115]},
            {"token":" No","logprob":-1.5,"bytes":[32,78,111]}]}]}}],"usage":{"prompt_tokens":9,"completion_tokens":1}}"#;
        let r = parse_reply(reply).unwrap();
        assert_eq!(r.top_logprobs, [(" Yes".to_string(), -0.3), (" No".to_string(), -1.5)]);
        let plain = r#"{"choices":[{"message":{"content":"hi"},"logprobs":null}]}"#;
        assert!(parse_reply(plain).unwrap().top_logprobs.is_empty());
    }

    #[test]
    fn statuses_map_to_retry_or_stop() {
        let ok = r#"{"choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":3,"completion_tokens":1}}"#;
        assert!(
            matches!(classify(200, ok, None, "u", "m"), Attempt::Done(r) if r.text == "hi" && r.prompt_tokens == 3)
        );
        let err = r#"{"error":{"message":"bad key","type":"invalid_request_error"}}"#;
        assert!(
            matches!(classify(401, err, None, "u", "m"), Attempt::Stop(ChatError::Fatal(m)) if m.contains("bad key"))
        );
        assert!(
            matches!(classify(404, err, None, "u", "m"), Attempt::Stop(ChatError::Fatal(m)) if m.contains("--model 'm'"))
        );
        for s in [429, 500, 503] {
            assert!(matches!(classify(s, err, None, "u", "m"), Attempt::Retry { .. }), "{s}");
        }
        assert!(matches!(classify(400, err, None, "u", "m"), Attempt::Stop(ChatError::Failed(_))));
        assert!(matches!(classify(200, "{}", None, "u", "m"), Attempt::Stop(ChatError::Failed(_))));
    }
}
