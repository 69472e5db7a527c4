//! Streaming per-feature statistics: the running state of `saekit analyze`.
//!
//! Memory is bounded by the number of features, never by the number of tokens: per feature a
//! counter, a sum, a max, a fixed log-spaced histogram, the top-K contexts and `n_quantiles`
//! reservoirs of `per_quantile` contexts, each context stored as (source context, window start,
//! sparse window activations). Token ids are looked up in the dataset only when the database is
//! written.
//!
//! Every context offers each feature one candidate: its peak token in that context (so the 20 top
//! contexts are 20 different contexts, as on Neuronpedia). Quantile intervals are equal-width
//! slices of `[0, running max]` (sae_vis' "quantile groups", Anthropic's "subsample intervals");
//! when the running max grows the stored samples are re-binned, so the intervals are exact and the
//! sampling within an interval is reservoir sampling up to that re-binning (documented
//! approximation). All randomness is a hash of (seed, feature, count): results do not depend on
//! the number of threads, and resuming from a checkpoint gives the same database.

use crate::error::{bail, bail_corrupt, bail_input, AnalysisResult};
use anyhow::{Context as _, Result};
use rayon::prelude::*;

/// Log-spaced activation histogram: bins per decade.
pub const HIST_PER_DECADE: usize = 8;
/// The histogram's first edge, 10^-3 (activation units): smaller activations count in bin 0.
pub const HIST_LOG10_MIN: i32 = -3;
/// The histogram's last edge, 10^4: larger activations count in the last bin.
pub const HIST_LOG10_MAX: i32 = 4;
/// Bins of the activation histogram (56: 8 per decade over 10^-3 .. 10^4).
pub const HIST_BINS: usize = HIST_PER_DECADE * (HIST_LOG10_MAX - HIST_LOG10_MIN) as usize;

/// Bin edges; activations below the first edge count in bin 0, above the last in the last bin.
pub fn hist_edges() -> Vec<f32> {
    (0..=HIST_BINS).map(|i| 10f64.powf(HIST_LOG10_MIN as f64 + i as f64 / HIST_PER_DECADE as f64) as f32).collect()
}

#[inline]
fn hist_bin(a: f32) -> usize {
    let l = (a.max(1e-30).log10() - HIST_LOG10_MIN as f32) * HIST_PER_DECADE as f32;
    (l.max(0.0) as usize).min(HIST_BINS - 1)
}

/// What each feature keeps while streaming (recorded in the checkpoint: a resume must use the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StatsOptions {
    /// Top-activating contexts kept per feature (one candidate per context: its peak token).
    pub top_k: usize,
    /// Equal-width activation intervals of `[0, max]` sampled per feature.
    pub n_quantiles: usize,
    /// Contexts kept per interval (reservoir sampled).
    pub per_quantile: usize,
    /// Tokens kept before the peak in a stored window.
    pub before: usize,
    /// Tokens kept after the peak in a stored window.
    pub after: usize,
    /// Seed of the reservoir sampling (a hash of seed, feature and count: thread-count independent).
    pub seed: u64,
}

impl Default for StatsOptions {
    fn default() -> Self {
        StatsOptions { top_k: 20, n_quantiles: 10, per_quantile: 5, before: 16, after: 8, seed: 0 }
    }
}

/// A stored context: where it is and the feature's activations in its window.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The feature's activation at the peak.
    pub act: f32,
    /// Index of the source context in the analysed split.
    pub ctx: u64,
    /// Peak position in the source context.
    pub pos: u32,
    /// First position of the window in the source context.
    pub start: u32,
    /// (offset from `start`, activation), non-zero entries only.
    pub window: Vec<(u16, f32)>,
}

/// One activation interval of a feature: how many contexts fell in it, and a reservoir of them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Bin {
    /// Contexts whose peak fell in the interval (after re-binning, an estimate; see the module doc).
    pub seen: u64,
    /// At most `per_quantile` of them, sampled uniformly.
    pub samples: Vec<Sample>,
}

