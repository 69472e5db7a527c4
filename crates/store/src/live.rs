//! Live activations: run the model over tokenized contexts and hand out shuffled rows of one hook
//! point without writing anything to disk (`saekit train --live`).
//!
//! The split is read in a seeded random context order, re-drawn every epoch, and cut into blocks of
//! contexts. A block is one forward pass (in sub-batches) whose rows, minus the attention sinks
//! (position 0, BOS, end-of-text: the rows an [`crate::ActivationReader`] skips by default), are
//! shuffled with a seed derived from (seed, epoch, block) and served in that order. A position is
//! therefore (epoch, block, rows served), and seeking recomputes the block, so a resumed run sees the
//! same rows in the same order as an uninterrupted one (the forward pass is deterministic).
//!
//! Data-parallel replicas (`train --live` under mpirun) each serve a [`BlockShare`] of every epoch:
//! replica r of R forwards blocks r, r + R, ..., so together they forward the one-process epoch's
//! blocks, each block once and by one replica, and a replica's position is its own cursor.

use std::time::Instant;

use anyhow::{Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use saekit_model::{HookPoint, Model};
use serde::{Deserialize, Serialize};

use crate::error::{bad_input, ensure_input, StoreResult};
use crate::harvest::{check_store_hook, check_tokenizer, sink_tokens, tokenizer_fingerprint};
use crate::tokens::{TokenDataset, TokenSplit};

/// What a live source reads: the hook, the split and how rows are batched and shuffled.
#[derive(Clone, Debug)]
pub struct LiveOptions {
    /// The hook point whose rows are served.
    pub hook: HookPoint,
    /// The tokenized dataset's split to read.
    pub split: String,
    /// Contexts per forward pass.
    pub batch: usize,
    /// Tokens per shuffle block (rounded up to whole contexts). Rows are mixed within a block, and
    /// a block's f32 rows are held in memory (65,536 tokens x 576 = 151 MB for SmolLM2).
    pub block_tokens: usize,
    /// Seed of the context order and the in-block shuffle.
    pub seed: u64,
    /// Rows of recent blocks kept for seeks back (the trainer reads its first 65,536 rows to fix the
    /// input scale, then seeks back to the start): a seek within them costs no forward pass.
    pub keep_rows: usize,
    /// Which of every epoch's shuffle blocks this source serves (all of them by default).
    pub share: BlockShare,
}

/// A data-parallel replica's share of the shuffle blocks: blocks `index`, `index + count`, ... of
/// every epoch (the harvest's rule for shards, see [`crate::parts`]). `count` 1 is every block.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BlockShare {
    /// This replica, `0..count`.
    pub index: u64,
    /// Replicas sharing the blocks.
    pub count: u64,
}

impl Default for BlockShare {
    fn default() -> Self {
        BlockShare { index: 0, count: 1 }
    }
}

impl BlockShare {
    /// Every block: the one-process stream (a cursor records no share then).
    pub fn is_whole(&self) -> bool {
        self.count == 1
    }
}

impl Default for LiveOptions {
    fn default() -> Self {
        LiveOptions {
            hook: HookPoint::ResidPost(15),
            split: "train".into(),
            batch: 8,
            block_tokens: 1 << 16,
            seed: 0,
            keep_rows: 1 << 17,
            share: BlockShare::default(),
        }
    }
}

/// Where a live source stands; saved in training checkpoints. The fingerprint fields refuse a resume
/// with other data or options.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LiveCursor {
    /// Passes over the split completed.
    pub epoch: u64,
    /// The shuffle block being served within the epoch.
    pub block: u64,
    /// Rows of the block already handed out.
    pub served: u64,
    /// The seed the order was drawn with.
    pub seed: u64,
    /// The hook point the rows are from.
    pub hook: String,
    /// The split the contexts are from.
    pub split: String,
    /// Contexts in the split.
    pub n_contexts: u64,
    /// Contexts per shuffle block.
    pub block_contexts: u64,
    /// The blocks this source serves (absent: every block).
    #[serde(default, skip_serializing_if = "BlockShare::is_whole")]
    pub share: BlockShare,
}

