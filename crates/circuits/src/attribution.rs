//! Attribution graphs over the replacement model with attention patterns and norm denominators frozen.
//!
//! On one prompt, every MLP is replaced by its transcoder plus a frozen error term (so the replacement model
//! computes exactly what the real model does); each attention pattern and each RMSNorm's `1/rms` are held
//! at their values on the prompt. The model is then linear in its sources: token embeddings, feature
//! activations (each writing `a_f · W_dec[f]` into the residual stream), error terms, and constant biases
//! (`b_dec`, `b_enc`, V biases). An edge `s -> t` is `a_s · (W_dec[s] carried through the frozen residual,
//! attention-OV and skip paths to t's layer and position) · (t's input direction)`: for a feature target its
//! encoder column (through the frozen pre-MLP norm); for a logit target `W_U[tok] − mean_v W_U[v]` through
//! the frozen final norm. All of a target's incoming edges come from one backward (VJP) pass through the
//! frozen model; targets go through it in batches, as matrix products.
//!
//! Nodes follow circuit-tracer: `[features, errors (layer-major, then position), tokens, logits]`, the
//! adjacency's rows are targets and its columns sources. As in circuit-tracer, features at position 0 (the
//! attention sink) are not nodes: their part of the MLP output goes to that position's error node. Where more
//! than `max_feature_nodes` features are active, the largest activations are kept and the rest go to their
//! error nodes (circuit-tracer ranks by influence instead), so completeness holds either way.
//!
//! Llama-family models only (RMSNorm before attention and MLP, nothing after): the model exposes the weights
//! this linearisation needs for them ([`Model::rms_block_weights`]).

use std::collections::HashMap;
use std::sync::Mutex;

use anyhow::{anyhow, Context, Result};
use rayon::prelude::*;
use saekit_model::linalg::{dot, matmul, matmul_transposed};
use saekit_model::{HookPoint, Hooks, Logits, Model, RmsBlockWeights};

use crate::error::{bail_input, CircuitsResult};
use crate::intervention::top_tokens;
use crate::replacement::check_set;
use crate::transcoder::TranscoderSet;

/// How large a graph `attribute` builds.
#[derive(Debug, Clone)]
pub struct AttributeOptions {
    /// How many of the most likely next tokens become logit targets.
    pub target_logits: usize,
    /// The most feature nodes a graph keeps (the rest are folded into the error nodes).
    pub max_feature_nodes: usize,
    /// Targets per backward pass.
    pub batch_targets: usize,
}

impl Default for AttributeOptions {
    fn default() -> Self {
        AttributeOptions { target_logits: 5, max_feature_nodes: 7500, batch_targets: 64 }
    }
}

/// An active transcoder feature: a node of the graph.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FeatureNode {
    /// The layer of its transcoder.
    pub layer: usize,
    /// The prompt position it is active at.
    pub pos: usize,
    /// Its index in the transcoder.
    pub feature: usize,
    /// Its activation there.
    pub activation: f32,
}

/// A next-token logit the graph explains.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogitNode {
    /// The token.
    pub token: u32,
    /// Its probability after the prompt.
    pub prob: f32,
}

/// The full attribution graph of one prompt.
#[derive(Debug, Clone)]
pub struct Attribution {
    /// The prompt's token ids.
    pub tokens: Vec<u32>,
    /// Layers of the model (one transcoder each).
    pub n_layers: usize,
    /// The feature nodes (node ids `0..features.len()`).
    pub features: Vec<FeatureNode>,
    /// The logit targets (the last nodes).
    pub logits: Vec<LogitNode>,
    /// `[n_nodes, n_nodes]`, row = target, column = source: the direct effect of each source on each target.
    pub adjacency: Vec<f32>,
    /// Each target's value in the frozen model (a feature's pre-activation, a logit minus the mean logit);
    /// zero for error and token nodes.
    pub values: Vec<f32>,
    /// The constant (bias) part of each target's value: `values = Σ incoming edges + bias`.
    pub bias: Vec<f32>,
}

