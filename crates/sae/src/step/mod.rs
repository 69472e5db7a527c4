//! One training step: a pure function of (weights, Adam state, dead-latent counters, batch).
//!
//! [`forward_backward`] computes the loss and its exact gradients; [`apply_update`] clips them,
//! takes the Adam step and renormalises the decoder. Inside, each phase is an `X_forward` /
//! `X_backward` pair with the same argument order and its shapes on top (llm.c's `train_gpt2.c`):
//! `topk.rs` for TopK / BatchTopK (sparse decoder and backward over the selected latents),
//! `dense.rs` for ReLU+L1 and JumpReLU (dense GEMMs, or the sparse kernels when few latents fire),
//! `loss.rs` for the loss terms, each citing its paper, and `update.rs` for the optimiser.
//!
//! Every sum over the rows of the batch that a later phase needs (the batch variance, the loss sums,
//! the firing counts) goes through [`Collective`]: the identity for one process, an all-reduce when
//! a batch is split across processes, so the kernels never change.

mod dense;
mod loss;
mod topk;
mod update;

pub use update::{apply_update, UpdateParams};

use crate::config::{Arch, JumpReluSparsity};
use crate::kernels::{self, LatentMajor};
use crate::params::Params;
use crate::sae::Sae;
use rayon::prelude::*;

/// Hyper-parameters of the loss at one step (the sparsity coefficient warms up).
#[derive(Debug, Clone, Copy)]
pub struct LossParams {
    /// The architecture being trained.
    pub arch: Arch,
    /// Latents kept per row (TopK), or per row on average over the batch (BatchTopK).
    pub k: usize,
    /// Weight of the AuxK loss on dead latents (0 = off).
    pub auxk_alpha: f32,
    /// Add the Multi-TopK loss (4k latents, weight 1/8).
    pub multi_topk: bool,
    /// Current (warmed-up) sparsity coefficient: L1 λ for ReLU, L0 coefficient for JumpReLU.
    pub sparsity_coef: f32,
    /// Width ε of JumpReLU's rectangle kernel.
    pub jumprelu_bandwidth: f32,
    /// JumpReLU's sparsity penalty.
    pub jumprelu_sparsity: JumpReluSparsity,
    /// c of the tanh penalty.
    pub jumprelu_tanh_scale: f32,
    /// Target L0 of the quadratic penalty.
    pub target_l0: f32,
    /// Anthropic's pre-activation loss on dead latents (0 = off).
    pub pre_act_loss_coef: f32,
    /// Let the straight-through estimators reach the pre-activations (Anthropic), not only θ.
    pub jumprelu_ste_to_input: bool,
    /// A latent that fired on no row in this many tokens is dead.
    pub dead_tokens: u64,
    /// ReLU: below this mean L0 (as a fraction of d_sae) the batch takes the sparse path (decoder and
    /// backward over the active latents only); at or above it, dense GEMMs.
    pub relu_sparse_below: f32,
}

/// Loss terms and diagnostics of one step (computed on the batch before the update).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StepStats {
    /// The total loss the gradients are of.
    pub loss: f64,
    /// Σ‖x − x̂‖² / Σ‖x − mean‖² over the batch (the TopK reconstruction loss itself).
    pub fvu: f64,
    /// Mean over rows of ‖x − x̂‖² (the ReLU / JumpReLU reconstruction loss).
    pub mse: f64,
    /// AuxK loss (before its coefficient).
    pub auxk_loss: f64,
    /// FVU of the Multi-TopK reconstruction at 4k latents.
    pub multi_topk_fvu: f64,
    /// Sparsity penalty (with its coefficient).
    pub sparsity_loss: f64,
    /// Anthropic's pre-activation loss (with its coefficient).
    pub pre_act_loss: f64,
    /// Mean active latents per row.
    pub l0: f64,
    /// Latents counted dead at this step.
    pub n_dead: usize,
    /// Global gradient norm before clipping (NaN when not computed).
    pub grad_norm: f64,
}

