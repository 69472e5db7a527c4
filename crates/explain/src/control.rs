//! The shuffled-explanation control: the floor a real explanation must beat (the random-explanation
//! baseline of delphi's and SAEBench's autointerp evaluations). Every feature the explainer model has
//! explained is scored twice in one run, by both scorers on the same examples with the same seeds: once
//! with its own explanation and once with the explanation the same model wrote for another feature (a
//! seeded derangement, so no feature keeps its own).
//!
//! Nothing is stored: a shuffled explanation that scores well by chance must never reach a feature page.
//! Scoring both in the same run, rather than reading the stored real scores, keeps the pair comparable
//! whatever `--seed` or example counts the explaining run used.

use std::collections::VecDeque;
use std::path::Path;
use std::time::Instant;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use saekit_analysis::{FeatureDb, HeldOutWindow, Score};
use serde::Serialize;

use crate::client::{ChatClient, ChatError};
use crate::error::{bail_input, ExplainResult};
use crate::run::{chat_stop, examples_of, in_parallel, read_feature, score_explanation, ExplainOptions};
use crate::score::{win, Usage};

/// How a scorer's examples were answered: the denominators behind a balanced accuracy.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Answers {
    /// Examples with a readable answer.
    pub answered: u32,
    /// Examples whose answer could not be read (or whose request failed).
    pub unanswered: u32,
    /// Answered examples the scorer said yes to (matches / marked right): all of them is a scorer that
    /// cannot tell, whatever the explanation.
    pub yes: u32,
}

impl Answers {
    fn of(s: Option<Score>) -> Answers {
        s.map_or_else(Answers::default, |s| Answers {
            answered: s.answered(),
            unanswered: s.unparsed,
            yes: s.tp + s.fp,
        })
    }
    fn add(self, o: Answers) -> Answers {
        Answers {
            answered: self.answered + o.answered,
            unanswered: self.unanswered + o.unanswered,
            yes: self.yes + o.yes,
        }
    }
}

/// One feature's balanced accuracies (`None`: the scorer did not run or read no answer), with the
/// answer counts behind them.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Accuracies {
    /// Detection's balanced accuracy.
    pub detection: Option<f64>,
    /// Fuzzing's balanced accuracy.
    pub fuzzing: Option<f64>,
    /// Detection's answer counts.
    pub detection_answers: Answers,
    /// Fuzzing's answer counts.
    pub fuzzing_answers: Answers,
    /// Detection's AUROC of P(yes), when the answers were read from log-probabilities.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detection_auroc: Option<f64>,
    /// Fuzzing's AUROC of P(yes), likewise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fuzzing_auroc: Option<f64>,
}

impl Accuracies {
    fn of(detection: Option<Score>, fuzzing: Option<Score>) -> Accuracies {
        let answered = |s: Option<Score>| s.filter(|s| s.answered() > 0).map(|s| s.balanced_accuracy);
        Accuracies {
            detection: answered(detection),
            fuzzing: answered(fuzzing),
            detection_answers: Answers::of(detection),
            fuzzing_answers: Answers::of(fuzzing),
            detection_auroc: detection.and_then(|s| s.auroc),
            fuzzing_auroc: fuzzing.and_then(|s| s.auroc),
        }
    }
    /// One scorer's accuracy and answers.
    fn scorer(&self, fuzzing: bool) -> (Option<f64>, Answers) {
        if fuzzing {
            (self.fuzzing, self.fuzzing_answers)
        } else {
            (self.detection, self.detection_answers)
        }
    }
    /// One scorer's AUROC of P(yes).
    fn auroc(&self, fuzzing: bool) -> Option<f64> {
        if fuzzing {
            self.fuzzing_auroc
        } else {
            self.detection_auroc
        }
    }
}

/// One feature scored with its own explanation and with another feature's.
#[derive(Debug, Clone, Serialize)]
pub struct ControlRow {
    /// The feature whose examples were scored.
    pub feature: u32,
    /// The feature whose explanation was the shuffled one.
    pub explanation_of: u32,
    /// With the feature's own explanation.
    pub real: Accuracies,
    /// With `explanation_of`'s explanation.
    pub shuffled: Accuracies,
}

/// The spread of one score over the features that have it.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Spread {
    /// Features with this score.
    pub n: usize,
    /// Their mean.
    pub mean: f64,
    /// 25th percentile (linear interpolation between order statistics, as numpy's default).
    pub q25: f64,
    /// The median.
    pub median: f64,
    /// 75th percentile.
    pub q75: f64,
}

impl Spread {
    fn of(values: impl Iterator<Item = f64>) -> Spread {
        let mut v: Vec<f64> = values.collect();
        if v.is_empty() {
            return Spread::default();
        }
        v.sort_by(f64::total_cmp);
        let at = |q: f64| {
            let pos = q * (v.len() - 1) as f64;
            let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
            v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
        };
        Spread {
            n: v.len(),
            mean: v.iter().sum::<f64>() / v.len() as f64,
            q25: at(0.25),
            median: at(0.5),
            q75: at(0.75),
        }
    }
}

