//! What the real-model tests share: the model's path and a tokenized dataset from a few texts.

use std::path::{Path, PathBuf};

use saekit_model::Model;
use saekit_store::*;

/// SmolLM2-135M from `$SAEKIT_MODEL` or the cache.
pub fn model_path() -> PathBuf {
    let p = std::env::var_os("SAEKIT_MODEL").map(PathBuf::from).unwrap_or_else(saekit_model::default_model_path);
    assert!(p.exists(), "real-model test: {} is missing; run scripts/fetch-model.sh or set SAEKIT_MODEL", p.display());
    p
}

/// `texts` tokenized by `model` into `out`, one document each.
pub fn tokenize_texts(model: &Model, texts: &[String], opts: &TokenizeOptions, out: &Path) -> anyhow::Result<()> {
    let encode = |t: &str| model.tokenizer().encode(t, false);
    tokenize_corpus(
        |sink| {
            for (i, t) in texts.iter().enumerate() {
                sink(Document { text: t.clone(), source: format!("t{i}"), kind: None, lang: None })?;
            }
            Ok(ReadStats::default())
        },
        &encode,
        opts,
        out,
        "test",
        &[],
        None,
    )?;
    Ok(())
}
