//! `saekit harvest`: run the model over tokenized contexts and store hook activations (resumable).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use saekit_model::{Bf16Path, HookPoint, Model, PrecisionChoice};
use saekit_store::harvest::{harvest, HarvestOptions};
use saekit_store::{remove_store, Dtype, StoreManifest, TokenDataset};

use super::model_arg::{ModelArgs, PrecisionArgs};

#[derive(clap::Args, Debug)]
pub struct HarvestArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub precision: PrecisionArgs,
    /// Comma-separated TransformerLens hook names; one forward pass serves them all and stops after the
    /// deepest block.
    #[arg(long, default_value = "blocks.15.hook_resid_post", value_delimiter = ',')]
    pub hooks: Vec<String>,
    /// Tokens to store (10M, 500k, 1e6 ...), rounded up to whole contexts.
    #[arg(long, default_value = "1M", value_parser = parse_count)]
    pub tokens: u64,
    /// Tokenized dataset from `saekit tokenize`.
    #[arg(long)]
    pub contexts: PathBuf,
    /// Split of the dataset to read.
    #[arg(long, default_value = "train")]
    pub split: String,
    /// First context of the split to use (harvest disjoint stores from one dataset).
    #[arg(long, default_value_t = 0)]
    pub first_context: u64,
    /// Contexts per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Storage type: bf16 (default, half the disk of f32), f16 or f32.
    #[arg(long, default_value = "bf16")]
    pub dtype: Dtype,
    /// Contexts per shard file (the unit of resumption).
    #[arg(long, default_value_t = 256)]
    pub contexts_per_shard: usize,
    /// Mark rows whose norm exceeds this multiple of the shard's median norm (attention sinks away from
    /// position 0); readers skip them by default. 0 disables. Besides these, only position 0, an added
    /// BOS and end-of-text ids are marked: no other token (e.g. `<|im_start|>`) is a sink by its id. The
    /// manifest records the rule with the measured medians and share of rows marked.
    #[arg(long, default_value_t = 10.0)]
    pub outlier_factor: f32,
    /// Delete an existing store in OUT instead of resuming it (refused if OUT holds other files).
    #[arg(long)]
    pub overwrite: bool,
    /// Output directory (created; resumed when it holds the same harvest).
    pub out: PathBuf,
}

/// `10M`, `2.5k`, `1e6`, `1_000_000` -> a count.
pub fn parse_count(s: &str) -> Result<u64, String> {
    let t = s.trim().replace('_', "");
    let (num, mul) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 1e3),
        Some('m' | 'M') => (&t[..t.len() - 1], 1e6),
        Some('g' | 'G' | 'b' | 'B') => (&t[..t.len() - 1], 1e9),
        _ => (&t[..], 1.0),
    };
    let v: f64 = num.parse().map_err(|_| format!("'{s}' is not a count (examples: 10M, 500k, 1e6)"))?;
    if !(v.is_finite() && v >= 0.0) {
        return Err(format!("'{s}' is not a count"));
    }
    Ok((v * mul).round() as u64)
}

pub fn run(a: HarvestArgs) -> Result<()> {
    let hooks: Vec<HookPoint> = a
        .hooks
        .iter()
        .map(|h| h.trim().parse::<HookPoint>().with_context(|| format!("bad hook name {h:?}")))
        .collect::<Result<_>>()?;
    if hooks.is_empty() {
        bail!("--hooks is empty");
    }
    let data = TokenDataset::open(&a.contexts)?;
    let ranks = super::mpi_job::join(None)?.map(|job| job.harvest);
    let first = ranks.as_ref().is_none_or(|r| r.rank() == 0);
    if a.overwrite && first {
        remove_store(&a.out)?;
    }
    if let Some(r) = &ranks {
        r.all_ok(true); // the other ranks wait for the old store to be gone
    }
    let path = a.model.path()?;
    // only the blocks up to the deepest hook are held (a 2B model's middle layer in half the memory)
    let precision = PrecisionArgs::resolve(precision_choice(a.precision.precision, &a.out)?)?;
    let model = a.model.load_at(HookPoint::blocks_for(&hooks), precision)?;
    let opts = HarvestOptions {
        hooks,
        tokens: a.tokens,
        split: a.split,
        first_context: a.first_context,
        batch: a.batch,
        dtype: a.dtype,
        contexts_per_shard: a.contexts_per_shard,
        outlier_factor: (a.outlier_factor > 0.0).then_some(a.outlier_factor),
        stop: Some(super::interrupt::stop_flag()?),
        progress: first,
        ranks: ranks.clone(),
    };
    let harvested = harvest_with(&model, &path, &data, &a.out, &opts);
    if ranks.is_some() {
        super::mpi_job::fatal_across_ranks(harvested.as_ref().err());
    }
    harvested
}

