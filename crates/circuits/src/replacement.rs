//! The replacement model: the real model with MLPs replaced by their transcoders, and how much it loses.
//!
//! Definitions follow saekit-analysis' (SAELens') model evaluation, with a transcoder splice in place of an
//! SAE splice: CE is the mean next-token cross-entropy over positions with a next token,
//! `ce_loss_score = (CE_ablated − CE_replaced) / (CE_ablated − CE_clean)` where ablation zeroes the same
//! MLPs' outputs, KL is `mean over positions of KL(clean ‖ spliced)`. "All" replaces every MLP at once
//! (each transcoder reads the replacement model's own residual stream); "per layer" replaces one MLP.
//! FVU is the transcoder's on the clean pass, against its target (the MLP's output).
//!
//! Attention sinks (position 0, BOS / end-of-text / EOS, and rows whose MLP output is above 10x the
//! median norm) keep the real MLP's output in every pass, replaced or ablated, and are left out of the FVU,
//! as `saekit eval` leaves an SAE's sinks clean: their outputs are orders of magnitude larger than the
//! rest (99.98% of the variance of SmolLM2's layer-11 MLP output on 0.8% of rows) and the trainer leaves
//! them out of training.

use std::sync::Mutex;

use anyhow::{anyhow, bail, Result};
use saekit_model::{HookPoint, Hooks, Logits, Model};
use serde::Serialize;

use crate::error::{bail_input, CircuitsResult};
use crate::transcoder::TranscoderSet;

/// What a replacement pass does to each MLP.
#[derive(Debug, Clone, Default)]
pub struct Splice<'a> {
    /// `replace[l]`: block `l`'s MLP output is its transcoder's output.
    pub replace: Vec<bool>,
    /// `ablate[l]`: block `l`'s MLP output is zero.
    pub ablate: Vec<bool>,
    /// Frozen error terms `[layer][rows * d_model]` added to replaced MLPs' outputs (from [`error_terms`]).
    pub errors: Option<&'a [Vec<f32>]>,
    /// `keep[l][row]`: that row of block `l`'s MLP output stays the real MLP's, replaced or ablated
    /// (the attention sinks: [`sink_masks`]).
    pub keep: Option<&'a [Vec<bool>]>,
}

impl Splice<'_> {
    /// Nothing replaced or ablated: the real model.
    pub fn clean(n_layers: usize) -> Self {
        Splice { replace: vec![false; n_layers], ablate: vec![false; n_layers], errors: None, keep: None }
    }

    /// Every MLP replaced by its transcoder (no error terms).
    pub fn replace_all(n_layers: usize) -> Self {
        Splice { replace: vec![true; n_layers], ..Splice::clean(n_layers) }
    }
}

/// Refuse a set that does not cover every block of `model` with an MLP-input -> MLP-output transcoder.
pub fn check_set(model: &Model, set: &TranscoderSet) -> CircuitsResult<()> {
    Ok(check_layers(model, set, false)?)
}

/// As [`check_set`]; with `prefix_ok`, a set of the first blocks only (layers 0..n, n ≤ the model's)
/// passes too: the replacement evaluation then replaces (and ablates) those MLPs and runs the others clean.
fn check_layers(model: &Model, set: &TranscoderSet, prefix_ok: bool) -> Result<()> {
    let c = model.config();
    let fits = if prefix_ok { set.layers.len() <= c.n_layers } else { set.layers.len() == c.n_layers };
    if !fits {
        bail_input!("the transcoder set has {} layers, the model {} has {}", set.layers.len(), c.name, c.n_layers);
    }
    for (l, t) in set.layers.iter().enumerate() {
        if !matches!(t.input_hook, HookPoint::Ln2Normalized(_) | HookPoint::ResidMid(_)) {
            bail_input!(
                "transcoder {l} reads {}; a replacement MLP reads blocks.{l}.ln2.hook_normalized or hook_resid_mid",
                t.input_hook
            );
        }
        if t.output_hook != HookPoint::MlpOut(l) {
            bail_input!("transcoder {l} writes {}; a replacement MLP writes blocks.{l}.hook_mlp_out", t.output_hook);
        }
        model.check_hook_point(t.input_hook)?;
        if t.d_in != c.d_model || t.d_out != c.d_model {
            bail_input!("transcoder {l} maps {} -> {} dims; the model's d_model is {}", t.d_in, t.d_out, c.d_model);
        }
    }
    Ok(())
}

