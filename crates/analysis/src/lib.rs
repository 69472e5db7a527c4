//! saekit-analysis: what an SAE's features are, and whether the SAE preserves the model.
//!
//! Owns: model-level evaluation (the SAE spliced into the forward pass: CE / KL with SAE and with
//! zero-ablation, plus the reconstruction metrics; [`eval_model`]), the single streaming pass that
//! describes every feature ([`analyze()`]), the SQLite feature database and its stable read API
//! ([`FeatureDb`], schema in `crates/analysis/docs/feature-db.md`; the autointerp tables, held-out
//! windows and scored explanations, in [`autointerp_db`]), and finding features by concept
//! ([`search`]: per-text activations, contrastive pos/neg ranking, single-feature sparse probing), the
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

pub mod analyze;
pub mod autointerp_db;
pub mod db;
pub mod eval;
pub mod geometry;
pub mod neuronpedia;
pub mod render;
pub mod search;
pub mod stats;

pub use analyze::{analyze, AnalyzeOptions, AnalyzeReport};
pub use autointerp_db::{AutointerpWriter, Explanation, HeldOutWindow, Score};
pub use db::{
    Context, DbInfo, FeatureDb, FeatureDbWriter, FeatureRecord, FeatureSummary, Histogram, MapPoint, Neighbour,
    QuantileGroup, SortBy, TokenLogit,
};
pub use eval::{eval_model, ModelEvalOptions, ModelEvalReport, SpliceMode};
