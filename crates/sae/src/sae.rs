//! The SAE weights and inference (encode rows to sparse codes, decode codes to rows).

use crate::config::Arch;
use crate::kernels;
use crate::params::Params;
use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use saekit_kernels::Precision;
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// How the inference activation is computed. Training-only architectures map onto these:
/// BatchTopK is saved as `JumpRelu` with its learned global threshold broadcast (as SAELens does).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Activation {
    /// relu(pre), keep the k largest per row
    TopK {
        /// Latents kept per row.
        k: usize,
    },
    /// relu(pre) * (pre > threshold_j)
    JumpRelu,
    /// relu(pre)
    Relu,
}

/// Metadata carried into SAELens `cfg.json` (`metadata` object).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SaeMetadata {
    /// The model the SAE was trained on (empty: unknown).
    pub model_name: String,
    /// The hook point it reads (TransformerLens name).
    pub hook_name: String,
    /// Tokens per training context.
    pub context_size: usize,
    /// Whether the training contexts began with BOS.
    pub prepend_bos: bool,
    /// Where the training data came from.
    pub dataset_path: String,
    /// Fingerprint of the tokenizer's vocabulary that made the training tokens (empty: unknown).
    pub tokenizer_fingerprint: String,
    /// Which rows the data source left out as attention sinks, in words (empty: none / unknown).
    pub sink_rule: String,
    /// The scalar the inputs were multiplied by while training (folded into the saved weights).
    pub input_scale: Option<f32>,
    /// A transcoder's output hook point, the activation it reconstructs (e.g. `blocks.L.hook_mlp_out`);
    /// empty for an SAE, which reconstructs its input.
    #[serde(default)]
    pub hook_name_out: String,
    /// The scalar a transcoder's targets were multiplied by while training (folded into the saved
    /// weights); `None` for an SAE, whose target is its input.
    #[serde(default)]
    pub output_scale: Option<f32>,
}

impl Default for SaeMetadata {
    fn default() -> Self {
        SaeMetadata {
            model_name: String::new(),
            hook_name: String::new(),
            context_size: 128,
            prepend_bos: false,
            dataset_path: String::new(),
            tokenizer_fingerprint: String::new(),
            sink_rule: String::new(),
            input_scale: None,
            hook_name_out: String::new(),
            output_scale: None,
        }
    }
}

/// A sparse autoencoder in raw activation space, or a transcoder (an encoder on one hook point, a
/// decoder to another, [`Sae::is_transcoder`]).
///
/// Layout: `w_enc` is row-major `[d_sae, d_in]` and `w_dec` `[d_sae, d_out]` (latent-major, like
/// sparsify's `encoder.weight` and SAELens' `W_dec`); SAELens' `W_enc` is `[d_in, d_sae]` and is
/// transposed on save/load. Forward: `pre = (x - b_dec·apply_b_dec_to_input) · w_encᵀ + b_enc`,
/// `ŷ = f · w_dec + b_dec (+ x · w_skipᵀ)`. An SAE has `d_out = d_in` and no skip connection.
#[derive(Debug, Clone, PartialEq)]
pub struct Sae {
    /// Width of the activations it reads.
    pub d_in: usize,
    /// Number of latents.
    pub d_sae: usize,
    /// How latents are activated at inference.
    pub activation: Activation,
    /// The weights and biases (and JumpReLU's thresholds).
    pub params: Params<Vec<f32>>,
    /// Subtract b_dec from the input before encoding (SAELens' `apply_b_dec_to_input`).
    pub apply_b_dec_to_input: bool,
    /// What it was made from (SAELens cfg.json `metadata`).
    pub metadata: SaeMetadata,
}

/// An SAE's encoder in one precision ([`Sae::encoder`]): for bf16, the weights packed once.
pub struct Encoder<'a> {
    sae: &'a Sae,
    precision: Precision,
    weights: kernels::EncoderWeights<'a>,
}

impl Encoder<'_> {
    /// Encode rows `x` ([n, d_in]) to sparse codes, as [`Sae::encode`] does in this precision.
    pub fn encode(&self, x: &[f32]) -> SparseCodes {
        self.sae.encode_rows(x, &self.weights)
    }

    /// The precision its GEMM runs in.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The SAE it encodes for.
    pub fn sae(&self) -> &Sae {
        self.sae
    }
}

