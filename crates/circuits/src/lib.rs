//! saekit-circuits: from features to circuits.
//!
//! Owns transcoders as loadable objects (an encoder on one hook point, a decoder to another, an optional
//! skip connection) in SAELens' transcoder layout and circuit-tracer's `transcoder_set` layout; the
//! replacement model (every MLP replaced by its transcoder at once, with or without the error terms) and
//! its CE / KL evaluation; attribution graphs over the frozen-attention linearisation of the replacement
//! model, pruned and written in circuit-tracer's / Neuronpedia's graph JSON; and interventions on graph
//! nodes run through the real model.
//!
//! Must not touch: the forward pass itself (saekit-model: it only reads the model through hooks, the KV
//! cache's recorded attention patterns and the block weights the model exposes), SAE training or the SAE
//! file formats (saekit-sae), corpora and storage (saekit-store). Nothing upstream depends on this crate.

// Index loops over rows/columns read more clearly than iterator chains in the numeric code.
#![warn(missing_docs)]
#![allow(clippy::needless_range_loop)]

pub mod attribution;
pub mod error;
pub mod graph_json;
pub mod intervention;
pub mod prune;
pub mod replacement;
pub mod transcoder;

pub use attribution::{attribute, AttributeOptions, Attribution};
pub use error::{CircuitsError, CircuitsResult};
pub use intervention::{intervene, top_tokens, Intervention};
pub use replacement::{evaluate_replacement, replacement_forward, ReplacementEval, ReplacementEvalOptions, Splice};
pub use transcoder::{Transcoder, TranscoderActivation, TranscoderSet};
