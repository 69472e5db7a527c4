//! The loss terms, each with the paper it comes from. Every function returns its sum over this
//! process's rows (f64, fixed order) and writes its gradient in place; the callers normalise after
//! the sums meet in [`super::Collective`].

use crate::kernels;
use rayon::prelude::*;

/// Σ_t ‖x̂_t − x_t‖², and the reconstruction gradient `dxhat = scale·(x̂ − x)`. TopK trains on
/// the FVU, Σ‖x − x̂‖² / Σ‖x − mean‖² (Gao et al. 2024, §2.1's normalised MSE; scale = 2/variance);
/// ReLU and JumpReLU on the per-token MSE (scale = 2/B).
pub(super) fn reconstruction_sse(xhat: &[f32], x: &[f32], d: usize, scale: f32, dxhat: &mut [f32]) -> f64 {
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

/// AuxK (Gao et al. 2024, §A.2): the top k_aux dead latents reconstruct the detached residual
/// x − x̂, decoded without b_dec. `e` holds that reconstruction ê on entry; returns Σ‖ê − (x − x̂)‖²
/// and leaves `scale·(ê + x̂ − x)` in `e` (scale = 2·α·min(1, dead/k_aux) / variance).
pub(super) fn auxk_sse(e: &mut [f32], xhat: &[f32], x: &[f32], d: usize, scale: f32) -> f64 {
    let rows = x.len() / d;
    let sse = kernels::row_reduce(rows, |r| {
        (0..d)
            .map(|i| {
                let err = e[r * d + i] + xhat[r * d + i] - x[r * d + i];
                (err as f64).powi(2)
            })
            .sum()
    });
    e.par_chunks_mut(d).enumerate().for_each(|(r, g)| {
        for i in 0..d {
            g[i] = scale * (g[i] + xhat[r * d + i] - x[r * d + i]);
        }
    });
    sse
}

/// Multi-TopK (Gao et al. 2024, §5.3): the same SAE reconstructing from its top 4k latents, weight
/// 1/8, so that the dictionary also works at larger k. `m` holds that reconstruction on entry;
/// returns Σ‖m − x‖² and leaves `scale·(m − x)` in `m` (scale = 2/8 / variance).
pub(super) fn multi_topk_sse(m: &mut [f32], x: &[f32], d: usize, scale: f32) -> f64 {
    let rows = x.len() / d;
    let sse = kernels::row_reduce(rows, |r| (0..d).map(|i| ((m[r * d + i] - x[r * d + i]) as f64).powi(2)).sum());
    m.par_chunks_mut(d).enumerate().for_each(|(r, g)| {
        for i in 0..d {
            g[i] = scale * (g[i] - x[r * d + i]);
        }
    });
    sse
}

/// JumpReLU's rectangle kernel H(z) = 1 on (−½, ½) (Rajamanoharan et al. 2024, eq. 9): the
/// pseudo-derivative of the Heaviside step behind both the gate and the L0 penalty.
#[inline]
pub(super) fn rectangle(z: f32) -> f32 {
    if z > -0.5 && z < 0.5 {
        1.0
    } else {
        0.0
    }
}

/// Per-row sums a dense backward folds across rows (one per 64-row block, folded in order).
pub(super) struct PenaltySums {
    /// Σ dL/dθ_j (JumpReLU only).
    pub thr: Vec<f32>,
    /// Σ dL/d‖W_dec,j‖ of the penalties weighted by decoder norms.
    pub dnorm: Vec<f32>,
    /// Σ of the sparsity penalty before its coefficient.
    pub sparsity: f64,
    /// Σ of the pre-activation loss before its coefficient.
    pub pre_act: f64,
}

/// ReLU + L1 weighted by decoder norms, λ·Σ_j a_j‖W_dec,j‖ (Anthropic, "Towards Monosemanticity"
/// April 2024 update; SAELens `standard`): turns `ga` (dL/da of the reconstruction) into dL/dpre.
/// `cb` = λ/B.
pub(super) fn relu_l1_row(ga: &mut [f32], a: &[f32], dec_norm: &[f32], cb: f32, sums: &mut PenaltySums) {
    for j in 0..ga.len() {
        if a[j] != 0.0 {
            sums.sparsity += (a[j] * dec_norm[j]) as f64;
            sums.dnorm[j] += cb * a[j];
            ga[j] += cb * dec_norm[j];
        } else {
            ga[j] = 0.0;
        }
    }
}

/// dL/d(L0 of the row) of JumpReLU's L0 penalties, reached through the step function's
/// straight-through estimator: `step` is DeepMind's λ·L0 (Rajamanoharan et al. 2024, eq. 11),
/// `quadratic` Gemma Scope 2's λ·2/L0*·(L0 − L0*)². Adds the penalty to `sums.sparsity`.
pub(super) fn l0_penalty_grad(
    mode: crate::config::JumpReluSparsity,
    l0: usize,
    target_l0: f32,
    cb: f32,
    sums: &mut PenaltySums,
) -> f32 {
    use crate::config::JumpReluSparsity::*;
    match mode {
        Step => {
            sums.sparsity += l0 as f64;
            cb
        }
        Quadratic => {
            let dev = l0 as f32 - target_l0;
            sums.sparsity += (2.0 / target_l0 * dev * dev) as f64;
            cb * 4.0 / target_l0 * dev
        }
        Tanh => 0.0,
    }
}

/// Anthropic's tanh penalty λ·Σ_j tanh(c·a_j‖W_dec,j‖) (Circuits Updates,
/// January 2025, "Dictionary learning optimization techniques"): its
/// Its gradient reaches a_j even where a_j = 0. `cb` = λ/B.
#[inline]
pub(super) fn tanh_penalty(ga: &mut f32, dnorm: &mut f32, a: f32, dec_norm: f32, c: f32, cb: f32) -> f64 {
    let t = (c * a * dec_norm).tanh();
    let sech2 = 1.0 - t * t;
    *ga += cb * c * dec_norm * sech2;
    *dnorm += cb * c * a * sech2;
    t as f64
}

/// Anthropic's pre-activation loss on dead latents, λ_p·Σ_j ReLU(θ_j − pre_j)‖W_dec,j‖ (the same
/// Circuits Update): pushes dead latents' pre-activations up to their thresholds. Adds
/// its gradients w.r.t. ‖W_dec,j‖ and θ_j; returns (loss term, gradient w.r.t. pre_j). `pa` = λ_p/B.
#[inline]
pub(super) fn pre_act_loss(
    pre: f32,
    theta: f32,
    dec_norm: f32,
    pa: f32,
    dnorm: &mut f32,
    dthr: &mut f32,
) -> (f64, f32) {
    *dnorm += pa * (theta - pre);
    *dthr += pa * dec_norm;
    (((theta - pre) * dec_norm) as f64, -pa * dec_norm)
}
