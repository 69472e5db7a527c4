//! The JSON API on the real model with a fixture feature database (random-init SAE, real activations).

use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use saekit_serve::{fixture, router, AppState, Engine, Limits, MemoryDb, ModelQueue};
use serde_json::{json, Value};
use tower::ServiceExt;

fn load_model() -> saekit_model::Model {
    let path = saekit_model::default_model_path();
    assert!(path.exists(), "{}: the real-model tests need SmolLM2 (run scripts/fetch-model.sh)", path.display());
    saekit_model::Model::load(&path, &Default::default()).expect("load model")
}

/// One model, SAE and database for every test in this binary.
fn state() -> Arc<AppState> {
    static STATE: OnceLock<Arc<AppState>> = OnceLock::new();
    STATE
        .get_or_init(|| {
            let model = load_model();
            let sae = fixture::random_sae(&model, "blocks.6.hook_resid_post", 256, 16, 3);
            let engine = Engine::new(model, sae).unwrap();
            let db = fixture::build_db(&engine, &fixture::FIXTURE_TEXTS[..10]).unwrap();
            let queue = ModelQueue::start(engine, 4).unwrap();
            let limits = Limits { max_new_tokens: 16, ..Default::default() };
            Arc::new(AppState::new(Arc::new(db), Some(queue), json!({"name": "test"}), limits))
        })
        .clone()
}

async fn call(method: &str, uri: &str, body: Option<Value>) -> (StatusCode, Value) {
    let req = Request::builder().method(method).uri(uri).header("content-type", "application/json");
    let req = req.body(body.map_or(Body::empty(), |b| Body::from(b.to_string()))).unwrap();
    let resp = router(state()).oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| panic!("{uri}: not JSON: {}", String::from_utf8_lossy(&bytes)));
    (status, v)
}

fn error_of(v: &Value) -> &str {
    v["error"].as_str().unwrap_or_else(|| panic!("no error message in {v}"))
}

#[tokio::test]
async fn info_and_lists() {
    let (s, v) = call("GET", "/api/info", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["n_features"], 256);
    assert_eq!(v["live"], true);
    let (s, v) = call("GET", "/api/features?sort=density&order=desc&limit=20", None).await;
    assert_eq!(s, StatusCode::OK);
    let rows = v["features"].as_array().unwrap();
    assert_eq!(rows.len(), 20);
    let d: Vec<f64> = rows.iter().map(|r| r["density"].as_f64().unwrap()).collect();
    assert!(d.windows(2).all(|w| w[0] >= w[1]), "not sorted by density: {d:?}");
    let (s, v) = call("GET", "/api/features?sort=max_act&order=asc&offset=250&limit=20", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["features"].as_array().unwrap().len(), 6);
    let (s, v) = call("GET", "/api/features?sort=loudness", None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(error_of(&v).contains("loudness"));
    let (s, v) = call("GET", "/api/map", None).await;
    assert_eq!(s, StatusCode::OK);
    let points = v["points"].as_array().unwrap();
    assert_eq!(points.len(), 256);
    let mut keys: Vec<&str> = points[0].as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["density", "id", "max_act", "x", "y"]);
    // PCA coordinates scaled to [-1, 1], not all at the origin
    let xs: Vec<f64> = points.iter().map(|p| p["x"].as_f64().unwrap()).collect();
    assert!(xs.iter().all(|x| x.abs() <= 1.0001) && xs.iter().any(|x| x.abs() > 0.5), "{xs:?}");
}