impl Attribution {
    /// Prompt positions.
    pub fn n_pos(&self) -> usize {
        self.tokens.len()
    }

    /// All nodes: features, then error nodes (layer-major), then token embeddings, then logits.
    pub fn n_nodes(&self) -> usize {
        self.features.len() + self.n_layers * self.n_pos() + self.n_pos() + self.logits.len()
    }

    /// The node id of the error term of `layer`'s transcoder at `pos`.
    pub fn error_node(&self, layer: usize, pos: usize) -> usize {
        self.features.len() + layer * self.n_pos() + pos
    }

    /// The node id of the token embedding at `pos`.
    pub fn token_node(&self, pos: usize) -> usize {
        self.features.len() + self.n_layers * self.n_pos() + pos
    }

    /// The node id of the `i`-th logit target.
    pub fn logit_node(&self, i: usize) -> usize {
        self.token_node(0) + self.n_pos() + i
    }

    /// The direct effect of node `source` on node `target`.
    pub fn edge(&self, target: usize, source: usize) -> f32 {
        self.adjacency[target * self.n_nodes() + source]
    }
}

/// Everything one clean pass leaves for the linearisation.
struct Frozen<'m> {
    seq: usize,
    d: usize,
    n_heads: usize,
    group: usize,
    hd: usize,
    q_dim: usize,
    kv_dim: usize,
    blocks: Vec<RmsBlockWeights<'m>>,
    /// `[d_model, kv_dim]` per layer: the V projection, contiguous.
    wv: Vec<Vec<f32>>,
    /// `[q_dim, d_model]` per layer: the output projection (borrowed, unless the model holds it in bf16
    /// alone).
    wo: Vec<std::borrow::Cow<'m, [f32]>>,
    /// `Σ_h b_V[h] · W_O[h]` per layer (rows of a pattern sum to one), when V has a bias.
    attn_bias: Vec<Option<Vec<f32>>>,
    /// `[n_heads, seq, seq]` per layer.
    patterns: Vec<Vec<f32>>,
    /// `1/rms` of the residual stream entering each norm: `[layer][pos]`, and the final norm's `[pos]`.
    s1: Vec<Vec<f32>>,
    s2: Vec<Vec<f32>>,
    sf: Vec<f32>,
    /// Whether transcoder `l` reads the pre-MLP norm's output (else the raw `hook_resid_mid`).
    reads_ln2: Vec<bool>,
}

/// What the clean pass captured.
struct Captured {
    acts: HashMap<HookPoint, Vec<f32>>,
    last_logits: Vec<f32>,
    patterns: Vec<Vec<f32>>,
}

fn capture(model: &Model, set: &TranscoderSet, tokens: &[u32]) -> Result<Captured> {
    let n = model.config().n_layers;
    let mut points = vec![HookPoint::Embed, HookPoint::ResidPost(n - 1)];
    for (l, t) in set.layers.iter().enumerate() {
        points.extend([HookPoint::ResidPre(l), HookPoint::ResidMid(l), HookPoint::MlpOut(l), t.input_hook]);
    }
    points.sort();
    points.dedup();
    let got: Mutex<HashMap<HookPoint, Vec<f32>>> = Mutex::new(HashMap::new());
    let mut hooks = Hooks::new();
    for &p in &points {
        let got = &got;
        hooks.add(p, move |ctx, x| {
            got.lock().map_err(|_| anyhow!("hook lock poisoned"))?.insert(ctx.point, x.to_vec());
            Ok(())
        });
    }
    let mut cache = model.new_cache(1);
    cache.record_patterns();
    let last_logits = model.forward(tokens, 1, &mut cache, &mut hooks, Logits::Last)?;
    drop(hooks);
    let patterns = (0..n)
        .map(|l| cache.pattern(l).map(<[f32]>::to_vec).ok_or_else(|| anyhow!("internal: no pattern for layer {l}")))
        .collect::<Result<_>>()?;
    let acts = got.into_inner().map_err(|_| anyhow!("hook lock poisoned"))?;
    Ok(Captured { acts, last_logits, patterns })
}

