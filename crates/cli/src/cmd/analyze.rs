//! `saekit analyze`: describe every feature of an SAE in a SQLite feature database.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use saekit_analysis::{analyze, AnalyzeOptions};
use saekit_model::Model;
use saekit_sae::{load_sae, Sae};
use saekit_store::TokenDataset;

use super::model_arg::{ModelArgs, PrecisionArgs};

/// One streaming pass of model + SAE over held-out contexts; for every feature: top contexts,
/// quantile-sampled contexts, log-spaced activation histogram, density, direct logit effects,
/// decoder-cosine neighbours and a 2-D map, stored in SQLite (see `saekit feature`, `saekit serve`).
///
/// Resumable: the running state is checkpointed to OUT.ckpt; rerun the same command to continue.
#[derive(Args, Debug)]
pub struct AnalyzeArgs {
    /// SAE folder (SAELens, sparsify) or Gemma Scope params.npz.
    pub sae: String,
    /// Tokenized dataset (from `saekit tokenize`).
    #[arg(long)]
    pub contexts: PathBuf,
    /// Split to read (held out from training).
    #[arg(long, default_value = "validation")]
    pub split: String,
    /// Tokens to analyse: 10M, 500k, 2e6 ...
    #[arg(long, default_value = "10M")]
    pub tokens: String,
    /// Output database.
    #[arg(long, default_value = "features.sqlite")]
    pub out: PathBuf,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Hook point (default: the SAE's metadata.hook_name).
    #[arg(long)]
    pub hook: Option<String>,
    /// Contexts per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Top-activating contexts kept per feature.
    #[arg(long, default_value_t = 20)]
    pub top_k: usize,
    /// Quantile intervals and contexts per interval.
    #[arg(long, default_value_t = 10)]
    pub quantiles: usize,
    #[arg(long, default_value_t = 5)]
    pub per_quantile: usize,
    /// Tokens shown before / after the peak.
    #[arg(long, default_value_t = 16)]
    pub before: usize,
    #[arg(long, default_value_t = 8)]
    pub after: usize,
    /// Seconds between checkpoints.
    #[arg(long, default_value_t = 120)]
    pub checkpoint_secs: u64,
    /// Ignore an existing checkpoint and start over.
    #[arg(long)]
    pub restart: bool,
    /// Also analyse position 0, special tokens and rows above 10x the median norm (attention sinks;
    /// skipped by default).
    #[arg(long)]
    pub keep_sinks: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print the run report as JSON.
    #[arg(long)]
    pub json: bool,
    /// The model's linear layers and the SAE's encoder GEMM run in this precision; a checkpoint
    /// resumes only in the precision it started in.
    #[command(flatten)]
    pub precision: PrecisionArgs,
}

/// `10M`, `500k`, `1.5G`, `2e6`, `12345`.
pub fn parse_count(s: &str) -> Result<u64> {
    let t = s.trim().to_ascii_lowercase().replace('_', "");
    let (num, mul) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1e3),
        Some('m') => (&t[..t.len() - 1], 1e6),
        Some('g') | Some('b') => (&t[..t.len() - 1], 1e9),
        _ => (&t[..], 1.0),
    };
    let v: f64 = num.parse().with_context(|| format!("{s:?} is not a count (e.g. 10M, 500k, 2e6)"))?;
    if !(v.is_finite() && v > 0.0) {
        bail!("{s:?} must be positive");
    }
    Ok((v * mul).round() as u64)
}

pub fn run(a: AnalyzeArgs) -> Result<()> {
    let n_tokens = parse_count(&a.tokens)?;
    let sae = load_sae(&a.sae)?;
    let dataset = TokenDataset::open(&a.contexts)?;
    let precision = PrecisionArgs::resolve(a.precision.precision)?;
    let model = a.model.load_at(None, precision)?;
    let ranks = super::mpi_job::join(None)?.map(|job| job.harvest);
    let first = ranks.as_ref().is_none_or(|r| r.rank() == 0);
    let opts = AnalyzeOptions {
        n_tokens,
        split: a.split.clone(),
        batch_contexts: a.batch,
        stats: saekit_analysis::stats::StatsOptions {
            top_k: a.top_k,
            n_quantiles: a.quantiles,
            per_quantile: a.per_quantile,
            before: a.before,
            after: a.after,
            seed: a.seed,
        },
        checkpoint_every: Duration::from_secs(a.checkpoint_secs),
        restart: a.restart,
        skip_sinks: !a.keep_sinks,
        hook: a.hook.as_deref().map(str::parse).transpose()?,
        progress: first,
        stop: Some(super::interrupt::stop_flag()?),
        ranks: ranks.clone(),
        precision,
        ..Default::default()
    };
    let analysed = analyze_with(&model, &sae, &a.sae, &dataset, &a.out, &opts, a.json);
    if ranks.is_some() {
        super::mpi_job::fatal_across_ranks(analysed.as_ref().err());
    }
    analysed
}

/// Analyse `sae` (saved in `sae_dir`) on `dataset` through `model` into the database `out`, then report
/// (as JSON when `json`); a signal exits 130 with the contexts done checkpointed.
pub fn analyze_with(
    model: &Model,
    sae: &Sae,
    sae_dir: &str,
    dataset: &TokenDataset,
    out: &Path,
    opts: &AnalyzeOptions,
    json: bool,
) -> Result<()> {
    let r = analyze(model, sae, sae_dir, dataset, out, opts)?;
    if !r.finished && super::interrupt::stopped() {
        super::interrupt::exit_interrupted(
            &format!("{} contexts analysed and checkpointed", r.n_contexts),
            &super::interrupt::this_command(),
        );
    }
    if opts.ranks.as_ref().is_some_and(|r| r.rank() != 0) {
        return Ok(()); // rank 0 reports
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "analysed {} tokens ({} contexts) in {:.1}s: {:.0} tokens/s; model forward + encoder alone {:.1}s ({:.2}x); database written in {:.1}s",
            r.n_tokens,
            r.n_contexts,
            r.pass_secs,
            r.tokens_per_sec,
            r.forward_encode_secs,
            r.pass_secs / r.forward_encode_secs.max(1e-9),
            r.write_secs
        );
        if let Some(db) = &r.db {
            println!("feature database: {}  (try `saekit feature 0 --db {}`)", db.display(), db.display());
        }
    }
    Ok(())
}
