//! Harvest with the real model (SmolLM2-135M from `$SAEKIT_MODEL` or the cache): stored rows equal a
//! direct `run_with_cache`, sinks are marked, and a second run extends the store instead of redoing it.

#![cfg(feature = "model")]

use std::path::{Path, PathBuf};

use saekit_model::{HookPoint, LoadOptions, Model};
use saekit_store::harvest::{harvest, tokenize_options_for, HarvestOptions};
use saekit_store::*;

fn model_path() -> PathBuf {
    let p = std::env::var_os("SAEKIT_MODEL").map(PathBuf::from).unwrap_or_else(saekit_model::default_model_path);
    assert!(p.exists(), "real-model test: {} is missing; run scripts/fetch-model.sh or set SAEKIT_MODEL", p.display());
    p
}

fn tokenize_texts(model: &Model, texts: &[String], opts: &TokenizeOptions, out: &Path) -> anyhow::Result<()> {
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

#[test]
fn harvest_refuses_other_tokenizers_and_rebuilt_tokens() {
    let path = model_path();
    let model = Model::load(&path, &LoadOptions::default()).unwrap();
    let texts = ["The quick brown fox jumps over the lazy dog. ".repeat(8), "Hello there, world. ".repeat(12)];
    let mut opts = tokenize_options_for(&model);
    assert!(opts.tokenizer_fingerprint.starts_with("vocab49152-"), "{}", opts.tokenizer_fingerprint);
    opts.context = 24;
    opts.validation_fraction = 0.0;
    let hopts =
        HarvestOptions { tokens: 2 * 24, batch: 2, contexts_per_shard: 1, progress: false, ..Default::default() };
    // tokens made by another tokenizer (same ids, other vocabulary) are refused, naming both
    let other = tempfile::tempdir().unwrap();
    let alien = TokenizeOptions { tokenizer_fingerprint: "vocab50257-0123456789abcdef".into(), ..opts.clone() };
    tokenize_texts(&model, &texts, &alien, other.path()).unwrap();
    let out = tempfile::tempdir().unwrap();
    let e = format!(
        "{:#}",
        harvest(&model, &path, &TokenDataset::open(other.path()).unwrap(), out.path(), &hopts).unwrap_err()
    );
    assert!(e.contains("vocab50257-0123456789abcdef") && e.contains(&opts.tokenizer_fingerprint), "{e}");
    // a dataset rebuilt at the same path is another dataset: the store refuses to extend with it
    let data_dir = tempfile::tempdir().unwrap();
    tokenize_texts(&model, &texts, &opts, data_dir.path()).unwrap();
    let m = harvest(&model, &path, &TokenDataset::open(data_dir.path()).unwrap(), out.path(), &hopts).unwrap();
    assert_eq!(m.n_contexts, 2);
    let changed = [texts[1].clone(), texts[0].clone()];
    tokenize_texts(&model, &changed, &opts, data_dir.path()).unwrap();
    let more = HarvestOptions { tokens: 3 * 24, ..hopts.clone() };
    let e = format!(
        "{:#}",
        harvest(&model, &path, &TokenDataset::open(data_dir.path()).unwrap(), out.path(), &more).unwrap_err()
    );
    let tokens = data_dir.path().canonicalize().unwrap();
    assert!(e.contains(&format!("token dataset at {}, which has changed", tokens.display())), "{e}");
}

#[test]
fn harvest_matches_direct_forward_and_resumes() {
    let path = model_path();
    let model = Model::load(&path, &LoadOptions::default()).unwrap();
    let texts = [
        "The quick brown fox jumps over the lazy dog. ".repeat(6),
        "fn main() { println!(\"hello\"); }\n".repeat(5),
        "Der schnelle braune Fuchs springt über den faulen Hund. ".repeat(5),
    ];
    let data_dir = tempfile::tempdir().unwrap();
    let mut opts = tokenize_options_for(&model);
    assert_eq!(opts.bos, None, "SmolLM2 does not add BOS");
    opts.context = 24;
    opts.validation_fraction = 0.0;
    tokenize_texts(&model, &texts, &opts, data_dir.path()).unwrap();
    let data = TokenDataset::open(data_dir.path()).unwrap();
    let split = data.split("train").unwrap();
    assert!(split.n_contexts() >= 6, "{}", split.n_contexts());

    let out = tempfile::tempdir().unwrap();
    let hooks = vec![HookPoint::ResidPost(1), HookPoint::ResidPost(3)];
    let hopts = HarvestOptions {
        hooks: hooks.clone(),
        tokens: 3 * 24,
        batch: 2,
        contexts_per_shard: 2,
        progress: false,
        ..Default::default()
    };
    let m = harvest(&model, &path, &data, out.path(), &hopts).unwrap();
    assert_eq!(m.n_contexts, 3);
    // A bigger budget continues from context 3 (whole shards are kept, the partial one is redone).
    let m = harvest(&model, &path, &data, out.path(), &HarvestOptions { tokens: 6 * 24, ..hopts.clone() }).unwrap();
    assert_eq!(m.n_contexts, 6);
    assert!(m.complete);

    let store = ActivationStore::open(out.path()).unwrap();
    let d = model.config().d_model;
    let mut row = vec![0f32; d];
    let mut c_global = 0u64;
    for i in 0..store.n_shards() {
        let v = store.shard(i);
        for c in 0..v.entry().n_contexts as usize {
            let ids = split.context(c_global);
            let cache = model.run_with_cache(ids, 1, &hooks).unwrap();
            for (h, point) in hooks.iter().enumerate() {
                let want = cache.get(point).unwrap();
                for p in 0..24 {
                    let r = c * 24 + p;
                    assert_eq!(v.tokens()[r], ids[p]);
                    v.row(h, r, &mut row);
                    let w = &want[p * d..(p + 1) * d];
                    let err = row.iter().zip(w).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                    let scale = w.iter().map(|x| x.abs()).fold(0f32, f32::max);
                    assert!(err <= scale / 128.0, "bf16 rounding only: {err} vs max {scale}");
                    let mk = v.marks()[r];
                    assert_eq!(mk & marks::POS0 != 0, p == 0);
                    assert_eq!(mk & marks::EOT != 0, ids[p] == opts.separator);
                }
            }
            c_global += 1;
        }
    }
    let st = store.manifest().stats("blocks.3.hook_resid_post").unwrap();
    assert!(st.marked_mean_norm > 5.0 * st.mean_norm, "position 0 is an attention sink");
}

/// Which tokens are attention sinks, measured: the layer-15 residual norm of each token of a text with
/// a document break and chat turns in mid-context, over the median. Printed with `--nocapture`.
#[test]
fn sink_norms_decide_the_sink_rule() {
    let path = model_path();
    let model = Model::load(&path, &LoadOptions::default()).unwrap();
    let tok = model.tokenizer();
    let text = "The river runs past the old mill and into the valley below the town.<|endoftext|>Another \
                document starts here with ordinary words.<|im_start|>user\nWhat is the capital of France?<|im_end|>\n\
                <|im_start|>assistant\nThe capital of France is Paris.<|im_end|>\n<|im_start|>user\nThanks!<|im_end|>";
    let ids = tok.encode(text, false).unwrap();
    let layers = [6usize, 15, 25];
    let hooks: Vec<HookPoint> = layers.iter().map(|&l| HookPoint::ResidPost(l)).collect();
    let cache = model.run_with_cache(&ids, 1, &hooks).unwrap();
    let d = model.config().d_model;
    println!(
        "bos {:?} (added: {}), eos {}, end-of-text {:?}",
        tok.bos_token_id(),
        tok.add_bos(),
        tok.eos_token_id(),
        tok.end_of_text_id()
    );
    let ratios: Vec<Vec<f32>> = hooks
        .iter()
        .map(|h| {
            let n: Vec<f32> =
                cache.get(h).unwrap().chunks(d).map(|r| r.iter().map(|v| v * v).sum::<f32>().sqrt()).collect();
            let mut s = n.clone();
            s.sort_by(f32::total_cmp);
            let med = s[s.len() / 2];
            n.iter().map(|x| x / med).collect()
        })
        .collect();
    for (i, &t) in ids.iter().enumerate() {
        let r: Vec<String> = ratios.iter().map(|r| format!("{:7.1}", r[i])).collect();
        println!("{i:>3} {t:>6} {:<18} {}", format!("{:?}", tok.token_text(t)), r.join(" "));
    }
    let im_start = tok.token_to_id("<|im_start|>").unwrap();
    let eot = tok.end_of_text_id().unwrap();
    let at = |id: u32| {
        ids.iter().enumerate().skip(1).filter(|(_, &t)| t == id).map(|(i, _)| ratios[1][i]).collect::<Vec<_>>()
    };
    println!(
        "layer 15 / median: position 0 {:.1}, <|endoftext|> {:?}, <|im_start|> {:?}",
        ratios[1][0],
        at(eot),
        at(im_start)
    );
}
