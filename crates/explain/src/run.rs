//! Explain and score many features: `concurrency` worker threads (so at most that many requests in
//! flight), each taking the next feature, explaining it and running both scorers; the calling thread
//! stores each result as it arrives (a stopped run keeps everything finished) and draws the progress bar.
//! Features that already have an explanation by the same model are skipped, so a rerun resumes.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use saekit_analysis::{AutointerpWriter, Explanation, FeatureDb, FeatureRecord, HeldOutWindow, Score};
use saekit_files::Fault;
use serde::Serialize;

use crate::client::{ChatClient, ChatError};
use crate::error::{bail_input, ExplainResult};
use crate::examples::{select, ExampleOptions, FeatureExamples};
use crate::prompts::{explainer_messages, parse_explanation};
use crate::score::{detection, fuzzing, Scoring, Usage};

/// Tokens the explainer may write: a short look at the examples and one line. Within what `saekit serve`
/// allows by default (`--max-new-tokens 128`), so a plain serve can be the explainer.
const EXPLAINER_MAX_TOKENS: u32 = 128;

/// What `saekit explain` explains and how.
#[derive(Debug, Clone)]
pub struct ExplainOptions {
    /// The features to explain (empty: every feature).
    pub features: Vec<u32>,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// How many examples each prompt shows.
    pub examples: ExampleOptions,
    /// How the scorers ask.
    pub scoring: Scoring,
    /// Show a progress bar.
    pub progress: bool,
}

/// What a run did, counted.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ExplainSummary {
    /// Features explained (and scored) in this run.
    pub explained: usize,
    /// Already explained by this model (skipped).
    pub already_done: usize,
    /// Never fired in the analysis: nothing to explain.
    pub dead: usize,
    /// Features whose explainer request failed or gave an empty reply: (feature, why).
    pub failed: Vec<(u32, String)>,
    /// Prompt tokens spent, as the API reported them.
    pub prompt_tokens: u64,
    /// Completion tokens spent, as the API reported them.
    pub completion_tokens: u64,
    /// Wall time of the run.
    pub seconds: f64,
    /// Features without held-out text where they are 0 (detection not scored).
    pub no_negatives: usize,
}

enum Outcome {
    Done(u32, Explanation),
    Dead,
    Failed(u32, String),
}

/// Explain and score `opts.features` of the database at `db_path` with `client`, storing each result.
pub fn explain_features(db_path: &Path, client: &ChatClient, opts: &ExplainOptions) -> ExplainResult<ExplainSummary> {
    let db = FeatureDb::open(db_path)?;
    let heldout = db.heldout()?;
    if heldout.is_empty() {
        tracing::warn!(
            "{}: no held-out windows (a database from an older `saekit analyze`); detection is not scored",
            db_path.display()
        );
    }
    let mut writer = AutointerpWriter::open(db_path)?;
    let done = writer.explained_by(client.model())?;
    let mut summary = ExplainSummary::default();
    let todo: VecDeque<u32> = opts
        .features
        .iter()
        .copied()
        .filter(|f| {
            let skip = done.contains(f);
            summary.already_done += skip as usize;
            !skip
        })
        .collect();
    let pb = progress_bar(opts.progress, todo.len() as u64);
    let t0 = Instant::now();
    let mut fatal = None;
    let work = |id| explain_one(&db, &heldout, client, id, opts);
    in_parallel(todo, opts.concurrency, work, |r| {
        match r {
            Ok(Outcome::Done(id, e)) => {
                summary.prompt_tokens += e.prompt_tokens;
                summary.completion_tokens += e.completion_tokens;
                summary.no_negatives += e.detection.is_none() as usize;
                if let Err(err) = writer.put(id, &e) {
                    fatal.get_or_insert((err.fault(), format!("{}: storing feature {id}: {err:#}", db_path.display())));
                }
                summary.explained += 1;
            }
            Ok(Outcome::Dead) => summary.dead += 1,
            Ok(Outcome::Failed(id, why)) => summary.failed.push((id, why)),
            Err(e) => {
                fatal.get_or_insert(chat_stop(e));
            }
        }
        pb.inc(1);
        let mins = t0.elapsed().as_secs_f64() / 60.0;
        pb.set_message(format!(
            "{:.1} features/min, {} tokens",
            (summary.explained + summary.failed.len()) as f64 / mins.max(1e-9),
            summary.prompt_tokens + summary.completion_tokens
        ));
        fatal.is_none()
    });
    pb.finish_and_clear();
    summary.seconds = t0.elapsed().as_secs_f64();
    if let Some((fault, msg)) = fatal {
        let done = summary.explained + summary.failed.len();
        let e = anyhow::anyhow!("stopped after {done} features ({} stored; a rerun resumes): {msg}", summary.explained);
        return Err(fault.mark(e).into());
    }
    Ok(summary)
}

fn progress_bar(on: bool, n: u64) -> indicatif::ProgressBar {
    if !on {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(n);
    pb.set_style(
        indicatif::ProgressStyle::with_template("explain {bar:30} {pos}/{len} features  {msg}  eta {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    pb
}

/// Run `work` on each of `items` from `concurrency` threads (so at most that many requests in flight),
/// handing each result to `take` on the calling thread as it arrives. `take` returning false stops the
/// run, as does a fatal chat error once `take` has seen it; items not yet started are left.
pub(crate) fn in_parallel<T: Send, R: Send>(
    items: VecDeque<T>,
    concurrency: usize,
    work: impl Fn(T) -> Result<R, ChatError> + Sync,
    mut take: impl FnMut(Result<R, ChatError>) -> bool,
) {
    let queue = Mutex::new(items);
    let stop = AtomicBool::new(false);
    let (tx, rx) = mpsc::channel::<Result<R, ChatError>>();
    std::thread::scope(|s| {
        for _ in 0..concurrency.max(1) {
            let tx = tx.clone();
            let (queue, stop, work) = (&queue, &stop, &work);
            s.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Some(item) = queue.lock().ok().and_then(|mut q| q.pop_front()) else { break };
                    let r = work(item);
                    let is_fatal = matches!(r, Err(ChatError::Fatal(_)));
                    if tx.send(r).is_err() || is_fatal {
                        stop.store(true, Ordering::Relaxed);
                        break;
                    }
                }
            });
        }
        drop(tx);
        for r in rx {
            let is_fatal = matches!(r, Err(ChatError::Fatal(_)));
            if !take(r) || is_fatal {
                stop.store(true, Ordering::Relaxed);
            }
        }
    });
}

