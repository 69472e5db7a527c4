//! A [`TrainConfig`] checked once and resolved into what the trainer runs (ripgrep's
//! `HiArgs::from_low_args`): every setting validated in one place with an error that names it,
//! the recipe defaults filled in, each architecture's knobs in its own struct.

use crate::config::{Arch, BDecInit, JumpReluSparsity, Resolved, TrainConfig};
use crate::sae::{Activation, SaeMetadata};
use crate::step::{LossParams, UpdateParams};
use crate::{adam::AdamHyper, SaeError};
use saekit_kernels::{Precision, PrecisionChoice, PrecisionError};

/// TopK's settings (Gao et al. 2024).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TopKSettings {
    /// Latents kept per row.
    pub k: usize,
    /// AuxK coefficient (0 = off).
    pub auxk_alpha: f32,
    /// Add the Multi-TopK loss at 4k latents.
    pub multi_topk: bool,
}

/// BatchTopK's settings (Bussmann et al. 2024).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchTopKSettings {
    /// Latents kept per row on average over the batch.
    pub k: usize,
    /// AuxK coefficient (0 = off).
    pub auxk_alpha: f32,
    /// Rate of the EMA that learns the inference threshold.
    pub threshold_lr: f32,
}

/// JumpReLU's sparsity penalty, with the setting each one needs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum JumpReluPenalty {
    /// DeepMind's λ·L0.
    Step,
    /// Anthropic's λ·Σ tanh(c·a‖W_dec‖).
    Tanh {
        /// c.
        scale: f32,
    },
    /// Gemma Scope 2's λ·2/L0*·(L0 − L0*)².
    Quadratic {
        /// L0*.
        target_l0: f32,
    },
}

/// JumpReLU's settings (Rajamanoharan et al. 2024, as SAELens' `JumpReLUTrainingSAEConfig`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct JumpReluSettings {
    /// Initial threshold of every latent.
    pub init_threshold: f32,
    /// Width ε of the rectangle kernel.
    pub bandwidth: f32,
    /// λ of the sparsity penalty.
    pub l0_coefficient: f32,
    /// Which penalty.
    pub penalty: JumpReluPenalty,
    /// Anthropic's pre-activation loss coefficient (0 = off).
    pub pre_act_loss_coefficient: f32,
    /// Straight-through gradients also reach the pre-activations.
    pub ste_to_input: bool,
}

/// ReLU + L1's settings (Anthropic, April 2024).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReluSettings {
    /// λ of the L1 penalty.
    pub l1_coefficient: f32,
    /// Take the sparse step below this mean L0 (fraction of d_sae).
    pub sparse_below: f32,
}

/// The architecture with its own settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ArchSettings {
    /// See [`TopKSettings`].
    TopK(TopKSettings),
    /// See [`BatchTopKSettings`].
    BatchTopK(BatchTopKSettings),
    /// See [`JumpReluSettings`].
    JumpRelu(JumpReluSettings),
    /// See [`ReluSettings`].
    Relu(ReluSettings),
}

/// A validated training run: the config as given (what checkpoints and `train_config.toml` record)
/// and what follows from it.
#[derive(Debug, Clone)]
pub struct TrainPlan {
    /// The configuration, as given.
    pub config: TrainConfig,
    /// Width of the activations.
    pub d_in: usize,
    /// Width of the targets: `d_in` for an SAE, the output hook's width for a transcoder.
    pub d_out: usize,
    /// The architecture and its settings.
    pub arch: ArchSettings,
    /// Recipe defaults filled in: learning rate, schedules, clipping.
    pub schedule: Resolved,
    /// The encoder GEMM's precision on this CPU (`config.precision` resolved).
    pub precision: Precision,
}

fn check(ok: bool, field: &'static str, message: impl FnOnce() -> String) -> Result<(), SaeError> {
    if ok {
        Ok(())
    } else {
        Err(SaeError::config(field, message()))
    }
}

impl TrainPlan {
    /// Check `config` for activations `d_in` wide (and, for a transcoder, targets `d_out` wide:
    /// `None` when the rows are their own targets) against the memory `budget` (bytes; `None`:
    /// unknown) and resolve it.
    pub fn new(
        config: TrainConfig,
        d_in: usize,
        d_out: Option<usize>,
        budget: Option<u64>,
    ) -> Result<TrainPlan, SaeError> {
        let c = &config;
        Self::check_target(c, d_out)?;
        if let Some(di) = c.d_in {
            check(di == d_in, "d_in", || format!("{di} but the activations have {d_in} columns"))?;
        }
        check(c.d_sae > 0, "d_sae", || "must be positive".into())?;
        check(c.d_sae < u32::MAX as usize, "d_sae", || format!("{} is too large", c.d_sae))?;
        check(c.batch_size > 0, "batch_size", || "must be positive".into())?;
        check(c.tokens >= c.batch_size as u64, "tokens", || {
            format!("{} is less than batch_size ({}): nothing to train", c.tokens, c.batch_size)
        })?;
        check(c.threads <= 4096, "threads", || format!("{} is more than 4096", c.threads))?;
        let schedule = c.resolved();
        let arch = Self::arch_settings(c, &schedule)?;
        c.check_memory(d_in, budget)?;
        let precision = Self::resolve_precision(&config)?;
        // `auto` is a measurement: the checkpoints keep what it picked, so a resumed run (maybe on a
        // busier box) computes in the same precision and stays bit-identical
        let mut config = config;
        if config.precision.is_some() {
            config.precision = Some(precision.choice_name().into());
        }
        Ok(TrainPlan { schedule, config, d_in, d_out: d_out.unwrap_or(d_in), arch, precision })
    }

