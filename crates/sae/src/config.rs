//! Architecture and training configuration, with each published recipe as the default.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Which sparse autoencoder is trained. The string forms are the `--arch` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Gao et al. 2024: ReLU then keep the k largest latents per token; AuxK on dead latents.
    TopK,
    /// Top k*batch over the whole batch while training; a learned global threshold at inference.
    BatchTopK,
    /// Rajamanoharan et al. 2024: per-latent threshold, straight-through estimator, L0 penalty.
    JumpRelu,
    /// Anthropic April-2024: ReLU, L1 penalty weighted by decoder row norms.
    Relu,
}

impl Arch {
    /// Parse an `--arch` value (`standard` and `relu_l1` are SAELens' names for ReLU).
    pub fn parse(s: &str) -> Result<Arch> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "topk" => Arch::TopK,
            "batchtopk" => Arch::BatchTopK,
            "jumprelu" => Arch::JumpRelu,
            "relu" | "standard" | "relu_l1" => Arch::Relu,
            other => bail!("unknown architecture {other:?}: expected topk, batchtopk, jumprelu or relu"),
        })
    }
    /// The `--arch` value.
    pub fn name(self) -> &'static str {
        match self {
            Arch::TopK => "topk",
            Arch::BatchTopK => "batchtopk",
            Arch::JumpRelu => "jumprelu",
            Arch::Relu => "relu",
        }
    }
}

/// JumpReLU sparsity penalty (SAELens `jumprelu_sparsity_loss_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum JumpReluSparsity {
    #[default]
    /// DeepMind's λ·L0 through a straight-through estimator.
    Step,
    /// Anthropic's λ·Σ tanh(c·a‖W_dec‖).
    Tanh,
    /// Gemma Scope 2's λ·2/L0*·(L0 − L0*)².
    Quadratic,
}

impl JumpReluSparsity {
    /// Parse a `jumprelu_sparsity_loss_mode` value.
    pub fn parse(s: &str) -> Result<JumpReluSparsity> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "step" => JumpReluSparsity::Step,
            "tanh" => JumpReluSparsity::Tanh,
            "quadratic" => JumpReluSparsity::Quadratic,
            other => bail!("unknown JumpReLU sparsity loss {other:?}: expected step, tanh or quadratic"),
        })
    }
}

/// How b_dec starts (`b_dec_init`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BDecInit {
    /// The mean of the rows read ahead (after outlier exclusion and scaling).
    #[default]
    Mean,
    /// Their geometric median (Weiszfeld; OpenAI's pre-bias init), on up to 8,192 rows.
    GeometricMedian,
    /// Zeros.
    Zeros,
}

