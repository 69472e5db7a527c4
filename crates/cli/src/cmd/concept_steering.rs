//! `saekit bench concept-steering`: does the feature that concept search ranks first steer the model
//! toward its concept more often than the feature it ranks tenth?
//!
//! Each concept of a labelled corpus gets its feature ranking, made as `saekit demo` makes it. Each
//! compared rank's feature is clamped at a multiple of its max activation while the model answers neutral
//! chat prompts (greedy). A character n-gram detector judges every answer. The detector is trained on the
//! corpus's texts and knows nothing of the model or the SAE ([`saekit_analysis::detector`]). One JSON line
//! per concept, then a summary line.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use saekit_analysis::concepts::{rank_concept_features, train_concept_detectors, TrainedDetector};
use saekit_analysis::search::ContrastHit;
use saekit_analysis::FeatureDb;
use saekit_model::{GenerateOptions, HookPoint, Hooks, Model};
use saekit_sae::Sae;
use saekit_steer::{
    answered_chats, generate_steered, ClampLift, FeatureEdit, Positions, SteeringChoice, PROBE_PROMPTS,
};
use serde_json::json;

use super::model_arg::ModelArgs;

#[derive(clap::Args, Debug)]
pub struct ConceptSteeringArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// SAE folder whose features are ranked and clamped.
    #[arg(long)]
    pub sae: PathBuf,
    /// Feature database of that SAE (for each feature's max activation: the clamp is a multiple of it).
    #[arg(long)]
    pub db: PathBuf,
    /// Labelled corpus: a folder of .jsonl with text/kind/lang fields, as `saekit corpus fetch` writes it
    /// (the demo's `corpus/`).
    #[arg(long)]
    pub corpus: PathBuf,
    /// Documents per concept the features are ranked on (the demo's --concept-docs).
    #[arg(long, default_value_t = 24)]
    pub docs: usize,
    /// Documents per group the detectors learn from (half) and are tested on (the other half).
    #[arg(long, default_value_t = 200)]
    pub detector_docs: usize,
    /// Ranks compared, comma-separated (1 = the best feature). The summary sets the first against the last.
    #[arg(long, default_value = "1,10")]
    pub ranks: String,
    /// The ranking whose ranks are compared: `auroc` (how well a feature tells the concept's texts from
    /// the rest, as `saekit search --pos/--neg` lists them) or `steer` (the best --candidates of those,
    /// reordered by how far clamping each moves the model toward the concept's tokens on separate probe
    /// prompts: the order the demo steers with).
    #[arg(long, value_enum, default_value_t = Order::Steer)]
    pub order: Order,
    /// Features by AUROC that `--order steer` measures.
    #[arg(long, default_value_t = 32)]
    pub candidates: usize,
    /// Clamp value as a multiple of the feature's max activation (the demo's 3x).
    #[arg(long, default_value_t = 3.0)]
    pub times: f32,
    /// Neutral chat prompts answered (at most the 16 built in).
    #[arg(long, default_value_t = 16)]
    pub prompts: usize,
    /// New tokens per answer.
    #[arg(long, default_value_t = 32)]
    pub tokens: usize,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq)]
pub enum Order {
    Auroc,
    Steer,
}

/// Chat prompts with no concept of the demo corpus in them, none of them among the
/// [`saekit_steer::PROBE_PROMPTS`] on which the steering order is chosen.
const PROMPTS: [&str; 16] = [
    "Tell me about your weekend.",
    "What is your favourite food?",
    "Write a short story about a cat.",
    "How can I sleep better?",
    "Describe the weather today.",
    "What book should I read next?",
    "Explain how a bicycle works.",
    "Give me advice for a job interview.",
    "What do you like to do in the evening?",
    "Describe your ideal holiday.",
    "How do I make a cup of tea?",
    "What is a good name for a dog?",
    "Tell me something about the ocean.",
    "How should I plan a birthday party?",
    "What makes a good friend?",
    "Write a short poem about autumn.",
];

