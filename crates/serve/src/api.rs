//! Routes: the pages, their embedded assets, and the JSON API. Every error is JSON: `{"error": "..."}`.

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use saekit_analysis::SortBy;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use crate::engine::{FeatureEdit, GenSettings, ModelQueue};
use crate::error::{ServeError, ServeResult};
use crate::FeatureStore;

/// Bounds on what one request may ask for.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Limits {
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Longest text or prompt, in characters.
    pub max_text_chars: usize,
    /// Most tokens of a live-text request.
    pub max_live_tokens: usize,
    /// Most tokens of a live-text request with the logit lens on.
    pub max_lens_tokens: usize,
    /// Prompt tokens of one steering request (chat template included); each costs two forward rows.
    pub max_prompt_tokens: usize,
    /// Most tokens one request may generate.
    pub max_new_tokens: usize,
    /// Most feature edits per request.
    pub max_edits: usize,
    /// Most features one list request returns.
    pub max_list: usize,
    /// Largest absolute value of an edit, after `unit: "max"` is multiplied out.
    pub max_abs_value: f32,
    /// Most prompt tokens of an attribution graph (with BOS): its cost grows with their square.
    pub max_graph_tokens: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 64 * 1024,
            max_text_chars: 4000,
            max_live_tokens: 256,
            max_lens_tokens: 64,
            max_prompt_tokens: 256,
            max_new_tokens: 128,
            max_edits: 8,
            max_list: 500,
            max_abs_value: 1000.0,
            max_graph_tokens: 24,
        }
    }
}

/// What every request handler shares: the database, the model queue, the limits.
pub struct AppState {
    /// The feature database.
    pub db: Arc<dyn FeatureStore>,
    /// `None` when started without a model and SAE: the database pages work, live text and steering answer 503.
    pub queue: Option<ModelQueue>,
    /// Bounds on requests.
    pub limits: Limits,
    /// Facts about the model and SAE for `/api/info`.
    pub model_info: Value,
    db_permits: Semaphore,
}

impl AppState {
    /// The state for a server over `db`, with the model behind `queue` when there is one.
    pub fn new(db: Arc<dyn FeatureStore>, queue: Option<ModelQueue>, model_info: Value, limits: Limits) -> Self {
        Self { db, queue, limits, model_info, db_permits: Semaphore::new(4) }
    }

    /// Run a database read on the blocking pool, at most 4 at a time (SQLite reads block).
    async fn with_db<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&dyn FeatureStore) -> ServeResult<T> + Send + 'static,
    ) -> ServeResult<T> {
        let _permit = self.db_permits.acquire().await.map_err(|_| ServeError::internal("shutting down"))?;
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(db.as_ref()))
            .await
            .map_err(|e| ServeError::internal(format!("database task failed: {e}")))?
    }
}

impl From<JsonRejection> for ServeError {
    fn from(r: JsonRejection) -> Self {
        ServeError::Refused { status: r.status(), message: r.body_text() }
    }
}
impl From<QueryRejection> for ServeError {
    fn from(r: QueryRejection) -> Self {
        ServeError::Refused { status: r.status(), message: r.body_text() }
    }
}
impl From<PathRejection> for ServeError {
    fn from(r: PathRejection) -> Self {
        ServeError::Refused { status: r.status(), message: r.body_text() }
    }
}

/// A request's text (`what`: "text" or "prompt") is neither blank nor past the character limit.
pub(crate) fn check_text(what: &str, text: &str, limits: &Limits) -> ServeResult<()> {
    if text.trim().is_empty() {
        return Err(bad(format!("the {what} is empty")));
    }
    if text.chars().count() > limits.max_text_chars {
        return Err(bad(format!("the {what} is longer than {} characters", limits.max_text_chars)));
    }
    Ok(())
}

fn bad(message: impl Into<String>) -> ServeError {
    ServeError::BadRequest(message.into())
}

pub(crate) type ApiResult = ServeResult<Json<Value>>;

const INDEX_HTML: &str = include_str!("../assets/index.html");
const APP_JS: &str = include_str!("../assets/app.js");
const STYLE_CSS: &str = include_str!("../assets/style.css");
const FAVICON_SVG: &str = include_str!("../assets/favicon.svg");

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'"),
            ),
        ],
        body,
    )
        .into_response()
}

async fn page() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

/// Every route of the server: the pages, their assets, `/api` and `/v1`.
pub fn router(state: Arc<AppState>) -> Router {
    let body_limit = state.limits.max_body_bytes;
    let api = Router::new()
        .route("/info", get(info))
        .route("/features", get(list))
        .route("/features/{id}", get(feature))
        .route("/search", get(search))
        .route("/map", get(map))
        .route("/live", post(live))
        .route("/steer", post(steer))
        .route("/graph", post(crate::graph::graph_route))
        .route("/graph/intervene", post(crate::graph::intervene_route))
        .fallback(|| async { ServeError::NotFound("no such API endpoint; see GET /api/info and the README".into()) });
    Router::new()
        .route("/", get(page))
        .route("/feature/{id}", get(page))
        .route("/live", get(page))
        .route("/steer", get(page))
        .route("/graph", get(page))
        .route("/static/app.js", get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }))
        .route("/static/style.css", get(|| async { asset("text/css; charset=utf-8", STYLE_CSS) }))
        .route("/favicon.svg", get(|| async { asset("image/svg+xml", FAVICON_SVG) }))
        .nest("/api", api)
        .nest("/v1", crate::openai::routes())
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found") })
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