/// The running statistics of one feature.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FeatureState {
    /// Tokens it fired on (activation > 0).
    pub n: u64,
    /// Sum of its activations over those tokens (the mean is `sum / n`).
    pub sum: f64,
    /// Its highest activation so far.
    pub max: f32,
    /// Max used to define the intervals (the running max when the last sample was binned).
    pub bin_max: f32,
    /// The `top_k` highest-activating contexts, highest first.
    pub top: Vec<Sample>,
    /// `n_quantiles` intervals of `[0, bin_max]`, lowest first (empty until it first fires).
    pub bins: Vec<Bin>,
}

/// One batch of sparse codes, row-major over `n_ctx` contexts of `seq` tokens.
pub struct BatchCodes<'a> {
    /// CSR row pointers: row `r`'s entries are `idx[indptr[r]..indptr[r + 1]]` (`rows + 1` entries).
    pub indptr: &'a [usize],
    /// Feature ids of the non-zero entries.
    pub idx: &'a [u32],
    /// Their activations.
    pub val: &'a [f32],
    /// Tokens per context.
    pub seq: usize,
    /// Global index of the batch's first context.
    pub first_ctx: u64,
    /// Rows to skip (attention sinks); empty = keep all.
    pub skip: &'a [bool],
}

/// Features handled by one worker: contiguous ids `lo..lo + feats.len()`.
#[derive(Debug, Clone, PartialEq)]
pub struct Shard {
    /// The first feature id of the shard.
    pub lo: u32,
    /// The state of features `lo..lo + feats.len()`.
    pub feats: Vec<FeatureState>,
    /// `[feats.len(), HIST_BINS]`
    pub hist: Vec<u32>,
}

/// The running state of `saekit analyze` over every feature (what a checkpoint holds).
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureStats {
    /// Features in the dictionary.
    pub d_sae: usize,
    /// What each feature keeps.
    pub opts: StatsOptions,
    /// Tokens counted (skipped rows excluded).
    pub n_tokens: u64,
    /// Contexts consumed; the resume point.
    pub n_contexts: u64,
    /// The features, in contiguous shards of 256 or more (updated in parallel).
    pub shards: Vec<Shard>,
}

