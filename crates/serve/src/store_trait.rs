//! [`FeatureStore`]: the feature database as the browser reads it, whatever the file ([`open_store`]).
//!
//! Two implementations: [`crate::MemoryDb`] (`store_json.rs`, one JSON file held in memory) and the SQLite
//! database `saekit analyze` writes (`store_sqlite.rs`, a thin forward to `saekit_analysis::FeatureDb`).

use std::path::Path;
use std::sync::Arc;

use anyhow::Result;
use saekit_analysis::{FeatureRecord, FeatureSummary, MapPoint, SortBy};

use crate::error::ServeResult;
use crate::store_json::MemoryDb;
use crate::store_sqlite::SqliteStore;

/// What the browser reads from a feature database. Implementations must be cheap to call from several
/// request threads at once.
pub trait FeatureStore: Send + Sync {
    /// Free-form facts about the database (SAE, hook, tokens analysed), shown on the home page.
    fn info(&self) -> ServeResult<serde_json::Value>;
    /// Number of features; valid ids are `0..n_features`.
    fn n_features(&self) -> u32;
    /// Feature `id` as its page shows it; `None` when the database lacks it.
    fn feature(&self, id: u32) -> ServeResult<Option<FeatureRecord>>;
    /// `limit` feature summaries from `offset`, in `sort` order.
    fn list(&self, sort: SortBy, descending: bool, offset: usize, limit: usize) -> ServeResult<Vec<FeatureSummary>>;
    /// Features whose LLM explanations, top tokens or contexts contain `query` (case-insensitive).
    fn search(&self, query: &str, limit: usize) -> ServeResult<Vec<FeatureSummary>>;
    /// Every feature's place on the feature map.
    fn map(&self) -> ServeResult<Vec<MapPoint>>;
}

/// Open a feature database by its file: `.json` is a [`MemoryDb`] export, anything else SQLite.
pub fn open_store(path: &Path) -> Result<Arc<dyn FeatureStore>> {
    if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("json")) {
        Ok(Arc::new(MemoryDb::load(path)?))
    } else {
        Ok(Arc::new(SqliteStore::open(path)?))
    }
}
