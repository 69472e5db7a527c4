//! The architecture description of a model, read from GGUF metadata or a Hugging Face `config.json`.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file;
use serde::Serialize;

/// The decoder families saekit can run; each has its own block loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Llama-family decoders: Llama 2/3, Mistral, SmolLM/SmolLM2, Qwen2 (with q/k/v biases).
    Llama,
    /// GPT-2: LayerNorm with bias, learned absolute positions, a GELU MLP.
    Gpt2,
    /// Qwen3: the Llama decoder with RMSNorm on each query and key head, no q/k/v biases.
    Qwen3,
    /// Phi-3: the Llama decoder with fused `qkv_proj` and `gate_up_proj` weights.
    Phi3,
    /// Gemma 2: (1 + w) RMSNorms before and after attention and MLP, GeGLU, soft-capped attention and
    /// final logits, alternating sliding-window and global layers.
    Gemma2,
    /// Gemma 3 (text): Gemma 2 plus q/k RMSNorm and separate local/global rotary bases, 5 local : 1 global.
    Gemma3,
    /// GPT-NeoX / Pythia: LayerNorm with bias, partial rotary, (usually) parallel attention and MLP.
    GptNeox,
}

impl Arch {
    /// Whether attention and MLP read the same residual stream (GPT-NeoX's `use_parallel_residual`); such
    /// blocks have no `hook_resid_mid`, as in TransformerLens.
    pub fn parallel_block(&self, cfg: &ModelConfig) -> bool {
        *self == Arch::GptNeox && cfg.details.parallel_residual
    }
}

/// What the architectures beyond Llama and GPT-2 add; the defaults describe a Llama block.
#[derive(Debug, Clone, Serialize)]
pub struct ArchDetails {
    /// Attention scores are multiplied by `query_pre_attn_scalar^-1/2` (Gemma) instead of `head_dim^-1/2`.
    pub query_pre_attn_scalar: Option<f64>,
    /// `cap * tanh(score / cap)` on attention scores (Gemma 2).
    pub attn_softcap: Option<f32>,
    /// `cap * tanh(logit / cap)` on the final logits (Gemma 2).
    pub final_softcap: Option<f32>,
    /// Keys a sliding-window layer sees: the last `sliding_window` positions, itself included.
    pub sliding_window: Option<usize>,
    /// Per layer: whether it attends through the sliding window (empty: every layer is global).
    pub sliding_layers: Vec<bool>,
    /// The rotary base of sliding-window layers when it differs from `rope_theta` (Gemma 3).
    pub rope_local_theta: Option<f64>,
    /// Linear rope scaling of the global layers (`rope_scaling = {rope_type: linear, factor}`).
    pub rope_linear_factor: Option<f64>,
    /// Dimensions of each head that rotate (GPT-NeoX's `rotary_pct * head_dim`); the rest pass through.
    pub rotary_dims: usize,
    /// GPT-NeoX's `use_parallel_residual`.
    pub parallel_residual: bool,
    /// The MLP's GELU is the exact (erf) one rather than the tanh approximation.
    pub gelu_exact: bool,
}

impl ArchDetails {
    fn plain(head_dim: usize) -> Self {
        Self {
            query_pre_attn_scalar: None,
            attn_softcap: None,
            final_softcap: None,
            sliding_window: None,
            sliding_layers: Vec::new(),
            rope_local_theta: None,
            rope_linear_factor: None,
            rotary_dims: head_dim,
            parallel_residual: false,
            gelu_exact: false,
        }
    }
}

/// The shape of a loaded model, read from GGUF metadata or a Hugging Face `config.json` and checked.
#[derive(Debug, Clone, Serialize)]
pub struct ModelConfig {
    /// The decoder family.
    pub arch: Arch,
    /// A short human name (`general.name` or the folder name).
    pub name: String,
    /// Transformer blocks.
    pub n_layers: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Query heads per block.
    pub n_heads: usize,
    /// Key/value heads per block (fewer than `n_heads` with grouped-query attention).
    pub n_kv_heads: usize,
    /// Width of one attention head.
    pub head_dim: usize,
    /// Width of the MLP's hidden layer (`d_mlp`).
    pub d_ff: usize,
    /// Tokens in the vocabulary (rows of the embedding).
    pub vocab_size: usize,
    /// The longest sequence the model accepts (its context length).
    pub max_positions: usize,
    /// Base of the rotary embedding's frequencies.
    pub rope_theta: f64,
    /// Epsilon of the RMSNorm / LayerNorm denominators.
    pub norm_eps: f32,
    /// GGUF llama weights have Q/K rows permuted for the interleaved rotary embedding.
    pub rope_interleaved: bool,
    /// What only some architectures have (soft-capping, sliding windows, partial rotary, ...).
    pub details: ArchDetails,
}