#[inline]
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl FeatureStats {
    /// An empty state for `d_sae` features.
    pub fn new(d_sae: usize, opts: StatsOptions) -> FeatureStats {
        let shard_size = 256usize.max(d_sae.div_ceil(4096));
        let shards = (0..d_sae)
            .step_by(shard_size)
            .map(|lo| {
                let n = shard_size.min(d_sae - lo);
                Shard { lo: lo as u32, feats: vec![FeatureState::default(); n], hist: vec![0; n * HIST_BINS] }
            })
            .collect();
        FeatureStats { d_sae, opts, n_tokens: 0, n_contexts: 0, shards }
    }

    /// Feature `j`'s state and its histogram counts (`HIST_BINS` of them, edges from [`hist_edges`]).
    pub fn feature(&self, j: usize) -> (&FeatureState, &[u32]) {
        let s = &self.shards[self.shard_of(j)];
        let k = j - s.lo as usize;
        (&s.feats[k], &s.hist[k * HIST_BINS..(k + 1) * HIST_BINS])
    }

    fn shard_of(&self, j: usize) -> usize {
        let size = self.shards.first().map_or(1, |s| s.feats.len().max(1));
        j / size
    }

    /// Fold one batch in. Rows `b*seq..(b+1)*seq` are context `first_ctx + b`.
    pub fn update(&mut self, batch: &BatchCodes<'_>) -> AnalysisResult<()> {
        let rows = batch.indptr.len().saturating_sub(1);
        if batch.seq == 0 || !rows.is_multiple_of(batch.seq) {
            bail!("analysis batch of {rows} rows is not a whole number of {}-token contexts", batch.seq);
        }
        let keep = |r: usize| batch.skip.get(r).is_none_or(|s| !s);
        // feature-major view of the batch (counting sort): per feature, its (row, act) in row order
        let mut ptr = vec![0usize; self.d_sae + 1];
        for r in 0..rows {
            if !keep(r) {
                continue;
            }
            for (&j, &v) in batch.idx[batch.indptr[r]..batch.indptr[r + 1]].iter().zip(&batch.val[batch.indptr[r]..]) {
                if v > 0.0 {
                    if j as usize >= self.d_sae {
                        bail!("feature index {j} out of range (d_sae {})", self.d_sae);
                    }
                    ptr[j as usize + 1] += 1;
                }
            }
        }
        for j in 0..self.d_sae {
            ptr[j + 1] += ptr[j];
        }
        let nnz = ptr[self.d_sae];
        let mut fill = ptr.clone();
        let mut ev_row = vec![0u32; nnz];
        let mut ev_val = vec![0f32; nnz];
        for r in 0..rows {
            if !keep(r) {
                continue;
            }
            let (a, b) = (batch.indptr[r], batch.indptr[r + 1]);
            for (&j, &v) in batch.idx[a..b].iter().zip(&batch.val[a..b]) {
                if v > 0.0 {
                    let p = &mut fill[j as usize];
                    ev_row[*p] = r as u32;
                    ev_val[*p] = v;
                    *p += 1;
                }
            }
        }
        let opts = self.opts;
        let (seq, first_ctx) = (batch.seq, batch.first_ctx);
        self.shards.par_iter_mut().for_each(|shard| {
            for (k, st) in shard.feats.iter_mut().enumerate() {
                let j = shard.lo as usize + k;
                let (a, b) = (ptr[j], ptr[j + 1]);
                if a == b {
                    continue;
                }
                let hist = &mut shard.hist[k * HIST_BINS..(k + 1) * HIST_BINS];
                let (rws, vals) = (&ev_row[a..b], &ev_val[a..b]);
                let mut g0 = 0;
                while g0 < rws.len() {
                    let c = rws[g0] as usize / seq;
                    let mut g1 = g0;
                    let mut peak = g0;
                    while g1 < rws.len() && rws[g1] as usize / seq == c {
                        let v = vals[g1];
                        st.n += 1;
                        st.sum += v as f64;
                        hist[hist_bin(v)] = hist[hist_bin(v)].saturating_add(1);
                        if v > vals[peak] {
                            peak = g1;
                        }
                        g1 += 1;
                    }
                    let pos = rws[peak] as usize - c * seq;
                    let grp = (&rws[g0..g1], &vals[g0..g1], c * seq);
                    offer(st, j as u64, &opts, first_ctx + c as u64, pos, vals[peak], grp, seq);
                    g0 = g1;
                }
            }
        });
        self.n_tokens += (0..rows).filter(|&r| keep(r)).count() as u64;
        self.n_contexts += (rows / batch.seq) as u64;
        Ok(())
    }
}

impl FeatureStats {
    /// Fold in the statistics of the contexts that follow this one's (another rank's share of an
    /// analysis). Counts, maxima and histograms merge exactly and sums up to rounding; the top contexts
    /// merge exactly, as one pass over both shares keeps them (larger first, ties to the earlier
    /// context); the quantile reservoirs are re-binned to the larger range and merged by weighted
    /// sampling without replacement (Efraimidis and Spirakis 2006), each sample weighted by how many
    /// contexts it stands for, so every context of an interval stays equally likely.
    pub fn merge(&mut self, later: FeatureStats) -> AnalysisResult<()> {
        if later.d_sae != self.d_sae || later.opts != self.opts {
            bail!("cannot merge the statistics of {} features into those of {}", later.d_sae, self.d_sae);
        }
        let opts = self.opts;
        for (mine, theirs) in self.shards.iter_mut().zip(later.shards) {
            for (a, b) in mine.hist.iter_mut().zip(&theirs.hist) {
                *a = a.saturating_add(*b);
            }
            for (k, (st, other)) in mine.feats.iter_mut().zip(theirs.feats).enumerate() {
                merge_feature(st, other, mine.lo as u64 + k as u64, &opts);
            }
        }
        self.n_tokens += later.n_tokens;
        self.n_contexts += later.n_contexts;
        Ok(())
    }
}

