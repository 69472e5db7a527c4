//! TopK (Gao et al. 2024, "Scaling and evaluating sparse autoencoders") and BatchTopK (Bussmann et
//! al. 2024): a dense encoder GEMM fused with the selection, then everything else sparse over the
//! selected latents: the decoder is a gather of k rows per token, the backward a latent-major
//! scatter (race-free and independent of the thread count).

use super::{
    count_fires, decode_selection, encoder_input_backward, encoder_input_forward, ensure, loss, skip_backward,
    skip_forward, LossParams, Prof, Selection, StepStats, Workspace,
};
use crate::config::Arch;
use crate::kernels::{self, Bf16};
use crate::sae::Sae;
use crate::step::Collective;
use rayon::prelude::*;

/// The TopK path's buffers.
#[derive(Default)]
pub(super) struct Buffers {
    /// `[B, chunk]` pre-activations of one latent chunk (f32 products; bf16 hands them over from L2).
    pre: Vec<f32>,
    /// Per row, the largest `kk` pre-activations (k, or 4k for Multi-TopK and BatchTopK).
    candidates: Selection,
    /// Per row, the latents that reconstruct x (the first k candidates, or BatchTopK's share).
    main: Selection,
    /// Per row, the largest pre-activations among dead latents (AuxK).
    aux: Selection,
    /// `[B, d_out]` AuxK's reconstruction of the residual, then its gradient.
    daux: Vec<f32>,
    /// `[B, d_out]` Multi-TopK's reconstruction, then its gradient.
    dmulti: Vec<f32>,
    /// Per latent: dead at this step.
    dead: Vec<bool>,
    /// Where the next batch's candidate selections may start looking (from this batch's).
    floor: kernels::SelectionFloor,
}

/// Which auxiliary losses run this step and their sizes.
struct AuxPlan {
    /// AuxK's k (0 = off): d_out/2 (d_in/2 for an SAE), or fewer when fewer latents are dead.
    k_aux: usize,
    /// AuxK's scale: min(1, dead / k_aux).
    aux_scale: f64,
    n_dead: usize,
    /// Candidates kept per row: 4k for Multi-TopK and BatchTopK, else k.
    kk: usize,
}

impl AuxPlan {
    /// Sharded, `d_sae` is this shard's slice and the dead count is the whole SAE's.
    fn new(
        lp: &LossParams,
        dead: &mut Vec<bool>,
        since_fired: &[u64],
        d_out: usize,
        d_sae: usize,
        comm: &dyn Collective,
    ) -> AuxPlan {
        ensure(dead, d_sae);
        let mut n_dead = [0f64];
        for (dj, &s) in dead[..d_sae].iter_mut().zip(since_fired) {
            *dj = s >= lp.dead_tokens;
            n_dead[0] += *dj as u8 as f64;
        }
        comm.shard_sum_f64(&mut n_dead);
        let n_dead = n_dead[0] as usize;
        let k = lp.k.min(d_sae);
        let k_aux_full = d_out / 2;
        let use_aux = lp.auxk_alpha > 0.0 && n_dead > 0 && k_aux_full > 0;
        AuxPlan {
            k_aux: if use_aux { k_aux_full.min(n_dead) } else { 0 },
            aux_scale: (n_dead as f64 / k_aux_full.max(1) as f64).min(1.0),
            n_dead,
            kk: if lp.multi_topk || lp.arch == Arch::BatchTopK { (4 * k).min(d_sae) } else { k },
        }
    }
}