/// The largest width, depth or vocabulary a config may declare (16.7M; real models are far below).
const MAX_DIM: usize = 1 << 24;

fn meta_u(ct: &gguf_file::Content, key: &str) -> Option<usize> {
    let v = ct.metadata.get(key)?;
    v.to_u32()
        .map(|x| x as usize)
        .or_else(|_| v.to_u64().map(|x| x as usize))
        .or_else(|_| v.to_i32().map(|x| x as usize))
        .ok()
}

fn meta_f(ct: &gguf_file::Content, key: &str) -> Option<f64> {
    let v = ct.metadata.get(key)?;
    v.to_f32().map(|x| x as f64).or_else(|_| v.to_f64()).ok()
}

/// What a Gemma 2/3 GGUF states, and what llama.cpp assumes where it states nothing: the sliding-window
/// layers (every 2nd from the first for Gemma 2; all but every 6th for Gemma 3), Gemma 3's local rotary base
/// (10000), and the attention scale (`attention.scale` when written, else head_dim^-1/2, or
/// (d_model / heads)^-1/2 for the 27B models (46 and 62 layers): what each released config's
/// `query_pre_attn_scalar` says).
fn gguf_gemma_details(
    ct: &gguf_file::Content,
    cfg: &ModelConfig,
    key: &dyn Fn(&str) -> String,
    mut d: ArchDetails,
) -> Result<ArchDetails> {
    let gemma3 = cfg.arch == Arch::Gemma3;
    let is_27b = cfg.n_layers == if gemma3 { 62 } else { 46 };
    let scalar = if is_27b { cfg.d_model / cfg.n_heads } else { cfg.head_dim } as f64;
    d.query_pre_attn_scalar = Some(meta_f(ct, &key("attention.scale")).map(|s| 1.0 / (s * s)).unwrap_or(scalar));
    d.attn_softcap = meta_f(ct, &key("attn_logit_softcapping")).map(|c| c as f32);
    d.final_softcap = meta_f(ct, &key("final_logit_softcapping")).map(|c| c as f32);
    d.sliding_window = meta_u(ct, &key("attention.sliding_window"));
    let pattern = if gemma3 { 6 } else { 2 };
    if d.sliding_window.is_some() {
        d.sliding_layers = (0..cfg.n_layers).map(|l| (l + 1) % pattern != 0).collect();
    }
    if gemma3 {
        d.rope_local_theta = Some(10_000.0);
    }
    let scaling = ct.metadata.get(&key("rope.scaling.type")).and_then(|v| v.to_string().ok()).cloned();
    match scaling.as_deref() {
        None | Some("none") => {}
        Some("linear") => d.rope_linear_factor = meta_f(ct, &key("rope.scaling.factor")),
        Some(other) => bail!("rope scaling '{other}' is not supported (supported: none, linear)"),
    }
    Ok(d)
}