/// Sparse codes in CSR form: row `r` holds `idx[indptr[r]..indptr[r+1]]` / `val[..]`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SparseCodes {
    /// Row offsets into `idx` / `val` (rows + 1 entries).
    pub indptr: Vec<usize>,
    /// Latent of each active entry, ascending within a row.
    pub idx: Vec<u32>,
    /// Its activation.
    pub val: Vec<f32>,
}

impl SparseCodes {
    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.indptr.len().saturating_sub(1)
    }
    /// Row `r`'s active (latents, values).
    pub fn row(&self, r: usize) -> (&[u32], &[f32]) {
        let (a, b) = (self.indptr[r], self.indptr[r + 1]);
        (&self.idx[a..b], &self.val[a..b])
    }
}

/// Model names compared loosely: "HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2 135M Instruct" and
/// "smollm2-135m-instruct" are one model; an empty name is unknown and matches anything.
fn same_model(a: &str, b: &str) -> bool {
    let norm = |s: &str| -> String {
        let base = s.rsplit('/').next().unwrap_or(s);
        base.chars().filter(|c| c.is_ascii_alphanumeric()).map(|c| c.to_ascii_lowercase()).collect()
    };
    a.is_empty() || b.is_empty() || norm(a) == norm(b)
}

impl Sae {
    /// Content fingerprint of the weights and activation (what resumes compare instead of a path).
    pub fn fingerprint(&self) -> String {
        let mut f = saekit_files::Fingerprinter::default();
        f.part(format!("{:?} {} {} {}", self.activation, self.d_in, self.d_sae, self.apply_b_dec_to_input).as_bytes());
        // an SAE's fingerprint is the one it had before transcoders shared this struct
        for (name, t) in self.params.each() {
            if name != "w_skip" || !t.is_empty() {
                f.f32s(t);
            }
        }
        f.finish()
    }

    /// Width of the output: `d_in` for an SAE, the target's width for a transcoder.
    pub fn d_out(&self) -> usize {
        self.params.b_dec.len()
    }

    /// Whether this reconstructs another activation than its input (it names an output hook).
    pub fn is_transcoder(&self) -> bool {
        !self.metadata.hook_name_out.is_empty()
    }

    /// The hook this SAE reads on a model named `model_name` with residual width `d_model`, refusing
    /// (one line naming both sides) an SAE made for another model, width or hook. `asked_hook` is a hook
    /// the caller was told to use; `None` takes the SAE's own. `sae_label` names the SAE in errors.
    pub fn hook_on(
        &self,
        sae_label: &str,
        model_name: &str,
        d_model: usize,
        asked_hook: Option<&str>,
    ) -> Result<String> {
        let m = &self.metadata;
        if self.d_in != d_model {
            bail!("{sae_label}: the SAE reads {} dimensions but model {model_name:?} has d_model {d_model}", self.d_in);
        }
        if !same_model(&m.model_name, model_name) {
            bail!(
                "{sae_label}: the SAE was trained on model {:?} but is asked to run on model {model_name:?}",
                m.model_name
            );
        }
        // sparsify folders name their hook after the folder ("layers.6"), not in TransformerLens terms
        let tl_name = m.hook_name.contains("hook_");
        match asked_hook {
            Some(h) if tl_name && h != m.hook_name => {
                bail!("{sae_label}: the SAE was trained on hook {} but is asked to run on hook {h}", m.hook_name)
            }
            Some(h) => Ok(h.to_string()),
            None if m.hook_name.is_empty() => {
                bail!(
                    "{sae_label}: the SAE names no hook (a Gemma Scope params.npz carries no metadata); pass --hook \
                     with the hook it was trained on, e.g. blocks.12.hook_resid_post"
                )
            }
            None => Ok(m.hook_name.clone()),
        }
    }
}

impl Sae {
    /// Random init: decoder rows are uniform random directions scaled to `dec_norm`, the encoder is
    /// the decoder transpose (OpenAI / Anthropic), biases zero.
    pub fn init(d_in: usize, d_sae: usize, activation: Activation, dec_norm: f32, seed: u64) -> Sae {
        Sae::init_latents(d_in, 0..d_sae, activation, dec_norm, seed)
    }

    /// The latents `latents` of [`Sae::init`]'s SAE (a shard's slice), bit for bit, without
    /// making the others.
    pub(crate) fn init_latents(
        d_in: usize,
        latents: Range<usize>,
        activation: Activation,
        dec_norm: f32,
        seed: u64,
    ) -> Sae {
        let d_sae = latents.len();
        let w_dec = random_rows(latents, d_in, dec_norm, seed ^ 0x5ae0_0000_0000_0000);
        Sae {
            d_in,
            d_sae,
            activation,
            params: Params {
                w_enc: w_dec.clone(),
                b_enc: vec![0.0; d_sae],
                w_dec,
                b_dec: vec![0.0; d_in],
                threshold: initial_threshold(activation, d_sae),
                w_skip: Vec::new(),
            },
            apply_b_dec_to_input: true,
            metadata: SaeMetadata::default(),
        }
    }