pub(super) fn forward_backward(
    sae: &Sae,
    ws: &mut Workspace,
    x: &[f32],
    y: &[f32],
    since_fired: &[u64],
    lp: &LossParams,
    comm: &dyn Collective,
) -> StepStats {
    let (d, d_out, ds) = (sae.d_in, sae.d_out(), sae.d_sae);
    let rows = x.len() / d;
    let mut prof = Prof::new();
    let tv = super::batch_total_variance(y, d_out, comm).max(1e-30);
    let plan = AuxPlan::new(lp, &mut ws.topk.dead, since_fired, d_out, ds, comm);

    encoder_input_forward(&mut ws.xin, x, sae);
    let weights = kernels::EncoderWeights::prepare(lp.precision, &sae.params.w_enc, (ds, d), &mut ws.w_enc_bf16);
    let input = (&ws.xin[..rows * d], &weights);
    select_forward(&mut ws.topk, input, sae, rows, &plan);
    let local = lp.latent_offset..lp.latent_offset + ds;
    if lp.arch != Arch::BatchTopK {
        // BatchTopK's selection works on each process's own candidates (batch_topk_across)
        merge_shard_candidates(&mut ws.topk.candidates, rows, &local, comm);
    }
    if plan.k_aux > 0 {
        merge_shard_candidates(&mut ws.topk.aux, rows, &local, comm);
    }
    prof.mark("encoder gemm + select");
    ws.batch_min_selected = main_selection(&mut ws.topk, input, sae, rows, lp, comm);
    let b = &mut ws.topk;

    ensure(&mut ws.xhat, rows * d_out);
    ensure(&mut ws.dxhat, rows * d_out);
    let (xhat, dxhat) = (&mut ws.xhat[..rows * d_out], &mut ws.dxhat[..rows * d_out]);
    let (main_idx, main_val) = b.main.rows(rows);
    decode_selection(xhat, main_val, main_idx, b.main.width, sae, true, comm);
    skip_forward(xhat, x, sae);
    let mut sums = [loss::reconstruction_sse(xhat, y, d_out, (2.0 / tv) as f32, dxhat), 0.0, 0.0];
    prof.mark("decode + loss");

    if plan.k_aux > 0 {
        ensure(&mut b.daux, rows * d_out);
        let (idx, val) = b.aux.rows(rows);
        let daux = &mut b.daux[..rows * d_out];
        decode_selection(daux, val, idx, plan.k_aux, sae, false, comm);
        let s = (2.0 * lp.auxk_alpha as f64 * plan.aux_scale / tv) as f32;
        sums[1] = loss::auxk_sse(daux, xhat, y, d_out, s);
    }
    if lp.multi_topk {
        ensure(&mut b.dmulti, rows * d_out);
        let (idx, val) = b.candidates.rows(rows);
        let dm = &mut b.dmulti[..rows * d_out];
        decode_selection(dm, val, idx, plan.kk, sae, true, comm);
        skip_forward(dm, x, sae);
        sums[2] = loss::multi_topk_sse(dm, y, d_out, (2.0 / 8.0 / tv) as f32);
    }
    comm.sum_f64(&mut sums);
    let [sse, aux_sse, multi_sse] = sums;
    prof.mark("aux / multi");

    sparse_backward(ws, sae, x, rows, lp, &plan, comm);
    prof.mark("fused backward");
    let (main_idx, main_val) = ws.topk.main.rows(rows);
    let mut nnz = [count_fires(&mut ws.fires, ds, main_idx, main_val) as f64];
    comm.shard_sum_f64(&mut nnz);
    comm.sum_f64(&mut nnz);
    let all_rows = comm.total_rows(rows);
    prof.print("topk forward_backward");

    let fvu = sse / tv;
    let auxk_loss = plan.aux_scale * aux_sse / tv;
    let multi_topk_fvu = multi_sse / tv;
    StepStats {
        loss: fvu + lp.auxk_alpha as f64 * auxk_loss + multi_topk_fvu / 8.0,
        fvu,
        mse: sse / (all_rows * d_out) as f64,
        auxk_loss,
        multi_topk_fvu,
        l0: nnz[0] / all_rows as f64,
        n_dead: plan.n_dead,
        ..Default::default()
    }
}

/// The encoder input `x − b_dec` ([B, d_in]) and the step's encoder weights in its precision:
/// the selection and the rows recomputed for it multiply in one precision.
type Input<'a> = (&'a [f32], &'a kernels::EncoderWeights<'a>);

// encoder + selection: xin [B, d_in], w_enc [d_sae, d_in], b_enc [d_sae]
//   -> candidates: per row the top kk of relu(xin·w_encᵀ + b_enc); aux: the top k_aux among dead latents
// Each row's pre-activations are selected from as the product hands them over, panel by panel.
fn select_forward(b: &mut Buffers, input: Input, sae: &Sae, rows: usize, plan: &AuxPlan) {
    let ds = sae.d_sae;
    b.candidates.reset(rows, plan.kk);
    if plan.k_aux > 0 {
        b.aux.reset(rows, plan.k_aux);
    }
    let dead: Vec<u32> = (0..ds as u32).filter(|&j| b.dead[j as usize]).collect();
    let aux = (plan.k_aux > 0).then_some((&mut b.aux.val[..], &mut b.aux.idx[..], plan.k_aux));
    // a floor is only safe where the rows selected again get the bits the whole batch's product gave them
    let (xin, weights) = input;
    let floor = if weights.rows_independent() { b.floor } else { kernels::SelectionFloor::default() };
    let candidates = (&mut b.candidates.val[..], &mut b.candidates.idx[..]);
    let mut selections = kernels::row_selections(candidates, plan.kk, aux, rows, floor);
    let b_enc = &sae.params.b_enc;
    weights.product(xin, rows).for_each_row(xin, 0..ds, &mut b.pre, &mut selections, |sel, values, j0| {
        sel.add_panel(values, j0, b_enc, &dead)
    });
    if floor.0 > f32::NEG_INFINITY {
        reselect_unfilled(&mut b.candidates, input, sae, rows, &mut b.pre);
    }
    if weights.rows_independent() {
        b.floor = kernels::SelectionFloor::from_selection(&b.candidates.val[..rows * plan.kk], plan.kk);
    }
}

