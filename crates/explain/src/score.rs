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
    yes_no_from_logprobs,
};

/// How the scorers ask.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scoring {
    /// Examples per request: a list of answers, or with 1 a yes/no question per example.
    pub batch: usize,
    /// With a batch of 1: read the answer from the first token's log-probabilities instead of the text.
    pub logprobs: bool,
}

/// One example's answer: yes or no, and P(yes) / (P(yes) + P(no)) when read from log-probabilities.
type Answer = (bool, Option<f64>);

/// Alternatives asked for when the answer is read from log-probabilities (OpenAI's most).
const TOP_LOGPROBS: u32 = 20;

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
    scoring: Scoring,
    rng: &mut ChaCha8Rng,
    usage: &mut Usage,
) -> Result<Score, ChatError> {
    items.shuffle(rng);
    let mut judged: Vec<(bool, Option<bool>)> = Vec::with_capacity(items.len());
    let mut p_yes: Vec<(bool, f64)> = Vec::new();
    for chunk in items.chunks(scoring.batch.max(1)) {
        let lines: Vec<String> = chunk.iter().map(|i| i.line.clone()).collect();
        match ask(client, fuzzing, explanation, &lines, scoring, usage)? {
            Some(a) => {
                for (item, (said, p)) in chunk.iter().zip(a) {
                    judged.push((item.positive, Some(said)));
                    p_yes.extend(p.map(|p| (item.positive, p)));
                }
            }
            None => judged.extend(chunk.iter().map(|item| (item.positive, None))),
        }
    }
    let mut score = tally(&judged);
    if scoring.logprobs {
        score.auroc = auroc(&p_yes);
    }
    Ok(score)
}

/// P(the scorer's P(yes) on a positive > on a negative), ties half; `None` without both kinds.
pub fn auroc(p_yes: &[(bool, f64)]) -> Option<f64> {
    let (pos, neg): (Vec<_>, Vec<_>) = p_yes.iter().partition(|(positive, _)| *positive);
    if pos.is_empty() || neg.is_empty() {
        return None;
    }
    let wins: f64 = pos.iter().flat_map(|(_, p)| neg.iter().map(move |(_, n)| win(*p, *n))).sum();
    Some(wins / (pos.len() * neg.len()) as f64)
}

/// 1 when `a` beats `b`, 1/2 on a tie, else 0: one pair's share of an AUROC or of a win rate.
pub(crate) fn win(a: f64, b: f64) -> f64 {
    match a.total_cmp(&b) {
        std::cmp::Ordering::Greater => 1.0,
        std::cmp::Ordering::Equal => 0.5,
        std::cmp::Ordering::Less => 0.0,
    }
}

/// One scorer request: a list of answers for `lines`, or (a batch of one) a yes/no for the single line,
/// read from the text or from the first token's log-probabilities (then with P(yes) against P(no)).
/// `None` when the reply cannot be read or the request failed; `Err` only for a fatal error.
fn ask(
    client: &ChatClient,
    fuzzing: bool,
    explanation: &str,
    lines: &[String],
    scoring: Scoring,
    usage: &mut Usage,
) -> Result<Option<Vec<Answer>>, ChatError> {
    let one_by_one = scoring.batch <= 1;
    let reply = if one_by_one {
        let messages = single_scorer_messages(fuzzing, explanation, &lines[0]);
        match scoring.logprobs {
            true => client.first_token_logprobs(&messages, TOP_LOGPROBS),
            false => client.chat(&messages, ONE_WORD_TOKENS),
        }
    } else {
        client.chat(&scorer_messages(fuzzing, explanation, lines), 16 + 4 * lines.len() as u32)
    };
    let r = match reply {
        Ok(r) => r,
        Err(e @ ChatError::Fatal(_)) => return Err(e),
        Err(ChatError::Failed(msg)) => {
            tracing::warn!("a scorer request failed: {msg}");
            return Ok(None);
        }
    };
    usage.prompt_tokens += r.prompt_tokens;
    usage.completion_tokens += r.completion_tokens;
    let answers = match (one_by_one, scoring.logprobs) {
        (true, true) => yes_no_from_logprobs(&r.top_logprobs).map(|p| vec![(p > 0.5, Some(p))]),
        (true, false) => parse_yes_no(&r.text).map(|a| vec![(a, None)]),
        (false, _) => parse_answers(&r.text, lines.len()).map(|a| a.into_iter().map(|x| (x, None)).collect()),
    };
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
    scoring: Scoring,
    seed: u64,
    usage: &mut Usage,
) -> Result<Score, ChatError> {
    let no_marks = |e: &Example| marked_text(e, &vec![false; e.tokens.len()]);
    let items = activating
        .iter()
        .map(|e| Item { line: no_marks(e), positive: true })
        .chain(non_activating.iter().map(|e| Item { line: no_marks(e), positive: false }))
        .collect();
    run_scorer(client, false, explanation, items, scoring, &mut ChaCha8Rng::seed_from_u64(seed), usage)
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
    scoring: Scoring,
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
    run_scorer(client, true, explanation, items, scoring, &mut rng, usage)
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

    /// Against the Mann-Whitney U from midranks over the pooled values, computed independently in f64.
    #[test]
    fn auroc_is_the_rank_sum_statistic_with_ties_half() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let p: Vec<(bool, f64)> = (0..60)
            .map(|i| (i % 3 == 0, (rng.gen_range(0..8) as f64) / 8.0 + if i % 3 == 0 { 0.1 } else { 0.0 }))
            .collect();
        let mut sorted: Vec<f64> = p.iter().map(|x| x.1).collect();
        sorted.sort_by(f64::total_cmp);
        let midrank = |v: f64| {
            let below = sorted.iter().filter(|&&x| x < v).count() as f64;
            let equal = sorted.iter().filter(|&&x| x == v).count() as f64;
            below + (equal + 1.0) / 2.0
        };
        let (n_pos, n_neg) = (p.iter().filter(|x| x.0).count() as f64, p.iter().filter(|x| !x.0).count() as f64);
        let rank_sum: f64 = p.iter().filter(|x| x.0).map(|x| midrank(x.1)).sum();
        let want = (rank_sum - n_pos * (n_pos + 1.0) / 2.0) / (n_pos * n_neg);
        assert!((auroc(&p).unwrap() - want).abs() < 1e-12, "{:?} vs {want}", auroc(&p));
        assert_eq!(auroc(&p[..1]), None, "one class only");
    }

    #[test]
    fn balanced_accuracy_ignores_class_balance() {
        let s = Score::from_counts(9, 1, 1, 0, 2);
        assert!((s.balanced_accuracy - (0.9 + 1.0) / 2.0).abs() < 1e-12);
        assert_eq!(Score::from_counts(10, 0, 0, 10, 0).balanced_accuracy, 0.5, "saying yes to all is chance");
    }
}
