//! Harvest: run the model over tokenized contexts and append the hook points' activations to a store.
//!
//! One forward pass per batch of contexts serves every requested hook, and stops after the deepest
//! requested block (`Model::run_with_cache`). The store's manifest records progress after each shard,
//! so a killed harvest resumes at the first context not on disk.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use saekit_model::{HookPoint, Model};

use crate::error::{ensure_input, StoreResult};
use crate::parts::{self, Ranks};
use crate::store::{ActivationWriter, Dtype, ModelInfo, SourceInfo, StoreConfig, StoreManifest};
use crate::tokens::{TokenDataset, TokenizeOptions};
use saekit_files::Fault;

/// What to harvest and how: hook points, token budget, split, storage type.
#[derive(Clone, Debug)]
pub struct HarvestOptions {
    /// Hook points whose activations are stored (each `d_model` wide).
    pub hooks: Vec<HookPoint>,
    /// Tokens to store (rounded up to whole contexts, capped by the split).
    pub tokens: u64,
    /// The tokenized dataset's split to read (`train` or `validation`).
    pub split: String,
    /// First context of the split to use (e.g. to harvest a disjoint second store).
    pub first_context: u64,
    /// Contexts per forward pass.
    pub batch: usize,
    /// How the activations are stored on disk.
    pub dtype: Dtype,
    /// Contexts per shard file.
    pub contexts_per_shard: usize,
    /// Mark rows above this multiple of the shard's median norm (`marks::OUTLIER`).
    pub outlier_factor: Option<f32>,
    /// Draw a progress bar with ETA on stderr.
    pub progress: bool,
    /// Set (by a SIGINT/SIGTERM handler) to stop after the forward pass in flight. Shards already
    /// listed stay; the contexts buffered for the next shard are recomputed on resume, so a resumed
    /// store is byte-identical to an uninterrupted one. The returned manifest is then not `complete`.
    pub stop: Option<Arc<AtomicBool>>,
    /// The processes of an `mpirun` sharing this harvest (none, or one rank: this process harvests
    /// every context). Each rank harvests a deterministic share of the shards and rank 0 joins them,
    /// so the store is the one a single process writes.
    pub ranks: Option<Arc<dyn Ranks>>,
}

impl Default for HarvestOptions {
    fn default() -> Self {
        HarvestOptions {
            hooks: vec![HookPoint::ResidPost(15)],
            tokens: 1_000_000,
            split: "train".into(),
            first_context: 0,
            batch: 8,
            dtype: Dtype::Bf16,
            contexts_per_shard: 256,
            outlier_factor: Some(10.0),
            progress: true,
            stop: None,
            ranks: None,
        }
    }
}

/// Separator and BOS for `tokenize` as the model's tokenizer defines them: documents are joined with
/// end-of-text (falling back to EOS); BOS starts a context only when the tokenizer adds one.
pub fn tokenize_options_for(model: &Model) -> TokenizeOptions {
    let tok = model.tokenizer();
    TokenizeOptions {
        separator: tok.end_of_text_id().unwrap_or_else(|| tok.eos_token_id()),
        bos: if tok.add_bos() { tok.bos_token_id() } else { None },
        tokenizer_fingerprint: tokenizer_fingerprint(model),
        ..Default::default()
    }
}

/// Fingerprint of the model's tokenizer: every token's text, in id order, and the special ids.
/// Two tokenizers with one fingerprint turn text into the same ids.
pub fn tokenizer_fingerprint(model: &Model) -> String {
    let tok = model.tokenizer();
    let n = tok.vocab_size() as u32;
    let mut bytes = Vec::with_capacity(n as usize * 8);
    for id in 0..n {
        let t = tok.token_text(id);
        bytes.extend_from_slice(&(t.len() as u32).to_le_bytes());
        bytes.extend_from_slice(t.as_bytes());
    }
    let specials = format!("bos {:?} eos {} eot {:?}", tok.bos_token_id(), tok.eos_token_id(), tok.end_of_text_id());
    format!("vocab{n}-{}", saekit_files::fingerprint_bytes([bytes.as_slice(), specials.as_bytes()]))
}