/// Every training knob. Fields left at `None` take the recipe default of the chosen architecture
/// (see [`TrainConfig::resolved`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    // ---- data ----
    /// `.npy` file [N, d_in] float32, or an activation store folder, with the training activations.
    /// (Rows computed live by a model are the caller's business: see [`ConfigFile::source`].)
    pub acts: Option<String>,
    /// Output folder (SAELens v6 layout + checkpoints/ + metrics.jsonl).
    pub out: String,
    /// Training tokens (rows). Accepts plain integers; the CLI also accepts 2M / 500k.
    pub tokens: u64,
    /// Rows per optimiser step.
    pub batch_size: usize,
    /// Exclude rows whose L2 norm exceeds this multiple of the median norm measured on the first
    /// `norm_estimate_rows` rows (attention sinks: position 0 and `<|endoftext|>`). 0 disables.
    pub outlier_norm_factor: f32,
    /// Rows used to estimate the median norm, the input scale and the b_dec init.
    pub norm_estimate_rows: usize,
    /// Scale inputs by one dataset-wide scalar so that E||x||^2 = d_in (folded into the saved weights).
    pub normalize_inputs: bool,
    // ---- model ----
    /// Which SAE.
    pub arch: Arch,
    /// Width of the activations (checked against the data; default: the data's).
    pub d_in: Option<usize>,
    /// Number of latents.
    pub d_sae: usize,
    /// TopK / BatchTopK: latents kept per row.
    pub k: usize,
    /// Multi-TopK: extra reconstruction loss at 4k latents with weight 1/8 (topk only).
    pub multi_topk: bool,
    /// A transcoder's learned linear skip connection `W_skip [d_out, d_in]` (SAELens'
    /// `SkipTranscoder`; zero at the start). Transcoders only.
    pub skip: bool,
    /// AuxK coefficient (topk/batchtopk); 0 disables.
    pub auxk_alpha: Option<f32>,
    /// Latents that fired on no token in this many tokens are dead (AuxK, dead %).
    pub dead_tokens: u64,
    /// Keep decoder rows at unit norm and remove the gradient component parallel to them.
    pub unit_norm_decoder: Option<bool>,
    /// b_dec init: "mean" (data mean of the estimate rows), "geometric_median" or "zeros".
    pub b_dec_init: BDecInit,
    // ---- jumprelu ----
    /// Initial JumpReLU threshold of every latent.
    pub jumprelu_init_threshold: f32,
    /// Width ε of JumpReLU's rectangle kernel.
    pub jumprelu_bandwidth: f32,
    /// λ of JumpReLU's sparsity penalty.
    pub l0_coefficient: f32,
    /// "step" (DeepMind's L0), "tanh" (Anthropic's λ·Σ tanh(c·a‖W_dec‖)) or "quadratic" (Gemma
    /// Scope 2's penalty around `target_l0`), as SAELens' `jumprelu_sparsity_loss_mode`.
    pub jumprelu_sparsity_loss_mode: JumpReluSparsity,
    /// c of the tanh penalty.
    pub jumprelu_tanh_scale: f32,
    /// Target L0 of the quadratic penalty (required by it).
    pub target_l0: Option<f32>,
    /// Anthropic's pre-activation loss on dead latents, λ_p·Σ ReLU(θ − pre)‖W_dec‖ (3e-6 in their setup).
    pub pre_act_loss_coefficient: Option<f32>,
    /// Straight-through gradients also reach the pre-activations (Anthropic), not only θ (DeepMind).
    pub jumprelu_ste_to_input: bool,
    // ---- relu ----
    /// λ of ReLU's L1 penalty (on a·‖W_dec‖).
    pub l1_coefficient: f32,
    /// Take the sparse step (decoder and backward over the active latents only) for batches whose
    /// mean L0 is below this fraction of d_sae; 0 keeps the dense GEMMs. The dense step costs ~5
    /// encoder GEMMs whatever L0 is, and the sparse one overtakes it near L0 = d_sae/13
    /// (BENCHMARKS.md, d_sae 4096, batch 4096). Either path gives the same gradients.
    pub relu_sparse_below: f32,
    /// Fraction of steps over which the sparsity coefficient (L1 / L0) warms up linearly from 0.
    pub sparsity_warmup_frac: Option<f32>,
    /// Norm of the initial decoder rows (default: the architecture's recipe).
    pub decoder_init_norm: Option<f32>,
    // ---- batchtopk ----
    /// Rate of BatchTopK's threshold EMA.
    pub topk_threshold_lr: f32,
    // ---- optimiser ----
    /// Learning rate (default: the architecture's recipe).
    pub lr: Option<f32>,
    /// Adam β1.
    pub adam_beta1: f32,
    /// Adam β2.
    pub adam_beta2: f32,
    /// Adam ε.
    pub adam_eps: f32,
    /// Steps of linear lr warm-up (default: the recipe's, at most a tenth of the run).
    pub lr_warmup_steps: Option<u64>,
    /// Fraction of steps at the end over which lr decays linearly to 0.
    pub lr_decay_frac: Option<f32>,
    /// Clip the global gradient norm to this value (0 = off).
    pub grad_clip: Option<f32>,
    // ---- run ----
    /// Seed of the initialisation and of the data order.
    pub seed: u64,
    /// Threads (0 = the caller's rayon pool); results do not depend on it.
    pub threads: usize,
    /// Precision of the encoder GEMM: `f32`, `bf16` (AMX or AVX512-BF16, f32 accumulation; an error
    /// on a CPU without either) or `auto` (bf16 where this CPU runs it at least 1.3x faster). Adam's
    /// state, the decoder, the gradients and every reduction stay f32. `saekit train` defaults to
    /// `auto`; unset here means f32.
    pub precision: Option<String>,
    /// Steps between metrics.jsonl lines.
    pub log_every: u64,
    /// Steps between checkpoints (0 = none).
    pub checkpoint_every: u64,
    // ---- metadata written to cfg.json ----
    /// The model the activations came from (from the data source).
    pub model_name: String,
    /// The hook point they were read at (TransformerLens name); a transcoder's input.
    pub hook_name: String,
    /// A transcoder's target: the hook point whose activation it reconstructs from `hook_name`'s
    /// (e.g. `blocks.L.hook_mlp_out` from `blocks.L.ln2.hook_normalized`). Empty: an SAE, which
    /// reconstructs its input.
    pub hook_name_out: String,
    /// Tokens per context of the data.
    pub context_size: usize,
    /// Whether the contexts began with BOS.
    pub prepend_bos: bool,
    /// Where the data came from (default: `acts`).
    pub dataset_path: String,
    /// Fingerprint of the vocabulary that made the training tokens (from the data source).
    pub tokenizer_fingerprint: String,
    /// Which rows the data source left out as attention sinks (from the data source).
    pub sink_rule: String,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            acts: None,
            out: "sae-out".into(),
            tokens: 2_000_000,
            batch_size: 4096,
            outlier_norm_factor: 10.0,
            norm_estimate_rows: 65536,
            normalize_inputs: true,
            arch: Arch::TopK,
            d_in: None,
            d_sae: 16384,
            k: 32,
            multi_topk: false,
            skip: false,
            auxk_alpha: None,
            dead_tokens: 10_000_000,
            unit_norm_decoder: None,
            b_dec_init: BDecInit::Mean,
            jumprelu_init_threshold: 0.01,
            jumprelu_bandwidth: 0.05,
            l0_coefficient: 1.0,
            jumprelu_sparsity_loss_mode: JumpReluSparsity::Step,
            jumprelu_tanh_scale: 4.0,
            target_l0: None,
            pre_act_loss_coefficient: None,
            jumprelu_ste_to_input: false,
            l1_coefficient: 5.0,
            relu_sparse_below: 1.0 / 16.0,
            sparsity_warmup_frac: None,
            decoder_init_norm: None,
            topk_threshold_lr: 0.01,
            lr: None,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            precision: None,
            lr_warmup_steps: None,
            lr_decay_frac: None,
            grad_clip: None,
            seed: 0,
            threads: 0,
            log_every: 10,
            checkpoint_every: 100,
            // unknown unless the data source names it (a bare .npy does not): never a guess
            model_name: String::new(),
            hook_name: "blocks.15.hook_resid_post".into(),
            hook_name_out: String::new(),
            context_size: 128,
            prepend_bos: false,
            dataset_path: String::new(),
            tokenizer_fingerprint: String::new(),
            sink_rule: String::new(),
        }
    }
}

