//! The shuffled activation reader that feeds training and analysis.
//!
//! Order within an epoch: the shards are permuted (seeded by seed and epoch), then taken in consecutive
//! windows of at least `shuffle_buffer` kept rows; each window's rows are permuted and served. Nothing is
//! copied into a buffer (the shards are memory-mapped), so the state is two integers, `(epoch, offset)`,
//! and a cursor resumes exactly: the window containing `offset` is rebuilt from the seed.

use anyhow::Context;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{ensure_input, StoreResult};
use crate::store::{marks, row_bytes, ActivationStore};

/// How to read a store.
#[derive(Clone, Debug)]
pub struct ReaderOptions {
    /// Hook point to read; empty picks the store's only hook.
    pub hook: String,
    /// Rows per batch.
    pub batch_tokens: usize,
    /// Seed of the shuffled order.
    pub seed: u64,
    /// Minimum rows mixed together (a window of whole shards). Larger mixes better; it costs no memory
    /// beyond one u64 per row of the window, the data stays in the page cache.
    pub shuffle_buffer: usize,
    /// `false` serves rows in store order (analysis); `true` shuffles (training).
    pub shuffle: bool,
    /// Skip rows whose mark intersects `skip_mask` (position 0, BOS, end-of-text by default).
    pub skip_marked: bool,
    /// The marks that make a row skipped (`marks::ALL` by default).
    pub skip_mask: u8,
}

impl Default for ReaderOptions {
    fn default() -> Self {
        ReaderOptions {
            hook: String::new(),
            batch_tokens: 4096,
            seed: 0,
            shuffle_buffer: 1 << 20,
            shuffle: true,
            skip_marked: true,
            skip_mask: marks::ALL,
        }
    }
}

/// Where a reader stands; store it in a training checkpoint and pass it back to resume exactly.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReaderCursor {
    /// Passes over the store completed.
    pub epoch: u64,
    /// Rows already served in this epoch.
    pub offset: u64,
    /// Fingerprint of what produced the order; resuming with anything else is refused.
    pub seed: u64,
    /// The hook read.
    pub hook: String,
    /// Rows per epoch.
    pub rows_per_epoch: u64,
    /// The shuffle window, in rows.
    pub shuffle_buffer: u64,
    /// Whether the order was shuffled.
    pub shuffle: bool,
}

/// Rows `start..end` of the epoch order, as (shard, row).
struct Window {
    start: u64,
    end: u64,
    rows: Vec<(u32, u32)>,
}

/// Yields f32 batches of `batch_tokens × d_model`, epoch after epoch.
pub struct ActivationReader {
    store: ActivationStore,
    opts: ReaderOptions,
    hook_index: usize,
    hook: String,
    d_model: usize,
    /// Kept row indices of each shard.
    kept: Vec<Vec<u32>>,
    rows_per_epoch: u64,
    epoch: u64,
    offset: u64,
    window: Option<Window>,
    /// Shard order and window boundaries (offsets) of the current epoch.
    plan_epoch: Option<u64>,
    plan: Vec<(u64, Vec<usize>)>,
    picks: Vec<(u32, u32)>,
}

impl ActivationReader {
    /// A reader over `store`, from the start or from `cursor` (refused when it was recorded for another
    /// store or other options).
    pub fn new(
        store: &ActivationStore,
        opts: ReaderOptions,
        cursor: Option<ReaderCursor>,
    ) -> StoreResult<ActivationReader> {
        let m = store.manifest();
        let hook_index =
            m.hook_index(&opts.hook).with_context(|| format!("{}", store.dir().join("manifest.json").display()))?;
        let hook = m.config.hooks[hook_index].clone();
        ensure_input!(opts.batch_tokens > 0, "batch_tokens must be > 0");
        let skip = if opts.skip_marked { opts.skip_mask } else { 0 };
        let kept: Vec<Vec<u32>> = (0..store.n_shards())
            .into_par_iter()
            .map(|i| {
                let mk = store.shard(i).marks();
                (0..mk.len() as u32).filter(|&r| mk[r as usize] & skip == 0).collect()
            })
            .collect();
        let rows_per_epoch: u64 = kept.iter().map(|k| k.len() as u64).sum();
        ensure_input!(rows_per_epoch > 0, "the store in {} has no rows to read for hook {hook}", store.dir().display());
        let mut r = ActivationReader {
            store: store.clone(),
            d_model: m.config.d_model,
            hook_index,
            hook,
            kept,
            rows_per_epoch,
            epoch: 0,
            offset: 0,
            window: None,
            plan_epoch: None,
            plan: vec![],
            picks: Vec::with_capacity(opts.batch_tokens),
            opts,
        };
        if let Some(c) = cursor {
            let mine = r.cursor();
            ensure_input!(
                c.seed == mine.seed
                    && c.hook == mine.hook
                    && c.rows_per_epoch == mine.rows_per_epoch
                    && c.shuffle_buffer == mine.shuffle_buffer
                    && c.shuffle == mine.shuffle,
                "the reader cursor was recorded for another store or other reader options (cursor: {c:?}; now: {mine:?})"
            );
            ensure_input!(
                c.offset <= r.rows_per_epoch,
                "cursor offset {} is past the epoch ({} rows)",
                c.offset,
                r.rows_per_epoch
            );
            r.epoch = c.epoch;
            r.offset = c.offset;
        }
        Ok(r)
    }

