//! saekit-store: the data path from raw text to stored activations, and the reader training consumes.
//!
//! Owns: corpus readers (text, JSONL(.gz/.zst), Parquet), tokenized context shards (`tokenize`), the
//! on-disk [`ActivationStore`] with its crash-safe [`ActivationWriter`], the shuffled
//! [`ActivationReader`], the harvest loop that runs the model into a store, live activations (the
//! model's rows served straight to training, no disk; under mpirun each data replica forwards its own
//! shuffle blocks) and one forward shared by many trainers (`live_set`).
//! Must not touch: model internals (it only calls `saekit_model`'s public API), SAE training (saekit-sae
//! reads stores through [`ActivationReader`]), or the CLI.
//!
//! # Example
//!
//! Write two 4-token contexts of one hook's activations into a store, then read a row back: the row at
//! position 0 of each context is marked as an attention sink, which training skips.
//!
//! ```
//! use saekit_store::{marks, ActivationStore, ActivationWriter, Dtype, ModelInfo, SourceInfo, StoreConfig};
//!
//! # fn main() -> anyhow::Result<()> {
//! let dir = tempfile::tempdir()?;
//! let d_model = 3;
//! let config = StoreConfig {
//!     model: ModelInfo { name: "toy".into(), d_model, n_layers: 1, ..Default::default() },
//!     hooks: vec!["blocks.0.hook_resid_post".into()],
//!     d_model,
//!     dtype: Dtype::F32,
//!     context: 4,
//!     contexts_per_shard: 2,
//!     bos_token: None,
//!     eot_tokens: vec![],
//!     outlier_factor: None,
//!     source: SourceInfo::default(),
//!     tokenizer_fingerprint: String::new(),
//! };
//! let mut writer = ActivationWriter::create_or_resume(dir.path(), config)?;
//! let tokens: Vec<u32> = (0..8).collect();
//! let acts: Vec<f32> = (0..8 * d_model).map(|i| i as f32).collect();
//! writer.push(&tokens, &[&acts])?;
//! let manifest = writer.finish()?;
//! assert_eq!((manifest.n_contexts, manifest.shards.len()), (2, 1));
//!
//! let store = ActivationStore::open(dir.path())?;
//! let shard = store.shard(0);
//! let mut row = vec![0f32; d_model];
//! shard.row(0, 5, &mut row); // hook 0, row 5: the second context's position 1
//! assert_eq!(row, [15.0, 16.0, 17.0]);
//! assert_eq!(shard.marks()[4] & marks::POS0, marks::POS0);
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

pub mod corpus;
mod error;
#[cfg(feature = "model")]
pub mod harvest;
#[cfg(feature = "model")]
pub mod live;
#[cfg(feature = "model")]
pub mod live_set;
mod parts;
pub mod reader;
pub mod store;
pub mod tokens;

pub use corpus::{read_corpus, CorpusOptions, Document, ReadStats};
pub use error::{StoreError, StoreResult};
pub use parts::Ranks;
pub use reader::{ActivationReader, ReaderCursor, ReaderOptions};
pub use store::{
    marks, remove_store, sink_rule_text, ActivationStore, ActivationWriter, Dtype, HookStats, ModelInfo, OpenOptions,
    ShardEntry, ShardView, SourceInfo, StoreConfig, StoreManifest,
};
pub use tokens::{tokenize_corpus, TokenDataset, TokenSplit, TokenizeOptions, TokensManifest};
