//! `--live` training on the real model (SmolLM2-135M from `$SAEKIT_MODEL` or the cache) over the
//! bundled mini corpus: the live rows are the model's rows minus the sinks, a position replays the same
//! rows, and a run killed mid-way resumes to the same weights as an uninterrupted one.

use std::path::{Path, PathBuf};

use saekit_model::{HookPoint, LoadOptions, Model};
use saekit_sae::{train, LiveSource, RunOptions, TrainConfig};
use saekit_store::harvest::tokenize_options_for;
use saekit_store::live::{BlockShare, LiveActivations, LiveOptions};
use saekit_store::{read_corpus, tokenize_corpus, CorpusOptions, TokenDataset};

const CTX: usize = 32;
const HOOK: HookPoint = HookPoint::ResidPost(2);

fn model() -> Model {
    let p = std::env::var_os("SAEKIT_MODEL").map(PathBuf::from).unwrap_or_else(saekit_model::default_model_path);
    assert!(p.exists(), "real-model test: {} is missing; run scripts/fetch-model.sh or set SAEKIT_MODEL", p.display());
    Model::load(&p, &LoadOptions::default()).unwrap()
}

/// The first documents of the bundled mini corpus in contexts of 32 tokens.
fn dataset(model: &Model, dir: &Path) -> TokenDataset {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/mini-corpus");
    let mut opts = tokenize_options_for(model);
    opts.context = CTX;
    opts.validation_fraction = 0.0;
    opts.max_tokens = Some(40 * CTX as u64);
    let tok = model.tokenizer();
    let encode = |t: &str| tok.encode(t, false);
    let copts = CorpusOptions { max_docs: Some(12), ..Default::default() };
    tokenize_corpus(|sink| read_corpus(&[corpus], &copts, sink), &encode, &opts, dir, "test", &[], None).unwrap();
    TokenDataset::open(dir).unwrap()
}

fn live_opts() -> LiveOptions {
    LiveOptions { hook: HOOK, batch: 3, block_tokens: 8 * CTX, seed: 7, ..Default::default() }
}

#[test]
fn live_rows_are_the_models_rows_without_sinks_and_replay_from_a_cursor() {
    let model = model();
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(&model, tmp.path());
    let split = data.split("train").unwrap();
    let n_ctx = split.n_contexts();
    assert!(n_ctx >= 20, "{n_ctx} contexts");
    let d = model.config().d_model;
    let sep = data.manifest().options.separator;

    // Every non-sink row of the split, computed directly.
    let mut want: Vec<Vec<f32>> = vec![];
    for c in 0..n_ctx {
        let ids = split.context(c);
        let cache = model.run_with_cache(ids, 1, &[HOOK]).unwrap();
        let a = cache.get(&HOOK).unwrap();
        for p in 1..CTX {
            if ids[p] != sep {
                want.push(a[p * d..(p + 1) * d].to_vec());
            }
        }
    }

    let mut live = LiveActivations::new(&model, &data, live_opts()).unwrap();
    assert_eq!(live.blocks_per_epoch(), n_ctx.div_ceil(8));
    // One epoch: the same rows as the direct forward, each once, shuffled.
    let mut got = vec![0f32; want.len() * d];
    live.next_rows(&mut got).unwrap();
    let c = live.cursor();
    assert_eq!((c.epoch, c.block, c.served), (1, 0, 0), "one epoch read exactly");
    let mut matched = vec![false; want.len()];
    let mut in_order = 0;
    for (i, row) in got.chunks_exact(d).enumerate() {
        // batching changes the GEMM shapes, so compare with a tolerance
        let close = |w: &Vec<f32>| {
            let scale = w.iter().map(|x| x.abs()).fold(0f32, f32::max);
            row.iter().zip(w).all(|(a, b)| (a - b).abs() <= 1e-4 * scale)
        };
        let j = (0..want.len())
            .find(|&j| !matched[j] && close(&want[j]))
            .unwrap_or_else(|| panic!("row {i} is no model row"));
        matched[j] = true;
        in_order += (i == j) as usize;
    }
    assert!(in_order < want.len() / 4, "rows are shuffled ({in_order} of {} in order)", want.len());

    // A cursor mid-block replays the same rows, bit for bit, also in a fresh source.
    let mut live = LiveActivations::new(&model, &data, live_opts()).unwrap();
    let mut skip = vec![0f32; 300 * d];
    live.next_rows(&mut skip).unwrap();
    let pos = live.cursor();
    let mut a = vec![0f32; 400 * d];
    live.next_rows(&mut a).unwrap();
    let mut fresh = LiveActivations::new(&model, &data, live_opts()).unwrap();
    fresh.seek(&pos).unwrap();
    let mut b = vec![0f32; 400 * d];
    fresh.next_rows(&mut b).unwrap();
    assert_eq!(a, b);
    // Another seed is refused as a resume position.
    let mut other = LiveActivations::new(&model, &data, LiveOptions { seed: 8, ..live_opts() }).unwrap();
    let err = other.seek(&pos).unwrap_err().to_string();
    assert!(err.contains("other data or options"), "{err}");
}