fn merge_feature(st: &mut FeatureState, mut later: FeatureState, j: u64, o: &StatsOptions) {
    st.n += later.n;
    st.sum += later.sum;
    st.max = st.max.max(later.max);
    st.top.append(&mut later.top);
    st.top.sort_by(|a, b| b.act.total_cmp(&a.act)); // stable: the earlier context first among equals
    st.top.truncate(o.top_k);
    if later.bins.is_empty() {
        return;
    }
    if st.bins.is_empty() {
        (st.bins, st.bin_max) = (later.bins, later.bin_max);
        return;
    }
    let range = st.bin_max.max(later.bin_max);
    for s in [&mut *st, &mut later] {
        if s.bin_max < range {
            rebin(s, j, o, range);
        }
    }
    for (b, (bin, other)) in st.bins.iter_mut().zip(later.bins).enumerate() {
        *bin = merge_reservoirs(std::mem::take(bin), other, j ^ ((b as u64) << 40), o);
    }
}

/// `per_quantile` of two reservoirs' samples, each drawn with weight (contexts its reservoir saw) /
/// (samples it kept): the largest keys u^(1/w), u a hash of the seed, feature, interval and context.
fn merge_reservoirs(a: Bin, b: Bin, salt: u64, o: &StatsOptions) -> Bin {
    let seen = a.seen + b.seen;
    let weight = |bin: &Bin| bin.seen.max(1) as f64 / bin.samples.len().max(1) as f64;
    let (wa, wb) = (weight(&a), weight(&b));
    let mut keyed: Vec<(f64, Sample)> = a
        .samples
        .into_iter()
        .map(|s| (wa, s))
        .chain(b.samples.into_iter().map(|s| (wb, s)))
        .map(|(w, s)| {
            let u = (mix(o.seed ^ salt ^ s.ctx.wrapping_mul(0xD6E8_FEB8_6659_FD93)) >> 11) as f64 / (1u64 << 53) as f64;
            (u.max(f64::MIN_POSITIVE).powf(1.0 / w), s)
        })
        .collect();
    keyed.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.ctx.cmp(&y.1.ctx)));
    keyed.truncate(o.per_quantile);
    let mut samples: Vec<Sample> = keyed.into_iter().map(|(_, s)| s).collect();
    samples.sort_by(|a, b| b.act.total_cmp(&a.act).then(a.ctx.cmp(&b.ctx)));
    Bin { seen, samples }
}

#[allow(clippy::too_many_arguments)]
fn offer(
    st: &mut FeatureState,
    j: u64,
    o: &StatsOptions,
    ctx: u64,
    pos: usize,
    act: f32,
    grp: (&[u32], &[f32], usize),
    seq: usize,
) {
    let window = || {
        let start = pos.saturating_sub(o.before);
        let end = (pos + o.after + 1).min(seq);
        let w: Vec<(u16, f32)> = grp
            .0
            .iter()
            .zip(grp.1)
            .filter_map(|(&r, &v)| {
                let p = r as usize - grp.2;
                (p >= start && p < end).then(|| ((p - start) as u16, v))
            })
            .collect();
        Sample { act, ctx, pos: pos as u32, start: start as u32, window: w }
    };
    if act > st.max {
        st.max = act;
    }
    if st.top.len() < o.top_k || st.top.last().is_some_and(|l| act > l.act) {
        let at = st.top.partition_point(|s| s.act >= act);
        st.top.insert(at, window());
        st.top.truncate(o.top_k);
    }
    if o.n_quantiles == 0 || o.per_quantile == 0 {
        return;
    }
    if st.bins.is_empty() {
        st.bins = vec![Bin::default(); o.n_quantiles];
    }
    if act > st.bin_max {
        rebin(st, j, o, act);
    }
    let b = (((act / st.bin_max) * o.n_quantiles as f32) as usize).min(o.n_quantiles - 1);
    let bin = &mut st.bins[b];
    bin.seen += 1;
    if bin.samples.len() < o.per_quantile {
        bin.samples.push(window());
    } else {
        let r = mix(o.seed ^ j.wrapping_mul(0xA24B_AED4_963E_E407) ^ bin.seen.wrapping_mul(0x9FB2_1C65_1E98_DF25))
            % bin.seen;
        if (r as usize) < o.per_quantile {
            bin.samples[r as usize] = window();
        }
    }
}

