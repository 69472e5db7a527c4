//! `saekit eval-model`: the SAE spliced into the model (CE / KL with the SAE and with zero-ablation).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use saekit_analysis::{eval_model, ModelEvalOptions};
use saekit_sae::load_sae;
use saekit_store::TokenDataset;

use super::model_arg::ModelArgs;

/// Model-level faithfulness of an SAE on held-out contexts, SAELens evals.py definitions: CE loss
/// clean / with SAE / with zero-ablation, CE loss score, delta LM loss, KL(clean || spliced) and KL
/// score, plus FVU / explained variance, MSE, cosine, L2 ratio, L0, dead % and dense %. Position 0
/// and special tokens (attention sinks) keep their clean activation in the splice and are excluded
/// from the reconstruction metrics.
#[derive(Args, Debug)]
pub struct EvalModelArgs {
    /// SAE folder or params.npz.
    pub sae: String,
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
    let n_tokens = super::analyze::parse_count(&a.tokens)?;
    let sae = load_sae(&a.sae)?;
    let dataset = TokenDataset::open(&a.contexts)?;
    let model = a.model.load()?;
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
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!("{:<30} {}", "sae", a.sae);
        print!("{}", r.table());
    }
    Ok(())
}
