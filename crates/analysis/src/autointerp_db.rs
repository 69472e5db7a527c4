//! The autointerp tables of a feature database: held-out windows (written by `analyze`, read by the
//! scorers as text where a feature is 0) and scored LLM explanations (written by `saekit explain`, read
//! by the browser and `saekit feature`). Both are added to a finished database, so databases written
//! before them stay readable (the tables are simply absent). Schema in `docs/feature-db.md`.

use crate::error::AnalysisResult;
use std::collections::HashSet;
use std::path::Path;

use anyhow::{Context as _, Result};
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

/// How well an explanation predicts the feature on one scorer's examples, with the metrics delphi's
/// `compute_classification_metrics` reports. The counts are examples: `tp` activating ones the scorer
/// said match, `fn_` activating ones it missed, `tn`/`fp` likewise for the non-activating (detection) or
/// wrongly marked (fuzzing) ones. A rate over an empty class is 0, as in delphi.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Default)]
pub struct Score {
    /// `(tp / (tp + fn) + tn / (tn + fp)) / 2`: 0.5 is chance whatever the class balance (delphi's
    /// "class-balanced accuracy").
    pub balanced_accuracy: f64,
    /// `tp / (tp + fp)`.
    #[serde(default)]
    pub precision: f64,
    /// `tp / (tp + fn)`.
    #[serde(default)]
    pub recall: f64,
    /// The harmonic mean of precision and recall.
    #[serde(default)]
    pub f1: f64,
    /// True positives: activating examples the scorer said match.
    pub tp: u32,
    /// False negatives: activating examples it said do not (`fn` in the stored JSON).
    #[serde(rename = "fn")]
    pub fn_: u32,
    /// True negatives: non-activating (or wrongly marked) examples it rejected.
    pub tn: u32,
    /// False positives: non-activating (or wrongly marked) examples it accepted.
    pub fp: u32,
    /// Examples whose answer could not be read from the reply (not in the counts above).
    pub unparsed: u32,
    /// With answers read from log-probabilities: the AUROC of the scorer's P(yes) between the positive
    /// and the negative examples (ties half). It needs no threshold, so a scorer that leans to one answer
    /// on every example still shows whether it ranks them (delphi's `log_prob` scoring).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auroc: Option<f64>,
}

impl Score {
    /// The score of these counts: balanced accuracy, precision, recall and F1 computed from them.
    pub fn from_counts(tp: u32, fn_: u32, tn: u32, fp: u32, unparsed: u32) -> Score {
        let ratio = |a: u32, b: u32| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        let recall = ratio(tp, tp + fn_);
        let precision = ratio(tp, tp + fp);
        let f1 = if precision + recall > 0.0 { 2.0 * precision * recall / (precision + recall) } else { 0.0 };
        Score {
            balanced_accuracy: (recall + ratio(tn, tn + fp)) / 2.0,
            precision,
            recall,
            f1,
            tp,
            fn_,
            tn,
            fp,
            unparsed,
            auroc: None,
        }
    }

    /// Examples whose answer was read. A score over none measures nothing (a small scorer model that
    /// copies the worked examples' lists answers nothing usable): it is shown as such and not ranked.
    pub fn answered(&self) -> u32 {
        self.tp + self.fn_ + self.tn + self.fp
    }
}

/// One explanation of a feature by one explainer model, with its scores.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Explanation {
    /// The explainer model's name as the endpoint knows it.
    pub model: String,
    /// The one-line explanation the model wrote.
    pub text: String,
    /// The detection score: activating contexts against held-out ones where the feature is 0 (delphi's
    /// `DetectionScorer`); `None` when not scored.
    pub detection: Option<Score>,
    /// The fuzzing score: contexts with marked tokens, half marked on the wrong tokens (delphi's
    /// `FuzzingScorer`); `None` when not scored.
    pub fuzzing: Option<Score>,
    /// Prompt tokens the endpoint reported for explaining and scoring this feature.
    pub prompt_tokens: u64,
    /// Completion tokens the endpoint reported for the same requests.
    pub completion_tokens: u64,
    /// Seconds since the Unix epoch.
    pub created: u64,
}

