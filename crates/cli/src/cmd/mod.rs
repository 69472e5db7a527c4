//! One module per subcommand.

pub mod activations;
pub mod bench;
pub mod corpus;
pub mod demo;
pub mod eval;
pub mod fetch_model;
pub mod generate;
pub mod harvest;
pub mod model_arg;
pub mod tokenize;
pub mod train;
