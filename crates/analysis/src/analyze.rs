//! `saekit analyze`: one streaming pass of model + SAE over held-out contexts into a feature database.

use crate::error::{bail_input, AnalysisResult};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use rayon::prelude::*;
use saekit_kernels::Precision;
use saekit_model::{HookPoint, Model};
use saekit_sae::{Encoder, Sae};
use saekit_store::TokenDataset;

use crate::feature_db::{DbInfo, FeatureDbWriter, FeatureRow, StoredContext, StoredDetail, StoredGroup};
use crate::geometry;
use crate::stats::{self, hist_edges, BatchCodes, FeatureStats, Sample, StatsOptions, HIST_BINS};
use saekit_store::Ranks;

/// What [`analyze()`] reads, keeps and writes; the defaults are `saekit analyze`'s.
#[derive(Debug, Clone)]
pub struct AnalyzeOptions {
    /// Tokens to analyse (rounded up to whole contexts; capped by the split).
    pub n_tokens: u64,
    /// Split of the tokenized dataset to read (held-out: "validation").
    pub split: String,
    /// Contexts per forward pass.
    pub batch_contexts: usize,
    /// What each feature keeps: top contexts, quantile samples, window lengths, the sampling seed.
    pub stats: StatsOptions,
    /// Checkpoint the running state at most this often.
    pub checkpoint_every: Duration,
    /// Ignore an existing checkpoint.
    pub restart: bool,
    /// Skip attention-sink rows (position 0, special tokens such as `<|endoftext|>`, and rows above
    /// `sink_norm_factor` x the median norm).
    pub skip_sinks: bool,
    /// The norm rule's multiple (see `skip_sinks`; [`SINK_NORM_FACTOR`] by default).
    pub sink_norm_factor: f32,
    /// Hook to read (default: the SAE's `metadata.hook_name`).
    pub hook: Option<HookPoint>,
    /// Precision of the SAE's encoder GEMM (the model's is set on the model). Part of the run's
    /// identity: a checkpoint resumes only in the precision it started in.
    pub precision: Precision,
    /// Tokens kept per feature at each end of its direct logit effect (promoted and suppressed).
    pub n_logits: usize,
    /// Nearest features kept per feature, by cosine of the decoder directions.
    pub n_neighbours: usize,
    /// Draw a progress bar on stderr.
    pub progress: bool,
    /// Stop after this many contexts in this invocation (tests of resume); the checkpoint is kept.
    pub stop_after_contexts: Option<u64>,
    /// Contexts kept out of the statistics as held-out text for the autointerp scorers (`saekit explain`
    /// shows a feature windows of them where it is 0). Taken after the analysed contexts; when the split
    /// has too few, the analysis reads that many fewer (at most a tenth of the split).
    pub heldout_contexts: u64,
    /// Set (by a SIGINT/SIGTERM handler) to stop after the batch in flight; the checkpoint is written.
    pub stop: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// The processes of an `mpirun` sharing the analysis: each analyses a contiguous share of the
    /// contexts (checkpointing it on its own), and rank 0 merges the shares ([`FeatureStats::merge`])
    /// and writes the one database.
    pub ranks: Option<std::sync::Arc<dyn saekit_store::Ranks>>,
}

impl Default for AnalyzeOptions {
    fn default() -> Self {
        AnalyzeOptions {
            n_tokens: 10_000_000,
            split: "validation".into(),
            batch_contexts: 8,
            stats: StatsOptions::default(),
            checkpoint_every: Duration::from_secs(120),
            restart: false,
            skip_sinks: true,
            sink_norm_factor: SINK_NORM_FACTOR,
            hook: None,
            precision: Precision::F32,
            n_logits: 10,
            n_neighbours: 10,
            progress: true,
            stop_after_contexts: None,
            heldout_contexts: 64,
            stop: None,
            ranks: None,
        }
    }
}

