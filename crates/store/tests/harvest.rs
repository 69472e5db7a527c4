//! Harvest with the real model (SmolLM2-135M from `$SAEKIT_MODEL` or the cache): stored rows equal a
//! direct `run_with_cache`, sinks are marked, and a second run extends the store instead of redoing it.

#![cfg(feature = "model")]

use saekit_model::{Bf16Path, HookPoint, LoadOptions, Model, Precision};
use saekit_store::harvest::{harvest, tokenize_options_for, HarvestOptions};
use saekit_store::*;

mod common;
use common::{model_path, tokenize_texts};

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

/// Chat data, harvested: which rows are sinks is measured, not assumed from a token id. SmolLM2 names
/// `<|im_start|>` its BOS but never adds it, and the token opens every chat turn; marking it by id
/// dropped every turn's first row from training. The rule now: position 0, end-of-text ids, and any row
/// whose norm exceeds 10x the median norm of the other rows. Checked against norms computed here from
/// an independent forward pass; the measured numbers are in the manifest's rule.
#[test]
fn sink_rows_are_decided_by_measured_norms() {
    let path = model_path();
    let model = Model::load(&path, &LoadOptions::default()).unwrap();
    let tok = model.tokenizer();
    let im_start = tok.token_to_id("<|im_start|>").unwrap();
    assert_eq!(tok.bos_token_id(), Some(im_start), "SmolLM2 names <|im_start|> its BOS (the old rule's input)");
    let turns = [
        ("What is the capital of France?", "The capital of France is Paris, on the Seine."),
        ("Name a prime number above ten.", "Eleven is a prime number; so are 13 and 17."),
        ("How do plants make food?", "Plants use sunlight, water and carbon dioxide to make sugar."),
        ("Thanks, that helps!", "You are welcome. Ask me anything else."),
    ];
    let texts: Vec<String> = (0..6)
        .map(|i| {
            let (q, a) = turns[i % turns.len()];
            let (q2, a2) = turns[(i + 1) % turns.len()];
            format!(
                "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n\
                 <|im_start|>assistant\n{a}<|im_end|>\n<|im_start|>user\n{q2}<|im_end|>\n<|im_start|>assistant\n{a2}<|im_end|>\n"
            )
        })
        .collect();
    let data_dir = tempfile::tempdir().unwrap();
    let mut opts = tokenize_options_for(&model);
    opts.context = 48;
    opts.validation_fraction = 0.0;
    tokenize_texts(&model, &texts, &opts, data_dir.path()).unwrap();
    let data = TokenDataset::open(data_dir.path()).unwrap();
    let split = data.split("train").unwrap();
    let n_ctx = split.n_contexts();
    assert!(n_ctx >= 4, "{n_ctx}");
    let hooks = vec![HookPoint::ResidPost(6), HookPoint::ResidPost(15)];
    let out = tempfile::tempdir().unwrap();
    let factor = 10.0f32;
    // one shard, so the harvest's median is over the same rows as the one computed below
    let hopts = HarvestOptions {
        hooks: hooks.clone(),
        tokens: n_ctx * 48,
        batch: 4,
        contexts_per_shard: n_ctx as usize,
        outlier_factor: Some(factor),
        progress: false,
        ..Default::default()
    };
    let m = harvest(&model, &path, &data, out.path(), &hopts).unwrap();
    assert_eq!(m.config.bos_token, None, "no BOS is added, so none is marked by id");
    assert_eq!(m.shards.len(), 1);

    // Independent norms: a direct forward pass per context, the median over rows that are neither
    // position 0 nor an end-of-text id, the threshold 10x that.
    let d = model.config().d_model;
    let (mut ids, mut norms) = (vec![], vec![vec![]; hooks.len()]);
    for c in 0..n_ctx {
        let ctx_ids = split.context(c);
        let cache = model.run_with_cache(ctx_ids, 1, &hooks).unwrap();
        for (h, point) in hooks.iter().enumerate() {
            norms[h].extend(cache.get(point).unwrap().chunks(d).map(|r| r.iter().map(|v| v * v).sum::<f32>().sqrt()));
        }
        ids.extend_from_slice(ctx_ids);
    }
    let by_id = |r: usize| r.is_multiple_of(48) || m.config.eot_tokens.contains(&ids[r]);
    let medians: Vec<f32> = norms
        .iter()
        .map(|n| {
            let mut base: Vec<f32> = n.iter().enumerate().filter(|(r, _)| !by_id(*r)).map(|(_, &x)| x).collect();
            base.sort_by(f32::total_cmp);
            base[base.len() / 2]
        })
        .collect();
    for (h, (&want, &got)) in medians.iter().zip(&m.shards[0].median_norms).enumerate() {
        assert!((got - want).abs() <= 0.01 * want, "hook {h}: manifest median {got}, measured here {want}");
    }
    let store = ActivationStore::open(out.path()).unwrap();
    let v = store.shard(0);
    let (mut kept_im_start, mut massive_im_start, mut massive_elsewhere, mut checked) = (0, 0, 0, 0);
    for r in 0..ids.len() {
        let mk = v.marks()[r];
        let ratios: Vec<f32> = (0..hooks.len()).map(|h| norms[h][r] / medians[h]).collect();
        // bf16 storage moves a norm by < 1%: rows that close to the threshold may go either way
        if ratios.iter().any(|x| (x / factor - 1.0).abs() < 0.02) {
            continue;
        }
        checked += 1;
        let massive = ratios.iter().any(|&x| x > factor);
        assert_eq!(mk & marks::OUTLIER != 0, massive, "row {r} (token {}): norm / median {ratios:?}", ids[r]);
        assert_eq!(mk & marks::BOS, 0, "row {r}: no row is marked BOS by its id");
        if ids[r] == im_start && r % 48 != 0 {
            if massive {
                massive_im_start += 1;
            } else {
                assert_eq!(mk, 0, "row {r}: an ordinary <|im_start|> row is kept for training");
                kept_im_start += 1;
            }
        }
        if massive && r % 48 != 0 {
            massive_elsewhere += 1;
        }
    }
    println!(
        "medians {medians:?}; <|im_start|> rows kept {kept_im_start}, massive {massive_im_start}; massive rows past \
         position 0: {massive_elsewhere}; rows checked {checked} of {}",
        ids.len()
    );
    assert!(kept_im_start >= 10, "the old rule dropped these: {kept_im_start}");
    assert!(checked >= ids.len() * 9 / 10, "{checked} of {} rows clear of the threshold", ids.len());
    // the rule and what was measured travel with the store (and into an SAE's cfg.json)
    let rule = store.manifest().sink_rule();
    assert!(rule.starts_with("position 0; end-of-text ids") && !rule.contains("BOS"), "{rule}");
    let outliers = m.shards[0].n_outliers;
    assert!(rule.contains(&format!("norm > {factor}x")) && rule.contains(&format!("{outliers} rows")), "{rule}");
    assert!(rule.contains(&format!("{:.3} at blocks.15.hook_resid_post", m.shards[0].median_norms[1])), "{rule}");
}