/// Refuse a hook point a store cannot hold: stores keep `d_model`-wide rows, and the MLP's hidden points
/// (`mlp.hook_pre`, `mlp.hook_post`) are `d_mlp` wide.
pub(crate) fn check_store_hook(model: &Model, h: HookPoint) -> Result<()> {
    h.check(model.config().n_layers).map_err(|e| Fault::BadInput.mark(e))?;
    let (d, d_mlp) = (model.config().d_model, model.config().d_ff);
    ensure_input!(
        h.width(d, d_mlp) == d,
        "{h} is {d_mlp} wide (d_mlp); activation stores and live rows hold d_model ({d}) wide rows"
    );
    Ok(())
}

/// Tokens made by one tokenizer are meaningless to a model with another: refuse them, naming both.
/// Datasets from before the fingerprint was recorded pass with a warning.
pub fn check_tokenizer(model: &Model, model_label: &str, data: &TokenDataset) -> StoreResult<()> {
    let recorded = &data.manifest().options.tokenizer_fingerprint;
    let ours = tokenizer_fingerprint(model);
    if recorded.is_empty() {
        tracing::warn!(
            "{}: the dataset records no tokenizer fingerprint (made by an older saekit); cannot check it matches {}",
            data.dir().display(),
            model_label
        );
        return Ok(());
    }
    ensure_input!(
        *recorded == ours,
        "{}: tokens made by tokenizer {recorded} ({}), but model {} has tokenizer {ours}; tokenize again with this model",
        data.dir().display(),
        data.manifest().tokenizer,
        model_label
    );
    Ok(())
}

/// The tokens whose rows are marked as sinks besides position 0: (BOS, end-of-text tokens). BOS is the
/// one the dataset put at the start of each context, and none when the tokenizer adds none: a chat
/// model's nominal BOS (`<|im_start|>` in SmolLM2) opens every turn, and most of its rows are ordinary
/// (measured in `tests/harvest.rs`); the rows that are sinks are found by their norm
/// (`HarvestOptions::outlier_factor`). End-of-text covers the dataset's separator, `<|endoftext|>` and EOS.
pub fn sink_tokens(model: &Model, data: &TokenDataset) -> (Option<u32>, Vec<u32>) {
    let tok = model.tokenizer();
    let m = &data.manifest().options;
    let mut eot = vec![m.separator];
    for t in [tok.end_of_text_id(), Some(tok.eos_token_id())].into_iter().flatten() {
        if !eot.contains(&t) {
            eot.push(t);
        }
    }
    (m.bos, eot)
}

/// Harvest into `out` (created, or resumed when it already holds the same harvest). With
/// [`HarvestOptions::ranks`] of several processes, each harvests its share of the shards and rank 0
/// joins them into the one store ([`crate::parts`]).
pub fn harvest(
    model: &Model,
    model_path: &Path,
    data: &TokenDataset,
    out: &Path,
    opts: &HarvestOptions,
) -> StoreResult<StoreManifest> {
    let (config, n_ctx) = plan(model, model_path, data, opts)?;
    let split = data.split(&opts.split)?;
    let context = |c: u64| split.context(opts.first_context + c);
    match opts.ranks.as_deref().filter(|r| r.size() > 1) {
        None => {
            let w = ActivationWriter::create_or_resume(out, config)?;
            harvest_contexts(model, w, &(0..n_ctx).collect::<Vec<_>>(), &context, opts, out)
        }
        Some(ranks) => parts::harvest_share(out, &config, n_ctx, ranks, |part, share| {
            let w = ActivationWriter::create_or_resume(part, config.clone())?;
            harvest_contexts(model, w, share, &context, opts, part)
        }),
    }
}

