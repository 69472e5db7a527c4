//! The OpenAI chat API (`/v1`) on the real model with a fixture database (random-init SAE). Replies are
//! checked against `/api/steer`, which generates through `saekit_steer::compare`, not the streaming path.

use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use saekit_serve::{fixture, router, AppState, Engine, Limits, ModelQueue};
use serde_json::{json, Value};
use tower::ServiceExt;

fn state() -> Arc<AppState> {
    static STATE: OnceLock<Arc<AppState>> = OnceLock::new();
    STATE
        .get_or_init(|| {
            let path = saekit_model::default_model_path();
            assert!(path.exists(), "{}: the real-model tests need SmolLM2 (scripts/fetch-model.sh)", path.display());
            let model = saekit_model::Model::load(&path, &Default::default()).expect("load model");
            let sae = fixture::random_sae(&model, "blocks.6.hook_resid_post", 256, 16, 3);
            let engine = Engine::new(model, sae).unwrap();
            let db = fixture::build_db(&engine, &fixture::FIXTURE_TEXTS[..10]).unwrap();
            let queue = ModelQueue::start(engine, 8).unwrap();
            let limits = Limits { max_new_tokens: 24, ..Default::default() };
            Arc::new(AppState::new(Arc::new(db), Some(queue), json!({"name": "smol"}), limits))
        })
        .clone()
}

async fn raw(method: &str, uri: &str, body: Option<String>) -> (StatusCode, String) {
    let req = Request::builder().method(method).uri(uri).header("content-type", "application/json");
    let resp = router(state()).oneshot(req.body(body.map_or(Body::empty(), Body::from)).unwrap()).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(bytes.to_vec()).unwrap())
}

async fn call(uri: &str, body: Value) -> (StatusCode, Value) {
    let (s, text) = raw("POST", uri, Some(body.to_string())).await;
    (s, serde_json::from_str(&text).unwrap_or_else(|_| panic!("{uri}: not JSON: {text}")))
}

fn content(v: &Value) -> &str {
    v["choices"][0]["message"]["content"].as_str().unwrap_or_else(|| panic!("no content in {v}"))
}

/// `/api/steer`'s text for the same chat prompt, without the end-of-turn token it keeps.
async fn steer_api(prompt: &str, edits: Value, temperature: f32, seed: u64, n: usize) -> (String, String) {
    let body = json!({"prompt": prompt, "chat": true, "edits": edits, "temperature": temperature, "seed": seed,
                      "max_new_tokens": n});
    let (s, v) = call("/api/steer", body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let trim = |k: &str| v[k].as_str().unwrap().trim_end_matches("<|im_end|>").to_string();
    (trim("baseline"), trim("steered"))
}

#[tokio::test]
async fn models_lists_the_served_model() {
    let (s, text) = raw("GET", "/v1/models", None).await;
    assert_eq!(s, StatusCode::OK);
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "smol");
    assert_eq!(v["data"][0]["object"], "model");
}