/// One forward pass with `splice` applied; returns the logits `logits` asks for.
pub fn replacement_forward(
    model: &Model,
    set: &TranscoderSet,
    tokens: &[u32],
    batch: usize,
    splice: &Splice,
    logits: Logits,
) -> Result<Vec<f32>> {
    let n = set.layers.len();
    let inputs: Vec<Mutex<Vec<f32>>> = (0..n).map(|_| Mutex::new(Vec::new())).collect();
    let mut hooks = Hooks::new();
    for (l, tc) in set.layers.iter().enumerate() {
        let inp = &inputs[l];
        let keep = splice.keep.map(|k| k[l].as_slice());
        if splice.replace.get(l) == Some(&true) {
            hooks.add(tc.input_hook, move |_, x| {
                *inp.lock().map_err(|_| anyhow!("hook lock poisoned"))? = x.to_vec();
                Ok(())
            });
            let err = splice.errors.map(|e| &e[l]);
            hooks.add(HookPoint::MlpOut(l), move |_, out| {
                let x = inp.lock().map_err(|_| anyhow!("hook lock poisoned"))?;
                let replaced = tc.forward(&x);
                if let Some(e) = err.filter(|e| e.len() != out.len()) {
                    bail!("error term of layer {l} has {} values, the pass {}", e.len(), out.len());
                }
                let d = tc.d_out;
                for (row, (o, r)) in out.chunks_mut(d).zip(replaced.chunks(d)).enumerate() {
                    if !kept(keep, row) {
                        o.copy_from_slice(r);
                        if let Some(e) = err {
                            o.iter_mut().zip(&e[row * d..(row + 1) * d]).for_each(|(o, e)| *o += e);
                        }
                    }
                }
                Ok(())
            });
        } else if splice.ablate.get(l) == Some(&true) {
            let d = tc.d_out;
            hooks.add(HookPoint::MlpOut(l), move |_, out| {
                out.chunks_mut(d).enumerate().filter(|(row, _)| !kept(keep, *row)).for_each(|(_, o)| o.fill(0.0));
                Ok(())
            });
        }
    }
    Ok(model.forward(tokens, batch, &mut model.new_cache(batch), &mut hooks, logits)?)
}

/// Whether `row` keeps the real MLP's output.
fn kept(keep: Option<&[bool]>, row: usize) -> bool {
    keep.is_some_and(|k| k.get(row) == Some(&true))
}

/// The rows each MLP leaves to the real model, `[layer][rows]`, for a block of whole contexts of `seq`
/// tokens: position 0 and the tokenizer's sink tokens in every layer, then in each layer the rows whose
/// clean MLP output (`mlp_out[l]`, `[rows * d_model]`) is above `norm_factor` x that layer's median norm
/// in the block (0: none), the rule the trainer leaves rows out of training by. The tokens are those
/// `saekit eval` keeps clean for an SAE ([`saekit_model::Tokenizer::is_sink_token`]).
pub fn sink_masks(model: &Model, tokens: &[u32], seq: usize, mlp_out: &[Vec<f32>], norm_factor: f32) -> Vec<Vec<bool>> {
    let tok = model.tokenizer();
    let by_token: Vec<bool> =
        tokens.iter().enumerate().map(|(i, &t)| i.is_multiple_of(seq) || tok.is_sink_token(t)).collect();
    let d = model.config().d_model;
    mlp_out
        .iter()
        .map(|y| {
            let norms: Vec<f32> = y.chunks(d).map(|r| r.iter().map(|v| v * v).sum::<f32>().sqrt()).collect();
            let limit = norm_factor * median(&norms);
            by_token.iter().zip(&norms).map(|(&sink, &n)| sink || (norm_factor > 0.0 && n > limit)).collect()
        })
        .collect()
}

