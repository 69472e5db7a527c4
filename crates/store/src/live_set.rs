//! One forward pass feeding many trainers (`saekit train-transcoders`): a [`LiveHookSet`] runs the model
//! over each shuffle block once, capturing every hook the trainers read, and each trainer reads its
//! own (input, target) hooks through a [`LivePairReader`] with its own position.
//!
//! The blocks are those of [`crate::live::LiveActivations`] (same context order, sinks, in-block
//! shuffle), so a reader serves, row for row, what two single-hook live sources with the same options
//! serve. Readers drift apart (each trainer excludes its own outlier rows, and trainers run
//! concurrently), so recent blocks are kept until the slowest reader has passed them, and a reader more
//! than a window of blocks ahead of the slowest waits: memory stays bounded and a block is computed
//! once. A block that was dropped and is needed again is recomputed (the forward is deterministic), so
//! positions can be restored anywhere (resume) at no risk to the rows served.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use anyhow::anyhow;
use saekit_model::{HookPoint, Model};

use crate::error::{bad_input, ensure_input, StoreResult};
use crate::harvest::{check_store_hook, check_tokenizer, sink_tokens, tokenizer_fingerprint};
use crate::live::{epoch_order, forward_block, BlockAt, BlockShare, LiveCursor, LiveOptions, Sinks};
use crate::tokens::{TokenDataset, TokenSplit};

/// Every hook's rows of one shuffle block, in [`LiveHookSet::hooks`] order.
type BlockRows = Arc<Vec<Vec<f32>>>;

/// The model's rows at several hooks, computed block by block once for all readers.
pub struct LiveHookSet<'m> {
    model: &'m Model,
    split: TokenSplit,
    hooks: Vec<HookPoint>,
    opts: LiveOptions,
    sinks: (Option<u32>, Vec<u32>),
    block_contexts: u64,
    /// Blocks kept behind the slowest reader (for seeks back), and how far ahead of it a reader may
    /// run: at most `2 * keep_blocks + 1` blocks are held.
    keep_blocks: u64,
    state: Mutex<Shared>,
    changed: Condvar,
    tokenizer_fingerprint: String,
    data_fingerprint: String,
}

#[derive(Default)]
struct Shared {
    /// Computed blocks by their index over the whole run (`epoch * blocks_per_epoch + block`).
    blocks: BTreeMap<u64, BlockRows>,
    /// Each open reader's next block index.
    positions: BTreeMap<usize, u64>,
    next_reader: usize,
    /// The block being computed (by one reader; the others wait for it).
    computing: Option<u64>,
    perm: Option<(u64, Arc<Vec<u64>>)>,
    forward_seconds: f64,
    forward_tokens: u64,
    /// The most blocks held at once so far.
    peak_blocks: usize,
}

