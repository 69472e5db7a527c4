//! ReLU + L1 and JumpReLU, whose activations are not k-sparse by construction: early in training
//! half the latents fire, so the decoder and the backward run as dense GEMMs over reused
//! [batch, d_sae] buffers, and ReLU switches to the TopK path's sparse kernels once few latents fire.
//! Loss terms are per-token means: mse = mean_t ‖x − x̂‖², sparsity = coef · mean_t (…).

use super::loss::{self, PenaltySums};
use super::{
    add_rows, count_fires, decode_selection, encoder_input_backward, encoder_input_forward, ensure, skip_backward,
    skip_forward, Collective, Grads, LossParams, Prof, Selection, StepStats, Workspace,
};
use crate::config::{Arch, JumpReluSparsity};
use crate::kernels;
use crate::sae::Sae;
use crate::SaeError;
use rayon::prelude::*;

/// The dense path's buffers.
#[derive(Default)]
pub(super) struct Buffers {
    /// `[B, d_sae]` pre-activations.
    pre: Vec<f32>,
    /// `[B, d_sae]` activations.
    act: Vec<f32>,
    /// `[B, d_sae]` dL/da, then dL/dpre.
    dpre: Vec<f32>,
    /// Sparse ReLU: each row's active latents.
    active: Selection,
}

/// The per-batch facts both paths share.
struct Batch<'a> {
    /// The inputs `[rows, d_in]` (a skip connection reads them).
    x: &'a [f32],
    /// The targets `[rows, d_out]` (`x` for an SAE).
    y: &'a [f32],
    rows: usize,
    /// Rows of the whole batch (over every replica): the per-token means divide by it.
    all_rows: usize,
    /// Σ‖y − mean‖² (FVU's denominator, reported only).
    total_variance: f64,
    /// ‖W_dec,j‖ per latent.
    dec_norm: Vec<f32>,
    /// Active latents per row (over every shard).
    row_l0: Vec<usize>,
    /// Active (row, latent) pairs of the whole batch.
    nnz: usize,
    comm: &'a dyn Collective,
}

pub(super) fn forward_backward(
    sae: &Sae,
    ws: &mut Workspace,
    x: &[f32],
    y: &[f32],
    since_fired: &[u64],
    lp: &LossParams,
    comm: &dyn Collective,
) -> Result<StepStats, SaeError> {
    let (d, d_out, ds) = (sae.d_in, sae.d_out(), sae.d_sae);
    let rows = x.len() / d;
    if rows as u128 * ds as u128 > 1_500_000_000 {
        return Err(SaeError::config(
            "batch_size",
            format!(
                "{} needs a dense [batch, d_sae] buffer: batch {rows} x d_sae {ds} is too large; lower batch_size",
                lp.arch.name()
            ),
        ));
    }
    let mut prof = Prof::new();
    let total_variance = super::batch_total_variance(y, d_out, comm).max(1e-30);
    encoder_input_forward(&mut ws.xin, x, sae);
    let b = &mut ws.dense;
    for buf in [&mut b.pre, &mut b.act, &mut b.dpre] {
        ensure(buf, rows * ds);
    }
    let weights = kernels::EncoderWeights::prepare(lp.precision, &sae.params.w_enc, (ds, d), &mut ws.w_enc_bf16);
    let xin = &ws.xin[..rows * d];
    let encoder = weights.product(xin, rows);
    encoder_forward(&mut b.pre[..rows * ds], &mut b.act[..rows * ds], (xin, &encoder), sae, lp.arch == Arch::JumpRelu);
    prof.mark("encoder gemm");
    let act = &b.act[..rows * ds];
    let dec_norm: Vec<f32> = sae.params.w_dec.par_chunks(d_out).map(|r| kernels::dot(r, r).sqrt()).collect();
    // L0 of each row: the ReLU path choice, the sparse lists' width, the quadratic penalty, the stats
    let (row_l0, all_latents) = row_l0_over_shards(act, ds, comm);
    let mut nnz = [row_l0.iter().sum::<usize>() as f64];
    comm.sum_f64(&mut nnz);
    let (nnz, all_rows) = (nnz[0] as usize, comm.total_rows(rows));
    let batch = Batch { x, y, rows, all_rows, total_variance, dec_norm, row_l0, nnz, comm };
    ensure(&mut ws.xhat, rows * d_out);
    ensure(&mut ws.dxhat, rows * d_out);
    // every process takes the same path: the decision reads only reduced counts
    if lp.arch == Arch::Relu && (nnz as f64) < lp.relu_sparse_below as f64 * all_latents as f64 * all_rows as f64 {
        return Ok(sparse_relu(sae, ws, &batch, lp, prof));
    }
    Ok(dense(sae, ws, &batch, since_fired, lp, prof))
}