    /// Width of each row.
    pub fn d_model(&self) -> usize {
        self.d_model
    }
    /// Passes over the store completed.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
    /// Rows per batch.
    pub fn batch_tokens(&self) -> usize {
        self.opts.batch_tokens
    }
    /// Rows served per epoch (after skipping marked rows).
    pub fn rows_per_epoch(&self) -> u64 {
        self.rows_per_epoch
    }
    /// The hook read.
    pub fn hook(&self) -> &str {
        &self.hook
    }

    /// Where the rows of the last batch came from, as (shard index, row in shard): look up token ids,
    /// positions and the context through [`ActivationStore::shard`](crate::ActivationStore::shard).
    pub fn last_batch_rows(&self) -> &[(u32, u32)] {
        &self.picks
    }

    /// Where the reader stands now, to save with a checkpoint.
    pub fn cursor(&self) -> ReaderCursor {
        ReaderCursor {
            epoch: self.epoch,
            offset: self.offset,
            seed: self.opts.seed,
            hook: self.hook.clone(),
            rows_per_epoch: self.rows_per_epoch,
            shuffle_buffer: self.opts.shuffle_buffer as u64,
            shuffle: self.opts.shuffle,
        }
    }

    fn rng(&self, tag: u64, a: u64, b: u64) -> ChaCha8Rng {
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&self.opts.seed.to_le_bytes());
        seed[8..16].copy_from_slice(&tag.to_le_bytes());
        seed[16..24].copy_from_slice(&a.to_le_bytes());
        seed[24..32].copy_from_slice(&b.to_le_bytes());
        ChaCha8Rng::from_seed(seed)
    }

    /// Shard order and windows of the current epoch.
    fn ensure_plan(&mut self) {
        if self.plan_epoch == Some(self.epoch) {
            return;
        }
        let mut order: Vec<usize> = (0..self.kept.len()).collect();
        if self.opts.shuffle {
            order.shuffle(&mut self.rng(1, self.epoch, 0));
        }
        let want = if self.opts.shuffle { self.opts.shuffle_buffer.max(1) as u64 } else { 1 };
        let mut plan = vec![];
        let (mut start, mut cur, mut n) = (0u64, vec![], 0u64);
        for s in order {
            let k = self.kept[s].len() as u64;
            if k == 0 {
                continue;
            }
            cur.push(s);
            n += k;
            if n >= want {
                plan.push((start, std::mem::take(&mut cur)));
                start += n;
                n = 0;
            }
        }
        if !cur.is_empty() {
            plan.push((start, cur));
        }
        self.plan = plan;
        self.plan_epoch = Some(self.epoch);
        self.window = None;
    }

    /// Build the window that holds `self.offset`.
    fn ensure_window(&mut self) {
        if let Some(w) = &self.window {
            if self.offset >= w.start && self.offset < w.end {
                return;
            }
        }
        self.ensure_plan();
        let w = match self.plan.binary_search_by(|(s, _)| s.cmp(&self.offset)) {
            Ok(i) => i,
            Err(i) => i - 1,
        };
        let (start, shards) = &self.plan[w];
        let mut rows: Vec<(u32, u32)> = Vec::new();
        for &s in shards {
            rows.extend(self.kept[s].iter().map(|&r| (s as u32, r)));
        }
        if self.opts.shuffle {
            rows.shuffle(&mut self.rng(2, self.epoch, w as u64));
        }
        let end = start + rows.len() as u64;
        self.window = Some(Window { start: *start, end, rows });
    }

    /// Fill `out` (`batch_tokens × d_model`) with the next rows, wrapping into the next epoch as needed.
    pub fn next_batch(&mut self, out: &mut [f32]) -> StoreResult<()> {
        let d = self.d_model;
        let b = self.opts.batch_tokens;
        ensure_input!(
            out.len() == b * d,
            "next_batch: output has {} values, expected batch_tokens {} x d_model {}",
            out.len(),
            b,
            d
        );
        let mut picks = std::mem::take(&mut self.picks);
        picks.clear();
        while picks.len() < b {
            if self.offset == self.rows_per_epoch {
                self.epoch += 1;
                self.offset = 0;
                self.window = None;
            }
            self.ensure_window();
            let Some(w) = &self.window else { unreachable!("ensure_window sets the window") };
            let from = (self.offset - w.start) as usize;
            let take = ((w.end - self.offset) as usize).min(b - picks.len());
            picks.extend_from_slice(&w.rows[from..from + take]);
            self.offset += take as u64;
        }
        let inner = &self.store.inner;
        let h = self.hook_index;
        let dtype = inner.manifest.config.dtype;
        // Rows are independent: decode them in parallel, 64 rows per task.
        out.par_chunks_mut(64 * d).zip(picks.par_chunks(64)).for_each(|(o, p)| {
            for (row_out, &(s, r)) in o.chunks_exact_mut(d).zip(p) {
                dtype.decode(row_bytes(inner, s as usize, h, r as usize), row_out);
            }
        });
        self.picks = picks;
        Ok(())
    }
}