/// What one invocation of [`analyze()`] did (printed as JSON by `saekit analyze --json`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct AnalyzeReport {
    /// The database written; `None` when the run stopped early and left a checkpoint instead.
    pub db: Option<PathBuf>,
    /// Tokens in the statistics so far (attention-sink rows excluded), across resumes.
    pub n_tokens: u64,
    /// Contexts analysed so far, across resumes.
    pub n_contexts: u64,
    /// Seconds in the streaming pass of this invocation (model + SAE + statistics).
    pub pass_secs: f64,
    /// Seconds in the model forward and the SAE encoder alone, within `pass_secs`.
    pub forward_encode_secs: f64,
    /// Seconds writing the database (logit effects, neighbours, map, rows).
    pub write_secs: f64,
    /// Tokens (sinks included) through the model per second of `pass_secs`, in this invocation.
    pub tokens_per_sec: f64,
    /// Contexts the checkpoint this run resumed from had covered (0 for a fresh run).
    pub resumed_from: u64,
    /// Whether every context was analysed and the database written.
    pub finished: bool,
}

/// The hook point the SAE (named `sae_label` in errors) runs on in `model`: its own, or the one asked
/// for. An SAE made for another model, width or hook is refused with both sides named.
pub fn sae_hook(model: &Model, sae: &Sae, sae_label: &str, hook: Option<HookPoint>) -> AnalysisResult<HookPoint> {
    let asked = hook.map(|h| h.to_string());
    let name = sae.hook_on(sae_label, &model.config().name, model.config().d_model, asked.as_deref())?;
    let h: HookPoint = name.parse().with_context(|| format!("{sae_label}: SAE hook {name:?} is not a hook point"))?;
    h.check(model.config().n_layers)?;
    Ok(h)
}

/// Rows to skip in a `[batch, seq]` block of tokens by position and id: position 0, BOS when the
/// tokenizer adds one, end-of-text and EOS. The other sinks are found by their norm (`mark_norm_outliers`),
/// as harvest finds them: a chat model's nominal BOS (`<|im_start|>` in SmolLM2) opens every turn and most
/// of its rows are ordinary (measured in saekit-store's `tests/harvest.rs`).
pub fn sink_rows(model: &Model, tokens: &[u32], seq: usize) -> Vec<bool> {
    let tok = model.tokenizer();
    tokens.iter().enumerate().map(|(i, &t)| i.is_multiple_of(seq) || tok.is_sink_token(t)).collect()
}

/// Rows whose L2 norm exceeds this multiple of the block's median norm are treated as sinks too
/// (mid-document contexts without BOS get their sink on the first one or two tokens; the trainer
/// and `saekit eval` use the same 10x rule).
pub const SINK_NORM_FACTOR: f32 = 10.0;

/// Mark rows of `x` ([rows, d]) with norm above `factor` x the median row norm (`factor` 0: none).
pub(crate) fn mark_norm_outliers(mask: &mut [bool], x: &[f32], d: usize, factor: f32) {
    if factor <= 0.0 || x.is_empty() {
        return;
    }
    let med = saekit_sae::metrics::median_norm(x, d);
    let lim2 = (factor * med) * (factor * med);
    for (m, row) in mask.iter_mut().zip(x.chunks(d)) {
        if row.iter().map(|v| v * v).sum::<f32>() > lim2 {
            *m = true;
        }
    }
}

/// The sink rows of a `[batch, seq]` block whose hook activations are `x` ([rows, d]): [`sink_rows`] by
/// position and id, then [`mark_norm_outliers`] above `factor` x the median norm.
pub(crate) fn sink_mask(model: &Model, tokens: &[u32], seq: usize, x: &[f32], d: usize, factor: f32) -> Vec<bool> {
    let mut mask = sink_rows(model, tokens, seq);
    mark_norm_outliers(&mut mask, x, d, factor);
    mask
}

fn checkpoint_path(out: &Path, ranks: Option<&dyn Ranks>) -> PathBuf {
    let name = out.file_name().and_then(|s| s.to_str()).unwrap_or("features.sqlite");
    match ranks {
        None => out.with_file_name(format!("{name}.ckpt")),
        Some(r) => out.with_file_name(format!("{name}.rank-{}-of-{}.ckpt", r.rank(), r.size())),
    }
}

