//! Forward/backward for architectures whose activations are not k-sparse by construction
//! (ReLU+L1, JumpReLU): early in training half the latents fire, so the decoder and backward
//! products run as dense GEMMs over reused [batch, d_sae] buffers.

use crate::config::{Arch, JumpReluSparsity};
use crate::kernels;
use crate::sae::Sae;
use crate::step::{recon_sse_and_grad, subtract_pre_bias_path, LossParams, StepStats, Workspace};
use anyhow::{bail, Result};
use rayon::prelude::*;

fn ensure<T: Clone + Default>(v: &mut Vec<T>, n: usize) {
    if v.len() < n {
        v.resize(n, T::default());
    }
}

#[inline]
fn rect(z: f32) -> f32 {
    if z > -0.5 && z < 0.5 {
        1.0
    } else {
        0.0
    }
}

/// ReLU + L1·‖W_dec‖ (Anthropic April 2024 / SAELens `standard`), or JumpReLU (SAELens `jumprelu`)
/// with rectangle-kernel straight-through estimators and one of SAELens' sparsity penalties: `step`
/// (DeepMind's L0), `tanh` (Anthropic's λ·Σ tanh(c·a‖W_dec‖)) or `quadratic` (Gemma Scope 2's
/// 2/L0*·(L0 − L0*)²), optionally with Anthropic's pre-activation loss on dead latents.
/// Loss terms are per-token means: mse = mean_t ‖x − x̂‖², sparsity = coef · mean_t (…).
pub(crate) fn forward_backward_dense(
    sae: &Sae,
    ws: &mut Workspace,
    x: &[f32],
    since_fired: &[u64],
    lp: &LossParams,
) -> Result<StepStats> {
    let d = sae.d_in;
    let ds = sae.d_sae;
    let rows = x.len() / d;
    if rows as u128 * ds as u128 > 1_500_000_000 {
        bail!(
            "{} needs a dense [batch, d_sae] buffer: batch {rows} x d_sae {ds} is too large; lower batch_size",
            lp.arch.name()
        );
    }
    let jump = lp.arch == Arch::JumpRelu;
    let bf = rows as f32;
    let mut prof = crate::step::Prof::new();
    let tv = crate::step::batch_total_variance(x, d).max(1e-30);
    let (xin, pre, act, gbuf, xhat, dxhat, g, fires, sel_val, sel_idx) = ws.dense_parts();
    ensure(xin, rows * d);
    ensure(pre, rows * ds);
    ensure(act, rows * ds);
    ensure(gbuf, rows * ds);
    ensure(xhat, rows * d);
    ensure(dxhat, rows * d);
    let xin = &mut xin[..rows * d];
    xin.copy_from_slice(x);
    if sae.apply_b_dec_to_input {
        xin.par_chunks_mut(d).for_each(|r| {
            for (v, b) in r.iter_mut().zip(&sae.b_dec) {
                *v -= b;
            }
        });
    }
    let (pre, act, gbuf) = (&mut pre[..rows * ds], &mut act[..rows * ds], &mut gbuf[..rows * ds]);
    kernels::gemm_abt(rows, ds, d, xin, d, &sae.w_enc, pre, ds);
    prof.mark("encoder gemm");
    let thr = &sae.threshold;
    pre.par_chunks_mut(ds).zip(act.par_chunks_mut(ds)).for_each(|(p, a)| {
        for j in 0..ds {
            p[j] += sae.b_enc[j];
            a[j] = if jump {
                if p[j] > thr[j] {
                    p[j]
                } else {
                    0.0
                }
            } else {
                p[j].max(0.0)
            };
        }
    });
    let dec_norm: Vec<f32> = sae.w_dec.par_chunks(d).map(|r| kernels::dot(r, r).sqrt()).collect();
    // L0 of each row: the ReLU path choice, the sparse lists' width, the quadratic penalty, the stats
    let row_l0: Vec<usize> = act.par_chunks(ds).map(|a| a.iter().filter(|&&v| v != 0.0).count()).collect();
    let nnz: usize = row_l0.iter().sum();
    if !jump && (nnz as f64) < lp.relu_sparse_below as f64 * ds as f64 * rows as f64 {
        // Sparse ReLU: gather each row's active latents into padded lists and reuse the TopK
        // kernels; the L1 terms ride along in the fused backward.
        let stride = row_l0.iter().copied().max().unwrap_or(0).max(1);
        ensure(sel_val, rows * stride);
        ensure(sel_idx, rows * stride);
        let (sv, si) = (&mut sel_val[..rows * stride], &mut sel_idx[..rows * stride]);
        sv.par_chunks_mut(stride).zip(si.par_chunks_mut(stride)).enumerate().for_each(|(r, (v, ix))| {
            v.fill(0.0);
            ix.fill(u32::MAX);
            let mut s = 0;
            for (j, &a) in act[r * ds..(r + 1) * ds].iter().enumerate() {
                if a != 0.0 {
                    v[s] = a;
                    ix[s] = j as u32;
                    s += 1;
                }
            }
        });
        let xhat = &mut xhat[..rows * d];
        kernels::sparse_decode(sv, si, stride, &sae.w_dec, d, Some(&sae.b_dec), xhat);
        prof.mark("sparse decode");
        let dxhat = &mut dxhat[..rows * d];
        let sse = recon_sse_and_grad(xhat, x, d, 2.0 / bf, dxhat);
        let l1_sum = kernels::row_reduce(rows, |r| {
            (0..stride)
                .filter(|&s| si[r * stride + s] != u32::MAX)
                .map(|s| (sv[r * stride + s] * dec_norm[si[r * stride + s] as usize]) as f64)
                .sum()
        });
        let cb = lp.sparsity_coef / bf;
        g.lm.build(ds, &[(&si[..], &sv[..], stride, 0)]);
        let n_t = g.lm.touched.len();
        ensure(&mut g.g_enc, n_t * d);
        ensure(&mut g.g_dec, n_t * d);
        ensure(&mut g.g_benc, n_t);
        kernels::fused_sparse_backward(
            &g.lm,
            d,
            &[&dxhat[..]],
            xin,
            &sae.w_dec,
            &mut g.g_enc,
            &mut g.g_dec,
            &mut g.g_benc,
            Some((cb, &dec_norm)),
        );
        prof.mark("fused backward");
        g.g_thr.clear();
        g.g_bdec.resize(d, 0.0);
        kernels::column_sum(dxhat, d, &mut g.g_bdec);
        subtract_pre_bias_path(sae, &g.lm.touched, &g.g_benc, &mut g.g_bdec);
        ensure(fires, ds);
        fires[..ds].fill(0);
        for &j in si.iter() {
            if j != u32::MAX {
                fires[j as usize] += 1;
            }
        }
        prof.print("sparse relu forward_backward");
        let mse = sse / rows as f64;
        let sparsity_loss = lp.sparsity_coef as f64 * l1_sum / rows as f64;
        return Ok(StepStats {
            loss: mse + sparsity_loss,
            fvu: sse / tv,
            mse,
            sparsity_loss,
            l0: nnz as f64 / rows as f64,
            ..Default::default()
        });
    }
    // decoder forward
    let xhat = &mut xhat[..rows * d];
    kernels::gemm_ab(rows, d, ds, act, &sae.w_dec, xhat, false);
    xhat.par_chunks_mut(d).for_each(|r| {
        for (v, b) in r.iter_mut().zip(&sae.b_dec) {
            *v += b;
        }
    });
    prof.mark("decoder gemm");
    let dxhat = &mut dxhat[..rows * d];
    let sse = recon_sse_and_grad(xhat, x, d, 2.0 / bf, dxhat);
    let coef = lp.sparsity_coef;
    let cb = coef / bf;
    // dA = dx̂ · W_decᵀ (the reconstruction part of dL/da)
    kernels::gemm_abt(rows, ds, d, dxhat, d, &sae.w_dec, gbuf, ds);
    prof.mark("dA gemm");
    let dead: Vec<bool> = since_fired.iter().map(|&t| t >= lp.dead_tokens).collect();
    let n_dead = dead.iter().filter(|&&b| b).count();
    let pa = if jump && n_dead > 0 { lp.pre_act_loss_coef / bf } else { 0.0 };
    let (eps, tanh_s, mode) = (lp.jumprelu_bandwidth, lp.jumprelu_tanh_scale, lp.jumprelu_sparsity);
    // One pass per 64-row block turns gbuf into dL/dpre and gathers the per-latent sums (threshold
    // gradient, gradient w.r.t. ‖W_dec,j‖, losses); blocks are folded in order, so it is deterministic.
    struct Part {
        thr: Vec<f32>,
        dnorm: Vec<f32>,
        sparsity: f64,
        pre_act: f64,
    }
    let parts: Vec<Part> = gbuf
        .par_chunks_mut(64 * ds)
        .enumerate()
        .map(|(b, gblk)| {
            let mut part =
                Part { thr: vec![0.0; if jump { ds } else { 0 }], dnorm: vec![0.0; ds], sparsity: 0.0, pre_act: 0.0 };
            for (i, ga) in gblk.chunks_mut(ds).enumerate() {
                let r = b * 64 + i;
                let (p, a) = (&pre[r * ds..(r + 1) * ds], &act[r * ds..(r + 1) * ds]);
                let l0 = row_l0[r];
                if !jump {
                    // ReLU + λ·Σ a‖W_dec‖
                    for j in 0..ds {
                        if a[j] != 0.0 {
                            part.sparsity += (a[j] * dec_norm[j]) as f64;
                            part.dnorm[j] += cb * a[j];
                            ga[j] += cb * dec_norm[j];
                        } else {
                            ga[j] = 0.0;
                        }
                    }
                    continue;
                }
                // dL/d(l0_t) of the step / quadratic penalties (Step's straight-through estimator)
                let w_l0 = match mode {
                    JumpReluSparsity::Step => {
                        part.sparsity += l0 as f64;
                        cb
                    }
                    JumpReluSparsity::Quadratic => {
                        let dev = l0 as f32 - lp.target_l0;
                        part.sparsity += (2.0 / lp.target_l0 * dev * dev) as f64;
                        cb * 4.0 / lp.target_l0 * dev
                    }
                    JumpReluSparsity::Tanh => 0.0,
                };
                for j in 0..ds {
                    let th = thr[j];
                    if mode == JumpReluSparsity::Tanh {
                        // Anthropic: λ·Σ tanh(c·a‖W_dec‖); its gradient reaches a even where a = 0
                        let u = tanh_s * a[j] * dec_norm[j];
                        let t = u.tanh();
                        part.sparsity += t as f64;
                        let sech2 = 1.0 - t * t;
                        ga[j] += cb * tanh_s * dec_norm[j] * sech2;
                        part.dnorm[j] += cb * tanh_s * a[j] * sech2;
                    }
                    let k = rect((p[j] - th) / eps);
                    let mut gp = if a[j] != 0.0 { ga[j] } else { 0.0 };
                    if k != 0.0 {
                        // JumpReLU's and Step's pseudo-derivatives w.r.t. the threshold
                        let ste = (th / eps) * ga[j] + w_l0 / eps;
                        part.thr[j] -= ste;
                        if lp.jumprelu_ste_to_input {
                            gp += ste;
                        }
                    }
                    if pa != 0.0 && dead[j] && th > p[j] {
                        // Anthropic's pre-activation loss on dead latents: λ_p·Σ ReLU(θ − pre)‖W_dec‖
                        part.pre_act += ((th - p[j]) * dec_norm[j]) as f64;
                        part.dnorm[j] += pa * (th - p[j]);
                        part.thr[j] += pa * dec_norm[j];
                        gp -= pa * dec_norm[j];
                    }
                    ga[j] = gp;
                }
            }
            part
        })
        .collect();
    let mut sp_sum = 0.0f64;
    let mut pre_act_sum = 0.0f64;
    let mut dnorm = vec![0.0f32; ds];
    g.g_thr.clear();
    if jump {
        g.g_thr.resize(ds, 0.0);
    }
    for part in parts {
        sp_sum += part.sparsity;
        pre_act_sum += part.pre_act;
        for (t, v) in g.g_thr.iter_mut().zip(&part.thr) {
            *t += v;
        }
        for (t, v) in dnorm.iter_mut().zip(&part.dnorm) {
            *t += v;
        }
    }
    let mse = sse / rows as f64;
    let sparsity_loss = coef as f64 * sp_sum / rows as f64;
    let pre_act_loss = lp.pre_act_loss_coef as f64 * pre_act_sum / rows as f64;
    prof.mark("elementwise");
    g.lm.set_dense(ds);
    ensure(&mut g.g_enc, ds * d);
    ensure(&mut g.g_dec, ds * d);
    ensure(&mut g.g_benc, ds);
    kernels::gemm_atb(ds, d, rows, gbuf, xin, &mut g.g_enc[..ds * d], false);
    kernels::gemm_atb(ds, d, rows, act, dxhat, &mut g.g_dec[..ds * d], false);
    prof.mark("weight-grad gemms");
    kernels::column_sum(gbuf, ds, &mut g.g_benc[..ds]);
    // penalties on ‖W_dec,j‖: ∂‖W_dec,j‖/∂W_dec,j = W_dec,j / ‖W_dec,j‖
    g.g_dec[..ds * d].par_chunks_mut(d).enumerate().for_each(|(j, gr)| {
        if dec_norm[j] > 0.0 && dnorm[j] != 0.0 {
            kernels::axpy(dnorm[j] / dec_norm[j], &sae.w_dec[j * d..(j + 1) * d], gr);
        }
    });
    g.g_bdec.resize(d, 0.0);
    kernels::column_sum(dxhat, d, &mut g.g_bdec);
    subtract_pre_bias_path(sae, &g.lm.touched, &g.g_benc, &mut g.g_bdec);
    ensure(fires, ds);
    fires[..ds].fill(0);
    for r in 0..rows {
        for j in 0..ds {
            fires[j] += (act[r * ds + j] != 0.0) as u32;
        }
    }
    prof.mark("rest");
    prof.print("dense forward_backward");
    Ok(StepStats {
        loss: mse + sparsity_loss + pre_act_loss,
        fvu: sse / tv,
        mse,
        auxk_loss: 0.0,
        multi_topk_fvu: 0.0,
        sparsity_loss,
        pre_act_loss,
        l0: nnz as f64 / rows as f64,
        n_dead,
        grad_norm: 0.0,
    })
}