impl Explanation {
    /// The mean of the balanced accuracies of the scorers that got answers: how explanations of one
    /// feature are ranked.
    pub fn score(&self) -> Option<f64> {
        let s: Vec<f64> = [self.detection, self.fuzzing]
            .iter()
            .flatten()
            .filter(|s| s.answered() > 0)
            .map(|s| s.balanced_accuracy)
            .collect();
        (!s.is_empty()).then(|| s.iter().sum::<f64>() / s.len() as f64)
    }
}

/// A window of held-out text and every feature that fired anywhere in it (attention sinks excluded).
#[derive(Debug, Clone, PartialEq)]
pub struct HeldOutWindow {
    /// Index of the source context in the analysed split (past the contexts in the statistics).
    pub ctx: u64,
    /// Position of the window's first token in that context.
    pub start: u32,
    /// The window's token ids.
    pub ids: Vec<u32>,
    /// Sorted feature ids.
    pub fired: Vec<u32>,
}

const AUTOINTERP_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS heldout (id INTEGER PRIMARY KEY, ctx INTEGER NOT NULL, start INTEGER NOT NULL,
    ids TEXT NOT NULL, fired BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS explanations (
    feature INTEGER NOT NULL, model TEXT NOT NULL, text TEXT NOT NULL,
    detection TEXT, fuzzing TEXT, score REAL,
    prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, created INTEGER NOT NULL,
    PRIMARY KEY (feature, model));
CREATE VIRTUAL TABLE IF NOT EXISTS explanation_text USING fts5(text, tokenize='unicode61 remove_diacritics 2');
";

/// Read-write access to the autointerp tables of an existing feature database.
pub struct AutointerpWriter {
    conn: Connection,
}

impl AutointerpWriter {
    /// Open the feature database at `path` for writing its autointerp tables, creating them when absent;
    /// anything that is not a feature database is refused before a byte is written.
    pub fn open(path: &Path) -> AnalysisResult<AutointerpWriter> {
        // refuses anything that is not a feature database before writing to it
        crate::FeatureDb::open(path)?;
        let conn = Connection::open(path).with_context(|| format!("{}: cannot open for writing", path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(30))?;
        conn.execute_batch(AUTOINTERP_SCHEMA)
            .with_context(|| format!("{}: adding the autointerp tables", path.display()))?;
        Ok(AutointerpWriter { conn })
    }

    /// Replace the held-out windows.
    pub fn set_heldout(&mut self, windows: &[HeldOutWindow]) -> AnalysisResult<()> {
        let tx = self.conn.transaction()?;
        tx.execute("DELETE FROM heldout", [])?;
        {
            let mut st = tx.prepare("INSERT INTO heldout (id, ctx, start, ids, fired) VALUES (?1, ?2, ?3, ?4, ?5)")?;
            for (i, w) in windows.iter().enumerate() {
                let fired: Vec<u8> = w.fired.iter().flat_map(|f| f.to_le_bytes()).collect();
                let blob = zstd::bulk::compress(&fired, 3)?;
                st.execute(params![i as i64, w.ctx as i64, w.start as i64, serde_json::to_string(&w.ids)?, blob])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Features that already have an explanation by `model` (a resumed run skips them).
    pub fn explained_by(&self, model: &str) -> AnalysisResult<HashSet<u32>> {
        let mut st = self.conn.prepare("SELECT feature FROM explanations WHERE model = ?1")?;
        let rows = st.query_map([model], |r| r.get::<_, i64>(0))?;
        rows.map(|r| Ok(r? as u32)).collect()
    }

    /// Store (or replace) `feature`'s explanation by `e.model`, and index its text for search.
    pub fn put(&mut self, feature: u32, e: &Explanation) -> AnalysisResult<()> {
        let tx = self.conn.transaction()?;
        let old: Option<i64> = tx
            .query_row(
                "SELECT rowid FROM explanations WHERE feature = ?1 AND model = ?2",
                params![feature, e.model],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(rowid) = old {
            tx.execute("DELETE FROM explanation_text WHERE rowid = ?1", [rowid])?;
            tx.execute("DELETE FROM explanations WHERE rowid = ?1", [rowid])?;
        }
        tx.execute(
            "INSERT INTO explanations (feature, model, text, detection, fuzzing, score, prompt_tokens, \
             completion_tokens, created) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                feature,
                e.model,
                e.text,
                e.detection.map(|s| serde_json::to_string(&s)).transpose()?,
                e.fuzzing.map(|s| serde_json::to_string(&s)).transpose()?,
                e.score(),
                e.prompt_tokens as i64,
                e.completion_tokens as i64,
                e.created as i64
            ],
        )?;
        let rowid = tx.last_insert_rowid();
        tx.execute("INSERT INTO explanation_text (rowid, text) VALUES (?1, ?2)", params![rowid, e.text])?;
        tx.commit()?;
        Ok(())
    }
}

fn has_table(conn: &Connection, name: &str) -> Result<bool> {
    Ok(conn.query_row("SELECT 1 FROM sqlite_master WHERE name = ?1", [name], |_| Ok(())).optional()?.is_some())
}

/// A feature's explanations, best score first (unscored last, then newest).
pub(crate) fn explanations_of(conn: &Connection, feature: u32) -> Result<Vec<Explanation>> {
    if !has_table(conn, "explanations")? {
        return Ok(Vec::new());
    }
    let mut st = conn.prepare_cached(
        "SELECT model, text, detection, fuzzing, prompt_tokens, completion_tokens, created FROM explanations \
         WHERE feature = ?1 ORDER BY score IS NULL, score DESC, created DESC",
    )?;
    let rows = st.query_map([feature as i64], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, Option<String>>(2)?,
            r.get::<_, Option<String>>(3)?,
            r.get::<_, i64>(4)?,
            r.get::<_, i64>(5)?,
            r.get::<_, i64>(6)?,
        ))
    })?;
    let score = |s: Option<String>| -> Result<Option<Score>> {
        s.map(|s| serde_json::from_str(&s).context("a stored explanation score is not valid JSON")).transpose()
    };
    let mut out = Vec::new();
    for row in rows {
        let (model, text, det, fuzz, pt, ct, created) = row?;
        out.push(Explanation {
            model,
            text,
            detection: score(det)?,
            fuzzing: score(fuzz)?,
            prompt_tokens: pt as u64,
            completion_tokens: ct as u64,
            created: created as u64,
        });
    }
    Ok(out)
}

/// Features whose explanations match all of `fts` (an FTS5 query), best match first.
pub(crate) fn search_explanations(conn: &Connection, fts: &str, limit: usize) -> Result<Vec<u32>> {
    if !has_table(conn, "explanation_text")? {
        return Ok(Vec::new());
    }
    let mut st = conn.prepare_cached(
        "SELECT e.feature FROM (SELECT rowid, rank FROM explanation_text WHERE explanation_text MATCH ?1 \
         ORDER BY rank LIMIT ?2) m JOIN explanations e ON e.rowid = m.rowid ORDER BY m.rank",
    )?;
    let rows = st.query_map(params![fts, limit as i64], |r| r.get::<_, i64>(0))?;
    let mut out: Vec<u32> = Vec::new();
    for r in rows {
        let f = r? as u32;
        if !out.contains(&f) {
            out.push(f);
        }
    }
    Ok(out)
}

/// Every held-out window, in order.
pub(crate) fn heldout_windows(conn: &Connection) -> Result<Vec<HeldOutWindow>> {
    if !has_table(conn, "heldout")? {
        return Ok(Vec::new());
    }
    let mut st = conn.prepare("SELECT ctx, start, ids, fired FROM heldout ORDER BY id")?;
    let rows = st.query_map([], |r| {
        Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, String>(2)?, r.get::<_, Vec<u8>>(3)?))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (ctx, start, ids, fired) = row?;
        let fired = zstd::stream::decode_all(&fired[..]).context("a held-out window's feature set is corrupt")?;
        out.push(HeldOutWindow {
            ctx: ctx as u64,
            start: start as u32,
            ids: serde_json::from_str(&ids).context("a held-out window's tokens are not valid")?,
            fired: fired.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        });
    }
    Ok(out)
}