#[tokio::test]
async fn feature_record_and_bad_ids() {
    // the densest feature surely has contexts
    let (_, v) = call("GET", "/api/features?sort=density&limit=1", None).await;
    let id = v["features"][0]["id"].as_u64().unwrap();
    let (s, f) = call("GET", &format!("/api/features/{id}"), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(f["id"], id);
    // the pages and the README's API table read exactly these keys (the map coordinates live in /api/map)
    let mut got: Vec<&str> = f.as_object().unwrap().keys().map(String::as_str).collect();
    got.sort_unstable();
    let mut want = vec![
        "id",
        "density",
        "max_act",
        "mean_act",
        "n_fired",
        "explanation",
        "explanation_auto",
        "explanations",
        "top_contexts",
        "quantiles",
        "histogram",
        "promoted",
        "suppressed",
        "neighbours",
    ];
    want.sort_unstable();
    assert_eq!(got, want);
    let top = f["top_contexts"].as_array().unwrap();
    assert!(!top.is_empty());
    let c = &top[0];
    let peak = c["peak"].as_u64().unwrap() as usize;
    assert_eq!(c["tokens"].as_array().unwrap().len(), c["acts"].as_array().unwrap().len());
    assert_eq!(c["acts"][peak].as_f64().unwrap() as f32, f["max_act"].as_f64().unwrap() as f32);
    assert_eq!(f["promoted"].as_array().unwrap().len(), 10);
    assert_eq!(f["neighbours"].as_array().unwrap().len(), 10);
    let h = &f["histogram"];
    assert_eq!(h["edges"].as_array().unwrap().len(), h["counts"].as_array().unwrap().len() + 1);
    assert!(!f["quantiles"].as_array().unwrap().is_empty());

    let (s, v) = call("GET", "/api/features/256", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(error_of(&v).contains("0 to 255"), "{v}");
    let (s, v) = call("GET", "/api/features/golden", None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(error_of(&v).contains("not a feature id"));
    let (s, v) = call("GET", "/api/nothing-here", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    error_of(&v);
}

#[tokio::test]
async fn search_by_word_and_id() {
    let (s, v) = call("GET", "/api/search?q=Bridge", None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(!v["features"].as_array().unwrap().is_empty(), "no feature fires on 'Bridge' in its contexts: {v}");
    let (_, v) = call("GET", "/api/search?q=17", None).await;
    assert_eq!(v["id"], 17);
    let (s, v) = call("GET", "/api/search?q=%20", None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    error_of(&v);
}

#[tokio::test]
async fn live_text_with_logit_lens() {
    let (s, v) = call("POST", "/api/live", Some(json!({"text": "The capital of France is Paris", "feature": 5}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let n = v["tokens"].as_array().unwrap().len();
    assert!(n >= 6);
    assert_eq!(v["feature_acts"].as_array().unwrap().len(), n);
    assert_eq!(v["top_features"].as_array().unwrap().len(), n);
    let lens = v["lens"].as_array().unwrap();
    assert_eq!(lens.len(), 30, "one row per layer");
    assert_eq!(lens[29].as_array().unwrap().len(), n);
    // the last layer's lens is the model's own prediction: after "The capital of France is" comes " Paris"
    let pred = lens[29][n - 2]["token"].as_str().unwrap();
    assert_eq!(pred.trim(), "Paris", "final-layer lens predicted {pred:?}");

    let (s, v) = call("POST", "/api/live", Some(json!({"text": "hello", "lens": false}))).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["lens"].as_array().unwrap().len(), 0);
}

#[tokio::test]
async fn live_text_rejects_bad_input() {
    let (s, v) = call("POST", "/api/live", Some(json!({"text": "   "}))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(error_of(&v).contains("empty"));
    let (s, v) = call("POST", "/api/live", Some(json!({"text": "hi", "feature": 9999}))).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    error_of(&v);
    let (s, v) = call("POST", "/api/live", Some(json!({"txt": "typo"}))).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    error_of(&v);
    let long = "word ".repeat(300);
    let (s, v) = call("POST", "/api/live", Some(json!({"text": long, "lens": false}))).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(error_of(&v).contains("limit"), "{v}");
    let huge = "x".repeat(70_000);
    let (s, v) = call("POST", "/api/live", Some(json!({ "text": huge }))).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    error_of(&v);
}

#[tokio::test]
async fn steering_changes_the_generation() {
    let (_, v) = call("GET", "/api/features?sort=max_act&limit=1", None).await;
    let id = v["features"][0]["id"].as_u64().unwrap();
    let body = json!({"prompt": "The weather today is", "chat": false, "max_new_tokens": 12,
                      "edits": [{"feature": id, "mode": "clamp", "value": 40, "unit": "max"}]});
    let (s, v) = call("POST", "/api/steer", Some(body)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (b, st) = (v["baseline"].as_str().unwrap(), v["steered"].as_str().unwrap());
    assert!(!b.is_empty());
    assert_ne!(b, st, "a 40x clamp left the generation unchanged");
    assert!(v["edits"][0]["value"].as_f64().unwrap() > 0.0);

    // no edits: the same model on both sides
    let (s, v) = call("POST", "/api/steer", Some(json!({"prompt": "Hello", "edits": [], "max_new_tokens": 6}))).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["baseline"], v["steered"]);
}

#[tokio::test]
async fn steering_rejects_bad_input() {
    let cases = [
        (json!({"prompt": "x", "edits": [], "max_new_tokens": 17}), StatusCode::BAD_REQUEST, "max_new_tokens"),
        (
            json!({"prompt": "x", "edits": [{"feature": 999, "mode": "clamp", "value": 1}]}),
            StatusCode::NOT_FOUND,
            "999",
        ),
        (
            json!({"prompt": "x", "edits": [{"feature": 1, "mode": "melt", "value": 1}]}),
            StatusCode::BAD_REQUEST,
            "melt",
        ),
        (
            json!({"prompt": "x", "edits": [{"feature": 1, "mode": "add", "value": 1e9}]}),
            StatusCode::BAD_REQUEST,
            "finite",
        ),
        (json!({"prompt": "", "edits": []}), StatusCode::BAD_REQUEST, "empty"),
        (json!({"prompt": "x", "edits": [], "temperature": -1}), StatusCode::BAD_REQUEST, "temperature"),
    ];
    for (body, status, needle) in cases {
        let (s, v) = call("POST", "/api/steer", Some(body.clone())).await;
        assert_eq!(s, status, "{body} -> {v}");
        assert!(error_of(&v).contains(needle), "{body} -> {v}");
    }
}

#[tokio::test]
async fn steering_limits_hold_after_resolution() {
    // "max" units are multiplied out before the ±1000 limit is checked again
    let (_, v) = call("GET", "/api/features?sort=max_act&limit=1", None).await;
    let (id, max) = (v["features"][0]["id"].as_u64().unwrap(), v["features"][0]["max_act"].as_f64().unwrap());
    assert!(max > 1.0, "the fixture's strongest feature should peak above 1 (got {max})");
    let body = json!({"prompt": "x", "edits": [{"feature": id, "mode": "clamp", "value": 1000, "unit": "max"}]});
    let (s, v) = call("POST", "/api/steer", Some(body)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(error_of(&v).contains("outside ±1000"), "{v}");
    // a prompt within the character limit but past the token limit is refused before generating
    let long = "word ".repeat(300);
    let (s, v) = call("POST", "/api/steer", Some(json!({"prompt": long, "edits": [], "max_new_tokens": 1}))).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(error_of(&v).contains("the limit is 256"), "{v}");
}

#[tokio::test]
async fn pages_are_embedded_with_a_strict_policy() {
    for uri in ["/", "/feature/3", "/live", "/steer", "/static/app.js", "/static/style.css"] {
        let resp = router(state()).oneshot(Request::get(uri).body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{uri}");
        let csp = resp.headers().get("content-security-policy").unwrap().to_str().unwrap();
        assert!(csp.contains("default-src 'self'"));
    }
    // no path reaches the file system
    for uri in ["/static/../Cargo.toml", "/static/%2e%2e/Cargo.toml", "/etc/passwd"] {
        let resp = router(state()).oneshot(Request::get(uri).body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{uri}");
    }
}

#[tokio::test]
async fn a_full_queue_answers_busy_at_once() {
    let model = load_model();
    let sae = fixture::random_sae(&model, "blocks.2.hook_resid_post", 64, 4, 1);
    let queue = Arc::new(ModelQueue::start(Engine::new(model, sae).unwrap(), 2).unwrap());
    let mut handles = Vec::new();
    for _ in 0..8 {
        let q = queue.clone();
        handles.push(tokio::spawn(async move {
            q.run(|_| {
                std::thread::sleep(std::time::Duration::from_millis(150));
                Ok(())
            })
            .await
        }));
    }
    let mut ok = 0;
    let mut busy = 0;
    for h in handles {
        match h.await.unwrap() {
            Ok(()) => ok += 1,
            Err(saekit_serve::ServeError::Busy(_)) => busy += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert!((1..=3).contains(&ok), "one running + two waiting at most, got {ok} ok");
    assert_eq!(ok + busy, 8);
}

#[tokio::test]
async fn database_only_server_turns_live_pages_off() {
    let db = MemoryDb::default();
    let st = Arc::new(AppState::new(Arc::new(db), None, Value::Null, Limits::default()));
    let req = Request::post("/api/live").header("content-type", "application/json");
    let resp = router(st).oneshot(req.body(Body::from(r#"{"text":"hi"}"#)).unwrap()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn a_server_without_transcoders_says_how_to_turn_graphs_on() {
    let (s, v) = call("POST", "/api/graph", Some(json!({"prompt": "The capital of France is"}))).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    assert!(error_of(&v).contains("--transcoders"), "{v}");
}
