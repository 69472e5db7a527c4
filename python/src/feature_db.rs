//! `saekit.FeatureDb` (the database of `saekit analyze`) and finding features by text.

use std::path::PathBuf;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use saekit_analysis::feature_db::{Context, FeatureRecord, SortBy};
use saekit_analysis::render::merge_tokens;
use saekit_analysis::search::{contrast, search_text, text_features, token_share_difference};
use saekit_analysis::FeatureDb;

use crate::errors::{detached, existing, to_py, to_pyobject};
use crate::model::{sae_hook, PyModel};
use crate::sae::PySae;

/// A feature database written by `saekit analyze` (SQLite; read-only).
#[pyclass(frozen, module = "saekit", name = "FeatureDb")]
pub struct PyFeatureDb {
    pub db: FeatureDb,
}

#[pymethods]
impl PyFeatureDb {
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let path = existing(&path, "feature database")?;
        Ok(PyFeatureDb { db: detached(py, || Ok(FeatureDb::open(&path)?))? })
    }

    /// One feature's record as a dict: density, max_act, explanation, top_contexts (tokens, acts, peak,
    /// and the window as readable `text` and `pieces`), quantiles (their contexts likewise), histogram,
    /// promoted/suppressed tokens, neighbours. `ValueError` for an unknown id.
    fn feature<'py>(&self, py: Python<'py>, id: u32) -> PyResult<Bound<'py, PyAny>> {
        let db = &self.db;
        match detached(py, || Ok(db.feature(id)?))? {
            Some(rec) => to_pyobject(py, &with_readable_contexts(&rec).map_err(to_py)?),
            None => Err(PyValueError::new_err(format!("feature {id} is not in {}", db.path().display()))),
        }
    }

    /// Feature summaries (id, density, max_act, top_tokens) sorted by `"density"`, `"max_act"` or `"id"`.
    #[pyo3(signature = (sort="density", limit=50, offset=0, descending=true))]
    fn features<'py>(
        &self,
        py: Python<'py>,
        sort: &str,
        limit: usize,
        offset: usize,
        descending: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let sort: SortBy = sort.parse().map_err(to_py)?;
        let db = &self.db;
        to_pyobject(py, &detached(py, || Ok(db.list(sort, descending, offset, limit)?))?)
    }

    /// Features whose top contexts, promoted tokens or explanation match the words (or a feature id).
    #[pyo3(signature = (query, limit=30))]
    fn search<'py>(&self, py: Python<'py>, query: &str, limit: usize) -> PyResult<Bound<'py, PyAny>> {
        let db = &self.db;
        to_pyobject(py, &detached(py, || Ok(db.search(query, limit)?))?)
    }

    /// The database's description (model, hook, SAE, tokens analysed, ...).
    #[getter]
    fn info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        to_pyobject(py, &self.db.info().map_err(to_py)?)
    }

    fn __len__(&self) -> PyResult<usize> {
        Ok(self.db.len().map_err(to_py)? as usize)
    }

    fn __repr__(&self) -> String {
        format!("saekit.FeatureDb({:?})", self.db.path())
    }
}

/// `rec` as JSON with each context's window also as text: `pieces` ([`merge_tokens`]: tokens that
/// complete a character joined, each piece with the highest activation among its tokens, its first token
/// and token count) and `text`, the pieces joined. Byte-level BPE splits CJK and accented characters
/// across tokens, which `tokens` shows as `\xNN` escapes.
fn with_readable_contexts(rec: &FeatureRecord) -> anyhow::Result<serde_json::Value> {
    let mut v = serde_json::to_value(rec)?;
    add_text(&mut v["top_contexts"], &rec.top_contexts)?;
    if let Some(groups) = v["quantiles"].as_array_mut() {
        for (g, q) in groups.iter_mut().zip(&rec.quantiles) {
            add_text(&mut g["contexts"], &q.contexts)?;
        }
    }
    Ok(v)
}

/// Set `text` and `pieces` on each of `slots` (a JSON array of `contexts`, in order).
fn add_text(slots: &mut serde_json::Value, contexts: &[Context]) -> anyhow::Result<()> {
    for (slot, c) in slots.as_array_mut().into_iter().flatten().zip(contexts) {
        let pieces = merge_tokens(&c.tokens, &c.acts);
        slot["text"] = pieces.iter().map(|p| p.text.as_str()).collect::<String>().into();
        slot["pieces"] = serde_json::to_value(&pieces)?;
    }
    Ok(())
}

impl PyFeatureDb {
    /// A `FeatureDb` as given, or one opened from a path.
    pub fn from_arg<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyFeatureDb>> {
        if let Ok(d) = obj.cast::<PyFeatureDb>() {
            return Ok(d.clone());
        }
        let path: PathBuf =
            obj.extract().map_err(|_| PyValueError::new_err("db: expected a saekit.FeatureDb or a path"))?;
        Bound::new(obj.py(), PyFeatureDb::new(obj.py(), path)?)
    }
}

