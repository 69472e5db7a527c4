//! Autoregressive generation with a KV cache; the caller's hooks stay active at every step.

use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::{Hooks, Logits, Model, ModelError, ModelResult};

/// How the next token is picked from the logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// Always the most likely token.
    Greedy,
    /// Softmax at `temperature`, restricted to the smallest set of tokens whose mass reaches `top_p`.
    TopP {
        /// Divides the logits before the softmax (below 1 sharpens, above 1 flattens).
        temperature: f32,
        /// Probability mass the candidate set must reach.
        top_p: f32,
    },
}

/// What a generation produces and how it picks tokens.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Tokens generated at most.
    pub max_new_tokens: usize,
    /// Greedy or nucleus sampling.
    pub sampling: Sampling,
    /// Seed of the sampler's RNG: the same seed, prompt and options give the same text.
    pub seed: u64,
    /// Stop at the model's end-of-turn token.
    pub stop_at_eos: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self { max_new_tokens: 64, sampling: Sampling::Greedy, seed: 0, stop_at_eos: true }
    }
}

/// A finished generation: the prompt's ids, the new ids and their text.
#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    /// The prompt as tokenized (chat template applied, if it was a chat).
    pub prompt_ids: Vec<u32>,
    /// The tokens generated, the end-of-turn token excluded.
    pub generated_ids: Vec<u32>,
    /// The generated tokens decoded.
    pub text: String,
    /// Whether generation ended at the end-of-turn token rather than at `max_new_tokens`.
    pub stopped_at_eos: bool,
}

impl Model {
    /// Continue `prompt_ids` (one sequence). `hooks` run on the prompt and on every generated token.
    pub fn generate(&self, prompt_ids: &[u32], opts: &GenerateOptions, hooks: &mut Hooks) -> ModelResult<Generation> {
        self.generate_streaming(prompt_ids, opts, hooks, |_, _| true)
    }

    /// [`Model::generate`], calling `on_token` with each new token as it is sampled and the logits it was
    /// sampled from; generation stops after a token for which it returns `false` (a stop string was seen,
    /// the client went away). Same tokens as `generate` for the same seed: both are this loop.
    pub fn generate_streaming(
        &self,
        prompt_ids: &[u32],
        opts: &GenerateOptions,
        hooks: &mut Hooks,
        mut on_token: impl FnMut(u32, &[f32]) -> bool,
    ) -> ModelResult<Generation> {
        if prompt_ids.is_empty() {
            return Err(ModelError::bad_input("generate: the prompt is empty"));
        }
        if let Sampling::TopP { temperature, top_p } = opts.sampling {
            if !(temperature > 0.0 && temperature.is_finite() && top_p > 0.0 && top_p <= 1.0) {
                return Err(ModelError::bad_input(format!(
                    "sampling needs temperature > 0 and 0 < top_p <= 1 (got {temperature}, {top_p})"
                )));
            }
        }
        let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
        let mut cache = self.new_cache(1);
        let eos = self.tokenizer().eos_token_id();
        let mut logits = self.forward(prompt_ids, 1, &mut cache, hooks, Logits::Last)?;
        let mut out = Vec::new();
        let mut stopped = false;
        for _ in 0..opts.max_new_tokens {
            let next = sample(&logits, opts.sampling, &mut rng)?;
            out.push(next);
            if opts.stop_at_eos && next == eos {
                stopped = true;
                on_token(next, &logits);
                break;
            }
            if !on_token(next, &logits) || cache.len() + 1 > self.config().max_positions {
                break;
            }
            logits = self.forward(&[next], 1, &mut cache, hooks, Logits::Last)?;
        }
        Ok(Generation {
            prompt_ids: prompt_ids.to_vec(),
            text: self.tokenizer().decode(&out)?,
            generated_ids: out,
            stopped_at_eos: stopped,
        })
    }
}

/// `ln Σ exp(z)` over one row of logits, in f64: `z − log_sum_exp(row)` is a token's log-probability.
pub fn log_sum_exp(row: &[f32]) -> f64 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &z| m.max(z)) as f64;
    max + row.iter().map(|&z| (z as f64 - max).exp()).sum::<f64>().ln()
}

/// Pick the next token from one row of logits.
pub fn sample(logits: &[f32], sampling: Sampling, rng: &mut impl Rng) -> Result<u32> {
    if logits.iter().any(|v| v.is_nan()) {
        bail!("the model produced NaN logits (a hook wrote NaN into the residual stream?)");
    }
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |best, (i, &v)| if v > best.1 { (i, v) } else { best })
            .0 as u32
    };
    match sampling {
        Sampling::Greedy => Ok(argmax()),
        Sampling::TopP { temperature, top_p } => {
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut probs: Vec<(u32, f64)> =
                logits.iter().enumerate().map(|(i, &v)| (i as u32, (((v - max) / temperature) as f64).exp())).collect();
            let z: f64 = probs.iter().map(|p| p.1).sum();
            // Stable order (probability, then id) so a seed always gives the same tokens.
            probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let mut kept = 0;
            let mut mass = 0.0;
            for p in &probs {
                mass += p.1 / z;
                kept += 1;
                if mass >= top_p as f64 {
                    break;
                }
            }
            let total: f64 = probs[..kept].iter().map(|p| p.1).sum();
            let mut r = rng.gen::<f64>() * total;
            for p in &probs[..kept] {
                r -= p.1;
                if r <= 0.0 {
                    return Ok(p.0);
                }
            }
            Ok(probs[kept - 1].0)
        }
    }
}
