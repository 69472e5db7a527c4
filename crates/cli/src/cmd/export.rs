//! `saekit export neuronpedia`: a feature database and its SAE in Neuronpedia's export layout (the format
//! lives in `saekit_analysis::neuronpedia`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use saekit_analysis::neuronpedia::{export, NeuronpediaIds};
use saekit_analysis::FeatureDb;

#[derive(clap::Subcommand, Debug)]
pub enum ExportCommand {
    /// features/, explanations/ and activations/batch-N.jsonl.gz plus the model, source and source-set
    /// records, with the field names of Neuronpedia's database models.
    Neuronpedia(NeuronpediaArgs),
}

#[derive(clap::Args, Debug)]
pub struct NeuronpediaArgs {
    #[arg(long, default_value = "features.sqlite")]
    pub db: PathBuf,
    /// The SAE the database describes (its decoder rows become the feature vectors).
    #[arg(long)]
    pub sae: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    /// Neuronpedia model id (default: the database's model name, lowercased, spaces as dashes).
    #[arg(long)]
    pub model_id: Option<String>,
    /// Source-set name; the source id is `{layer}-{set}`.
    #[arg(long, default_value = "saekit-res")]
    pub set_name: String,
}

pub fn run(c: ExportCommand) -> Result<()> {
    let ExportCommand::Neuronpedia(a) = c;
    let db = FeatureDb::open(&a.db)?;
    let sae = saekit_sae::load_sae(&a.sae).with_context(|| format!("{}: cannot load the SAE", a.sae.display()))?;
    let info = db.info()?;
    let layer = info.hook.split('.').nth(1).filter(|l| l.chars().all(|c| c.is_ascii_digit())).unwrap_or("0");
    let ids = NeuronpediaIds {
        model_id: a.model_id.clone().unwrap_or_else(|| info.model.to_lowercase().replace(' ', "-")),
        source_id: format!("{layer}-{}", a.set_name),
        set_name: a.set_name.clone(),
    };
    let r = export(&db, &sae.params.w_dec, sae.d_in, &ids, &a.out)?;
    println!(
        "wrote {} features, {} explanations, {} activations in {} batches to {}",
        r.features,
        r.explanations,
        r.activations,
        r.batches,
        r.dir.display()
    );
    Ok(())
}
