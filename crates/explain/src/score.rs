//! The detection and fuzzing scorers: how well an explanation lets a model tell where the feature fires.
//!
//! Detection (delphi): activating contexts from every quantile mixed with as many held-out contexts where
//! the feature is 0; the scorer says which match the explanation. Fuzzing: the activating contexts with
//! their real marks, and the same contexts with the same number of marks moved to tokens where the feature
//! is 0 (delphi's "active" fuzzing: the texts are alike, only the marks differ); the scorer says which
//! are marked correctly. Examples are shuffled (seeded) and sent in batches; each is scored as balanced
//! accuracy with its counts. A batch of one asks a yes/no question per example instead of a list
//! ([`crate::prompts::single_scorer_messages`]); an answer that cannot be read counts as unparsed.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use saekit_analysis::Score;

use crate::client::{ChatClient, ChatError};
use crate::examples::Example;
use crate::prompts::{
    activation_marks, marked_text, parse_answers, parse_yes_no, scorer_messages, single_scorer_messages,
};

/// One scored example: the line shown and whether it is a positive.
struct Item {
    line: String,
    positive: bool,
}

/// Tokens a scoring step spent.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// Prompt tokens, as the API reported them.
    pub prompt_tokens: u64,
    /// Completion tokens, as the API reported them.
    pub completion_tokens: u64,
}

/// Tokens a one-example scorer may write: its answer is the first word, a few more show what it wrote
/// when it did not answer.
const ONE_WORD_TOKENS: u32 = 8;

/// Send `items` in shuffled batches of `batch` and count the answers (with a batch of one, each example
/// is asked as a yes/no question). A request that fails (after the client's retries) leaves its examples
/// unparsed; a fatal error stops at once.
fn run_scorer(
    client: &ChatClient,
    fuzzing: bool,
    explanation: &str,
    mut items: Vec<Item>,
    batch: usize,
    rng: &mut ChaCha8Rng,
    usage: &mut Usage,
) -> Result<Score, ChatError> {
    items.shuffle(rng);
    let mut judged: Vec<(bool, Option<bool>)> = Vec::with_capacity(items.len());
    for chunk in items.chunks(batch.max(1)) {
        let lines: Vec<String> = chunk.iter().map(|i| i.line.clone()).collect();
        match ask(client, fuzzing, explanation, &lines, batch <= 1, usage)? {
            Some(a) => judged.extend(chunk.iter().zip(a).map(|(item, said)| (item.positive, Some(said)))),
            None => judged.extend(chunk.iter().map(|item| (item.positive, None))),
        }
    }
    Ok(tally(&judged))
}

/// One scorer request: a list of answers for `lines`, or (`one_by_one`) a yes/no for the single line.
/// `None` when the reply cannot be read or the request failed; `Err` only for a fatal error.
fn ask(
    client: &ChatClient,
    fuzzing: bool,
    explanation: &str,
    lines: &[String],
    one_by_one: bool,
    usage: &mut Usage,
) -> Result<Option<Vec<bool>>, ChatError> {
    let (messages, max_tokens) = if one_by_one {
        (single_scorer_messages(fuzzing, explanation, &lines[0]), ONE_WORD_TOKENS)
    } else {
        (scorer_messages(fuzzing, explanation, lines), 16 + 4 * lines.len() as u32)
    };
    let r = match client.chat(&messages, max_tokens) {
        Ok(r) => r,
        Err(e @ ChatError::Fatal(_)) => return Err(e),
        Err(ChatError::Failed(msg)) => {
            tracing::warn!("a scorer request failed: {msg}");
            return Ok(None);
        }
    };
    usage.prompt_tokens += r.prompt_tokens;
    usage.completion_tokens += r.completion_tokens;
    let answers = if one_by_one { parse_yes_no(&r.text).map(|a| vec![a]) } else { parse_answers(&r.text, lines.len()) };
    if answers.is_none() {
        tracing::debug!(reply = %r.text, "a scorer reply without {} readable answer(s)", lines.len());
    }
    Ok(answers)
}

/// The counts and metrics of `(is the example a positive, what the scorer said)` pairs, as delphi's
/// `compute_confusion` counts them: an example without an answer is left out of the counts (unparsed).
pub fn tally(judged: &[(bool, Option<bool>)]) -> Score {
    let (mut tp, mut fn_, mut tn, mut fp, mut unparsed) = (0, 0, 0, 0, 0);
    for &(positive, said) in judged {
        match (positive, said) {
            (_, None) => unparsed += 1,
            (true, Some(true)) => tp += 1,
            (true, Some(false)) => fn_ += 1,
            (false, Some(false)) => tn += 1,
            (false, Some(true)) => fp += 1,
        }
    }
    Score::from_counts(tp, fn_, tn, fp, unparsed)
}

/// Detection: `activating` against `non_activating`, unmarked.
pub fn detection(
    client: &ChatClient,
    explanation: &str,
    activating: &[Example],
    non_activating: &[Example],
    batch: usize,
    seed: u64,
    usage: &mut Usage,
) -> Result<Score, ChatError> {
    let no_marks = |e: &Example| marked_text(e, &vec![false; e.tokens.len()]);
    let items = activating
        .iter()
        .map(|e| Item { line: no_marks(e), positive: true })
        .chain(non_activating.iter().map(|e| Item { line: no_marks(e), positive: false }))
        .collect();
    run_scorer(client, false, explanation, items, batch, &mut ChaCha8Rng::seed_from_u64(seed), usage)
}