impl LiveCursor {
    /// A saved position `self` can be restored in a source now at `now`: same seed, hook(s), split and
    /// blocks, and a block within the epoch's `blocks_per_epoch`.
    pub(crate) fn check_same_run(&self, now: &LiveCursor, blocks_per_epoch: u64) -> StoreResult<()> {
        let (c, mine) = (self, now);
        ensure_input!(
            c.seed == mine.seed
                && c.hook == mine.hook
                && c.split == mine.split
                && c.n_contexts == mine.n_contexts
                && c.block_contexts == mine.block_contexts,
            "the live-data position was recorded for other data or options (saved: seed {}, hook {}, split {:?}, {} contexts, {} per block; now: seed {}, hook {}, split {:?}, {} contexts, {} per block)",
            c.seed, c.hook, c.split, c.n_contexts, c.block_contexts,
            mine.seed, mine.hook, mine.split, mine.n_contexts, mine.block_contexts
        );
        ensure_input!(
            c.share == mine.share,
            "the live-data position was recorded by data replica {} of {} (each reads its own blocks), this source reads replica {} of {}'s: resume with the same number of replicas",
            c.share.index, c.share.count, mine.share.index, mine.share.count
        );
        ensure_input!(c.block < blocks_per_epoch, "live cursor block {} is past the epoch", c.block);
        ensure_input!(
            c.block % c.share.count == c.share.index,
            "live cursor block {} is not one of data replica {} of {}'s blocks",
            c.block,
            c.share.index,
            c.share.count
        );
        Ok(())
    }
}

struct Block {
    epoch: u64,
    block: u64,
    rows: Vec<f32>,
}

/// Rows of one hook point computed on demand by the model; cycles over the split forever.
pub struct LiveActivations<'m> {
    model: &'m Model,
    split: TokenSplit,
    opts: LiveOptions,
    d_model: usize,
    block_contexts: u64,
    bos: Option<u32>,
    eot: Vec<u32>,
    epoch: u64,
    block: u64,
    served: u64,
    perm_epoch: Option<u64>,
    perm: Vec<u64>,
    /// The most recent blocks, up to `keep_rows` rows besides the newest.
    cache: Vec<Block>,
    forward_seconds: f64,
    forward_tokens: u64,
    tokenizer_fingerprint: String,
    data_fingerprint: String,
}