/// A config file (or a checkpoint's config): the trainer's keys, and the keys of the data source the
/// caller opened, which this crate does not own (`saekit train --live`'s model, contexts, split...).
/// The trainer stores the source's keys with its checkpoints and `train_config.toml` so that the
/// caller can reopen the same source on `--resume`; it never reads them.
#[derive(Debug, Clone, Default)]
pub struct ConfigFile {
    /// The trainer's keys.
    pub train: TrainConfig,
    /// The data source's keys, as written.
    pub source: toml::Table,
}

impl ConfigFile {
    /// Read the TOML file `path`: keys in `source_keys` go to [`ConfigFile::source`], every other key
    /// must be a [`TrainConfig`] field. Errors are one line naming the file.
    pub fn read(path: &str, source_keys: &[&str]) -> Result<ConfigFile> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config {path}"))?;
        let mut table: toml::Table = toml::from_str(&text).map_err(|e| toml_error(path, &text, &e))?;
        let source = source_keys.iter().filter_map(|k| Some((k.to_string(), table.remove(*k)?))).collect();
        let train = TrainConfig::deserialize(toml::Value::Table(table))
            .map_err(|e| anyhow::anyhow!("parsing config {path}: {}", one_line(e.message())))?;
        Ok(ConfigFile { train, source })
    }

    /// Both parts as one TOML document (`train_config.toml`: a valid `--config` for the same run).
    pub fn to_toml(&self) -> String {
        let mut text = self.train.to_toml();
        if !self.source.is_empty() {
            let source = toml::to_string_pretty(&self.source).unwrap_or_default();
            // the source's keys are top-level keys: they go before the trainer's first [table], if any
            text = format!("{source}{text}");
        }
        text
    }
}