/// Detection and fuzzing spreads side by side, with how often the real explanation beat the shuffled one
/// on the same feature (ties count half).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Comparison {
    /// Spread of the real explanations' scores.
    pub real: Spread,
    /// Spread of the shuffled explanations' scores.
    pub shuffled: Spread,
    /// Share of features with both scores where the real one is higher.
    pub real_wins: f64,
    /// The real explanations' answers, summed over the features.
    pub real_answers: Answers,
    /// The shuffled explanations' answers, summed over the features.
    pub shuffled_answers: Answers,
    /// The same comparison on the AUROC of P(yes), when the answers were read from log-probabilities.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auroc: Option<AurocComparison>,
}

/// Real against shuffled on the AUROC of P(yes).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct AurocComparison {
    /// Spread of the real explanations' AUROCs.
    pub real: Spread,
    /// Spread of the shuffled explanations' AUROCs.
    pub shuffled: Spread,
    /// Share of features with both where the real one is higher (ties half).
    pub real_wins: f64,
}

/// Real and shuffled spreads of one metric, and the share of features where the real one is higher.
fn compare(rows: &[ControlRow], pick: impl Fn(&Accuracies) -> Option<f64>) -> (Spread, Spread, f64) {
    let pairs: Vec<(f64, f64)> = rows.iter().filter_map(|r| Some((pick(&r.real)?, pick(&r.shuffled)?))).collect();
    let wins: f64 = pairs.iter().map(|&(r, s)| win(r, s)).sum();
    (
        Spread::of(rows.iter().filter_map(|r| pick(&r.real))),
        Spread::of(rows.iter().filter_map(|r| pick(&r.shuffled))),
        if pairs.is_empty() { 0.0 } else { wins / pairs.len() as f64 },
    )
}

impl Comparison {
    fn of(rows: &[ControlRow], fuzzing: bool) -> Comparison {
        let sum = |a: fn(&ControlRow) -> &Accuracies| {
            rows.iter().fold(Answers::default(), |t, r| t.add(a(r).scorer(fuzzing).1))
        };
        let (real, shuffled, real_wins) = compare(rows, |a| a.scorer(fuzzing).0);
        let (real_auroc, shuffled_auroc, auroc_wins) = compare(rows, |a| a.auroc(fuzzing));
        Comparison {
            real,
            shuffled,
            real_wins,
            real_answers: sum(|r| &r.real),
            shuffled_answers: sum(|r| &r.shuffled),
            auroc: (real_auroc.n > 0).then_some(AurocComparison {
                real: real_auroc,
                shuffled: shuffled_auroc,
                real_wins: auroc_wins,
            }),
        }
    }
}

/// What a control run measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ControlSummary {
    /// The explainer (and scorer) model.
    pub model: String,
    /// Detection, real against shuffled.
    pub detection: Comparison,
    /// Fuzzing, real against shuffled.
    pub fuzzing: Comparison,
    /// Every feature scored, in id order.
    pub features: Vec<ControlRow>,
    /// Requested features this model has not explained (nothing to shuffle).
    pub unexplained: usize,
    /// Features whose scoring failed: (feature, why).
    pub failed: Vec<(u32, String)>,
    /// Prompt tokens spent, as the API reported them.
    pub prompt_tokens: u64,
    /// Completion tokens spent, as the API reported them.
    pub completion_tokens: u64,
    /// Wall time of the run.
    pub seconds: f64,
}

/// The explanation each feature is scored with in the control: the explained features in a seeded random
/// order, each given the next one's (a cyclic shift of a permutation, so none keeps its own).
pub fn derangement(explained: &[u32], seed: u64) -> Vec<(u32, u32)> {
    let mut order = explained.to_vec();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_c0de));
    let mut pairs: Vec<(u32, u32)> = (0..order.len()).map(|i| (order[i], order[(i + 1) % order.len()])).collect();
    pairs.sort_unstable();
    pairs
}

/// A feature to score: its id, its own explanation, and another feature's id and explanation.
struct Task {
    id: u32,
    own: String,
    other: u32,
    other_text: String,
}