fn median(v: &[f32]) -> f32 {
    let mut v = v.to_vec();
    let mid = v.len() / 2;
    if v.is_empty() {
        return 0.0;
    }
    *v.select_nth_unstable_by(mid, f32::total_cmp).1
}

/// Per layer, one activation `[rows * width]`.
pub type PerLayer = Vec<Vec<f32>>;

/// Each MLP's clean input and output on `tokens`: `(inputs, outputs)`, `[layer][rows * d_model]`.
pub fn clean_mlp_io(model: &Model, set: &TranscoderSet, tokens: &[u32], batch: usize) -> Result<(PerLayer, PerLayer)> {
    let n = set.layers.len();
    let mut points: Vec<HookPoint> = set.layers.iter().map(|t| t.input_hook).collect();
    points.extend((0..n).map(HookPoint::MlpOut));
    let mut cache = model.run_with_cache(tokens, batch, &points)?;
    let take = |cache: &mut saekit_model::ActivationCache, p: HookPoint| {
        cache.take(&p).ok_or_else(|| anyhow!("internal: {p} was not captured"))
    };
    let mut ins = Vec::with_capacity(n);
    let mut outs = Vec::with_capacity(n);
    for (l, t) in set.layers.iter().enumerate() {
        ins.push(take(&mut cache, t.input_hook)?);
        outs.push(take(&mut cache, HookPoint::MlpOut(l))?);
    }
    Ok((ins, outs))
}

/// The error terms of every transcoder on the clean pass: `MLP(x) − transcoder(x)`, `[layer][rows * d_model]`.
pub fn error_terms(model: &Model, set: &TranscoderSet, tokens: &[u32], batch: usize) -> Result<Vec<Vec<f32>>> {
    let (ins, outs) = clean_mlp_io(model, set, tokens, batch)?;
    Ok(set
        .layers
        .iter()
        .zip(ins.iter().zip(&outs))
        .map(|(t, (x, y))| y.iter().zip(t.forward(x)).map(|(y, r)| y - r).collect())
        .collect())
}

/// CE loss and KL of one splice against the clean model and the zero-ablated one.
#[derive(Debug, Clone, Serialize, Default)]
pub struct SpliceScore {
    /// `"all"` or the replaced layer.
    pub layers: String,
    /// Next-token CE loss with the transcoders in place.
    pub ce_loss_replaced: f64,
    /// ... with those MLPs' outputs zeroed instead.
    pub ce_loss_ablated: f64,
    /// (ablated − replaced) / (ablated − clean): 1 when the transcoders lose nothing.
    pub ce_loss_score: f64,
    /// KL(clean ‖ replaced) of the next-token distributions, mean over positions.
    pub kl_div_replaced: f64,
    /// KL(clean ‖ ablated), likewise.
    pub kl_div_ablated: f64,
    /// The transcoder's FVU against the MLP output on the clean pass (per layer only).
    pub fvu: Option<f64>,
}

/// `eval-model --transcoders`: every MLP replaced at once, then each alone.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ReplacementEval {
    /// Contexts evaluated.
    pub n_contexts: u64,
    /// Next tokens predicted.
    pub n_predicted: u64,
    /// The real model's CE loss.
    pub ce_loss_clean: f64,
    /// Every MLP replaced.
    pub all: SpliceScore,
    /// One MLP replaced at a time.
    pub per_layer: Vec<SpliceScore>,
    /// Rows (tokens) evaluated.
    pub n_rows: u64,
    /// Per layer, the rows whose MLP output stayed the real MLP's (the sinks; 0 with `keep_sinks` off).
    pub sink_rows: Vec<u64>,
}