/// The contexts rank `r` analyses: the `r`-th of `size` near-equal contiguous pieces of `0..total`, so
/// that the shares merged in rank order are the contexts in order.
fn share_of(total: u64, ranks: Option<&dyn Ranks>) -> std::ops::Range<u64> {
    match ranks {
        None => 0..total,
        Some(r) => {
            let (i, n) = (r.rank() as u64, r.size() as u64);
            i * total / n..(i + 1) * total / n
        }
    }
}

/// Rank 0: every rank's share (rank `r`'s contexts start where rank `r - 1`'s end) merged in rank order.
fn merge_shares(parts: Vec<Vec<u8>>, fingerprint: &str) -> AnalysisResult<FeatureStats> {
    let mut merged: Option<FeatureStats> = None;
    for bytes in parts {
        let first = merged.as_ref().map_or(0, |m| m.n_contexts);
        let share = FeatureStats::from_bytes_at(&bytes, fingerprint, first)?;
        match &mut merged {
            None => merged = Some(share),
            Some(m) => m.merge(share)?,
        }
    }
    Ok(merged.context("no rank sent its statistics")?)
}

/// Run the analysis and write `out`. Resumes from `out.ckpt` when it exists (same SAE, dataset and
/// options); the checkpoint is removed once the database is in place.
///
/// # Example
///
/// Analyse an SAE over a million held-out tokens of a dataset `saekit tokenize` wrote, then read its
/// densest features back (`sae_path` only names the SAE in messages and in the database):
///
/// ```no_run
/// use std::path::Path;
/// use saekit_analysis::{analyze, AnalyzeOptions, FeatureDb, SortBy};
/// use saekit_model::{default_model_path, LoadOptions, Model};
/// use saekit_store::TokenDataset;
///
/// # fn main() -> anyhow::Result<()> {
/// let model = Model::load(&default_model_path(), &LoadOptions::default())?;
/// let sae = saekit_sae::load_sae("runs/sae")?; // its hook comes from its metadata
/// let dataset = TokenDataset::open(Path::new("data/tokens"))?;
/// let opts = AnalyzeOptions { n_tokens: 1_000_000, ..Default::default() };
/// let report = analyze(&model, &sae, "runs/sae", &dataset, Path::new("features.sqlite"), &opts)?;
/// assert!(report.finished, "no stop was asked for, so the database is written");
///
/// let db = FeatureDb::open(Path::new("features.sqlite"))?;
/// for f in db.list(SortBy::Density, true, 0, 5)? {
///     println!("feature {}: fires on {:.2}% of tokens, most on {:?}", f.id, 100.0 * f.density, f.top_tokens);
/// }
/// # Ok(())
/// # }
/// ```
pub fn analyze(
    model: &Model,
    sae: &Sae,
    sae_path: &str,
    dataset: &TokenDataset,
    out: &Path,
    opts: &AnalyzeOptions,
) -> AnalysisResult<AnalyzeReport> {
    let hook = sae_hook(model, sae, sae_path, opts.hook)?;
    let split = dataset.split(&opts.split)?;
    let seq = split.context_len();
    let want = opts.n_tokens.div_ceil(seq as u64).max(1);
    let reserve = opts.heldout_contexts.min(split.n_contexts() / 10);
    let total = want.min(split.n_contexts() - reserve);
    if total == 0 {
        bail_input!("{}: split {:?} has no contexts", dataset.dir().display(), opts.split);
    }
    if total < want {
        tracing::warn!(
            have = total * seq as u64,
            asked = opts.n_tokens,
            "the split is smaller than --tokens; analysing all of it"
        );
    }
    let ranks = opts.ranks.as_deref().filter(|r| r.size() > 1);
    let share = share_of(total, ranks);
    let n_share = share.end - share.start;
    let identity = RunIdentity::new(&[
        ("sae", sae.fingerprint()),
        ("d_sae", sae.d_sae.to_string()),
        ("dataset", dataset.fingerprint().to_string()),
        ("split", opts.split.clone()),
        ("contexts", total.to_string()),
        ("hook", hook.to_string()),
        ("sinks", opts.skip_sinks.to_string()),
        ("norm", opts.sink_norm_factor.to_string()),
        ("opts", serde_json::to_string(&opts.stats)?),
        ("precision", opts.precision.name().to_string()),
    ]);
    // the statistics of the whole run; a rank's checkpoint also names its share
    let run_fingerprint = identity.fingerprint();
    let mut identity = identity;
    if let Some(r) = ranks {
        identity
            .0
            .insert("share".into(), format!("{}..{} (rank {} of {})", share.start, share.end, r.rank(), r.size()));
    }
    let fingerprint = identity.fingerprint();
    let ckpt = checkpoint_path(out, ranks);
    let mut stats = if ckpt.exists() && !opts.restart {
        let bytes = std::fs::read(&ckpt).with_context(|| format!("reading {}", ckpt.display()))?;
        let recorded = stats::checkpoint_fingerprint(&bytes).with_context(|| format!("{}", ckpt.display()))?;
        if recorded != fingerprint {
            let inputs = Inputs { sae: sae_path, dataset: &dataset.dir().display().to_string() };
            bail_input!(
                "{}: cannot resume: {}; delete it or pass --restart",
                ckpt.display(),
                identity.differences(&recorded, &inputs)
            );
        }
        let s = FeatureStats::from_bytes_at(&bytes, &fingerprint, share.start)
            .with_context(|| format!("{}", ckpt.display()))?;
        if s.d_sae != sae.d_sae || s.opts != opts.stats || s.n_contexts > n_share {
            bail_input!(
                "{}: checkpoint of {} features, {} contexts does not fit this run ({} features, {total} contexts); delete it or pass --restart",
                ckpt.display(),
                s.d_sae,
                s.n_contexts,
                sae.d_sae
            );
        }
        tracing::info!(contexts = s.n_contexts, "resuming analysis from {}", ckpt.display());
        s
    } else {
        FeatureStats::new(sae.d_sae, opts.stats)
    };
    let resumed_from = stats.n_contexts;
    let pb = progress_bar(opts.progress, n_share, stats.n_contexts);
    let encoder = sae.encoder(opts.precision);
    let t_pass = Instant::now();
    let mut fwd = Duration::ZERO;
    let mut last_ckpt = Instant::now();
    let mut done_here = 0u64;
    let b = opts.batch_contexts.max(1) as u64;
    while stats.n_contexts < n_share {
        if opts.stop_after_contexts.is_some_and(|s| done_here >= s)
            || opts.stop.as_ref().is_some_and(|f| f.load(std::sync::atomic::Ordering::SeqCst))
        {
            break;
        }
        let c0 = share.start + stats.n_contexts;
        let n = b.min(share.end - c0);
        let tokens = batch_tokens(|c| split.context(c), c0..c0 + n);
        let t = Instant::now();
        let (x, codes) = forward_encode(model, &encoder, hook, &tokens, n as usize)?;
        fwd += t.elapsed();
        let skip = if opts.skip_sinks {
            sink_mask(model, &tokens, seq, &x, sae.d_in, opts.sink_norm_factor)
        } else {
            Vec::new()
        };
        stats.update(&BatchCodes {
            indptr: &codes.indptr,
            idx: &codes.idx,
            val: &codes.val,
            seq,
            first_ctx: c0,
            skip: &skip,
        })?;
        done_here += n;
        pb.set_position(stats.n_contexts);
        if last_ckpt.elapsed() >= opts.checkpoint_every && stats.n_contexts < n_share {
            save_checkpoint(&stats, &fingerprint, &ckpt)?;
            last_ckpt = Instant::now();
        }
    }
    pb.finish_and_clear();
    let pass_secs = t_pass.elapsed().as_secs_f64();
    let tokens_here = (stats.n_contexts - resumed_from) * seq as u64;
    let mut report = AnalyzeReport {
        db: None,
        n_tokens: stats.n_tokens,
        n_contexts: stats.n_contexts,
        pass_secs,
        forward_encode_secs: fwd.as_secs_f64(),
        write_secs: 0.0,
        tokens_per_sec: tokens_here as f64 / pass_secs.max(1e-9),
        resumed_from,
        finished: false,
    };
    let finished = stats.n_contexts == n_share;
    if !ranks.map_or(finished, |r| r.all_ok(finished)) {
        save_checkpoint(&stats, &fingerprint, &ckpt)?;
        return Ok(report);
    }
    if let Some(r) = ranks {
        let parts = r.gather(&stats.to_bytes(&run_fingerprint));
        if r.rank() != 0 {
            // rank 0 writes the database; this rank's share is kept on disk until it has
            save_checkpoint(&stats, &fingerprint, &ckpt)?;
            if r.all_ok(true) {
                saekit_files::remove_with_temps(&ckpt)?;
            }
            report.finished = true;
            return Ok(report);
        }
        stats = merge_shares(parts, &run_fingerprint)?;
        (report.n_tokens, report.n_contexts) = (stats.n_tokens, stats.n_contexts);
    }
    let t_write = Instant::now();
    let info = DbInfo {
        model: model.config().name.clone(),
        hook: hook.to_string(),
        sae_path: sae_path.to_string(),
        d_sae: sae.d_sae as u32,
        n_tokens: stats.n_tokens,
        n_contexts: stats.n_contexts,
        context_len: seq as u32,
        dataset: format!("{} ({})", dataset.dir().display(), opts.split),
        ..Default::default()
    };
    let vocab: Vec<String> = (0..model.config().vocab_size as u32).map(|t| model.tokenizer().token_text(t)).collect();
    let unembed = model.unembedding();
    let weights = WeightInputs {
        unembed: &unembed,
        vocab: model.config().vocab_size,
        gain: model.final_norm_gain(),
        n_logits: opts.n_logits,
        n_neighbours: opts.n_neighbours,
    };
    let path = write_db(&stats, sae, &weights, info, &vocab, |c| split.context(c).to_vec(), out)?;
    let held = total..(total + opts.heldout_contexts).min(split.n_contexts());
    let window = stats.opts.before + stats.opts.after + 1;
    let windows = heldout_windows(model, &encoder, hook, |c| split.context(c), held, window, opts)?;
    crate::AutointerpWriter::open(&path)?.set_heldout(&windows)?;
    if let Some(r) = ranks {
        r.all_ok(true); // the other ranks may drop their shares
    }
    saekit_files::remove_with_temps(&ckpt)?;
    report.write_secs = t_write.elapsed().as_secs_f64();
    report.db = Some(path);
    report.finished = true;
    Ok(report)
}