/// The intervals widen to `[0, new_max]`: move each stored sample to its new interval, move each
/// old interval's count to the interval holding its midpoint, and thin over-full reservoirs.
fn rebin(st: &mut FeatureState, j: u64, o: &StatsOptions, new_max: f32) {
    let nq = o.n_quantiles;
    let old_max = st.bin_max;
    let mut bins = vec![Bin::default(); nq];
    let slot = |a: f32| (((a / new_max) * nq as f32) as usize).min(nq - 1);
    for (b, old) in std::mem::take(&mut st.bins).into_iter().enumerate() {
        let mid = old_max * (b as f32 + 0.5) / nq as f32;
        bins[slot(mid)].seen += old.seen;
        for s in old.samples {
            bins[slot(s.act)].samples.push(s);
        }
    }
    for (b, bin) in bins.iter_mut().enumerate() {
        bin.seen = bin.seen.max(bin.samples.len() as u64);
        while bin.samples.len() > o.per_quantile {
            let r = mix(o.seed ^ j ^ ((b as u64) << 40) ^ bin.samples.len() as u64) as usize % bin.samples.len();
            bin.samples.swap_remove(r);
        }
        // keep a deterministic order independent of the history
        bin.samples.sort_by(|a, b| b.act.total_cmp(&a.act).then(a.ctx.cmp(&b.ctx)));
    }
    st.bins = bins;
    st.bin_max = new_max;
}

// ---------------------------------------------------------------------------------------------
// Checkpoint encoding (little-endian, versioned; written atomically by the caller).

/// Version 2 ends with a CRC32 of everything before it; version 1 checkpoints (no checksum) are refused.
const CKPT_MAGIC: &[u8; 8] = b"SKANCKP2";
const CKPT_MAGIC_V1: &[u8; 8] = b"SKANCKP1";
/// Fewest bytes one feature takes in a checkpoint (counters and histogram, no samples): a declared
/// d_sae is checked against the file size with it before anything is allocated.
const CKPT_MIN_FEATURE_BYTES: usize = 8 + 8 + 4 + 4 + 4 + 4 + 4 * HIST_BINS;

