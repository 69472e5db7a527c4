//! `saekit eval`: core reconstruction and sparsity metrics of an SAE on activations.

use anyhow::{bail, Result};
use clap::Args;
use saekit_sae::{evaluate, load_sae, metrics, ActivationSource, NpySource};

/// Evaluate an SAE folder (SAELens v6/legacy, sparsify, or Gemma Scope params.npz) on activations.
///
/// Definitions follow SAELens evals.py: explained_variance = 1 - E||x-x̂||² / (E||x||² - ||E x||²)
/// over all rows, fvu = 1 - explained_variance, mse = mean over rows of Σ_dims (x-x̂)², cossim and
/// l2_ratio = mean per row, l0 = mean non-zero latents per row, dead_frac = latents that never
/// fire on these rows. Rows with norm above 10x the median (attention sinks) are excluded by
/// default, as in training.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// SAE folder or params.npz.
    pub sae: String,
    /// Activations: a float32 .npy file [N, d_in], or an activation store folder.
    #[arg(long)]
    pub acts: String,
    /// Hook to read from a multi-hook store (default: its only hook).
    #[arg(long, default_value = "")]
    pub hook: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Use at most this many rows (from the start; a store is read in store order, default 262144 rows).
    #[arg(long)]
    pub max_rows: Option<usize>,
    /// Exclude rows with norm above this multiple of the median norm (0 = keep all).
    #[arg(long, default_value_t = 10.0)]
    pub outlier_norm_factor: f32,
}

pub fn run(a: EvalArgs) -> Result<()> {
    let sae = load_sae(&a.sae)?;
    let mut x = if std::path::Path::new(&a.acts).is_dir() {
        let mut src = saekit_sae::StoreSource::open(std::path::Path::new(&a.acts), &a.hook, 0, false, 4096)?;
        let d = src.d_in();
        if d != sae.d_in {
            bail!("{}: activations have {d} columns but the SAE expects d_in = {}", a.acts, sae.d_in);
        }
        // one epoch at most: the reader wraps around
        let rows = (a.max_rows.unwrap_or(262_144) as u64).min(src.rows_per_epoch()) as usize;
        let mut x = vec![0.0f32; rows * d];
        src.next_batch(&mut x)?;
        x
    } else if a.acts.ends_with(".npy") {
        let src = NpySource::open(&a.acts, 0, false)?;
        let d = src.d_in();
        if d != sae.d_in {
            bail!("{}: activations have {d} columns but the SAE expects d_in = {}", a.acts, sae.d_in);
        }
        let mut x = src.read_all();
        if let Some(m) = a.max_rows {
            x.truncate(m.min(x.len() / d) * d);
        }
        x
    } else {
        bail!("{}: expected a float32 .npy file or an activation store folder", a.acts);
    };
    let d = sae.d_in;
    let mut excluded = 0;
    if a.outlier_norm_factor > 0.0 {
        let med = metrics::median_norm(&x, d);
        excluded = metrics::drop_outliers(&mut x, d, a.outlier_norm_factor * med);
    }
    let mut m = evaluate(&sae, &x);
    m.excluded_rows = excluded;
    if a.json {
        let mut v = serde_json::to_value(&m)?;
        v["dead_frac"] = serde_json::json!(m.dead_frac);
        println!("{v}");
    } else {
        println!("{:<30} {}", "sae", a.sae);
        println!("{:<30} {} ({} excluded as outliers)", "rows", m.rows, m.excluded_rows);
        for (k, v) in [
            ("fvu", m.fvu),
            ("explained_variance", m.explained_variance),
            ("mse", m.mse),
            ("cossim", m.cossim),
            ("l2_ratio", m.l2_ratio),
            ("relative_reconstruction_bias", m.relative_reconstruction_bias),
            ("l0", m.l0),
            ("l1", m.l1),
            ("dead_frac", m.dead_frac),
            ("dense_frac", m.dense_frac),
        ] {
            println!("{k:<30} {v:.6}");
        }
    }
    Ok(())
}
