//! `saekit probe`: single-feature sparse probing on a labelled set of texts.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use saekit_analysis::analyze::sae_hook;
use saekit_analysis::search::{probe, read_labelled, text_features};
use saekit_sae::load_sae;

use super::model_arg::ModelArgs;

/// For each label (one-vs-rest) of a JSONL set with `text` and label fields: the single feature
/// whose per-text max activation best predicts it (AUROC on the even-indexed texts), and its test
/// AUROC and accuracy (threshold fixed on the train half) on the odd-indexed texts.
#[derive(Args, Debug)]
pub struct ProbeArgs {
    /// SAE folder or params.npz.
    pub sae: String,
    /// JSONL file with a `text` field and a label field.
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long, default_value = "label")]
    pub label_field: String,
    /// Use at most this many texts (from the start of the file).
    #[arg(long)]
    pub max_texts: Option<usize>,
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long)]
    pub hook: Option<String>,
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: ProbeArgs) -> Result<()> {
    let sae = load_sae(&a.sae)?;
    let model = a.model.load()?;
    let hook = sae_hook(&model, &sae, &a.sae, a.hook.as_deref().map(str::parse).transpose()?)?;
    let mut rows = read_labelled(&a.data, Some(&a.label_field))?;
    if let Some(m) = a.max_texts {
        rows.truncate(m);
    }
    let (texts, labels): (Vec<String>, Vec<String>) = rows.into_iter().unzip();
    let feats = text_features(&model, &sae, hook, &texts, a.max_tokens)?;
    let res = probe(&feats, &labels)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&res)?);
        return Ok(());
    }
    println!(
        "{} texts from {}; best single feature per label (train = even lines, test = odd lines)",
        texts.len(),
        a.data.display()
    );
    println!(
        "{:<16} {:>6} {:>6} {:>9} {:>11} {:>10} {:>9} {:>9}",
        "label", "n", "other", "feature", "train AUROC", "test AUROC", "test acc", "majority"
    );
    for r in &res {
        println!(
            "{:<16} {:>6} {:>6} {:>9} {:>11.3} {:>10.3} {:>9.3} {:>9.3}",
            r.label,
            r.n_pos,
            r.n_neg,
            format!("{}#{}", if r.above { "" } else { "-" }, r.feature),
            r.train_auroc,
            r.test_auroc,
            r.test_accuracy,
            r.test_majority_baseline
        );
    }
    Ok(())
}
