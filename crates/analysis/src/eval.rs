//! Model-level evaluation: splice the SAE into the forward pass and measure what the model loses.
//!
//! Definitions follow SAELens `evals.py`:
//! - `ce_loss_score = (CE_ablation − CE_sae) / (CE_ablation − CE_clean)`, `delta_lm_loss = CE_sae − CE_clean`
//!   (Gemma Scope's "delta LM loss"); CE is the mean next-token cross-entropy over every position that
//!   has a next token in the context.
//! - `kl_div_with_sae = mean over positions of KL(clean ‖ spliced)` (the direction SAELens computes,
//!   `F.kl_div(log q_spliced, log p_clean, log_target=True)`), same for ablation;
//!   `kl_div_score = (KL_ablation − KL_sae) / KL_ablation`.
//! - Zero-ablation replaces the hook activation with zeros.
//! - Reconstruction metrics (the same as `saekit_sae::evaluate`): explained variance over the whole set
//!   `1 − E‖x − x̂‖² / (E‖x‖² − ‖E x‖²)`, `fvu = 1 − EV`, `mse` = mean over tokens of Σ_dims (x − x̂)²,
//!   `cossim`, `l2_ratio` = mean per token ‖x̂‖/‖x‖, `l2_norm_in/out`, `relative_reconstruction_bias`,
//!   `l0`, `l1`, `dead_frac` (never fired on these tokens), `dense_frac` (fired on > 10% of tokens).
//!
//! Where this differs from SAELens: attention-sink rows (position 0, special tokens such as
//! `<|endoftext|>`, and any row above 10x the batch's median norm: mid-document contexts without BOS
//! put their sink on the first one or two tokens; ~100x the median norm in SmolLM2) keep their clean
//! activation in both the SAE splice and the zero-ablation, and are excluded from the
//! reconstruction metrics. SAELens replaces
//! every position (its newer `exclude_special_tokens` option excludes them from the metrics only).
//! CE and KL still average over all positions, sinks included: their logits change through attention.

use crate::error::{bail_input, AnalysisResult};
use std::time::Instant;

use anyhow::Context as _;
use rayon::prelude::*;
use saekit_model::{HookPoint, Hooks, Logits, Model};
use saekit_sae::metrics::RowRecon;
use saekit_sae::{Sae, SparseCodes};
use saekit_store::TokenDataset;
use serde::Serialize;

use crate::analyze::{mark_norm_outliers, sae_hook, sink_rows, SINK_NORM_FACTOR};

/// What the hook does to the activation during a forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpliceMode {
    /// Leave it alone.
    Clean,
    /// Replace with the SAE reconstruction x̂.
    Reconstruction,
    /// Replace with x̂ + (x − x̂): must reproduce the clean model (the error-term check).
    ReconstructionWithError,
    /// Replace with zeros.
    ZeroAblation,
}

/// What [`eval_model`] reads and how; the defaults are `saekit eval-model`'s.
#[derive(Debug, Clone)]
pub struct ModelEvalOptions {
    /// Tokens to evaluate on (rounded up to whole contexts; capped by the split).
    pub n_tokens: u64,
    /// Split of the tokenized dataset to read ("validation": text the SAE was not trained on).
    pub split: String,
    /// Contexts per forward pass (each is run four ways: clean, SAE, SAE with error, zero-ablated).
    pub batch_contexts: usize,
    /// Keep the clean activation on position 0, special tokens and rows above `sink_norm_factor` x
    /// the batch's median norm (see the module doc).
    pub keep_sinks: bool,
    /// The norm rule's multiple: rows above this x the batch's median L2 norm count as sinks (0: none).
    pub sink_norm_factor: f32,
    /// Hook to splice at (default: the SAE's `metadata.hook_name`).
    pub hook: Option<HookPoint>,
    /// Draw a progress bar on stderr.
    pub progress: bool,
}

impl Default for ModelEvalOptions {
    fn default() -> Self {
        ModelEvalOptions {
            n_tokens: 65_536,
            split: "validation".into(),
            batch_contexts: 4,
            keep_sinks: true,
            sink_norm_factor: SINK_NORM_FACTOR,
            hook: None,
            progress: true,
        }
    }
}

