//! One training step: a pure function of (weights, Adam state, dead-latent counters, batch).
//!
//! [`forward_backward`] computes the loss and its exact gradients; [`apply_update`] clips them,
//! takes the Adam step and renormalises the decoder. Inside, each phase is an `X_forward` /
//! `X_backward` pair with the same argument order and its shapes on top (llm.c's `train_gpt2.c`):
//! `topk.rs` for TopK / BatchTopK (sparse decoder and backward over the selected latents),
//! `dense.rs` for ReLU+L1 and JumpReLU (dense GEMMs, or the sparse kernels when few latents fire),
//! `loss.rs` for the loss terms, each citing its paper, and `update.rs` for the optimiser.
//!
//! Every reduction across rows or latents goes through [`Collective`]: the batch variance, the loss
//! sums, the firing counts and the gradients over the batch's rows (data parallel), and, when the
//! latents are sharded, the TopK candidates, the partial reconstructions and the per-latent sums.
//! It is the identity for one process and MPI collectives across processes; the kernels never change.

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
use saekit_kernels::Precision;

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
    /// The SAE's first latent in this process (0 unless the latents are sharded, see
    /// [`Collective::latent_slice`]): selections exchanged between shards use global latent ids.
    pub latent_offset: usize,
    /// The precision of the encoder GEMM and, for TopK and BatchTopK, of the row operands of the
    /// backward's products; every sum, the loss and the optimiser stay f32.
    pub precision: Precision,
}

/// Loss terms and diagnostics of one step (computed on the batch before the update).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StepStats {
    /// The total loss the gradients are of.
    pub loss: f64,
    /// Σ‖y − ŷ‖² / Σ‖y − mean‖² over the batch (the TopK reconstruction loss itself); y is the
    /// target: the input for an SAE, the output hook's activation for a transcoder.
    pub fvu: f64,
    /// Mean over rows of ‖y − ŷ‖² (the ReLU / JumpReLU reconstruction loss).
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

/// Where the step's reductions meet: every sum over the rows of the batch and every exchange
/// between the slices of the latents goes through it, so a distributed run needs no other code.
///
/// Two directions (OpenAI's 2-D layout): the batch's rows are split across *replicas* (data
/// parallel: each holds all of its shard's latents and a disjoint share of the rows) and the
/// latents across *shards* (model parallel: each holds a contiguous slice of the latents, see
/// [`Collective::latent_slice`], and sees its replica's whole share of the rows). With one process
/// every method is the identity ([`SingleProcess`]); the MPI implementation is saekit-mpi's `MpiCollective`.
pub trait Collective: Sync + Send + std::fmt::Debug {
    /// Replace each value by its sum over the replicas (the rows of the whole batch).
    fn sum_f64(&self, values: &mut [f64]);
    /// As [`Collective::sum_f64`], for f32 vectors (column sums, gradients).
    fn sum_f32(&self, values: &mut [f32]);
    /// As [`Collective::sum_f64`], for counts (firings per latent).
    fn sum_u32(&self, values: &mut [u32]);
    /// Rows of the whole batch, given this process's share.
    fn total_rows(&self, local_rows: usize) -> usize;
    /// Replicas the batch is split across.
    fn replicas(&self) -> usize {
        1
    }
    /// The rows of a batch of `rows` that this process trains on (its replica's share).
    fn replica_rows(&self, rows: usize) -> std::ops::Range<usize> {
        0..rows
    }
    /// This process's replica (0 to replicas − 1).
    fn replica(&self) -> usize {
        0
    }
    /// Shards the latents are split across.
    fn shards(&self) -> usize {
        1
    }
    /// The latents of an SAE of `d_sae` latents that this process holds.
    fn latent_slice(&self, d_sae: usize) -> std::ops::Range<usize> {
        0..d_sae
    }
    /// Replace each value by its sum over the shards (partial reconstructions, per-latent sums).
    fn shard_sum_f32(&self, _values: &mut [f32]) {}
    /// As [`Collective::shard_sum_f32`], in f64.
    fn shard_sum_f64(&self, _values: &mut [f64]) {}
    /// Concatenate every shard's bytes in shard order (each may send a different count).
    fn shard_gather(&self, local: &[u8]) -> Vec<u8> {
        local.to_vec()
    }
    /// Concatenate every process's bytes in rank order (replica-major: replica 0's shards first).
    fn gather_all(&self, local: &[u8]) -> Vec<u8> {
        local.to_vec()
    }
    /// Whether any process passed `true` (a stop request seen by one process stops all at the same step).
    fn any(&self, flag: bool) -> bool {
        flag
    }
    /// This process's rank among all (0 writes the run's files).
    fn rank(&self) -> usize {
        0
    }
    /// What this process's exchanges have cost so far (`None` in one process, which has none).
    fn traffic(&self) -> Option<Traffic> {
        None
    }
    /// Rank 0 gets every shard's bytes in shard order; the other ranks get nothing. Unlike
    /// [`Collective::shard_gather`], no rank but the root holds the whole, and a part may exceed 2 GiB.
    fn shard_gather_to_root(&self, local: &[u8]) -> Vec<u8> {
        self.shard_gather(local)
    }
    /// As [`Collective::shard_gather_to_root`], for f32 values (no byte copies of a large matrix).
    fn shard_gather_f32_to_root(&self, local: &[f32]) -> Vec<f32> {
        local.to_vec()
    }
}

