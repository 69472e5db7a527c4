//! Which contexts a feature's explainer and scorers see, as delphi splits them: the explainer gets the
//! top-activating contexts plus one from each activation quantile; the scorers get the other quantile
//! samples (activating, spread over the quantiles, never shown to the explainer) and as many held-out
//! windows where the feature is 0 (kept by `analyze`).

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use saekit_analysis::{Context, FeatureRecord, HeldOutWindow};

/// A context as the prompts use it: token texts and the feature's activation on each (all 0 for held-out
/// text).
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// The context's tokens, as text.
    pub tokens: Vec<String>,
    /// The feature's activation on each token.
    pub acts: Vec<f32>,
}

impl Example {
    fn of(c: &Context) -> Example {
        Example { tokens: c.tokens.clone(), acts: c.acts.clone() }
    }
    /// The strongest activation in the context (0 when it never fires).
    pub fn max_act(&self) -> f32 {
        self.acts.iter().copied().fold(0.0, f32::max)
    }
}

/// How many examples each prompt gets.
#[derive(Debug, Clone, Copy)]
pub struct ExampleOptions {
    /// Top-activating contexts shown to the explainer (one per quantile is added).
    pub n_top: usize,
    /// Activating test contexts for the scorers (and as many non-activating ones).
    pub n_test: usize,
    /// Seed of the random picks among the candidates.
    pub seed: u64,
}

impl Default for ExampleOptions {
    fn default() -> Self {
        Self { n_top: 8, n_test: 10, seed: 0 }
    }
}

/// The examples of one feature, for each prompt.
#[derive(Debug, Clone, Default)]
pub struct FeatureExamples {
    /// Shown to the explainer: top contexts plus one per quantile.
    pub explain: Vec<Example>,
    /// Activating contexts for the scorers, not shown to the explainer.
    pub activating: Vec<Example>,
    /// Held-out contexts where the feature is 0, for the scorers.
    pub non_activating: Vec<Example>,
}

/// Pick the examples of `rec`; `token_text` renders the held-out windows' token ids.
pub fn select(
    rec: &FeatureRecord,
    heldout: &[HeldOutWindow],
    token_text: impl Fn(u32) -> String,
    o: &ExampleOptions,
) -> FeatureExamples {
    let mut explain: Vec<Example> = rec.top_contexts.iter().take(o.n_top).map(Example::of).collect();
    // quantile groups strongest first; each gives its first sample to the explainer, the rest to the test
    let mut groups: Vec<Vec<Example>> =
        rec.quantiles.iter().rev().map(|g| g.contexts.iter().map(Example::of).collect()).collect();
    for g in &mut groups {
        if !g.is_empty() {
            let first = g.remove(0);
            if !explain.contains(&first) {
                explain.push(first);
            }
        }
    }
    // round-robin over the quantiles so every activation level is tested, skipping explainer examples
    let mut activating = Vec::new();
    let depth = groups.iter().map(Vec::len).max().unwrap_or(0);
    'fill: for k in 0..depth {
        for g in &groups {
            if let Some(e) = g.get(k) {
                if !explain.contains(e) && !activating.contains(e) {
                    activating.push(e.clone());
                    if activating.len() == o.n_test {
                        break 'fill;
                    }
                }
            }
        }
    }
    let mut rng = ChaCha8Rng::seed_from_u64(o.seed ^ (rec.id as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut zero: Vec<&HeldOutWindow> = heldout.iter().filter(|w| w.fired.binary_search(&rec.id).is_err()).collect();
    zero.shuffle(&mut rng);
    let non_activating = zero
        .into_iter()
        .take(activating.len())
        .map(|w| Example { tokens: w.ids.iter().map(|&t| token_text(t)).collect(), acts: vec![0.0; w.ids.len()] })
        .collect();
    FeatureExamples { explain, activating, non_activating }
}

#[cfg(test)]
mod tests {
    use super::*;
    use saekit_analysis::{Histogram, QuantileGroup};

    fn ctx(tag: &str, act: f32) -> Context {
        Context { tokens: vec![tag.into(), " x".into()], acts: vec![act, 0.0], peak: 0, max_act: act }
    }

    #[test]
    fn explainer_and_test_examples_do_not_overlap_and_negatives_are_zero() {
        let quantiles: Vec<QuantileGroup> = (0..4)
            .map(|q| QuantileGroup {
                lo: q as f32,
                hi: q as f32 + 1.0,
                count: 10,
                contexts: (0..3).map(|k| ctx(&format!("q{q}k{k}"), q as f32 + 0.5)).collect(),
            })
            .collect();
        let rec = FeatureRecord {
            id: 5,
            density: 0.1,
            max_act: 4.0,
            mean_act: 1.0,
            n_fired: 40,
            explanation: None,
            explanation_auto: true,
            top_contexts: vec![ctx("top0", 4.0), ctx("top1", 3.9)],
            quantiles,
            histogram: Histogram::default(),
            promoted: vec![],
            suppressed: vec![],
            neighbours: vec![],
            x: 0.0,
            y: 0.0,
            explanations: vec![],
        };
        let heldout: Vec<HeldOutWindow> = (0..20)
            .map(|i| HeldOutWindow {
                ctx: i,
                start: 1,
                ids: vec![i as u32],
                fired: if i % 2 == 0 { vec![1, 5, 9] } else { vec![1, 9] },
            })
            .collect();
        let ex = select(&rec, &heldout, |t| format!("t{t}"), &ExampleOptions { n_top: 2, n_test: 6, seed: 1 });
        assert_eq!(ex.explain.len(), 6, "2 top + one per quantile");
        assert_eq!(ex.activating.len(), 6);
        assert!(ex.activating.iter().all(|e| !ex.explain.contains(e)));
        // round-robin: every quantile is tested
        for q in 0..4 {
            assert!(ex.activating.iter().any(|e| e.tokens[0].starts_with(&format!("q{q}"))), "quantile {q}");
        }
        assert_eq!(ex.non_activating.len(), 6);
        // only odd windows lack feature 5
        assert!(ex.non_activating.iter().all(|e| e.tokens[0].trim_start_matches('t').parse::<u32>().unwrap() % 2 == 1));
    }
}