/// What a checkpoint must match to be resumed: every input by content (an SAE or a dataset rebuilt
/// at the same path is another input), and every option that shapes the statistics. Recorded in the
/// checkpoint as a JSON object, so a refusal can say which input changed.
struct RunIdentity(std::collections::BTreeMap<String, String>);

/// How the inputs are named to the user.
struct Inputs<'a> {
    sae: &'a str,
    dataset: &'a str,
}

impl RunIdentity {
    fn new(parts: &[(&str, String)]) -> Self {
        RunIdentity(parts.iter().map(|(k, v)| (k.to_string(), v.clone())).collect())
    }

    fn fingerprint(&self) -> String {
        serde_json::to_string(&self.0).unwrap_or_default()
    }

    /// One line saying what differs between this run and the `recorded` identity of a checkpoint.
    fn differences(&self, recorded: &str, inputs: &Inputs<'_>) -> String {
        let Ok(old) = serde_json::from_str::<std::collections::BTreeMap<String, String>>(recorded) else {
            return "the checkpoint was written by an older saekit that did not record its inputs by content".into();
        };
        let none = String::from("(none)");
        let mut diffs = Vec::new();
        for key in self.0.keys().chain(old.keys().filter(|k| !self.0.contains_key(*k))) {
            let (then, now) = (old.get(key).unwrap_or(&none), self.0.get(key).unwrap_or(&none));
            if then == now {
                continue;
            }
            diffs.push(match key.as_str() {
                "sae" => format!(
                    "the SAE at {} is not the one the checkpoint was made with (weights fingerprint {then} then, {now} now)",
                    inputs.sae
                ),
                "dataset" => format!(
                    "the token dataset at {} changed since the checkpoint was made (fingerprint {then} then, {now} now)",
                    inputs.dataset
                ),
                _ => format!("{key} was {then}, now {now}"),
            });
        }
        if diffs.is_empty() {
            "the checkpoint belongs to another run".into()
        } else {
            diffs.join("; ")
        }
    }
}