    /// Random init of a transcoder from `d_in` to `d_out` columns, with a zero skip connection when
    /// `skip` (SAELens' `SkipTranscoder`). The encoder cannot be the decoder's transpose (the widths
    /// differ, and so do the two spaces): its rows are random directions of norm `dec_norm` of their
    /// own stream. The input is not shifted by `b_dec` (SAELens refuses `apply_b_dec_to_input` for
    /// transcoders: b_dec lives in the output space).
    pub fn init_transcoder(
        d_in: usize,
        d_out: usize,
        d_sae: usize,
        activation: Activation,
        dec_norm: f32,
        seed: u64,
        skip: bool,
    ) -> Sae {
        Sae::init_transcoder_latents(d_in, d_out, 0..d_sae, activation, dec_norm, seed, skip)
    }

    /// The latents `latents` of [`Sae::init_transcoder`]'s transcoder, bit for bit.
    pub(crate) fn init_transcoder_latents(
        d_in: usize,
        d_out: usize,
        latents: Range<usize>,
        activation: Activation,
        dec_norm: f32,
        seed: u64,
        skip: bool,
    ) -> Sae {
        let d_sae = latents.len();
        Sae {
            d_in,
            d_sae,
            activation,
            params: Params {
                w_enc: random_rows(latents.clone(), d_in, dec_norm, seed ^ 0x7c0d_0000_0000_0000),
                b_enc: vec![0.0; d_sae],
                w_dec: random_rows(latents, d_out, dec_norm, seed ^ 0x5ae0_0000_0000_0000),
                b_dec: vec![0.0; d_out],
                threshold: initial_threshold(activation, d_sae),
                w_skip: if skip { vec![0.0; d_out * d_in] } else { Vec::new() },
            },
            apply_b_dec_to_input: false,
            metadata: SaeMetadata::default(),
        }
    }

    /// The training architecture that yields this inference activation.
    pub fn arch_for_activation(&self) -> Arch {
        match self.activation {
            Activation::TopK { .. } => Arch::TopK,
            Activation::JumpRelu => Arch::JumpRelu,
            Activation::Relu => Arch::Relu,
        }
    }

    /// Columns of latents processed per encoder GEMM, so the [rows, chunk] pre-activation buffer
    /// stays near 256 MB whatever d_sae is.
    pub(crate) fn latent_chunk(d_sae: usize, rows: usize) -> usize {
        let c = ((64usize << 20) / rows.max(1)).max(1024);
        c.min(d_sae)
    }

    /// Encode rows `x` ([n, d_in]) to sparse codes.
    pub fn encode(&self, x: &[f32]) -> SparseCodes {
        self.encoder(Precision::F32).encode(x)
    }

    /// [`Sae::encode`] with the encoder GEMM in `precision`; for many calls, [`Sae::encoder`] packs
    /// the bf16 weights once.
    pub fn encode_with(&self, x: &[f32], precision: Precision) -> SparseCodes {
        self.encoder(precision).encode(x)
    }