fn inv_rms(x: &[f32], d: usize, eps: f32) -> Vec<f32> {
    x.chunks(d).map(|r| 1.0 / (r.iter().map(|v| v * v).sum::<f32>() / d as f32 + eps).sqrt()).collect()
}

impl<'m> Frozen<'m> {
    fn new(model: &'m Model, set: &TranscoderSet, cap: &Captured, seq: usize) -> Result<Self> {
        let c = model.config();
        let (n, d, eps) = (c.n_layers, c.d_model, c.norm_eps);
        let (q_dim, kv_dim, hd) = (c.q_dim(), c.kv_dim(), c.head_dim);
        let get = |p: HookPoint| cap.acts.get(&p).ok_or_else(|| anyhow!("internal: {p} not captured"));
        let blocks = (0..n).map(|l| model.rms_block_weights(l)).collect::<Result<Vec<_>>>()?;
        let wv = blocks
            .iter()
            .map(|b| {
                let (w, cols) = (b.wqkv.values(), b.wqkv.cols);
                (0..d).flat_map(|r| w[r * cols + q_dim + kv_dim..][..kv_dim].iter().copied()).collect()
            })
            .collect();
        let wo: Vec<_> = blocks.iter().map(|b| b.wo.values()).collect();
        let attn_bias = blocks
            .iter()
            .zip(&wo)
            .map(|(b, wo)| {
                b.bqkv.map(|bias| {
                    let bv = &bias[q_dim + kv_dim..];
                    let group = c.n_heads / c.n_kv_heads;
                    let z: Vec<f32> =
                        (0..c.n_heads).flat_map(|h| bv[(h / group) * hd..][..hd].iter().copied()).collect();
                    let mut out = vec![0f32; d];
                    matmul(&z, 1, q_dim, wo, d, &mut out, false);
                    out
                })
            })
            .collect();
        Ok(Frozen {
            seq,
            d,
            n_heads: c.n_heads,
            group: c.n_heads / c.n_kv_heads,
            hd,
            q_dim,
            kv_dim,
            blocks,
            wv,
            wo,
            attn_bias,
            patterns: cap.patterns.clone(),
            s1: (0..n).map(|l| Ok(inv_rms(get(HookPoint::ResidPre(l))?, d, eps))).collect::<Result<_>>()?,
            s2: (0..n).map(|l| Ok(inv_rms(get(HookPoint::ResidMid(l))?, d, eps))).collect::<Result<_>>()?,
            sf: inv_rms(get(HookPoint::ResidPost(n - 1))?, d, eps),
            reads_ln2: set.layers.iter().map(|t| matches!(t.input_hook, HookPoint::Ln2Normalized(_))).collect(),
        })
    }

    /// `g += attentionᵀ(g)` for `t` gradient rows blocks of `[seq, d]` at block `l`'s attention output,
    /// landing at its input (through the frozen pattern and the frozen pre-attention norm).
    fn attention_backward(&self, l: usize, g: &mut [f32], t: usize) {
        let (seq, d, q_dim, kv_dim, hd) = (self.seq, self.d, self.q_dim, self.kv_dim, self.hd);
        let mut gz = vec![0f32; t * seq * q_dim];
        matmul_transposed(g, t * seq, d, &self.wo[l], q_dim, &mut gz);
        let mut gv = vec![0f32; t * seq * kv_dim];
        let pat = &self.patterns[l];
        gv.par_chunks_mut(seq * kv_dim).zip(gz.par_chunks(seq * q_dim)).for_each(|(gv, gz)| {
            for h in 0..self.n_heads {
                let kvh = h / self.group;
                let p = &pat[h * seq * seq..][..seq * seq];
                for q in 0..seq {
                    let gzq = &gz[q * q_dim + h * hd..][..hd];
                    for k in 0..=q {
                        let w = p[q * seq + k];
                        if w != 0.0 {
                            let dst = &mut gv[k * kv_dim + kvh * hd..][..hd];
                            dst.iter_mut().zip(gzq).for_each(|(a, b)| *a += w * b);
                        }
                    }
                }
            }
        });
        let mut gn = vec![0f32; t * seq * d];
        matmul_transposed(&gv, t * seq, kv_dim, &self.wv[l], d, &mut gn);
        let gain = self.blocks[l].ln1_gain;
        g.par_chunks_mut(d).zip(gn.par_chunks(d)).enumerate().for_each(|(r, (g, gn))| {
            let s = self.s1[l][r % seq];
            g.iter_mut().zip(gn).zip(gain).for_each(|((g, gn), w)| *g += gn * s * w);
        });
    }

