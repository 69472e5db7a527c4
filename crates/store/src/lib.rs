//! saekit-store: the data path from raw text to stored activations, and the reader training consumes.
//!
//! Owns: corpus readers (text, JSONL(.gz/.zst), Parquet), tokenized context shards (`tokenize`), the
//! on-disk [`ActivationStore`] with its crash-safe [`ActivationWriter`], the shuffled
//! [`ActivationReader`], the harvest loop that runs the model into a store, and live activations (the
//! model's rows served straight to training, no disk).
//! Must not touch: model internals (it only calls `saekit_model`'s public API), SAE training (saekit-sae
//! reads stores through [`ActivationReader`]), or the CLI.

pub mod corpus;
#[cfg(feature = "model")]
pub mod harvest;
#[cfg(feature = "model")]
pub mod live;
pub mod reader;
pub mod store;
pub mod tokens;

pub use corpus::{read_corpus, CorpusOptions, Document, ReadStats};
pub use reader::{ActivationReader, ReaderCursor, ReaderOptions};
pub use store::{
    marks, remove_store, sink_rule_text, ActivationStore, ActivationWriter, Dtype, HookStats, ModelInfo, OpenOptions,
    ShardEntry, ShardView, SourceInfo, StoreConfig, StoreManifest,
};
pub use tokens::{tokenize_corpus, TokenDataset, TokenSplit, TokenizeOptions, TokensManifest};