#[tokio::test]
async fn plain_and_steered_replies_match_the_steer_api() {
    let prompt = "Write one sentence about the sea.";
    let (_, text) = raw("GET", "/api/features?sort=max_act&limit=1", None).await;
    let id = serde_json::from_str::<Value>(&text).unwrap()["features"][0]["id"].as_u64().unwrap();
    let edits = json!([{"feature": id, "mode": "clamp", "value": 40, "unit": "max"}]);
    let (base, steered) = steer_api(prompt, edits.clone(), 0.7, 11, 20).await;
    assert_ne!(base, steered, "the fixture edit should change the text");
    let req = |steer: Option<Value>| {
        let mut b = json!({"model": "smol", "messages": [{"role": "user", "content": prompt}], "temperature": 0.7,
                           "top_p": 0.95, "seed": 11, "max_tokens": 20});
        if let Some(e) = steer {
            b["saekit"] = json!({"steer": e});
        }
        b
    };
    let (s, v) = call("/v1/chat/completions", req(None)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(content(&v), base);
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let u = &v["usage"];
    let completion = u["completion_tokens"].as_u64().unwrap();
    assert!((1..=20).contains(&completion), "{u}");
    assert_eq!(u["total_tokens"].as_u64().unwrap(), u["prompt_tokens"].as_u64().unwrap() + completion);
    let finish = v["choices"][0]["finish_reason"].as_str().unwrap();
    assert_eq!(finish == "length", completion == 20, "{v}");

    let (s, v) = call("/v1/chat/completions", req(Some(edits))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(content(&v), steered);
}

/// Parse an SSE body into its `data:` payloads.
fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|ev| ev.lines().find_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:"))))
        .map(str::to_string)
        .collect()
}

/// The JSON chunks of an SSE body, which must end with `data: [DONE]`.
fn sse_chunks(text: &str) -> Vec<Value> {
    let data = sse_data(text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{text}");
    data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect()
}

#[tokio::test]
async fn streamed_reply_equals_the_whole_one() {
    let body = json!({"model": "smol", "messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Name three colours."}], "temperature": 0, "max_tokens": 24});
    let (s, whole) = call("/v1/chat/completions", body.clone()).await;
    assert_eq!(s, StatusCode::OK, "{whole}");
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    sb["stream_options"] = json!({"include_usage": true});
    let (s, text) = raw("POST", "/v1/chat/completions", Some(sb.to_string())).await;
    assert_eq!(s, StatusCode::OK, "{text}");
    let chunks = sse_chunks(&text);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"]));
    let streamed: String =
        chunks.iter().filter_map(|c| c["choices"].get(0)?["delta"]["content"].as_str()).collect::<Vec<_>>().concat();
    assert_eq!(streamed, content(&whole));
    assert!(chunks.len() > 4, "a reply of several tokens should come in several chunks: {text}");
    let finish: Vec<&Value> = chunks.iter().filter_map(|c| c["choices"].get(0)?.get("finish_reason")).collect();
    assert_eq!(finish.iter().filter(|f| f.is_string()).count(), 1);
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage, &whole["usage"]);
    assert_eq!(chunks.last().unwrap()["choices"], json!([]));
}

#[tokio::test]
async fn stop_strings_cut_the_reply() {
    let body = json!({"model": "smol", "messages": [{"role": "user", "content": "Count from one to ten in words."}],
                      "temperature": 0, "max_tokens": 24});
    let (_, v) = call("/v1/chat/completions", body.clone()).await;
    let full = content(&v).to_string();
    // a stop string from the middle of the greedy reply (a whole word, as a client would pick)
    let words: Vec<&str> = full.split_whitespace().collect();
    assert!(words.len() >= 4, "reply too short to test stops: {full:?}");
    let stop = words[words.len() / 2];
    let expected = &full[..full.find(stop).unwrap()];
    for stream in [false, true] {
        let mut b = body.clone();
        b["stop"] = json!(["never appears", stop]);
        b["stream"] = json!(stream);
        let (s, text) = raw("POST", "/v1/chat/completions", Some(b.to_string())).await;
        assert_eq!(s, StatusCode::OK, "{text}");
        let got = if stream {
            let chunks = sse_chunks(&text);
            assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "stop");
            chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect::<Vec<_>>().concat()
        } else {
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["choices"][0]["finish_reason"], "stop");
            content(&v).to_string()
        };
        assert_eq!(got, expected, "stop {stop:?} in {full:?} (stream: {stream})");
    }
}