    /// `g += (g · W_skip) ⊙ (frozen pre-MLP norm)`: the skip connection's path back to `hook_resid_mid`.
    fn skip_backward(&self, l: usize, w_skip: &[f32], g: &mut [f32], t: usize) {
        let (seq, d) = (self.seq, self.d);
        let mut gin = vec![0f32; t * seq * d];
        matmul(g, t * seq, d, w_skip, d, &mut gin, false);
        let gain = self.blocks[l].ln2_gain;
        let ln2 = self.reads_ln2[l];
        g.par_chunks_mut(d).zip(gin.par_chunks(d)).enumerate().for_each(|(r, (g, gi))| {
            let s = self.s2[l][r % seq];
            for ((g, gi), w) in g.iter_mut().zip(gi).zip(gain) {
                *g += if ln2 { gi * s * w } else { *gi };
            }
        });
    }
}

/// A target of one backward pass: where its input direction enters and what it adds as bias.
struct Target {
    node: usize,
    /// The block whose `hook_resid_mid` the direction reads; `None`: the final residual stream.
    layer: Option<usize>,
    pos: usize,
    direction: Vec<f32>,
    bias: f32,
}

/// The sources one MLP output holds: selected features' scaled decoder rows per position, error rows.
struct MlpSources {
    /// Per position: (node, `a_f · W_dec[f]`).
    features: Vec<Vec<(usize, Vec<f32>)>>,
    /// `[seq, d]`.
    error: Vec<f32>,
    b_dec: Vec<f32>,
}

/// Attribute `tokens` (one prompt) through the replacement model of `set`.
pub fn attribute(
    model: &Model,
    set: &TranscoderSet,
    tokens: &[u32],
    opts: &AttributeOptions,
) -> CircuitsResult<Attribution> {
    check_set(model, set)?;
    let c = model.config();
    let (n, d, seq) = (c.n_layers, c.d_model, tokens.len());
    if seq == 0 {
        bail_input!("attribution needs a prompt of at least one token");
    }
    let cap = capture(model, set, tokens)?;
    let frozen = Frozen::new(model, set, &cap, seq)?;
    let get = |p: HookPoint| cap.acts.get(&p).ok_or_else(|| anyhow!("internal: {p} not captured"));

    // Features: every active one past position 0, the largest kept when there are too many.
    let mut pre = Vec::with_capacity(n);
    let mut acts = Vec::with_capacity(n);
    let mut features = Vec::new();
    for (l, t) in set.layers.iter().enumerate() {
        let p = t.pre_activations(get(t.input_hook)?);
        let mut a = p.clone();
        t.activate(&mut a);
        for (i, &v) in a.iter().enumerate().skip(t.d_sae) {
            if v != 0.0 {
                features.push(FeatureNode { layer: l, pos: i / t.d_sae, feature: i % t.d_sae, activation: v });
            }
        }
        pre.push(p);
        acts.push(a);
    }
    if features.len() > opts.max_feature_nodes {
        features.sort_by(|a, b| b.activation.total_cmp(&a.activation));
        features.truncate(opts.max_feature_nodes);
        features.sort_by_key(|f| (f.layer, f.pos, f.feature));
    }
    let logits = top_tokens(&cap.last_logits, opts.target_logits.max(1))
        .into_iter()
        .map(|(token, prob)| LogitNode { token, prob })
        .collect();
    let mut g = Attribution {
        tokens: tokens.to_vec(),
        n_layers: n,
        features,
        logits,
        adjacency: Vec::new(),
        values: Vec::new(),
        bias: Vec::new(),
    };
    let nn = g.n_nodes();
    g.adjacency = vec![0f32; nn * nn];
    g.values = vec![0f32; nn];
    g.bias = vec![0f32; nn];

    let sources = mlp_sources(set, &g, |p| get(p).cloned(), seq, d)?;
    let targets = targets(model, set, &g, &frozen)?;
    for t in &targets {
        g.values[t.node] = match t.layer {
            Some(l) => {
                let f = &g.features[t.node];
                pre[l][f.pos * set.layers[l].d_sae + f.feature]
            }
            None => 0.0,
        };
    }
    let mean_logit = cap.last_logits.iter().map(|&v| v as f64).sum::<f64>() / cap.last_logits.len() as f64;
    for (i, lg) in g.logits.clone().iter().enumerate() {
        let node = g.logit_node(i);
        g.values[node] = (cap.last_logits[lg.token as usize] as f64 - mean_logit) as f32;
    }
    let embed = get(HookPoint::Embed)?.clone();
    for batch in targets.chunks(opts.batch_targets.max(1)) {
        backward(&frozen, set, &sources, &embed, batch, &mut g);
    }
    Ok(g)
}

