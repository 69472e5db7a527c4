//! The optimiser step: remove the decoder-gradient component parallel to the decoder rows, clip the
//! global gradient norm, Adam (PyTorch semantics, compact over the touched latents), renormalise.

use super::{AdamState, Collective, Grads, Prof, Workspace};
use crate::adam::{adam_dense, adam_rows, AdamHyper, AfterUpdate};
use crate::kernels::{self, EncoderCopy};
use crate::sae::Sae;
use rayon::prelude::*;

/// Optimiser hyper-parameters of one [`apply_update`].
#[derive(Debug, Clone, Copy)]
pub struct UpdateParams {
    /// Adam's learning rate, betas, epsilon and step count.
    pub adam: AdamHyper,
    /// Clip the global gradient norm to this (0 = off).
    pub grad_clip: f32,
    /// Keep decoder rows at unit norm (and drop the gradient component along them).
    pub unit_norm_decoder: bool,
    /// Compute the gradient norm even when not clipping (for logging).
    pub need_norm: bool,
}

/// Clip, Adam, renormalise, with the gradients of the last [`super::forward_backward`] in `ws` (a bf16
/// step's encoder copy is written there too). Returns the pre-clip gradient norm (NaN when neither
/// clipping nor `need_norm` asked for it); sharded, the norm is the whole SAE's.
pub fn apply_update(
    sae: &mut Sae,
    opt: &mut AdamState,
    ws: &mut Workspace,
    up: &UpdateParams,
    comm: &dyn Collective,
) -> f64 {
    let (g, w_enc_bf16) = (&mut ws.grads, &mut ws.w_enc_bf16);
    let mut prof = Prof::new();
    if up.unit_norm_decoder {
        remove_parallel_decoder_grad(sae, g);
    }
    let norm = if up.grad_clip > 0.0 || up.need_norm { grad_norm(g, (sae.d_in, sae.d_out()), comm) } else { f64::NAN };
    prof.mark("parallel + norm");
    if up.grad_clip > 0.0 && norm > up.grad_clip as f64 {
        scale_grads(g, (sae.d_in, sae.d_out()), (up.grad_clip as f64 / (norm + 1e-6)) as f32);
    }
    adam_step(sae, opt, g, up, w_enc_bf16);
    prof.mark("adam");
    prof.print("update");
    norm
}

/// Adam on every parameter: the compact matrices and `b_enc` row by row (untouched rows still move
/// through their first moment, as torch.optim.Adam moves them), the rest dense. A bf16 step's
/// encoder copy is packed in the encoder's pass.
fn adam_step(sae: &mut Sae, opt: &mut AdamState, g: &Grads, up: &UpdateParams, w_enc_bf16: &mut EncoderCopy) {
    let (d, d_out, h) = (sae.d_in, sae.d_out(), up.adam);
    let n = g.touched.touched.len();
    let slot = &g.touched.slot;
    let (w, m, v, gp) = (&mut sae.params, &mut opt.m, &mut opt.v, &g.params);
    let g_enc = &gp.w_enc[..n * d];
    let pack = w_enc_bf16.for_update().map_or(AfterUpdate::Nothing, AfterUpdate::Pack);
    adam_rows(&mut w.w_enc, &mut m.w_enc, &mut v.w_enc, d, slot, g_enc, h, pack);
    w_enc_bf16.written(&w.w_enc);
    let renorm = if up.unit_norm_decoder { AfterUpdate::Renormalise } else { AfterUpdate::Nothing };
    adam_rows(&mut w.w_dec, &mut m.w_dec, &mut v.w_dec, d_out, slot, &gp.w_dec[..n * d_out], h, renorm);
    adam_rows(&mut w.b_enc, &mut m.b_enc, &mut v.b_enc, 1, slot, &gp.b_enc[..n], h, AfterUpdate::Nothing);
    adam_dense(&mut w.b_dec, &mut m.b_dec, &mut v.b_dec, &gp.b_dec, h);
    if !gp.w_skip.is_empty() && !w.w_skip.is_empty() {
        adam_dense(&mut w.w_skip, &mut m.w_skip, &mut v.w_skip, &gp.w_skip, h);
    }
    if !gp.threshold.is_empty() && !w.threshold.is_empty() {
        // θ itself, not log θ (SAELens since its issue #494): Adam moves a parameter ~lr per step, so
        // a log parameterisation barely moves a 0.01 init within a run's lr·steps, and L0 never falls.
        // Projected to θ ≥ 0: below zero the gate would pass negative pre-activations.
        adam_dense(&mut w.threshold, &mut m.threshold, &mut v.threshold, &gp.threshold, h);
        for t in w.threshold.iter_mut() {
            *t = t.max(0.0);
        }
    }
}

/// Global gradient L2 norm (fixed-order reduction). Sharded, the per-latent parts meet in one
/// all-reduce and the replicated b_dec is counted once.
fn grad_norm(g: &Grads, (d, d_out): (usize, usize), comm: &dyn Collective) -> f64 {
    let n = g.touched.touched.len();
    let p = &g.params;
    let rows = kernels::row_reduce(n, |u| {
        let a = &p.w_enc[u * d..(u + 1) * d];
        let b = &p.w_dec[u * d_out..(u + 1) * d_out];
        a.iter().chain(b).map(|&v| (v as f64).powi(2)).sum::<f64>() + (p.b_enc[u] as f64).powi(2)
    });
    if comm.shards() == 1 {
        let rest: f64 = p.b_dec.iter().chain(&p.threshold).chain(&p.w_skip).map(|&v| (v as f64).powi(2)).sum();
        return (rows + rest).sqrt();
    }
    let mut per_latent = [rows + p.threshold.iter().map(|&v| (v as f64).powi(2)).sum::<f64>()];
    comm.shard_sum_f64(&mut per_latent);
    (per_latent[0] + p.b_dec.iter().map(|&v| (v as f64).powi(2)).sum::<f64>()).sqrt()
}

/// Multiply every (used) gradient by `c`.
fn scale_grads(g: &mut Grads, (d, d_out): (usize, usize), c: f32) {
    let n = g.touched.touched.len();
    let p = &mut g.params;
    p.w_enc[..n * d].par_iter_mut().for_each(|v| *v *= c);
    p.w_dec[..n * d_out].par_iter_mut().for_each(|v| *v *= c);
    for t in [&mut p.b_enc[..n], &mut p.b_dec[..], &mut p.threshold[..], &mut p.w_skip[..]] {
        t.iter_mut().for_each(|v| *v *= c);
    }
}

/// Remove the decoder-gradient component parallel to each (unit) decoder row.
fn remove_parallel_decoder_grad(sae: &Sae, g: &mut Grads) {
    let d = sae.d_out();
    let n = g.touched.touched.len();
    let touched = &g.touched.touched;
    g.params.w_dec[..n * d].par_chunks_mut(d).enumerate().for_each(|(u, gr)| {
        let j = touched[u] as usize;
        let w = &sae.params.w_dec[j * d..(j + 1) * d];
        let nn = kernels::dot(w, w).max(1e-30);
        let p = kernels::dot(gr, w) / nn;
        kernels::axpy(-p, w, gr);
    });
}