/// What the model loses with the SAE spliced in, under SAELens' metric names (definitions in the module
/// doc). Losses are in nats per predicted token; norms in the hook's activation units.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ModelEvalReport {
    /// The hook point the SAE was spliced at (`blocks.6.hook_resid_post`).
    pub hook: String,
    /// Contexts evaluated.
    pub n_contexts: u64,
    /// Positions whose next token is predicted (the CE average).
    pub n_predicted: u64,
    /// Rows replaced by the splice (the reconstruction metrics' rows).
    pub n_spliced_rows: u64,
    /// Rows left clean as attention sinks.
    pub n_sink_rows: u64,
    /// Mean next-token cross-entropy of the clean model.
    pub ce_loss_without_sae: f64,
    /// Mean next-token cross-entropy with the reconstruction x̂ in place of the activation.
    pub ce_loss_with_sae: f64,
    /// Mean next-token cross-entropy with the activation zeroed.
    pub ce_loss_with_ablation: f64,
    /// `(CE_ablation − CE_sae) / (CE_ablation − CE_clean)`: 1 when the SAE loses nothing, 0 when it is no
    /// better than zeroing the activation (SAELens' `ce_loss_score`).
    pub ce_loss_score: f64,
    /// `CE_sae − CE_clean` (Gemma Scope's "delta LM loss").
    pub delta_lm_loss: f64,
    /// Mean over positions of KL(clean ‖ with SAE), in nats.
    pub kl_div_with_sae: f64,
    /// Mean over positions of KL(clean ‖ zero-ablated), in nats.
    pub kl_div_with_ablation: f64,
    /// `(KL_ablation − KL_sae) / KL_ablation` (SAELens' `kl_div_score`).
    pub kl_div_score: f64,
    /// `1 − E‖x − x̂‖² / (E‖x‖² − ‖E x‖²)` over the spliced rows.
    pub explained_variance: f64,
    /// Fraction of variance unexplained, `1 − explained_variance`.
    pub fvu: f64,
    /// Mean over spliced rows of the summed squared error `Σ_dims (x − x̂)²`.
    pub mse: f64,
    /// Mean over spliced rows of the cosine similarity of x and x̂.
    pub cossim: f64,
    /// Mean L2 norm of the input rows x.
    pub l2_norm_in: f64,
    /// Mean L2 norm of the reconstructions x̂.
    pub l2_norm_out: f64,
    /// Mean over rows of ‖x̂‖ / ‖x‖ (below 1: the SAE shrinks its outputs).
    pub l2_ratio: f64,
    /// `E‖x̂‖² / E⟨x, x̂⟩` (Gemma Scope's relative reconstruction bias; 1 is unbiased, below 1 shrinkage).
    pub relative_reconstruction_bias: f64,
    /// Mean number of non-zero features per spliced row.
    pub l0: f64,
    /// Mean L1 norm of the feature activations per spliced row.
    pub l1: f64,
    /// Fraction of features that never fired on the evaluated rows.
    pub dead_frac: f64,
    /// Fraction of features that fired on more than 10% of the evaluated rows.
    pub dense_frac: f64,
    /// Wall-clock seconds of the evaluation.
    pub secs: f64,
}

