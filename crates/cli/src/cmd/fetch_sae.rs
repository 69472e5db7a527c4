//! `saekit fetch-sae RELEASE ID`: download a public SAE by its SAELens name into the cache.

use std::path::PathBuf;

use anyhow::{bail, Result};

/// Resolve a SAELens release and SAE id (`gemma-scope-2b-pt-res layer_12/width_16k/average_l0_82`,
/// `gpt2-small-res-jb blocks.8.hook_resid_pre`) to its hub repo and folder through SAELens'
/// pretrained_saes.yaml (a trimmed copy is built in; --registry reads a full one), download that folder
/// and print where it is: pass that path to eval-model, search, analyze, generate --sae, serve --sae.
///
/// Honours HF_ENDPOINT, HF_TOKEN and HF_HOME (whose cache keeps interrupted downloads to resume); every file
/// is checked against the hub's SHA-256 / git SHA-1. A Gemma Scope params.npz names no hook: give the one
/// the release is for (e.g. layer_12 of a -res release: --hook blocks.12.hook_resid_post).
#[derive(clap::Args, Debug)]
pub struct FetchSaeArgs {
    /// Release name in SAELens' pretrained_saes.yaml.
    pub release: String,
    /// SAE id within the release.
    pub id: String,
    /// A pretrained_saes.yaml to read instead of the built-in copy.
    #[arg(long)]
    pub registry: Option<PathBuf>,
    /// Branch, tag or commit of the release's repo.
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// Where to put it (default: $SAEKIT_CACHE or ~/.cache/saekit); the SAE lands in CACHE/sae/ORG--REPO/PATH.
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Times one file's download is resumed after a broken connection before giving up.
    #[arg(long, default_value_t = 3)]
    pub retries: usize,
}

pub fn run(a: FetchSaeArgs) -> Result<()> {
    let registry = match &a.registry {
        Some(p) => saekit_hub::Registry::load(p)?,
        None => saekit_hub::Registry::builtin()?,
    };
    let (release, sae) = registry.resolve(&a.release, &a.id)?;
    let hub = saekit_hub::Hub::from_env(a.retries)?;
    let listing = hub.list(&release.repo_id, &a.revision)?;
    let folder = format!("{}/", sae.path.trim_end_matches('/'));
    let files: Vec<_> =
        listing.files.iter().filter(|f| f.path.starts_with(&folder) || f.path == sae.path).cloned().collect();
    if files.is_empty() {
        bail!("{}: no files under {:?} at {} ({} {})", release.repo_id, sae.path, a.revision, a.release, a.id);
    }
    // one folder per repo, its layout kept: releases sharing a repo (a -canonical list) share the downloads
    let cache = a.cache.unwrap_or_else(saekit_model::cache_dir);
    let repo_dir = cache.join("sae").join(release.repo_id.replace('/', "--"));
    tracing::info!("{} {}: {} files of {} under {}", a.release, a.id, files.len(), release.repo_id, sae.path);
    hub.download(&listing, &files, &repo_dir)?;
    println!("{}", repo_dir.join(&sae.path).display());
    Ok(())
}
