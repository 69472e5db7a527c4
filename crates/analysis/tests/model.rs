//! Real-model tests (SmolLM2-135M from `$SAEKIT_MODEL` or the cache) with a random SAE and a tiny
//! budget. One test function so the model loads once.

use std::path::PathBuf;

use saekit_analysis::analyze::sink_rows;
use saekit_analysis::eval::{eval_model_on_tokens, spliced_forward};
use saekit_analysis::{analyze, AnalyzeOptions, FeatureDb, ModelEvalOptions, SpliceMode};
use saekit_model::{HookPoint, LoadOptions, Model};
use saekit_sae::{Activation, Sae};
use saekit_store::corpus::{Document, ReadStats};
use saekit_store::{tokenize_corpus, TokenDataset, TokenizeOptions};

fn model_path() -> PathBuf {
    let p = saekit_model::default_model_path();
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-model.sh (or set SAEKIT_MODEL) before the real-model tests",
        p.display()
    );
    p
}

const TEXTS: &[&str] = &[
    "The Golden Gate Bridge is a suspension bridge spanning the Golden Gate strait in California.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Le chat est assis sur le tapis et regarde la pluie tomber dehors.",
    "In 1969, Apollo 11 landed on the Moon; Neil Armstrong was the first person to walk on its surface.",
    "Photosynthesis converts light energy into chemical energy stored in glucose molecules.",
    "fn main() { let v: Vec<u32> = (0..10).collect(); println!(\"{:?}\", v); }",
    "The stock market fell sharply on Monday as investors worried about rising interest rates.",
    "Once upon a time, a small fox lived at the edge of a quiet forest near the river.",
    "Water boils at 100 degrees Celsius at sea level, but at a lower temperature on mountains.",
    "Der Hund spielt im Garten mit einem roten Ball, während die Sonne scheint.",
    "SELECT name, age FROM users WHERE age > 30 ORDER BY name;",
    "Shakespeare wrote many plays, including Hamlet, Macbeth and Romeo and Juliet.",
];

