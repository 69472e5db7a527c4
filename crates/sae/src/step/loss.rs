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
    // one pass per block of kernels::row_reduce's rows, the blocks summed in the same order
    let block = kernels::REDUCE_ROWS * d;
    let blocks: Vec<f64> = dxhat[..rows * d]
        .par_chunks_mut(block)
        .zip(xhat[..rows * d].par_chunks(block).zip(x[..rows * d].par_chunks(block)))
        .map(|(g, (xh, xr))| {
            for ((g, xh), xr) in g.iter_mut().zip(xh).zip(xr) {
                *g = scale * (xh - xr);
            }
            row_sums_in_order(xh, xr, d)
        })
        .collect();
    blocks.iter().sum()
}

/// `Σ_r Σ_i (a − b)²` over the rows of `a` and `b` in f64: each row summed left to right, the rows
/// added in order, as a row-by-row fold sums them. Four rows advance together, so the sums' add
/// latencies overlap (one f64 add chain per row left the loop waiting on them).
fn row_sums_in_order(a: &[f32], b: &[f32], d: usize) -> f64 {
    let sq = |a: &[f32], b: &[f32], i: usize| ((a[i] - b[i]) as f64).powi(2);
    let mut total = 0.0f64;
    let (mut quads_a, mut quads_b) = (a.chunks_exact(4 * d), b.chunks_exact(4 * d));
    for (qa, qb) in (&mut quads_a).zip(&mut quads_b) {
        let mut acc = [0.0f64; 4];
        for i in 0..d {
            for (r, s) in acc.iter_mut().enumerate() {
                *s += sq(&qa[r * d..], &qb[r * d..], i);
            }
        }
        acc.iter().for_each(|s| total += s);
    }
    for (ra, rb) in quads_a.remainder().chunks(d).zip(quads_b.remainder().chunks(d)) {
        total += (0..d).map(|i| sq(ra, rb, i)).sum::<f64>();
    }
    total
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The fused pass against the row-by-row fold it replaced: the same gradient and the same f64 sum,
    /// bit for bit, for row counts off the 4-row and 64-row blocks.
    #[test]
    fn the_reconstruction_pass_sums_each_row_in_order() {
        let d = 37;
        for rows in [1, 3, 64, 150] {
            let x: Vec<f32> = (0..rows * d).map(|i| ((i * 7919 % 1013) as f32 - 500.0) / 97.0).collect();
            let xhat: Vec<f32> = (0..rows * d).map(|i| ((i * 104_729 % 997) as f32 - 480.0) / 89.0).collect();
            let mut g = vec![f32::NAN; rows * d];
            let sse = reconstruction_sse(&xhat, &x, d, 0.3, &mut g);
            let want =
                kernels::row_reduce(rows, |r| (r * d..(r + 1) * d).map(|i| ((xhat[i] - x[i]) as f64).powi(2)).sum());
            assert_eq!(sse.to_bits(), want.to_bits(), "{rows} rows: {sse} vs {want}");
            assert!(g.iter().zip(xhat.iter().zip(&x)).all(|(g, (a, b))| g.to_bits() == (0.3 * (a - b)).to_bits()));
        }
    }
}