/// Rows whose candidate selection a floor left with empty slots: the floor may have skipped values
/// they needed, so they are selected again from their full product, without one.
fn reselect_unfilled(c: &mut Selection, (xin, weights): Input, sae: &Sae, rows: usize, pre: &mut Vec<f32>) {
    let (d, kk) = (sae.d_in, c.width);
    let unfilled: Vec<usize> = (0..rows).filter(|&r| c.idx[r * kk + kk - 1] == u32::MAX).collect();
    if unfilled.is_empty() {
        return;
    }
    let xs: Vec<f32> = unfilled.iter().flat_map(|&r| xin[r * d..(r + 1) * d].iter().copied()).collect();
    let mut again = Selection::default();
    again.reset(unfilled.len(), kk);
    let none = kernels::SelectionFloor::default();
    let mut selections = kernels::row_selections((&mut again.val, &mut again.idx), kk, None, unfilled.len(), none);
    let b_enc = &sae.params.b_enc;
    weights
        .product(&xs, unfilled.len())
        .for_each_row(&xs, 0..sae.d_sae, pre, &mut selections, |sel, values, j0| sel.add_panel(values, j0, b_enc, &[]));
    for (i, &r) in unfilled.iter().enumerate() {
        c.val[r * kk..(r + 1) * kk].copy_from_slice(&again.val[i * kk..(i + 1) * kk]);
        c.idx[r * kk..(r + 1) * kk].copy_from_slice(&again.idx[i * kk..(i + 1) * kk]);
    }
}

/// Per row, the latents of the main reconstruction in the last step (ids local to this process), ascending.
pub(super) fn active_latents(b: &Buffers, rows: usize) -> Vec<Vec<u32>> {
    let (idx, val) = b.main.rows(rows);
    let w = b.main.width;
    (0..rows)
        .map(|r| {
            let mut row: Vec<u32> =
                (r * w..(r + 1) * w).filter(|&s| idx[s] != u32::MAX && val[s] != 0.0).map(|s| idx[s]).collect();
            row.sort_unstable();
            row
        })
        .collect()
}

/// Fill `b.main`: TopK keeps each row's first k candidates (they are sorted); BatchTopK the top
/// k·rows over the whole batch. Returns BatchTopK's smallest selected value (0 for TopK).
fn main_selection(
    b: &mut Buffers,
    input: Input,
    sae: &Sae,
    rows: usize,
    lp: &LossParams,
    comm: &dyn Collective,
) -> f32 {
    let k = lp.k.min(sae.d_sae);
    let kk = b.candidates.width;
    if lp.arch == Arch::BatchTopK && comm.shards() * comm.replicas() > 1 {
        return batch_topk_across(b, input, sae, rows, lp, comm);
    }
    if lp.arch == Arch::BatchTopK {
        let (idx, val) = b.candidates.rows(rows);
        let (width, min_selected) =
            batch_topk_select(sae, input, rows, val, idx, kk, k * rows, &mut b.main.val, &mut b.main.idx);
        b.main.width = width;
        return min_selected;
    }
    b.main.set_shape(rows, k);
    for r in 0..rows {
        b.main.val[r * k..(r + 1) * k].copy_from_slice(&b.candidates.val[r * kk..r * kk + k]);
        b.main.idx[r * k..(r + 1) * k].copy_from_slice(&b.candidates.idx[r * kk..r * kk + k]);
    }
    0.0
}