pub fn run(a: ConceptSteeringArgs) -> Result<()> {
    let ranks = parse_ranks(&a.ranks)?;
    let model = a.model.load()?;
    let (sae, hook, db) = open_sae_and_db(&a.sae, &a.db)?;
    let detectors = train_concept_detectors(&a.corpus, a.detector_docs)?;
    let rankings = rank_concept_features(&model, &sae, hook, &a.corpus, a.docs)?;
    let opts = GenerateOptions { max_new_tokens: a.tokens, ..Default::default() };
    let prompts = PROMPTS
        .iter()
        .take(a.prompts.max(1))
        .map(|p| super::generate::prompt_ids(&model, p, true, None))
        .collect::<Result<Vec<_>>>()?;
    let unsteered = answers(&prompts, |ids| Ok(model.generate(ids, &opts, &mut Hooks::new())?))?;
    let steer = Steerer { model: &model, sae: &sae, hook, opts: &opts, prompts: &prompts };
    let max_act = max_activation(&db);
    let probes = answered_chats(&model, &PROBE_PROMPTS, a.tokens)?;
    let choice = SteeringChoice { model: &model, sae: &sae, hook, times: a.times, candidates: a.candidates };
    let mut tally = Tally::default();
    for ranking in &rankings {
        let Some(det) = detectors.iter().find(|d| d.concept == ranking.concept) else { continue };
        let picks = match a.order {
            Order::Steer => steering_order(&choice, &ranking.hits, &ranking.token_weights, &probes, &max_act)?,
            Order::Auroc => ranking
                .hits
                .iter()
                .take(ranks.iter().copied().max().unwrap_or(1))
                .map(|h| Ok(SteerPick { hit: h.clone(), max_act: max_act(h.id)?, lift: None }))
                .collect::<Result<Vec<_>>>()?,
        };
        let base = judge(det, &unsteered, None);
        let mut rows = Vec::new();
        for &rank in &ranks {
            let Some(pick) = picks.get(rank - 1).filter(|p| p.max_act > 0.0) else { continue };
            let texts = steer.answers(FeatureEdit::Clamp { feature: pick.hit.id, value: a.times * pick.max_act })?;
            let judged = judge(det, &texts, Some(&base.log_odds));
            tracing::info!(
                concept = ranking.concept,
                rank,
                feature = pick.hit.id,
                detected = judged.detected,
                "steered"
            );
            rows.push(RankRow { rank, pick, judged, first_answer: texts[0].clone() });
        }
        let first_beats_last = tally.add(&rows);
        println!(
            "{}",
            json!({"concept": ranking.concept, "texts_ranked_on": ranking.n_pos, "times_max": a.times,
                "detector_texts": det.n_train, "detector_held_out_balanced_accuracy": det.held_out_accuracy,
                "unsteered": base, "ranks": rows, "first_beats_last": first_beats_last})
        );
    }
    println!(
        "{}",
        json!({"summary": format!("rank {} against rank {}", ranks[0], ranks[ranks.len() - 1]),
            "order": format!("{:?}", a.order).to_lowercase(), "prompts": prompts.len(), "new_tokens": a.tokens,
            "times_max": a.times, "concepts": tally})
    );
    Ok(())
}

/// The SAE, its hook, and its feature database, refused when the database was made for another SAE.
fn open_sae_and_db(sae_path: &Path, db_path: &Path) -> Result<(Sae, HookPoint, FeatureDb)> {
    let sae = saekit_sae::load_sae(sae_path)?;
    let hook: HookPoint =
        sae.metadata.hook_name.parse().with_context(|| format!("{}: the SAE names no hook", sae_path.display()))?;
    let db = FeatureDb::open(db_path)?;
    db.check_made_for(&sae).with_context(|| format!("SAE {}", sae_path.display()))?;
    Ok((sae, hook, db))
}

/// One compared rank of one concept: the feature, and how its steered answers were judged.
#[derive(serde::Serialize)]
struct RankRow<'a> {
    rank: usize,
    #[serde(flatten)]
    pick: &'a SteerPick,
    #[serde(flatten)]
    judged: Judged,
    first_answer: String,
}

/// Over all concepts, the first rank compared against the last.
#[derive(Default, serde::Serialize)]
struct Tally {
    /// Concepts where the first rank's answers were judged the concept's more often than the last's.
    first_detected_more_often: usize,
    as_often: usize,
    less_often: usize,
    /// Prompts (over all concepts) where the first rank's answer read more like the concept than the
    /// last rank's, and the prompts compared.
    first_beats_last: usize,
    prompts_compared: usize,
}

impl Tally {
    /// Count one concept's rows; returns on how many prompts the first rank beat the last.
    fn add(&mut self, rows: &[RankRow]) -> usize {
        let (Some(first), Some(last)) = (rows.first(), rows.last()) else { return 0 };
        match first.judged.detected.cmp(&last.judged.detected) {
            std::cmp::Ordering::Greater => self.first_detected_more_often += 1,
            std::cmp::Ordering::Equal => self.as_often += 1,
            std::cmp::Ordering::Less => self.less_often += 1,
        }
        let pairs = first.judged.log_odds.iter().zip(&last.judged.log_odds);
        let beats = pairs.filter(|(f, l)| f > l).count();
        self.first_beats_last += beats;
        self.prompts_compared += first.judged.log_odds.len();
        beats
    }
}

/// A concept feature to steer with: how it ranks the concept's texts, its max activation in the feature
/// database, and the lift measured when it was chosen (`None` in AUROC order).
#[derive(Debug, serde::Serialize)]
pub struct SteerPick {
    pub hit: ContrastHit,
    pub max_act: f32,
    pub lift: Option<f64>,
}

