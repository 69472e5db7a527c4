//! [`ActivationSource`]s over saekit-store: an activation store (`saekit harvest` output) and live model rows.

use crate::source::{ActivationSource, Paired, Provenance};
use anyhow::{Context, Result};
use saekit_store::{ActivationReader, ActivationStore, ReaderCursor, ReaderOptions};
use std::path::Path;

/// Reads a store through its seeded, shuffled [`ActivationReader`] (which already skips rows
/// marked position 0 / BOS / end-of-text). The reader serves whole batches; this adapter serves
/// any number of rows, so its cursor is the reader cursor before the staged batch plus the rows
/// of that batch already handed out.
pub struct StoreSource {
    store: ActivationStore,
    opts: ReaderOptions,
    reader: ActivationReader,
    buf: Vec<f32>,
    staged: Option<ReaderCursor>,
    pos: usize,
    desc: String,
}

impl StoreSource {
    /// Read hook `hook` of the activation store in `dir` (marked sink rows skipped), shuffled by
    /// `seed` or in store order, `batch_tokens` rows at a time.
    pub fn open(dir: &Path, hook: &str, seed: u64, shuffle: bool, batch_tokens: usize) -> Result<StoreSource> {
        let store =
            ActivationStore::open(dir).with_context(|| format!("opening activation store {}", dir.display()))?;
        let opts = ReaderOptions { hook: hook.to_string(), batch_tokens, seed, shuffle, ..Default::default() };
        let reader = ActivationReader::new(&store, opts.clone(), None)?;
        let desc = format!(
            "store {} hook {} ({} rows per epoch, marked rows skipped, {})",
            dir.display(),
            reader.hook(),
            reader.rows_per_epoch(),
            if shuffle { "shuffled" } else { "store order" }
        );
        let buf = vec![0.0f32; batch_tokens * reader.d_model()];
        Ok(StoreSource { store, opts, reader, buf, staged: None, pos: 0, desc })
    }

    /// Rows in one epoch (after skipping marked rows).
    pub fn rows_per_epoch(&self) -> u64 {
        self.reader.rows_per_epoch()
    }

    /// The hook being read.
    pub fn hook(&self) -> &str {
        self.reader.hook()
    }

    /// The (shard, row) of each row of the reader's last batch: which tokens they are.
    fn last_rows(&self) -> &[(u32, u32)] {
        self.reader.last_batch_rows()
    }
}

/// (input, target) row pairs from two hooks of one activation store (`saekit harvest --hooks a,b`
/// writes both from the same forward pass): two readers with the same seed and options, so row `i`
/// of both is the same token. Every batch checks that they read the same (shard, row)s.
pub struct StorePairSource {
    rows: Paired<StoreSource>,
}

impl StorePairSource {
    /// Read hook `input_hook` as inputs and `target_hook` as targets of the store in `dir`, shuffled
    /// by `seed` or in store order, `batch_tokens` rows at a time.
    pub fn open(
        dir: &Path,
        input_hook: &str,
        target_hook: &str,
        seed: u64,
        shuffle: bool,
        batch_tokens: usize,
    ) -> Result<StorePairSource> {
        let input = StoreSource::open(dir, input_hook, seed, shuffle, batch_tokens)?;
        let target = StoreSource::open(dir, target_hook, seed, shuffle, batch_tokens)?;
        if input.hook() == target.hook() {
            anyhow::bail!(
                "{}: the input and target hooks are both {}; a transcoder maps one hook to another",
                dir.display(),
                input.hook()
            );
        }
        if input.rows_per_epoch() != target.rows_per_epoch() {
            anyhow::bail!(
                "{}: hook {} has {} rows but hook {} has {}; the pairs would not be the same tokens",
                dir.display(),
                input.hook(),
                input.rows_per_epoch(),
                target.hook(),
                target.rows_per_epoch()
            );
        }
        Ok(StorePairSource { rows: Paired::new(input, target, "store_pair") })
    }
}

impl ActivationSource for StorePairSource {
    fn d_in(&self) -> usize {
        self.rows.input.d_in()
    }

    fn d_out(&self) -> Option<usize> {
        Some(self.rows.d_out())
    }

    fn next_batch(&mut self, _out: &mut [f32]) -> Result<usize> {
        anyhow::bail!("{}: a pair source is read in pairs (next_pairs)", self.describe())
    }