// sparse backward: dxhat, daux, dmulti [B, d_out]; xin [B, d_in]; w_dec [d_sae, d_out]
//   -> g.w_enc [touched, d_in], g.w_dec [touched, d_out], g.b_enc [touched], g.b_dec [d_out],
//      g.w_skip [d_out, d_in] (skip transcoders: from the main and Multi-TopK outputs, over x)
// Each selected (row, latent) pair gets dL/dpre = <dy_row, W_dec[j]> (ReLU' = 1 where selected);
// the weight gradients are accumulated latent-major over the three selections at once.
#[allow(clippy::too_many_arguments)]
fn sparse_backward(
    ws: &mut Workspace,
    sae: &Sae,
    x: &[f32],
    rows: usize,
    lp: &LossParams,
    plan: &AuxPlan,
    comm: &dyn Collective,
) {
    let (d, d_out) = (sae.d_in, sae.d_out());
    let b = &ws.topk;
    let mut lists: Vec<(&[u32], &[f32], usize, u8)> = Vec::with_capacity(3);
    let (idx, val) = b.main.rows(rows);
    lists.push((idx, val, b.main.width, 0));
    if plan.k_aux > 0 {
        let (idx, val) = b.aux.rows(rows);
        lists.push((idx, val, plan.k_aux, 1));
    }
    if lp.multi_topk {
        let (idx, val) = b.candidates.rows(rows);
        lists.push((idx, val, plan.kk, 2));
    }
    let g = &mut ws.grads;
    let mut prof = Prof::new();
    g.touched.build(sae.d_sae, &lists);
    prof.mark("latent-major lists");
    let n = g.touched.touched.len();
    let p = &mut g.params;
    ensure(&mut p.w_enc, n * d);
    ensure(&mut p.w_dec, n * d_out);
    ensure(&mut p.b_enc, n);
    let dys: [&[f32]; 3] = [
        &ws.dxhat[..rows * d_out],
        if plan.k_aux > 0 { &b.daux[..rows * d_out] } else { &[] },
        if lp.multi_topk { &b.dmulti[..rows * d_out] } else { &[] },
    ];
    let xin = &ws.xin[..rows * d];
    let (lm, w_dec, dims) = (&g.touched, &sae.params.w_dec, (d, d_out));
    if lp.precision.bf16_path().is_some() {
        // the products' row operands in bf16, as autocast's backward matmuls take them (sums in f32):
        // half the bytes for a pass that streams a row per (row, latent) pair
        let [x16, dy16 @ ..] = &mut ws.rows_bf16;
        kernels::round_rows(xin, x16);
        dy16.iter_mut().zip(dys).for_each(|(out, dy)| kernels::round_rows(dy, out));
        let dy16: Vec<&[Bf16]> = dy16.iter().map(|v| &v[..]).collect();
        kernels::fused_sparse_backward(lm, dims, &dy16, x16, w_dec, &mut p.w_enc, &mut p.w_dec, &mut p.b_enc, None);
    } else {
        kernels::fused_sparse_backward(lm, dims, &dys, xin, w_dec, &mut p.w_enc, &mut p.w_dec, &mut p.b_enc, None);
    }
    prof.mark("per-latent gradients");
    // b_dec: the decoder bias of the main (and Multi-TopK) reconstruction, then its encoder-input path
    p.b_dec.resize(d_out, 0.0);
    kernels::column_sum(&ws.dxhat[..rows * d_out], d_out, &mut p.b_dec);
    if lp.multi_topk {
        let mut multi = vec![0.0f32; d_out];
        kernels::column_sum(&b.dmulti[..rows * d_out], d_out, &mut multi);
        for (a, m) in p.b_dec.iter_mut().zip(multi) {
            *a += m;
        }
    }
    encoder_input_backward(&mut p.b_dec, &g.touched.touched, &p.b_enc, sae, comm);
    p.threshold.clear();
    // AuxK's target y − ŷ is detached: only the main and Multi-TopK outputs reach W_skip
    let outputs: Vec<&[f32]> = if lp.multi_topk { vec![dys[0], dys[2]] } else { vec![dys[0]] };
    skip_backward(&mut p.w_skip, &outputs, x, sae);
    prof.mark("b_dec, skip");
    prof.print("backward");
}

