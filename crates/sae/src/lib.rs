//! saekit-sae: sparse autoencoders on the CPU.
//!
//! Owns the SAE architectures (TopK, BatchTopK, JumpReLU, ReLU+L1) and their transcoders (an
//! encoder on one hook, a decoder to another, an optional skip connection `W_skip`: trained on
//! (input, target) row pairs from [`ActivationSource::next_pairs`], saved in SAELens' transcoder
//! layout; loading and using them is saekit-circuits'), the training step (a dense
//! encoder GEMM, everything else sparse over the active latents), the trainer (a validated
//! [`TrainPlan`], checkpoints and bit-identical resume, metrics), training across processes (the
//! [`Collective`] every reduction goes through; saekit-mpi implements it over MPI:
//! latents sharded within a replica, rows split across replicas, or, for a source that serves each
//! replica its own share such as live rows, read by each replica from its own share), the core
//! evaluation metrics, and
//! the SAE file formats (SAELens v6 / legacy, sparsify, Gemma Scope). It must not start processes
//! or choose a layout: the launcher (`mpirun`) and the CLI's `--shards` do. It reads activations through
//! [`ActivationSource`] (a .npy, an activation store, or saekit-store's live model rows) and must
//! not touch the model or the corpus itself: those are upstream (saekit-model, saekit-store).
//!
//! Where things are: `step/` holds the training step (`topk.rs` and `dense.rs` as forward /
//! backward pairs, `loss.rs` the loss terms, `update.rs` Adam), `kernels.rs` the hand-written
//! kernels (the TopK selection is `RowSelection`, fed row by row by `EncoderProduct::for_each_row`), `plan.rs` the config's validation,
//! `checkpoint.rs` the only code that reads or writes checkpoints, `train.rs` the loop, `layout.rs`
//! the trainer's slicing and gathering of a sharded state.
//!
//! ```
//! use saekit_sae::{train, NpySource, RunOptions, TrainConfig};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! // 2,048 rows of width 16: a sum of a few of 64 directions each
//! let x: Vec<f32> = (0..2048 * 16).map(|i| ((i * 7919 % 64) as f32 / 64.0 - 0.5) * ((i / 16 % 5) as f32)).collect();
//! let acts = dir.path().join("acts.npy");
//! saekit_sae::source::write_npy_f32(&acts, &x, 2048, 16)?;
//! let cfg = TrainConfig {
//!     acts: Some(acts.display().to_string()),
//!     out: dir.path().join("sae").display().to_string(),
//!     d_sae: 64,
//!     k: 4,
//!     tokens: 2048,
//!     batch_size: 256,
//!     ..Default::default()
//! };
//! let mut rows = NpySource::open(&acts, cfg.seed, true)?;
//! let outcome = train(&cfg, &mut rows, &RunOptions::default())?;
//! assert_eq!(outcome.steps, 8);
//! let sae = saekit_sae::load_sae(dir.path().join("sae"))?;   // a SAELens folder
//! let codes = sae.encode(&x[..16]);
//! assert!(codes.row(0).0.len() <= 4);
//! # Ok(()) }
//! ```

#![warn(missing_docs)]
// Index loops over rows/columns read more clearly than iterator chains in the numeric kernels.
#![allow(clippy::needless_range_loop)]

mod adam;
mod bench;
pub mod checkpoint;
pub mod config;
mod error;
pub mod format;
pub(crate) mod kernels;
mod layout;
pub mod metrics;
mod params;
mod plan;
mod sae;
pub mod source;
mod step;
#[cfg(feature = "store")]
mod store_source;
#[cfg(test)]
mod tests_grad;
mod train;

pub use bench::{encoder_gemm_gflops, peak_rss_bytes};
pub use config::{Arch, BDecInit, ConfigFile, TrainConfig};
pub use error::{Result, SaeError};
pub use format::{load_sae, save_saelens, save_saelens_set};
pub use metrics::{evaluate, EvalMetrics};
pub use params::Params;
pub use plan::{
    ArchSettings, BatchTopKSettings, JumpReluPenalty, JumpReluSettings, ReluSettings, TopKSettings, TrainPlan,
};
pub use sae::{Activation, Encoder, Sae, SaeMetadata, SparseCodes};
pub use source::{ActivationSource, NpyPairSource, NpySource, Provenance};
pub use step::{Collective, SingleProcess, StepStats, Traffic};
#[cfg(feature = "store")]
pub use store_source::{LiveLayerSource, LiveSource, StorePairSource, StoreSource};
pub use train::{density_histogram, train, RunOptions, TrainOutcome};