/// Where the step's sums over the rows of the batch meet.
///
/// With one process every method is the identity. A data-parallel run (one batch split across
/// processes) implements it with all-reduces; a sharded one (latents split across processes) with
/// the gathers the MPI issue describes. What goes through it today: the batch mean and variance
/// and the loss sums. Not yet: the gradients and the firing counts are summed over this process's
/// rows inside the kernels, so a data-parallel run must all-reduce [`Grads`] and `Workspace::fires`
/// between [`forward_backward`] and [`apply_update`].
pub trait Collective: Sync {
    /// Replace each value by its sum over every process holding part of the batch.
    fn sum_f64(&self, values: &mut [f64]);
    /// As [`Collective::sum_f64`], for f32 vectors (column sums).
    fn sum_f32(&self, values: &mut [f32]);
    /// Rows of the whole batch, given this process's share.
    fn total_rows(&self, local_rows: usize) -> usize;
}

/// The whole batch is in this process: every reduction is the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn sum_f64(&self, _: &mut [f64]) {}
    fn sum_f32(&self, _: &mut [f32]) {}
    fn total_rows(&self, local_rows: usize) -> usize {
        local_rows
    }
}

/// Gradients: the same [`Params`] as the weights, with the two matrices and `b_enc` compact over
/// the latents the step touched (row `u` belongs to latent `touched.touched[u]`), `b_dec` dense and
/// `threshold` dense or empty (only JumpReLU has one).
#[derive(Default)]
pub struct Grads {
    pub(crate) touched: LatentMajor,
    /// Gradient of each parameter (compact rows as above).
    pub params: Params<Vec<f32>>,
}

/// Adam's two moments, one [`Params`] each, shaped as the weights.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamState {
    /// First moment.
    pub m: Params<Vec<f32>>,
    /// Second moment.
    pub v: Params<Vec<f32>>,
}

impl AdamState {
    /// Zero moments for `sae` (a fresh run).
    pub fn zeros(sae: &Sae) -> AdamState {
        AdamState { m: sae.params.zeros_like(), v: sae.params.zeros_like() }
    }
}

/// Padded per-row latent lists: row `r` holds `width` (latent, value) slots at `r * width`, the
/// empty ones marked by latent `u32::MAX`.
#[derive(Default)]
pub(crate) struct Selection {
    pub val: Vec<f32>,
    pub idx: Vec<u32>,
    pub width: usize,
}

impl Selection {
    /// Room for `rows` rows of `width` slots, contents left as they are (buffers only grow).
    fn set_shape(&mut self, rows: usize, width: usize) {
        self.width = width;
        ensure(&mut self.val, rows * width);
        ensure(&mut self.idx, rows * width);
    }
    /// `rows` empty rows of `width` slots.
    fn reset(&mut self, rows: usize, width: usize) {
        self.set_shape(rows, width);
        kernels::reset_selection(&mut self.val[..rows * width], &mut self.idx[..rows * width]);
    }
    fn rows(&self, rows: usize) -> (&[u32], &[f32]) {
        (&self.idx[..rows * self.width], &self.val[..rows * self.width])
    }
}

/// Buffers reused across steps: nothing of size batch × d_sae is allocated per step.
#[derive(Default)]
pub struct Workspace {
    /// `[B, d_in]` encoder input `x − b_dec`.
    xin: Vec<f32>,
    /// `[B, d_in]` reconstruction x̂.
    xhat: Vec<f32>,
    /// `[B, d_in]` dL/dx̂ of the main reconstruction.
    dxhat: Vec<f32>,
    topk: topk::Buffers,
    dense: dense::Buffers,
    /// The step's gradients (read by [`apply_update`]).
    pub grads: Grads,
    /// Per latent, the rows of the last batch on which it fired (non-zero activation).
    pub fires: Vec<u32>,
    /// BatchTopK: the smallest selected activation of the last batch (its threshold's EMA input).
    pub batch_min_selected: f32,
}

