//! Harvest with the real model (SmolLM2-135M from `$SAEKIT_MODEL` or the cache): stored rows equal a
//! direct `run_with_cache`, sinks are marked, and a second run extends the store instead of redoing it.

#![cfg(feature = "model")]

use std::path::PathBuf;

use saekit_model::{HookPoint, LoadOptions, Model};
use saekit_store::harvest::{harvest, tokenize_options_for, HarvestOptions};
use saekit_store::*;

fn model_path() -> PathBuf {
    let p = std::env::var_os("SAEKIT_MODEL").map(PathBuf::from).unwrap_or_else(saekit_model::default_model_path);
    assert!(p.exists(), "real-model test: {} is missing; run scripts/fetch-model.sh or set SAEKIT_MODEL", p.display());
    p
}

#[test]
fn harvest_matches_direct_forward_and_resumes() {
    let path = model_path();
    let model = Model::load(&path, &LoadOptions::default()).unwrap();
    let tok = model.tokenizer();
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
    let encode = |t: &str| tok.encode(t, false);
    tokenize_corpus(
        |sink| {
            for (i, t) in texts.iter().enumerate() {
                sink(Document { text: t.clone(), source: format!("t{i}"), kind: None, lang: None })?;
            }
            Ok(ReadStats::default())
        },
        &encode,
        &opts,
        data_dir.path(),
        "test",
        &[],
        None,
    )
    .unwrap();
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