#[test]
fn splice_eval_and_analysis_on_the_real_model() {
    let model = Model::load(&model_path(), &LoadOptions::default()).expect("load model");
    let d = model.config().d_model;
    let layer = 6;
    let hook = HookPoint::ResidPost(layer);
    let mut sae = Sae::init(d, 256, Activation::TopK { k: 16 }, 1.0, 7);
    sae.metadata.hook_name = hook.to_string();

    // --- the error term restores the clean model exactly (to float tolerance)
    let seq = 20;
    let mut tokens = Vec::new();
    for t in &TEXTS[..2] {
        let mut ids = model.tokenizer().encode(t, true).unwrap();
        ids.resize(seq, model.tokenizer().end_of_text_id().unwrap_or(0));
        tokens.extend(ids);
    }
    let keep = sink_rows(&model, &tokens, seq);
    assert!(keep[0] && keep[seq], "position 0 must be treated as a sink");
    let (clean, _) = spliced_forward(&model, &sae, hook, &tokens, 2, SpliceMode::Clean, &keep, 10.0).unwrap();
    let (with_err, cap) =
        spliced_forward(&model, &sae, hook, &tokens, 2, SpliceMode::ReconstructionWithError, &keep, 10.0).unwrap();
    assert!(cap.is_some());
    let scale = clean.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = clean.iter().zip(&with_err).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(diff <= 1e-4 * scale, "spliced-with-error logits differ from clean by {diff} (scale {scale})");
    let (recon, _) = spliced_forward(&model, &sae, hook, &tokens, 2, SpliceMode::Reconstruction, &keep, 10.0).unwrap();
    let rdiff = clean.iter().zip(&recon).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(rdiff > 1e-2, "a random SAE should change the logits (max diff {rdiff})");

    // --- model-level metrics are finite and ordered as they must be for a random SAE
    let r =
        eval_model_on_tokens(&model, &sae, &tokens, seq, &ModelEvalOptions { progress: false, ..Default::default() })
            .unwrap();
    assert_eq!(r.n_predicted, 2 * (seq as u64 - 1));
    assert!(r.ce_loss_without_sae.is_finite() && r.ce_loss_without_sae > 0.0);
    assert!(r.ce_loss_with_ablation > r.ce_loss_without_sae, "{r:?}");
    assert!(r.kl_div_with_sae > 0.0 && r.kl_div_with_ablation > 0.0);
    assert!((r.delta_lm_loss - (r.ce_loss_with_sae - r.ce_loss_without_sae)).abs() < 1e-12);
    assert!((r.fvu + r.explained_variance - 1.0).abs() < 1e-9);
    assert!(r.l0 > 0.0 && r.l0 <= 16.0);
    assert!(r.n_sink_rows >= 2);

    // --- analysis: a resumed run writes the same database as an uninterrupted one
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("tokens");
    let topts = TokenizeOptions {
        context: 16,
        validation_fraction: 0.5,
        bos: model.tokenizer().bos_token_id(),
        separator: model.tokenizer().end_of_text_id().unwrap_or(0),
        ..Default::default()
    };
    let tok = model.tokenizer();
    let encode = |t: &str| tok.encode(t, false);
    tokenize_corpus(
        |sink| {
            for round in 0..3 {
                for (i, t) in TEXTS.iter().enumerate() {
                    sink(Document { text: t.to_string(), source: format!("t{round}-{i}"), kind: None, lang: None })?;
                }
            }
            Ok(ReadStats::default())
        },
        &encode,
        &topts,
        &data,
        "test",
        &[],
        None,
    )
    .unwrap();
    let ds = TokenDataset::open(&data).unwrap();
    let n_val = ds.split("validation").unwrap().n_contexts();
    assert!(n_val >= 4, "validation split too small: {n_val}");
    let mut opts = AnalyzeOptions { n_tokens: 8 * 16, batch_contexts: 3, progress: false, ..Default::default() };
    opts.stats.top_k = 5;
    opts.stats.n_quantiles = 4;
    opts.stats.per_quantile = 2;
    let one = dir.path().join("one.sqlite");
    let r1 = analyze(&model, &sae, "random-sae", &ds, &one, &opts).unwrap();
    assert!(r1.finished);
    let two = dir.path().join("two.sqlite");
    let stop = AnalyzeOptions { stop_after_contexts: Some(3), ..opts.clone() };
    let r2a = analyze(&model, &sae, "random-sae", &ds, &two, &stop).unwrap();
    assert!(!r2a.finished && !two.exists());
    assert!(dir.path().join("two.sqlite.ckpt").exists());
    let r2b = analyze(&model, &sae, "random-sae", &ds, &two, &opts).unwrap();
    assert!(r2b.finished && r2b.resumed_from == 3, "{r2b:?}");
    assert!(!dir.path().join("two.sqlite.ckpt").exists());

    let (a, b) = (FeatureDb::open(&one).unwrap(), FeatureDb::open(&two).unwrap());
    assert_eq!(a.info().unwrap().n_tokens, b.info().unwrap().n_tokens);
    let n_tokens = a.info().unwrap().n_tokens;
    let contexts = r1.n_contexts;
    // position 0 of every context and the document separators are skipped as sinks
    assert!(n_tokens > 0 && n_tokens <= contexts * 15, "{n_tokens} tokens from {contexts} contexts");
    let mut fired = 0;
    for j in 0..sae.d_sae as u32 {
        let (fa, fb) = (a.feature(j).unwrap().unwrap(), b.feature(j).unwrap().unwrap());
        assert_eq!(fa, fb, "feature {j} differs after resume");
        if fa.n_fired > 0 {
            fired += 1;
            let c = &fa.top_contexts[0];
            assert_eq!(c.acts[c.peak], c.max_act);
            assert_eq!(c.max_act, fa.max_act);
            assert_eq!(fa.promoted.len(), 10);
            assert_eq!(fa.neighbours.len(), 10);
        }
    }
    assert!(fired > 10, "only {fired} features fired");
}
