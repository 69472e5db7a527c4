//! Real-model tests (SmolLM2-135M from `$SAEKIT_MODEL` or the cache) with a random SAE and a tiny
//! budget. One test function so the model loads once.

use std::path::PathBuf;

use saekit_analysis::analyze::sink_rows;
use saekit_analysis::eval::{eval_model_on_tokens, spliced_forward};
use saekit_analysis::{analyze, AnalyzeOptions, FeatureDb, HeldOutWindow, ModelEvalOptions, SpliceMode};
use saekit_model::{HookPoint, Hooks, LoadOptions, Logits, Model};
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

/// x̂ of every row but the sinks (`keep`), from the published TopK definition in f64.
fn reference_reconstruction(sae: &Sae, x: &[f32], keep: &[bool]) -> Vec<f32> {
    let (d, n) = (sae.d_in, sae.d_sae);
    let Activation::TopK { k } = sae.activation else { panic!("topk only") };
    let mut out = x.to_vec();
    for (r, row) in x.chunks(d).enumerate() {
        if keep[r] {
            continue;
        }
        let mut pre: Vec<(usize, f64)> = (0..n)
            .map(|j| {
                let dot: f64 = (0..d)
                    .map(|i| (row[i] as f64 - sae.params.b_dec[i] as f64) * sae.params.w_enc[j * d + i] as f64)
                    .sum();
                (j, dot + sae.params.b_enc[j] as f64)
            })
            .collect();
        pre.sort_by(|a, b| b.1.total_cmp(&a.1));
        for i in 0..d {
            let v: f64 = pre[..k].iter().map(|&(j, a)| a.max(0.0) * sae.params.w_dec[j * d + i] as f64).sum();
            out[r * d + i] = (v + sae.params.b_dec[i] as f64) as f32;
        }
    }
    out
}

#[test]
fn splice_eval_and_analysis_on_the_real_model() {
    let model = Model::load(&model_path(), &LoadOptions::default()).expect("load model");
    let d = model.config().d_model;
    let layer = 6;
    let hook = HookPoint::ResidPost(layer);
    let mut sae = Sae::init(d, 256, Activation::TopK { k: 16 }, 1.0, 7);
    sae.metadata.hook_name = hook.to_string();

    // --- splicing, checked against computations that do not go through spliced_forward
    let seq = 20;
    let mut tokens = Vec::new();
    for t in &TEXTS[..2] {
        let mut ids = model.tokenizer().encode(t, true).unwrap();
        ids.resize(seq, model.tokenizer().end_of_text_id().unwrap_or(0));
        tokens.extend(ids);
    }
    let keep = sink_rows(&model, &tokens, seq);
    assert!(keep[0] && keep[seq], "position 0 must be treated as a sink");
    // an independent clean forward: no hook at all
    let clean = model.forward(&tokens, 2, &mut model.new_cache(2), &mut Hooks::new(), Logits::All).unwrap();
    let close = |a: &[f32], b: &[f32]| {
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        (diff, scale)
    };
    let no_outliers = f32::INFINITY; // only the sink rows are left alone, as the references below assume
    let (with_err, cap) =
        spliced_forward(&model, &sae, hook, &tokens, 2, SpliceMode::ReconstructionWithError, &keep, no_outliers)
            .unwrap();
    let (diff, scale) = close(&with_err, &clean);
    assert!(diff <= 1e-4 * scale, "spliced-with-error logits differ from a clean forward by {diff} (scale {scale})");
    // what the splice saw is the hook's activation in an unhooked pass (the right layer, the right rows)
    let x = model.run_with_cache(&tokens, 2, &[hook]).unwrap().take(&hook).unwrap();
    assert_eq!(cap.unwrap().0, x, "the splice captured another activation than blocks.{layer}.hook_resid_post");
    // the reconstruction splice equals a forward with x̂ from an f64 reference SAE written into the hook
    let xh = reference_reconstruction(&sae, &x, &keep);
    let (recon, _) =
        spliced_forward(&model, &sae, hook, &tokens, 2, SpliceMode::Reconstruction, &keep, no_outliers).unwrap();
    let mut hooks = Hooks::new();
    hooks.add(hook, |_, x| {
        x.copy_from_slice(&xh);
        Ok(())
    });
    let reference = model.forward(&tokens, 2, &mut model.new_cache(2), &mut hooks, Logits::All).unwrap();
    let (diff, scale) = close(&recon, &reference);
    assert!(diff <= 1e-3 * scale, "reconstruction splice differs from the reference by {diff} (scale {scale})");
    let (rdiff, _) = close(&recon, &clean);
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
    // three rounds of the texts, in order or reversed (the latter is another dataset at the same path)
    let tokenize = |reversed: bool| {
        let order: Vec<usize> = if reversed { (0..TEXTS.len()).rev().collect() } else { (0..TEXTS.len()).collect() };
        let read = |sink: &mut dyn FnMut(Document) -> anyhow::Result<()>| {
            for round in 0..3 {
                for &i in &order {
                    let source = format!("t{round}-{i}");
                    sink(Document { text: TEXTS[i].to_string(), source, kind: None, lang: None })?;
                }
            }
            Ok(ReadStats::default())
        };
        tokenize_corpus(read, &encode, &topts, &data, "test", &[], None).unwrap();
    };
    tokenize(false);
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

    // --- the held-out windows (run in batches) are those of one context at a time through the model
    let few = AnalyzeOptions { n_tokens: 2 * 16, heldout_contexts: 64, ..opts.clone() };
    let held_db = dir.path().join("heldout.sqlite");
    assert!(analyze(&model, &sae, "random-sae", &ds, &held_db, &few).unwrap().finished);
    let stored = FeatureDb::open(&held_db).unwrap().heldout().unwrap();
    let split = ds.split("validation").unwrap();
    let window = few.stats.before + few.stats.after + 1;
    let expected =
        heldout_one_context_at_a_time(&model, &sae, hook, |c| split.context(c).to_vec(), 2..n_val.min(66), window);
    // more held-out contexts than one batch holds
    assert!(expected.iter().map(|w| w.ctx).max() >= Some(2 + few.batch_contexts as u64), "{n_val} contexts");
    assert_eq!(stored, expected, "batched held-out windows differ from one context at a time");

    // --- inputs are identified by content: an SAE rebuilt at the same path is refused on resume
    let sae_dir = dir.path().join("sae").display().to_string();
    let three = dir.path().join("three.sqlite");
    assert!(!analyze(&model, &sae, &sae_dir, &ds, &three, &stop).unwrap().finished);
    let mut rebuilt = sae.clone();
    rebuilt.params.w_dec[0] += 0.5;
    let e = format!("{:#}", analyze(&model, &rebuilt, &sae_dir, &ds, &three, &opts).unwrap_err());
    assert!(e.contains("three.sqlite.ckpt: cannot resume"), "{e}");
    assert!(e.contains(&format!("the SAE at {sae_dir} is not the one")), "{e}");
    assert!(!e.contains("dataset"), "only the SAE changed: {e}");
    // ... and so is a token dataset rebuilt at the same path (other documents)
    tokenize(true);
    let ds2 = TokenDataset::open(&data).unwrap();
    let e = format!("{:#}", analyze(&model, &sae, &sae_dir, &ds2, &three, &opts).unwrap_err());
    assert!(e.contains(&format!("the token dataset at {} changed", data.display())), "{e}");
    // --restart starts over with the new inputs
    let restart = AnalyzeOptions { restart: true, ..opts.clone() };
    assert!(analyze(&model, &rebuilt, &sae_dir, &ds2, &three, &restart).unwrap().finished);
}

