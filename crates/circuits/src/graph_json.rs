//! The attribution-graph JSON that circuit-tracer's `create_graph_files` writes and Neuronpedia's graph
//! viewer reads: `metadata` (slug, scan, prompt, prompt_tokens, node_threshold, schema_version), `qParams`,
//! `nodes` (node_id, feature, layer, ctx_idx, feature_type, jsNodeId, clerp, influence, activation,
//! token_prob, is_target_logit, run_idx, reverse_ctx_idx) and `links` (source, target, weight).
//!
//! Node ids as circuit-tracer makes them: a feature `"{layer}_{feature}_{pos}"` (its `feature` field the
//! Cantor pairing of layer and feature index), an error node `"{layer}_-1_{pos}"`, a token
//! `"E_{token_id}_{pos}"`, a logit `"{n_layers + 1}_{token_id}_{pos}"`.

use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::error::CircuitsResult;
use serde_json::{json, Value};

use crate::attribution::Attribution;
use crate::prune::{prune, Pruned};

/// What names a graph besides its nodes.
#[derive(Debug, Clone)]
pub struct GraphMeta {
    /// The graph's short name (circuit-tracer's `slug`).
    pub slug: String,
    /// The model / transcoder set it was made with (circuit-tracer's `scan`).
    pub scan: String,
    /// The prompt as given.
    pub prompt: String,
    /// Each prompt token as text.
    pub prompt_tokens: Vec<String>,
    /// Each logit target's token as text.
    pub logit_tokens: Vec<String>,
    /// The node-influence share pruning kept.
    pub node_threshold: f32,
}

/// How the viewer shows a token: newlines and tabs made visible.
pub fn display_token(s: &str) -> String {
    s.replace('\n', "⏎").replace('\t', "→")
}

fn node(id: String, feature: i64, layer: String, pos: usize, kind: &str, js: String) -> Value {
    json!({
        "node_id": id, "feature": feature, "layer": layer, "ctx_idx": pos, "feature_type": kind,
        "token_prob": 0.0, "is_target_logit": false, "run_idx": 0, "reverse_ctx_idx": 0, "jsNodeId": js,
        "clerp": "", "influence": Value::Null, "activation": Value::Null,
    })
}

/// Node `i` of `g` as circuit-tracer writes it.
fn node_json(g: &Attribution, meta: &GraphMeta, i: usize, influence: f32) -> Value {
    let (nf, np, nl) = (g.features.len(), g.n_pos(), g.n_layers);
    let mut v = if i < nf {
        let f = &g.features[i];
        let cantor = ((f.layer + f.feature) * (f.layer + f.feature + 1) / 2 + f.feature) as i64;
        let mut v = node(
            format!("{}_{}_{}", f.layer, f.feature, f.pos),
            cantor,
            f.layer.to_string(),
            f.pos,
            "cross layer transcoder",
            format!("{}_{}-0", f.layer, f.feature),
        );
        v["activation"] = json!(f.activation);
        v
    } else if i < g.token_node(0) {
        let (l, p) = ((i - nf) / np, (i - nf) % np);
        node(format!("{l}_-1_{p}"), -1, l.to_string(), p, "mlp reconstruction error", format!("{l}_-1-{p}"))
    } else if i < g.logit_node(0) {
        let p = i - g.token_node(0);
        let t = g.tokens[p];
        node(format!("E_{t}_{p}"), p as i64, "E".into(), p, "embedding", format!("E_{t}-{p}"))
    } else {
        let k = i - g.logit_node(0);
        let (lg, p, layer) = (g.logits[k], np - 1, nl + 1);
        let mut v = node(
            format!("{layer}_{}_{p}", lg.token),
            lg.token as i64,
            layer.to_string(),
            p,
            "logit",
            format!("L_{}-{p}", lg.token),
        );
        let tok = meta.logit_tokens.get(k).map_or("", String::as_str);
        v["token_prob"] = json!(lg.prob);
        v["is_target_logit"] = json!(k == 0);
        v["clerp"] = json!(format!("Output \"{}\" (p={:.3})", display_token(tok), lg.prob));
        return v;
    };
    v["influence"] = json!(influence);
    v
}

/// The graph JSON of `g`: pruned by `pruned`, or every node and non-zero edge when `None`.
pub fn graph_json(g: &Attribution, pruned: &Pruned, keep_all: bool, meta: &GraphMeta) -> Value {
    let n = g.n_nodes();
    let kept = |i: usize| keep_all || pruned.node_mask[i];
    let ids: Vec<Option<Value>> =
        (0..n).map(|i| kept(i).then(|| node_json(g, meta, i, pruned.cumulative_scores[i]))).collect();
    let mut links = Vec::new();
    let mut connected = vec![false; n];
    for t in 0..n {
        for s in 0..n {
            let w = g.adjacency[t * n + s];
            let edge = if keep_all { w != 0.0 } else { pruned.edge_mask[t * n + s] };
            if edge && kept(s) && kept(t) {
                links.push(json!({"source": ids[s].as_ref().map(|v| v["node_id"].clone()),
                                  "target": ids[t].as_ref().map(|v| v["node_id"].clone()), "weight": w}));
                connected[s] = true;
                connected[t] = true;
            }
        }
    }
    // as circuit-tracer: nodes without an edge go, except tokens and logits
    let nodes: Vec<Value> =
        ids.into_iter().enumerate().filter_map(|(i, v)| v.filter(|_| connected[i] || i >= g.token_node(0))).collect();
    json!({
        "metadata": {
            "slug": meta.slug, "scan": meta.scan, "transcoder_list": [],
            "prompt_tokens": meta.prompt_tokens.iter().map(|t| display_token(t)).collect::<Vec<_>>(),
            "prompt": meta.prompt, "node_threshold": meta.node_threshold, "schema_version": 1,
        },
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": nodes,
        "links": links,
    })
}