/// The manifest says what the forward pass's products ran in: a store begun in f32 refuses rows computed in
/// bf16 (and the reverse), and a manifest from before the field existed reads as f32.
#[test]
fn harvest_records_its_precision_and_refuses_to_mix_them() {
    let path = model_path();
    let mut model = Model::load(&path, &LoadOptions { blocks: Some(2), ..Default::default() }).unwrap();
    let data_dir = tempfile::tempdir().unwrap();
    let opts = TokenizeOptions { context: 24, validation_fraction: 0.0, ..tokenize_options_for(&model) };
    tokenize_texts(&model, &["The quick brown fox jumps over the lazy dog. ".repeat(12)], &opts, data_dir.path())
        .unwrap();
    let data = TokenDataset::open(data_dir.path()).unwrap();
    // two contexts per pass: 48 rows
    let hopts = HarvestOptions {
        hooks: vec![HookPoint::ResidPost(1)],
        tokens: 2 * 24,
        batch: 2,
        contexts_per_shard: 2,
        progress: false,
        ..Default::default()
    };
    let f32_store = tempfile::tempdir().unwrap();
    assert_eq!(harvest(&model, &path, &data, f32_store.path(), &hopts).unwrap().config.model.precision, "f32");

    model.set_precision(Precision::Bf16(Bf16Path::fastest().unwrap_or(Bf16Path::Reference)));
    let more = HarvestOptions { tokens: 4 * 24, ..hopts.clone() };
    let e = format!("{:#}", harvest(&model, &path, &data, f32_store.path(), &more).unwrap_err());
    assert!(e.contains("different configuration") && e.contains(r#""precision":"bf16""#), "{e}");
    let bf16_store = tempfile::tempdir().unwrap();
    assert_eq!(harvest(&model, &path, &data, bf16_store.path(), &hopts).unwrap().config.model.precision, "bf16");

    let manifest = f32_store.path().join("manifest.json");
    let mut old: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    old["model"].as_object_mut().unwrap().remove("precision").unwrap();
    std::fs::write(&manifest, old.to_string()).unwrap();
    assert_eq!(ActivationStore::open(f32_store.path()).unwrap().manifest().config.model.precision, "f32");
}