/// Whose fault a chat error that ended a run is: a stop (bad key, URL or model) is the caller's to fix.
pub(crate) fn chat_stop(e: ChatError) -> (Fault, String) {
    let fault = if matches!(e, ChatError::Fatal(_)) { Fault::BadInput } else { Fault::Other };
    (fault, e.to_string())
}

/// Explain one feature and score the explanation.
fn explain_one(
    db: &FeatureDb,
    heldout: &[HeldOutWindow],
    client: &ChatClient,
    id: u32,
    opts: &ExplainOptions,
) -> Result<Outcome, ChatError> {
    let rec = match read_feature(db, id) {
        Ok(r) => r,
        Err(why) => return Ok(Outcome::Failed(id, why)),
    };
    if rec.n_fired == 0 || rec.top_contexts.is_empty() {
        return Ok(Outcome::Dead);
    }
    let ex = examples_of(db, heldout, &rec, opts);
    let mut usage = Usage::default();
    let reply = match client.chat(&explainer_messages(&ex.explain, rec.max_act), EXPLAINER_MAX_TOKENS) {
        Ok(r) => r,
        Err(e @ ChatError::Fatal(_)) => return Err(e),
        Err(ChatError::Failed(m)) => return Ok(Outcome::Failed(id, m)),
    };
    usage.prompt_tokens += reply.prompt_tokens;
    usage.completion_tokens += reply.completion_tokens;
    let Some(explanation) = parse_explanation(&reply.text) else {
        return Ok(Outcome::Failed(id, "the explainer's reply was empty".into()));
    };
    let (det, fuzz) = score_explanation(client, &explanation, &ex, id, opts, &mut usage)?;
    Ok(Outcome::Done(
        id,
        Explanation {
            model: client.model().to_string(),
            text: explanation,
            detection: det,
            fuzzing: fuzz,
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            created: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        },
    ))
}

/// Feature `id`'s record, or why it cannot be read (that feature fails; the run goes on).
pub(crate) fn read_feature(db: &FeatureDb, id: u32) -> Result<FeatureRecord, String> {
    match db.feature(id) {
        Ok(Some(r)) => Ok(r),
        Ok(None) => Err("not in the database".into()),
        Err(e) => Err(format!("{e:#}")),
    }
}

/// `rec`'s examples for the explainer and scorers, held-out windows rendered with the database's vocabulary.
pub(crate) fn examples_of(
    db: &FeatureDb,
    heldout: &[HeldOutWindow],
    rec: &FeatureRecord,
    opts: &ExplainOptions,
) -> FeatureExamples {
    let text = |t: u32| db.token_text(t).unwrap_or_else(|_| format!("<{t}>"));
    select(rec, heldout, text, &opts.examples)
}

/// Detection and fuzzing of `explanation` on feature `id`'s test examples `ex`, seeded by the run's seed
/// and the feature (so a rerun, or the shuffled control, scores on the same examples in the same order).
/// A scorer without enough examples is not run.
pub(crate) fn score_explanation(
    client: &ChatClient,
    explanation: &str,
    ex: &FeatureExamples,
    id: u32,
    opts: &ExplainOptions,
    usage: &mut Usage,
) -> Result<(Option<Score>, Option<Score>), ChatError> {
    let seed = opts.examples.seed ^ id as u64;
    let det = if ex.activating.len() >= 2 && ex.non_activating.len() >= 2 {
        Some(detection(client, explanation, &ex.activating, &ex.non_activating, opts.scoring, seed, usage)?)
    } else {
        None
    };
    let fuzz = if ex.activating.len() >= 2 {
        Some(fuzzing(client, explanation, &ex.activating, opts.scoring, seed, usage)?)
    } else {
        None
    };
    Ok((det, fuzz))
}

/// `0-999`, `5,7,10-12`: feature ids, each below `n`.
pub fn parse_feature_list(spec: &str, n: u32) -> ExplainResult<Vec<u32>> {
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let not_id = |e: std::num::ParseIntError| {
            let e = anyhow::Error::from(e).context(format!("--features: '{part}' is not an id or a range like 0-999"));
            Fault::BadInput.mark(e)
        };
        let a: u32 = a.parse().map_err(not_id)?;
        let b: u32 = b.parse().map_err(not_id)?;
        if a > b || b >= n {
            bail_input!("--features: '{part}' is not within 0-{}", n.saturating_sub(1));
        }
        out.extend(a..=b);
    }
    if out.is_empty() {
        bail_input!("--features selects no feature");
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feature_lists() {
        assert_eq!(parse_feature_list("0-3, 7,2", 10).unwrap(), [0, 1, 2, 3, 7]);
        assert!(parse_feature_list("5-2", 10).is_err());
        assert!(parse_feature_list("0-10", 10).unwrap_err().to_string().contains("0-9"));
        assert!(parse_feature_list("x", 10).is_err());
    }
}