/// Check the options against the model and data: the store's configuration and how many contexts
/// it will hold.
fn plan(
    model: &Model,
    model_path: &Path,
    data: &TokenDataset,
    opts: &HarvestOptions,
) -> StoreResult<(StoreConfig, u64)> {
    let cfg = model.config();
    ensure_input!(!opts.hooks.is_empty(), "no hook points given");
    ensure_input!(opts.batch > 0, "batch must be > 0");
    for h in &opts.hooks {
        check_store_hook(model, *h)?;
    }
    let split = data.split(&opts.split)?;
    let ctx = split.context_len();
    let avail = split.n_contexts().saturating_sub(opts.first_context);
    let want = opts.tokens.div_ceil(ctx as u64);
    ensure_input!(
        avail > 0,
        "split {:?} of {} has no contexts from {}",
        opts.split,
        data.dir().display(),
        opts.first_context
    );
    if want > avail {
        tracing::warn!(
            "asked for {} tokens, the {:?} split has {} from context {}: harvesting {} tokens",
            opts.tokens,
            opts.split,
            avail * ctx as u64,
            opts.first_context,
            avail * ctx as u64
        );
    }
    check_tokenizer(model, &model_path.display().to_string(), data)?;
    let (bos_token, eot) = sink_tokens(model, data);
    let config = StoreConfig {
        model: ModelInfo {
            name: cfg.name.clone(),
            path: model_path.display().to_string(),
            n_layers: cfg.n_layers,
            d_model: cfg.d_model,
            vocab_size: cfg.vocab_size,
            precision: model.precision().name().into(),
        },
        hooks: opts.hooks.iter().map(|h| h.to_string()).collect(),
        d_model: cfg.d_model,
        dtype: opts.dtype,
        context: ctx,
        contexts_per_shard: opts.contexts_per_shard,
        bos_token,
        eot_tokens: eot,
        outlier_factor: opts.outlier_factor,
        source: SourceInfo {
            tokens: data.dir().canonicalize().unwrap_or_else(|_| data.dir().to_path_buf()).display().to_string(),
            split: opts.split.clone(),
            first_context: opts.first_context,
            fingerprint: data.fingerprint().to_string(),
        },
        tokenizer_fingerprint: tokenizer_fingerprint(model),
    };
    Ok((config, want.min(avail)))
}

/// Run the model over `contexts` (indices into the split, from `first_context`) and push them to `w`,
/// resuming after the ones it already holds; `out` names the store in messages.
fn harvest_contexts<'a>(
    model: &Model,
    mut w: ActivationWriter,
    contexts: &[u64],
    context: &dyn Fn(u64) -> &'a [u32],
    opts: &HarvestOptions,
    out: &Path,
) -> StoreResult<StoreManifest> {
    let n_ctx = contexts.len() as u64;
    let ctx = w.manifest().config.context;
    let start = w.contexts_done();
    if start >= n_ctx {
        tracing::info!("{} already holds {} contexts; nothing to do", out.display(), start);
        return w.finish();
    }
    if start > 0 {
        tracing::info!("resuming {} at context {start} of {n_ctx}", out.display());
    }
    let pb = progress_bar(opts.progress, n_ctx * ctx as u64);
    pb.set_position(start * ctx as u64);
    pb.reset_eta();
    let t0 = Instant::now();
    let mut toks: Vec<u32> = Vec::with_capacity(opts.batch * ctx);
    let mut c = start;
    let mut fwd_s = 0.0;
    while c < n_ctx {
        let b = (opts.batch as u64).min(n_ctx - c) as usize;
        toks.clear();
        for &i in &contexts[c as usize..c as usize + b] {
            toks.extend_from_slice(context(i));
        }
        let tf = Instant::now();
        let cache = model
            .run_with_cache(&toks, b, &opts.hooks)
            .with_context(|| format!("forward pass on contexts {c}..{}", c + b as u64))?;
        fwd_s += tf.elapsed().as_secs_f64();
        let acts: Vec<&[f32]> = opts
            .hooks
            .iter()
            .map(|h| cache.get(h).with_context(|| format!("the model did not return hook {h}")))
            .collect::<Result<_>>()?;
        w.push(&toks, &acts)?;
        c += b as u64;
        pb.set_position(c * ctx as u64);
        if c < n_ctx && opts.stop.as_ref().is_some_and(|f| f.load(Ordering::SeqCst)) {
            pb.finish_and_clear();
            tracing::info!("interrupted at context {c}: {} contexts are on disk", w.contexts_done());
            return Ok(w.manifest().clone());
        }
    }
    pb.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    let done = (n_ctx - start) * ctx as u64;
    w.set_extra(
        "last_run",
        serde_json::json!({
            "tokens": done,
            "seconds": secs,
            "tokens_per_s": done as f64 / secs,
            "forward_seconds": fwd_s,
            "batch": opts.batch,
            "threads": rayon::current_num_threads(),
        }),
    );
    let m = w.finish()?;
    tracing::info!("harvested {done} tokens in {secs:.1} s ({:.0} tokens/s)", done as f64 / secs);
    Ok(m)
}

fn progress_bar(show: bool, tokens: u64) -> indicatif::ProgressBar {
    let pb = if show { indicatif::ProgressBar::new(tokens) } else { indicatif::ProgressBar::hidden() };
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} harvest [{elapsed_precise}] [{wide_bar}] {human_pos}/{human_len} tokens {per_sec} ETA {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    pb
}