/// Sharded: turn each shard's per-row top-`width` list (over its own latents) into the list one
/// process would select over all latents: the union of every shard's candidates, ordered by value
/// (descending) with ties to the lower global latent id (the rule of `kernels::topk_insert`), cut
/// to `width`. Slots holding another shard's latent are then emptied, so the kernels see only
/// local latents while the positions (TopK's first k, Multi-TopK's 4k) stay those of the global list.
fn merge_shard_candidates(sel: &mut Selection, rows: usize, local: &std::ops::Range<usize>, comm: &dyn Collective) {
    if comm.shards() == 1 {
        return;
    }
    let (w, offset) = (sel.width, local.start as u32);
    let n = rows * w;
    let mut mine = Vec::with_capacity(n * 8);
    for (&j, &v) in sel.idx[..n].iter().zip(&sel.val[..n]) {
        let global = if j == u32::MAX { u32::MAX } else { j + offset };
        mine.extend_from_slice(&global.to_le_bytes());
        mine.extend_from_slice(&v.to_le_bytes());
    }
    let all = comm.shard_gather(&mine);
    let shards = all.len() / (n * 8).max(1);
    let entry = |sh: usize, s: usize| {
        let o = (sh * n + s) * 8;
        let word = |o: usize| [all[o], all[o + 1], all[o + 2], all[o + 3]];
        (u32::from_le_bytes(word(o)), f32::from_le_bytes(word(o + 4)))
    };
    let (val, idx) = (&mut sel.val[..n], &mut sel.idx[..n]);
    val.par_chunks_mut(w).zip(idx.par_chunks_mut(w)).enumerate().for_each(|(r, (val, idx))| {
        let mut row: Vec<(u32, f32)> =
            (0..shards).flat_map(|sh| (0..w).map(move |s| (sh, r * w + s))).map(|(sh, s)| entry(sh, s)).collect();
        row.retain(|e| e.0 != u32::MAX);
        row.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        row.truncate(w);
        for s in 0..w {
            (idx[s], val[s]) = match row.get(s) {
                Some(&(j, v)) if local.contains(&(j as usize)) => (j - offset, v),
                _ => (u32::MAX, 0.0),
            };
        }
    });
}

/// Exact batch-level top-`total` selection from per-row sorted candidates (`cap` per row).
/// Rows whose every candidate clears the provisional threshold may hold more values above it, so
/// they are recomputed in full. Ties at the threshold are taken in (row, latent) order. Writes
/// rows padded to a common width; returns (width, smallest selected value).
#[allow(clippy::too_many_arguments)]
fn batch_topk_select(
    sae: &Sae,
    input: Input,
    rows: usize,
    cand_val: &[f32],
    cand_idx: &[u32],
    cap: usize,
    total: usize,
    out_val: &mut Vec<f32>,
    out_idx: &mut Vec<u32>,
) -> (usize, f32) {
    let mut per_row = positive_candidates(rows, cand_val, cand_idx, cap);
    let mut all: Vec<f32> = cand_val.iter().copied().filter(|v| *v > 0.0).collect();
    let mut theta = kth_largest(&mut all, total);
    if cap < sae.d_sae && recompute_saturated(sae, input, &mut per_row, cap, theta) {
        let mut all: Vec<f32> = per_row.iter().flatten().map(|p| p.1).collect();
        theta = kth_largest(&mut all, total);
    }
    // strictly above theta, then ties at theta in (row, latent) order up to `total`
    let above: usize = per_row.iter().flatten().filter(|p| p.1 > theta).count();
    let mut ties_left = total.saturating_sub(above);
    let mut keep: Vec<Vec<(u32, f32)>> = Vec::with_capacity(rows);
    let mut min_sel = f32::INFINITY;
    for row in per_row {
        let mut r: Vec<(u32, f32)> = Vec::new();
        for (j, v) in row {
            let take = v > theta
                || (v == theta && v > 0.0 && ties_left > 0 && {
                    ties_left -= 1;
                    true
                });
            if take {
                min_sel = min_sel.min(v);
                r.push((j, v));
            }
        }
        keep.push(r);
    }
    (write_padded(&keep, out_val, out_idx), if min_sel.is_finite() { min_sel } else { 0.0 })
}

/// The `total`-th largest of `vals` (reordered), or 0 when there are no more than `total`: then
/// every positive value is kept.
fn kth_largest(vals: &mut [f32], total: usize) -> f32 {
    if vals.len() <= total || total == 0 {
        return 0.0;
    }
    let (_, v, _) = vals.select_nth_unstable_by(total - 1, |a, b| b.total_cmp(a));
    *v
}

/// Each row's positive candidates, (latent, value) in the kernel's order.
fn positive_candidates(rows: usize, cand_val: &[f32], cand_idx: &[u32], cap: usize) -> Vec<Vec<(u32, f32)>> {
    (0..rows)
        .map(|r| {
            (0..cap)
                .filter(|&s| cand_idx[r * cap + s] != u32::MAX && cand_val[r * cap + s] > 0.0)
                .map(|s| (cand_idx[r * cap + s], cand_val[r * cap + s]))
                .collect()
        })
        .collect()
}