impl<'m> LiveActivations<'m> {
    /// A live source over `data`'s split, run through `model`: checks the hook is `d_model` wide, the split
    /// has contexts, and the dataset was tokenized by this model's tokenizer.
    pub fn new(model: &'m Model, data: &TokenDataset, opts: LiveOptions) -> StoreResult<LiveActivations<'m>> {
        let cfg = model.config();
        check_store_hook(model, opts.hook)?;
        ensure_input!(opts.batch > 0, "the forward batch must be at least one context");
        let split = data.split(&opts.split)?;
        ensure_input!(split.n_contexts() > 0, "split {:?} of {} has no contexts", opts.split, data.dir().display());
        let vocab = cfg.vocab_size as u32;
        // A dataset tokenized for another model would run silently on wrong embeddings.
        if let Some(bad) = split.context(0).iter().find(|&&t| t >= vocab) {
            return Err(bad_input!(
                "{}: token id {bad} is outside the model's vocabulary ({vocab}); was it tokenized for another model?",
                data.dir().display()
            )
            .into());
        }
        check_tokenizer(model, &cfg.name, data)?;
        let ctx = split.context_len();
        let block_contexts = opts.block_tokens.div_ceil(ctx).max(1) as u64;
        let share = opts.share;
        check_share(share, split.n_contexts().div_ceil(block_contexts), block_contexts, &opts.split)?;
        let (bos, eot) = sink_tokens(model, data);
        // the rows are the model's on these tokens: the dataset's content, the model, the split
        let data_fingerprint = format!("live:{}:{}:{}", data.fingerprint(), cfg.name, opts.split);
        Ok(LiveActivations {
            model,
            d_model: cfg.d_model,
            split,
            block_contexts,
            bos,
            eot,
            opts,
            epoch: 0,
            block: share.index,
            served: 0,
            perm_epoch: None,
            perm: vec![],
            cache: vec![],
            forward_seconds: 0.0,
            forward_tokens: 0,
            tokenizer_fingerprint: tokenizer_fingerprint(model),
            // the rows are the model's on these tokens: the dataset's content, the model, the split
            data_fingerprint,
        })
    }

    /// Name of the model the rows come from.
    pub fn model_name(&self) -> &str {
        &self.model.config().name
    }
    /// The hook point read.
    pub fn hook(&self) -> HookPoint {
        self.opts.hook
    }
    /// Fingerprint of the tokenizer of the model (checked equal to the dataset's).
    pub fn tokenizer_fingerprint(&self) -> &str {
        &self.tokenizer_fingerprint
    }
    /// Which rows are skipped as sinks, in the words an activation store uses.
    pub fn sink_rule(&self) -> String {
        crate::store::sink_rule_text(self.bos, &self.eot, None)
    }
    /// Content identity of the rows: dataset fingerprint, model and split.
    pub fn data_fingerprint(&self) -> &str {
        &self.data_fingerprint
    }

    /// Width of each row.
    pub fn d_model(&self) -> usize {
        self.d_model
    }

    /// Contexts in the split.
    pub fn n_contexts(&self) -> u64 {
        self.split.n_contexts()
    }

    /// Tokens per context.
    pub fn context_len(&self) -> usize {
        self.split.context_len()
    }

    /// The shuffle blocks this source serves.
    pub fn share(&self) -> BlockShare {
        self.opts.share
    }

    /// Shuffle blocks per pass over the split (over every replica's share).
    pub fn blocks_per_epoch(&self) -> u64 {
        self.split.n_contexts().div_ceil(self.block_contexts)
    }

    /// Seconds spent in the model and tokens run through it so far (including recomputed blocks).
    pub fn forward_stats(&self) -> (f64, u64) {
        (self.forward_seconds, self.forward_tokens)
    }

    /// Where the source stands now, to save with a checkpoint.
    pub fn cursor(&self) -> LiveCursor {
        LiveCursor {
            epoch: self.epoch,
            block: self.block,
            served: self.served,
            seed: self.opts.seed,
            hook: self.opts.hook.to_string(),
            split: self.opts.split.clone(),
            n_contexts: self.split.n_contexts(),
            block_contexts: self.block_contexts,
            share: self.opts.share,
        }
    }

    /// Continue from a saved cursor; refused when it was recorded for other data or options.
    pub fn seek(&mut self, c: &LiveCursor) -> StoreResult<()> {
        c.check_same_run(&self.cursor(), self.blocks_per_epoch())?;
        self.epoch = c.epoch;
        self.block = c.block;
        self.served = c.served;
        let rows = self.current_block()?.len() as u64 / self.d_model as u64;
        ensure_input!(c.served <= rows, "live cursor: {} rows served of a block of {rows}", c.served);
        Ok(())
    }

    /// Fill `out` (whole rows of `d_model`) with the next rows.
    pub fn next_rows(&mut self, out: &mut [f32]) -> StoreResult<()> {
        let d = self.d_model;
        ensure_input!(out.len().is_multiple_of(d), "output length {} is not a multiple of d_model {d}", out.len());
        let want = out.len() / d;
        let mut done = 0;
        while done < want {
            let served = self.served as usize;
            let rows = self.current_block()?;
            let avail = rows.len() / d - served;
            let n = avail.min(want - done);
            out[done * d..(done + n) * d].copy_from_slice(&rows[served * d..(served + n) * d]);
            done += n;
            self.served += n as u64;
            if n == avail {
                self.advance();
            }
        }
        Ok(())
    }

    /// On to this source's next block: the share's next one, or its first of the next epoch.
    fn advance(&mut self) {
        self.served = 0;
        self.block += self.opts.share.count;
        if self.block >= self.blocks_per_epoch() {
            self.block = self.opts.share.index;
            self.epoch += 1;
        }
    }

    /// The shuffled kept rows of (epoch, block), computed when not cached.
    fn current_block(&mut self) -> Result<&[f32]> {
        let (epoch, block) = (self.epoch, self.block);
        if let Some(i) = self.cache.iter().position(|b| b.epoch == epoch && b.block == block) {
            return Ok(&self.cache[i].rows);
        }
        let rows = self.compute_block(epoch, block)?;
        ensure_input!(
            !rows.is_empty(),
            "block {block} of epoch {epoch} has no rows left after skipping position 0 and end-of-text tokens"
        );
        self.cache.push(Block { epoch, block, rows });
        let d = self.d_model;
        while self.cache.len() > 1
            && self.cache[..self.cache.len() - 1].iter().map(|b| b.rows.len() / d).sum::<usize>() > self.opts.keep_rows
        {
            self.cache.remove(0);
        }
        Ok(&self.cache[self.cache.len() - 1].rows)
    }

    fn epoch_perm(&mut self, epoch: u64) -> &[u64] {
        if self.perm_epoch != Some(epoch) {
            self.perm = epoch_order(self.split.n_contexts(), self.opts.seed, epoch);
            self.perm_epoch = Some(epoch);
        }
        &self.perm
    }

    fn compute_block(&mut self, epoch: u64, block: u64) -> Result<Vec<f32>> {
        let lo = (block * self.block_contexts) as usize;
        let hi = ((block + 1) * self.block_contexts).min(self.split.n_contexts()) as usize;
        let ids: Vec<u64> = self.epoch_perm(epoch)[lo..hi].to_vec();
        let t0 = Instant::now();
        let sinks = Sinks { bos: self.bos, eot: &self.eot };
        let at = BlockAt { seed: self.opts.seed, epoch, block };
        let mut rows = forward_block(self.model, &self.split, self.opts.batch, sinks, &[self.opts.hook], &ids, at)?;
        self.forward_seconds += t0.elapsed().as_secs_f64();
        self.forward_tokens += (ids.len() * self.split.context_len()) as u64;
        Ok(rows.remove(0))
    }
}

/// A share must name one of `count` replicas, and each replica needs a block of every epoch.
fn check_share(share: BlockShare, blocks: u64, block_contexts: u64, split: &str) -> StoreResult<()> {
    let BlockShare { index, count } = share;
    ensure_input!(count >= 1 && index < count, "data replica {index} of {count} does not exist");
    ensure_input!(
        blocks >= count,
        "split {split:?} has {blocks} shuffle blocks of {block_contexts} contexts, fewer than the {count} data replicas that each forward their own: lower --live-block-tokens or use fewer replicas"
    );
    Ok(())
}

/// The order contexts are read in during `epoch`: a permutation drawn from (seed, epoch).
pub(crate) fn epoch_order(n_contexts: u64, seed: u64, epoch: u64) -> Vec<u64> {
    let mut perm: Vec<u64> = (0..n_contexts).collect();
    perm.shuffle(&mut ChaCha8Rng::seed_from_u64(mix(seed, epoch, u64::MAX)));
    perm
}

/// The tokens whose rows are attention sinks (besides position 0).
#[derive(Clone, Copy)]
pub(crate) struct Sinks<'a> {
    pub bos: Option<u32>,
    pub eot: &'a [u32],
}

