//! `POST /api/graph` and `/api/graph/intervene` on the real model with the fixture's random transcoder set:
//! the graph's feature activations and hover tokens against independent computations, interventions against
//! the unedited model, and bad requests refused with the right status.

use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use saekit_model::HookPoint;
use saekit_serve::{fixture, router, AppState, Engine, Limits, MemoryDb, ModelQueue};
use serde_json::{json, Value};
use tower::ServiceExt;

const PROMPT: &str = "The capital of France is";

fn load_model() -> saekit_model::Model {
    let path = saekit_model::default_model_path();
    assert!(path.exists(), "{}: the real-model tests need SmolLM2 (run scripts/fetch-model.sh)", path.display());
    saekit_model::Model::load(&path, &Default::default()).expect("load model")
}

/// The server's model with the fixture transcoders; the test's own model for the independent checks.
fn state() -> &'static (Arc<AppState>, saekit_model::Model) {
    static STATE: OnceLock<(Arc<AppState>, saekit_model::Model)> = OnceLock::new();
    STATE.get_or_init(|| {
        let model = load_model();
        let transcoders = fixture::random_transcoders(&model, 64, 4, 11);
        let sae = fixture::random_sae(&model, "blocks.6.hook_resid_post", 64, 8, 3);
        let engine = Engine::new(model, sae).unwrap().with_transcoders(transcoders).unwrap();
        let queue = ModelQueue::start(engine, 4).unwrap();
        let db = MemoryDb::default();
        let state = Arc::new(AppState::new(Arc::new(db), Some(queue), json!({"name": "test"}), Limits::default()));
        (state, load_model())
    })
}

async fn call(uri: &str, body: Value) -> (StatusCode, Value) {
    let req = Request::builder().method("POST").uri(uri).header("content-type", "application/json");
    let resp = router(state().0.clone()).oneshot(req.body(Body::from(body.to_string())).unwrap()).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or_else(|_| panic!("{uri}: not JSON")))
}

/// `(layer, feature, position)` of a feature node id `"{layer}_{feature}_{pos}"`.
fn node_key(node: &Value) -> (usize, usize, usize) {
    let parts: Vec<usize> = node["node_id"].as_str().unwrap().split('_').map(|p| p.parse().unwrap()).collect();
    (parts[0], parts[1], parts[2])
}

async fn feature_nodes() -> Vec<Value> {
    let (s, g) = call("/api/graph", json!({"prompt": PROMPT, "node_threshold": 0.95})).await;
    assert_eq!(s, StatusCode::OK, "{g}");
    assert_eq!(g["metadata"]["prompt"], PROMPT);
    assert!(g["links"].as_array().unwrap().len() > 10);
    let share = g["metadata"]["error_influence_share"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&share), "{share}");
    let feats: Vec<Value> = g["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["feature_type"] == "cross layer transcoder")
        .cloned()
        .collect();
    assert!(!feats.is_empty(), "no feature node kept at node_threshold 0.95");
    feats
}

