//! The SAE's trainable tensors as one generic struct, reused for the weights, their gradients and
//! both Adam moments (llm.c's `ParameterTensors`): the names and shapes are spelled out here once,
//! and the checkpoint writer and reader walk them.

use rayon::prelude::*;

/// One value per trainable tensor of an SAE or a transcoder.
///
/// Shapes (row-major, latent-major like sparsify's `encoder.weight`):
/// `w_enc` is `[d_sae, d_in]`, `w_dec` `[d_sae, d_out]`; `b_enc` is `[d_sae]`; `b_dec` is `[d_out]`;
/// `threshold` is `[d_sae]` for JumpReLU and empty otherwise; `w_skip` is `[d_out, d_in]` for a skip
/// transcoder and empty otherwise. An SAE reconstructs its input, so for it `d_out = d_in`.
/// Gradients keep the same struct with the two matrices and `b_enc` compact over the latents a step
/// touched (see `step::Grads`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Params<T> {
    /// Encoder weights `[d_sae, d_in]` (SAELens stores the transpose, `W_enc [d_in, d_sae]`).
    pub w_enc: T,
    /// Encoder bias `[d_sae]`.
    pub b_enc: T,
    /// Decoder weights `[d_sae, d_out]`.
    pub w_dec: T,
    /// Decoder bias `[d_out]`; an SAE also subtracts it from the encoder's input.
    pub b_dec: T,
    /// Per-latent JumpReLU threshold `[d_sae]`; empty for the other activations.
    pub threshold: T,
    /// A skip transcoder's linear skip connection `[d_out, d_in]` (SAELens' and circuit-tracer's
    /// `W_skip`: the output gains `x · W_skipᵀ`); empty for SAEs and transcoders without one.
    pub w_skip: T,
}

impl<T> Params<T> {
    /// The tensor names, in the order of [`Params::each`] (the names of saekit's checkpoints).
    pub const NAMES: [&'static str; 6] = ["w_enc", "b_enc", "w_dec", "b_dec", "threshold", "w_skip"];

    /// Build each tensor from its name.
    pub fn try_from_names<E>(mut f: impl FnMut(&'static str) -> Result<T, E>) -> Result<Params<T>, E> {
        let [w_enc, b_enc, w_dec, b_dec, threshold, w_skip] = Self::NAMES;
        Ok(Params {
            w_enc: f(w_enc)?,
            b_enc: f(b_enc)?,
            w_dec: f(w_dec)?,
            b_dec: f(b_dec)?,
            threshold: f(threshold)?,
            w_skip: f(w_skip)?,
        })
    }

    /// `(name, tensor)` pairs in [`Params::NAMES`] order.
    pub fn each(&self) -> [(&'static str, &T); 6] {
        let [a, b, c, d, e, f] = Self::NAMES;
        [
            (a, &self.w_enc),
            (b, &self.b_enc),
            (c, &self.w_dec),
            (d, &self.b_dec),
            (e, &self.threshold),
            (f, &self.w_skip),
        ]
    }

    /// The tensors, mutably, in [`Params::NAMES`] order.
    pub fn each_mut(&mut self) -> [&mut T; 6] {
        [&mut self.w_enc, &mut self.b_enc, &mut self.w_dec, &mut self.b_dec, &mut self.threshold, &mut self.w_skip]
    }

    /// Apply `f` to every tensor.
    pub fn map<U>(&self, mut f: impl FnMut(&T) -> U) -> Params<U> {
        Params {
            w_enc: f(&self.w_enc),
            b_enc: f(&self.b_enc),
            w_dec: f(&self.w_dec),
            b_dec: f(&self.b_dec),
            threshold: f(&self.threshold),
            w_skip: f(&self.w_skip),
        }
    }
}

/// `n` zeros, each page written once (in parallel) before anyone reads it.
fn written_zeros(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    v.spare_capacity_mut().par_chunks_mut(1 << 16).for_each(|c| c.fill(std::mem::MaybeUninit::new(0.0)));
    // SAFETY: the loop above initialised all `n` values.
    unsafe { v.set_len(n) };
    v
}

impl Params<Vec<f32>> {
    /// Zeros of the same shapes (a fresh Adam moment), written now rather than left to the
    /// allocator: `vec![0.0; n]` maps the kernel's shared zero page, so Adam's first step, which reads
    /// then writes every moment, paid a copy-on-write fault and a TLB shootdown per 4 KiB page (6% of
    /// a 20-step training run's time on a 2-vCPU VM, `perf record`).
    pub fn zeros_like(&self) -> Params<Vec<f32>> {
        self.map(|t| written_zeros(t.len()))
    }

    /// The shape of each tensor for `d_sae` latents reading `d_in` columns and writing `d_out`.
    pub fn shapes(&self, d_in: usize, d_out: usize, d_sae: usize) -> Params<Vec<usize>> {
        Params {
            w_enc: vec![d_sae, d_in],
            b_enc: vec![d_sae],
            w_dec: vec![d_sae, d_out],
            b_dec: vec![d_out],
            threshold: vec![self.threshold.len()],
            w_skip: if self.w_skip.is_empty() { vec![0] } else { vec![d_out, d_in] },
        }
    }
}