/// toml's own message draws the offending line over several lines; errors here are one line.
fn toml_error(path: &str, text: &str, e: &toml::de::Error) -> anyhow::Error {
    let at = e.span().map(|s| {
        let before = &text.as_bytes()[..s.start.min(text.len())];
        let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
        format!(" (line {line})")
    });
    anyhow::anyhow!("parsing config {path}: {}{}", one_line(e.message()), at.unwrap_or_default())
}

fn one_line(msg: &str) -> String {
    msg.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The configuration with every recipe default filled in.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Resolved {
    /// Peak learning rate.
    pub lr: f32,
    /// AuxK coefficient.
    pub auxk_alpha: f32,
    /// Unit-norm decoder rows.
    pub unit_norm_decoder: bool,
    /// Steps over which the sparsity coefficient warms up from 0.
    pub sparsity_warmup_steps: u64,
    /// Norm of the initial decoder rows.
    pub decoder_init_norm: f32,
    /// Steps of linear lr warm-up.
    pub lr_warmup_steps: u64,
    /// Steps of linear lr decay to 0 at the end.
    pub lr_decay_steps: u64,
    /// Global gradient-norm clip (0 = off).
    pub grad_clip: f32,
    /// Steps of the run.
    pub total_steps: u64,
}

impl TrainConfig {
    /// Read a TOML config holding only this crate's keys; errors are one line naming the file (and
    /// the line, for a syntax error).
    pub fn from_toml_file(path: &str) -> Result<TrainConfig> {
        Ok(ConfigFile::read(path, &[])?.train)
    }

    /// The input path read from the config file `config` must exist: a typo is reported against the
    /// config that holds it, not later as a bare "no such file".
    pub fn check_paths(&self, config: &str) -> Result<()> {
        if let Some(p) = self.acts.as_deref().filter(|p| !std::path::Path::new(p).exists()) {
            anyhow::bail!("config {config}: acts = {p:?} does not exist");
        }
        Ok(())
    }

    /// The config as TOML (`--print-config`, `train_config.toml`).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render config: {e}"))
    }

    /// Rows the trainer reads ahead (then seeks back over) to fix the outlier threshold, the input
    /// scale and the b_dec init.
    pub fn prepare_rows(&self) -> usize {
        self.norm_estimate_rows.max(self.batch_size.min(4096)).max(1)
    }

    /// Take the metadata of the rows from their source: an SAE is labelled with the model, hook and
    /// tokens its data came from, never with a default the data contradicts.
    pub fn with_provenance(mut self, p: &crate::source::Provenance) -> TrainConfig {
        let set = |field: &mut String, v: &str| {
            if !v.is_empty() {
                *field = v.to_string();
            }
        };
        set(&mut self.model_name, &p.model_name);
        set(&mut self.hook_name, &p.hook_name);
        set(&mut self.hook_name_out, &p.hook_name_out);
        set(&mut self.tokenizer_fingerprint, &p.tokenizer_fingerprint);
        set(&mut self.sink_rule, &p.sink_rule);
        if let Some(c) = p.context_size {
            self.context_size = c;
        }
        self
    }

    /// Fields (TOML names) where `self` and `other` differ, ignoring where files live (paths may move;
    /// resumes compare the data by content) and the thread count (results do not depend on it).
    pub fn differing_fields(&self, other: &TrainConfig) -> Vec<String> {
        const IGNORED: [&str; 4] = ["acts", "out", "threads", "dataset_path"];
        let (a, b) = (serde_json::to_value(self), serde_json::to_value(other));
        let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) = (a, b) else {
            return vec!["(unserializable config)".into()];
        };
        a.iter()
            .filter(|(k, v)| !IGNORED.contains(&k.as_str()) && b.get(*k) != Some(*v))
            .map(|(k, v)| format!("{k} = {v} vs {}", b.get(k).cloned().unwrap_or_default()))
            .collect()
    }

    /// Steps of the run: whole batches of `tokens`.
    pub fn total_steps(&self) -> u64 {
        self.tokens / self.batch_size.max(1) as u64
    }

    /// Fill recipe defaults. TopK/BatchTopK follow sparsify/OpenAI (lr 2e-4/sqrt(d_sae/2^14),
    /// AuxK 1/32, unit-norm decoder, 1000 warm-up steps); ReLU follows Anthropic April 2024
    /// (lr 5e-5, L1 warm-up 5%, lr decay over the last 20%, clip 1, decoder init norm 0.1);
    /// JumpReLU follows Gemma Scope / SAELens (lr 7e-5, L0 warm-up 10%, decay 20%, clip 1).
    pub fn resolved(&self) -> Resolved {
        let steps = self.total_steps();
        let sc = (self.d_sae as f32 / 16384.0).sqrt();
        let (lr, auxk, unit, warm_frac, init_norm, lr_warm, decay, clip) = match self.arch {
            Arch::TopK | Arch::BatchTopK => (2e-4 / sc, 1.0 / 32.0, true, 0.0, 1.0, 1000, 0.0, 0.0),
            Arch::Relu => (5e-5, 0.0, false, 0.05, 0.1, 0, 0.2, 1.0),
            Arch::JumpRelu => (7e-5, 0.0, false, 0.1, 0.1, 1000, 0.2, 1.0),
        };
        let lr_warmup_steps = self.lr_warmup_steps.unwrap_or(lr_warm).min(steps / 10);
        Resolved {
            lr: self.lr.unwrap_or(lr),
            auxk_alpha: self.auxk_alpha.unwrap_or(auxk),
            unit_norm_decoder: self.unit_norm_decoder.unwrap_or(unit),
            sparsity_warmup_steps: (self.sparsity_warmup_frac.unwrap_or(warm_frac) as f64 * steps as f64).round()
                as u64,
            decoder_init_norm: self.decoder_init_norm.unwrap_or(init_norm),
            lr_warmup_steps,
            lr_decay_steps: (self.lr_decay_frac.unwrap_or(decay) as f64 * steps as f64).round() as u64,
            grad_clip: self.grad_clip.unwrap_or(clip),
            total_steps: steps,
        }
    }
}