/// Rows whose `cap` candidates all clear `theta` may hold more values above it: replace their
/// lists by every positive pre-activation of the row (this process's latents, ascending). Returns
/// whether any row was recomputed.
fn recompute_saturated(
    sae: &Sae,
    (xin, weights): Input,
    per_row: &mut [Vec<(u32, f32)>],
    cap: usize,
    theta: f32,
) -> bool {
    let (d, ds) = (sae.d_in, sae.d_sae);
    let sat: Vec<usize> =
        (0..per_row.len()).filter(|&r| per_row[r].len() == cap && per_row[r][cap - 1].1 >= theta).collect();
    if sat.is_empty() {
        return false;
    }
    let mut xs = vec![0.0f32; sat.len() * d];
    for (i, &r) in sat.iter().enumerate() {
        xs[i * d..(i + 1) * d].copy_from_slice(&xin[r * d..(r + 1) * d]);
    }
    let mut pre = vec![0.0f32; sat.len() * ds];
    // in the selection's precision: a bf16 selection with f32 values for some rows would rank
    // values of two precisions against one threshold
    weights.product(&xs, sat.len()).chunk(&xs, sat.len(), 0..ds, &mut pre);
    let b_enc = &sae.params.b_enc;
    for (i, &r) in sat.iter().enumerate() {
        per_row[r] = (0..ds).map(|j| (j as u32, pre[i * ds + j] + b_enc[j])).filter(|p| p.1 > 0.0).collect();
    }
    true
}

/// Write per-row (latent, value) lists padded to their common width; returns the width.
fn write_padded(keep: &[Vec<(u32, f32)>], out_val: &mut Vec<f32>, out_idx: &mut Vec<u32>) -> usize {
    let rows = keep.len();
    let width = keep.iter().map(|r| r.len()).max().unwrap_or(0).max(1);
    out_val.clear();
    out_val.resize(rows * width, 0.0);
    out_idx.clear();
    out_idx.resize(rows * width, u32::MAX);
    for (r, row) in keep.iter().enumerate() {
        for (s, &(j, v)) in row.iter().enumerate() {
            out_val[r * width + s] = v;
            out_idx[r * width + s] = j;
        }
    }
    width
}

/// BatchTopK across processes: the selection [`batch_topk_select`] makes in one process (the top
/// k·B pre-activations of the whole batch, ties at the threshold in (row, latent) order, global
/// rows and latent ids), found over every process's rows and latents. Each process's candidates
/// (its rows, its latents) give a provisional threshold over all processes; the (row, shard)
/// blocks whose candidates all clear it are recomputed in full; the threshold of the union is then
/// exact, and the ties at it are ranked over all processes. Returns the smallest selected value.
fn batch_topk_across(
    b: &mut Buffers,
    input: Input,
    sae: &Sae,
    rows: usize,
    lp: &LossParams,
    comm: &dyn Collective,
) -> f32 {
    let cap = b.candidates.width;
    let all_rows = comm.total_rows(rows);
    let total = lp.k * all_rows;
    let (idx, val) = b.candidates.rows(rows);
    let mut per_row = positive_candidates(rows, val, idx, cap);
    let mut theta = kth_over_all(&per_row, total, comm);
    let recomputed = cap < sae.d_sae && recompute_saturated(sae, input, &mut per_row, cap, theta);
    if comm.any(recomputed) {
        theta = kth_over_all(&per_row, total, comm);
    }
    let row0 = comm.replica_rows(all_rows).start;
    let ties_kept = ties_taken(&per_row, theta, total, row0, lp.latent_offset, comm);
    let mut min_sel = f32::INFINITY;
    let keep: Vec<Vec<(u32, f32)>> = per_row
        .iter()
        .enumerate()
        .map(|(r, row)| {
            let tie = |j: u32| ties_kept.binary_search(&((row0 + r) as u32, j + lp.latent_offset as u32)).is_ok();
            let kept: Vec<(u32, f32)> =
                row.iter().copied().filter(|&(j, v)| v > theta || (v == theta && tie(j))).collect();
            kept.iter().for_each(|p| min_sel = min_sel.min(p.1));
            kept
        })
        .collect();
    b.main.width = write_padded(&keep, &mut b.main.val, &mut b.main.idx);
    let mins = comm.gather_all(&min_sel.to_le_bytes());
    let min_all =
        mins.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).fold(f32::INFINITY, f32::min);
    if min_all.is_finite() {
        min_all
    } else {
        0.0
    }
}

/// The `total`-th largest of every process's values in `per_row` (0 when there are no more).
fn kth_over_all(per_row: &[Vec<(u32, f32)>], total: usize, comm: &dyn Collective) -> f32 {
    let mine: Vec<u8> = per_row.iter().flatten().flat_map(|p| p.1.to_le_bytes()).collect();
    let mut all: Vec<f32> =
        comm.gather_all(&mine).chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    kth_largest(&mut all, total)
}

