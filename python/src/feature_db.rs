//! `saekit.FeatureDb` (the database of `saekit analyze`) and finding features by text.

use std::path::PathBuf;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use saekit_analysis::feature_db::SortBy;
use saekit_analysis::search::{contrast, search_text, text_features};
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

    /// One feature's record as a dict: density, max_act, explanation, top_contexts (tokens, acts, peak),
    /// quantiles, histogram, promoted/suppressed tokens, neighbours. `ValueError` for an unknown id.
    fn feature<'py>(&self, py: Python<'py>, id: u32) -> PyResult<Bound<'py, PyAny>> {
        let db = &self.db;
        match detached(py, || Ok(db.feature(id)?))? {
            Some(rec) => to_pyobject(py, &rec),
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