/// Run one forward pass over `[batch, seq]` tokens with the SAE applied as `mode` at `hook`,
/// skipping rows marked in `keep` (true = leave clean) and rows whose norm exceeds `norm_factor` x
/// the median (0: none). Returns all logits and, for the modes that run the SAE, the hook input,
/// the codes of every row and the final keep mask.
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
pub fn spliced_forward(
    model: &Model,
    sae: &Sae,
    hook: HookPoint,
    tokens: &[u32],
    batch: usize,
    mode: SpliceMode,
    keep: &[bool],
    norm_factor: f32,
) -> AnalysisResult<(Vec<f32>, Option<(Vec<f32>, SparseCodes, Vec<bool>)>)> {
    let d = sae.d_in;
    let mut captured: Option<(Vec<f32>, SparseCodes, Vec<bool>)> = None;
    let logits = {
        let cap = &mut captured;
        let mut hooks = Hooks::new();
        hooks.add(hook, move |ctx, x: &mut [f32]| {
            if ctx.width != d {
                bail_input!("SAE d_in {d} does not match the width {} of {}", ctx.width, ctx.point);
            }
            let mut keep: Vec<bool> = (0..x.len() / d).map(|r| keep.get(r).copied().unwrap_or(false)).collect();
            mark_norm_outliers(&mut keep, x, d, norm_factor);
            let kept = |r: usize| keep[r];
            match mode {
                SpliceMode::Clean => {}
                SpliceMode::ZeroAblation => {
                    x.par_chunks_mut(d).enumerate().filter(|(r, _)| !kept(*r)).for_each(|(_, row)| row.fill(0.0));
                }
                SpliceMode::Reconstruction | SpliceMode::ReconstructionWithError => {
                    let codes = sae.encode(x);
                    let xh = sae.decode(&codes);
                    let with_err = mode == SpliceMode::ReconstructionWithError;
                    let orig = x.to_vec();
                    x.par_chunks_mut(d).zip(xh.par_chunks(d)).enumerate().filter(|(r, _)| !kept(*r)).for_each(
                        |(_, (row, h))| {
                            for (v, &hv) in row.iter_mut().zip(h) {
                                // x̂ + (x − x̂), evaluated as written: the check is that the error term
                                // restores the activation the rest of the network sees
                                *v = if with_err { hv + (*v - hv) } else { hv };
                            }
                        },
                    );
                    *cap = Some((orig, codes, keep.clone()));
                }
            }
            Ok(())
        });
        let mut cache = model.new_cache(batch);
        model.forward(tokens, batch, &mut cache, &mut hooks, Logits::All)?
    };
    Ok((logits, captured))
}

/// Log-softmax of each `vocab`-wide row, in place.
fn log_softmax_rows(logits: &mut [f32], vocab: usize) {
    logits.par_chunks_mut(vocab).for_each(|row| {
        let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let s: f64 = row.iter().map(|&v| ((v - m) as f64).exp()).sum();
        let lse = m + s.ln() as f32;
        row.iter_mut().for_each(|v| *v -= lse);
    });
}

/// Sum over predicted positions of −log p(next token) and of KL(clean ‖ other) over all rows.
fn ce_and_kl(clean_lp: &[f32], other_lp: &[f32], tokens: &[u32], seq: usize, vocab: usize) -> (f64, f64) {
    other_lp
        .par_chunks(vocab)
        .zip(clean_lp.par_chunks(vocab))
        .enumerate()
        .map(|(r, (q, p))| {
            let ce = if (r + 1) % seq != 0 { -(q[tokens[r + 1] as usize] as f64) } else { 0.0 };
            let kl: f64 = p.iter().zip(q).map(|(&lp, &lq)| (lp as f64).exp() * (lp - lq) as f64).sum();
            (ce, kl)
        })
        .reduce(|| (0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1))
}

#[derive(Default)]
struct Recon {
    sse: f64,
    sumsq: f64,
    sum_x: Vec<f64>,
    cos: f64,
    n_in: f64,
    n_out: f64,
    ratio: f64,
    xhn2: f64,
    xdot: f64,
    l0: f64,
    l1: f64,
    rows: u64,
    fire: Vec<u64>,
}

impl Recon {
    fn add(&mut self, sae: &Sae, x: &[f32], codes: &SparseCodes, keep: &[bool]) {
        let d = sae.d_in;
        if self.sum_x.is_empty() {
            self.sum_x = vec![0.0; d];
            self.fire = vec![0; sae.d_sae];
        }
        let xh = sae.decode(codes);
        for r in 0..x.len() / d {
            if keep.get(r).copied().unwrap_or(false) {
                continue;
            }
            let a = &x[r * d..(r + 1) * d];
            let p = RowRecon::of(a, &xh[r * d..(r + 1) * d]);
            for (s, &v) in self.sum_x.iter_mut().zip(a) {
                *s += v as f64;
            }
            self.sse += p.sq_err;
            self.sumsq += p.x_sq;
            self.cos += p.cossim();
            self.n_in += p.x_sq.sqrt();
            self.n_out += p.xhat_sq.sqrt();
            self.ratio += p.l2_ratio();
            self.xhn2 += p.xhat_sq;
            self.xdot += p.dot;
            let (idx, val) = codes.row(r);
            for (&j, &v) in idx.iter().zip(val) {
                if v != 0.0 {
                    self.l0 += 1.0;
                    self.l1 += v.abs() as f64;
                    self.fire[j as usize] += 1;
                }
            }
            self.rows += 1;
        }
    }
}

