//! The SAE's trainable tensors as one generic struct, reused for the weights, their gradients and
//! both Adam moments (llm.c's `ParameterTensors`): the names and shapes are spelled out here once,
//! and the checkpoint writer and reader walk them.

/// One value per trainable tensor of an SAE.
///
/// Shapes (row-major, latent-major like sparsify's `encoder.weight`):
/// `w_enc`, `w_dec` are `[d_sae, d_in]`; `b_enc` is `[d_sae]`; `b_dec` is `[d_in]`; `threshold` is
/// `[d_sae]` for JumpReLU and empty otherwise. Gradients keep the same struct with the two matrices
/// and `b_enc` compact over the latents a step touched (see `step::Grads`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Params<T> {
    /// Encoder weights `[d_sae, d_in]` (SAELens stores the transpose, `W_enc [d_in, d_sae]`).
    pub w_enc: T,
    /// Encoder bias `[d_sae]`.
    pub b_enc: T,
    /// Decoder weights `[d_sae, d_in]`.
    pub w_dec: T,
    /// Decoder bias `[d_in]`, also subtracted from the encoder's input.
    pub b_dec: T,
    /// Per-latent JumpReLU threshold `[d_sae]`; empty for the other activations.
    pub threshold: T,
}

impl<T> Params<T> {
    /// The tensor names, in the order of [`Params::each`] (the names of saekit's checkpoints).
    pub const NAMES: [&'static str; 5] = ["w_enc", "b_enc", "w_dec", "b_dec", "threshold"];

    /// Build each tensor from its name.
    pub fn try_from_names<E>(mut f: impl FnMut(&'static str) -> Result<T, E>) -> Result<Params<T>, E> {
        let [w_enc, b_enc, w_dec, b_dec, threshold] = Self::NAMES;
        Ok(Params { w_enc: f(w_enc)?, b_enc: f(b_enc)?, w_dec: f(w_dec)?, b_dec: f(b_dec)?, threshold: f(threshold)? })
    }

    /// `(name, tensor)` pairs in [`Params::NAMES`] order.
    pub fn each(&self) -> [(&'static str, &T); 5] {
        let [a, b, c, d, e] = Self::NAMES;
        [(a, &self.w_enc), (b, &self.b_enc), (c, &self.w_dec), (d, &self.b_dec), (e, &self.threshold)]
    }

    /// The tensors, mutably, in [`Params::NAMES`] order.
    pub fn each_mut(&mut self) -> [&mut T; 5] {
        [&mut self.w_enc, &mut self.b_enc, &mut self.w_dec, &mut self.b_dec, &mut self.threshold]
    }

    /// Apply `f` to every tensor.
    pub fn map<U>(&self, mut f: impl FnMut(&T) -> U) -> Params<U> {
        Params {
            w_enc: f(&self.w_enc),
            b_enc: f(&self.b_enc),
            w_dec: f(&self.w_dec),
            b_dec: f(&self.b_dec),
            threshold: f(&self.threshold),
        }
    }
}

impl Params<Vec<f32>> {
    /// Zeros of the same shapes (a fresh Adam moment).
    pub fn zeros_like(&self) -> Params<Vec<f32>> {
        self.map(|t| vec![0.0; t.len()])
    }

    /// The shape of each tensor for an SAE of width `d_in` and `d_sae` latents.
    pub fn shapes(&self, d_in: usize, d_sae: usize) -> Params<Vec<usize>> {
        Params {
            w_enc: vec![d_sae, d_in],
            b_enc: vec![d_sae],
            w_dec: vec![d_sae, d_in],
            b_dec: vec![d_in],
            threshold: vec![self.threshold.len()],
        }
    }
}