    /// The encoder in `precision`, ready for many [`Encoder::encode`] calls: in bf16 the weights are
    /// rounded and packed here, once; the borrow keeps the SAE from changing under the packed copy.
    pub fn encoder(&self, precision: Precision) -> Encoder<'_> {
        let weights = kernels::EncoderWeights::packed(precision, &self.params.w_enc, (self.d_sae, self.d_in));
        Encoder { sae: self, precision, weights }
    }

    /// `x` through the encoder GEMM with `weights` (this SAE's, in their precision), then the
    /// activation, in row blocks.
    fn encode_rows(&self, x: &[f32], weights: &kernels::EncoderWeights) -> SparseCodes {
        let d = self.d_in;
        let n = x.len() / d;
        let mut codes = SparseCodes { indptr: vec![0], ..Default::default() };
        // process in row blocks to bound memory
        let rb = 1024usize;
        let mut xin = vec![0.0f32; rb.min(n.max(1)) * d];
        let mut pre = Vec::new();
        for r0 in (0..n).step_by(rb) {
            let rows = rb.min(n - r0);
            let xi = &mut xin[..rows * d];
            xi.copy_from_slice(&x[r0 * d..(r0 + rows) * d]);
            if self.apply_b_dec_to_input {
                xi.par_chunks_mut(d).for_each(|r| {
                    for (v, b) in r.iter_mut().zip(&self.params.b_dec) {
                        *v -= b;
                    }
                });
            }
            let encoder = weights.product(xi, rows);
            let rows_out = match self.activation {
                Activation::TopK { k } => {
                    let (mut sv, mut si) = (vec![0.0f32; rows * k], vec![0u32; rows * k]);
                    kernels::reset_selection(&mut sv, &mut si);
                    let none = kernels::SelectionFloor::default();
                    let mut selections = kernels::row_selections((&mut sv, &mut si), k, None, rows, none);
                    encoder.for_each_row(xi, 0..self.d_sae, &mut pre, &mut selections, |sel, values, j0| {
                        sel.add_panel(values, j0, &self.params.b_enc, &[])
                    });
                    let pairs = sv.chunks(k).zip(si.chunks(k));
                    pairs.map(|(v, i)| i.iter().copied().zip(v.iter().copied()).collect()).collect()
                }
                Activation::JumpRelu | Activation::Relu => {
                    let mut rows_out: Vec<Vec<(u32, f32)>> = vec![Vec::new(); rows];
                    encoder.for_each_row(xi, 0..self.d_sae, &mut pre, &mut rows_out, |out, values, j0| {
                        self.keep_active(values, j0, out)
                    });
                    rows_out
                }
            };
            for mut row in rows_out {
                row.retain(|&(j, v)| j != u32::MAX && v > 0.0);
                row.sort_unstable_by_key(|p| p.0);
                codes.idx.extend(row.iter().map(|p| p.0));
                codes.val.extend(row.iter().map(|p| p.1));
                codes.indptr.push(codes.idx.len());
            }
        }
        codes
    }

    /// JumpReLU's and ReLU's activation of one row's pre-activations of latents `j0..j0 +
    /// values.len()`: the (latent, value) pairs above 0 (and above the latent's threshold), in order.
    fn keep_active(&self, values: &[f32], j0: usize, out: &mut Vec<(u32, f32)>) {
        let b_enc = &self.params.b_enc[j0..j0 + values.len()];
        for (jj, (&p, &b)) in values.iter().zip(b_enc).enumerate() {
            let (j, v) = (j0 + jj, p + b);
            let keep = match self.activation {
                Activation::JumpRelu => v > self.params.threshold[j] && v > 0.0,
                _ => v > 0.0,
            };
            if keep {
                out.push((j as u32, v));
            }
        }
    }

    /// Decode sparse codes to rows [n, d_out] (a skip transcoder's `x · W_skipᵀ` is not included:
    /// it needs the input).
    pub fn decode(&self, codes: &SparseCodes) -> Vec<f32> {
        let d = self.d_out();
        let mut out = vec![0.0f32; codes.rows() * d];
        out.par_chunks_mut(d).enumerate().for_each(|(r, o)| {
            o.copy_from_slice(&self.params.b_dec);
            let (idx, val) = codes.row(r);
            for (&j, &v) in idx.iter().zip(val) {
                let j = j as usize;
                kernels::axpy(v, &self.params.w_dec[j * d..(j + 1) * d], o);
            }
        });
        out
    }

    /// The reconstruction of rows `x` ([n, d_in]): decode(encode(x)), plus `x · W_skipᵀ` for a skip
    /// transcoder; [n, d_out].
    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        let mut out = self.decode(&self.encode(x));
        if !self.params.w_skip.is_empty() {
            kernels::gemm_abt_add(x.len() / self.d_in, self.d_out(), self.d_in, x, &self.params.w_skip, &mut out);
        }
        out
    }

    /// Dense codes [n, d_sae] (small inputs only: tests, interop checks).
    pub fn encode_dense(&self, x: &[f32]) -> Vec<f32> {
        let c = self.encode(x);
        let mut out = vec![0.0f32; c.rows() * self.d_sae];
        for r in 0..c.rows() {
            let (idx, val) = c.row(r);
            for (&j, &v) in idx.iter().zip(val) {
                out[r * self.d_sae + j as usize] = v;
            }
        }
        out
    }

    /// Fold an input scale `s` (the SAE was trained on `s·x`) into the weights so the SAE works on raw x.
    pub fn fold_input_scale(&mut self, s: f32) {
        self.fold_scales(s, s);
    }

    /// Fold the scales a transcoder was trained with (inputs `s_in·x`, targets `s_out·y`) into the
    /// weights so that it maps raw x to raw y: `s_out·y ≈ f(s_in·x·W_encᵀ + b_enc)·W_dec + b_dec +
    /// s_in·x·W_skipᵀ`, divided through by `s_out` (SAELens folds its norm scaling factor the same way).
    pub fn fold_scales(&mut self, s_in: f32, s_out: f32) {
        if s_in == 1.0 && s_out == 1.0 {
            return;
        }
        self.params.w_enc.par_iter_mut().for_each(|w| *w *= s_in);
        self.params.w_dec.par_iter_mut().for_each(|w| *w /= s_out);
        for b in self.params.b_dec.iter_mut() {
            *b /= s_out;
        }
        self.params.w_skip.par_iter_mut().for_each(|w| *w = *w * s_in / s_out);
    }

    /// ‖W_dec,j‖ for every latent.
    pub fn decoder_row_norms(&self) -> Vec<f32> {
        self.params.w_dec.par_chunks(self.d_out()).map(|r| kernels::dot(r, r).sqrt()).collect()
    }
}