/// Which shuffle block: its rows are mixed by a seed drawn from all three.
#[derive(Clone, Copy)]
pub(crate) struct BlockAt {
    pub seed: u64,
    pub epoch: u64,
    pub block: u64,
}

/// One shuffle block: the contexts `ids` run through `model` `batch` at a time, each hook's rows less
/// the sinks, all hooks shuffled by the same permutation (row `i` of every hook is one token).
pub(crate) fn forward_block(
    model: &Model,
    split: &TokenSplit,
    batch: usize,
    sinks: Sinks,
    hooks: &[HookPoint],
    ids: &[u64],
    at: BlockAt,
) -> Result<Vec<Vec<f32>>> {
    let (d, ctx) = (model.config().d_model, split.context_len());
    let BlockAt { seed, epoch, block } = at;
    let mut kept: Vec<Vec<f32>> = hooks.iter().map(|_| Vec::with_capacity(ids.len() * ctx * d)).collect();
    let mut toks: Vec<u32> = Vec::with_capacity(batch * ctx);
    for chunk in ids.chunks(batch) {
        toks.clear();
        for &c in chunk {
            toks.extend_from_slice(split.context(c));
        }
        let cache = model
            .run_with_cache(&toks, chunk.len(), hooks)
            .with_context(|| format!("forward pass for live activations (epoch {epoch}, block {block})"))?;
        for (h, kept) in hooks.iter().zip(kept.iter_mut()) {
            let acts = cache.get(h).with_context(|| format!("the model did not return {h}"))?;
            for (i, &t) in toks.iter().enumerate() {
                let sink = i % ctx == 0 || sinks.bos == Some(t) || sinks.eot.contains(&t);
                if !sink {
                    kept.extend_from_slice(&acts[i * d..(i + 1) * d]);
                }
            }
        }
    }
    let n = kept[0].len() / d;
    let mut order: Vec<u32> = (0..n as u32).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(mix(seed, epoch, block)));
    let shuffled = kept
        .iter()
        .map(|kept| {
            let mut rows = vec![0f32; n * d];
            for (dst, &src) in rows.chunks_exact_mut(d).zip(&order) {
                dst.copy_from_slice(&kept[src as usize * d..(src as usize + 1) * d]);
            }
            rows
        })
        .collect();
    tracing::debug!("live block {block} of epoch {epoch}: {} contexts, {n} rows, {} hooks", ids.len(), hooks.len());
    Ok(shuffled)
}

/// A seed for (run seed, epoch, block) that does not collide for nearby values.
fn mix(seed: u64, epoch: u64, block: u64) -> u64 {
    let mut h = seed ^ 0x9E37_79B9_7F4A_7C15;
    for v in [epoch, block] {
        h = (h ^ v).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        h ^= h >> 31;
    }
    h
}
