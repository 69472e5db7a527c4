//! One training step: forward, loss, exact gradients, (reduction point), Adam.
//!
//! The step is a pure function of (weights, optimiser state, dead-latent counters, batch). All
//! cross-token reductions happen in [`forward_backward`]; a data-parallel version only has to
//! all-reduce [`Grads`] between `forward_backward` and [`apply_update`].

use crate::adam::{adam_dense, adam_rows, AdamHyper};
use crate::config::{Arch, JumpReluSparsity, Resolved, TrainConfig};
use crate::kernels::{self, LatentMajor};
use crate::sae::Sae;
use rayon::prelude::*;

/// Hyper-parameters of the loss that the trainer passes per step.
#[derive(Debug, Clone, Copy)]
pub struct LossParams {
    pub arch: Arch,
    pub k: usize,
    pub auxk_alpha: f32,
    pub multi_topk: bool,
    /// current (warmed-up) sparsity coefficient: L1 lambda for relu, L0 coefficient for jumprelu
    pub sparsity_coef: f32,
    pub jumprelu_bandwidth: f32,
    pub jumprelu_sparsity: JumpReluSparsity,
    pub jumprelu_tanh_scale: f32,
    /// target L0 of the quadratic penalty
    pub target_l0: f32,
    /// Anthropic's pre-activation loss on dead latents (0 = off)
    pub pre_act_loss_coef: f32,
    /// let the straight-through estimators reach the pre-activations (Anthropic), not only θ
    pub jumprelu_ste_to_input: bool,
    pub dead_tokens: u64,
    /// ReLU: below this mean L0 (as a fraction of d_sae) the batch takes the sparse path (decoder and
    /// backward over the active latents only); at or above it, dense GEMMs.
    pub relu_sparse_below: f32,
}

impl LossParams {
    pub fn from_config(c: &TrainConfig, r: &Resolved, step: u64) -> LossParams {
        let base = match c.arch {
            Arch::Relu => c.l1_coefficient,
            Arch::JumpRelu => c.l0_coefficient,
            _ => 0.0,
        };
        LossParams {
            arch: c.arch,
            k: c.k,
            auxk_alpha: r.auxk_alpha,
            multi_topk: c.multi_topk,
            sparsity_coef: base * r.sparsity_scale_at(step),
            jumprelu_bandwidth: c.jumprelu_bandwidth,
            jumprelu_sparsity: c.jumprelu_sparsity_loss_mode,
            jumprelu_tanh_scale: c.jumprelu_tanh_scale,
            target_l0: c.target_l0.unwrap_or(0.0),
            pre_act_loss_coef: c.pre_act_loss_coefficient.unwrap_or(0.0),
            jumprelu_ste_to_input: c.jumprelu_ste_to_input,
            dead_tokens: c.dead_tokens,
            relu_sparse_below: c.relu_sparse_below,
        }
    }
}

/// Loss terms and diagnostics of one step (computed on the batch before the update).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StepStats {
    pub loss: f64,
    /// reconstruction term = FVU of the batch (Σ‖x − x̂‖² / Σ‖x − mean‖²)
    pub fvu: f64,
    pub mse: f64,
    pub auxk_loss: f64,
    pub multi_topk_fvu: f64,
    pub sparsity_loss: f64,
    /// Anthropic's pre-activation loss (jumprelu with `pre_act_loss_coefficient`)
    pub pre_act_loss: f64,
    pub l0: f64,
    pub n_dead: usize,
    pub grad_norm: f64,
}

/// Gradients. Weight-matrix gradients are compact: row `u` belongs to latent `rows[u]`.
#[derive(Default)]
pub struct Grads {
    pub(crate) lm: LatentMajor,
    pub g_enc: Vec<f32>,
    pub g_dec: Vec<f32>,
    pub g_benc: Vec<f32>,
    pub g_bdec: Vec<f32>,
    /// dense per-latent threshold gradient (jumprelu / dense paths), empty otherwise
    pub g_thr: Vec<f32>,
}

