//! The `/graph` page's API and model work: a prompt's attribution graph through the transcoder replacement model
//! (saekit-circuits), pruned as circuit-tracer prunes it and written in its JSON schema, and interventions on
//! graph nodes re-run through the real model.
//!
//! The graph is the file `saekit attribute` writes (the same functions, the same schema, which
//! Neuronpedia's viewer also reads), plus one field per feature node that the page shows on hover:
//! `top_tokens`, the output tokens its decoder vector promotes most directly (`W_U · (W_dec[f] ⊙ gain)`,
//! the final norm's gain as the feature pages use it). Transcoder features are not the SAE's features:
//! the page never links them to the SAE's feature pages.

use saekit_circuits::graph_json::{display_token, graph_json, GraphMeta};
use saekit_circuits::prune::prune;
use saekit_circuits::{attribute, intervene, top_tokens, AttributeOptions, Intervention, TranscoderSet};
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::api::{check_text, queue, ApiResult, AppState};
use crate::engine::Engine;
use crate::error::{ServeError, ServeResult};

/// How one graph request is made.
#[derive(Debug, Clone, Copy)]
pub struct GraphSettings {
    /// Logit targets: the most likely next tokens.
    pub target_logits: usize,
    /// Keep the nodes holding this share of the influence on the logits.
    pub node_threshold: f32,
    /// Keep the edges holding this share of the influence.
    pub edge_threshold: f32,
    /// Most tokens of the prompt (with BOS).
    pub max_tokens: usize,
}

/// One of the most likely next tokens.
#[derive(Debug, Clone, Serialize)]
pub struct TokenProb {
    /// Its text.
    pub token: String,
    /// Its probability.
    pub prob: f32,
}

/// The real model's next tokens without and with interventions on graph nodes.
#[derive(Debug, Clone, Serialize)]
pub struct InterventionResult {
    /// Without the edits.
    pub before: Vec<TokenProb>,
    /// With them.
    pub after: Vec<TokenProb>,
}

/// Tokens whose direct logit effect is shown on hover.
const HOVER_TOKENS: usize = 5;

impl Engine {
    /// The transcoder set, or the error a graph request gets without one.
    fn transcoder_set(&self) -> ServeResult<&TranscoderSet> {
        self.transcoders.as_ref().ok_or_else(|| {
            ServeError::NotFound(
                "this server has no transcoders (saekit serve --transcoders DIR): graphs are off".into(),
            )
        })
    }

    /// The prompt's tokens (with BOS), refused past `max_tokens`.
    fn graph_tokens(&self, prompt: &str, max_tokens: usize) -> ServeResult<Vec<u32>> {
        let ids = self.encode_text(prompt)?;
        if ids.len() > max_tokens {
            let n = ids.len();
            return Err(ServeError::Unprocessable(format!(
                "the prompt is {n} tokens; graphs take at most {max_tokens}"
            )));
        }
        Ok(ids)
    }

    /// The pruned attribution graph of `prompt`, as circuit-tracer's JSON with hover tokens added.
    pub fn graph(&self, prompt: &str, s: &GraphSettings) -> ServeResult<Value> {
        let set = self.transcoder_set()?;
        let tokens = self.graph_tokens(prompt, s.max_tokens)?;
        let opts = AttributeOptions { target_logits: s.target_logits, ..Default::default() };
        // the set was checked against the model at start: what fails here is the server's fault
        let g = attribute(&self.model, set, &tokens, &opts)?;
        let pruned = prune(&g, s.node_threshold, s.edge_threshold)?;
        let meta = GraphMeta {
            slug: "serve".into(),
            scan: set.scan.clone(),
            prompt: prompt.to_string(),
            prompt_tokens: tokens.iter().map(|&t| self.token_text(t)).collect::<ServeResult<_>>()?,
            logit_tokens: g.logits.iter().map(|l| self.token_text(l.token)).collect::<ServeResult<_>>()?,
            node_threshold: s.node_threshold,
        };
        let mut graph = graph_json(&g, &pruned, false, &meta);
        self.add_hover_tokens(set, &mut graph)?;
        graph["metadata"]["error_influence_share"] = json!(pruned.error_influence_share(&g));
        Ok(graph)
    }

    /// The real model's top next tokens on `prompt` before and after `edits`.
    pub fn intervene_graph(
        &self,
        prompt: &str,
        edits: &[Intervention],
        max_tokens: usize,
    ) -> ServeResult<InterventionResult> {
        let set = self.transcoder_set()?;
        let tokens = self.graph_tokens(prompt, max_tokens)?;
        for e in edits {
            check_node(set, e, tokens.len())?;
        }
        let before = intervene(&self.model, set, &tokens, &[])?;
        let after = intervene(&self.model, set, &tokens, edits)?;
        Ok(InterventionResult { before: self.top_probs(&before)?, after: self.top_probs(&after)? })
    }

    fn top_probs(&self, logits: &[f32]) -> ServeResult<Vec<TokenProb>> {
        top_tokens(logits, 5).into_iter().map(|(t, prob)| Ok(TokenProb { token: self.token_text(t)?, prob })).collect()
    }

    fn token_text(&self, id: u32) -> ServeResult<String> {
        self.model.tokenizer().decode(&[id]).map_err(ServeError::Internal)
    }