/// A process's exchanges with the others so far: the benchmark's communication share and volume.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Traffic {
    /// Wall seconds spent inside the MPI library's calls (waiting for other ranks included).
    pub seconds: f64,
    /// Payload bytes this process handed to the library to send (each all-reduce's vector, each
    /// all-gather's own part): the wire carries a multiple of it that depends on the algorithm.
    pub bytes_sent: u64,
    /// Calls into the library.
    pub calls: u64,
}

/// The whole batch and every latent are in this process: every reduction is the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn sum_f64(&self, _: &mut [f64]) {}
    fn sum_f32(&self, _: &mut [f32]) {}
    fn sum_u32(&self, _: &mut [u32]) {}
    fn total_rows(&self, local_rows: usize) -> usize {
        local_rows
    }
}

/// Gradients: the same [`Params`] as the weights, with the two matrices and `b_enc` compact over
/// the latents the step touched (row `u` belongs to latent `touched.touched[u]`), `b_dec` dense,
/// `threshold` dense or empty (only JumpReLU has one), `w_skip` dense or empty (skip transcoders).
#[derive(Default)]
pub struct Grads {
    pub(crate) touched: LatentMajor,
    /// Gradient of each parameter (compact rows as above).
    pub params: Params<Vec<f32>>,
}

impl Grads {
    /// The gradients with every latent's row present (untouched latents' rows are zero).
    pub fn dense(&self, d_in: usize, d_out: usize, d_sae: usize) -> Params<Vec<f32>> {
        let p = &self.params;
        let mut out = Params {
            w_enc: vec![0.0; d_sae * d_in],
            b_enc: vec![0.0; d_sae],
            w_dec: vec![0.0; d_sae * d_out],
            b_dec: p.b_dec.clone(),
            threshold: p.threshold.clone(),
            w_skip: p.w_skip.clone(),
        };
        for (u, &j) in self.touched.touched.iter().enumerate() {
            let j = j as usize;
            out.w_enc[j * d_in..(j + 1) * d_in].copy_from_slice(&p.w_enc[u * d_in..(u + 1) * d_in]);
            out.w_dec[j * d_out..(j + 1) * d_out].copy_from_slice(&p.w_dec[u * d_out..(u + 1) * d_out]);
            out.b_enc[j] = p.b_enc[u];
        }
        out
    }
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
    /// `[B, d_out]` reconstruction ŷ (x̂ for an SAE).
    xhat: Vec<f32>,
    /// `[B, d_out]` dL/dŷ of the main reconstruction.
    dxhat: Vec<f32>,
    topk: topk::Buffers,
    dense: dense::Buffers,
    /// The encoder in bf16 (empty in f32), written by each update; outside the paths' buffers so
    /// the step can read it while it fills them.
    w_enc_bf16: kernels::EncoderCopy,
    /// A bf16 TopK step's backward operands: `xin`, then the output gradient of each entry source.
    rows_bf16: [Vec<kernels::Bf16>; 4],
    /// The step's gradients (read by [`apply_update`]).
    pub grads: Grads,
    /// Per latent, the rows of the last batch on which it fired (non-zero activation).
    pub fires: Vec<u32>,
    /// BatchTopK: the smallest selected activation of the last batch (its threshold's EMA input).
    pub batch_min_selected: f32,
}

