//! saekit-steer: change what a model says by editing SAE features in its residual stream while it generates.
//!
//! Owns: the feature edits (clamp, add, scale), the hook that applies them at every position and every
//! generated token, and side-by-side generation. Clamping follows *Scaling Monosemanticity*: the SAE error
//! term is kept, so the residual stream becomes `x + Σᵢ (f'ᵢ − fᵢ(x)) · W_dec[i]` and only the edited
//! features move it. Additive steering adds `c · W_dec[i]` (the SAELens and Neuronpedia convention).
//! [`LiftProbe`] measures how far edits move the model's predictions toward a set of tokens, and
//! [`SteeringChoice`] orders candidate features by it.
//!
//! Must not touch: model internals (only `saekit_model`'s hooks), SAE training, the feature database
//! (multiples of a feature's max activation are resolved by the caller, see [`parse_edit`]).

#![warn(missing_docs)]

mod lift;

use std::str::FromStr;

use saekit_model::{GenerateOptions, Generation, HookPoint, Hooks, Model, ModelError};
use saekit_sae::Sae;
use serde::Serialize;

pub use lift::{answered_chats, ClampLift, LiftProbe, SteeringChoice, PROBE_PROMPTS};

/// What went wrong while steering.
#[derive(Debug, thiserror::Error)]
pub enum SteerError {
    /// The edits or the hook do not fit the model and SAE (a feature the SAE lacks, an edit given twice,
    /// an SAE made for another model), or an edit spec does not parse.
    #[error("{0}")]
    BadInput(String),
    /// The model refused or failed the generation; its own error says whose fault.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Looking up a feature's max activation for an `Nx` edit failed.
    #[error(transparent)]
    Lookup(anyhow::Error),
}

/// `Result` with a [`SteerError`].
pub type Result<T, E = SteerError> = std::result::Result<T, E>;

macro_rules! bad_input {
    ($($arg:tt)*) => { return Err(SteerError::BadInput(format!($($arg)*))) };
}

/// One change to one feature, applied at every position where the hook fires.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum FeatureEdit {
    /// Set the feature's activation to `value` (0 ablates it), keeping the SAE error term.
    Clamp {
        /// The feature edited.
        feature: u32,
        /// Its activation after the edit.
        value: f32,
    },
    /// Add `coeff · W_dec[feature]` to the residual stream.
    Add {
        /// The feature whose decoder direction is added.
        feature: u32,
        /// How much of it.
        coeff: f32,
    },
    /// Multiply the feature's current activation by `factor` (1 leaves it unchanged).
    Scale {
        /// The feature edited.
        feature: u32,
        /// The factor on its activation.
        factor: f32,
    },
}

impl FeatureEdit {
    /// The feature this edit changes.
    pub fn feature(&self) -> u32 {
        match *self {
            FeatureEdit::Clamp { feature, .. }
            | FeatureEdit::Add { feature, .. }
            | FeatureEdit::Scale { feature, .. } => feature,
        }
    }
}

/// A `FEATURE=VALUE` edit as written on the command line, before multiples are resolved.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EditSpec {
    /// The feature to edit.
    pub feature: u32,
    /// The value, or the multiple of the feature's maximum activation when `times_max`.
    pub value: f32,
    /// `10x`: the value is a multiple of the feature's maximum activation.
    pub times_max: bool,
}

impl FromStr for EditSpec {
    type Err = SteerError;
    fn from_str(s: &str) -> Result<Self> {
        let Some((f, v)) = s.split_once('=') else {
            bad_input!("'{s}': expected FEATURE=VALUE, e.g. 1234=10x or 88=-3")
        };
        let Ok(feature) = f.trim().parse::<u32>() else { bad_input!("'{s}': feature id '{f}' is not a number") };
        let v = v.trim();
        let (num, times_max) = match v.strip_suffix(['x', 'X']) {
            Some(n) => (n, true),
            None => (v, false),
        };
        let Ok(value) = num.parse::<f32>() else {
            bad_input!("'{s}': value '{v}' is not a number (or a multiple like 10x)")
        };
        if !value.is_finite() {
            bad_input!("'{s}': value must be finite");
        }
        Ok(Self { feature, value, times_max })
    }
}

/// Turn a parsed spec into an absolute value, looking up the feature's max activation for `Nx`.
pub fn parse_edit(spec: &EditSpec, max_activation: impl Fn(u32) -> anyhow::Result<f32>) -> Result<f32> {
    if spec.times_max {
        Ok(spec.value * max_activation(spec.feature).map_err(SteerError::Lookup)?)
    } else {
        Ok(spec.value)
    }
}

/// Which positions the edits apply to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Positions {
    /// Every position, the sink included.
    All,
    /// Every position but the first: SmolLM2's position 0 is an attention sink (~100x the median norm)
    /// that the SAE never saw in training, so its codes there mean nothing.
    SkipFirst,
}

/// Check edits against the SAE and the hook against the model.
pub fn validate(model: &Model, sae: &Sae, hook: HookPoint, edits: &[FeatureEdit]) -> Result<()> {
    model.check_hook_point(hook)?;
    // an SAE made for another model, width or hook would steer the wrong residual without a word
    let cfg = model.config();
    if let Err(e) = sae.hook_on("the SAE", &cfg.name, cfg.d_model, Some(&hook.to_string())) {
        bad_input!("{e:#}");
    }
    for (i, e) in edits.iter().enumerate() {
        if e.feature() as usize >= sae.d_sae {
            bad_input!(
                "feature {} does not exist: the SAE has {} features (0..{})",
                e.feature(),
                sae.d_sae,
                sae.d_sae - 1
            );
        }
        // each edit is computed against the unedited f(x): two edits of one feature would not compose
        if edits[..i].iter().any(|p| p.feature() == e.feature()) {
            bad_input!("feature {} is edited more than once; give one edit per feature", e.feature());
        }
    }
    Ok(())
}