    /// `top_tokens` on every feature node of `graph`: the tokens its decoder vector promotes most.
    fn add_hover_tokens(&self, set: &TranscoderSet, graph: &mut Value) -> ServeResult<()> {
        let Some(nodes) = graph["nodes"].as_array_mut() else { return Ok(()) };
        let d = self.model.config().d_model;
        let mut rows = Vec::new();
        let mut which = Vec::new();
        for (i, node) in nodes.iter().enumerate() {
            let (Some(layer), Some(feature)) = (node_layer(node), node_feature(node)) else { continue };
            let Some(tc) = set.layers.iter().find(|t| t.layer() == Some(layer) && t.d_out == d) else { continue };
            if node["feature_type"] == "cross layer transcoder" && feature < tc.d_sae {
                rows.extend_from_slice(&tc.w_dec[feature * d..(feature + 1) * d]);
                which.push(i);
            }
        }
        let (unembed, vocab) = (self.model.unembedding(), self.model.config().vocab_size);
        let gain = self.model.final_norm_gain();
        let effects = saekit_analysis::geometry::direct_logit_effects(&rows, d, &unembed, vocab, gain, HOVER_TOKENS);
        for (i, (promoted, _)) in which.into_iter().zip(effects) {
            let texts = promoted.iter().map(|&(t, _)| Ok(display_token(&self.token_text(t)?)));
            nodes[i]["top_tokens"] = json!(texts.collect::<ServeResult<Vec<String>>>()?);
        }
        Ok(())
    }
}

/// An intervention names a node that exists: a layer with a transcoder, one of its features, a position
/// of the prompt.
fn check_node(set: &TranscoderSet, e: &Intervention, n_tokens: usize) -> ServeResult<()> {
    let bad = |what: String| Err(ServeError::BadRequest(format!("node {}@{}:{}: {what}", e.feature, e.layer, e.pos)));
    let Some(tc) = set.layers.iter().find(|t| t.layer() == Some(e.layer)) else {
        return bad(format!("no transcoder at layer {}", e.layer));
    };
    if e.feature >= tc.d_sae {
        return bad(format!("layer {}'s transcoder has {} features", e.layer, tc.d_sae));
    }
    if e.pos >= n_tokens {
        return bad(format!("the prompt has {n_tokens} tokens"));
    }
    if !e.value.is_finite() {
        return bad("the value must be finite".into());
    }
    Ok(())
}

/// A feature node's layer (its `layer` field, a number as text).
fn node_layer(node: &Value) -> Option<usize> {
    node["layer"].as_str()?.parse().ok()
}

/// A feature node's index in its transcoder (the middle of its `"{layer}_{feature}_{pos}"` id).
fn node_feature(node: &Value) -> Option<usize> {
    node["node_id"].as_str()?.split('_').nth(1)?.parse().ok()
}

/// `POST /api/graph`'s body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct GraphRequest {
    prompt: String,
    target_logits: Option<usize>,
    node_threshold: Option<f32>,
    edge_threshold: Option<f32>,
}

/// `POST /api/graph`: the prompt's pruned attribution graph (circuit-tracer's JSON, hover tokens added).
pub(crate) async fn graph_route(
    State(s): State<Arc<AppState>>,
    body: Result<Json<GraphRequest>, JsonRejection>,
) -> ApiResult {
    let Json(req) = body?;
    let q = queue(&s)?;
    check_text("prompt", &req.prompt, &s.limits)?;
    let share = |v: Option<f32>, default: f32, name: &str| match v.unwrap_or(default) {
        t if t > 0.0 && t <= 1.0 => Ok(t),
        _ => Err(ServeError::BadRequest(format!("{name} is a share of the influence: in (0, 1]"))),
    };
    let settings = GraphSettings {
        target_logits: req.target_logits.unwrap_or(5).clamp(1, 10),
        node_threshold: share(req.node_threshold, 0.8, "node_threshold")?,
        edge_threshold: share(req.edge_threshold, 0.98, "edge_threshold")?,
        max_tokens: s.limits.max_graph_tokens,
    };
    let prompt = req.prompt;
    Ok(Json(q.run(move |e| e.graph(&prompt, &settings)).await?))
}

/// One node edit of `POST /api/graph/intervene`: set feature `feature` of layer `layer` at position `pos` to
/// `value` (0 ablates it).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeEdit {
    feature: usize,
    layer: usize,
    pos: usize,
    value: f32,
}

/// `POST /api/graph/intervene`'s body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct InterveneRequest {
    prompt: String,
    edits: Vec<NodeEdit>,
}

/// `POST /api/graph/intervene`: the real model's next tokens before and after the node edits.
pub(crate) async fn intervene_route(
    State(s): State<Arc<AppState>>,
    body: Result<Json<InterveneRequest>, JsonRejection>,
) -> ApiResult {
    let Json(req) = body?;
    let q = queue(&s)?;
    check_text("prompt", &req.prompt, &s.limits)?;
    if req.edits.is_empty() || req.edits.len() > s.limits.max_edits {
        return Err(ServeError::BadRequest(format!("give 1 to {} node edits", s.limits.max_edits)));
    }
    let edits: Vec<Intervention> = req
        .edits
        .iter()
        .map(|e| Intervention { feature: e.feature, layer: e.layer, pos: e.pos, value: e.value })
        .collect();
    let (prompt, max_tokens) = (req.prompt, s.limits.max_graph_tokens);
    let r = q.run(move |e| e.intervene_graph(&prompt, &edits, max_tokens)).await?;
    Ok(Json(serde_json::to_value(r).map_err(ServeError::internal)?))
}