struct W(Vec<u8>);
impl W {
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn f32(&mut self, v: f32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn f64(&mut self, v: f64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u64(b.len() as u64);
        self.0.extend_from_slice(b);
    }
    fn sample(&mut self, s: &Sample) {
        self.f32(s.act);
        self.u64(s.ctx);
        self.u32(s.pos);
        self.u32(s.start);
        self.u32(s.window.len() as u32);
        for &(o, a) in &s.window {
            self.u32(o as u32);
            self.f32(a);
        }
    }
}

struct R<'a>(&'a [u8]);
impl R<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        if self.0.len() < n {
            bail_corrupt!("checkpoint is truncated");
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into()?))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into()?))
    }
    fn f32(&mut self) -> Result<f32> {
        Ok(f32::from_le_bytes(self.take(4)?.try_into()?))
    }
    fn f64(&mut self) -> Result<f64> {
        Ok(f64::from_le_bytes(self.take(8)?.try_into()?))
    }
    fn bytes(&mut self) -> Result<Vec<u8>> {
        let n = self.u64()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    fn feature(&mut self, opts: &StatsOptions, contexts: &std::ops::Range<u64>) -> Result<FeatureState> {
        const MIN_SAMPLE: usize = 4 + 8 + 4 + 4 + 4;
        let mut f = FeatureState {
            n: self.u64()?,
            sum: self.f64()?,
            max: self.f32()?,
            bin_max: self.f32()?,
            ..Default::default()
        };
        let nt = self.u32()?;
        let nt = self.count(nt as u64, MIN_SAMPLE, opts.top_k, "top contexts")?;
        for _ in 0..nt {
            f.top.push(self.sample(opts, contexts)?);
        }
        let nb = self.u32()?;
        let nb = self.count(nb as u64, 12, opts.n_quantiles, "quantile bins")?;
        for _ in 0..nb {
            let mut b = Bin { seen: self.u64()?, samples: Vec::new() };
            let ns = self.u32()?;
            let ns = self.count(ns as u64, MIN_SAMPLE, opts.per_quantile, "quantile samples")?;
            for _ in 0..ns {
                b.samples.push(self.sample(opts, contexts)?);
            }
            f.bins.push(b);
        }
        Ok(f)
    }
    /// A count of items of at least `min_bytes` each, refused when the rest of the file cannot hold them.
    fn count(&mut self, n: u64, min_bytes: usize, max: usize, what: &str) -> Result<usize> {
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        if n > max || n.saturating_mul(min_bytes) > self.0.len() {
            bail_corrupt!("checkpoint declares {n} {what} (at most {max}, {} bytes left)", self.0.len());
        }
        Ok(n)
    }
    fn sample(&mut self, opts: &StatsOptions, contexts: &std::ops::Range<u64>) -> Result<Sample> {
        let act = self.f32()?;
        let ctx = self.u64()?;
        let pos = self.u32()?;
        let start = self.u32()?;
        let len = opts.before.saturating_add(opts.after).saturating_add(1);
        let n = self.u32()?;
        let n = self.count(n as u64, 8, len, "window entries")?;
        let mut window = Vec::with_capacity(n);
        for _ in 0..n {
            let o = self.u32()?;
            if o as usize >= len {
                bail_corrupt!("checkpoint sample has window offset {o} past its window of {len}");
            }
            window.push((o as u16, self.f32()?));
        }
        if !contexts.contains(&ctx) || start > pos {
            bail_corrupt!(
                "checkpoint sample is inconsistent (context {ctx} outside {contexts:?}, start {start}, peak {pos})"
            );
        }
        Ok(Sample { act, ctx, pos, start, window })
    }
}