impl ModelConfig {
    /// The config a GGUF file's metadata declares, checked (`file` names it in errors).
    pub(crate) fn from_gguf(ct: &gguf_file::Content, file: &Path) -> Result<Self> {
        let arch_name = ct
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .ok_or_else(|| anyhow!("{}: GGUF metadata has no general.architecture", file.display()))?;
        let arch = match arch_name.as_str() {
            "llama" | "mistral" | "qwen2" => Arch::Llama,
            "qwen3" => Arch::Qwen3,
            "phi3" => Arch::Phi3,
            "gpt2" => Arch::Gpt2,
            "gptneox" => Arch::GptNeox,
            "gemma2" => Arch::Gemma2,
            "gemma3" => Arch::Gemma3,
            other => bail!(
                "{}: unsupported architecture '{other}' (supported: llama, mistral, qwen2, qwen3, phi3, gpt2, \
                 gptneox, gemma2, gemma3)",
                file.display()
            ),
        };
        // llama.cpp's converter permutes Q/K rows for the interleaved rotary of Llama and Mistral only; Qwen
        // and Phi-3 run with the NEOX (half-split) rotary on the rows as transformers stores them.
        let rope_interleaved = matches!(arch_name.as_str(), "llama" | "mistral");
        if ct.tensor_infos.contains_key("rope_factors_long.weight") {
            bail!("{}: LongRoPE scaling (rope_factors_long) is not supported", file.display());
        }
        let p = |k: &str| format!("{arch_name}.{k}");
        let need = |k: &str| {
            meta_u(ct, &p(k)).ok_or_else(|| anyhow!("{}: GGUF metadata is missing '{}'", file.display(), p(k)))
        };
        let d_model = need("embedding_length")?;
        let n_heads = need("attention.head_count")?;
        let vocab_size = match ct.metadata.get("tokenizer.ggml.tokens").and_then(|v| v.to_vec().ok()) {
            Some(t) => t.len(),
            None => {
                meta_u(ct, &p("vocab_size")).ok_or_else(|| anyhow!("{}: cannot tell vocab size", file.display()))?
            }
        };
        let name = ct
            .metadata
            .get("general.name")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_else(|| file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default());
        let eps_key = if matches!(arch, Arch::Gpt2 | Arch::GptNeox) {
            "attention.layer_norm_epsilon"
        } else {
            "attention.layer_norm_rms_epsilon"
        };
        let cfg = Self {
            arch,
            name,
            n_layers: need("block_count")?,
            d_model,
            n_heads,
            n_kv_heads: meta_u(ct, &p("attention.head_count_kv")).unwrap_or(n_heads),
            // Qwen3's heads are wider than d_model / n_heads; llama.cpp records them as key_length
            head_dim: meta_u(ct, &p("attention.key_length"))
                .or_else(|| meta_u(ct, &p("rope.dimension_count")).filter(|_| arch == Arch::Llama))
                .unwrap_or(d_model / n_heads.max(1)),
            d_ff: need("feed_forward_length")?,
            vocab_size,
            max_positions: need("context_length")?,
            rope_theta: meta_f(ct, &p("rope.freq_base")).unwrap_or(10_000.0),
            norm_eps: meta_f(ct, &p(eps_key)).unwrap_or(1e-5) as f32,
            rope_interleaved,
            details: ArchDetails::plain(0),
        };
        let mut details = ArchDetails::plain(cfg.head_dim);
        if arch == Arch::GptNeox {
            // the rotating share of each head, and whether attention and MLP read the same stream
            details.rotary_dims = meta_u(ct, &p("rope.dimension_count")).unwrap_or(cfg.head_dim);
            details.parallel_residual =
                ct.metadata.get(&p("use_parallel_residual")).and_then(|v| v.to_bool().ok()).unwrap_or(true);
            // GGUF records no activation; Pythia's config says "gelu", the exact (erf) one transformers runs
            // (llama.cpp itself runs the tanh approximation, 2e-4 off after one MLP)
            details.gelu_exact = true;
        }
        if matches!(arch, Arch::Gemma2 | Arch::Gemma3) {
            details = gguf_gemma_details(ct, &cfg, &p, details).with_context(|| file.display().to_string())?;
        }
        if arch == Arch::Phi3 {
            // as transformers does, a Phi-3 sliding window masks every layer
            details.sliding_window = meta_u(ct, &p("attention.sliding_window"));
            if details.sliding_window.is_some() {
                details.sliding_layers = vec![true; cfg.n_layers];
            }
        }
        let cfg = Self { details, ..cfg };
        cfg.validate(file)?;
        Ok(cfg)
    }

