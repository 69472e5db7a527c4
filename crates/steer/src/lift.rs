//! How far an edit moves what the model writes toward a set of tokens, measured through the whole model.
//!
//! A feature's direct logit effect reads its decoder direction straight through the unembedding, and
//! skips every layer after the hook. At a middle layer that is a poor guide to what clamping the feature
//! does. On SmolLM2's layer 15, choosing concept features by direct lift steered better than the tenth
//! choice in 4 of 8 concepts; choosing them by this probe did in 7 of 8 (BENCHMARKS.md, "Concept search
//! that steers"). [`LiftProbe`] runs the edited model instead, on the kind of text steering produces: a
//! prompt followed by the model's own unsteered answer.

use saekit_model::{log_sum_exp, ChatMessage, GenerateOptions, HookPoint, Hooks, Logits, Model, ModelError};
use saekit_sae::Sae;

use crate::{add_steering_hook, validate, FeatureEdit, Positions, Result};

/// Neutral chat prompts to measure steering on (none names a concept of the demo corpus).
pub const PROBE_PROMPTS: [&str; 4] = [
    "What did you have for breakfast?",
    "Tell me about your home town.",
    "How do you spend a rainy day?",
    "What is your favourite season?",
];

/// `prompts` as chat prompts (the model's chat template) followed by the model's own greedy answer of up to
/// `tokens` tokens, each scored from the prompt's last position on: the sequences [`LiftProbe::new`] takes.
pub fn answered_chats(model: &Model, prompts: &[&str], tokens: usize) -> Result<Vec<(Vec<u32>, usize)>> {
    let tok = model.tokenizer();
    let opts = GenerateOptions { max_new_tokens: tokens, ..Default::default() };
    prompts
        .iter()
        .map(|p| {
            let prompt = tok.encode_chat(&[ChatMessage::user(*p)]).map_err(ModelError::from)?;
            let answer = model.generate(&prompt, &opts, &mut Hooks::new())?;
            let from = prompt.len().saturating_sub(1);
            Ok(([prompt, answer.generated_ids].concat(), from))
        })
        .collect()
}

/// Token sequences, the positions scored in each, and a weight per vocabulary token.
#[derive(Debug, Clone)]
pub struct LiftProbe {
    /// Each sequence and the first position whose next-token prediction is scored.
    seqs: Vec<(Vec<u32>, usize)>,
    /// One weight per vocabulary token.
    weights: Vec<f64>,
    /// The unedited model's score.
    base: f64,
}

impl LiftProbe {
    /// Score the unedited model on `seqs`: each a token sequence and the first position scored (every
    /// position from there to the end is; a prompt's last position predicts the answer's first token).
    /// `weights` has one entry per vocabulary token, for example a concept's token shares minus every other
    /// text's.
    pub fn new(model: &Model, seqs: Vec<(Vec<u32>, usize)>, weights: Vec<f64>) -> Result<Self> {
        let mut probe = LiftProbe { seqs, weights, base: 0.0 };
        probe.base = probe.score(model, |_| {})?;
        Ok(probe)
    }

    /// How far `edits` (at every position but the first) move the model toward the weighted tokens: the
    /// mean over scored positions of `Σ_t weights[t] · (log p_edited(t) − log p(t))`.
    pub fn lift(&self, model: &Model, sae: &Sae, hook: HookPoint, edits: &[FeatureEdit]) -> Result<f64> {
        validate(model, sae, hook, edits)?;
        let edited = self.score(model, |hooks| add_steering_hook(hooks, sae, hook, edits, Positions::SkipFirst))?;
        Ok(edited - self.base)
    }

    /// Each `(feature, value)` clamped alone, with its [`LiftProbe::lift`], best first.
    pub fn rank_clamps(
        &self,
        model: &Model,
        sae: &Sae,
        hook: HookPoint,
        clamps: &[(u32, f32)],
    ) -> Result<Vec<(u32, f64)>> {
        let mut lifts = clamps
            .iter()
            .map(|&(feature, value)| {
                Ok((feature, self.lift(model, sae, hook, &[FeatureEdit::Clamp { feature, value }])?))
            })
            .collect::<Result<Vec<_>>>()?;
        lifts.sort_by(|a, b| b.1.total_cmp(&a.1));
        Ok(lifts)
    }

    /// The mean over scored positions of `Σ_t weights[t] · log_softmax(logits)[t]`.
    fn score<'a>(&self, model: &Model, add_hooks: impl Fn(&mut Hooks<'a>)) -> Result<f64> {
        let vocab = model.config().vocab_size;
        let weight_sum: f64 = self.weights.iter().sum();
        let (mut total, mut n) = (0.0, 0usize);
        for (ids, from) in &self.seqs {
            let mut hooks = Hooks::new();
            add_hooks(&mut hooks);
            let mut cache = model.new_cache(1);
            let logits = model.forward(ids, 1, &mut cache, &mut hooks, Logits::All)?;
            for row in logits.chunks_exact(vocab).skip(*from) {
                let weighted: f64 = row.iter().zip(&self.weights).map(|(&z, &w)| w * z as f64).sum();
                total += weighted - weight_sum * log_sum_exp(row);
                n += 1;
            }
        }
        Ok(if n == 0 { 0.0 } else { total / n as f64 })
    }
}