/// Adam moments for every parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamState {
    pub m_enc: Vec<f32>,
    pub v_enc: Vec<f32>,
    pub m_dec: Vec<f32>,
    pub v_dec: Vec<f32>,
    pub m_benc: Vec<f32>,
    pub v_benc: Vec<f32>,
    pub m_bdec: Vec<f32>,
    pub v_bdec: Vec<f32>,
    pub m_thr: Vec<f32>,
    pub v_thr: Vec<f32>,
}

impl AdamState {
    pub fn zeros(sae: &Sae) -> AdamState {
        let n = sae.d_sae * sae.d_in;
        AdamState {
            m_enc: vec![0.0; n],
            v_enc: vec![0.0; n],
            m_dec: vec![0.0; n],
            v_dec: vec![0.0; n],
            m_benc: vec![0.0; sae.d_sae],
            v_benc: vec![0.0; sae.d_sae],
            m_bdec: vec![0.0; sae.d_in],
            v_bdec: vec![0.0; sae.d_in],
            m_thr: vec![0.0; sae.threshold.len()],
            v_thr: vec![0.0; sae.threshold.len()],
        }
    }
}

/// Buffers reused across steps (nothing of size batch×d_sae is allocated per step).
#[derive(Default)]
pub struct Workspace {
    xin: Vec<f32>,
    pre: Vec<f32>,
    sel_val: Vec<f32>,
    sel_idx: Vec<u32>,
    main_val: Vec<f32>,
    main_idx: Vec<u32>,
    aux_val: Vec<f32>,
    aux_idx: Vec<u32>,
    xhat: Vec<f32>,
    dxhat: Vec<f32>,
    daux: Vec<f32>,
    dmulti: Vec<f32>,
    pub grads: Grads,
    /// per latent, the rows of the last batch on which it fired (non-zero activation)
    pub fires: Vec<u32>,
    dead: Vec<bool>,
    /// BatchTopK: smallest selected activation of the last batch (threshold EMA input)
    pub batch_min_selected: f32,
}

impl Workspace {
    #[allow(clippy::type_complexity)]
    pub(crate) fn dense_parts(
        &mut self,
    ) -> (
        &mut Vec<f32>,
        &mut Vec<f32>,
        &mut Vec<f32>,
        &mut Vec<f32>,
        &mut Vec<f32>,
        &mut Vec<f32>,
        &mut Grads,
        &mut Vec<u32>,
        &mut Vec<f32>,
        &mut Vec<u32>,
    ) {
        (
            &mut self.xin,
            &mut self.pre,
            &mut self.main_val, // dense activations
            &mut self.daux,     // dense dA / gp
            &mut self.xhat,
            &mut self.dxhat,
            &mut self.grads,
            &mut self.fires,
            &mut self.sel_val, // sparse ReLU: padded per-row active lists
            &mut self.sel_idx,
        )
    }
}

fn ensure<T: Clone + Default>(v: &mut Vec<T>, n: usize) {
    if v.len() < n {
        v.resize(n, T::default());
    }
}

/// Forward + exact backward for a batch `x` ([rows, d_in], already scaled/filtered).
/// `since_fired[j]` = tokens since latent j last fired (for AuxK's dead mask).
pub fn forward_backward(
    sae: &Sae,
    ws: &mut Workspace,
    x: &[f32],
    since_fired: &[u64],
    lp: &LossParams,
) -> anyhow::Result<StepStats> {
    match lp.arch {
        Arch::TopK => Ok(forward_backward_topk(sae, ws, x, since_fired, lp)),
        Arch::BatchTopK => {
            if lp.multi_topk {
                anyhow::bail!("multi_topk is only implemented for topk");
            }
            Ok(forward_backward_topk(sae, ws, x, since_fired, lp))
        }
        Arch::Relu | Arch::JumpRelu => crate::dense_step::forward_backward_dense(sae, ws, x, since_fired, lp),
    }
}