/// Score the features of `opts.features` that `client`'s model has explained, each with its own and
/// with another feature's explanation, on the same examples ([`crate::run::score_explanation`]).
pub fn score_shuffled_control(
    db_path: &Path,
    client: &ChatClient,
    opts: &ExplainOptions,
) -> ExplainResult<ControlSummary> {
    let db = FeatureDb::open(db_path)?;
    let heldout = db.heldout()?;
    let mut summary = ControlSummary { model: client.model().to_string(), ..Default::default() };
    let mut text_of = std::collections::BTreeMap::new();
    for &id in &opts.features {
        let rec = db.feature(id)?;
        match rec.and_then(|r| r.explanations.into_iter().find(|e| e.model == client.model())) {
            Some(e) => _ = text_of.insert(id, e.text),
            None => summary.unexplained += 1,
        }
    }
    if text_of.len() < 2 {
        bail_input!(
            "{}: the control needs at least 2 of the requested features explained by {} ({} are); run `saekit explain` first",
            db_path.display(),
            client.model(),
            text_of.len()
        );
    }
    let ids: Vec<u32> = text_of.keys().copied().collect();
    let tasks: VecDeque<Task> = derangement(&ids, opts.examples.seed)
        .into_iter()
        .map(|(id, other)| Task { id, own: text_of[&id].clone(), other, other_text: text_of[&other].clone() })
        .collect();
    let t0 = Instant::now();
    let mut fatal = None;
    in_parallel(
        tasks,
        opts.concurrency,
        |t| score_pair(&db, &heldout, client, t, opts),
        |r| {
            match r {
                Ok((row, usage)) => {
                    summary.prompt_tokens += usage.prompt_tokens;
                    summary.completion_tokens += usage.completion_tokens;
                    match row {
                        Ok(row) => summary.features.push(row),
                        Err(failed) => summary.failed.push(failed),
                    }
                }
                Err(e) => _ = fatal.get_or_insert(chat_stop(e)),
            }
            fatal.is_none()
        },
    );
    summary.seconds = t0.elapsed().as_secs_f64();
    if let Some((fault, msg)) = fatal {
        return Err(fault.mark(anyhow::anyhow!("the shuffled control stopped: {msg}")).into());
    }
    summary.features.sort_by_key(|r| r.feature);
    summary.detection = Comparison::of(&summary.features, false);
    summary.fuzzing = Comparison::of(&summary.features, true);
    Ok(summary)
}

type Scored = (Result<ControlRow, (u32, String)>, Usage);

/// Both scorers on one feature's examples, with its own explanation and then with the other one.
fn score_pair(
    db: &FeatureDb,
    heldout: &[HeldOutWindow],
    client: &ChatClient,
    t: Task,
    opts: &ExplainOptions,
) -> Result<Scored, ChatError> {
    let mut usage = Usage::default();
    let rec = match read_feature(db, t.id) {
        Ok(r) => r,
        Err(why) => return Ok((Err((t.id, why)), usage)),
    };
    let ex = examples_of(db, heldout, &rec, opts);
    let (d, f) = score_explanation(client, &t.own, &ex, t.id, opts, &mut usage)?;
    let (sd, sf) = score_explanation(client, &t.other_text, &ex, t.id, opts, &mut usage)?;
    let row = ControlRow {
        feature: t.id,
        explanation_of: t.other,
        real: Accuracies::of(d, f),
        shuffled: Accuracies::of(sd, sf),
    };
    Ok((Ok(row), usage))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_derangement_moves_every_explanation_and_uses_each_once() {
        for n in 2..40u32 {
            let ids: Vec<u32> = (0..n).map(|i| i * 3 + 1).collect();
            let pairs = derangement(&ids, n as u64);
            assert_eq!(pairs.iter().map(|p| p.0).collect::<Vec<_>>(), ids, "every feature once, in id order");
            assert!(pairs.iter().all(|(a, b)| a != b), "n = {n}: a feature kept its own explanation");
            let mut given: Vec<u32> = pairs.iter().map(|p| p.1).collect();
            given.sort_unstable();
            assert_eq!(given, ids, "n = {n}: each explanation used once");
        }
        assert_ne!(derangement(&[1, 2, 3, 4, 5, 6], 1), derangement(&[1, 2, 3, 4, 5, 6], 2), "seeded");
    }

    /// Percentiles against numpy: `np.percentile([0.5, 0.9, 0.6, 0.75, 1.0], [25, 50, 75])` is
    /// `[0.6, 0.75, 0.9]`, and of `[0.1, 0.4]` it is `[0.175, 0.25, 0.325]`.
    #[test]
    fn the_spread_matches_numpy() {
        let s = Spread::of([0.5, 0.9, 0.6, 0.75, 1.0].into_iter());
        assert_eq!((s.n, s.q25, s.median, s.q75), (5, 0.6, 0.75, 0.9));
        assert!((s.mean - 0.75).abs() < 1e-12);
        let s = Spread::of([0.1, 0.4].into_iter());
        for (got, want) in [(s.q25, 0.175), (s.median, 0.25), (s.q75, 0.325)] {
            assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        }
    }

    #[test]
    fn wins_are_counted_per_feature_with_ties_half() {
        let answers = Answers { answered: 3, unanswered: 1, yes: 2 };
        let acc = |d| Accuracies { detection: d, detection_answers: answers, ..Default::default() };
        let row =
            |r: f64, s: Option<f64>| ControlRow { feature: 0, explanation_of: 1, real: acc(Some(r)), shuffled: acc(s) };
        let rows = [row(0.9, Some(0.5)), row(0.5, Some(0.5)), row(0.4, Some(0.6)), row(0.8, None)];
        let c = Comparison::of(&rows, false);
        assert_eq!(c.real_wins, 1.5 / 3.0, "the row without a shuffled score is left out of the pairs");
        assert_eq!((c.real.n, c.shuffled.n), (4, 3));
        assert_eq!(c.real_answers, Answers { answered: 12, unanswered: 4, yes: 8 }, "summed over every row");
        assert_eq!(Comparison::of(&rows, true).real_answers, Answers::default(), "fuzzing was not scored");
    }
}