impl TrainConfig {
    /// Bytes a run of this config holds at once on `d_in`-wide rows: the SAE and its two Adam moments,
    /// a batch's dense buffers, the read-ahead rows and the per-latent counters. An estimate (within
    /// ~2x), enough to refuse a config that cannot fit before allocating it.
    pub fn memory_estimate(&self, d_in: usize) -> u128 {
        let (d, n, b) = (d_in as u128, self.d_sae as u128, self.batch_size as u128);
        let params = 2 * n * d + 2 * n + d;
        3 * params * 4 + b * (4 * d + 2 * n) * 4 + self.prepare_rows() as u128 * d * 4 + n * 8 * 3
    }

    /// Refuse a run that needs more memory than `budget` bytes before anything is allocated.
    pub fn check_memory(&self, d_in: usize, budget: Option<u64>) -> Result<(), crate::SaeError> {
        let need = self.memory_estimate(d_in);
        match budget {
            Some(have) if need > have as u128 => Err(crate::SaeError::config(
                "d_sae",
                format!(
                    "d_sae {} x d_in {d_in} with batch_size {} needs about {:.1} GiB; {:.1} GiB are available (SAEKIT_MAX_MEMORY or free memory)",
                    self.d_sae,
                    self.batch_size,
                    need as f64 / (1u64 << 30) as f64,
                    have as f64 / (1u64 << 30) as f64
                ),
            )),
            _ => Ok(()),
        }
    }
}

