//! One forward feeding many readers (`LiveHookSet`, what `saekit train-transcoders` runs on), with the real
//! model: each reader gets, row for row, what a single-hook live source gives, while readers moving at
//! different paces on their own threads never make the set hold more blocks than its memory cap allows.

#![cfg(feature = "model")]

use saekit_model::{HookPoint, LoadOptions, Model};
use saekit_store::harvest::tokenize_options_for;
use saekit_store::live::{LiveActivations, LiveOptions};
use saekit_store::live_set::LiveHookSet;
use saekit_store::TokenDataset;

mod common;
use common::{model_path, tokenize_texts};

const CONTEXT: usize = 16;
/// Two contexts a block: 30 rows of each hook (position 0 is dropped).
const BLOCK_TOKENS: usize = 32;
const ROWS: usize = 240;

fn options(hook: HookPoint) -> LiveOptions {
    LiveOptions { hook, batch: 2, block_tokens: BLOCK_TOKENS, seed: 7, keep_rows: 1000, ..Default::default() }
}

#[test]
fn readers_at_different_paces_get_single_hook_rows_within_the_memory_cap() {
    let model = Model::load(&model_path(), &LoadOptions { blocks: Some(3), ..Default::default() }).unwrap();
    let texts: Vec<String> = (0..12)
        .map(|i| format!("Document {i}: the river {} bends past the mill {} times. ", i * 7, i + 3).repeat(4))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let mut opts = tokenize_options_for(&model);
    opts.context = CONTEXT;
    opts.validation_fraction = 0.0;
    tokenize_texts(&model, &texts, &opts, dir.path()).unwrap();
    let data = TokenDataset::open(dir.path()).unwrap();

    let layers = [0usize, 1, 2];
    let hooks = layers.iter().flat_map(|&l| [HookPoint::Ln2Normalized(l), HookPoint::MlpOut(l)]).collect();
    let set = LiveHookSet::new(&model, &data, hooks, options(HookPoint::MlpOut(0))).unwrap();
    // keep_rows alone would let the set hold 2 * 34 + 1 blocks; three blocks' bytes leave one each side
    let cap = 3 * set.block_bytes() + 1;
    let set = set.holding_at_most(cap);
    assert_eq!(set.max_blocks_held(), 3);
    let (d, set) = (set.d_model(), &set);

    let got: Vec<(Vec<f32>, Vec<f32>, u64)> = std::thread::scope(|s| {
        let handles: Vec<_> = layers
            .iter()
            .zip([7usize, 13, 29])
            .map(|(&l, step)| {
                let mut r = set.pair_reader(HookPoint::Ln2Normalized(l), HookPoint::MlpOut(l)).unwrap();
                s.spawn(move || {
                    let (mut x, mut y) = (vec![0f32; ROWS * d], vec![0f32; ROWS * d]);
                    for lo in (0..ROWS).step_by(step) {
                        let hi = (lo + step).min(ROWS);
                        r.next_pairs(&mut x[lo * d..hi * d], &mut y[lo * d..hi * d]).unwrap();
                    }
                    let c = r.cursor();
                    (x, y, c.epoch * set.blocks_per_epoch() + c.block + u64::from(c.served > 0))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let peak = set.peak_blocks_held();
    assert!((2..=3).contains(&peak), "the set held {peak} blocks at once; its cap is 3");

    for (&l, (x, y, _)) in layers.iter().zip(&got) {
        for (hook, rows) in [(HookPoint::Ln2Normalized(l), x), (HookPoint::MlpOut(l), y)] {
            let mut single = LiveActivations::new(&model, &data, options(hook)).unwrap();
            let mut want = vec![0f32; ROWS * d];
            single.next_rows(&mut want).unwrap();
            assert!(want == *rows, "{hook}: the shared forward's rows differ from a single-hook live source's");
        }
    }
    let (_, tokens) = set.forward_stats();
    let passed = got.iter().map(|g| g.2).max().unwrap();
    assert_eq!(tokens, passed * (2 * CONTEXT) as u64, "blocks computed more than once with no reader seeking back");
}