/// The first `choice.candidates` of `hits` (best first by AUROC) that fired in the database analysis,
/// reordered by how far clamping each moves the model toward the tokens `weights` favours on `probes`
/// ([`SteeringChoice::order`]), best first.
pub fn steering_order(
    choice: &SteeringChoice,
    hits: &[ContrastHit],
    weights: &[f64],
    probes: &[(Vec<u32>, usize)],
    max_act: &dyn Fn(u32) -> Result<f32>,
) -> Result<Vec<SteerPick>> {
    let measured = choice.order(hits.iter().map(|h| h.id), weights, probes, max_act)?;
    let pick = |m: ClampLift| {
        let hit = hits.iter().find(|h| h.id == m.feature)?.clone();
        Some(SteerPick { hit, max_act: m.max_act, lift: Some(m.lift) })
    };
    Ok(measured.into_iter().filter_map(pick).collect())
}

/// Each feature's max activation in `db`, read from its summary row (0 for a feature it does not hold):
/// what a clamp at a multiple of the max needs.
pub fn max_activation(db: &FeatureDb) -> impl Fn(u32) -> Result<f32> + '_ {
    |f| Ok(db.summary(f)?.map_or(0.0, |s| s.max_act))
}

/// The ranks asked for: 1-based, at least one.
fn parse_ranks(s: &str) -> Result<Vec<usize>> {
    let ranks = s
        .split(',')
        .map(|r| match r.trim().parse::<usize>() {
            Ok(n) if n >= 1 => Ok(n),
            _ => bail!("--ranks {s:?}: '{r}' is not a rank (1 is the best feature)"),
        })
        .collect::<Result<Vec<_>>>()?;
    if ranks.is_empty() {
        bail!("--ranks is empty");
    }
    Ok(ranks)
}

/// Generates an answer to every prompt with one feature clamped.
struct Steerer<'a> {
    model: &'a Model,
    sae: &'a Sae,
    hook: HookPoint,
    opts: &'a GenerateOptions,
    prompts: &'a [Vec<u32>],
}

impl Steerer<'_> {
    fn answers(&self, edit: FeatureEdit) -> Result<Vec<String>> {
        answers(self.prompts, |ids| {
            Ok(generate_steered(self.model, self.sae, self.hook, &[edit], Positions::SkipFirst, ids, self.opts)?)
        })
    }
}

/// Each prompt's answer, the end-of-turn marker removed.
fn answers(prompts: &[Vec<u32>], generate: impl Fn(&[u32]) -> Result<saekit_model::Generation>) -> Result<Vec<String>> {
    prompts.iter().map(|ids| Ok(generate(ids)?.text.trim_end_matches("<|im_end|>").to_string())).collect()
}

/// How the detector judged a set of answers, one per prompt.
#[derive(serde::Serialize)]
struct Judged {
    /// Answers it calls the concept's.
    detected: usize,
    /// Of those, answers that are one short string repeated (a clamp too strong for the model reads like
    /// the concept only in its characters).
    detected_repetitive: usize,
    /// Answers that read more like the concept than the unsteered answer to the same prompt.
    #[serde(skip_serializing_if = "Option::is_none")]
    toward: Option<usize>,
    mean_log_odds: f64,
    /// Each answer's log-odds, in prompt order.
    #[serde(skip)]
    log_odds: Vec<f64>,
}

/// Judge `texts`; with `unsteered` (the unsteered answers' log-odds, same prompts) count those moved toward
/// the concept.
fn judge(det: &TrainedDetector, texts: &[String], unsteered: Option<&[f64]>) -> Judged {
    let log_odds: Vec<f64> = texts.iter().map(|t| det.detector.log_odds(t)).collect();
    let detected = log_odds.iter().filter(|&&l| l > 0.0).count();
    let detected_repetitive = texts.iter().zip(&log_odds).filter(|(t, &l)| l > 0.0 && is_repetitive(t)).count();
    let toward = unsteered.map(|u| log_odds.iter().zip(u).filter(|(s, u)| s > u).count());
    let mean_log_odds = log_odds.iter().sum::<f64>() / log_odds.len().max(1) as f64;
    Judged { detected, detected_repetitive, toward, mean_log_odds, log_odds }
}

/// Fewer than a quarter of the text's character trigrams are distinct: "} } } }", "ABABAB".
fn is_repetitive(text: &str) -> bool {
    let chars: Vec<char> = text.chars().collect();
    let trigrams: std::collections::HashSet<&[char]> = chars.windows(3).collect();
    chars.len() >= 3 && (trigrams.len() as f64) < 0.25 * (chars.len() - 2) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repetition_is_told_from_ordinary_text_in_any_script() {
        for t in [" } } } } } } } } } } } }", "ZNvzjYjYjYjYjYjYjYjYjYjYjYjY", "的的的的的的的的的的"] {
            assert!(is_repetitive(t), "{t}");
        }
        for t in ["My weekend is a mix of adventure and relaxation.", "我们今天去公园散步，天气很好。", "ab"]
        {
            assert!(!is_repetitive(t), "{t}");
        }
    }

    #[test]
    fn ranks_are_one_based_and_a_bad_one_is_named() {
        assert_eq!(parse_ranks("1, 10").unwrap(), [1, 10]);
        for bad in ["0", "1,x", ""] {
            let e = parse_ranks(bad).unwrap_err().to_string();
            assert!(e.contains("--ranks"), "{bad}: {e}");
        }
    }
}
