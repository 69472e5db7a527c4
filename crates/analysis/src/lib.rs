//! saekit-analysis: what an SAE's features are, and whether the SAE preserves the model.
//!
//! Owns: model-level evaluation (the SAE spliced into the forward pass: CE / KL with SAE and with
//! zero-ablation, plus the reconstruction metrics; [`eval_model`]), the single streaming pass that
//! describes every feature ([`analyze()`]), the SQLite feature database and its stable read API
//! ([`FeatureDb`], schema in `crates/analysis/docs/feature-db.md`; the autointerp tables, held-out
//! windows and scored explanations, in [`autointerp_db`]), and finding features by concept
//! ([`search`]: per-text activations, contrastive pos/neg ranking, single-feature sparse probing; [`concepts`]:
//! the feature of each kind of text in a labelled corpus; [`detector`]: a character n-gram judge of
//! whether a text reads like a concept, for steering checks), the
//! export in Neuronpedia's layout ([`neuronpedia`]) and contexts rendered as readable text ([`render`]).
//!
//! Must not touch: model internals (only `saekit_model`'s public forward/hook API), SAE training or
//! file formats (`saekit_sae`), token shards (`saekit_store`), or the CLI / web server, which call
//! this crate.
//!
//! Attention sinks: in SmolLM2 position 0 and every `<|endoftext|>` (and other special tokens)
//! carry ~100x the median residual norm. Everywhere in this crate those rows are left alone: the
//! splice keeps their clean activation (SAELens-style: BOS/position 0 are not replaced), analysis
//! and search skip them, and the reconstruction metrics exclude them.
//!
//! # Example
//!
//! A feature database is written once (by [`analyze()`], through [`FeatureDbWriter`]) and read by id, rank
//! or text ([`FeatureDb`]): here two features with one context each, then the browser's three questions.
//!
//! ```
//! use saekit_analysis::feature_db::{FeatureRow, StoredContext, StoredDetail};
//! use saekit_analysis::{DbInfo, FeatureDb, FeatureDbWriter, SortBy};
//!
//! # fn main() -> anyhow::Result<()> {
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("features.sqlite");
//! let vocab: Vec<String> = ["<s>", " the", " bridge", " Paris"].map(String::from).to_vec();
//! let info = DbInfo { model: "toy".into(), hook: "blocks.0.hook_resid_post".into(), d_sae: 2, ..Default::default() };
//! let mut writer = FeatureDbWriter::create(&path, &info, &[0.0, 1.0, 2.0], &vocab)?;
//! for (id, peak_token) in [(0u32, 2u32), (1, 3)] {
//!     // the context " the bridge" (or " the Paris"), the feature firing on its second token only
//!     let context = StoredContext { ctx: 0, start: 1, ids: vec![1, peak_token], acts: vec![(1, 1.5)], peak: 1, max_act: 1.5 };
//!     let detail = StoredDetail { top: vec![context], ..Default::default() };
//!     let search_text = vocab[peak_token as usize].trim().to_string();
//!     writer.insert(&FeatureRow { id, density: 0.1 * (id + 1) as f64, max_act: 1.5, search_text, detail, ..Default::default() })?;
//! }
//! writer.finish()?;
//!
//! let db = FeatureDb::open(&path)?;
//! let page = db.feature(1)?.expect("feature 1 was written");
//! assert_eq!(page.top_contexts[0].tokens, [" the", " Paris"]);
//! assert_eq!(page.top_contexts[0].acts, [0.0, 1.5]);
//! let densest = db.list(SortBy::Density, true, 0, 10)?;
//! assert_eq!(densest.iter().map(|f| f.id).collect::<Vec<_>>(), [1, 0]);
//! assert_eq!(db.search("bridge", 5)?[0].id, 0);
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

pub mod analyze;
pub mod autointerp_db;
pub mod concepts;
pub mod detector;
mod error;
pub mod eval;
pub mod feature_db;
pub mod geometry;
pub mod neuronpedia;
pub mod render;
pub mod search;
pub mod stats;

pub use analyze::{analyze, AnalyzeOptions, AnalyzeReport};
pub use autointerp_db::{AutointerpWriter, Explanation, HeldOutWindow, Score};
pub use error::{AnalysisError, AnalysisResult};
pub use eval::{eval_model, ModelEvalOptions, ModelEvalReport, SpliceMode};
pub use feature_db::{
    Context, DbInfo, FeatureDb, FeatureDbWriter, FeatureRecord, FeatureSummary, Histogram, MapPoint, Neighbour,
    QuantileGroup, SortBy, TokenLogit,
};