impl Workspace {
    /// Per row of the last step, the latents that reconstructed it (ids local to this process), ascending.
    pub(crate) fn active_latents(&self, arch: Arch, rows: usize, d_sae: usize) -> Vec<Vec<u32>> {
        match arch {
            Arch::TopK | Arch::BatchTopK => topk::active_latents(&self.topk, rows),
            Arch::Relu | Arch::JumpRelu => dense::active_latents(&self.dense, rows, d_sae),
        }
    }
}

pub(crate) fn ensure<T: Clone + Default>(v: &mut Vec<T>, n: usize) {
    if v.len() < n {
        v.resize(n, T::default());
    }
}

/// Forward and exact backward for a batch of inputs `x` (`[rows, d_in]`) and their targets `y`
/// (`[rows, d_out]`: `x` itself for an SAE, the output hook's rows for a transcoder), already scaled
/// and filtered. `since_fired[j]` counts the tokens since latent `j` last fired (the dead-latent mask).
#[allow(clippy::too_many_arguments)]
pub fn forward_backward(
    sae: &Sae,
    ws: &mut Workspace,
    x: &[f32],
    y: &[f32],
    since_fired: &[u64],
    lp: &LossParams,
    comm: &dyn Collective,
) -> Result<StepStats, crate::SaeError> {
    let stats = match lp.arch {
        Arch::TopK | Arch::BatchTopK => topk::forward_backward(sae, ws, x, y, since_fired, lp, comm),
        Arch::Relu | Arch::JumpRelu => dense::forward_backward(sae, ws, x, y, since_fired, lp, comm)?,
    };
    comm.sum_u32(&mut ws.fires[..sae.d_sae]);
    if comm.replicas() > 1 {
        sum_grads_over_replicas(&mut ws.grads, sae, comm);
    }
    Ok(stats)
}