impl<'m> LiveHookSet<'m> {
    /// Rows of `hooks` (each `d_model` wide) over `data`'s split `opts.split`, run through `model`;
    /// `opts.hook` is unused (the hooks are given); `opts.keep_rows` (at least one block) is how far
    /// readers may be apart: a reader further ahead waits, a block further behind is recomputed if
    /// read again.
    pub fn new(
        model: &'m Model,
        data: &TokenDataset,
        hooks: Vec<HookPoint>,
        opts: LiveOptions,
    ) -> StoreResult<LiveHookSet<'m>> {
        ensure_input!(!hooks.is_empty(), "no hook points to read");
        for &h in &hooks {
            check_store_hook(model, h)?;
        }
        ensure_input!(opts.batch > 0, "the forward batch must be at least one context");
        // its readers (one per trainer in this process) read every block
        ensure_input!(opts.share.is_whole(), "a shared forward serves every block, not a data replica's share");
        let split = data.split(&opts.split)?;
        ensure_input!(split.n_contexts() > 0, "split {:?} of {} has no contexts", opts.split, data.dir().display());
        let vocab = model.config().vocab_size as u32;
        if let Some(bad) = split.context(0).iter().find(|&&t| t >= vocab) {
            return Err(bad_input!(
                "{}: token id {bad} is outside the model's vocabulary ({vocab}); was it tokenized for another model?",
                data.dir().display()
            )
            .into());
        }
        check_tokenizer(model, &model.config().name, data)?;
        let ctx = split.context_len();
        let block_contexts = opts.block_tokens.div_ceil(ctx).max(1) as u64;
        // rows per block at worst (position 0 of each context is always dropped)
        let block_rows = (block_contexts as usize * ctx.saturating_sub(1)).max(1);
        let keep_blocks = opts.keep_rows.div_ceil(block_rows).max(1) as u64;
        let data_fingerprint = format!("live:{}:{}:{}", data.fingerprint(), model.config().name, opts.split);
        Ok(LiveHookSet {
            model,
            sinks: sink_tokens(model, data),
            split,
            hooks,
            opts,
            block_contexts,
            keep_blocks,
            state: Mutex::new(Shared::default()),
            changed: Condvar::new(),
            tokenizer_fingerprint: tokenizer_fingerprint(model),
            data_fingerprint,
        })
    }

    /// A reader of hook `input` paired with hook `target` (both among the set's hooks), at the start.
    pub fn pair_reader(&self, input: HookPoint, target: HookPoint) -> StoreResult<LivePairReader<'_, 'm>> {
        let index = |h: HookPoint| {
            self.hooks.iter().position(|&x| x == h).ok_or_else(|| bad_input!("hook {h} is not read by this live set"))
        };
        let (i, t) = (index(input)?, index(target)?);
        let mut s = self.lock()?;
        let id = s.next_reader;
        s.next_reader += 1;
        s.positions.insert(id, 0);
        Ok(LivePairReader { set: self, id, hooks: (i, t), epoch: 0, block: 0, served: 0, rows: None })
    }

    /// Hold at most `bytes` of rows (every hook's) at once, but never fewer than three blocks: the
    /// block the slowest reader stands in and one each side of it. The window behind the slowest reader
    /// and the distance a reader may run ahead of it shrink to fit; a seek further back than the window
    /// recomputes blocks. Many readers (one per layer) would otherwise hold `2 * keep_blocks + 1`
    /// blocks of every hook.
    pub fn holding_at_most(mut self, bytes: usize) -> Self {
        let blocks = bytes / self.block_bytes().max(1);
        self.keep_blocks = self.keep_blocks.min((blocks.saturating_sub(1) / 2).max(1) as u64);
        self
    }

    /// Bytes of one shuffle block at worst: every hook's rows of its contexts.
    pub fn block_bytes(&self) -> usize {
        let rows = self.block_contexts as usize * self.split.context_len().saturating_sub(1);
        rows * self.hooks.len() * self.d_model() * std::mem::size_of::<f32>()
    }

    /// Blocks held at most while no reader seeks back: the window behind the slowest reader, its
    /// block and the distance ahead. A reader seeking behind the window adds its own blocks meanwhile.
    pub fn max_blocks_held(&self) -> u64 {
        2 * self.keep_blocks + 1
    }

    /// The most blocks held at once so far.
    pub fn peak_blocks_held(&self) -> usize {
        self.lock().map(|s| s.peak_blocks).unwrap_or(0)
    }

    /// Name of the model the rows come from.
    pub fn model_name(&self) -> &str {
        &self.model.config().name
    }
    /// Fingerprint of the model's tokenizer (checked equal to the dataset's).
    pub fn tokenizer_fingerprint(&self) -> &str {
        &self.tokenizer_fingerprint
    }
    /// Content identity of the rows: dataset fingerprint, model and split.
    pub fn data_fingerprint(&self) -> &str {
        &self.data_fingerprint
    }
    /// Which rows are skipped as sinks, in the words an activation store uses.
    pub fn sink_rule(&self) -> String {
        crate::store::sink_rule_text(self.sinks.0, &self.sinks.1, None)
    }
    /// Width of each row.
    pub fn d_model(&self) -> usize {
        self.model.config().d_model
    }
    /// Tokens per context.
    pub fn context_len(&self) -> usize {
        self.split.context_len()
    }
    /// Contexts in the split.
    pub fn n_contexts(&self) -> u64 {
        self.split.n_contexts()
    }
    /// Shuffle blocks per pass over the split.
    pub fn blocks_per_epoch(&self) -> u64 {
        self.split.n_contexts().div_ceil(self.block_contexts)
    }
    /// Seconds spent in the model and tokens run through it so far (including recomputed blocks).
    pub fn forward_stats(&self) -> (f64, u64) {
        self.lock().map(|s| (s.forward_seconds, s.forward_tokens)).unwrap_or((0.0, 0))
    }

    fn lock(&self) -> StoreResult<MutexGuard<'_, Shared>> {
        Ok(self.state.lock().map_err(|_| anyhow!("the live rows' lock was poisoned by a failed reader"))?)
    }

    /// Block `index` (over the run), computed unless kept; reader `id` now stands there.
    fn block(&self, id: usize, index: u64) -> StoreResult<BlockRows> {
        let mut s = self.lock()?;
        s.positions.insert(id, index);
        loop {
            if let Some(rows) = s.blocks.get(&index).cloned() {
                self.forget_passed(&mut s);
                self.changed.notify_all();
                return Ok(rows);
            }
            // a reader far ahead waits for the slowest (which never waits for this): memory stays bounded
            let slowest = s.positions.values().copied().min().unwrap_or(index);
            if s.computing.is_some() || index > slowest + self.keep_blocks {
                s = self.changed.wait(s).map_err(|_| anyhow!("the live rows' lock was poisoned"))?;
                continue;
            }
            s.computing = Some(index);
            let ids = self.block_ids(&mut s, index);
            drop(s);
            let t0 = Instant::now();
            let rows = self.compute(&ids, index);
            s = self.lock()?;
            s.computing = None;
            self.changed.notify_all();
            let rows = Arc::new(rows?);
            s.forward_seconds += t0.elapsed().as_secs_f64();
            s.forward_tokens += (ids.len() * self.split.context_len()) as u64;
            self.forget_passed(&mut s);
            s.blocks.insert(index, rows);
            s.peak_blocks = s.peak_blocks.max(s.blocks.len());
        }
    }

    /// The contexts of block `index`, in the epoch's order.
    fn block_ids(&self, s: &mut Shared, index: u64) -> Vec<u64> {
        let (epoch, block) = (index / self.blocks_per_epoch(), index % self.blocks_per_epoch());
        let perm = match &s.perm {
            Some((e, p)) if *e == epoch => p.clone(),
            _ => {
                let p = Arc::new(epoch_order(self.split.n_contexts(), self.opts.seed, epoch));
                s.perm = Some((epoch, p.clone()));
                p
            }
        };
        let lo = (block * self.block_contexts) as usize;
        let hi = ((block + 1) * self.block_contexts).min(self.split.n_contexts()) as usize;
        perm[lo..hi].to_vec()
    }

    fn compute(&self, ids: &[u64], index: u64) -> StoreResult<Vec<Vec<f32>>> {
        let (epoch, block) = (index / self.blocks_per_epoch(), index % self.blocks_per_epoch());
        let sinks = Sinks { bos: self.sinks.0, eot: &self.sinks.1 };
        let at = BlockAt { seed: self.opts.seed, epoch, block };
        let rows = forward_block(self.model, &self.split, self.opts.batch, sinks, &self.hooks, ids, at)?;
        ensure_input!(
            !rows[0].is_empty(),
            "block {block} of epoch {epoch} has no rows left after skipping position 0 and end-of-text tokens"
        );
        Ok(rows)
    }

    /// Drop the blocks more than `keep_blocks` behind the slowest reader.
    fn forget_passed(&self, s: &mut Shared) {
        let slowest = s.positions.values().copied().min().unwrap_or(u64::MAX);
        let floor = slowest.saturating_sub(self.keep_blocks);
        s.blocks.retain(|&i, _| i >= floor);
    }

    /// Reader `id` will read block `index` next (a seek): the others need not wait for its old place.
    fn moved(&self, id: usize, index: u64) {
        if let Ok(mut s) = self.state.lock() {
            s.positions.insert(id, index);
        }
        self.changed.notify_all();
    }

    fn close(&self, id: usize) {
        if let Ok(mut s) = self.state.lock() {
            s.positions.remove(&id);
            self.forget_passed(&mut s);
        }
        self.changed.notify_all();
    }
}

