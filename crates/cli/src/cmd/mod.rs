//! One module per subcommand.

pub mod activations;
pub mod analyze;
pub mod attribute;
pub mod bench;
pub mod concept_steering;
pub mod corpus;
pub mod demo;
pub mod eval;
pub mod eval_model;
pub mod explain;
pub mod export;
pub mod feature;
pub mod fetch_model;
pub mod fetch_sae;
pub mod generate;
pub mod harvest;
pub mod interrupt;
pub mod model_arg;
pub mod mpi_job;
pub mod probe;
pub mod search;
pub mod serve;
pub mod tokenize;
pub mod train;
pub mod train_live;
pub mod train_transcoders;