/// The part of a checkpoint after its magic, once the magic and the CRC32 are checked.
fn checked_body(bytes: &[u8]) -> Result<&[u8]> {
    if bytes.get(..8) == Some(CKPT_MAGIC_V1) {
        bail_input!("checkpoint written by an older saekit (no checksum); delete it or pass --restart");
    }
    if bytes.len() < 12 || &bytes[..8] != CKPT_MAGIC {
        bail_input!("not a saekit analysis checkpoint");
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    let crc = u32::from_le_bytes(crc.try_into()?);
    if crc32fast::hash(body) != crc {
        bail_corrupt!("checkpoint is corrupt (CRC32 mismatch); delete it or pass --restart");
    }
    Ok(&body[8..])
}

/// The run fingerprint a checkpoint records (checked against its CRC32), so a caller can say which
/// input changed before refusing it.
pub(crate) fn checkpoint_fingerprint(bytes: &[u8]) -> AnalysisResult<String> {
    let fp = R(checked_body(bytes)?).bytes()?;
    Ok(String::from_utf8_lossy(&fp).into_owned())
}

impl FeatureStats {
    /// Serialize the whole state; `fingerprint` identifies the run (SAE, dataset, options) so a
    /// checkpoint from another run is refused on resume.
    pub fn to_bytes(&self, fingerprint: &str) -> Vec<u8> {
        let mut w = W(Vec::with_capacity(64 + self.d_sae * 64));
        w.0.extend_from_slice(CKPT_MAGIC);
        w.bytes(fingerprint.as_bytes());
        w.bytes(&serde_json::to_vec(&self.opts).unwrap_or_default());
        w.u64(self.d_sae as u64);
        w.u64(self.n_tokens);
        w.u64(self.n_contexts);
        w.u64(self.shards.len() as u64);
        for s in &self.shards {
            w.u32(s.lo);
            w.u64(s.feats.len() as u64);
            for &h in &s.hist {
                w.u32(h);
            }
            for f in &s.feats {
                w.u64(f.n);
                w.f64(f.sum);
                w.f32(f.max);
                w.f32(f.bin_max);
                w.u32(f.top.len() as u32);
                f.top.iter().for_each(|s| w.sample(s));
                w.u32(f.bins.len() as u32);
                for b in &f.bins {
                    w.u64(b.seen);
                    w.u32(b.samples.len() as u32);
                    b.samples.iter().for_each(|s| w.sample(s));
                }
            }
        }
        let crc = crc32fast::hash(&w.0);
        w.u32(crc);
        w.0
    }

    /// Parse a checkpoint written by [`to_bytes`](Self::to_bytes). Every count is checked against
    /// the bytes left and against the layout `FeatureStats::new` gives, and the whole file against
    /// its CRC32, before anything is sized from it.
    pub fn from_bytes(bytes: &[u8], fingerprint: &str) -> AnalysisResult<FeatureStats> {
        Self::from_bytes_at(bytes, fingerprint, 0)
    }

    /// [`from_bytes`](Self::from_bytes) of the statistics of the contexts from `first_context` on (one
    /// rank's share of an analysis): its samples must come from those contexts.
    pub fn from_bytes_at(bytes: &[u8], fingerprint: &str, first_context: u64) -> AnalysisResult<FeatureStats> {
        let mut r = R(checked_body(bytes)?);
        let fp = r.bytes()?;
        if fp != fingerprint.as_bytes() {
            bail_input!(
                "checkpoint belongs to another run ({}); delete it or pass --restart",
                String::from_utf8_lossy(&fp)
            );
        }
        let opts: StatsOptions = serde_json::from_slice(&r.bytes()?).context("checkpoint options")?;
        let d_sae = r.u64()?;
        let d_sae = r.count(d_sae, CKPT_MIN_FEATURE_BYTES, u32::MAX as usize, "features")?;
        let n_tokens = r.u64()?;
        let n_contexts = r.u64()?;
        let contexts = first_context..first_context.saturating_add(n_contexts);
        // The layout a fresh run of this width has; the file must match it shard for shard.
        let shard_size = 256usize.max(d_sae.div_ceil(4096));
        let n_shards = r.u64()?;
        if n_shards != d_sae.div_ceil(shard_size) as u64 {
            bail_corrupt!("checkpoint has {n_shards} shards; {d_sae} features make {}", d_sae.div_ceil(shard_size));
        }
        let mut shards = Vec::with_capacity(n_shards as usize);
        for lo in (0..d_sae).step_by(shard_size) {
            let n = shard_size.min(d_sae - lo);
            let (got_lo, got_n) = (r.u32()?, r.u64()?);
            if got_lo as usize != lo || got_n != n as u64 {
                bail_corrupt!("checkpoint shard covers features {got_lo}..+{got_n}, expected {lo}..+{n}");
            }
            let mut hist = Vec::with_capacity(n * HIST_BINS);
            for _ in 0..n * HIST_BINS {
                hist.push(r.u32()?);
            }
            let mut feats = Vec::with_capacity(n);
            for _ in 0..n {
                feats.push(r.feature(&opts, &contexts)?);
            }
            shards.push(Shard { lo: lo as u32, feats, hist });
        }
        if !r.0.is_empty() {
            bail_corrupt!("checkpoint has {} trailing bytes", r.0.len());
        }
        Ok(FeatureStats { d_sae, opts, n_tokens, n_contexts, shards })
    }
}
