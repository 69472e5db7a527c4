//! Pruning by influence, as circuit-tracer's `graph.prune_graph` does it.
//!
//! Node influence: the adjacency's absolute values with each row normalised to sum to one, then
//! `w·A + w·A² + …` from the logit nodes (weighted by their probabilities); keep the nodes holding
//! `node_threshold` of the total (tokens and logits always). Edge influence: the same on the matrix pruned
//! to those nodes, `A_norm[t, s] · (influence[t] + w[t])`; keep the edges holding `edge_threshold` of it.
//! Then drop feature and error nodes left without an outgoing edge, and features without an incoming one,
//! until nothing changes.

use anyhow::{bail, Result};

use crate::attribution::Attribution;
use crate::error::{bail_input, CircuitsResult};

/// Which nodes and edges survive, and each node's cumulative influence share (circuit-tracer's
/// `cumulative_scores`: the share of total influence held by the nodes at least as influential).
#[derive(Debug, Clone)]
pub struct Pruned {
    /// Nodes kept.
    pub node_mask: Vec<bool>,
    /// `[n_nodes, n_nodes]`, row = target.
    pub edge_mask: Vec<bool>,
    /// Per node, the share of total influence held by the nodes at least as influential.
    pub cumulative_scores: Vec<f32>,
    /// Each node's influence on the logit targets (before pruning).
    pub node_influence: Vec<f32>,
}

impl Pruned {
    /// The share of the influence of feature, error and token nodes that error nodes hold: how much of the
    /// graph's explanation goes through what the transcoders miss.
    pub fn error_influence_share(&self, g: &Attribution) -> f64 {
        let sum = |r: std::ops::Range<usize>| self.node_influence[r].iter().map(|&v| v as f64).sum::<f64>();
        let errors = sum(g.error_node(0, 0)..g.token_node(0));
        let all = sum(0..g.logit_node(0));
        if all > 0.0 {
            errors / all
        } else {
            0.0
        }
    }
}

/// `|A|` with each row divided by its sum (rows summing to less than 1e-10 by 1e-10).
fn normalize(a: &[f32], n: usize) -> Vec<f32> {
    let mut out: Vec<f32> = a.iter().map(|v| v.abs()).collect();
    for row in out.chunks_mut(n) {
        let s = row.iter().map(|&v| v as f64).sum::<f64>().max(1e-10);
        row.iter_mut().for_each(|v| *v = (*v as f64 / s) as f32);
    }
    out
}

/// `w·A + w·A² + …` (A is nilpotent: the graph has no cycles).
fn influence(a: &[f32], n: usize, w: &[f32]) -> Result<Vec<f32>> {
    let step = |v: &[f32]| -> Vec<f32> {
        let mut out = vec![0f32; n];
        for (t, &vt) in v.iter().enumerate().filter(|(_, v)| **v != 0.0) {
            out.iter_mut().zip(&a[t * n..][..n]).for_each(|(o, a)| *o += vt * a);
        }
        out
    };
    let mut cur = step(w);
    let mut total = cur.clone();
    for _ in 0..1000 {
        if cur.iter().all(|&v| v == 0.0) {
            return Ok(total);
        }
        cur = step(&cur);
        total.iter_mut().zip(&cur).for_each(|(t, c)| *t += c);
    }
    bail!("influence did not converge after 1000 steps (the graph has a cycle)")
}

/// The score above which the largest scores hold `threshold` of the total (circuit-tracer's
/// `find_threshold`).
fn find_threshold(scores: &[f32], threshold: f32) -> f32 {
    let mut sorted = scores.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let total: f64 = sorted.iter().map(|&v| v as f64).sum();
    let mut acc = 0f64;
    for (i, &v) in sorted.iter().enumerate() {
        acc += v as f64;
        if acc / total >= threshold as f64 {
            return sorted[i];
        }
    }
    *sorted.last().unwrap_or(&0.0)
}

/// circuit-tracer's `prune_graph`: keep the most influential nodes up to `node_threshold` of the
/// total influence on the logits and the edges up to `edge_threshold`, then the nodes left with edges.
pub fn prune(g: &Attribution, node_threshold: f32, edge_threshold: f32) -> CircuitsResult<Pruned> {
    if !(0.0..=1.0).contains(&node_threshold) || !(0.0..=1.0).contains(&edge_threshold) {
        bail_input!("pruning thresholds must be in 0..=1 (got node {node_threshold}, edge {edge_threshold})");
    }
    let n = g.n_nodes();
    let (n_logits, n_tokens, n_features) = (g.logits.len(), g.n_pos(), g.features.len());
    let mut w = vec![0f32; n];
    for (i, lg) in g.logits.iter().enumerate() {
        w[g.logit_node(i)] = lg.prob;
    }
    let node_influence = influence(&normalize(&g.adjacency, n), n, &w)?;
    let cut = find_threshold(&node_influence, node_threshold);
    let mut node_mask: Vec<bool> = node_influence.iter().map(|&v| v >= cut).collect();
    node_mask[n - n_logits - n_tokens..].iter_mut().for_each(|m| *m = true);

    let mut pruned = g.adjacency.clone();
    for t in 0..n {
        for s in 0..n {
            if !node_mask[t] || !node_mask[s] {
                pruned[t * n + s] = 0.0;
            }
        }
    }
    let norm = normalize(&pruned, n);
    let mut inf = influence(&norm, n, &w)?;
    inf.iter_mut().zip(&w).for_each(|(i, w)| *i += w);
    let edge_scores: Vec<f32> = norm.iter().enumerate().map(|(k, v)| v * inf[k / n]).collect();
    let cut = find_threshold(&edge_scores, edge_threshold);
    let mut edge_mask: Vec<bool> = edge_scores.iter().map(|&v| v >= cut).collect();

    let inner = n - n_logits - n_tokens;
    loop {
        let old = node_mask.clone();
        for s in 0..inner {
            node_mask[s] &= (0..n).any(|t| edge_mask[t * n + s]);
        }
        for f in 0..n_features {
            node_mask[f] &= edge_mask[f * n..][..n].iter().any(|&e| e);
        }
        if node_mask == old {
            break;
        }
        for t in 0..n {
            for s in 0..n {
                if !node_mask[t] || !node_mask[s] {
                    edge_mask[t * n + s] = false;
                }
            }
        }
    }

    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| node_influence[b].total_cmp(&node_influence[a]));
    let total: f64 = node_influence.iter().map(|&v| v as f64).sum();
    let mut cumulative_scores = vec![0f32; n];
    let mut acc = 0f64;
    for i in order {
        acc += node_influence[i] as f64;
        cumulative_scores[i] = (acc / total) as f32;
    }
    Ok(Pruned { node_mask, edge_mask, cumulative_scores, node_influence })
}