/// How [`evaluate_replacement`] runs.
#[derive(Debug, Clone)]
pub struct ReplacementEvalOptions {
    /// Contexts per forward pass.
    pub batch: usize,
    /// Also replace, then ablate, each MLP alone: two more passes per layer.
    pub per_layer: bool,
    /// Leave the attention sinks to the real MLPs ([`sink_masks`]); false replaces every row.
    pub keep_sinks: bool,
    /// With `keep_sinks`: rows above this multiple of a layer's median MLP-output norm are sinks too.
    pub sink_norm_factor: f32,
    /// Draw a progress bar.
    pub progress: bool,
}

impl Default for ReplacementEvalOptions {
    fn default() -> Self {
        ReplacementEvalOptions { batch: 4, per_layer: true, keep_sinks: true, sink_norm_factor: 10.0, progress: false }
    }
}

/// CE and KL sums of one spliced pass against the clean log-probabilities.
#[derive(Default, Clone, Copy)]
struct Sums {
    ce: f64,
    kl: f64,
}

/// Evaluate the replacement model on `tokens` (`n` contexts of `seq` tokens). A set of the first blocks
/// only replaces (and ablates) those MLPs.
pub fn evaluate_replacement(
    model: &Model,
    set: &TranscoderSet,
    tokens: &[u32],
    seq: usize,
    opts: &ReplacementEvalOptions,
) -> CircuitsResult<ReplacementEval> {
    check_layers(model, set, true)?;
    if seq < 2 || tokens.is_empty() || !tokens.len().is_multiple_of(seq) {
        bail_input!(
            "replacement eval needs whole contexts of at least 2 tokens ({} tokens, context {seq})",
            tokens.len()
        );
    }
    let n = set.layers.len();
    let vocab = model.config().vocab_size;
    let n_ctx = tokens.len() / seq;
    let b = opts.batch.max(1);
    let pb = if opts.progress { indicatif::ProgressBar::new(n_ctx as u64) } else { indicatif::ProgressBar::hidden() };
    let (mut ce_clean, mut all_r, mut all_a) = (0f64, Sums::default(), Sums::default());
    let mut layer_r = vec![Sums::default(); n];
    let mut layer_a = vec![Sums::default(); n];
    let mut fvu = vec![(0f64, 0f64); n];
    let mut sink_rows = vec![0u64; n];
    for c0 in (0..n_ctx).step_by(b) {
        let nb = b.min(n_ctx - c0);
        let tk = &tokens[c0 * seq..(c0 + nb) * seq];
        let (ins, outs) = clean_mlp_io(model, set, tk, nb)?;
        let keep = opts.keep_sinks.then(|| sink_masks(model, tk, seq, &outs, opts.sink_norm_factor));
        let base = Splice { keep: keep.as_deref(), ..Splice::clean(n) };
        let run = |s: &Splice| -> Result<Vec<f32>> {
            let mut l = replacement_forward(model, set, tk, nb, s, Logits::All)?;
            log_softmax_rows(&mut l, vocab);
            Ok(l)
        };
        let clean = run(&base)?;
        ce_clean += ce_and_kl(&clean, &clean, tk, seq, vocab).ce;
        add(&mut all_r, ce_and_kl(&clean, &run(&Splice { replace: vec![true; n], ..base.clone() })?, tk, seq, vocab));
        add(&mut all_a, ce_and_kl(&clean, &run(&Splice { ablate: vec![true; n], ..base.clone() })?, tk, seq, vocab));
        for l in 0..n {
            let keep_l = keep.as_ref().map(|k| k[l].as_slice());
            sink_rows[l] += keep_l.map_or(0, |k| k.iter().filter(|&&s| s).count() as u64);
            if opts.per_layer {
                let mut one = base.clone();
                one.replace[l] = true;
                add(&mut layer_r[l], ce_and_kl(&clean, &run(&one)?, tk, seq, vocab));
                let mut one = base.clone();
                one.ablate[l] = true;
                add(&mut layer_a[l], ce_and_kl(&clean, &run(&one)?, tk, seq, vocab));
                let t = &set.layers[l];
                let (sse, var) = residual_and_variance(&outs[l], &t.forward(&ins[l]), t.d_out, keep_l);
                fvu[l].0 += sse;
                fvu[l].1 += var;
            }
        }
        pb.inc(nb as u64);
    }
    pb.finish_and_clear();
    let n_pred = (n_ctx * (seq - 1)) as f64;
    let n_rows = tokens.len() as f64;
    let ce_clean = ce_clean / n_pred;
    let score = |name: String, r: Sums, a: Sums, fvu: Option<f64>| {
        let (cr, ca) = (r.ce / n_pred, a.ce / n_pred);
        SpliceScore {
            layers: name,
            ce_loss_replaced: cr,
            ce_loss_ablated: ca,
            ce_loss_score: (ca - cr) / (ca - ce_clean),
            kl_div_replaced: r.kl / n_rows,
            kl_div_ablated: a.kl / n_rows,
            fvu,
        }
    };
    let per_layer = if opts.per_layer {
        (0..n).map(|l| score(l.to_string(), layer_r[l], layer_a[l], Some(fvu[l].0 / fvu[l].1))).collect()
    } else {
        Vec::new()
    };
    Ok(ReplacementEval {
        n_contexts: n_ctx as u64,
        n_predicted: n_pred as u64,
        ce_loss_clean: ce_clean,
        all: score("all".into(), all_r, all_a, None),
        per_layer,
        n_rows: tokens.len() as u64,
        sink_rows,
    })
}

