//! The architecture description of a model, read from GGUF metadata or a Hugging Face `config.json`.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Llama-family decoders: Llama 2/3, Mistral, SmolLM/SmolLM2, Qwen2 (with q/k/v biases).
    Llama,
    Gpt2,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelConfig {
    pub arch: Arch,
    /// A short human name (`general.name` or the folder name).
    pub name: String,
    pub n_layers: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub d_ff: usize,
    pub vocab_size: usize,
    pub max_positions: usize,
    pub rope_theta: f64,
    pub norm_eps: f32,
    /// GGUF llama weights have Q/K rows permuted for the interleaved rotary embedding.
    pub rope_interleaved: bool,
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

impl ModelConfig {
    pub fn from_gguf(ct: &gguf_file::Content, file: &Path) -> Result<Self> {
        let arch_name = ct
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .ok_or_else(|| anyhow!("{}: GGUF metadata has no general.architecture", file.display()))?;
        let arch = match arch_name.as_str() {
            "llama" | "mistral" | "qwen2" => Arch::Llama,
            "gpt2" => Arch::Gpt2,
            other => {
                bail!("{}: unsupported architecture '{other}' (supported: llama, mistral, qwen2, gpt2)", file.display())
            }
        };
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
        let eps_key =
            if arch == Arch::Gpt2 { "attention.layer_norm_epsilon" } else { "attention.layer_norm_rms_epsilon" };
        let cfg = Self {
            arch,
            name,
            n_layers: need("block_count")?,
            d_model,
            n_heads,
            n_kv_heads: meta_u(ct, &p("attention.head_count_kv")).unwrap_or(n_heads),
            head_dim: meta_u(ct, &p("rope.dimension_count"))
                .filter(|_| arch == Arch::Llama)
                .unwrap_or(d_model / n_heads.max(1)),
            d_ff: need("feed_forward_length")?,
            vocab_size,
            max_positions: need("context_length")?,
            rope_theta: meta_f(ct, &p("rope.freq_base")).unwrap_or(10_000.0),
            norm_eps: meta_f(ct, &p(eps_key)).unwrap_or(1e-5) as f32,
            rope_interleaved: true,
        };
        cfg.validate(file)?;
        Ok(cfg)
    }

    pub fn from_hf_config(path: &Path) -> Result<Self> {
        let s = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&s).with_context(|| format!("{}: invalid JSON", path.display()))?;
        let model_type = v.get("model_type").and_then(|m| m.as_str()).unwrap_or("");
        let arch = match model_type {
            "llama" | "mistral" | "qwen2" => Arch::Llama,
            "gpt2" => Arch::Gpt2,
            other => {
                bail!("{}: unsupported model_type '{other}' (supported: llama, mistral, qwen2, gpt2)", path.display())
            }
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
        let cfg = Self {
            arch,
            name,
            n_layers: need(&["num_hidden_layers", "n_layer"])?,
            d_model,
            n_heads,
            n_kv_heads: u(&["num_key_value_heads"]).unwrap_or(n_heads),
            head_dim: u(&["head_dim"]).unwrap_or(d_model / n_heads.max(1)),
            d_ff: u(&["intermediate_size", "n_inner"]).unwrap_or(4 * d_model),
            vocab_size: need(&["vocab_size"])?,
            max_positions: need(&["max_position_embeddings", "n_positions"])?,
            rope_theta: f(&["rope_theta"])
                .or_else(|| v.get("rope_parameters").and_then(|r| r.get("rope_theta")).and_then(|x| x.as_f64()))
                .unwrap_or(10_000.0),
            norm_eps: f(&["rms_norm_eps", "layer_norm_epsilon"]).unwrap_or(1e-5) as f32,
            rope_interleaved: false,
        };
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
        Ok(())
    }

    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}