    /// The config a Hugging Face `config.json` declares, checked.
    pub(crate) fn from_hf_config(path: &Path) -> Result<Self> {
        let s = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&s).with_context(|| format!("{}: invalid JSON", path.display()))?;
        let model_type = v.get("model_type").and_then(|m| m.as_str()).unwrap_or("");
        let arch = match model_type {
            "llama" | "mistral" | "qwen2" => Arch::Llama,
            "gpt2" => Arch::Gpt2,
            "qwen3" => Arch::Qwen3,
            "phi3" => Arch::Phi3,
            "gemma2" => Arch::Gemma2,
            "gemma3_text" => Arch::Gemma3,
            "gpt_neox" => Arch::GptNeox,
            other => bail!(
                "{}: unsupported model_type '{other}' (supported: llama, mistral, qwen2, qwen3, phi3, gemma2, \
                 gemma3_text, gpt_neox, gpt2)",
                path.display()
            ),
        };
        let u = |keys: &[&str]| keys.iter().find_map(|k| v.get(*k).and_then(|x| x.as_u64()).map(|x| x as usize));
        let need = |keys: &[&str]| u(keys).ok_or_else(|| anyhow!("{}: config has no '{}'", path.display(), keys[0]));
        let d_model = need(&["hidden_size", "n_embd"])?;
        let n_heads = need(&["num_attention_heads", "n_head"])?;
        let f = |keys: &[&str]| keys.iter().find_map(|k| v.get(*k).and_then(|x| x.as_f64()));
        let name = path
            .parent()
            .and_then(|p| p.file_name())
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| model_type.to_string());
        let head_dim = u(&["head_dim"]).unwrap_or(d_model / n_heads.max(1));
        let rope = hf_rope(&v, arch);
        let cfg = Self {
            arch,
            name,
            n_layers: need(&["num_hidden_layers", "n_layer"])?,
            d_model,
            n_heads,
            n_kv_heads: u(&["num_key_value_heads"]).unwrap_or(n_heads),
            head_dim,
            d_ff: u(&["intermediate_size", "n_inner"]).unwrap_or(d_model.saturating_mul(4)),
            vocab_size: need(&["vocab_size"])?,
            max_positions: need(&["max_position_embeddings", "n_positions"])?,
            rope_theta: rope.global_theta.unwrap_or(10_000.0),
            norm_eps: f(&["rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps"]).unwrap_or(1e-5) as f32,
            rope_interleaved: false,
            details: ArchDetails::plain(head_dim),
        };
        let details = hf_details(&v, &cfg, rope, path)?;
        let cfg = Self { details, ..cfg };
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn validate(&self, file: &Path) -> Result<()> {
        let bad = |what: String| Err(anyhow!("{}: inconsistent model config: {what}", file.display()));
        if self.n_layers == 0 || self.d_model == 0 || self.n_heads == 0 || self.vocab_size == 0 {
            return bad("zero layers, width, heads or vocabulary".into());
        }
        // Products of these size buffers before any tensor is read; no real model comes near.
        let dims = [
            ("layers", self.n_layers),
            ("width", self.d_model),
            ("heads", self.n_heads),
            ("head_dim", self.head_dim),
            ("feed-forward width", self.d_ff),
            ("vocabulary", self.vocab_size),
        ];
        if let Some((what, n)) = dims.iter().find(|(_, n)| *n > MAX_DIM) {
            return bad(format!("{what} {n} is larger than {MAX_DIM}"));
        }
        if self.max_positions == 0 {
            return bad("context length 0".into());
        }
        if self.n_kv_heads == 0 || !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(format!("{} heads cannot share {} key/value heads", self.n_heads, self.n_kv_heads));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim {} is odd", self.head_dim));
        }
        let rot = self.details.rotary_dims;
        if rot > self.head_dim || !rot.is_multiple_of(2) {
            return bad(format!("{rot} rotary dimensions do not fit head_dim {}", self.head_dim));
        }
        if !self.details.sliding_layers.is_empty() && self.details.sliding_layers.len() != self.n_layers {
            return bad(format!("{} layer types for {} layers", self.details.sliding_layers.len(), self.n_layers));
        }
        if self.details.sliding_layers.iter().any(|&s| s) && self.details.sliding_window.unwrap_or(0) == 0 {
            return bad("sliding-window layers without a positive sliding_window".into());
        }
        Ok(())
    }

    /// Width of all query heads together (`n_heads * head_dim`).
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Width of all key (or value) heads together (`n_kv_heads * head_dim`).
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

/// The rotary bases a Hugging Face config states, in either of transformers' spellings: `rope_theta` /
/// `rope_local_base_freq` / `rope_scaling` (up to 4.x) or `rope_parameters` (per layer type in 5.x).
struct HfRope {
    global_theta: Option<f64>,
    local_theta: Option<f64>,
    /// `(rope_type, factor)` of the global layers.
    scaling: Option<(String, f64)>,
}

fn hf_rope(v: &serde_json::Value, arch: Arch) -> HfRope {
    let num = |o: &serde_json::Value, k: &str| o.get(k).and_then(|x| x.as_f64());
    let scaling_of = |o: &serde_json::Value| {
        let ty = o.get("rope_type").or_else(|| o.get("type")).and_then(|t| t.as_str())?;
        Some((ty.to_string(), num(o, "factor").unwrap_or(1.0)))
    };
    let params = v.get("rope_parameters").filter(|p| p.is_object());
    let (global, local) = match params {
        Some(p) if p.get("full_attention").is_some() => (p.get("full_attention"), p.get("sliding_attention")),
        Some(p) => (Some(p), None),
        None => (None, None),
    };
    let legacy_scaling = v.get("rope_scaling").filter(|s| s.is_object()).and_then(scaling_of);
    HfRope {
        global_theta: num(v, "rope_theta")
            .or_else(|| num(v, "rotary_emb_base"))
            .or_else(|| global.and_then(|g| num(g, "rope_theta"))),
        local_theta: num(v, "rope_local_base_freq")
            .or_else(|| local.and_then(|l| num(l, "rope_theta")))
            .filter(|_| arch == Arch::Gemma3),
        scaling: legacy_scaling.or_else(|| global.and_then(scaling_of)),
    }
}