/// Phase timer enabled by `SAEKIT_PROFILE=1` (prints one line per step to stderr).
pub struct Prof {
    on: bool,
    t: std::time::Instant,
    parts: Vec<(&'static str, f64)>,
}

impl Prof {
    pub(crate) fn new() -> Prof {
        Prof { on: std::env::var_os("SAEKIT_PROFILE").is_some(), t: std::time::Instant::now(), parts: Vec::new() }
    }
    pub(crate) fn mark(&mut self, name: &'static str) {
        if self.on {
            let now = std::time::Instant::now();
            self.parts.push((name, (now - self.t).as_secs_f64() * 1e3));
            self.t = now;
        }
    }
    pub(crate) fn print(&self, what: &str) {
        if self.on {
            let s: Vec<String> = self.parts.iter().map(|(n, ms)| format!("{n} {ms:.1}")).collect();
            eprintln!("[profile {what} ms] {}", s.join(", "));
        }
    }
}

/// Σ_t ‖x̂_t − x_t‖² (f64, fixed-order reduction), and the reconstruction gradient
/// `dxhat = scale·(x̂ − x)` (scale = 2/total variance for the FVU loss, 2/B for the per-token MSE).
pub(crate) fn recon_sse_and_grad(xhat: &[f32], x: &[f32], d: usize, scale: f32, dxhat: &mut [f32]) -> f64 {
    let rows = x.len() / d;
    let sse = kernels::row_reduce(rows, |r| {
        xhat[r * d..(r + 1) * d].iter().zip(&x[r * d..(r + 1) * d]).map(|(&a, &b)| ((a - b) as f64).powi(2)).sum()
    });
    dxhat[..rows * d].par_chunks_mut(d).zip(xhat[..rows * d].par_chunks(d)).zip(x.par_chunks(d)).for_each(
        |((g, xh), xr)| {
            for i in 0..d {
                g[i] = scale * (xh[i] - xr[i]);
            }
        },
    );
    sse
}

/// With b_dec subtracted at the encoder input, b_dec also receives −Σ_j (Σ_t dL/dpre_tj)·W_enc[j]:
/// `g_benc[u]` is that sum for latent `touched[u]`.
pub(crate) fn subtract_pre_bias_path(sae: &Sae, touched: &[u32], g_benc: &[f32], g_bdec: &mut [f32]) {
    if !sae.apply_b_dec_to_input {
        return;
    }
    let d = sae.d_in;
    for (&j, &gb) in touched.iter().zip(g_benc) {
        if gb != 0.0 {
            let j = j as usize;
            kernels::axpy(-gb, &sae.w_enc[j * d..(j + 1) * d], g_bdec);
        }
    }
}

pub(crate) fn batch_total_variance(x: &[f32], d: usize) -> f64 {
    let rows = x.len() / d;
    let mut mean = vec![0.0f32; d];
    kernels::column_sum(x, d, &mut mean);
    for m in mean.iter_mut() {
        *m /= rows as f32;
    }
    kernels::row_reduce(rows, |r| {
        x[r * d..(r + 1) * d].iter().zip(&mean).map(|(&a, &m)| ((a - m) as f64).powi(2)).sum::<f64>()
    })
}

fn forward_backward_topk(sae: &Sae, ws: &mut Workspace, x: &[f32], since_fired: &[u64], lp: &LossParams) -> StepStats {
    let d = sae.d_in;
    let ds = sae.d_sae;
    let rows = x.len() / d;
    let k = lp.k.min(ds);
    let batch_topk = lp.arch == Arch::BatchTopK;
    // BatchTopK keeps 4k candidates per row; rows that could hold more are recomputed exactly
    let kk = if lp.multi_topk || batch_topk { (4 * k).min(ds) } else { k };
    let mut prof = Prof::new();
    let tv = batch_total_variance(x, d).max(1e-30);

    // dead mask for AuxK
    ensure(&mut ws.dead, ds);
    let mut n_dead = 0usize;
    for (dj, &s) in ws.dead[..ds].iter_mut().zip(since_fired) {
        *dj = s >= lp.dead_tokens;
        n_dead += *dj as usize;
    }
    let k_aux_full = d / 2;
    let use_aux = lp.auxk_alpha > 0.0 && n_dead > 0 && k_aux_full > 0;
    let ka = if use_aux { k_aux_full.min(n_dead) } else { 0 };
    let aux_scale = (n_dead as f64 / k_aux_full.max(1) as f64).min(1.0);

    // 1. encoder input
    ensure(&mut ws.xin, rows * d);
    let xin = &mut ws.xin[..rows * d];
    xin.copy_from_slice(x);
    if sae.apply_b_dec_to_input {
        xin.par_chunks_mut(d).for_each(|r| {
            for (v, b) in r.iter_mut().zip(&sae.b_dec) {
                *v -= b;
            }
        });
    }

    // 2. encoder GEMM per latent chunk, fused bias + ReLU + top-k (+ AuxK top-k over dead latents)
    let chunk = Sae::latent_chunk(ds, rows);
    ensure(&mut ws.pre, rows * chunk);
    ensure(&mut ws.sel_val, rows * kk);
    ensure(&mut ws.sel_idx, rows * kk);
    kernels::reset_selection(&mut ws.sel_val[..rows * kk], &mut ws.sel_idx[..rows * kk]);
    if use_aux {
        ensure(&mut ws.aux_val, rows * ka);
        ensure(&mut ws.aux_idx, rows * ka);
        kernels::reset_selection(&mut ws.aux_val[..rows * ka], &mut ws.aux_idx[..rows * ka]);
    }
    for j0 in (0..ds).step_by(chunk) {
        let w = chunk.min(ds - j0);
        kernels::gemm_abt(rows, w, d, &ws.xin[..rows * d], d, &sae.w_enc[j0 * d..(j0 + w) * d], &mut ws.pre, w);
        prof.mark("encoder gemm");
        let aux = if use_aux { Some((&ws.dead[..], ka, &mut ws.aux_val[..], &mut ws.aux_idx[..])) } else { None };
        kernels::select_topk_chunk(&ws.pre, w, rows, j0, w, &sae.b_enc, kk, &mut ws.sel_val, &mut ws.sel_idx, aux);
    }
    prof.mark("select");
    let k = if batch_topk {
        // global top k·rows over the batch; k becomes the widest row's count (padded slots empty)
        let (stride, min_sel) = batch_topk_select(
            sae,
            &ws.xin[..rows * d],
            rows,
            &ws.sel_val[..rows * kk],
            &ws.sel_idx[..rows * kk],
            kk,
            k * rows,
            &mut ws.main_val,
            &mut ws.main_idx,
        );
        ws.batch_min_selected = min_sel;
        stride
    } else {
        // main selection = first k slots (selection is sorted by value)
        ensure(&mut ws.main_val, rows * k);
        ensure(&mut ws.main_idx, rows * k);
        for r in 0..rows {
            ws.main_val[r * k..(r + 1) * k].copy_from_slice(&ws.sel_val[r * kk..r * kk + k]);
            ws.main_idx[r * k..(r + 1) * k].copy_from_slice(&ws.sel_idx[r * kk..r * kk + k]);
        }
        k
    };
    let (main_val, main_idx) = (&ws.main_val[..rows * k], &ws.main_idx[..rows * k]);

    // 3. decoder forward (gather of k rows per token) and reconstruction gradient
    ensure(&mut ws.xhat, rows * d);
    ensure(&mut ws.dxhat, rows * d);
    kernels::sparse_decode(main_val, main_idx, k, &sae.w_dec, d, Some(&sae.b_dec), &mut ws.xhat[..rows * d]);
    let sse = recon_sse_and_grad(&ws.xhat[..rows * d], x, d, (2.0 / tv) as f32, &mut ws.dxhat);
    let fvu = sse / tv;
    let mut loss = fvu;
    prof.mark("decode+loss");

    // 4. AuxK: dead latents reconstruct the (detached) residual x − x̂, decoded without b_dec
    let mut auxk_loss = 0.0;
    if use_aux {
        ensure(&mut ws.daux, rows * d);
        let daux = &mut ws.daux[..rows * d];
        kernels::sparse_decode(&ws.aux_val[..rows * ka], &ws.aux_idx[..rows * ka], ka, &sae.w_dec, d, None, daux);
        // ê − (x − x̂) = ê + (x̂ − x)
        let xhat = &ws.xhat[..rows * d];
        let raw = kernels::row_reduce(rows, |r| {
            (0..d)
                .map(|i| {
                    let e = daux[r * d + i] + xhat[r * d + i] - x[r * d + i];
                    (e as f64).powi(2)
                })
                .sum()
        });
        auxk_loss = aux_scale * raw / tv;
        loss += lp.auxk_alpha as f64 * auxk_loss;
        let s = (2.0 * lp.auxk_alpha as f64 * aux_scale / tv) as f32;
        daux.par_chunks_mut(d).enumerate().for_each(|(r, g)| {
            for i in 0..d {
                g[i] = s * (g[i] + xhat[r * d + i] - x[r * d + i]);
            }
        });
    }

    // 5. Multi-TopK: the same SAE at 4k latents, weight 1/8
    let mut multi_fvu = 0.0;
    if lp.multi_topk {
        ensure(&mut ws.dmulti, rows * d);
        let dm = &mut ws.dmulti[..rows * d];
        kernels::sparse_decode(
            &ws.sel_val[..rows * kk],
            &ws.sel_idx[..rows * kk],
            kk,
            &sae.w_dec,
            d,
            Some(&sae.b_dec),
            dm,
        );
        let sse4 = kernels::row_reduce(rows, |r| (0..d).map(|i| ((dm[r * d + i] - x[r * d + i]) as f64).powi(2)).sum());
        multi_fvu = sse4 / tv;
        loss += multi_fvu / 8.0;
        let s = (2.0 / 8.0 / tv) as f32;
        dm.par_chunks_mut(d).enumerate().for_each(|(r, g)| {
            for i in 0..d {
                g[i] = s * (g[i] - x[r * d + i]);
            }
        });
    }

    prof.mark("aux/multi");
    // 6-7. latent gradients and weight gradients, latent-major (race-free, deterministic)
    let mut lists: Vec<(&[u32], &[f32], usize, u8)> = vec![(main_idx, main_val, k, 0)];
    if use_aux {
        lists.push((&ws.aux_idx[..rows * ka], &ws.aux_val[..rows * ka], ka, 1));
    }
    if lp.multi_topk {
        lists.push((&ws.sel_idx[..rows * kk], &ws.sel_val[..rows * kk], kk, 2));
    }
    let g = &mut ws.grads;
    g.lm.build(ds, &lists);
    prof.mark("transpose");
    let n_t = g.lm.touched.len();
    ensure(&mut g.g_enc, n_t * d);
    ensure(&mut g.g_dec, n_t * d);
    ensure(&mut g.g_benc, n_t);
    let dys: [&[f32]; 3] = [
        &ws.dxhat[..rows * d],
        if use_aux { &ws.daux[..rows * d] } else { &[] },
        if lp.multi_topk { &ws.dmulti[..rows * d] } else { &[] },
    ];
    kernels::fused_sparse_backward(
        &g.lm,
        d,
        &dys,
        &ws.xin[..rows * d],
        &sae.w_dec,
        &mut g.g_enc,
        &mut g.g_dec,
        &mut g.g_benc,
        None,
    );
    prof.mark("fused backward");

    // 8. b_dec: decoder bias of the main (and multi) reconstruction, minus the pre-bias path
    //    through the encoder: −Σ_j (Σ_t gp_tj) W_enc[j]
    g.g_bdec.resize(d, 0.0);
    kernels::column_sum(&ws.dxhat[..rows * d], d, &mut g.g_bdec);
    if lp.multi_topk {
        let mut tmp = vec![0.0f32; d];
        kernels::column_sum(&ws.dmulti[..rows * d], d, &mut tmp);
        for (a, b) in g.g_bdec.iter_mut().zip(tmp) {
            *a += b;
        }
    }
    subtract_pre_bias_path(sae, &g.lm.touched, &g.g_benc, &mut g.g_bdec);
    g.g_thr.clear();

    // firing counts (main selection only)
    ensure(&mut ws.fires, ds);
    ws.fires[..ds].fill(0);
    let mut nnz = 0usize;
    for (&j, &v) in main_idx.iter().zip(main_val) {
        if j != u32::MAX && v > 0.0 {
            ws.fires[j as usize] += 1;
            nnz += 1;
        }
    }
    prof.mark("bdec+fires");
    prof.print("forward_backward");
    StepStats {
        loss,
        fvu,
        mse: sse / (rows * d) as f64,
        auxk_loss,
        multi_topk_fvu: multi_fvu,
        sparsity_loss: 0.0,
        pre_act_loss: 0.0,
        l0: nnz as f64 / rows as f64,
        n_dead,
        grad_norm: 0.0,
    }
}

/// Exact batch-level top-`total` selection from per-row sorted candidates (`cap` per row).
/// Rows whose every candidate clears the provisional threshold may hold more values above it, so
/// they are recomputed in full. Writes rows padded to a common stride; returns (stride, smallest
/// selected value).
#[allow(clippy::too_many_arguments)]
fn batch_topk_select(
    sae: &Sae,
    xin: &[f32],
    rows: usize,
    cand_val: &[f32],
    cand_idx: &[u32],
    cap: usize,
    total: usize,
    out_val: &mut Vec<f32>,
    out_idx: &mut Vec<u32>,
) -> (usize, f32) {
    let (d, ds) = (sae.d_in, sae.d_sae);
    let kth = |vals: &mut Vec<f32>| -> f32 {
        if vals.len() <= total {
            return 0.0; // keep every positive value
        }
        let i = total - 1;
        let (_, v, _) = vals.select_nth_unstable_by(i, |a, b| b.total_cmp(a));
        *v
    };
    let mut all: Vec<f32> = cand_val.iter().copied().filter(|v| *v > 0.0).collect();
    let mut theta = kth(&mut all);
    let mut per_row: Vec<Vec<(u32, f32)>> = (0..rows)
        .map(|r| {
            (0..cap)
                .filter(|&s| cand_idx[r * cap + s] != u32::MAX && cand_val[r * cap + s] > 0.0)
                .map(|s| (cand_idx[r * cap + s], cand_val[r * cap + s]))
                .collect()
        })
        .collect();
    if cap < ds {
        let sat: Vec<usize> =
            (0..rows).filter(|&r| per_row[r].len() == cap && per_row[r][cap - 1].1 >= theta).collect();
        if !sat.is_empty() {
            let mut xs = vec![0.0f32; sat.len() * d];
            for (i, &r) in sat.iter().enumerate() {
                xs[i * d..(i + 1) * d].copy_from_slice(&xin[r * d..(r + 1) * d]);
            }
            let mut pre = vec![0.0f32; sat.len() * ds];
            kernels::gemm_abt(sat.len(), ds, d, &xs, d, &sae.w_enc, &mut pre, ds);
            for (i, &r) in sat.iter().enumerate() {
                per_row[r] =
                    (0..ds).map(|j| (j as u32, pre[i * ds + j] + sae.b_enc[j])).filter(|p| p.1 > 0.0).collect();
            }
            let mut all: Vec<f32> = per_row.iter().flatten().map(|p| p.1).collect();
            theta = kth(&mut all);
        }
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
    let stride = keep.iter().map(|r| r.len()).max().unwrap_or(0).max(1);
    out_val.clear();
    out_val.resize(rows * stride, 0.0);
    out_idx.clear();
    out_idx.resize(rows * stride, u32::MAX);
    for (r, row) in keep.iter().enumerate() {
        for (s, &(j, v)) in row.iter().enumerate() {
            out_val[r * stride + s] = v;
            out_idx[r * stride + s] = j;
        }
    }
    (stride, if min_sel.is_finite() { min_sel } else { 0.0 })
}

/// Global gradient L2 norm (fixed-order reduction).
pub fn grad_norm(g: &Grads, d: usize) -> f64 {
    let n = g.lm.touched.len();
    let rows = kernels::row_reduce(n, |u| {
        let a = &g.g_enc[u * d..(u + 1) * d];
        let b = &g.g_dec[u * d..(u + 1) * d];
        a.iter().chain(b).map(|&v| (v as f64).powi(2)).sum::<f64>() + (g.g_benc[u] as f64).powi(2)
    });
    let rest: f64 = g.g_bdec.iter().chain(&g.g_thr).map(|&v| (v as f64).powi(2)).sum();
    (rows + rest).sqrt()
}

/// Remove the decoder-gradient component parallel to each (unit) decoder row.
pub fn remove_parallel_decoder_grad(sae: &Sae, g: &mut Grads) {
    let d = sae.d_in;
    let n = g.lm.touched.len();
    let touched = &g.lm.touched;
    g.g_dec[..n * d].par_chunks_mut(d).enumerate().for_each(|(u, gr)| {
        let j = touched[u] as usize;
        let w = &sae.w_dec[j * d..(j + 1) * d];
        let nn = kernels::dot(w, w).max(1e-30);
        let p = kernels::dot(gr, w) / nn;
        kernels::axpy(-p, w, gr);
    });
}

pub fn normalize_decoder_rows(sae: &mut Sae) {
    let d = sae.d_in;
    sae.w_dec.par_chunks_mut(d).for_each(|r| {
        let n = kernels::dot(r, r).sqrt();
        if n > 0.0 {
            for v in r.iter_mut() {
                *v /= n;
            }
        }
    });
}

/// Optimiser hyper-parameters for [`apply_update`].
#[derive(Debug, Clone, Copy)]
pub struct UpdateParams {
    pub adam: AdamHyper,
    pub grad_clip: f32,
    pub unit_norm_decoder: bool,
    /// compute the gradient norm even when not clipping (for logging)
    pub need_norm: bool,
}

/// Clip, Adam, renormalise. Returns the pre-clip gradient norm (NaN when neither clipping nor
/// `need_norm` asked for it).
pub fn apply_update(sae: &mut Sae, opt: &mut AdamState, g: &mut Grads, up: &UpdateParams) -> f64 {
    let d = sae.d_in;
    let mut prof = Prof::new();
    if up.unit_norm_decoder {
        remove_parallel_decoder_grad(sae, g);
    }
    let norm = if up.grad_clip > 0.0 || up.need_norm { grad_norm(g, d) } else { f64::NAN };
    prof.mark("parallel+norm");
    let n = g.lm.touched.len();
    if up.grad_clip > 0.0 && norm > up.grad_clip as f64 {
        let c = (up.grad_clip as f64 / (norm + 1e-6)) as f32;
        g.g_enc[..n * d].par_iter_mut().for_each(|v| *v *= c);
        g.g_dec[..n * d].par_iter_mut().for_each(|v| *v *= c);
        g.g_benc[..n].iter_mut().for_each(|v| *v *= c);
        g.g_bdec.iter_mut().for_each(|v| *v *= c);
        g.g_thr.iter_mut().for_each(|v| *v *= c);
    }
    let h = up.adam;
    adam_rows(&mut sae.w_enc, &mut opt.m_enc, &mut opt.v_enc, d, &g.lm.slot, &g.g_enc[..n * d], h, false);
    adam_rows(
        &mut sae.w_dec,
        &mut opt.m_dec,
        &mut opt.v_dec,
        d,
        &g.lm.slot,
        &g.g_dec[..n * d],
        h,
        up.unit_norm_decoder,
    );
    adam_rows(&mut sae.b_enc, &mut opt.m_benc, &mut opt.v_benc, 1, &g.lm.slot, &g.g_benc[..n], h, false);
    adam_dense(&mut sae.b_dec, &mut opt.m_bdec, &mut opt.v_bdec, &g.g_bdec, h);
    if !g.g_thr.is_empty() && !sae.threshold.is_empty() {
        // θ itself, not log θ (SAELens since its issue #494): Adam moves a parameter ~lr per step, so
        // a log parameterisation barely moves a 0.01 init within a run's lr·steps, and L0 never falls.
        // Projected to θ ≥ 0: below zero the gate would pass negative pre-activations.
        adam_dense(&mut sae.threshold, &mut opt.m_thr, &mut opt.v_thr, &g.g_thr, h);
        for t in sae.threshold.iter_mut() {
            *t = t.max(0.0);
        }
    }
    prof.mark("adam");
    prof.print("update");
    norm
}