async fn info(State(s): State<Arc<AppState>>) -> ApiResult {
    let db = s.with_db(|db| Ok((db.info()?, db.n_features()))).await?;
    Ok(Json(json!({
        "db": db.0,
        "n_features": db.1,
        "model": s.model_info,
        "live": s.queue.is_some(),
        "limits": s.limits,
    })))
}

pub(crate) fn check_id(s: &AppState, id: u32) -> ServeResult<()> {
    let n = s.db.n_features();
    if id >= n {
        return Err(ServeError::NotFound(format!(
            "feature {id} does not exist: ids run from 0 to {}",
            n.saturating_sub(1)
        )));
    }
    Ok(())
}

/// `GET /api/features/{id}`: everything a feature page shows, as one `FeatureRecord`. The path from the SQLite
/// file to here is traced in the crate doc (`lib.rs`) and in DEVELOPERS.md, "Where things are".
async fn feature(State(s): State<Arc<AppState>>, id: Result<Path<String>, PathRejection>) -> ApiResult {
    let Path(raw) = id?;
    let id: u32 = raw.trim().parse().map_err(|_| bad(format!("'{raw}' is not a feature id (a number)")))?;
    check_id(&s, id)?;
    let Some(f) = s.with_db(move |db| db.feature(id)).await? else {
        return Err(ServeError::NotFound(format!("feature {id} is not in the database")));
    };
    let mut v = serde_json::to_value(f).map_err(ServeError::internal)?;
    // the record's map coordinates belong to `/api/map`; dropping them keeps this response's keys as
    // documented (the README's API table) and as the pages have always read them
    if let Some(o) = v.as_object_mut() {
        o.remove("x");
        o.remove("y");
    }
    Ok(Json(v))
}

#[derive(Deserialize)]
struct ListQuery {
    sort: Option<String>,
    order: Option<String>,
    offset: Option<usize>,
    limit: Option<usize>,
}

async fn list(State(s): State<Arc<AppState>>, q: Result<Query<ListQuery>, QueryRejection>) -> ApiResult {
    let Query(q) = q?;
    let sort: SortBy = q.sort.as_deref().unwrap_or("density").parse().map_err(|e| bad(format!("{e}")))?;
    let descending = match q.order.as_deref().unwrap_or("desc") {
        "desc" => true,
        "asc" => false,
        o => return Err(bad(format!("unknown order '{o}': use asc or desc"))),
    };
    let offset = q.offset.unwrap_or(0);
    let limit = q.limit.unwrap_or(50).min(s.limits.max_list);
    let rows = s.with_db(move |db| db.list(sort, descending, offset, limit)).await?;
    Ok(Json(json!({ "features": rows, "offset": offset, "total": s.db.n_features() })))
}

#[derive(Deserialize)]
struct SearchQuery {
    q: String,
    limit: Option<usize>,
}

async fn search(State(s): State<Arc<AppState>>, q: Result<Query<SearchQuery>, QueryRejection>) -> ApiResult {
    let Query(q) = q?;
    let query = q.q.trim().to_string();
    if query.is_empty() {
        return Err(bad("empty search: give a feature id or a word"));
    }
    if query.chars().count() > 200 {
        return Err(bad("search text is longer than 200 characters"));
    }
    let limit = q.limit.unwrap_or(30).min(100);
    let by_id = query.parse::<u32>().ok().filter(|&id| id < s.db.n_features());
    let rows = s.with_db(move |db| db.search(&query, limit)).await?;
    Ok(Json(json!({ "id": by_id, "features": rows })))
}

async fn map(State(s): State<Arc<AppState>>) -> ApiResult {
    let pts = s.with_db(|db| db.map()).await?;
    Ok(Json(json!({ "points": pts })))
}

