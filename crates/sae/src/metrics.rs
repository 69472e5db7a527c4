//! Core reconstruction / sparsity metrics, with SAELens `evals.py` definitions.

use crate::kernels;
use crate::sae::Sae;
use rayon::prelude::*;
use serde::Serialize;

/// Metrics over a set of rows, in raw activation space.
#[derive(Debug, Clone, Serialize)]
pub struct EvalMetrics {
    /// 1 − explained_variance = Σ‖x − x̂‖² / Σ‖x − mean(x)‖² over the whole set
    pub fvu: f64,
    /// SAELens `explained_variance`: 1 − E‖x − x̂‖² / (E‖x‖² − ‖E x‖²)
    pub explained_variance: f64,
    /// SAELens `mse`: mean over tokens of Σ_dims (x − x̂)²
    pub mse: f64,
    /// mean per-token cosine similarity of x and x̂
    pub cossim: f64,
    /// mean per-token ‖x̂‖ / ‖x‖
    pub l2_ratio: f64,
    /// E‖x̂‖² / E⟨x, x̂⟩ (Wright & Sharkey; SAELens `relative_reconstruction_bias`)
    pub relative_reconstruction_bias: f64,
    /// mean number of non-zero latents per token
    pub l0: f64,
    /// mean Σ|f| per token
    pub l1: f64,
    /// fraction of latents that never fire on these rows
    pub dead_frac: f64,
    /// fraction of latents that fire on more than 10% of the rows
    pub dense_frac: f64,
    /// Rows evaluated.
    pub rows: usize,
    /// Rows left out as outliers.
    pub excluded_rows: usize,
    /// Per latent, the rows it fired on.
    #[serde(skip)]
    pub fire_counts: Vec<u64>,
}

/// Median row L2 norm (exact, via selection).
pub fn median_norm(x: &[f32], d: usize) -> f32 {
    let mut n: Vec<f32> = x.par_chunks(d).map(|r| kernels::dot(r, r).sqrt()).collect();
    if n.is_empty() {
        return 0.0;
    }
    let m = n.len() / 2;
    let (_, v, _) = n.select_nth_unstable_by(m, |a, b| a.total_cmp(b));
    *v
}

/// Drop rows whose norm exceeds `max_norm` in place; returns the number dropped.
pub fn drop_outliers(x: &mut Vec<f32>, d: usize, max_norm: f32) -> usize {
    let rows = x.len() / d;
    let mut w = 0usize;
    for r in 0..rows {
        let n = kernels::dot(&x[r * d..(r + 1) * d], &x[r * d..(r + 1) * d]).sqrt();
        if n <= max_norm {
            if w != r {
                x.copy_within(r * d..(r + 1) * d, w * d);
            }
            w += 1;
        }
    }
    x.truncate(w * d);
    rows - w
}

/// The f64 sums of one row that every reconstruction metric (MSE, FVU, cosine, L2 ratio, bias) is built
/// from; shared with the in-model evaluation so both use the same definitions.
#[derive(Debug, Clone, Copy, Default)]
pub struct RowRecon {
    /// ‖x − x̂‖²
    pub sq_err: f64,
    /// ‖x‖²
    pub x_sq: f64,
    /// ‖x̂‖²
    pub xhat_sq: f64,
    /// x · x̂
    pub dot: f64,
}

impl RowRecon {
    /// The sums of row `x` and its reconstruction `xhat`.
    pub fn of(x: &[f32], xhat: &[f32]) -> RowRecon {
        let mut r = RowRecon::default();
        for (&p, &q) in x.iter().zip(xhat) {
            let (p, q) = (p as f64, q as f64);
            r.sq_err += (p - q) * (p - q);
            r.x_sq += p * p;
            r.xhat_sq += q * q;
            r.dot += p * q;
        }
        r
    }

    /// Cosine similarity of the row and its reconstruction.
    pub fn cossim(&self) -> f64 {
        let (na, nb) = (self.x_sq.sqrt(), self.xhat_sq.sqrt());
        if na > 0.0 && nb > 0.0 {
            self.dot / (na * nb)
        } else {
            0.0
        }
    }

    /// ‖x̂‖ / ‖x‖ (SAELens' shrinkage ratio; a near-zero input counts as norm 1).
    pub fn l2_ratio(&self) -> f64 {
        let na = self.x_sq.sqrt();
        self.xhat_sq.sqrt() / if na < 1e-4 { 1.0 } else { na }
    }
}

/// Evaluate `sae` on rows `x` ([n, d_in]).
pub fn evaluate(sae: &Sae, x: &[f32]) -> EvalMetrics {
    let d = sae.d_in;
    let n = x.len() / d;
    let mut fire = vec![0u64; sae.d_sae];
    let (mut sse, mut sumsq, mut cos, mut l2r, mut xhn2, mut xdot, mut l0, mut l1) =
        (0.0f64, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
    let mut sum_x = vec![0.0f64; d];
    let chunk = 4096;
    for r0 in (0..n).step_by(chunk) {
        let rows = chunk.min(n - r0);
        let xs = &x[r0 * d..(r0 + rows) * d];
        let codes = sae.encode(xs);
        let xh = sae.decode(&codes);
        for (j, v) in codes.idx.iter().zip(&codes.val) {
            if *v != 0.0 {
                fire[*j as usize] += 1;
            }
        }
        l0 += codes.val.iter().filter(|v| **v != 0.0).count() as f64;
        l1 += codes.val.iter().map(|v| v.abs() as f64).sum::<f64>();
        let per: Vec<RowRecon> =
            (0..rows).into_par_iter().map(|r| RowRecon::of(&xs[r * d..(r + 1) * d], &xh[r * d..(r + 1) * d])).collect();
        for p in per {
            sse += p.sq_err;
            sumsq += p.x_sq;
            cos += p.cossim();
            l2r += p.l2_ratio();
            xhn2 += p.xhat_sq;
            xdot += p.dot;
        }
        for r in 0..rows {
            for i in 0..d {
                sum_x[i] += xs[r * d + i] as f64;
            }
        }
    }
    let nf = n.max(1) as f64;
    let mean_sq_norm = sumsq / nf;
    let mean_norm_sq: f64 = sum_x.iter().map(|s| (s / nf) * (s / nf)).sum();
    let total_var = mean_sq_norm - mean_norm_sq;
    let mse = sse / nf;
    let ev = if total_var < 1e-10 {
        if mse < 1e-10 {
            1.0
        } else {
            0.0
        }
    } else {
        1.0 - mse / total_var
    };
    let dead = fire.iter().filter(|&&c| c == 0).count();
    let dense = fire.iter().filter(|&&c| c as f64 > 0.1 * nf).count();
    EvalMetrics {
        fvu: 1.0 - ev,
        explained_variance: ev,
        mse,
        cossim: cos / nf,
        l2_ratio: l2r / nf,
        relative_reconstruction_bias: (xhn2 / nf) / (xdot / nf),
        l0: l0 / nf,
        l1: l1 / nf,
        dead_frac: dead as f64 / sae.d_sae as f64,
        dense_frac: dense as f64 / sae.d_sae as f64,
        rows: n,
        excluded_rows: 0,
        fire_counts: fire,
    }
}
