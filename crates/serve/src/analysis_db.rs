//! [`FeatureStore`] over the SQLite feature database that `saekit analyze` writes: a thin forward to
//! [`FeatureDb`], whose records the browser uses as they are.

use std::path::Path;

use anyhow::{Context as _, Result};
use saekit_analysis::{FeatureDb, FeatureRecord, FeatureSummary, MapPoint, SortBy};

use crate::db::FeatureStore;

pub struct AnalysisDb {
    db: FeatureDb,
    n: u32,
}

impl AnalysisDb {
    pub fn open(path: &Path) -> Result<Self> {
        let db = FeatureDb::open(path)?;
        let n = db.len().with_context(|| format!("{}: cannot count features", path.display()))? as u32;
        Ok(Self { db, n })
    }
}

impl FeatureStore for AnalysisDb {
    fn info(&self) -> Result<serde_json::Value> {
        let mut v = serde_json::to_value(self.db.info()?)?;
        // the pages read `hook_name`, as the SAE's metadata calls it
        if let Some(h) = v.get("hook").cloned() {
            v["hook_name"] = h;
        }
        Ok(v)
    }

    fn n_features(&self) -> u32 {
        self.n
    }

    fn feature(&self, id: u32) -> Result<Option<FeatureRecord>> {
        self.db.feature(id)
    }

    fn list(&self, sort: SortBy, descending: bool, offset: usize, limit: usize) -> Result<Vec<FeatureSummary>> {
        self.db.list(sort, descending, offset, limit)
    }

    fn search(&self, query: &str, limit: usize) -> Result<Vec<FeatureSummary>> {
        self.db.search(query, limit)
    }

    fn map(&self) -> Result<Vec<MapPoint>> {
        self.db.map()
    }
}

/// Open a feature database by its file: `.json` is a [`crate::MemoryDb`] export, anything else SQLite.
pub fn open_store(path: &Path) -> Result<std::sync::Arc<dyn FeatureStore>> {
    if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("json")) {
        Ok(std::sync::Arc::new(crate::MemoryDb::load(path)?))
    } else {
        Ok(std::sync::Arc::new(AnalysisDb::open(path)?))
    }
}