/// The token ids of contexts `range`, one after another (`[range.len(), seq]`).
fn batch_tokens<'a>(context: impl Fn(u64) -> &'a [u32], range: std::ops::Range<u64>) -> Vec<u32> {
    range.flat_map(|c| context(c).iter().copied()).collect()
}

/// One batch of `n` contexts through the model to `hook` and the SAE's encoder: the hook's activations
/// (`[rows, d_in]`) and the codes of every row.
fn forward_encode(
    model: &Model,
    encoder: &Encoder,
    hook: HookPoint,
    tokens: &[u32],
    n: usize,
) -> Result<(Vec<f32>, saekit_sae::SparseCodes)> {
    let mut cache = model.run_with_cache(tokens, n, &[hook])?;
    let x = cache.take(&hook).context("internal: hook not captured")?;
    let codes = encoder.encode(&x);
    Ok((x, codes))
}

/// Cut the held-out contexts into windows as long as the stored ones (position 0, the attention sink, left
/// out) and record every feature that fires anywhere in each (sink rows skipped as in the analysis). The
/// contexts go through the model `batch_contexts` at a time, as in the analysis pass; the norm rule for
/// sinks still takes each context's own median, so the windows are those of one context at a time.
fn heldout_windows<'a>(
    model: &Model,
    encoder: &Encoder,
    hook: HookPoint,
    context: impl Fn(u64) -> &'a [u32] + Copy,
    held: std::ops::Range<u64>,
    window: usize,
    opts: &AnalyzeOptions,
) -> Result<Vec<crate::HeldOutWindow>> {
    let mut out = Vec::new();
    let b = opts.batch_contexts.max(1) as u64;
    for c0 in held.clone().step_by(b as usize) {
        let n = b.min(held.end - c0);
        let tokens = batch_tokens(context, c0..c0 + n);
        let (x, codes) = forward_encode(model, encoder, hook, &tokens, n as usize)?;
        let seq = tokens.len() / n as usize;
        let d = encoder.sae().d_in;
        for k in 0..n as usize {
            let rows = k * seq..(k + 1) * seq;
            let skip = if opts.skip_sinks {
                sink_mask(
                    model,
                    &tokens[rows.clone()],
                    seq,
                    &x[k * seq * d..(k + 1) * seq * d],
                    d,
                    opts.sink_norm_factor,
                )
            } else {
                vec![false; seq]
            };
            let row_features = |r: usize| codes.row(k * seq + r);
            out.extend(context_windows(c0 + k as u64, &tokens[rows], &skip, row_features, window));
        }
    }
    Ok(out)
}