#[tokio::test]
async fn feature_nodes_carry_their_activation_and_promoted_tokens() {
    let feats = feature_nodes().await;
    let model = &state().1;
    let set = fixture::random_transcoders(model, 64, 4, 11);
    let ids = model.tokenizer().encode(PROMPT, true).unwrap();
    let (d, vocab) = (model.config().d_model, model.config().vocab_size);
    let gain = model.final_norm_gain().unwrap();
    for node in feats.iter().take(3) {
        let (layer, feature, pos) = node_key(node);
        let tc = &set.layers[layer];
        // the activation: the transcoder on the MLP input the model computes, captured by a hook
        let cache = model.run_with_cache(&ids, 1, &[HookPoint::Ln2Normalized(layer)]).unwrap();
        let x = cache.get(&HookPoint::Ln2Normalized(layer)).unwrap();
        let acts = tc.encode(&x[pos * d..(pos + 1) * d]);
        let got = node["activation"].as_f64().unwrap();
        assert!((got - acts[feature] as f64).abs() <= 1e-3 * (1.0 + got.abs()), "{node}: activation {}", acts[feature]);
        // the promoted tokens: W_U · (w_dec ⊙ gain) in f64, sorted by logit
        let w = &tc.w_dec[feature * d..(feature + 1) * d];
        let u = model.unembedding();
        let mut logits: Vec<(f64, usize)> = (0..vocab)
            .map(|v| ((0..d).map(|i| u[v * d + i] as f64 * (w[i] * gain[i]) as f64).sum::<f64>(), v))
            .collect();
        logits.sort_by(|a, b| b.0.total_cmp(&a.0));
        let want: Vec<String> = logits[..5]
            .iter()
            .map(|&(_, v)| model.tokenizer().decode(&[v as u32]).unwrap().replace('\n', "⏎").replace('\t', "→"))
            .collect();
        let got: Vec<String> = serde_json::from_value(node["top_tokens"].clone()).unwrap();
        assert_eq!(got, want, "{node}");
    }
}

#[tokio::test]
async fn clamping_a_node_to_its_own_activation_changes_nothing_and_a_large_clamp_does() {
    let feats = feature_nodes().await;
    let node = &feats[0];
    let (layer, feature, pos) = node_key(node);
    let own = node["activation"].as_f64().unwrap();
    let edit = |value: f64| json!({"prompt": PROMPT, "edits": [{"feature": feature, "layer": layer, "pos": pos, "value": value}]});
    let (s, r) = call("/api/graph/intervene", edit(own)).await;
    assert_eq!(s, StatusCode::OK, "{r}");
    let probs = |v: &Value| -> Vec<(String, f64)> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|t| (t["token"].as_str().unwrap().to_string(), t["prob"].as_f64().unwrap()))
            .collect()
    };
    let (before, after) = (probs(&r["before"]), probs(&r["after"]));
    assert_eq!(before.len(), 5);
    for (b, a) in before.iter().zip(&after) {
        assert!(b.0 == a.0 && (b.1 - a.1).abs() < 1e-4, "clamping to its own activation moved {b:?} to {a:?}");
    }
    let (s, r) = call("/api/graph/intervene", edit(200.0)).await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_ne!(probs(&r["after"]), before, "a clamp at 200 changed none of the top tokens");
}

#[tokio::test]
async fn bad_graph_requests_are_refused_with_their_reason() {
    let node = |layer: usize, feature: usize, pos: usize| json!({"prompt": PROMPT, "edits": [{"feature": feature, "layer": layer, "pos": pos, "value": 0.0}]});
    let cases = [
        ("/api/graph", json!({"prompt": "  "}), StatusCode::BAD_REQUEST, "empty"),
        ("/api/graph", json!({"prompt": PROMPT, "node_threshold": 0.0}), StatusCode::BAD_REQUEST, "node_threshold"),
        ("/api/graph", json!({"prompt": "word ".repeat(40)}), StatusCode::UNPROCESSABLE_ENTITY, "at most 24"),
        ("/api/graph/intervene", node(99, 0, 0), StatusCode::BAD_REQUEST, "no transcoder at layer 99"),
        ("/api/graph/intervene", node(3, 64, 0), StatusCode::BAD_REQUEST, "has 64 features"),
        ("/api/graph/intervene", node(3, 0, 9), StatusCode::BAD_REQUEST, "tokens"),
        ("/api/graph/intervene", json!({"prompt": PROMPT, "edits": []}), StatusCode::BAD_REQUEST, "node edits"),
    ];
    for (uri, body, status, says) in cases {
        let (s, v) = call(uri, body.clone()).await;
        let msg = v["error"].as_str().unwrap_or_default();
        assert!(s == status && msg.contains(says), "{uri} {body}: {s} {v}");
    }
}