pub(crate) fn queue(s: &AppState) -> ServeResult<&ModelQueue> {
    s.queue.as_ref().ok_or(ServeError::NoModel("live text and steering are"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LiveRequest {
    text: String,
    feature: Option<u32>,
    top_k: Option<usize>,
    lens: Option<bool>,
}

async fn live(State(s): State<Arc<AppState>>, body: Result<Json<LiveRequest>, JsonRejection>) -> ApiResult {
    let Json(req) = body?;
    let q = queue(&s)?;
    let lim = &s.limits;
    check_text("text", &req.text, lim)?;
    if let Some(f) = req.feature {
        check_id(&s, f)?;
    }
    let top_k = req.top_k.unwrap_or(5).clamp(1, 20);
    let lens = req.lens.unwrap_or(true);
    let (max_tokens, max_lens) = (lim.max_live_tokens, lim.max_lens_tokens);
    let r = q
        .run(move |e| {
            let ids = e.encode_text(&req.text)?;
            if ids.len() > max_tokens {
                let n = ids.len();
                return Err(ServeError::Unprocessable(format!("the text is {n} tokens; the limit is {max_tokens}")));
            }
            if lens && ids.len() > max_lens {
                let n = ids.len();
                return Err(ServeError::Unprocessable(format!(
                    "the logit lens takes at most {max_lens} tokens (the text has {n}); turn it off"
                )));
            }
            e.live(&ids, req.feature, top_k, lens)
        })
        .await?;
    Ok(Json(serde_json::to_value(r).map_err(ServeError::internal)?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EditRequest {
    feature: u32,
    /// "clamp" (set the activation) or "add" (add value * W_dec[feature])
    mode: String,
    value: f32,
    /// "abs" or "max": `value` is a multiple of the feature's max activation in the database
    unit: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SteerRequest {
    prompt: String,
    edits: Vec<EditRequest>,
    chat: Option<bool>,
    max_new_tokens: Option<usize>,
    temperature: Option<f32>,
    seed: Option<u64>,
}

async fn steer(State(s): State<Arc<AppState>>, body: Result<Json<SteerRequest>, JsonRejection>) -> ApiResult {
    let Json(req) = body?;
    let q = queue(&s)?;
    let lim = s.limits.clone();
    check_text("prompt", &req.prompt, &lim)?;
    let max_new_tokens = req.max_new_tokens.unwrap_or(40.min(lim.max_new_tokens));
    if max_new_tokens == 0 || max_new_tokens > lim.max_new_tokens {
        return Err(bad(format!("max_new_tokens must be 1..={}", lim.max_new_tokens)));
    }
    let temperature = req.temperature.unwrap_or(0.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(bad("temperature must be between 0 (greedy) and 2"));
    }
    let (edits, resolved) = resolve_edits(&s, &req.edits).await?;
    let settings = GenSettings {
        max_new_tokens,
        temperature,
        seed: req.seed.unwrap_or(0),
        chat: req.chat.unwrap_or(false),
        max_prompt_tokens: lim.max_prompt_tokens,
    };
    let prompt = req.prompt;
    let r = q.run(move |e| e.steer(&prompt, &edits, &settings)).await?;
    let mut v = serde_json::to_value(r).map_err(ServeError::internal)?;
    v["edits"] = Value::Array(resolved);
    Ok(Json(v))
}

/// Check feature edits and turn `unit: "max"` into absolute values (the feature's max activation in the
/// database); `/api/steer` and the chat API's `saekit.steer` extension share this. Returns the edits and
/// their JSON echo with resolved values.
pub(crate) async fn resolve_edits(
    s: &Arc<AppState>,
    reqs: &[EditRequest],
) -> ServeResult<(Vec<FeatureEdit>, Vec<Value>)> {
    let lim = &s.limits;
    if reqs.len() > lim.max_edits {
        return Err(bad(format!("at most {} feature edits per request", lim.max_edits)));
    }
    let mut edits = Vec::with_capacity(reqs.len());
    let mut resolved = Vec::new();
    for e in reqs {
        check_id(s, e.feature)?;
        if !e.value.is_finite() || e.value.abs() > lim.max_abs_value {
            return Err(bad(format!(
                "feature {}: the value must be finite and within ±{}",
                e.feature, lim.max_abs_value
            )));
        }
        let value = match e.unit.as_deref().unwrap_or("abs") {
            "abs" => e.value,
            "max" => {
                let id = e.feature;
                let rec = s.with_db(move |db| db.feature(id)).await?;
                let max = rec.map(|r| r.max_act).filter(|m| *m > 0.0).ok_or_else(|| {
                    bad(format!("feature {id} has no recorded max activation: give an absolute value"))
                })?;
                let v = e.value * max;
                if !v.is_finite() || v.abs() > lim.max_abs_value {
                    return Err(bad(format!(
                        "feature {id}: {} x its max activation {max} = {v}, outside ±{}",
                        e.value, lim.max_abs_value
                    )));
                }
                v
            }
            u => return Err(bad(format!("unknown unit '{u}': use abs or max"))),
        };
        edits.push(match e.mode.as_str() {
            "clamp" => FeatureEdit::Clamp { feature: e.feature, value },
            "add" => FeatureEdit::Add { feature: e.feature, coeff: value },
            m => return Err(bad(format!("unknown mode '{m}': use clamp or add"))),
        });
        resolved.push(json!({ "feature": e.feature, "mode": e.mode, "value": value }));
    }
    Ok((edits, resolved))
}