/// The windows of one held-out context (`tokens`, its rows' codes through `row_features`), each with the
/// sorted ids of the features that fire on a row of it that is not skipped.
fn context_windows<'c>(
    ctx: u64,
    tokens: &[u32],
    skip: &[bool],
    row_features: impl Fn(usize) -> (&'c [u32], &'c [f32]),
    window: usize,
) -> Vec<crate::HeldOutWindow> {
    let seq = tokens.len();
    let mut out = Vec::new();
    for start in (1..seq).step_by(window.max(1)) {
        let end = (start + window).min(seq);
        // a tail much shorter than a stored window would be an unfairly easy negative
        if end - start < window.div_ceil(2) {
            continue;
        }
        let mut fired: Vec<u32> = Vec::new();
        for r in start..end {
            if skip.get(r).copied().unwrap_or(false) {
                continue;
            }
            let (idx, val) = row_features(r);
            fired.extend(idx.iter().zip(val).filter(|(_, v)| **v > 0.0).map(|(i, _)| *i));
        }
        fired.sort_unstable();
        fired.dedup();
        out.push(crate::HeldOutWindow { ctx, start: start as u32, ids: tokens[start..end].to_vec(), fired });
    }
    out
}

fn save_checkpoint(stats: &FeatureStats, fingerprint: &str, path: &Path) -> Result<()> {
    let t = Instant::now();
    saekit_sae::format::atomic_write(path, &stats.to_bytes(fingerprint))?;
    tracing::debug!(secs = t.elapsed().as_secs_f32(), "checkpoint written to {}", path.display());
    Ok(())
}

