//! saekit-explain: every feature explained and scored by an LLM behind any OpenAI-compatible chat API.
//!
//! Owns the autointerp loop that delphi (EleutherAI) runs, in Rust: choosing a feature's examples from
//! the feature database ([`examples`]), the explainer and scorer prompts in delphi's shape and the parsing
//! of their replies ([`prompts`]), the detection and fuzzing scorers as balanced accuracy ([`score`]), the
//! chat client with per-request timeout, retries with exponential backoff on 429/5xx and a clear stop on
//! 401/403/404 ([`client`]), and the resumable, bounded-concurrency run over many features that stores each
//! result beside the feature ([`run`]), and the shuffled-explanation control that gives the scores their
//! floor ([`control`]).
//!
//! Must not touch: the model, SAEs or the analysis itself. It reads the database through
//! `saekit_analysis::FeatureDb` and writes only the explanation tables through
//! `saekit_analysis::AutointerpWriter`; the explainer is whatever the endpoint serves (`saekit serve`, vLLM,
//! llama.cpp, OpenAI), so the code is the same for a 135M local model and a large remote one.

#![warn(missing_docs)]

pub mod client;
pub mod control;
pub mod error;
pub mod examples;
pub mod prompts;
pub mod run;
pub mod score;

pub use client::{ChatClient, ChatError, ChatReply, ClientOptions};
pub use control::{score_shuffled_control, ControlSummary};
pub use error::{ExplainError, ExplainResult};
pub use run::{explain_features, ExplainOptions, ExplainSummary};
pub use score::Scoring;