/// Per row, the latents with a non-zero activation in the last step (ids local to this process).
pub(super) fn active_latents(b: &Buffers, rows: usize, ds: usize) -> Vec<Vec<u32>> {
    b.act[..rows * ds].chunks(ds).map(|a| (0..ds as u32).filter(|&j| a[j as usize] != 0.0).collect()).collect()
}

/// Each row's count of non-zero activations, summed over the shards, and the SAE's whole latent
/// count (both in one all-reduce).
fn row_l0_over_shards(act: &[f32], ds: usize, comm: &dyn Collective) -> (Vec<usize>, usize) {
    let mut counts: Vec<f64> = act.par_chunks(ds).map(|a| a.iter().filter(|&&v| v != 0.0).count() as f64).collect();
    counts.push(ds as f64);
    comm.shard_sum_f64(&mut counts);
    let all_latents = counts.pop().unwrap_or(0.0) as usize;
    (counts.into_iter().map(|c| c as usize).collect(), all_latents)
}

// encoder: xin [B, d_in], w_enc [d_sae, d_in], b_enc [d_sae], θ [d_sae]
//   -> pre [B, d_sae] = xin·w_encᵀ + b_enc; act = relu(pre), or JumpReLU's pre·(pre > θ)
fn encoder_forward(
    pre: &mut [f32],
    act: &mut [f32],
    (xin, encoder): (&[f32], &kernels::EncoderProduct),
    sae: &Sae,
    jump: bool,
) {
    let (d, ds) = (sae.d_in, sae.d_sae);
    let rows = xin.len() / d;
    encoder.chunk(xin, rows, 0..ds, pre);
    let (b_enc, thr) = (&sae.params.b_enc, &sae.params.threshold);
    pre.par_chunks_mut(ds).zip(act.par_chunks_mut(ds)).for_each(|(p, a)| {
        for j in 0..ds {
            p[j] += b_enc[j];
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
}

// encoder backward: dpre [B, d_sae], xin [B, d_in] -> g.w_enc [d_sae, d_in] = dpreᵀ·xin, g.b_enc = Σ_t dpre
fn encoder_backward(g: &mut Grads, dpre: &[f32], xin: &[f32], d: usize, ds: usize) {
    let rows = xin.len() / d;
    g.touched.set_dense(ds);
    let p = &mut g.params;
    ensure(&mut p.w_enc, ds * d);
    ensure(&mut p.b_enc, ds);
    kernels::gemm_atb(ds, d, rows, dpre, xin, &mut p.w_enc[..ds * d], false);
    kernels::column_sum(dpre, ds, &mut p.b_enc[..ds]);
}

// decoder: act [B, d_sae], w_dec [d_sae, d_out], b_dec [d_out] -> xhat [B, d_out] = act·w_dec + b_dec
// (sharded: the partial products of each shard's latents meet in one all-reduce before the bias)
fn decoder_forward(xhat: &mut [f32], act: &[f32], sae: &Sae, comm: &dyn Collective) {
    let (d, ds) = (sae.d_out(), sae.d_sae);
    kernels::gemm_ab(act.len() / ds, d, ds, act, &sae.params.w_dec, xhat, false);
    comm.shard_sum_f32(xhat);
    add_rows(xhat, &sae.params.b_dec);
}

// decoder backward: dxhat [B, d_out], act [B, d_sae], w_dec [d_sae, d_out]
//   -> dact [B, d_sae] = dxhat·w_decᵀ; g.w_dec [d_sae, d_out] = actᵀ·dxhat; g.b_dec [d_out] = Σ_t dxhat
fn decoder_backward(dact: &mut [f32], g: &mut Grads, dxhat: &[f32], act: &[f32], sae: &Sae) {
    let (d, ds) = (sae.d_out(), sae.d_sae);
    let rows = dxhat.len() / d;
    kernels::gemm_abt(rows, ds, d, dxhat, d, &sae.params.w_dec, dact, ds);
    let p = &mut g.params;
    ensure(&mut p.w_dec, ds * d);
    kernels::gemm_atb(ds, d, rows, act, dxhat, &mut p.w_dec[..ds * d], false);
    p.b_dec.resize(d, 0.0);
    kernels::column_sum(dxhat, d, &mut p.b_dec);
}

/// The dense step: GEMMs over every latent.
fn dense(
    sae: &Sae,
    ws: &mut Workspace,
    batch: &Batch,
    since_fired: &[u64],
    lp: &LossParams,
    mut prof: Prof,
) -> StepStats {
    let (d, d_out, ds, rows) = (sae.d_in, sae.d_out(), sae.d_sae, batch.rows);
    let b = &mut ws.dense;
    let (pre, act, dpre) = (&b.pre[..rows * ds], &b.act[..rows * ds], &mut b.dpre[..rows * ds]);
    let (xhat, dxhat) = (&mut ws.xhat[..rows * d_out], &mut ws.dxhat[..rows * d_out]);
    decoder_forward(xhat, act, sae, batch.comm);
    skip_forward(xhat, batch.x, sae);
    prof.mark("decoder gemm");
    let sse = loss::reconstruction_sse(xhat, batch.y, d_out, 2.0 / batch.all_rows as f32, dxhat);
    let g = &mut ws.grads;
    decoder_backward(dpre, g, dxhat, act, sae);
    prof.mark("decoder backward gemms");
    let dead: Vec<bool> = since_fired.iter().map(|&t| t >= lp.dead_tokens).collect();
    let mut n_dead = [dead.iter().filter(|&&b| b).count() as f64];
    batch.comm.shard_sum_f64(&mut n_dead);
    let n_dead = n_dead[0] as usize;
    let sums = penalties_backward(dpre, pre, act, batch, sae, lp, &dead, n_dead);
    prof.mark("elementwise");
    encoder_backward(g, dpre, &ws.xin[..rows * d], d, ds);
    prof.mark("encoder backward gemm");
    let p = &mut g.params;
    // penalties on ‖W_dec,j‖: ∂‖W_dec,j‖/∂W_dec,j = W_dec,j / ‖W_dec,j‖
    p.w_dec[..ds * d_out].par_chunks_mut(d_out).enumerate().for_each(|(j, gr)| {
        let (norm, dn) = (batch.dec_norm[j], sums.dnorm[j]);
        if norm > 0.0 && dn != 0.0 {
            kernels::axpy(dn / norm, &sae.params.w_dec[j * d_out..(j + 1) * d_out], gr);
        }
    });
    p.threshold = sums.thr;
    skip_backward(&mut p.w_skip, &[&dxhat[..]], batch.x, sae);
    encoder_input_backward(&mut p.b_dec, &g.touched.touched, &p.b_enc, sae, batch.comm);
    ensure(&mut ws.fires, ds);
    ws.fires[..ds].fill(0);
    for r in 0..rows {
        for j in 0..ds {
            ws.fires[j] += (act[r * ds + j] != 0.0) as u32;
        }
    }
    prof.mark("rest");
    prof.print("dense forward_backward");
    let [sse, sparsity, pre_act] = loss_sums(batch.comm, sse, sums.sparsity, sums.pre_act);
    let mse = sse / batch.all_rows as f64;
    let sparsity_loss = lp.sparsity_coef as f64 * sparsity / batch.all_rows as f64;
    let pre_act_loss = lp.pre_act_loss_coef as f64 * pre_act / batch.all_rows as f64;
    StepStats {
        loss: mse + sparsity_loss + pre_act_loss,
        fvu: sse / batch.total_variance,
        mse,
        sparsity_loss,
        pre_act_loss,
        l0: batch.nnz as f64 / batch.all_rows as f64,
        n_dead,
        ..Default::default()
    }
}

/// Turn `dpre` (dL/da of the reconstruction) into dL/dpre with the sparsity penalties, their
/// straight-through estimators and the pre-activation loss, one pass per 64-row block; the blocks'
/// sums are folded in order, so the result does not depend on the thread count.
#[allow(clippy::too_many_arguments)]
fn penalties_backward(
    dpre: &mut [f32],
    pre: &[f32],
    act: &[f32],
    batch: &Batch,
    sae: &Sae,
    lp: &LossParams,
    dead: &[bool],
    n_dead: usize,
) -> PenaltySums {
    let ds = sae.d_sae;
    let jump = lp.arch == Arch::JumpRelu;
    let cb = lp.sparsity_coef / batch.all_rows as f32;
    let pa = if jump && n_dead > 0 { lp.pre_act_loss_coef / batch.all_rows as f32 } else { 0.0 };
    let parts: Vec<PenaltySums> = dpre
        .par_chunks_mut(64 * ds)
        .enumerate()
        .map(|(blk, gblk)| {
            let mut sums = PenaltySums {
                thr: vec![0.0; if jump { ds } else { 0 }],
                dnorm: vec![0.0; ds],
                sparsity: 0.0,
                pre_act: 0.0,
            };
            for (i, ga) in gblk.chunks_mut(ds).enumerate() {
                let r = blk * 64 + i;
                let (p, a) = (&pre[r * ds..(r + 1) * ds], &act[r * ds..(r + 1) * ds]);
                if jump {
                    jumprelu_row(
                        ga,
                        p,
                        a,
                        batch.row_l0[r],
                        &sae.params.threshold,
                        &batch.dec_norm,
                        dead,
                        lp,
                        cb,
                        pa,
                        &mut sums,
                    );
                } else {
                    loss::relu_l1_row(ga, a, &batch.dec_norm, cb, &mut sums);
                }
            }
            sums
        })
        .collect();
    let mut total =
        PenaltySums { thr: vec![0.0; if jump { ds } else { 0 }], dnorm: vec![0.0; ds], sparsity: 0.0, pre_act: 0.0 };
    for part in parts {
        total.sparsity += part.sparsity;
        total.pre_act += part.pre_act;
        for (t, v) in total.thr.iter_mut().zip(&part.thr) {
            *t += v;
        }
        for (t, v) in total.dnorm.iter_mut().zip(&part.dnorm) {
            *t += v;
        }
    }
    total
}

/// JumpReLU on one row (Rajamanoharan et al. 2024): the gate passes dL/da where it is open; the
/// rectangle kernel gives the threshold (and, with `jumprelu_ste_to_input`, the pre-activation) the
/// straight-through gradients of the gate and of the L0 penalty.
#[allow(clippy::too_many_arguments)]
fn jumprelu_row(
    ga: &mut [f32],
    pre: &[f32],
    act: &[f32],
    l0: usize,
    theta: &[f32],
    dec_norm: &[f32],
    dead: &[bool],
    lp: &LossParams,
    cb: f32,
    pa: f32,
    sums: &mut PenaltySums,
) {
    let (eps, mode) = (lp.jumprelu_bandwidth, lp.jumprelu_sparsity);
    let w_l0 = loss::l0_penalty_grad(mode, l0, lp.target_l0, cb, sums);
    for j in 0..ga.len() {
        let th = theta[j];
        if mode == JumpReluSparsity::Tanh {
            sums.sparsity +=
                loss::tanh_penalty(&mut ga[j], &mut sums.dnorm[j], act[j], dec_norm[j], lp.jumprelu_tanh_scale, cb);
        }
        let mut gp = if act[j] != 0.0 { ga[j] } else { 0.0 };
        if loss::rectangle((pre[j] - th) / eps) != 0.0 {
            // the pseudo-derivatives of the gate and of the L0 step w.r.t. θ
            let ste = (th / eps) * ga[j] + w_l0 / eps;
            sums.thr[j] -= ste;
            if lp.jumprelu_ste_to_input {
                gp += ste;
            }
        }
        if pa != 0.0 && dead[j] && th > pre[j] {
            let (term, dpre) = loss::pre_act_loss(pre[j], th, dec_norm[j], pa, &mut sums.dnorm[j], &mut sums.thr[j]);
            sums.pre_act += term;
            gp += dpre;
        }
        ga[j] = gp;
    }
}

/// Sparse ReLU: gather each row's active latents into padded lists and reuse the TopK path's
/// decoder and fused backward; the L1 terms ride along in the fused backward.
fn sparse_relu(sae: &Sae, ws: &mut Workspace, batch: &Batch, lp: &LossParams, mut prof: Prof) -> StepStats {
    let (d, d_out, ds, rows) = (sae.d_in, sae.d_out(), sae.d_sae, batch.rows);
    let b = &mut ws.dense;
    let width = batch.row_l0.iter().copied().max().unwrap_or(0).max(1);
    b.active.set_shape(rows, width);
    let act = &b.act[..rows * ds];
    let (sv, si) = (&mut b.active.val[..rows * width], &mut b.active.idx[..rows * width]);
    sv.par_chunks_mut(width).zip(si.par_chunks_mut(width)).enumerate().for_each(|(r, (v, ix))| {
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
    let (sv, si) = (&*sv, &*si);
    let (xhat, dxhat) = (&mut ws.xhat[..rows * d_out], &mut ws.dxhat[..rows * d_out]);
    decode_selection(xhat, sv, si, width, sae, true, batch.comm);
    skip_forward(xhat, batch.x, sae);
    prof.mark("sparse decode");
    let sse = loss::reconstruction_sse(xhat, batch.y, d_out, 2.0 / batch.all_rows as f32, dxhat);
    let l1_sum = kernels::row_reduce(rows, |r| {
        (0..width)
            .filter(|&s| si[r * width + s] != u32::MAX)
            .map(|s| (sv[r * width + s] * batch.dec_norm[si[r * width + s] as usize]) as f64)
            .sum()
    });
    let cb = lp.sparsity_coef / batch.all_rows as f32;
    let g = &mut ws.grads;
    g.touched.build(ds, &[(si, sv, width, 0)]);
    let n = g.touched.touched.len();
    let p = &mut g.params;
    ensure(&mut p.w_enc, n * d);
    ensure(&mut p.w_dec, n * d_out);
    ensure(&mut p.b_enc, n);
    let xin = &ws.xin[..rows * d];
    let l1 = Some((cb, &batch.dec_norm[..]));
    kernels::fused_sparse_backward(
        &g.touched,
        (d, d_out),
        &[&dxhat[..]],
        xin,
        &sae.params.w_dec,
        &mut p.w_enc,
        &mut p.w_dec,
        &mut p.b_enc,
        l1,
    );
    prof.mark("fused backward");
    p.threshold.clear();
    p.b_dec.resize(d_out, 0.0);
    kernels::column_sum(dxhat, d_out, &mut p.b_dec);
    encoder_input_backward(&mut p.b_dec, &g.touched.touched, &p.b_enc, sae, batch.comm);
    skip_backward(&mut p.w_skip, &[&dxhat[..]], batch.x, sae);
    count_fires(&mut ws.fires, ds, si, sv);
    prof.print("sparse relu forward_backward");
    let [sse, l1_sum, _] = loss_sums(batch.comm, sse, l1_sum, 0.0);
    let mse = sse / batch.all_rows as f64;
    let sparsity_loss = lp.sparsity_coef as f64 * l1_sum / batch.all_rows as f64;
    StepStats {
        loss: mse + sparsity_loss,
        fvu: sse / batch.total_variance,
        mse,
        sparsity_loss,
        l0: batch.nnz as f64 / batch.all_rows as f64,
        ..Default::default()
    }
}

/// The loss sums of the whole batch: the reconstruction error is already whole on every shard (the
/// decoder's all-reduce), the penalties are per latent so each shard holds its own part.
fn loss_sums(comm: &dyn Collective, sse: f64, penalty: f64, pre_act: f64) -> [f64; 3] {
    let mut per_latent = [penalty, pre_act];
    comm.shard_sum_f64(&mut per_latent);
    let mut sums = [sse, per_latent[0], per_latent[1]];
    comm.sum_f64(&mut sums);
    sums
}