/// Per layer: the selected features' scaled decoder rows, and the error rows (MLP output minus what the
/// selected features, `b_dec` and the skip connection write).
fn mlp_sources(
    set: &TranscoderSet,
    g: &Attribution,
    get: impl Fn(HookPoint) -> Result<Vec<f32>>,
    seq: usize,
    d: usize,
) -> Result<Vec<MlpSources>> {
    let mut out = Vec::with_capacity(set.layers.len());
    for (l, t) in set.layers.iter().enumerate() {
        let x = get(t.input_hook)?;
        let mut kept = vec![0f32; seq * t.d_sae];
        let mut features = vec![Vec::new(); seq];
        for (node, f) in g.features.iter().enumerate().filter(|(_, f)| f.layer == l) {
            kept[f.pos * t.d_sae + f.feature] = f.activation;
            let row: Vec<f32> = t.w_dec[f.feature * d..][..d].iter().map(|w| w * f.activation).collect();
            features[f.pos].push((node, row));
        }
        let recon = t.decode(&kept, &x);
        let mlp_out = get(HookPoint::MlpOut(l))?;
        let error = mlp_out.iter().zip(&recon).map(|(y, r)| y - r).collect();
        out.push(MlpSources { features, error, b_dec: t.b_dec.clone() });
    }
    Ok(out)
}

/// Every feature node (at its pre-activation) and every logit node, with its input direction.
fn targets(model: &Model, set: &TranscoderSet, g: &Attribution, fr: &Frozen) -> Result<Vec<Target>> {
    let d = fr.d;
    let mut out = Vec::with_capacity(g.features.len() + g.logits.len());
    for (node, f) in g.features.iter().enumerate() {
        let t = &set.layers[f.layer];
        let gain = fr.blocks[f.layer].ln2_gain;
        let s = fr.s2[f.layer][f.pos];
        let direction = (0..d)
            .map(|i| {
                let w = t.w_enc[i * t.d_sae + f.feature];
                if fr.reads_ln2[f.layer] {
                    w * s * gain[i]
                } else {
                    w
                }
            })
            .collect();
        out.push(Target { node, layer: Some(f.layer), pos: f.pos, direction, bias: t.b_enc[f.feature] });
    }
    let w_u = model.unembedding();
    let vocab = model.config().vocab_size;
    let mut mean_u = vec![0f64; d];
    for row in w_u.chunks(d) {
        mean_u.iter_mut().zip(row).for_each(|(m, v)| *m += *v as f64);
    }
    let gain = model.final_norm_gain().context("internal: a Llama-family model without a final RMSNorm")?;
    let last = fr.seq - 1;
    let s = fr.sf[last];
    for (i, lg) in g.logits.iter().enumerate() {
        let row = &w_u[lg.token as usize * d..][..d];
        let direction = (0..d).map(|j| ((row[j] as f64 - mean_u[j] / vocab as f64) as f32) * s * gain[j]).collect();
        out.push(Target { node: g.logit_node(i), layer: None, pos: last, direction, bias: 0.0 });
    }
    Ok(out)
}

