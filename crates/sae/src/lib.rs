//! saekit-sae: sparse autoencoders on the CPU.
//!
//! Owns the SAE architectures (TopK, BatchTopK, JumpReLU, ReLU+L1), the hand-written training-step
//! kernels (dense encoder GEMM, everything else sparse over the active latents), the trainer
//! (checkpoints, resume, metrics), the core evaluation metrics, and the SAE file formats (SAELens
//! v6 / legacy, sparsify, Gemma Scope). It reads activations through [`ActivationSource`] (a .npy, an
//! activation store, or saekit-store's live model rows) and must not touch the model or the corpus
//! itself: those are upstream (saekit-model, saekit-store).

// Index loops over rows/columns read more clearly than iterator chains in the numeric kernels.
#![allow(clippy::needless_range_loop, clippy::too_many_arguments, clippy::type_complexity)]

pub mod adam;
pub mod bench;
pub mod config;
mod dense_step;
pub(crate) mod kernels;
pub mod sae;
pub mod step;
#[cfg(test)]
mod tests_grad;

pub use config::{Arch, TrainConfig};
pub use sae::{Activation, Sae, SaeMetadata, SparseCodes};
pub mod format;
pub mod metrics;
pub mod source;
#[cfg(feature = "store")]
pub mod store_source;
pub mod train;

pub use format::{load_sae, save_saelens};
pub use metrics::{evaluate, EvalMetrics};
pub use source::{ActivationSource, NpySource};
#[cfg(feature = "store")]
pub use store_source::{LiveSource, StoreSource};
pub use train::{train, train_stoppable, RunOptions, TrainOutcome};