/// The (global row, global latent) pairs at `theta` that the selection takes: the first
/// `total − (values above theta)` of all processes' ties in (row, latent) order, sorted.
fn ties_taken(
    per_row: &[Vec<(u32, f32)>],
    theta: f32,
    total: usize,
    row0: usize,
    latent0: usize,
    comm: &dyn Collective,
) -> Vec<(u32, u32)> {
    if theta <= 0.0 {
        return Vec::new(); // fewer positive values than `total`: every one is above 0
    }
    let mut above = [per_row.iter().flatten().filter(|p| p.1 > theta).count() as f64];
    comm.shard_sum_f64(&mut above);
    comm.sum_f64(&mut above);
    let mine: Vec<u8> = per_row
        .iter()
        .enumerate()
        .flat_map(|(r, row)| {
            row.iter().filter(|p| p.1 == theta).map(move |p| ((row0 + r) as u32, p.0 + latent0 as u32))
        })
        .flat_map(|(r, j)| r.to_le_bytes().into_iter().chain(j.to_le_bytes()))
        .collect();
    let word = |c: &[u8]| u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    let mut ties: Vec<(u32, u32)> =
        comm.gather_all(&mine).chunks_exact(8).map(|c| (word(&c[..4]), word(&c[4..]))).collect();
    ties.sort_unstable();
    ties.truncate(total.saturating_sub(above[0] as usize));
    ties
}

#[cfg(test)]
mod tests {
    use crate::config::Arch;
    use crate::sae::{Activation, Sae};
    use crate::step::{forward_backward, SingleProcess, Workspace};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use saekit_kernels::{gemm_bf16, Bf16Path, PackedB, Precision};

    const D: usize = 16;
    const ROWS: usize = 8;

    /// An SAE of 64 latents whose every encoder row leans on the first input column, and a batch
    /// whose row 0 is large along it: all 64 of row 0's pre-activations are positive and above
    /// every other row's, so its 4k candidates all clear the provisional threshold and BatchTopK
    /// recomputes the row in full. b_dec is 0, so the encoder's input is `x` itself.
    fn saturating_batch() -> (Sae, Vec<f32>) {
        let mut s = Sae::init(D, 64, Activation::JumpRelu, 1.0, 5);
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        for (q, w) in s.params.w_enc.iter_mut().enumerate() {
            *w = if q % D == 0 { 1.0 + rng.gen::<f32>() * 0.2 } else { (rng.gen::<f32>() - 0.5) * 0.6 };
        }
        s.params.b_enc.iter_mut().for_each(|b| *b = (rng.gen::<f32>() - 0.5) * 0.1);
        s.params.b_dec.fill(0.0);
        let mut x: Vec<f32> = (0..ROWS * D).map(|_| rng.gen::<f32>() * 2.0 - 1.0).collect();
        (1..ROWS).for_each(|r| x[r * D] = 0.0);
        x[0] = 4.0;
        (s, x)
    }

    /// BatchTopK's selection straight from the bf16 product of the whole batch: the k·rows largest
    /// positive `x · W_encᵀ + b_enc`, ties in (row, latent) order; per row, (latent, value) ascending.
    fn selected_from_the_bf16_product(s: &Sae, x: &[f32], path: Bf16Path, k: usize) -> Vec<Vec<(u32, f32)>> {
        let n = s.d_sae;
        let mut pre = vec![0.0f32; ROWS * n];
        gemm_bf16(path, x, ROWS, D, &PackedB::from_nk(&s.params.w_enc, n, D), &mut pre, n, false);
        let mut all: Vec<(usize, u32, f32)> = (0..ROWS * n)
            .map(|q| (q / n, (q % n) as u32, pre[q] + s.params.b_enc[q % n]))
            .filter(|e| e.2 > 0.0)
            .collect();
        all.sort_by(|a, b| b.2.total_cmp(&a.2).then((a.0, a.1).cmp(&(b.0, b.1))));
        all.truncate(k * ROWS);
        let mut rows = vec![Vec::new(); ROWS];
        all.into_iter().for_each(|(r, j, v)| rows[r].push((j, v)));
        rows.iter_mut().for_each(|r| r.sort_by_key(|e| e.0));
        rows
    }

    /// The (latent, value) pairs the step selected on each row, latent ascending.
    fn selected_by_the_step(ws: &Workspace) -> Vec<Vec<(u32, f32)>> {
        let (idx, val) = ws.topk.main.rows(ROWS);
        let w = ws.topk.main.width;
        (0..ROWS)
            .map(|r| {
                let mut row: Vec<(u32, f32)> = (r * w..(r + 1) * w)
                    .filter(|&s| idx[s] != u32::MAX && val[s] != 0.0)
                    .map(|s| (idx[s], val[s]))
                    .collect();
                row.sort_by_key(|e| e.0);
                row
            })
            .collect()
    }