/// `auto` resuming a store keeps the precision the store was begun with: auto's measurement may come out
/// the other way on a rerun, and a store of mixed bf16 and f32 rows would be refused as another harvest.
/// (`--overwrite` has removed the store by now, so a fresh one measures.)
fn precision_choice(asked: PrecisionChoice, out: &Path) -> Result<PrecisionChoice> {
    let manifest = out.join(saekit_store::store::MANIFEST);
    if asked != PrecisionChoice::Auto || !manifest.exists() {
        return Ok(asked);
    }
    // an unreadable manifest is reported by the harvest itself, naming the file
    let recorded = std::fs::read_to_string(&manifest)
        .ok()
        .and_then(|text| serde_json::from_str::<StoreManifest>(&text).ok())
        .and_then(|m| m.config.model.precision.parse::<PrecisionChoice>().ok());
    let Some(p) = recorded else { return Ok(asked) };
    if p == PrecisionChoice::Bf16 && Bf16Path::fastest().is_none() {
        bail!(
            "{}: this store was begun in bf16, and this CPU has neither AMX-BF16 nor AVX512-BF16; \
             resume it on a CPU that has, or start again with --overwrite",
            out.display()
        );
    }
    tracing::info!("{}: resuming at the store's precision, {p:?}", out.display());
    Ok(p)
}

/// Harvest `data` through `model` into the store `out` (resuming one that is there), then report it;
/// a signal exits 130 with the contexts done kept on disk.
pub fn harvest_with(model: &Model, path: &Path, data: &TokenDataset, out: &Path, opts: &HarvestOptions) -> Result<()> {
    let m = harvest(model, path, data, out, opts)?;
    if !m.complete && super::interrupt::stopped() {
        super::interrupt::exit_interrupted(
            &format!("{} contexts are on disk in {}", m.n_contexts, out.display()),
            &super::interrupt::this_command(),
        );
    }
    if opts.ranks.as_ref().is_some_and(|r| r.rank() != 0) {
        return Ok(()); // rank 0 reports
    }
    eprintln!(
        "{}: {} tokens ({} contexts, {} marked rows) x {} hook(s), {} shards, dtype {}, computed in {}",
        out.display(),
        m.n_tokens,
        m.n_contexts,
        m.n_marked,
        m.config.hooks.len(),
        m.shards.len(),
        m.config.dtype,
        m.config.model.precision
    );
    for (h, s) in &m.stats {
        eprintln!(
            "  {h}: mean norm {:.1} (marked rows {:.1}), total variance {:.1}, norm scale {:.4}",
            s.mean_norm,
            s.marked_mean_norm,
            s.total_variance,
            s.norm_scale()
        );
    }
    if let Some(r) = m.extra.get("last_run") {
        eprintln!("  this run: {r}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_count;

    #[test]
    fn counts() {
        assert_eq!(parse_count("10M"), Ok(10_000_000));
        assert_eq!(parse_count("2.5k"), Ok(2500));
        assert_eq!(parse_count("1e6"), Ok(1_000_000));
        assert_eq!(parse_count("1_000"), Ok(1000));
        assert!(parse_count("ten").is_err());
    }
}