/// The per-architecture fields of a Hugging Face config; refuses settings saekit would silently get wrong.
fn hf_details(v: &serde_json::Value, cfg: &ModelConfig, rope: HfRope, path: &Path) -> Result<ArchDetails> {
    let f = |k: &str| v.get(k).and_then(|x| x.as_f64());
    // transformers 5 moved `partial_rotary_factor` into `rope_parameters`.
    let partial_rotary = f("rotary_pct")
        .or_else(|| f("partial_rotary_factor"))
        .or_else(|| v.get("rope_parameters").and_then(|r| r.get("partial_rotary_factor")).and_then(|x| x.as_f64()));
    let mut d = ArchDetails::plain(cfg.head_dim);
    match rope.scaling {
        None => {}
        Some((ty, _)) if ty == "default" => {}
        Some((ty, factor)) if ty == "linear" => d.rope_linear_factor = Some(factor),
        Some((ty, _)) => bail!("{}: rope scaling '{ty}' is not supported (supported: default, linear)", path.display()),
    }
    let act = v.get("hidden_activation").or_else(|| v.get("hidden_act")).and_then(|a| a.as_str()).unwrap_or("");
    match cfg.arch {
        Arch::Gemma2 | Arch::Gemma3 => {
            if !matches!(act, "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" | "") {
                bail!("{}: Gemma MLP activation '{act}' is not supported (gelu_pytorch_tanh)", path.display());
            }
            d.query_pre_attn_scalar = Some(f("query_pre_attn_scalar").unwrap_or(cfg.head_dim as f64));
            d.attn_softcap = f("attn_logit_softcapping").map(|c| c as f32);
            d.final_softcap = f("final_logit_softcapping").map(|c| c as f32);
            d.sliding_window = v.get("sliding_window").and_then(|x| x.as_u64()).map(|w| w as usize);
            d.rope_local_theta = rope.local_theta;
            d.sliding_layers = layer_types(v, cfg, path)?;
        }
        Arch::GptNeox => {
            let pct = partial_rotary.unwrap_or(1.0);
            d.rotary_dims = (cfg.head_dim as f64 * pct) as usize;
            d.parallel_residual = v.get("use_parallel_residual").and_then(|p| p.as_bool()).unwrap_or(true);
            d.gelu_exact = match act {
                "gelu" => true,
                "gelu_new" | "gelu_fast" | "gelu_pytorch_tanh" => false,
                other => bail!("{}: GPT-NeoX activation '{other}' is not supported (gelu, gelu_new)", path.display()),
            };
        }
        Arch::Qwen3 if v.get("use_sliding_window").and_then(|s| s.as_bool()) == Some(true) => {
            bail!("{}: Qwen3 with use_sliding_window is not supported", path.display())
        }
        Arch::Phi3 => {
            if partial_rotary.is_some_and(|p| p != 1.0) {
                bail!("{}: Phi-3 with partial_rotary_factor != 1 is not supported", path.display());
            }
            // transformers masks every Phi-3 layer with `sliding_window` when the config sets one.
            d.sliding_window = v.get("sliding_window").and_then(|x| x.as_u64()).map(|w| w as usize);
            if d.sliding_window.is_some() {
                d.sliding_layers = vec![true; cfg.n_layers];
            }
        }
        _ => {}
    }
    Ok(d)
}

/// Which layers use the sliding window: `layer_types` when the config lists them, else the published
/// pattern (Gemma 2: every other layer from the first; Gemma 3: all but every `sliding_window_pattern`-th).
fn layer_types(v: &serde_json::Value, cfg: &ModelConfig, path: &Path) -> Result<Vec<bool>> {
    if let Some(types) = v.get("layer_types").and_then(|t| t.as_array()) {
        return types
            .iter()
            .map(|t| match t.as_str() {
                Some("sliding_attention") => Ok(true),
                Some("full_attention") => Ok(false),
                _ => Err(anyhow!("{}: unknown layer type {t} in layer_types", path.display())),
            })
            .collect();
    }
    let pattern = match cfg.arch {
        Arch::Gemma2 => 2,
        _ => v.get("sliding_window_pattern").and_then(|p| p.as_u64()).unwrap_or(6) as usize,
    };
    Ok((0..cfg.n_layers).map(|l| !(l + 1).is_multiple_of(pattern.max(1))).collect())
}