    fn next_pairs(&mut self, x: &mut [f32], y: &mut [f32]) -> Result<usize> {
        let n = self.rows.read(x, y)?;
        let (input, target) = (&self.rows.input, &self.rows.target);
        if input.last_rows() != target.last_rows() {
            anyhow::bail!(
                "{}: the readers of hooks {} and {} went out of step (different tokens in one batch)",
                input.store.dir().display(),
                input.hook(),
                target.hook()
            );
        }
        Ok(n)
    }

    fn cursor(&self) -> serde_json::Value {
        self.rows.cursor()
    }

    fn seek(&mut self, c: &serde_json::Value) -> Result<()> {
        self.rows.seek(c)
    }

    fn describe(&self) -> String {
        format!("{} -> hook {}", self.rows.input.describe(), self.rows.target.hook())
    }

    fn provenance(&self) -> Result<Provenance> {
        Ok(Provenance { hook_name_out: self.rows.target.hook().to_string(), ..self.rows.input.provenance()? })
    }
}

impl ActivationSource for StoreSource {
    fn d_in(&self) -> usize {
        self.reader.d_model()
    }

    fn next_batch(&mut self, out: &mut [f32]) -> Result<usize> {
        let d = self.reader.d_model();
        let bt = self.opts.batch_tokens;
        let want = out.len() / d;
        let mut done = 0;
        while done < want {
            if self.staged.is_none() || self.pos == bt {
                self.staged = Some(self.reader.cursor());
                self.reader.next_batch(&mut self.buf)?;
                self.pos = 0;
            }
            let n = (bt - self.pos).min(want - done);
            out[done * d..(done + n) * d].copy_from_slice(&self.buf[self.pos * d..(self.pos + n) * d]);
            self.pos += n;
            done += n;
        }
        Ok(done)
    }

    fn cursor(&self) -> serde_json::Value {
        let (c, used) = match &self.staged {
            Some(c) => (c.clone(), self.pos),
            None => (self.reader.cursor(), 0),
        };
        serde_json::json!({"kind": "store", "reader": c, "consumed": used})
    }

    fn seek(&mut self, c: &serde_json::Value) -> Result<()> {
        let rc: ReaderCursor = serde_json::from_value(c.get("reader").cloned().unwrap_or_default())
            .with_context(|| format!("bad store cursor {c}"))?;
        let used = c.get("consumed").and_then(|v| v.as_u64()).unwrap_or(0) as usize;
        self.reader = ActivationReader::new(&self.store, self.opts.clone(), Some(rc))?;
        self.staged = None;
        self.pos = 0;
        if used > 0 {
            self.staged = Some(self.reader.cursor());
            self.reader.next_batch(&mut self.buf)?;
            self.pos = used;
        }
        Ok(())
    }

    fn describe(&self) -> String {
        self.desc.clone()
    }

    fn provenance(&self) -> Result<Provenance> {
        let c = &self.store.manifest().config;
        let mpath = self.store.dir().join(saekit_store::store::MANIFEST);
        Ok(Provenance {
            model_name: c.model.name.clone(),
            hook_name: self.reader.hook().to_string(),
            hook_name_out: String::new(),
            context_size: Some(c.context),
            tokenizer_fingerprint: c.tokenizer_fingerprint.clone(),
            // the rule with what the harvest measured (median norms, share of rows marked)
            sink_rule: self.store.manifest().sink_rule(),
            // the manifest lists every shard's size and CRC32: its bytes identify the store's content
            data_fingerprint: format!("store:{}", saekit_files::fingerprint_files(&[mpath])?),
        })
    }
}

/// [`ActivationSource`] over the model itself (`saekit train --live`): rows computed block by block
/// by [`saekit_store::live::LiveActivations`], nothing written to disk. Its cursor is the live
/// position, so `--resume` recomputes the current block and continues bit-identically. Built with a
/// [`saekit_store::live::BlockShare`] of several replicas it serves that replica's own blocks.
pub struct LiveSource<'m> {
    live: saekit_store::live::LiveActivations<'m>,
    desc: String,
}