/// One backward pass for `batch` targets: fill their adjacency rows and biases.
fn backward(
    fr: &Frozen,
    set: &TranscoderSet,
    sources: &[MlpSources],
    embed: &[f32],
    batch: &[Target],
    g: &mut Attribution,
) {
    let (seq, d, t) = (fr.seq, fr.d, batch.len());
    let nn = g.n_nodes();
    let mut grad = vec![0f32; t * seq * d];
    let inject = |grad: &mut [f32], layer: Option<usize>| {
        for (i, tg) in batch.iter().enumerate().filter(|(_, tg)| tg.layer == layer) {
            grad[(i * seq + tg.pos) * d..][..d].iter_mut().zip(&tg.direction).for_each(|(g, v)| *g += v);
        }
    };
    inject(&mut grad, None);
    let mut bias: Vec<f32> = batch.iter().map(|tg| tg.bias).collect();
    for l in (0..set.layers.len()).rev() {
        let error0 = g.error_node(l, 0);
        record_mlp_edges(&sources[l], &grad, batch, g, nn, seq, d, error0);
        for (i, b) in bias.iter_mut().enumerate() {
            *b += (0..seq).map(|p| dot(&sources[l].b_dec, &grad[(i * seq + p) * d..][..d])).sum::<f32>();
        }
        if let Some(ws) = &set.layers[l].w_skip {
            fr.skip_backward(l, ws, &mut grad, t);
        }
        inject(&mut grad, Some(l));
        if let Some(ab) = &fr.attn_bias[l] {
            for (i, b) in bias.iter_mut().enumerate() {
                *b += (0..seq).map(|p| dot(ab, &grad[(i * seq + p) * d..][..d])).sum::<f32>();
            }
        }
        fr.attention_backward(l, &mut grad, t);
    }
    let tok0 = g.token_node(0);
    for (i, tg) in batch.iter().enumerate() {
        for p in 0..seq {
            g.adjacency[tg.node * nn + tok0 + p] = dot(&embed[p * d..][..d], &grad[(i * seq + p) * d..][..d]);
        }
        g.bias[tg.node] = bias[i];
    }
}

/// Edges from one MLP output's sources (features, then error rows) into the batch's targets.
#[allow(clippy::too_many_arguments)]
fn record_mlp_edges(
    src: &MlpSources,
    grad: &[f32],
    batch: &[Target],
    g: &mut Attribution,
    nn: usize,
    seq: usize,
    d: usize,
    error0: usize,
) {
    let t = batch.len();
    for p in 0..seq {
        let rows: Vec<f32> = (0..t).flat_map(|i| grad[(i * seq + p) * d..][..d].iter().copied()).collect();
        let feats = &src.features[p];
        if !feats.is_empty() {
            let dec: Vec<f32> = feats.iter().flat_map(|(_, r)| r.iter().copied()).collect();
            let mut e = vec![0f32; t * feats.len()];
            matmul_transposed(&rows, t, d, &dec, feats.len(), &mut e);
            for (i, tg) in batch.iter().enumerate() {
                for (j, (node, _)) in feats.iter().enumerate() {
                    g.adjacency[tg.node * nn + node] = e[i * feats.len() + j];
                }
            }
        }
        let err = &src.error[p * d..][..d];
        for (i, tg) in batch.iter().enumerate() {
            g.adjacency[tg.node * nn + error0 + p] = dot(err, &rows[i * d..][..d]);
        }
    }
}