#[tokio::test]
async fn bad_requests_get_openai_errors() {
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let cases = [
        (json!({"messages": msgs}), StatusCode::BAD_REQUEST, "model", None),
        (json!({"model": "gpt-9", "messages": msgs}), StatusCode::NOT_FOUND, "gpt-9", Some("model_not_found")),
        (json!({"model": "smol", "messages": []}), StatusCode::BAD_REQUEST, "at least one", None),
        (json!({"model": "smol", "messages": msgs, "temperature": 3}), StatusCode::BAD_REQUEST, "temperature", None),
        (json!({"model": "smol", "messages": msgs, "top_p": 0}), StatusCode::BAD_REQUEST, "top_p", None),
        (json!({"model": "smol", "messages": msgs, "max_tokens": 25}), StatusCode::BAD_REQUEST, "max_tokens", None),
        (json!({"model": "smol", "messages": msgs, "n": 2}), StatusCode::BAD_REQUEST, "n = 1", None),
        (json!({"model": "smol", "messages": msgs, "seed": -1}), StatusCode::BAD_REQUEST, "seed", None),
        (
            json!({"model": "smol", "messages": msgs, "top_logprobs": 2}),
            StatusCode::BAD_REQUEST,
            "logprobs: true",
            None,
        ),
        (
            json!({"model": "smol", "messages": msgs, "logprobs": true, "top_logprobs": 21}),
            StatusCode::BAD_REQUEST,
            "at most 20",
            None,
        ),
        (
            json!({"model": "smol", "messages": msgs, "logprobs": true, "stream": true}),
            StatusCode::BAD_REQUEST,
            "stream",
            None,
        ),
        (
            json!({"model": "smol", "messages": [{"role": "tool", "content": "x"}]}),
            StatusCode::BAD_REQUEST,
            "tool",
            None,
        ),
        (
            json!({"model": "smol", "messages": msgs, "saekit": {"steer": [{"feature": 999, "mode": "clamp", "value": 1}]}}),
            StatusCode::BAD_REQUEST,
            "999",
            Some("invalid_steer"),
        ),
        (
            json!({"model": "smol", "messages": msgs, "saekit": {"steer": [{"feature": 1, "mode": "melt", "value": 1}]}}),
            StatusCode::BAD_REQUEST,
            "melt",
            Some("invalid_steer"),
        ),
    ];
    for (body, status, needle, code) in cases {
        let (s, v) = call("/v1/chat/completions", body.clone()).await;
        assert_eq!(s, status, "{body} -> {v}");
        let e = &v["error"];
        assert!(e["message"].as_str().unwrap().contains(needle), "{body} -> {v}");
        assert!(e["type"].is_string() && e.get("param").is_some(), "{v}");
        if let Some(c) = code {
            assert_eq!(e["code"], c, "{v}");
        }
    }
    let (s, text) = raw("POST", "/v1/chat/completions", Some("{not json".into())).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["error"]["type"], "invalid_request_error");
    let (s, text) = raw("POST", "/v1/embeddings", Some("{}".into())).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(serde_json::from_str::<Value>(&text).unwrap()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("/v1/embeddings"));
    let text_cases = [
        (json!({"model": "smol"}), "prompt"),
        (json!({"model": "smol", "prompt": ""}), "empty"),
        (json!({"model": "smol", "prompt": ["a", "b"]}), "one string"),
        (json!({"model": "smol", "prompt": "a", "echo": true}), "echo"),
        (json!({"model": "smol", "prompt": "a", "best_of": 3}), "best_of"),
        (json!({"model": "smol", "prompt": "a", "temperature": -1}), "temperature"),
    ];
    for (body, needle) in text_cases {
        let (s, v) = call("/v1/completions", body.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body} -> {v}");
        assert!(v["error"]["message"].as_str().unwrap().contains(needle), "{body} -> {v}");
    }
}