impl<'m> LiveSource<'m> {
    /// Rows from the model as it runs, described by `desc` in logs.
    pub fn new(live: saekit_store::live::LiveActivations<'m>, desc: String) -> LiveSource<'m> {
        LiveSource { live, desc }
    }

    /// Seconds in the model and tokens forwarded so far.
    pub fn forward_stats(&self) -> (f64, u64) {
        self.live.forward_stats()
    }
}

impl ActivationSource for LiveSource<'_> {
    fn d_in(&self) -> usize {
        self.live.d_model()
    }

    fn next_batch(&mut self, out: &mut [f32]) -> Result<usize> {
        self.live.next_rows(out)?;
        Ok(out.len() / self.live.d_model())
    }

    fn cursor(&self) -> serde_json::Value {
        serde_json::json!({"kind": "live", "live": self.live.cursor()})
    }

    fn seek(&mut self, c: &serde_json::Value) -> Result<()> {
        let lc: saekit_store::live::LiveCursor = serde_json::from_value(c.get("live").cloned().unwrap_or_default())
            .with_context(|| format!("not a live-data position: {c} (was this run trained with --live?)"))?;
        Ok(self.live.seek(&lc)?)
    }

    fn describe(&self) -> String {
        self.desc.clone()
    }

    fn provenance(&self) -> Result<Provenance> {
        Ok(Provenance {
            model_name: self.live.model_name().to_string(),
            hook_name: self.live.hook().to_string(),
            hook_name_out: String::new(),
            context_size: Some(self.live.context_len()),
            tokenizer_fingerprint: self.live.tokenizer_fingerprint().to_string(),
            sink_rule: self.live.sink_rule(),
            data_fingerprint: self.live.data_fingerprint().to_string(),
        })
    }

    fn replica_share(&self) -> Option<(usize, usize)> {
        let s = self.live.share();
        (!s.is_whole()).then_some((s.index as usize, s.count as usize))
    }
}

/// One transcoder's (input, target) pairs from a forward pass shared with other trainers
/// (`saekit train-transcoders`): a [`saekit_store::live_set::LivePairReader`] over a
/// [`saekit_store::live_set::LiveHookSet`]. Its cursor is the reader's position, so `--resume`
/// continues bit-identically; the rows are those two single-hook [`LiveSource`]s with the same options
/// would serve.
pub struct LiveLayerSource<'s, 'm> {
    reader: saekit_store::live_set::LivePairReader<'s, 'm>,
    desc: String,
}

impl<'s, 'm> LiveLayerSource<'s, 'm> {
    /// Pairs from `reader`, described by `desc` in logs.
    pub fn new(reader: saekit_store::live_set::LivePairReader<'s, 'm>, desc: String) -> LiveLayerSource<'s, 'm> {
        LiveLayerSource { reader, desc }
    }
}

impl ActivationSource for LiveLayerSource<'_, '_> {
    fn d_in(&self) -> usize {
        self.reader.set().d_model()
    }

    fn d_out(&self) -> Option<usize> {
        Some(self.reader.set().d_model())
    }

    fn next_batch(&mut self, _out: &mut [f32]) -> Result<usize> {
        anyhow::bail!("{}: a pair source is read in pairs (next_pairs)", self.desc)
    }

    fn next_pairs(&mut self, x: &mut [f32], y: &mut [f32]) -> Result<usize> {
        self.reader.next_pairs(x, y)?;
        Ok(x.len() / self.d_in())
    }

    fn cursor(&self) -> serde_json::Value {
        serde_json::json!({"kind": "live_layer", "live": self.reader.cursor()})
    }

    fn seek(&mut self, c: &serde_json::Value) -> Result<()> {
        let lc: saekit_store::live::LiveCursor = serde_json::from_value(c.get("live").cloned().unwrap_or_default())
            .with_context(|| format!("not a live-data position: {c} (was this run trained by train-transcoders?)"))?;
        Ok(self.reader.seek(&lc)?)
    }

    fn describe(&self) -> String {
        self.desc.clone()
    }

    fn provenance(&self) -> Result<Provenance> {
        let set = self.reader.set();
        Ok(Provenance {
            model_name: set.model_name().to_string(),
            hook_name: self.reader.input_hook().to_string(),
            hook_name_out: self.reader.target_hook().to_string(),
            context_size: Some(set.context_len()),
            tokenizer_fingerprint: set.tokenizer_fingerprint().to_string(),
            sink_rule: set.sink_rule(),
            data_fingerprint: set.data_fingerprint().to_string(),
        })
    }
}