    /// `precision` on this CPU: unset is f32; `auto` measures once per process.
    pub(crate) fn resolve_precision(c: &TrainConfig) -> Result<Precision, SaeError> {
        let Some(choice) = c.precision.as_deref() else { return Ok(Precision::F32) };
        let choice: PrecisionChoice =
            choice.parse().map_err(|e: PrecisionError| SaeError::config("precision", e.to_string()))?;
        Precision::resolve(choice).map_err(|e| SaeError::config("precision", e.to_string()))
    }

    /// A transcoder names the hook its targets come from, and only a transcoder has targets or a
    /// skip connection.
    fn check_target(c: &TrainConfig, d_out: Option<usize>) -> Result<(), SaeError> {
        match (d_out, c.hook_name_out.is_empty()) {
            (Some(_), true) => Err(SaeError::config(
                "hook_name_out",
                "the data are (input, target) pairs but no target hook is named: set it to the hook the targets were read at (e.g. blocks.0.hook_mlp_out)",
            )),
            (None, false) => Err(SaeError::config(
                "hook_name_out",
                format!("{:?} names a transcoder's target, but the data source yields single rows; give it (input, target) pairs (saekit train --input-hook ... --target-hook ...)", c.hook_name_out),
            )),
            (Some(0), _) => Err(SaeError::config("hook_name_out", "the targets have no columns")),
            (None, true) if c.skip => Err(SaeError::config("skip", "a skip connection is for transcoders only (an SAE's would reconstruct its input by itself)")),
            _ => Ok(()),
        }
    }

    /// Whether this run trains a transcoder (targets from another hook than the inputs).
    pub fn is_transcoder(&self) -> bool {
        !self.config.hook_name_out.is_empty()
    }

    fn arch_settings(c: &TrainConfig, r: &Resolved) -> Result<ArchSettings, SaeError> {
        let k_checked = || -> Result<usize, SaeError> {
            check(c.k >= 1, "k", || "must be at least 1".into())?;
            check(c.k <= c.d_sae, "k", || format!("{} is larger than d_sae = {}", c.k, c.d_sae))?;
            Ok(c.k)
        };
        if c.arch != Arch::TopK {
            check(!c.multi_topk, "multi_topk", || "is only implemented for arch = \"topk\"".into())?;
        }
        Ok(match c.arch {
            Arch::TopK => {
                ArchSettings::TopK(TopKSettings { k: k_checked()?, auxk_alpha: r.auxk_alpha, multi_topk: c.multi_topk })
            }
            Arch::BatchTopK => ArchSettings::BatchTopK(BatchTopKSettings {
                k: k_checked()?,
                auxk_alpha: r.auxk_alpha,
                threshold_lr: c.topk_threshold_lr,
            }),
            Arch::JumpRelu => ArchSettings::JumpRelu(Self::jumprelu_settings(c)?),
            Arch::Relu => {
                ArchSettings::Relu(ReluSettings { l1_coefficient: c.l1_coefficient, sparse_below: c.relu_sparse_below })
            }
        })
    }

    fn jumprelu_settings(c: &TrainConfig) -> Result<JumpReluSettings, SaeError> {
        let bw = c.jumprelu_bandwidth;
        check(bw > 0.0, "jumprelu_bandwidth", || format!("must be > 0 (got {bw})"))?;
        let penalty = match c.jumprelu_sparsity_loss_mode {
            JumpReluSparsity::Step => JumpReluPenalty::Step,
            JumpReluSparsity::Tanh => JumpReluPenalty::Tanh { scale: c.jumprelu_tanh_scale },
            JumpReluSparsity::Quadratic => {
                let t = c.target_l0.ok_or_else(|| {
                    SaeError::config(
                        "target_l0",
                        "jumprelu_sparsity_loss_mode = \"quadratic\" needs it (the L0 to aim for)",
                    )
                })?;
                check(t > 0.0 && t <= c.d_sae as f32, "target_l0", || {
                    format!("{t}: the quadratic penalty needs 0 < target_l0 <= d_sae ({})", c.d_sae)
                })?;
                JumpReluPenalty::Quadratic { target_l0: t }
            }
        };
        Ok(JumpReluSettings {
            init_threshold: c.jumprelu_init_threshold,
            bandwidth: bw,
            l0_coefficient: c.l0_coefficient,
            penalty,
            pre_act_loss_coefficient: c.pre_act_loss_coefficient.unwrap_or(0.0),
            ste_to_input: c.jumprelu_ste_to_input,
        })
    }