/// `/v1/completions` continues plain text: the same tokens as `/api/steer` without the chat template
/// (prompt tokenised with BOS, as `saekit generate` does), whole and streamed, steered or not.
#[tokio::test]
async fn text_completions_continue_the_prompt_like_the_steer_api() {
    let prompt = "The capital of France is";
    let (_, text) = raw("GET", "/api/features?sort=max_act&limit=1", None).await;
    let id = serde_json::from_str::<Value>(&text).unwrap()["features"][0]["id"].as_u64().unwrap();
    let edits = json!([{"feature": id, "mode": "clamp", "value": 40, "unit": "max"}]);
    let body = json!({"prompt": prompt, "chat": false, "edits": edits, "temperature": 0.7, "seed": 5,
                      "max_new_tokens": 12});
    let (s, v) = call("/api/steer", body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // `/api/steer` keeps the end token (SmolLM2-Instruct's EOS is `<|im_end|>`); the API's text does not
    let trim = |k: &str| v[k].as_str().unwrap().trim_end_matches("<|im_end|>").to_string();
    let (base, steered) = (trim("baseline"), trim("steered"));
    assert_ne!(base, steered);

    // `/api/steer` samples with top_p 0.95
    let req =
        json!({"model": "smol", "prompt": prompt, "temperature": 0.7, "top_p": 0.95, "seed": 5, "max_tokens": 12});
    let (s, whole) = call("/v1/completions", req.clone()).await;
    assert_eq!(s, StatusCode::OK, "{whole}");
    assert_eq!(whole["object"], "text_completion");
    assert!(whole["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(whole["choices"][0]["text"].as_str().unwrap(), base);
    let u = &whole["usage"];
    let completion = u["completion_tokens"].as_u64().unwrap();
    assert!((1..=12).contains(&completion), "{u}");
    assert_eq!(u["total_tokens"].as_u64().unwrap(), u["prompt_tokens"].as_u64().unwrap() + completion);

    let mut sb = req.clone();
    sb["stream"] = json!(true);
    sb["stream_options"] = json!({"include_usage": true});
    let (s, text) = raw("POST", "/v1/completions", Some(sb.to_string())).await;
    assert_eq!(s, StatusCode::OK, "{text}");
    let chunks = sse_chunks(&text);
    assert!(chunks.iter().all(|c| c["object"] == "text_completion"), "{text}");
    let streamed: String = chunks.iter().filter_map(|c| c["choices"].get(0)?["text"].as_str()).collect();
    assert_eq!(streamed, base);
    assert_eq!(chunks.last().unwrap()["usage"], whole["usage"]);

    let mut steer = req;
    steer["saekit"] = json!({"steer": edits});
    let (s, v) = call("/v1/completions", steer).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["choices"][0]["text"].as_str().unwrap(), steered);
}

/// `logprobs: true`: each chosen token's log-probability and its `top_logprobs`, in OpenAI's shape. The
/// first token's numbers are checked against the model's own last-position logits, log-softmaxed here in
/// f64; greedy decoding must choose the likeliest token every time.
#[tokio::test]
async fn logprobs_are_the_model_distribution() {
    let prompt = "Name a colour.";
    let body = json!({"model": "smol", "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                      "max_tokens": 4, "logprobs": true, "top_logprobs": 5});
    let (s, v) = call("/v1/chat/completions", body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let tokens = v["choices"][0]["logprobs"]["content"].as_array().unwrap_or_else(|| panic!("{v}"));
    assert!(!tokens.is_empty() && tokens.len() <= 4, "{v}");
    let joined: String = tokens.iter().map(|t| t["token"].as_str().unwrap()).collect();
    assert_eq!(joined, content(&v), "the tokens spell the reply");
    for t in tokens {
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 5, "{t}");
        assert_eq!(top[0]["token"], t["token"], "greedy picks the likeliest: {t}");
        let lps: Vec<f64> = top.iter().map(|x| x["logprob"].as_f64().unwrap()).collect();
        assert!(lps.windows(2).all(|w| w[0] >= w[1]) && lps.iter().map(|l| l.exp()).sum::<f64>() <= 1.0 + 1e-9, "{t}");
        let bytes: Vec<u8> = t["bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u8).collect();
        assert_eq!(String::from_utf8_lossy(&bytes), t["token"].as_str().unwrap());
    }

    let model = saekit_model::Model::load(&saekit_model::default_model_path(), &Default::default()).unwrap();
    let tok = model.tokenizer();
    let text = tok.apply_chat_template(&[saekit_model::ChatMessage::user(prompt)]).unwrap();
    let ids = tok.encode(&text, false).unwrap();
    let logits = model
        .forward(&ids, 1, &mut model.new_cache(1), &mut saekit_model::Hooks::new(), saekit_model::Logits::Last)
        .unwrap();
    let max = logits.iter().fold(f64::NEG_INFINITY, |m, &z| m.max(z as f64));
    let log_z = max + logits.iter().map(|&z| (z as f64 - max).exp()).sum::<f64>().ln();
    let first = &tokens[0]["top_logprobs"];
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    for (rank, &id) in order.iter().take(5).enumerate() {
        let want = logits[id] as f64 - log_z;
        let got = first[rank]["logprob"].as_f64().unwrap();
        assert!((got - want).abs() < 1e-4, "rank {rank}: {got} vs {want}");
        assert_eq!(first[rank]["token"].as_str().unwrap(), String::from_utf8_lossy(&tok.token_bytes(id as u32)));
    }
}