/// Data parallel: each replica's gradient covers its own rows (already normalised by the whole
/// batch), so the step's gradient is their sum. The replicas touched different latents: the
/// compact rows are spread to dense ones first, which Adam treats exactly as the compact form.
fn sum_grads_over_replicas(g: &mut Grads, sae: &Sae, comm: &dyn Collective) {
    g.params = g.dense(sae.d_in, sae.d_out(), sae.d_sae);
    g.touched.set_dense(sae.d_sae);
    for t in g.params.each_mut() {
        comm.sum_f32(t);
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
// Sharded, each shard holds the terms of its own latents: they meet in one all-reduce of [d_in].
fn encoder_input_backward(g_bdec: &mut [f32], touched: &[u32], g_benc: &[f32], sae: &Sae, comm: &dyn Collective) {
    if !sae.apply_b_dec_to_input {
        return;
    }
    if comm.shards() == 1 {
        return add_encoder_input_grad(g_bdec, touched, g_benc, sae);
    }
    let mut part = vec![0.0f32; sae.d_in];
    add_encoder_input_grad(&mut part, touched, g_benc, sae);
    comm.shard_sum_f32(&mut part);
    for (g, p) in g_bdec.iter_mut().zip(part) {
        *g += p;
    }
}

/// A pass over every touched encoder row (the whole `W_enc`, tens of MB): the columns are split
/// across threads, each summing its columns over the latents in the one fixed order (bit for bit
/// one `axpy` per latent).
fn add_encoder_input_grad(g_bdec: &mut [f32], touched: &[u32], g_benc: &[f32], sae: &Sae) {
    const COLUMNS: usize = 64;
    let d = sae.d_in;
    g_bdec[..d].par_chunks_mut(COLUMNS).enumerate().for_each(|(c, g)| {
        let cols = c * COLUMNS..c * COLUMNS + g.len();
        let terms: Vec<(f32, &[f32])> = (touched.iter().zip(g_benc))
            .filter(|&(_, &gb)| gb != 0.0)
            .map(|(&j, &gb)| (-gb, &sae.params.w_enc[j as usize * d..][cols.clone()]))
            .collect();
        kernels::add_scaled(&terms, g);
    });
}

/// ŷ = Σ_s val·W_dec[idx] over each row's `width` slots (+ b_dec with `with_bias`), `[rows, d_out]`.
/// Sharded, each shard decodes its own latents and the partial reconstructions meet in one
/// all-reduce of [rows, d_out] before the (replicated) bias is added.
#[allow(clippy::too_many_arguments)]
fn decode_selection(
    out: &mut [f32],
    val: &[f32],
    idx: &[u32],
    width: usize,
    sae: &Sae,
    with_bias: bool,
    comm: &dyn Collective,
) {
    let (d, w_dec) = (sae.d_out(), &sae.params.w_dec);
    let bias = with_bias.then_some(&sae.params.b_dec[..]);
    if comm.shards() == 1 {
        return kernels::sparse_decode(val, idx, width, w_dec, d, bias, out);
    }
    kernels::sparse_decode(val, idx, width, w_dec, d, None, out);
    comm.shard_sum_f32(out);
    if let Some(b) = bias {
        add_rows(out, b);
    }
}

// skip connection: x [B, d_in], w_skip [d_out, d_in] -> out [B, d_out] += x·w_skipᵀ
// (nothing for an SAE or a transcoder without one)
fn skip_forward(out: &mut [f32], x: &[f32], sae: &Sae) {
    if !sae.params.w_skip.is_empty() {
        kernels::gemm_abt_add(x.len() / sae.d_in, sae.d_out(), sae.d_in, x, &sae.params.w_skip, out);
    }
}

// skip connection backward: dys (each [B, d_out], the gradients of the outputs that include the
// skip term), x [B, d_in] -> g_skip [d_out, d_in] = Σ dyᵀ·x (emptied without a skip connection)
fn skip_backward(g_skip: &mut Vec<f32>, dys: &[&[f32]], x: &[f32], sae: &Sae) {
    if sae.params.w_skip.is_empty() {
        g_skip.clear();
        return;
    }
    let (d_in, d_out) = (sae.d_in, sae.d_out());
    g_skip.resize(d_out * d_in, 0.0);
    for (i, dy) in dys.iter().enumerate() {
        kernels::gemm_atb(d_out, d_in, x.len() / d_in, dy, x, g_skip, i > 0);
    }
}

/// Add `b` to every row of `m`.
fn add_rows(m: &mut [f32], b: &[f32]) {
    m.par_chunks_mut(b.len()).for_each(|r| {
        for (v, b) in r.iter_mut().zip(b) {
            *v += b;
        }
    });
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

#[cfg(test)]
mod tests {
    use super::add_encoder_input_grad;
    use crate::kernels;
    use crate::sae::{Activation, Sae};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn column_split_encoder_input_gradient_equals_one_axpy_per_latent_bit_for_bit() {
        // 150 columns: two whole column blocks and a partial one
        let (d, d_sae) = (150, 300);
        let sae = Sae::init(d, d_sae, Activation::Relu, 1.0, 3);
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let touched: Vec<u32> = (0..d_sae as u32).filter(|_| rng.gen::<f32>() < 0.6).collect();
        let g_benc: Vec<f32> =
            touched.iter().map(|_| if rng.gen::<f32>() < 0.2 { 0.0 } else { rng.gen::<f32>() - 0.5 }).collect();
        let start: Vec<f32> = (0..d).map(|_| rng.gen::<f32>()).collect();
        let mut want = start.clone();
        for (&j, &gb) in touched.iter().zip(&g_benc) {
            if gb != 0.0 {
                kernels::axpy(-gb, &sae.params.w_enc[j as usize * d..(j as usize + 1) * d], &mut want);
            }
        }
        let mut got = start;
        add_encoder_input_grad(&mut got, &touched, &g_benc, &sae);
        assert_eq!(
            got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }
}
