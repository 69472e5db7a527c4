//! [`FeatureStore`] over the SQLite feature database that `saekit analyze` writes: a thin forward to
//! [`FeatureDb`], whose records the browser uses as they are.

use std::path::Path;

use anyhow::{Context as _, Result};
use saekit_analysis::{FeatureDb, FeatureRecord, FeatureSummary, MapPoint, SortBy};

use crate::error::{ServeError, ServeResult};
use crate::store_trait::FeatureStore;

/// The SQLite feature database, read through `saekit_analysis`' read API.
pub struct SqliteStore {
    db: FeatureDb,
    n: u32,
}

impl SqliteStore {
    /// Open the database at `path` and count its features.
    pub fn open(path: &Path) -> Result<Self> {
        let db = FeatureDb::open(path)?;
        let n = db.len().with_context(|| format!("{}: cannot count features", path.display()))? as u32;
        Ok(Self { db, n })
    }
}

impl FeatureStore for SqliteStore {
    fn info(&self) -> ServeResult<serde_json::Value> {
        let mut v = serde_json::to_value(self.db.info()?).map_err(ServeError::internal)?;
        // the pages read `hook_name`, as the SAE's metadata calls it
        if let Some(h) = v.get("hook").cloned() {
            v["hook_name"] = h;
        }
        Ok(v)
    }

    fn n_features(&self) -> u32 {
        self.n
    }

    fn feature(&self, id: u32) -> ServeResult<Option<FeatureRecord>> {
        Ok(self.db.feature(id)?)
    }

    fn list(&self, sort: SortBy, descending: bool, offset: usize, limit: usize) -> ServeResult<Vec<FeatureSummary>> {
        Ok(self.db.list(sort, descending, offset, limit)?)
    }

    fn search(&self, query: &str, limit: usize) -> ServeResult<Vec<FeatureSummary>> {
        Ok(self.db.search(query, limit)?)
    }

    fn map(&self) -> ServeResult<Vec<MapPoint>> {
        Ok(self.db.map()?)
    }
}