/// The same number of marks as `e`'s real ones, on tokens where the feature is 0; `None` when the
/// context has too few such tokens.
pub fn wrong_marks(e: &Example, rng: &mut impl Rng) -> Option<Vec<bool>> {
    let real = activation_marks(e);
    let k = real.iter().filter(|&&m| m).count().max(1);
    let mut zero: Vec<usize> = (0..e.acts.len()).filter(|&i| e.acts[i] <= 0.0).collect();
    if zero.len() < k {
        return None;
    }
    zero.shuffle(rng);
    let mut marks = vec![false; e.acts.len()];
    for &i in &zero[..k] {
        marks[i] = true;
    }
    Some(marks)
}

/// Fuzzing: each activating context once correctly marked and once with its marks moved.
pub fn fuzzing(
    client: &ChatClient,
    explanation: &str,
    activating: &[Example],
    batch: usize,
    seed: u64,
    usage: &mut Usage,
) -> Result<Score, ChatError> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xf022);
    let mut items = Vec::new();
    for e in activating {
        items.push(Item { line: marked_text(e, &activation_marks(e)), positive: true });
        if let Some(wrong) = wrong_marks(e, &mut rng) {
            items.push(Item { line: marked_text(e, &wrong), positive: false });
        }
    }
    run_scorer(client, true, explanation, items, batch, &mut rng, usage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_marks_avoid_every_firing_token() {
        let e = Example {
            tokens: (0..8).map(|i| format!("t{i}")).collect(),
            acts: vec![0.0, 3.0, 0.0, 0.5, 2.0, 0.0, 0.0, 0.0],
        };
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for _ in 0..20 {
            let m = wrong_marks(&e, &mut rng).unwrap();
            assert_eq!(m.iter().filter(|&&x| x).count(), 2, "as many marks as the real ones (>30% of peak)");
            assert!(m.iter().zip(&e.acts).all(|(&mk, &a)| !mk || a == 0.0));
        }
        let dense = Example { tokens: vec!["a".into(), "b".into()], acts: vec![1.0, 1.0] };
        assert!(wrong_marks(&dense, &mut rng).is_none());
    }

    /// Each metric straight from its definition over the examples (per-class accuracies, the predicted
    /// positives, `2tp / (2tp + fp + fn)` for F1), in f64, against [`tally`]'s counts.
    #[test]
    fn tally_matches_the_metrics_computed_from_the_examples() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for round in 0..50 {
            let n = rng.gen_range(1..60);
            let judged: Vec<(bool, Option<bool>)> = (0..n)
                .map(|_| (rng.gen_bool(0.4), if rng.gen_bool(0.1) { None } else { Some(rng.gen_bool(0.5)) }))
                .collect();
            let s = tally(&judged);
            let answered: Vec<(bool, bool)> = judged.iter().filter_map(|&(p, a)| a.map(|a| (p, a))).collect();
            let acc_of = |class: bool| {
                let c: Vec<bool> = answered.iter().filter(|x| x.0 == class).map(|x| x.1 == class).collect();
                if c.is_empty() {
                    0.0
                } else {
                    c.iter().filter(|&&ok| ok).count() as f64 / c.len() as f64
                }
            };
            let said_yes: Vec<bool> = answered.iter().filter(|x| x.1).map(|x| x.0).collect();
            let precision = if said_yes.is_empty() {
                0.0
            } else {
                said_yes.iter().filter(|&&p| p).count() as f64 / said_yes.len() as f64
            };
            let (tp, fp, fn_) = (s.tp as f64, s.fp as f64, s.fn_ as f64);
            let f1 = if tp == 0.0 { 0.0 } else { 2.0 * tp / (2.0 * tp + fp + fn_) };
            assert!((s.balanced_accuracy - (acc_of(true) + acc_of(false)) / 2.0).abs() < 1e-12, "{round}: {s:?}");
            assert!((s.recall - acc_of(true)).abs() < 1e-12 && (s.precision - precision).abs() < 1e-12, "{s:?}");
            assert!((s.f1 - f1).abs() < 1e-12, "{round}: {s:?}");
            assert_eq!(s.unparsed as usize, judged.len() - answered.len());
        }
        // sklearn: balanced_accuracy_score([1,1,1,1,0,0,0], [1,1,0,0,1,0,0]) = 0.58333, f1_score = 0.571429
        let fixed = [true, true, true, true, false, false, false]
            .into_iter()
            .zip([true, true, false, false, true, false, false])
            .map(|(p, a)| (p, Some(a)))
            .collect::<Vec<_>>();
        let s = tally(&fixed);
        assert!((s.balanced_accuracy - 0.583_333_333_333).abs() < 1e-9 && (s.f1 - 4.0 / 7.0).abs() < 1e-12, "{s:?}");
    }

    #[test]
    fn balanced_accuracy_ignores_class_balance() {
        let s = Score::from_counts(9, 1, 1, 0, 2);
        assert!((s.balanced_accuracy - (0.9 + 1.0) / 2.0).abs() < 1e-12);
        assert_eq!(Score::from_counts(10, 0, 0, 10, 0).balanced_accuracy, 0.5, "saying yes to all is chance");
    }
}