/// The memory a run may use: `SAEKIT_MAX_MEMORY` (a count such as 512M or 8G, in bytes) when set,
/// else the kernel's MemAvailable; `None` when neither can be read.
pub fn memory_budget() -> Option<u64> {
    if let Ok(v) = std::env::var("SAEKIT_MAX_MEMORY") {
        return parse_count(&v).ok();
    }
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

impl Resolved {
    /// Learning rate at `step` (0-based): linear warm-up, constant, linear decay to 0 at the end.
    pub fn lr_at(&self, step: u64) -> f32 {
        let mut f = 1.0f64;
        if self.lr_warmup_steps > 0 && step < self.lr_warmup_steps {
            f = (step + 1) as f64 / self.lr_warmup_steps as f64;
        }
        if self.lr_decay_steps > 0 {
            let start = self.total_steps.saturating_sub(self.lr_decay_steps);
            if step >= start {
                let left = self.total_steps.saturating_sub(step) as f64;
                f = f.min(left / self.lr_decay_steps as f64);
            }
        }
        (self.lr as f64 * f) as f32
    }

    /// Multiplier of the sparsity coefficient at `step` (linear warm-up from 0).
    pub fn sparsity_scale_at(&self, step: u64) -> f32 {
        if self.sparsity_warmup_steps == 0 {
            1.0
        } else {
            ((step + 1) as f32 / self.sparsity_warmup_steps as f32).min(1.0)
        }
    }
}

/// "2M", "500k", "1.5M", "4096" -> tokens.
pub fn parse_count(s: &str) -> Result<u64> {
    let t = s.trim().replace('_', "");
    let (num, mul) = match t.chars().last() {
        Some('k') | Some('K') => (&t[..t.len() - 1], 1e3),
        Some('m') | Some('M') => (&t[..t.len() - 1], 1e6),
        Some('g') | Some('G') | Some('b') | Some('B') => (&t[..t.len() - 1], 1e9),
        _ => (&t[..], 1.0),
    };
    let v: f64 = num.parse().with_context(|| format!("not a count: {s:?} (try 2M, 500k, 4096)"))?;
    if v.is_nan() || v < 0.0 || !v.is_finite() {
        bail!("not a count: {s:?}");
    }
    Ok((v * mul).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn counts_and_schedule() {
        assert_eq!(parse_count("2M").unwrap(), 2_000_000);
        assert_eq!(parse_count("500k").unwrap(), 500_000);
        assert_eq!(parse_count("4096").unwrap(), 4096);
        assert!(parse_count("abc").is_err());
        let c = TrainConfig { arch: Arch::Relu, tokens: 100 * 4096, ..Default::default() };
        let r = c.resolved();
        assert_eq!(r.lr_decay_steps, 20);
        assert!((r.lr_at(0) - 5e-5).abs() < 1e-12);
        assert!(r.lr_at(99) < r.lr_at(80));
        assert_eq!(r.sparsity_warmup_steps, 5);
        let t = TrainConfig::default().resolved();
        assert!((t.lr - 2e-4).abs() < 1e-9);
        let s = TrainConfig::default().to_toml();
        let back: TrainConfig = toml::from_str(&s).unwrap();
        assert_eq!(back.d_sae, 16384);
    }
}