pub(crate) fn ensure<T: Clone + Default>(v: &mut Vec<T>, n: usize) {
    if v.len() < n {
        v.resize(n, T::default());
    }
}

/// Forward and exact backward for a batch `x` (`[rows, d_in]`, already scaled and filtered).
/// `since_fired[j]` counts the tokens since latent `j` last fired (the dead-latent mask).
pub fn forward_backward(
    sae: &Sae,
    ws: &mut Workspace,
    x: &[f32],
    since_fired: &[u64],
    lp: &LossParams,
    comm: &dyn Collective,
) -> Result<StepStats, crate::SaeError> {
    match lp.arch {
        Arch::TopK | Arch::BatchTopK => Ok(topk::forward_backward(sae, ws, x, since_fired, lp, comm)),
        Arch::Relu | Arch::JumpRelu => dense::forward_backward(sae, ws, x, since_fired, lp, comm),
    }
}

// encoder input: x [B, d_in], b_dec [d_in] -> xin [B, d_in] = x − b_dec (when the SAE subtracts it)
fn encoder_input_forward(xin: &mut Vec<f32>, x: &[f32], sae: &Sae) {
    ensure(xin, x.len());
    let xin = &mut xin[..x.len()];
    xin.copy_from_slice(x);
    if sae.apply_b_dec_to_input {
        xin.par_chunks_mut(sae.d_in).for_each(|r| {
            for (v, b) in r.iter_mut().zip(&sae.params.b_dec) {
                *v -= b;
            }
        });
    }
}

// encoder input backward: dpre-weighted encoder rows -> g_b_dec [d_in]
// With b_dec subtracted at the encoder input, b_dec also receives −Σ_j (Σ_t dL/dpre_tj)·W_enc[j];
// `g_benc[u]` is that inner sum for latent `touched[u]`.
fn encoder_input_backward(g_bdec: &mut [f32], touched: &[u32], g_benc: &[f32], sae: &Sae) {
    if !sae.apply_b_dec_to_input {
        return;
    }
    let d = sae.d_in;
    for (&j, &gb) in touched.iter().zip(g_benc) {
        if gb != 0.0 {
            let j = j as usize;
            kernels::axpy(-gb, &sae.params.w_enc[j * d..(j + 1) * d], g_bdec);
        }
    }
}

/// Σ_t ‖x_t − mean‖² of the batch (f64, fixed-order): the FVU denominator.
fn batch_total_variance(x: &[f32], d: usize, comm: &dyn Collective) -> f64 {
    let rows = x.len() / d;
    let mut mean = vec![0.0f32; d];
    kernels::column_sum(x, d, &mut mean);
    comm.sum_f32(&mut mean);
    let all_rows = comm.total_rows(rows);
    for m in mean.iter_mut() {
        *m /= all_rows as f32;
    }
    let mut tv = [kernels::row_reduce(rows, |r| {
        x[r * d..(r + 1) * d].iter().zip(&mean).map(|(&a, &m)| ((a - m) as f64).powi(2)).sum::<f64>()
    })];
    comm.sum_f64(&mut tv);
    tv[0]
}

/// Count, per latent, the rows of `sel` where it is active; returns the number of active slots.
fn count_fires(fires: &mut Vec<u32>, d_sae: usize, idx: &[u32], val: &[f32]) -> usize {
    ensure(fires, d_sae);
    fires[..d_sae].fill(0);
    let mut nnz = 0usize;
    for (&j, &v) in idx.iter().zip(val) {
        if j != u32::MAX && v != 0.0 {
            fires[j as usize] += 1;
            nnz += 1;
        }
    }
    nnz
}

/// Phase timer enabled by `SAEKIT_PROFILE=1` (prints one line per step to stderr).
pub(crate) struct Prof {
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