    /// The recipe learning rates of ReLU and JumpReLU are tuned for runs of billions of tokens.
    pub(crate) fn warn_short_run_lr(&self) {
        let c = &self.config;
        if c.lr.is_none() && matches!(c.arch, Arch::Relu | Arch::JumpRelu) && c.tokens < 100_000_000 {
            // measured in BENCHMARKS.md: at these rates L0 stays above a quarter of d_sae for 1M tokens
            tracing::warn!(
                "{} uses its recipe lr {:e}, tuned for runs of billions of tokens; in {} tokens L0 will stay high. \
                 For short runs pass a larger --lr (1e-3 brings ReLU to L0 ~27 in 1M tokens at d_sae 4096)",
                c.arch.name(),
                self.schedule.lr,
                c.tokens
            );
        }
    }

    /// Steps of the whole run.
    pub fn total_steps(&self) -> u64 {
        self.schedule.total_steps
    }

    /// The loss's hyper-parameters at `step` (the sparsity coefficient warms up).
    pub fn loss_at(&self, step: u64) -> LossParams {
        let c = &self.config;
        let warm = self.schedule.sparsity_scale_at(step);
        let mut lp = LossParams {
            arch: c.arch,
            k: 0,
            auxk_alpha: 0.0,
            multi_topk: false,
            sparsity_coef: 0.0,
            jumprelu_bandwidth: c.jumprelu_bandwidth,
            jumprelu_sparsity: c.jumprelu_sparsity_loss_mode,
            jumprelu_tanh_scale: c.jumprelu_tanh_scale,
            target_l0: 0.0,
            pre_act_loss_coef: 0.0,
            jumprelu_ste_to_input: false,
            dead_tokens: c.dead_tokens,
            relu_sparse_below: c.relu_sparse_below,
            latent_offset: 0,
            precision: self.precision,
        };
        match self.arch {
            ArchSettings::TopK(s) => (lp.k, lp.auxk_alpha, lp.multi_topk) = (s.k, s.auxk_alpha, s.multi_topk),
            ArchSettings::BatchTopK(s) => (lp.k, lp.auxk_alpha) = (s.k, s.auxk_alpha),
            ArchSettings::JumpRelu(s) => {
                lp.sparsity_coef = s.l0_coefficient * warm;
                lp.pre_act_loss_coef = s.pre_act_loss_coefficient;
                lp.jumprelu_ste_to_input = s.ste_to_input;
                if let JumpReluPenalty::Quadratic { target_l0 } = s.penalty {
                    lp.target_l0 = target_l0;
                }
            }
            ArchSettings::Relu(s) => lp.sparsity_coef = s.l1_coefficient * warm,
        }
        lp
    }

    /// The optimiser's hyper-parameters at `step` (0-based; Adam counts from 1).
    pub fn update_at(&self, step: u64, need_norm: bool) -> UpdateParams {
        let c = &self.config;
        UpdateParams {
            adam: AdamHyper {
                lr: self.schedule.lr_at(step),
                beta1: c.adam_beta1,
                beta2: c.adam_beta2,
                eps: c.adam_eps,
                t: step + 1,
            },
            grad_clip: self.schedule.grad_clip,
            unit_norm_decoder: self.schedule.unit_norm_decoder,
            need_norm,
        }
    }

    /// The inference activation the trained SAE is saved with.
    pub fn activation(&self) -> Activation {
        match self.arch {
            ArchSettings::TopK(s) => Activation::TopK { k: s.k },
            ArchSettings::BatchTopK(_) | ArchSettings::JumpRelu(_) => Activation::JumpRelu,
            ArchSettings::Relu(_) => Activation::Relu,
        }
    }

    /// How b_dec starts.
    pub fn b_dec_init(&self) -> BDecInit {
        self.config.b_dec_init
    }

    /// What the SAE's cfg.json says it was made from.
    pub fn metadata(&self) -> SaeMetadata {
        let c = &self.config;
        SaeMetadata {
            model_name: c.model_name.clone(),
            hook_name: c.hook_name.clone(),
            context_size: c.context_size,
            prepend_bos: c.prepend_bos,
            dataset_path: if c.dataset_path.is_empty() {
                c.acts.clone().unwrap_or_default()
            } else {
                c.dataset_path.clone()
            },
            tokenizer_fingerprint: c.tokenizer_fingerprint.clone(),
            sink_rule: c.sink_rule.clone(),
            input_scale: None,
            hook_name_out: c.hook_name_out.clone(),
            output_scale: None,
        }
    }
}