/// Add a hook at `hook` that applies `edits` to every row (per `positions`) of every forward pass.
pub fn add_steering_hook<'a>(
    hooks: &mut Hooks<'a>,
    sae: &'a Sae,
    hook: HookPoint,
    edits: &'a [FeatureEdit],
    positions: Positions,
) {
    hooks.add(hook, move |ctx, x| apply_edits(sae, edits, positions, ctx, x));
}

/// The edit itself: `x += Σ (target − current) · W_dec[i] + Σ c · W_dec[j]`.
fn apply_edits(
    sae: &Sae,
    edits: &[FeatureEdit],
    positions: Positions,
    ctx: &saekit_model::HookContext,
    x: &mut [f32],
) -> anyhow::Result<()> {
    if edits.is_empty() {
        return Ok(());
    }
    let d = ctx.d_model;
    let needs_codes = edits.iter().any(|e| !matches!(e, FeatureEdit::Add { .. }));
    let codes = if needs_codes { Some(sae.encode(x)) } else { None };
    for (r, row) in x.chunks_mut(d).enumerate() {
        let pos = ctx.pos_offset + r % ctx.seq;
        if positions == Positions::SkipFirst && pos == 0 {
            continue;
        }
        let current = |f: u32| -> f32 {
            let Some(c) = &codes else { return 0.0 };
            let (idx, val) = c.row(r);
            idx.iter().position(|&i| i == f).map_or(0.0, |k| val[k])
        };
        for e in edits {
            let (f, coeff) = match *e {
                FeatureEdit::Clamp { feature, value } => (feature, value - current(feature)),
                FeatureEdit::Scale { feature, factor } => (feature, (factor - 1.0) * current(feature)),
                FeatureEdit::Add { feature, coeff } => (feature, coeff),
            };
            if coeff != 0.0 {
                let dir = &sae.params.w_dec[f as usize * d..][..d];
                row.iter_mut().zip(dir).for_each(|(v, w)| *v += coeff * w);
            }
        }
    }
    Ok(())
}

/// Generate with the edits active on the prompt and on every new token.
pub fn generate_steered(
    model: &Model,
    sae: &Sae,
    hook: HookPoint,
    edits: &[FeatureEdit],
    positions: Positions,
    prompt_ids: &[u32],
    opts: &GenerateOptions,
) -> Result<Generation> {
    validate(model, sae, hook, edits)?;
    let mut hooks = Hooks::new();
    add_steering_hook(&mut hooks, sae, hook, edits, positions);
    Ok(model.generate(prompt_ids, opts, &mut hooks)?)
}

/// The same prompt and seed without and with the edits.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// The generation without edits.
    pub baseline: Generation,
    /// The generation with them.
    pub steered: Generation,
    /// The edits applied.
    pub edits: Vec<FeatureEdit>,
}

/// Generate from `prompt_ids` twice with the same options and seed, without and with `edits`.
pub fn compare(
    model: &Model,
    sae: &Sae,
    hook: HookPoint,
    edits: &[FeatureEdit],
    positions: Positions,
    prompt_ids: &[u32],
    opts: &GenerateOptions,
) -> Result<Comparison> {
    validate(model, sae, hook, edits)?;
    let baseline = model.generate(prompt_ids, opts, &mut Hooks::new())?;
    let steered = generate_steered(model, sae, hook, edits, positions, prompt_ids, opts)?;
    Ok(Comparison { baseline, steered, edits: edits.to_vec() })
}

/// The feature's direct effect on the logits: `W_U · (W_dec[i] ⊙ g)` with `g` the final-norm gain,
/// the first-order effect of adding the decoder direction just before the final norm.
pub fn direct_logit_effect(model: &Model, sae: &Sae, feature: u32) -> Result<Vec<f32>> {
    let d = sae.d_in;
    let f = feature as usize;
    if f >= sae.d_sae {
        bad_input!("feature {feature} does not exist (the SAE has {})", sae.d_sae);
    }
    let mut dir = sae.params.w_dec[f * d..][..d].to_vec();
    if let Some(g) = model.final_norm_gain() {
        dir.iter_mut().zip(g).for_each(|(v, g)| *v *= g);
    }
    Ok(model.unembed(&dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_specs_parse() {
        assert_eq!("12=10x".parse::<EditSpec>().unwrap(), EditSpec { feature: 12, value: 10.0, times_max: true });
        assert_eq!("3=-2.5".parse::<EditSpec>().unwrap(), EditSpec { feature: 3, value: -2.5, times_max: false });
        assert!("3".parse::<EditSpec>().is_err());
        assert!("x=1".parse::<EditSpec>().is_err());
        assert!(matches!("1=abc".parse::<EditSpec>(), Err(SteerError::BadInput(m)) if m.contains("abc")));
        let s: EditSpec = "7=-3x".parse().unwrap();
        assert_eq!(parse_edit(&s, |_| Ok(2.0)).unwrap(), -6.0);
    }
}