/// The held-out windows as `analyze` made them before it batched them: each context alone through the model,
/// sinks by position and id and by 10x its own median row norm, windows of `window` tokens from position 1
/// (a tail under half a window dropped), with the sorted features firing on a row that is not a sink.
fn heldout_one_context_at_a_time(
    model: &Model,
    sae: &Sae,
    hook: HookPoint,
    context: impl Fn(u64) -> Vec<u32>,
    held: std::ops::Range<u64>,
    window: usize,
) -> Vec<HeldOutWindow> {
    let mut out = Vec::new();
    for c in held {
        let tokens = context(c);
        let seq = tokens.len();
        let x = model.run_with_cache(&tokens, 1, &[hook]).unwrap().take(&hook).unwrap();
        let codes = sae.encode(&x);
        let limit = 10.0 * saekit_sae::metrics::median_norm(&x, sae.d_in);
        let mut sink = sink_rows(model, &tokens, seq);
        for (s, row) in sink.iter_mut().zip(x.chunks(sae.d_in)) {
            *s |= row.iter().map(|v| v * v).sum::<f32>() > limit * limit;
        }
        let mut start = 1;
        while start < seq {
            let end = (start + window).min(seq);
            if 2 * (end - start) >= window {
                let mut fired: Vec<u32> = (start..end)
                    .filter(|&r| !sink[r])
                    .flat_map(|r| {
                        let (idx, val) = codes.row(r);
                        idx.iter().zip(val).filter(|(_, v)| **v > 0.0).map(|(i, _)| *i).collect::<Vec<_>>()
                    })
                    .collect();
                fired.sort_unstable();
                fired.dedup();
                out.push(HeldOutWindow { ctx: c, start: start as u32, ids: tokens[start..end].to_vec(), fired });
            }
            start += window;
        }
    }
    out
}

/// A chat model's turn opener is not a sink by its id: SmolLM2's `<|im_start|>` (its nominal BOS) opens
/// every turn, and analysis, eval and search must read those rows like any other unless their norm says
/// otherwise (harvest's rule; the norms are measured in saekit-store's tests/harvest.rs).
#[test]
fn chat_turn_openers_are_not_sinks_by_id() {
    let model = Model::load(&model_path(), &LoadOptions::default()).expect("load model");
    let tok = model.tokenizer();
    let im_start = tok.token_to_id("<|im_start|>").expect("SmolLM2 has <|im_start|>");
    let chat = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>\n\
                <|im_start|>user\nAnd of Spain?<|im_end|>\n";
    let ids = tok.encode(chat, false).unwrap();
    let openers: Vec<usize> = (1..ids.len()).filter(|&i| ids[i] == im_start).collect();
    assert!(openers.len() >= 2, "the chat text must hold turn openers past position 0: {ids:?}");
    let marks = sink_rows(&model, &ids, ids.len());
    assert!(marks[0], "position 0 is a sink");
    for i in openers {
        assert!(!marks[i], "<|im_start|> at position {i} was marked a sink by its id");
    }
}