    /// A floor from an earlier batch skips values without a look; rows it leaves short are selected
    /// again (bf16 steps, with and without AuxK). Whatever the floor (none, one that cuts some rows short, one above every value), the
    /// step selects the same latents and computes the same gradients, bit for bit.
    #[test]
    fn a_selection_floor_changes_nothing_the_step_computes() {
        let mut s = Sae::init(D, 64, Activation::TopK { k: 3 }, 1.0, 11);
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        s.params.b_enc.iter_mut().for_each(|b| *b = (rng.gen::<f32>() - 0.5) * 0.2);
        let x: Vec<f32> = (0..64 * D).map(|_| rng.gen::<f32>() * 2.0 - 1.0).collect();
        let half_dead: Vec<u64> = (0..64).map(|j| if j % 2 == 0 { 1000 } else { 0 }).collect();
        // bf16 only: in f32 the step takes no floor (EncoderWeights::rows_independent)
        let paths = std::iter::once(Bf16Path::Reference).chain(Bf16Path::fastest()).map(Precision::Bf16);
        let cases = [Arch::TopK, Arch::BatchTopK].into_iter().flat_map(|a| [(a, 0.0), (a, 1.0 / 32.0)]);
        for ((arch, auxk), precision) in cases.flat_map(|c| paths.clone().map(move |p| (c, p))) {
            let mut lp = crate::tests_grad::lp(arch, 3);
            (lp.auxk_alpha, lp.precision) = (auxk, precision);
            let since = if auxk > 0.0 { &half_dead[..] } else { &[0; 64][..] };
            let step = |floor: f32| {
                let mut ws = Workspace::default();
                ws.topk.floor = crate::kernels::SelectionFloor(floor);
                forward_backward(&s, &mut ws, &x, &x, since, &lp, &SingleProcess).unwrap();
                let g = &ws.grads.params;
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                let rows = x.len() / D;
                let n = rows * ws.topk.candidates.width;
                let c = &ws.topk.candidates;
                (bits(&c.val[..n]), c.idx[..n].to_vec(), bits(&g.w_enc), bits(&g.w_dec))
            };
            let none = step(f32::NEG_INFINITY);
            let kth: Vec<f32> = none.0.chunks(none.0.len() / 64).map(|r| f32::from_bits(r[r.len() - 1])).collect();
            let mut sorted = kth.clone();
            sorted.sort_by(f32::total_cmp);
            for floor in [sorted[32], f32::MAX] {
                let got = step(floor);
                let case = format!("{arch:?}, auxk {auxk}, {}, floor {floor}", precision.name());
                assert!(kth.iter().any(|&v| v < floor), "{case}: the floor cuts no row short");
                assert_eq!(got.0, none.0, "{case}: candidate values");
                assert_eq!(got.1, none.1, "{case}: candidate latents");
                assert_eq!((got.2, got.3), (none.2.clone(), none.3.clone()), "{case}: gradients");
            }
        }
    }

    #[test]
    fn batchtopk_recomputes_a_saturated_row_in_the_selections_bf16() {
        let (s, x) = saturating_batch();
        let k = 2;
        for path in std::iter::once(Bf16Path::Reference).chain(Bf16Path::fastest()) {
            let mut lp = crate::tests_grad::lp(Arch::BatchTopK, k);
            lp.precision = Precision::Bf16(path);
            let mut ws = Workspace::default();
            forward_backward(&s, &mut ws, &x, &x, &[0; 64], &lp, &SingleProcess).unwrap();
            let (got, want) = (selected_by_the_step(&ws), selected_from_the_bf16_product(&s, &x, path, k));
            assert!(want[0].len() > 4 * k, "row 0 holds {} selections, not more than its 4k candidates", want[0].len());
            assert_eq!(got, want, "{}: the step's selection vs the bf16 product's", path.name());
            // the check tells the precisions apart: some value of row 0 is not its f32 value
            let f32_value = |j: u32| {
                let w = &s.params.w_enc[j as usize * D..(j as usize + 1) * D];
                x[..D].iter().zip(w).map(|(a, b)| a * b).sum::<f32>() + s.params.b_enc[j as usize]
            };
            assert!(want[0].iter().any(|&(j, v)| (v - f32_value(j)).abs() > 1e-5 * v.abs()), "bf16 and f32 agree here");
        }
    }
}