fn progress_bar(on: bool, total: u64, pos: u64) -> indicatif::ProgressBar {
    if !on {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(total);
    pb.set_style(
        indicatif::ProgressStyle::with_template("analyze {bar:40} {pos}/{len} contexts {per_sec} eta {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    pb.set_position(pos);
    pb
}

/// The model weights the database needs besides the statistics: what each feature's decoder direction
/// does to the logits.
pub struct WeightInputs<'a> {
    /// The unembedding, `[vocab, d_model]` row-major.
    pub unembed: &'a [f32],
    /// Rows of `unembed` (the vocabulary size).
    pub vocab: usize,
    /// The final norm's per-channel gain (`[d_model]`), applied to a direction before the unembedding;
    /// `None` for a model without one.
    pub gain: Option<&'a [f32]>,
    /// Tokens kept per feature at each end of its direct logit effect.
    pub n_logits: usize,
    /// Nearest features kept per feature.
    pub n_neighbours: usize,
}

/// Turn finished statistics into a database at `out`. `context_tokens(c)` returns the token ids of
/// source context `c`.
pub fn write_db(
    stats: &FeatureStats,
    sae: &Sae,
    w: &WeightInputs<'_>,
    mut info: DbInfo,
    vocab: &[String],
    context_tokens: impl Fn(u64) -> Vec<u32> + Sync,
    out: &Path,
) -> AnalysisResult<PathBuf> {
    let d = sae.d_in;
    let t = Instant::now();
    let logits = geometry::direct_logit_effects(&sae.params.w_dec, d, w.unembed, w.vocab, w.gain, w.n_logits);
    tracing::info!(secs = t.elapsed().as_secs_f32(), "direct logit effects");
    let t = Instant::now();
    let (neighbours, nn_method) = geometry::nearest_neighbours(&sae.params.w_dec, d, w.n_neighbours);
    tracing::info!(secs = t.elapsed().as_secs_f32(), method = %nn_method, "neighbours");
    let map = geometry::pca_map(&sae.params.w_dec, d);
    info.created = creation_time();
    info.map_method = "pca(unit decoder directions), scaled to [-1, 1]".into();
    info.neighbour_method = nn_method;
    let edges = hist_edges();
    if let Some(parent) = out.parent() {
        if !parent.as_os_str().is_empty() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
    }
    let mut writer = FeatureDbWriter::create(out, &info, &edges, vocab)?;
    let tok = |t: u32| vocab.get(t as usize).cloned().unwrap_or_else(|| format!("<{t}>"));
    let n_tokens = stats.n_tokens.max(1) as f64;
    // rows are built in parallel blocks and inserted in id order
    let block = 4096usize;
    for j0 in (0..sae.d_sae).step_by(block) {
        let rows: Vec<FeatureRow> = (j0..(j0 + block).min(sae.d_sae))
            .into_par_iter()
            .map(|j| {
                let (st, hist) = stats.feature(j);
                let stored = |s: &Sample| stored_context(s, stats.opts.before, stats.opts.after, &context_tokens);
                let top: Vec<StoredContext> = st.top.iter().map(stored).collect();
                let nq = st.bins.len();
                let quantiles: Vec<StoredGroup> = st
                    .bins
                    .iter()
                    .enumerate()
                    .map(|(b, bin)| StoredGroup {
                        lo: st.bin_max * b as f32 / nq as f32,
                        hi: st.bin_max * (b + 1) as f32 / nq as f32,
                        count: bin.seen,
                        contexts: bin.samples.iter().map(stored).collect(),
                    })
                    .collect();
                let first = hist.iter().position(|&c| c > 0).unwrap_or(HIST_BINS);
                let last = hist.iter().rposition(|&c| c > 0).map_or(first, |l| l + 1);
                let (promoted, suppressed) = logits[j].clone();
                let top_tokens = top_peak_tokens(&top, 5, &tok);
                let promoted_text: Vec<String> = promoted.iter().take(5).map(|&(t, _)| tok(t)).collect();
                let explanation = if st.n == 0 {
                    None
                } else {
                    Some(format!(
                        "fires on: {}; promotes: {}",
                        top_tokens.iter().map(|t| format!("{:?}", t)).collect::<Vec<_>>().join(", "),
                        promoted_text.iter().map(|t| format!("{:?}", t)).collect::<Vec<_>>().join(", ")
                    ))
                };
                let mut search_text = String::new();
                for c in top.iter().take(10) {
                    let p = c.peak as usize;
                    for t in c.ids.iter().skip(p.saturating_sub(2)).take(4) {
                        search_text.push_str(&tok(*t));
                        search_text.push(' ');
                    }
                }
                FeatureRow {
                    id: j as u32,
                    density: st.n as f64 / n_tokens,
                    max_act: st.max,
                    mean_act: if st.n > 0 { (st.sum / st.n as f64) as f32 } else { 0.0 },
                    n_fired: st.n,
                    top_tokens,
                    explanation,
                    explanation_auto: true,
                    x: map[j].0,
                    y: map[j].1,
                    search_text,
                    detail: StoredDetail {
                        top,
                        quantiles,
                        hist_first: first as u32,
                        hist: hist[first..last].iter().map(|&c| c as u64).collect(),
                        promoted,
                        suppressed,
                        neighbours: neighbours[j].clone(),
                    },
                }
            })
            .collect();
        for r in &rows {
            writer.insert(r)?;
        }
    }
    writer.finish()
}

/// Seconds since the Unix epoch, or `SOURCE_DATE_EPOCH` when it is set (the reproducible-builds
/// convention): the creation time is the one field of a database that is not a function of its
/// inputs, and with it fixed two runs over the same inputs, resumed or not, write the same bytes.
fn creation_time() -> u64 {
    if let Some(t) = std::env::var("SOURCE_DATE_EPOCH").ok().and_then(|v| v.trim().parse().ok()) {
        return t;
    }
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn stored_context(s: &Sample, before: usize, after: usize, tokens: &impl Fn(u64) -> Vec<u32>) -> StoredContext {
    let all = tokens(s.ctx);
    let start = s.start as usize;
    let end = (s.pos as usize + after + 1).min(all.len()).max(start);
    let _ = before;
    StoredContext {
        ctx: s.ctx,
        start: s.start,
        ids: all.get(start..end).map(|x| x.to_vec()).unwrap_or_default(),
        acts: s.window.clone(),
        peak: (s.pos - s.start) as u16,
        max_act: s.act,
    }
}

/// The most frequent peak tokens among the top contexts, most frequent first (ties: first seen).
fn top_peak_tokens(top: &[StoredContext], n: usize, tok: &impl Fn(u32) -> String) -> Vec<String> {
    let mut counts: Vec<(u32, usize, usize)> = Vec::new();
    for (i, c) in top.iter().enumerate() {
        if let Some(&t) = c.ids.get(c.peak as usize) {
            match counts.iter_mut().find(|x| x.0 == t) {
                Some(x) => x.1 += 1,
                None => counts.push((t, 1, i)),
            }
        }
    }
    counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.2.cmp(&b.2)));
    counts.into_iter().take(n).map(|(t, _, _)| tok(t)).collect()
}
