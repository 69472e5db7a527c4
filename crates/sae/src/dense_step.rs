//! Forward/backward for architectures whose activations are not k-sparse by construction
//! (ReLU+L1, JumpReLU): early in training half the latents fire, so the decoder and backward
//! products run as dense GEMMs over reused [batch, d_sae] buffers.

use crate::config::Arch;
use crate::kernels;
use crate::sae::Sae;
use crate::step::{LossParams, StepStats, Workspace};
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

/// ReLU + L1·‖W_dec‖ (Anthropic April 2024 / SAELens `standard`), or JumpReLU with the L0
/// penalty and rectangle-kernel straight-through estimator (SAELens `jumprelu`, `step` mode).
/// Loss terms are per-token means: mse = mean_t ‖x − x̂‖², sparsity = coef · mean_t (…).
pub(crate) fn forward_backward_dense(sae: &Sae, ws: &mut Workspace, x: &[f32], lp: &LossParams) -> Result<StepStats> {
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
    let (xin, pre, act, gbuf, xhat, dxhat, g, fires) = ws.dense_parts();
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
    // decoder forward
    let xhat = &mut xhat[..rows * d];
    kernels::gemm_ab(rows, d, ds, act, &sae.w_dec, xhat, false);
    xhat.par_chunks_mut(d).for_each(|r| {
        for (v, b) in r.iter_mut().zip(&sae.b_dec) {
            *v += b;
        }
    });
    prof.mark("decoder gemm");
    let sse = kernels::row_reduce(rows, |r| {
        xhat[r * d..(r + 1) * d].iter().zip(&x[r * d..(r + 1) * d]).map(|(&a, &b)| ((a - b) as f64).powi(2)).sum()
    });
    let dxhat = &mut dxhat[..rows * d];
    let s2 = 2.0 / bf;
    dxhat.par_chunks_mut(d).zip(xhat.par_chunks(d)).zip(x.par_chunks(d)).for_each(|((g, xh), xr)| {
        for i in 0..d {
            g[i] = s2 * (xh[i] - xr[i]);
        }
    });
    let coef = lp.sparsity_coef;
    // sparsity term and L0 statistic
    let (sp_sum, nnz) = {
        let parts: Vec<(f64, u64)> = act
            .par_chunks(ds)
            .map(|a| {
                let mut s = 0.0f64;
                let mut c = 0u64;
                for j in 0..ds {
                    if a[j] != 0.0 {
                        c += 1;
                        s += if jump { 1.0 } else { (a[j] * dec_norm[j]) as f64 };
                    }
                }
                (s, c)
            })
            .collect();
        parts.iter().fold((0.0, 0u64), |acc, p| (acc.0 + p.0, acc.1 + p.1))
    };
    let mse = sse / rows as f64;
    let sparsity_loss = coef as f64 * sp_sum / rows as f64;
    // dA = dx̂ · W_decᵀ
    kernels::gemm_abt(rows, ds, d, dxhat, d, &sae.w_dec, gbuf, ds);
    prof.mark("dA gemm");
    let eps = lp.jumprelu_bandwidth;
    g.g_thr.clear();
    if jump {
        // threshold pseudo-gradient (w.r.t. log threshold), fixed 64-row blocks -> deterministic
        let blocks: Vec<Vec<f32>> = (0..rows.div_ceil(64))
            .into_par_iter()
            .map(|b| {
                let mut acc = vec![0.0f32; ds];
                for r in b * 64..((b + 1) * 64).min(rows) {
                    let (p, ga) = (&pre[r * ds..(r + 1) * ds], &gbuf[r * ds..(r + 1) * ds]);
                    for j in 0..ds {
                        let k = rect((p[j] - thr[j]) / eps);
                        if k != 0.0 {
                            acc[j] += -(thr[j] / eps) * k * ga[j] - (coef / bf) / eps * k;
                        }
                    }
                }
                acc
            })
            .collect();
        g.g_thr.resize(ds, 0.0);
        for b in blocks {
            for (t, v) in g.g_thr.iter_mut().zip(b) {
                *t += v;
            }
        }
        for (t, th) in g.g_thr.iter_mut().zip(thr) {
            *t *= th; // d/dlogθ = θ · d/dθ
        }
    }
    // gp = dL/dpre
    gbuf.par_chunks_mut(ds).zip(act.par_chunks(ds)).for_each(|(ga, a)| {
        for j in 0..ds {
            ga[j] = if a[j] != 0.0 {
                if jump {
                    ga[j]
                } else {
                    ga[j] + coef * dec_norm[j] / bf
                }
            } else {
                0.0
            };
        }
    });
    prof.mark("elementwise");
    g.lm.set_dense(ds);
    ensure(&mut g.g_enc, ds * d);
    ensure(&mut g.g_dec, ds * d);
    ensure(&mut g.g_benc, ds);
    kernels::gemm_atb(ds, d, rows, gbuf, xin, &mut g.g_enc[..ds * d], false);
    kernels::gemm_atb(ds, d, rows, act, dxhat, &mut g.g_dec[..ds * d], false);
    prof.mark("weight-grad gemms");
    kernels::column_sum(gbuf, ds, &mut g.g_benc[..ds]);
    if !jump && coef != 0.0 {
        // ∂/∂W_dec,i of coef·mean_t a_ti‖W_dec,i‖ = coef·(Σ_t a_ti / B)·W_dec,i/‖W_dec,i‖
        let mut asum = vec![0.0f32; ds];
        kernels::column_sum(act, ds, &mut asum);
        g.g_dec[..ds * d].par_chunks_mut(d).enumerate().for_each(|(j, gr)| {
            if dec_norm[j] > 0.0 && asum[j] != 0.0 {
                let s = coef * asum[j] / bf / dec_norm[j];
                kernels::axpy(s, &sae.w_dec[j * d..(j + 1) * d], gr);
            }
        });
    }
    g.g_bdec.resize(d, 0.0);
    kernels::column_sum(dxhat, d, &mut g.g_bdec);
    if sae.apply_b_dec_to_input {
        for j in 0..ds {
            if g.g_benc[j] != 0.0 {
                kernels::axpy(-g.g_benc[j], &sae.w_enc[j * d..(j + 1) * d], &mut g.g_bdec);
            }
        }
    }
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
        loss: mse + sparsity_loss,
        fvu: sse / tv,
        mse,
        auxk_loss: 0.0,
        multi_topk_fvu: 0.0,
        sparsity_loss,
        l0: nnz as f64 / rows as f64,
        n_dead: 0,
        grad_norm: 0.0,
    })
}