/// JumpReLU's per-latent thresholds (set by the trainer), empty for the other activations.
fn initial_threshold(activation: Activation, d_sae: usize) -> Vec<f32> {
    match activation {
        Activation::JumpRelu => vec![0.0; d_sae],
        _ => Vec::new(),
    }
}

/// Rows `rows` of a matrix of `width` uniform random values per row, each row scaled to norm
/// `norm`; each block of 256 rows gets its own stream of `seed`, so the result is fast, independent
/// of the thread count, and a slice of rows is made without the rows before it (a block's stream is
/// run through the rows of its block before the slice and those values dropped).
fn random_rows(rows: Range<usize>, width: usize, norm: f32, seed: u64) -> Vec<f32> {
    const BLOCK: usize = 256;
    let mut w = vec![0.0f32; rows.len() * width];
    // (block, rows of the block before the slice, the slice's rows of the block)
    let mut pieces = Vec::new();
    let (mut rest, mut r) = (&mut w[..], rows.start);
    while r < rows.end {
        let b = r / BLOCK;
        let end = ((b + 1) * BLOCK).min(rows.end);
        let (piece, tail) = std::mem::take(&mut rest).split_at_mut((end - r) * width);
        pieces.push((b, r - b * BLOCK, piece));
        (rest, r) = (tail, end);
    }
    pieces.into_par_iter().for_each(|(b, skipped, piece)| {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (b as u64).wrapping_mul(0x9E37_79B9));
        for _ in 0..skipped * width {
            rng.gen::<f32>();
        }
        for row in piece.chunks_mut(width) {
            for v in row.iter_mut() {
                // uniform in [-1, 1): kaiming-uniform up to scale; the row is normalised below
                *v = rng.gen::<f32>() * 2.0 - 1.0;
            }
            let n = kernels::dot(row, row).sqrt().max(1e-12);
            for v in row.iter_mut() {
                *v *= norm / n;
            }
        }
    });
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shard's init is the same slice of the whole init, for slices that start and end inside
    /// the 256-row blocks of the random streams and across several of them.
    #[test]
    fn a_slice_of_latents_inits_as_in_the_whole_sae() {
        let (d, n) = (7, 1000);
        let whole = Sae::init(d, n, Activation::TopK { k: 3 }, 0.3, 5);
        let coder = Sae::init_transcoder(d, 5, n, Activation::JumpRelu, 0.3, 5, true);
        for r in [0..n, 0..1, 300..700, 255..257, 513..1000, 999..1000, 400..400] {
            let part = Sae::init_latents(d, r.clone(), Activation::TopK { k: 3 }, 0.3, 5);
            assert_eq!(part.d_sae, r.len());
            assert_eq!(part.params.w_dec, whole.params.w_dec[r.start * d..r.end * d], "{r:?}");
            assert_eq!(part.params.w_enc, whole.params.w_enc[r.start * d..r.end * d], "{r:?}");
            let part = Sae::init_transcoder_latents(d, 5, r.clone(), Activation::JumpRelu, 0.3, 5, true);
            assert_eq!(part.params.w_enc, coder.params.w_enc[r.start * d..r.end * d], "{r:?}");
            assert_eq!(part.params.w_dec, coder.params.w_dec[r.start * 5..r.end * 5], "{r:?}");
            assert_eq!(part.params.threshold.len(), r.len());
        }
    }
}