#[test]
fn live_training_resumes_bit_identically() {
    let model = model();
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(&model, &tmp.path().join("tokens"));
    let cfg = |out: &Path| TrainConfig {
        out: out.display().to_string(),
        tokens: 128 * 24,
        batch_size: 128,
        d_sae: 128,
        k: 8,
        seed: 7,
        log_every: 4,
        checkpoint_every: 5,
        norm_estimate_rows: 512,
        hook_name: HOOK.to_string(),
        context_size: CTX,
        ..Default::default()
    };
    let run = |out: &Path, opts: RunOptions| {
        let mut src = LiveSource::new(LiveActivations::new(&model, &data, live_opts()).unwrap(), "live test".into());
        train(&cfg(out), &mut src, &opts).unwrap()
    };
    let full = tmp.path().join("full");
    let o = run(&full, RunOptions::default());
    assert_eq!(o.steps, 24);
    let fvus: Vec<f64> = std::fs::read_to_string(full.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["fvu"].as_f64().unwrap())
        .collect();
    assert!(fvus[fvus.len() - 1] < 0.8 * fvus[0], "the SAE learns the live rows: FVU {fvus:?}");
    let part = tmp.path().join("part");
    let o = run(&part, RunOptions { stop_after_steps: Some(13), ..Default::default() });
    assert!(o.interrupted);
    let o = run(&part, RunOptions { resume: true, ..Default::default() });
    assert_eq!(o.steps, 24);
    let w = |dir: &Path| std::fs::read(dir.join("sae_weights.safetensors")).unwrap();
    assert_eq!(w(&full), w(&part), "resumed live run differs from the uninterrupted one");
}

/// Every row an epoch of `live` serves, grouped by the shuffle block it came from (read one row at a
/// time, so each row's block is the cursor's before it).
fn rows_by_block(live: &mut LiveActivations) -> std::collections::BTreeMap<u64, Vec<f32>> {
    let mut blocks = std::collections::BTreeMap::<u64, Vec<f32>>::new();
    let mut row = vec![0f32; live.d_model()];
    while live.cursor().epoch == 0 {
        let block = live.cursor().block;
        live.next_rows(&mut row).unwrap();
        blocks.entry(block).or_default().extend_from_slice(&row);
    }
    blocks
}

#[test]
fn data_replicas_forward_disjoint_blocks_that_together_are_the_one_process_epoch() {
    let model = model();
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(&model, tmp.path());
    let whole = rows_by_block(&mut LiveActivations::new(&model, &data, live_opts()).unwrap());
    assert!(whole.len() >= 4, "{} blocks: too few to share", whole.len());
    let share = |index: u64, count: u64| LiveOptions { share: BlockShare { index, count }, ..live_opts() };
    let mut seen = std::collections::BTreeMap::new();
    for r in 0..2 {
        let mut live = LiveActivations::new(&model, &data, share(r, 2)).unwrap();
        assert_eq!(live.cursor().block, r, "replica {r} starts at its first block");
        for (block, rows) in rows_by_block(&mut live) {
            assert_eq!(block % 2, r, "replica {r} of 2 served block {block}");
            assert!(rows == whole[&block], "replica {r}: block {block} is not the one-process block's rows");
            assert!(seen.insert(block, r).is_none(), "block {block} served twice");
        }
        // the next epoch starts again at its own first block
        assert_eq!(live.cursor().block, r);
    }
    assert_eq!(seen.keys().copied().collect::<Vec<_>>(), whole.keys().copied().collect::<Vec<_>>());

    // a replica's position is its own: another replica, or one process, cannot continue it
    let mut live = LiveActivations::new(&model, &data, share(1, 2)).unwrap();
    live.next_rows(&mut vec![0f32; 10 * live.d_model()]).unwrap();
    let pos = live.cursor();
    for other in [share(0, 2), live_opts()] {
        let err = LiveActivations::new(&model, &data, other).unwrap().seek(&pos).unwrap_err().to_string();
        assert!(err.contains("recorded by data replica 1 of 2"), "{err}");
    }
    let mut again = LiveActivations::new(&model, &data, share(1, 2)).unwrap();
    again.seek(&pos).unwrap();
    assert_eq!(again.cursor(), pos);
    // every replica needs a block of each epoch
    let n = whole.len() as u64;
    let err = LiveActivations::new(&model, &data, share(0, n + 1)).err().unwrap().to_string();
    assert!(err.contains(&format!("fewer than the {} data replicas", n + 1)), "{err}");
}