/// Evaluate on `tokens` (`n` contexts of `seq` tokens, concatenated).
pub fn eval_model_on_tokens(
    model: &Model,
    sae: &Sae,
    tokens: &[u32],
    seq: usize,
    opts: &ModelEvalOptions,
) -> AnalysisResult<ModelEvalReport> {
    let t0 = Instant::now();
    let hook = sae_hook(model, sae, "the SAE", opts.hook)?;
    if seq < 2 || tokens.is_empty() || !tokens.len().is_multiple_of(seq) {
        bail_input!("model eval needs whole contexts of at least 2 tokens ({} tokens, context {seq})", tokens.len());
    }
    let vocab = model.config().vocab_size;
    let n_ctx = tokens.len() / seq;
    let b = opts.batch_contexts.max(1);
    let pb = if opts.progress { indicatif::ProgressBar::new(n_ctx as u64) } else { indicatif::ProgressBar::hidden() };
    let (mut ce_c, mut ce_s, mut ce_a, mut kl_s, mut kl_a) = (0f64, 0f64, 0f64, 0f64, 0f64);
    let (mut n_pred, mut n_rows, mut n_sink) = (0u64, 0u64, 0u64);
    let mut rec = Recon::default();
    for c0 in (0..n_ctx).step_by(b) {
        let nb = b.min(n_ctx - c0);
        let tk = &tokens[c0 * seq..(c0 + nb) * seq];
        let keep = if opts.keep_sinks { sink_rows(model, tk, seq) } else { vec![false; tk.len()] };
        let nf = if opts.keep_sinks { opts.sink_norm_factor } else { 0.0 };
        let (mut clean, _) = spliced_forward(model, sae, hook, tk, nb, SpliceMode::Clean, &keep, nf)?;
        log_softmax_rows(&mut clean, vocab);
        let (mut spl, cap) = spliced_forward(model, sae, hook, tk, nb, SpliceMode::Reconstruction, &keep, nf)?;
        log_softmax_rows(&mut spl, vocab);
        let (ce, kl) = ce_and_kl(&clean, &spl, tk, seq, vocab);
        ce_s += ce;
        kl_s += kl;
        drop(spl);
        let (ce, _) = ce_and_kl(&clean, &clean, tk, seq, vocab);
        ce_c += ce;
        let (mut abl, _) = spliced_forward(model, sae, hook, tk, nb, SpliceMode::ZeroAblation, &keep, nf)?;
        log_softmax_rows(&mut abl, vocab);
        let (ce, kl) = ce_and_kl(&clean, &abl, tk, seq, vocab);
        ce_a += ce;
        kl_a += kl;
        let (x, codes, keep) = cap.context("internal: splice did not capture the hook")?;
        rec.add(sae, &x, &codes, &keep);
        n_pred += (nb * (seq - 1)) as u64;
        n_sink += keep.iter().filter(|&&k| k).count() as u64;
        n_rows += tk.len() as u64;
        pb.inc(nb as u64);
    }
    pb.finish_and_clear();
    let np = n_pred as f64;
    let nr = n_rows as f64;
    let (ce_clean, ce_sae, ce_abl) = (ce_c / np, ce_s / np, ce_a / np);
    let (kl_sae, kl_abl) = (kl_s / nr, kl_a / nr);
    let rows = rec.rows.max(1) as f64;
    let mean_sq = rec.sumsq / rows;
    let mean_norm_sq: f64 = rec.sum_x.iter().map(|s| (s / rows) * (s / rows)).sum();
    let total_var = mean_sq - mean_norm_sq;
    let mse = rec.sse / rows;
    let ev = if total_var > 1e-10 { 1.0 - mse / total_var } else { 0.0 };
    let d_sae = sae.d_sae.max(1) as f64;
    Ok(ModelEvalReport {
        hook: hook.to_string(),
        n_contexts: n_ctx as u64,
        n_predicted: n_pred,
        n_spliced_rows: rec.rows,
        n_sink_rows: n_sink,
        ce_loss_without_sae: ce_clean,
        ce_loss_with_sae: ce_sae,
        ce_loss_with_ablation: ce_abl,
        ce_loss_score: (ce_abl - ce_sae) / (ce_abl - ce_clean),
        delta_lm_loss: ce_sae - ce_clean,
        kl_div_with_sae: kl_sae,
        kl_div_with_ablation: kl_abl,
        kl_div_score: (kl_abl - kl_sae) / kl_abl,
        explained_variance: ev,
        fvu: 1.0 - ev,
        mse,
        cossim: rec.cos / rows,
        l2_norm_in: rec.n_in / rows,
        l2_norm_out: rec.n_out / rows,
        l2_ratio: rec.ratio / rows,
        relative_reconstruction_bias: (rec.xhn2 / rows) / (rec.xdot / rows),
        l0: rec.l0 / rows,
        l1: rec.l1 / rows,
        dead_frac: rec.fire.iter().filter(|&&c| c == 0).count() as f64 / d_sae,
        dense_frac: rec.fire.iter().filter(|&&c| c as f64 > 0.1 * rows).count() as f64 / d_sae,
        secs: t0.elapsed().as_secs_f64(),
    })
}

