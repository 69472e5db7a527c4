//! The `--model` flag every model-running subcommand shares, and how a name resolves to files.

use std::path::PathBuf;

use anyhow::{bail, Result};
use saekit_model::{LoadOptions, Model, Precision, PrecisionChoice};

#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// A .gguf file, a Hugging Face folder (config.json + *.safetensors + tokenizer.json), or a hub name
    /// `org/name` already fetched with `saekit fetch-model --hub org/name`.
    /// Default: SmolLM2-135M-Instruct from the cache (`saekit fetch-model`).
    /// Folders: Llama/Mistral/Qwen2, Qwen3, Phi-3, Gemma 2, Gemma 3 (text), GPT-NeoX/Pythia, GPT-2. Hook
    /// names are TransformerLens's; GPT-NeoX/Pythia blocks run attention and MLP in parallel and so have
    /// no blocks.L.hook_resid_mid (as in TransformerLens).
    #[arg(long, short = 'm', env = "SAEKIT_MODEL")]
    pub model: Option<String>,
    /// A tokenizer.json to use instead of the one in the model.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

impl ModelArgs {
    pub fn path(&self) -> Result<PathBuf> {
        resolve_model(self.model.as_deref())
    }

    /// The whole model, at f32.
    pub fn load(&self) -> Result<Model> {
        self.load_at(None, Precision::F32)
    }

    /// Load only the first `blocks` blocks (all with `None`: enough for hooks up to block `blocks - 1`,
    /// no logits, in less memory), running at `precision` from the start (a bf16 model is never
    /// widened to f32 on the way).
    pub fn load_at(&self, blocks: Option<usize>, precision: Precision) -> Result<Model> {
        let path = self.path()?;
        Ok(Model::load(&path, &LoadOptions { tokenizer: self.tokenizer.clone(), blocks, precision })?)
    }
}

/// `--precision`, for the subcommands that run the forward pass over many tokens (harvest, eval-model).
#[derive(clap::Args, Debug, Clone)]
pub struct PrecisionArgs {
    /// What the model's linear layers and logits multiply in: auto = bf16 where this CPU runs it at
    /// least 1.3x faster than f32 (measured once per machine and kept in
    /// ~/.cache/saekit/precision-auto-*.txt; `saekit bench gemm` shows both rates), else f32.
    ///
    /// bf16: weights and inputs rounded to bf16, products summed in f32, on Intel AMX or AVX512-BF16 (an
    /// error on a CPU with neither); norms, attention and the residual stream stay f32. SmolLM2's layer
    /// 15 then moves by 0.4% (relative L2), 2.6x what storing it in bf16 moves it.
    ///
    /// f32: the forward pass the parity tests check, bit for bit.
    ///
    /// auto measures both once at start-up. The pick is logged and recorded in the output.
    #[arg(long, default_value = "auto", value_name = "auto|bf16|f32", env = "SAEKIT_PRECISION")]
    pub precision: PrecisionChoice,
}

impl PrecisionArgs {
    /// Resolve `choice` on this CPU (what [`ModelArgs::load_at`] then loads the model at).
    pub fn resolve(choice: PrecisionChoice) -> Result<Precision> {
        let p = Precision::resolve(choice)?;
        let path = p.bf16_path().map_or("f32 gemm", |b| b.name());
        tracing::info!(asked = ?choice, precision = p.name(), path, "precision");
        Ok(p)
    }
}

/// A path if it exists; else a hub name looked up in the cache; else the default model.
pub fn resolve_model(spec: Option<&str>) -> Result<PathBuf> {
    let Some(spec) = spec else { return Ok(saekit_model::default_model_path()) };
    let p = PathBuf::from(spec);
    if p.exists() {
        return Ok(p);
    }
    if is_hub_name(spec) {
        let cached = super::fetch_model::hub_dir(spec);
        if cached.join("config.json").exists() {
            return Ok(cached);
        }
        bail!("model '{spec}' is not in the cache; fetch it with `saekit fetch-model --hub {spec}`");
    }
    bail!("{spec}: no such model file or folder");
}

fn is_hub_name(s: &str) -> bool {
    let mut parts = s.split('/');
    matches!((parts.next(), parts.next(), parts.next()), (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() && !s.starts_with('.'))
}