/// What [`write_graph_files`] wrote.
#[derive(Debug, Clone)]
pub struct GraphFiles {
    /// The pruned graph (`--out`).
    pub pruned: PathBuf,
    /// The full graph (`<stem>.full.safetensors`).
    pub full: PathBuf,
    /// Nodes of the pruned graph.
    pub pruned_nodes: usize,
    /// Links of the pruned graph.
    pub pruned_links: usize,
    /// Nodes of the full graph.
    pub full_nodes: usize,
    /// Non-zero edges of the full graph.
    pub full_links: usize,
    /// The share of the logits' influence that flows through error nodes.
    pub error_influence_share: f64,
}

/// Prune `g` and write the pruned graph to `out` (JSON) and the full one beside it
/// (`<stem>.full.safetensors`, see [`write_full_graph`]).
pub fn write_graph_files(
    g: &Attribution,
    meta: &GraphMeta,
    out: &Path,
    node_threshold: f32,
    edge_threshold: f32,
) -> CircuitsResult<GraphFiles> {
    let pruned = prune(g, node_threshold, edge_threshold)?;
    let small = graph_json(g, &pruned, false, meta);
    let stem = out.file_stem().map_or_else(|| "graph".into(), |s| s.to_string_lossy().into_owned());
    let full_path = out.with_file_name(format!("{stem}.full.safetensors"));
    saekit_files::write_json_atomic(out, &small)?;
    write_full_graph(g, meta, &full_path)?;
    let count = |v: &Value, k: &str| v[k].as_array().map_or(0, Vec::len);
    Ok(GraphFiles {
        pruned: out.to_path_buf(),
        full: full_path,
        pruned_nodes: count(&small, "nodes"),
        pruned_links: count(&small, "links"),
        full_nodes: g.n_nodes(),
        full_links: g.adjacency.iter().filter(|&&w| w != 0.0).count(),
        error_influence_share: pruned.error_influence_share(g),
    })
}

/// The node order of [`write_full_graph`]'s adjacency matrix.
pub const FULL_GRAPH_NODE_ORDER: &str = "features (active_features order), then one error node per (layer, position) \
     layer-major, then one token per position, then the logits (logit_tokens order)";

/// The whole graph as circuit-tracer's `Graph.to_pt` keeps it, in safetensors (a JSON link list would not
/// fit: a 64-token prompt has ~10^4 nodes and ~10^8 edges): `adjacency_matrix` `[n, n]` f32 (row = target,
/// column = source, nodes in [`FULL_GRAPH_NODE_ORDER`]), `active_features` `[n_features, 3]` i64 (layer,
/// position, feature), `activation_values` `[n_features]`, `input_tokens` `[n_pos]` i64, `logit_tokens`
/// `[n_logits]` i64, `logit_probabilities` `[n_logits]`; the prompt, scan and node order as metadata.
pub fn write_full_graph(g: &Attribution, meta: &GraphMeta, path: &Path) -> CircuitsResult<()> {
    use safetensors::tensor::{Dtype, TensorView};
    let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let i64s = |v: &[i64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let feats: Vec<i64> = g.features.iter().flat_map(|f| [f.layer as i64, f.pos as i64, f.feature as i64]).collect();
    let acts: Vec<f32> = g.features.iter().map(|f| f.activation).collect();
    let tokens: Vec<i64> = g.tokens.iter().map(|&t| t as i64).collect();
    let logit_tokens: Vec<i64> = g.logits.iter().map(|l| l.token as i64).collect();
    let logit_probs: Vec<f32> = g.logits.iter().map(|l| l.prob).collect();
    let (n, nf, nl) = (g.n_nodes(), g.features.len(), g.logits.len());
    let tensors: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> = vec![
        ("adjacency_matrix", Dtype::F32, vec![n, n], f32s(&g.adjacency)),
        ("active_features", Dtype::I64, vec![nf, 3], i64s(&feats)),
        ("activation_values", Dtype::F32, vec![nf], f32s(&acts)),
        ("input_tokens", Dtype::I64, vec![tokens.len()], i64s(&tokens)),
        ("logit_tokens", Dtype::I64, vec![nl], i64s(&logit_tokens)),
        ("logit_probabilities", Dtype::F32, vec![nl], f32s(&logit_probs)),
    ];
    let views = tensors
        .iter()
        .map(|(name, dtype, shape, bytes)| Ok((name.to_string(), TensorView::new(*dtype, shape.clone(), bytes)?)))
        .collect::<Result<Vec<_>>>()?;
    let info = std::collections::HashMap::from([
        ("prompt".to_string(), meta.prompt.clone()),
        ("scan".to_string(), meta.scan.clone()),
        ("n_layers".to_string(), g.n_layers.to_string()),
        ("node_order".to_string(), FULL_GRAPH_NODE_ORDER.to_string()),
    ]);
    let data = safetensors::serialize(views, Some(info)).map_err(anyhow::Error::from)?;
    Ok(saekit_files::write_atomic(path, &data)?)
}