/// Evaluate on the first `opts.n_tokens` tokens (whole contexts) of a tokenized dataset's split.
pub fn eval_model(
    model: &Model,
    sae: &Sae,
    dataset: &TokenDataset,
    opts: &ModelEvalOptions,
) -> AnalysisResult<ModelEvalReport> {
    let split = dataset.split(&opts.split)?;
    let seq = split.context_len();
    let n = opts.n_tokens.div_ceil(seq as u64).max(1).min(split.n_contexts());
    if n == 0 {
        bail_input!("{}: split {:?} has no contexts", dataset.dir().display(), opts.split);
    }
    let mut tokens = Vec::with_capacity(n as usize * seq);
    for c in 0..n {
        tokens.extend_from_slice(split.context(c));
    }
    eval_model_on_tokens(model, sae, &tokens, seq, opts)
}

impl ModelEvalReport {
    /// A two-column terminal table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let rows: [(&str, String); 26] = [
            ("hook", self.hook.clone()),
            ("contexts", self.n_contexts.to_string()),
            ("predicted tokens", self.n_predicted.to_string()),
            ("spliced rows / sink rows kept", format!("{} / {}", self.n_spliced_rows, self.n_sink_rows)),
            ("ce_loss_without_sae", format!("{:.4}", self.ce_loss_without_sae)),
            ("ce_loss_with_sae", format!("{:.4}", self.ce_loss_with_sae)),
            ("ce_loss_with_ablation", format!("{:.4}", self.ce_loss_with_ablation)),
            ("ce_loss_score", format!("{:.4}", self.ce_loss_score)),
            ("delta_lm_loss", format!("{:.4}", self.delta_lm_loss)),
            ("kl_div_with_sae", format!("{:.4}", self.kl_div_with_sae)),
            ("kl_div_with_ablation", format!("{:.4}", self.kl_div_with_ablation)),
            ("kl_div_score", format!("{:.4}", self.kl_div_score)),
            ("explained_variance", format!("{:.4}", self.explained_variance)),
            ("fvu", format!("{:.4}", self.fvu)),
            ("mse", format!("{:.4}", self.mse)),
            ("cossim", format!("{:.4}", self.cossim)),
            ("l2_norm_in", format!("{:.4}", self.l2_norm_in)),
            ("l2_norm_out", format!("{:.4}", self.l2_norm_out)),
            ("l2_ratio", format!("{:.4}", self.l2_ratio)),
            ("relative_reconstruction_bias", format!("{:.4}", self.relative_reconstruction_bias)),
            ("l0", format!("{:.2}", self.l0)),
            ("l1", format!("{:.3}", self.l1)),
            ("dead %", format!("{:.2}", 100.0 * self.dead_frac)),
            ("dense % (>10% of tokens)", format!("{:.2}", 100.0 * self.dense_frac)),
            ("seconds", format!("{:.1}", self.secs)),
            ("", String::new()),
        ];
        for (k, v) in rows.iter().filter(|(k, _)| !k.is_empty()) {
            s.push_str(&format!("{k:<30} {v}\n"));
        }
        s
    }
}
