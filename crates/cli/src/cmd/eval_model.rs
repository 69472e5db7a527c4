//! `saekit eval-model`: the SAE spliced into the model (CE / KL with the SAE and with zero-ablation), or
//! with `--transcoders` the replacement model (every MLP replaced by its transcoder).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use saekit_analysis::{eval_model, ModelEvalOptions};
use saekit_circuits::{evaluate_replacement, ReplacementEvalOptions, TranscoderSet};
use saekit_model::{Model, Precision};
use saekit_sae::load_sae;
use saekit_store::TokenDataset;

use super::model_arg::{ModelArgs, PrecisionArgs};

/// Model-level faithfulness of an SAE on held-out contexts, SAELens evals.py definitions: CE loss
/// clean / with SAE / with zero-ablation, CE loss score, delta LM loss, KL(clean || spliced) and KL
/// score, plus FVU / explained variance, MSE, cosine, L2 ratio, L0, dead % and dense %. Position 0
/// and special tokens (attention sinks) keep their clean activation in the splice and are excluded
/// from the reconstruction metrics. With `--transcoders DIR`: the replacement model, every MLP replaced by its
/// transcoder at once and one at a time, CE loss score and KL(clean || replaced) against zero-ablating the
/// same MLPs, and each transcoder's FVU; the sinks' rows (as above, by each MLP's output norm) keep the
/// real MLP's output there too, unless --splice-sinks.
#[derive(Args, Debug)]
pub struct EvalModelArgs {
    /// SAE folder or params.npz.
    #[arg(required_unless_present = "transcoders")]
    pub sae: Option<String>,
    /// A transcoder set (circuit-tracer's transcoders.yaml folder, or SAELens transcoder folders) to
    /// evaluate as the replacement model instead of an SAE. A set of the first layers only (e.g. one
    /// transcoder for layer 0) replaces those MLPs and runs the others clean.
    #[arg(long, conflicts_with_all = ["sae", "hook"])]
    pub transcoders: Option<PathBuf>,
    /// With --transcoders: only the all-at-once replacement (skips the two passes per layer).
    #[arg(long)]
    pub no_per_layer: bool,
    /// Tokenized dataset (from `saekit tokenize`).
    #[arg(long)]
    pub contexts: PathBuf,
    #[arg(long, default_value = "validation")]
    pub split: String,
    /// Tokens to evaluate on (whole contexts): 64k, 1M ...
    #[arg(long, default_value = "64k")]
    pub tokens: String,
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub precision: PrecisionArgs,
    #[arg(long)]
    pub hook: Option<String>,
    /// Rows above this multiple of the batch's median norm are left clean too (0 = only position 0
    /// and special tokens).
    #[arg(long, default_value_t = 10.0)]
    pub sink_norm_factor: f32,
    /// Replace every row, sinks included (SAELens' default behaviour).
    #[arg(long)]
    pub splice_sinks: bool,
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: EvalModelArgs) -> Result<()> {
    if let Some(dir) = &a.transcoders {
        return run_transcoders(&a, dir);
    }
    let n_tokens = super::analyze::parse_count(&a.tokens)?;
    let sae_path = a.sae.as_deref().context("an SAE folder or --transcoders is needed")?;
    let sae = load_sae(sae_path)?;
    let dataset = TokenDataset::open(&a.contexts)?;
    let (model, precision) = load_model(&a)?;
    let opts = ModelEvalOptions {
        n_tokens,
        split: a.split.clone(),
        batch_contexts: a.batch,
        keep_sinks: !a.splice_sinks,
        sink_norm_factor: a.sink_norm_factor,
        hook: a.hook.as_deref().map(str::parse).transpose()?,
        progress: !a.json,
    };
    let r = eval_model(&model, &sae, &dataset, &opts)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&with_precision(&r, precision)?)?);
    } else {
        println!("{:<30} {}", "sae", sae_path);
        println!("{:<30} {}", "precision", precision.name());
        print!("{}", r.table());
    }
    Ok(())
}

fn load_model(a: &EvalModelArgs) -> Result<(Model, Precision)> {
    let precision = PrecisionArgs::resolve(a.precision.precision)?;
    Ok((a.model.load_at(None, precision)?, precision))
}

/// The report as JSON with the precision the model ran at: the scores of a bf16 pass are not an f32
/// pass's, and a result should say which it is.
fn with_precision(report: &impl serde::Serialize, precision: Precision) -> Result<serde_json::Value> {
    let mut v = serde_json::to_value(report)?;
    if let Some(fields) = v.as_object_mut() {
        fields.insert("precision".into(), precision.name().into());
    }
    Ok(v)
}

fn run_transcoders(a: &EvalModelArgs, dir: &Path) -> Result<()> {
    let n_tokens = super::analyze::parse_count(&a.tokens)?;
    let set = TranscoderSet::load(dir)?;
    let dataset = TokenDataset::open(&a.contexts)?;
    let (model, precision) = load_model(a)?;
    let split = dataset.split(&a.split)?;
    let seq = split.context_len();
    let n = n_tokens.div_ceil(seq as u64).max(1).min(split.n_contexts());
    let tokens: Vec<u32> = (0..n).flat_map(|c| split.context(c).to_vec()).collect();
    let opts = ReplacementEvalOptions {
        batch: a.batch,
        per_layer: !a.no_per_layer,
        keep_sinks: !a.splice_sinks,
        sink_norm_factor: a.sink_norm_factor,
        progress: !a.json,
    };
    let r = evaluate_replacement(&model, &set, &tokens, seq, &opts)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&with_precision(&r, precision)?)?);
        return Ok(());
    }
    println!(
        "transcoders {}  contexts {}  predicted tokens {}  precision {}",
        dir.display(),
        r.n_contexts,
        r.n_predicted,
        precision.name()
    );
    println!("ce_loss_clean {:.4}", r.ce_loss_clean);
    let sinks = r.sink_rows.iter().sum::<u64>() as f64 / r.sink_rows.len().max(1) as f64;
    println!("sink rows left to the real MLPs: {sinks:.1} of {} per layer", r.n_rows);
    println!(
        "{:<6} {:>12} {:>12} {:>9} {:>10} {:>10} {:>7}",
        "layers", "ce_replaced", "ce_ablated", "ce_score", "kl_repl", "kl_abl", "fvu"
    );
    for s in std::iter::once(&r.all).chain(&r.per_layer) {
        let fvu = s.fvu.map_or("-".into(), |f| format!("{f:.3}"));
        println!(
            "{:<6} {:>12.4} {:>12.4} {:>9.4} {:>10.4} {:>10.4} {:>7}",
            s.layers, s.ce_loss_replaced, s.ce_loss_ablated, s.ce_loss_score, s.kl_div_replaced, s.kl_div_ablated, fvu
        );
    }
    Ok(())
}
