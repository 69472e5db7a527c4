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

use crate::{add_steering_hook, validate, FeatureEdit, Positions, Result, SteerError};

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

/// A feature measured for steering: its max activation (the clamp was a multiple of it) and the clamp's
/// [`LiftProbe::lift`].
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct ClampLift {
    /// The feature clamped.
    pub feature: u32,
    /// Its max activation, as the caller's lookup gave it.
    pub max_act: f32,
    /// How far the clamp moved the model toward the probe's tokens.
    pub lift: f64,
}

/// How features are chosen for steering toward a set of tokens: each of the first `candidates` features
/// of another ranking (concept search's AUROC, say) is clamped alone at `times` x its max activation, and
/// they are reordered by the lift measured. A feature that separates texts often does not steer toward
/// them; this measures the clamp itself.
#[derive(Clone, Copy)]
pub struct SteeringChoice<'a> {
    /// The model steered.
    pub model: &'a Model,
    /// The SAE whose features are clamped.
    pub sae: &'a Sae,
    /// Where the SAE reads and the clamp writes.
    pub hook: HookPoint,
    /// The clamp, as a multiple of each feature's max activation.
    pub times: f32,
    /// How many features of the ranking are measured.
    pub candidates: usize,
}

impl SteeringChoice<'_> {
    /// The first [`SteeringChoice::candidates`] of `ranked` (feature ids, best first) whose max activation
    /// (`max_act`, e.g. from the feature database) is positive, by lift toward the tokens `weights` favours
    /// on `probes` (see [`LiftProbe::new`] and [`answered_chats`]), best first.
    pub fn order(
        &self,
        ranked: impl IntoIterator<Item = u32>,
        weights: &[f64],
        probes: &[(Vec<u32>, usize)],
        max_act: &dyn Fn(u32) -> anyhow::Result<f32>,
    ) -> Result<Vec<ClampLift>> {
        let mut candidates = Vec::new();
        for feature in ranked.into_iter() {
            if candidates.len() == self.candidates {
                break;
            }
            let m = max_act(feature).map_err(SteerError::Lookup)?;
            if m > 0.0 {
                candidates.push((feature, m));
            }
        }
        let clamps: Vec<(u32, f32)> = candidates.iter().map(|&(f, m)| (f, self.times * m)).collect();
        let probe = LiftProbe::new(self.model, probes.to_vec(), weights.to_vec())?;
        let lifts = probe.rank_clamps(self.model, self.sae, self.hook, &clamps)?;
        let with_max = |(feature, lift): (u32, f64)| {
            let &(_, max_act) = candidates.iter().find(|(f, _)| *f == feature)?;
            Some(ClampLift { feature, max_act, lift })
        };
        Ok(lifts.into_iter().filter_map(with_max).collect())
    }
}
