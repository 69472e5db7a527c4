//! [`MemoryDb`]: a feature database in one JSON file, held in memory (test fixtures, small exports).
//!
//! The records are `saekit-analysis`' own ([`FeatureRecord`], [`FeatureSummary`], [`MapPoint`], ...), so the
//! browser, `saekit feature` and the SQLite database written by `saekit analyze` (see `store_sqlite.rs`)
//! share one definition; a JSON database is a list of those records, each carrying its own map coordinates.

use std::path::Path;

use anyhow::{bail, Context as _, Result};
use saekit_analysis::{FeatureRecord, FeatureSummary, MapPoint, SortBy};
use serde::{Deserialize, Serialize};

use crate::error::ServeResult;
use crate::store_trait::FeatureStore;

/// A feature database held in memory, read from (and written to) one JSON file.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct MemoryDb {
    /// Free-form facts about the database (`/api/info`'s `db`).
    pub info: serde_json::Value,
    /// Indexed by feature id; each record's `x`, `y` place it on the map.
    pub features: Vec<FeatureRecord>,
}

impl MemoryDb {
    /// Read and check a JSON database (ids in order, contexts consistent).
    pub fn load(path: &Path) -> Result<Self> {
        let bytes =
            std::fs::read(path).with_context(|| format!("{}: cannot read the feature database", path.display()))?;
        // files from before the records were saekit-analysis' (a separate `map`, no `x`/`y`) fail here: say
        // how to rebuild rather than only which field is missing
        let db: MemoryDb = serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "{}: not a saekit feature database (JSON); an older fixture is rebuilt by \
                 `cargo run -p saekit-serve --example fixture -- DIR`",
                path.display()
            )
        })?;
        for (i, f) in db.features.iter().enumerate() {
            if f.id as usize != i {
                bail!("{}: feature at index {i} has id {}; ids must be 0..n in order", path.display(), f.id);
            }
            let contexts = f.top_contexts.iter().chain(f.quantiles.iter().flat_map(|q| q.contexts.iter()));
            if let Some(c) = contexts.into_iter().find(|c| c.peak >= c.tokens.len() || c.acts.len() != c.tokens.len()) {
                bail!(
                    "{}: feature {i}: a context of {} tokens has {} activations and its peak at {}",
                    path.display(),
                    c.tokens.len(),
                    c.acts.len(),
                    c.peak
                );
            }
        }
        Ok(db)
    }

    /// Write atomically (temp file, fsync, rename, folder fsync).
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = serde_json::to_vec(self).with_context(|| format!("{}: cannot serialize", path.display()))?;
        saekit_files::write_atomic(path, &bytes)
    }

    fn summary(f: &FeatureRecord) -> FeatureSummary {
        FeatureSummary { id: f.id, density: f.density, max_act: f.max_act, top_tokens: top_tokens(f, 5) }
    }
}

/// The distinct peak tokens of a feature's strongest contexts, strongest first.
pub fn top_tokens(f: &FeatureRecord, n: usize) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for c in &f.top_contexts {
        if let Some(t) = c.tokens.get(c.peak) {
            if !out.contains(t) {
                out.push(t.clone());
                if out.len() == n {
                    break;
                }
            }
        }
    }
    out
}

impl FeatureStore for MemoryDb {
    fn info(&self) -> ServeResult<serde_json::Value> {
        Ok(self.info.clone())
    }

    fn n_features(&self) -> u32 {
        self.features.len() as u32
    }

    fn feature(&self, id: u32) -> ServeResult<Option<FeatureRecord>> {
        Ok(self.features.get(id as usize).cloned())
    }

    fn list(&self, sort: SortBy, descending: bool, offset: usize, limit: usize) -> ServeResult<Vec<FeatureSummary>> {
        let mut idx: Vec<&FeatureRecord> = self.features.iter().collect();
        match sort {
            SortBy::Id => {}
            SortBy::Density => idx.sort_by(|a, b| a.density.total_cmp(&b.density).then(a.id.cmp(&b.id))),
            SortBy::MaxAct => idx.sort_by(|a, b| a.max_act.total_cmp(&b.max_act).then(a.id.cmp(&b.id))),
        }
        if descending {
            idx.reverse();
        }
        Ok(idx.into_iter().skip(offset).take(limit).map(Self::summary).collect())
    }

    fn search(&self, query: &str, limit: usize) -> ServeResult<Vec<FeatureSummary>> {
        let q = query.trim().to_lowercase();
        if q.is_empty() {
            return Ok(Vec::new());
        }
        // rank by the strongest activation on a token containing the query, then by any context match
        let mut hits: Vec<(f32, &FeatureRecord)> = Vec::new();
        for f in &self.features {
            let mut best = None::<f32>;
            for c in &f.top_contexts {
                for (t, a) in c.tokens.iter().zip(&c.acts) {
                    if *a > 0.0 && t.to_lowercase().contains(&q) {
                        best = Some(best.map_or(*a, |b: f32| b.max(*a)));
                    }
                }
            }
            // an LLM explanation that mentions the query ranks the feature first
            if f.explanations.iter().any(|e| e.text.to_lowercase().contains(&q)) {
                best = Some(f32::INFINITY);
            }
            if let Some(b) = best {
                hits.push((b, f));
            }
        }
        hits.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.id.cmp(&b.1.id)));
        Ok(hits.into_iter().take(limit).map(|(_, f)| Self::summary(f)).collect())
    }

    fn map(&self) -> ServeResult<Vec<MapPoint>> {
        Ok(self
            .features
            .iter()
            .map(|f| MapPoint { id: f.id, x: f.x, y: f.y, density: f.density, max_act: f.max_act })
            .collect())
    }
}