fn add(acc: &mut Sums, s: Sums) {
    acc.ce += s.ce;
    acc.kl += s.kl;
}

/// `(Σ‖y − ŷ‖², Σ‖y − mean(y)‖²)` over the rows of one batch that are not kept (the sinks).
fn residual_and_variance(y: &[f32], yhat: &[f32], d: usize, keep: Option<&[bool]>) -> (f64, f64) {
    let rows = || y.chunks(d).zip(yhat.chunks(d)).enumerate().filter(|(i, _)| !kept(keep, *i)).map(|(_, r)| r);
    let n = rows().count().max(1) as f64;
    let mut mean = vec![0f64; d];
    for (r, _) in rows() {
        mean.iter_mut().zip(r).for_each(|(m, v)| *m += *v as f64 / n);
    }
    let sse = rows().flat_map(|(a, b)| a.iter().zip(b)).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let var = rows().flat_map(|(r, _)| r.iter().zip(&mean).map(|(v, m)| (*v as f64 - m).powi(2))).sum();
    (sse, var)
}

fn log_softmax_rows(x: &mut [f32], vocab: usize) {
    for row in x.chunks_mut(vocab) {
        let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let lse = max + row.iter().map(|v| ((v - max) as f64).exp()).sum::<f64>().ln() as f32;
        row.iter_mut().for_each(|v| *v -= lse);
    }
}

/// Sum over rows of the next-token CE under `spliced`, and of KL(clean ‖ spliced) (both log-probs).
fn ce_and_kl(clean: &[f32], spliced: &[f32], tokens: &[u32], seq: usize, vocab: usize) -> Sums {
    let mut s = Sums::default();
    for (r, (c, q)) in clean.chunks(vocab).zip(spliced.chunks(vocab)).enumerate() {
        if r % seq + 1 < seq {
            s.ce -= q[tokens[r + 1] as usize] as f64;
        }
        s.kl += c.iter().zip(q).map(|(lp, lq)| (*lp as f64).exp() * (*lp as f64 - *lq as f64)).sum::<f64>();
    }
    s
}