/// The features that fire on `text` (as `saekit search SAE --text`): a dict with `tokens` (per token,
/// its strongest `per_token` features) and `overall` (the top `top` by summed activation).
#[pyfunction]
#[pyo3(signature = (model, sae, text, per_token=3, top=15, db=None, hook=None))]
#[allow(clippy::too_many_arguments)]
pub fn search<'py>(
    py: Python<'py>,
    model: &Bound<'py, PyModel>,
    sae: &Bound<'py, PyAny>,
    text: &str,
    per_token: usize,
    top: usize,
    db: Option<&Bound<'py, PyAny>>,
    hook: Option<&str>,
) -> PyResult<Bound<'py, PyAny>> {
    let sae = PySae::from_arg(sae)?;
    let db = db.map(PyFeatureDb::from_arg).transpose()?;
    let (m, s) = (&model.get().model, &sae.get().sae);
    let point = sae_hook(m, s, hook)?;
    let db_ref = db.as_ref().map(|d| &d.get().db);
    let r = detached(py, || {
        if let Some(d) = db_ref {
            d.check_made_for(s)?;
        }
        let max_of = |id: u32| db_ref.and_then(|d| d.summary(id).ok().flatten()).map(|s| s.max_act);
        Ok(search_text(m, s, point, text, per_token, top, db_ref.map(|_| &max_of as &dyn Fn(u32) -> Option<f32>))?)
    })?;
    to_pyobject(py, &r)
}

/// Features that separate the texts `pos` from the texts `neg` (as `saekit search SAE --pos --neg`):
/// a list of dicts (id, auroc, freq_pos, freq_neg, z, mean_pos, mean_neg), best for `pos` first.
#[pyfunction]
#[pyo3(signature = (model, sae, pos, neg, max_tokens=256, hook=None))]
pub fn search_contrast<'py>(
    py: Python<'py>,
    model: &Bound<'py, PyModel>,
    sae: &Bound<'py, PyAny>,
    pos: Vec<String>,
    neg: Vec<String>,
    max_tokens: usize,
    hook: Option<&str>,
) -> PyResult<Bound<'py, PyAny>> {
    if pos.is_empty() || neg.is_empty() {
        return Err(PyValueError::new_err("pos and neg each need at least one text"));
    }
    let sae = PySae::from_arg(sae)?;
    let (m, s) = (&model.get().model, &sae.get().sae);
    let point = sae_hook(m, s, hook)?;
    let hits = detached(py, || {
        let pf = text_features(m, s, point, &pos, max_tokens)?;
        let nf = text_features(m, s, point, &neg, max_tokens)?;
        Ok(contrast(&pf, &nf))
    })?;
    to_pyobject(py, &hits)
}

/// Features to steer toward the texts `pos` (as `saekit search --pos --neg --db DB --steer N`): the
/// `candidates` best by AUROC (as [`search_contrast`]) that fired in `db`, each clamped alone at `times` x
/// its max activation there while the model reads four neutral chat prompts and its own answers, ordered
/// by the mean log-probability the clamp adds to the tokens of `pos` over those of `neg`. A list of dicts:
/// `search_contrast`'s fields plus `lift` and `max_act`, best first.
#[pyfunction]
#[pyo3(signature = (model, sae, pos, neg, db, candidates=16, times=3.0, max_tokens=256, hook=None))]
#[allow(clippy::too_many_arguments)]
pub fn steering_features<'py>(
    py: Python<'py>,
    model: &Bound<'py, PyModel>,
    sae: &Bound<'py, PyAny>,
    pos: Vec<String>,
    neg: Vec<String>,
    db: &Bound<'py, PyAny>,
    candidates: usize,
    times: f32,
    max_tokens: usize,
    hook: Option<&str>,
) -> PyResult<Bound<'py, PyAny>> {
    if pos.is_empty() || neg.is_empty() {
        return Err(PyValueError::new_err("pos and neg each need at least one text"));
    }
    if !(times.is_finite() && times > 0.0) || candidates == 0 {
        return Err(PyValueError::new_err(format!(
            "times must be a positive multiple of the max activation (got {times}) and candidates at least 1"
        )));
    }
    let (sae, db) = (PySae::from_arg(sae)?, PyFeatureDb::from_arg(db)?);
    let (m, s, d) = (&model.get().model, &sae.get().sae, &db.get().db);
    let point = sae_hook(m, s, hook)?;
    let picks = detached(py, || {
        d.check_made_for(s)?;
        let hits =
            contrast(&text_features(m, s, point, &pos, max_tokens)?, &text_features(m, s, point, &neg, max_tokens)?);
        let weights = token_share_difference(m, &pos, &neg, max_tokens)?;
        let probes = saekit_steer::answered_chats(m, &saekit_steer::PROBE_PROMPTS, 32)?;
        let choice = saekit_steer::SteeringChoice { model: m, sae: s, hook: point, times, candidates };
        let max_act = |f: u32| Ok(d.summary(f)?.map_or(0.0, |s| s.max_act));
        let measured = choice.order(hits.iter().map(|h| h.id), &weights, &probes, &max_act)?;
        let row = |c: &saekit_steer::ClampLift| -> anyhow::Result<serde_json::Value> {
            let hit = hits.iter().find(|h| h.id == c.feature).expect("a measured feature is one of the hits");
            let mut v = serde_json::to_value(hit)?;
            v["lift"] = c.lift.into();
            v["max_act"] = f64::from(c.max_act).into();
            Ok(v)
        };
        measured.iter().map(row).collect::<anyhow::Result<Vec<_>>>()
    })?;
    to_pyobject(py, &picks)
}
