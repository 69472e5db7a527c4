//! Write a fixture SAE and feature databases for the browser tests:
//! `cargo run -p saekit-serve --example fixture -- OUT_DIR` then
//! `saekit serve --sae OUT_DIR/sae --db OUT_DIR/features.json` (or `--db OUT_DIR/features.sqlite`, the
//! database `saekit analyze` writes, holding LLM explanations stored as `saekit explain` stores them;
//! `OUT_DIR/explained.json` lists them for the tests to look for).

use std::path::Path;

use anyhow::{Context, Result};
use saekit_analysis::{analyze, AnalyzeOptions, AutointerpWriter, Explanation, FeatureDb, Score, SortBy};
use saekit_serve::fixture::FIXTURE_TEXTS;
use saekit_serve::Engine;
use saekit_store::corpus::{Document, ReadStats};
use saekit_store::{tokenize_corpus, TokenDataset, TokenizeOptions};

fn main() -> Result<()> {
    let out = std::env::args().nth(1).context("usage: fixture OUT_DIR")?;
    let out = Path::new(&out);
    let path = saekit_model::default_model_path();
    let model = saekit_model::Model::load(&path, &saekit_model::LoadOptions::default())
        .with_context(|| format!("{}: the fixture needs the real model (scripts/fetch-model.sh)", path.display()))?;
    let engine = saekit_serve::fixture::write_fixture(model, out)?;
    analyzed_db(&engine, out)?;
    println!("wrote {0}/sae, {0}/features.json and {0}/features.sqlite", out.display());
    Ok(())
}

/// `out/features.sqlite`: the fixture texts tokenized and analysed with the fixture SAE, as `saekit tokenize`
/// and `saekit analyze` do, then two explanations of its densest feature by two explainer models, stored
/// through the writer `saekit explain` uses; `out/explained.json` names the feature and its explanations.
fn analyzed_db(engine: &Engine, out: &Path) -> Result<()> {
    let tok = engine.model.tokenizer();
    let topts = TokenizeOptions {
        context: 32,
        validation_fraction: 0.0,
        bos: tok.bos_token_id(),
        separator: tok.end_of_text_id().unwrap_or(0),
        ..Default::default()
    };
    let read = |sink: &mut dyn FnMut(Document) -> Result<()>| {
        for (i, text) in FIXTURE_TEXTS.iter().enumerate() {
            sink(Document { text: text.to_string(), source: format!("fixture-{i}"), kind: None, lang: None })?;
        }
        Ok(ReadStats::default())
    };
    let tokens = out.join("tokens");
    tokenize_corpus(read, &|t: &str| tok.encode(t, false), &topts, &tokens, "fixture", &[], None)?;
    let dataset = TokenDataset::open(&tokens)?;
    let db_path = out.join("features.sqlite");
    let opts = AnalyzeOptions { split: "train".into(), n_tokens: 1 << 20, progress: false, ..Default::default() };
    analyze(&engine.model, &engine.sae, "sae", &dataset, &db_path, &opts)?;
    let feature = FeatureDb::open(&db_path)?.list(SortBy::Density, true, 0, 1)?[0].id;
    let explanations = [
        Explanation {
            model: "fixture-explainer-large".into(),
            text: "Names of landmarks and the zeppelin hangars beside them".into(),
            detection: Some(Score::from_counts(9, 1, 8, 2, 0)),
            fuzzing: Some(Score::from_counts(7, 3, 6, 4, 1)),
            prompt_tokens: 5120,
            completion_tokens: 64,
            created: 1_700_000_000,
        },
        Explanation {
            model: "fixture-explainer-small".into(),
            text: "Commas between the items of a list".into(),
            detection: Some(Score::from_counts(5, 5, 5, 5, 0)),
            fuzzing: None,
            prompt_tokens: 2048,
            completion_tokens: 16,
            created: 1_700_000_100,
        },
    ];
    let mut writer = AutointerpWriter::open(&db_path)?;
    for e in &explanations {
        writer.put(feature, e)?;
    }
    let listed: Vec<_> = explanations
        .iter()
        .map(
            |e| serde_json::json!({ "model": e.model, "text": e.text, "detection": e.detection, "fuzzing": e.fuzzing }),
        )
        .collect();
    let explained = serde_json::json!({ "feature": feature, "explanations": listed });
    saekit_files::write_json_atomic(&out.join("explained.json"), &explained)?;
    Ok(())
}