/// One trainer's (input, target) row pairs from a [`LiveHookSet`]; its position is its own.
pub struct LivePairReader<'s, 'm> {
    set: &'s LiveHookSet<'m>,
    id: usize,
    /// Indices of the input and target hooks in the set.
    hooks: (usize, usize),
    epoch: u64,
    block: u64,
    served: u64,
    /// The block being read.
    rows: Option<BlockRows>,
}

impl LivePairReader<'_, '_> {
    /// The input hook.
    pub fn input_hook(&self) -> HookPoint {
        self.set.hooks[self.hooks.0]
    }
    /// The target hook.
    pub fn target_hook(&self) -> HookPoint {
        self.set.hooks[self.hooks.1]
    }
    /// The set the rows come from.
    pub fn set(&self) -> &LiveHookSet<'_> {
        self.set
    }

    /// The next pairs: inputs into `x`, their targets into `y` (whole `d_model` rows, as many of each).
    pub fn next_pairs(&mut self, x: &mut [f32], y: &mut [f32]) -> StoreResult<()> {
        let d = self.set.d_model();
        ensure_input!(
            x.len() == y.len() && x.len().is_multiple_of(d),
            "pair buffers of {} and {} values for rows of {d}",
            x.len(),
            y.len()
        );
        let want = x.len() / d;
        let mut done = 0;
        while done < want {
            let rows = self.current()?;
            let served = self.served as usize;
            let avail = rows[0].len() / d;
            ensure_input!(served <= avail, "live cursor: {served} rows served of a block of {avail}");
            let n = (avail - served).min(want - done);
            let (xs, ys) = (&rows[self.hooks.0], &rows[self.hooks.1]);
            x[done * d..(done + n) * d].copy_from_slice(&xs[served * d..(served + n) * d]);
            y[done * d..(done + n) * d].copy_from_slice(&ys[served * d..(served + n) * d]);
            done += n;
            self.served += n as u64;
            if self.served as usize == avail {
                self.advance();
            }
        }
        Ok(())
    }

    fn current(&mut self) -> StoreResult<BlockRows> {
        if let Some(rows) = &self.rows {
            return Ok(rows.clone());
        }
        let rows = self.set.block(self.id, self.epoch * self.set.blocks_per_epoch() + self.block)?;
        self.rows = Some(rows.clone());
        Ok(rows)
    }

    fn advance(&mut self) {
        self.rows = None;
        self.served = 0;
        self.block += 1;
        if self.block == self.set.blocks_per_epoch() {
            self.block = 0;
            self.epoch += 1;
        }
    }

    /// Where the reader stands, to save with a checkpoint (`hook` names both hooks).
    pub fn cursor(&self) -> LiveCursor {
        LiveCursor {
            epoch: self.epoch,
            block: self.block,
            served: self.served,
            seed: self.set.opts.seed,
            hook: format!("{}->{}", self.input_hook(), self.target_hook()),
            split: self.set.opts.split.clone(),
            n_contexts: self.set.split.n_contexts(),
            block_contexts: self.set.block_contexts,
            share: BlockShare::default(),
        }
    }

    /// Continue from a saved cursor; refused when it was recorded for other data or options.
    pub fn seek(&mut self, c: &LiveCursor) -> StoreResult<()> {
        c.check_same_run(&self.cursor(), self.set.blocks_per_epoch())?;
        (self.epoch, self.block, self.served, self.rows) = (c.epoch, c.block, c.served, None);
        self.set.moved(self.id, c.epoch * self.set.blocks_per_epoch() + c.block);
        Ok(())
    }
}

impl Drop for LivePairReader<'_, '_> {
    fn drop(&mut self) {
        self.set.close(self.id);
    }
}
