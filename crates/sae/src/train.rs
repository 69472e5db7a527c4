//! The training driver: data preparation (outlier exclusion, scaling, b_dec init), the step loop,
//! metrics.jsonl, checkpoints with bit-identical resume, and the SAELens output folder.
//!
//! `train` = plan (validate the config once) → start or resume → [`Run::steps`] → save.

use crate::checkpoint::{self, CheckpointMeta, DataAt, ReplicaPosition, TrainState};
use crate::config::{BDecInit, ConfigFile, TrainConfig};
use crate::format::{self, atomic_write};
use crate::kernels;
use crate::layout;
use crate::plan::{ArchSettings, TrainPlan};
use crate::sae::Sae;
use crate::source::{ActivationSource, Provenance};
use crate::step::{self, AdamState, Collective, Prof, SingleProcess, StepStats, Traffic, Workspace};
use crate::SaeError;
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// How a run is driven (not part of the recipe).
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Continue from the newest checkpoint in `<out>/checkpoints`.
    pub resume: bool,
    /// Show an indicatif progress bar.
    pub progress: bool,
    /// Stop (as if killed) after this many steps in this process, right after any checkpoint due
    /// at that step; used by the resume tests.
    pub stop_after_steps: Option<u64>,
    /// A fresh run into a non-empty output folder clears saekit's files there (otherwise it refuses).
    pub force: bool,
    /// Set (by a SIGINT/SIGTERM handler) to stop after the batch in flight with a checkpoint written.
    pub stop: Option<Arc<AtomicBool>>,
    /// How the caller opened `src` ([`ConfigFile::source`]): kept with every checkpoint and in
    /// `train_config.toml`, never read by the trainer.
    pub source_config: toml::Table,
    /// The processes this run is spread over (`mpirun`): `None` trains in this process alone.
    pub collective: Option<Arc<dyn Collective>>,
}

/// What a finished (or interrupted) run reports.
#[derive(Debug, Clone, Serialize)]
pub struct TrainOutcome {
    /// The output folder.
    pub out_dir: PathBuf,
    /// Steps done (over every process that worked on this run).
    pub steps: u64,
    /// Tokens trained on (idem).
    pub tokens: u64,
    /// Rows excluded as outliers.
    pub excluded_rows: u64,
    /// The scalar the rows were multiplied by (folded into the saved weights).
    pub input_scale: f32,
    /// The scalar a transcoder's targets were multiplied by (folded into the saved weights); an
    /// SAE's targets are its inputs, so it equals `input_scale` there.
    pub output_scale: f32,
    /// Raw norm above which rows were excluded.
    pub max_norm: f32,
    /// The last step's loss terms.
    pub last: StepStats,
    /// Steady-state tokens/s of this process (excludes preparation and the final save).
    pub tokens_per_s: f64,
    /// Tokens trained by this process (less than `tokens` after a resume).
    pub tokens_this_run: u64,
    /// The run stopped before its last step (a checkpoint holds it).
    pub interrupted: bool,
    /// Fraction of latents dead at the end.
    pub dead_frac: f64,
}

/// Train an SAE on `src` following `cfg`; writes `<out>` (SAELens folder, metrics.jsonl,
/// checkpoints/). Runs inside a rayon pool of `cfg.threads` threads (0 = the current pool).
pub fn train(cfg: &TrainConfig, src: &mut dyn ActivationSource, opts: &RunOptions) -> Result<TrainOutcome, SaeError> {
    if cfg.threads == 0 {
        // the caller's pool (the CLI's global --threads)
        return train_in_pool(cfg, src, opts);
    }
    let pool =
        rayon::ThreadPoolBuilder::new().num_threads(cfg.threads).build().context("building the rayon thread pool")?;
    pool.install(|| train_in_pool(cfg, src, opts))
}

fn train_in_pool(
    cfg: &TrainConfig,
    src: &mut dyn ActivationSource,
    opts: &RunOptions,
) -> Result<TrainOutcome, SaeError> {
    let out = PathBuf::from(&cfg.out);
    let single: Arc<dyn Collective> = Arc::new(SingleProcess);
    let comm = opts.collective.as_ref().unwrap_or(&single).as_ref();
    let root = comm.rank() == 0;
    if !opts.resume && root {
        prepare_fresh_output(&out, cfg.acts.as_deref().map(Path::new), opts.force)?;
    }
    comm.any(false); // the others wait until rank 0 has cleared (or refused) the folder
    std::fs::create_dir_all(&out).with_context(|| format!("creating output folder {}", out.display()))?;
    let prov = src.provenance()?;
    let requested = cfg.clone().with_provenance(&prov);
    let own_share = reads_own_share(src, comm)?;
    let (plan, mut st) = if opts.resume {
        resume(&out, &requested, (src, own_share), &prov, comm)?
    } else {
        start(&out, requested, (src, own_share), comm)?
    };
    layout::check(&plan, comm)?;
    let c = &plan.config;
    tracing::info!(
        "training {} SAE {} -> {} on {}; {} steps of {}; encoder GEMM in {}{}",
        c.arch.name(),
        plan.d_in,
        c.d_sae,
        src.describe(),
        plan.total_steps(),
        c.batch_size,
        plan.precision.name(),
        plan.precision.bf16_path().map(|p| format!(" ({})", p.name())).unwrap_or_default()
    );
    let mut run = Run::new(&plan, &out, opts.progress && root, st.step, (comm, own_share))?;
    let (last, steps_this_run, interrupted) = run.steps(&mut st, src, opts, &prov.data_fingerprint)?;
    let tokens_per_s = run.tokens_per_s(st.step, steps_this_run);
    let mpi = run.mpi_meter(st.step);
    let dead_frac = dead_fraction(&st, c, comm);
    drop(run); // release the [batch, d_sae] buffers before writing the output
    if !interrupted {
        // rank 0 writes the output (the others would read rows for nothing: a forward pass when live)
        let first = if root { first_rows(src, &st.data_start, &plan)? } else { None };
        on_whole_state(&mut st, comm, |whole, peaks| {
            let mut mpi = mpi;
            if let (Some(m), Some(p)) = (&mut mpi, peaks) {
                m["peak_rss_bytes_per_rank"] = serde_json::json!(p);
            }
            let done = Finished { last: &last, tokens_per_s, dead_frac, first_rows: first, mpi };
            save_output(&out, whole, &plan, &opts.source_config, done)
        })?;
    }
    Ok(TrainOutcome {
        out_dir: out,
        steps: st.step,
        tokens: st.tokens,
        excluded_rows: st.excluded_rows,
        input_scale: st.input_scale,
        output_scale: st.output_scale,
        max_norm: st.max_norm,
        last,
        tokens_per_s,
        tokens_this_run: steps_this_run * c.batch_size as u64,
        interrupted,
        dead_frac,
    })
}

/// Run `write` on rank 0 with the whole trained SAE and its firing counts: this process's own
/// state when it holds every latent (no copy), else gathered from the shards (every process takes
/// part; the Adam moments are freed, not gathered: the run is over). Under MPI `write` also gets
/// every rank's peak resident memory (bytes, in rank order) after the gather.
fn on_whole_state(
    st: &mut TrainState,
    comm: &dyn Collective,
    write: impl FnOnce(&mut TrainState, Option<Vec<u64>>) -> Result<(), SaeError>,
) -> Result<(), SaeError> {
    let whole = (comm.shards() > 1).then(|| layout::gather_output(st, comm));
    let peaks = comm.traffic().map(|_| {
        let mine = crate::bench::peak_rss_bytes().unwrap_or(0).to_le_bytes();
        comm.gather_all(&mine).chunks_exact(8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8]))).collect()
    });
    if comm.rank() != 0 {
        return Ok(());
    }
    match whole.flatten() {
        Some(mut whole) => write(&mut whole, peaks),
        None => write(st, peaks),
    }
}

/// Whether each replica reads its own share of the data (`src` serves this process's replica of
/// `comm`'s); refused when the source was opened for another replica.
fn reads_own_share(src: &dyn ActivationSource, comm: &dyn Collective) -> Result<bool, SaeError> {
    match src.replica_share() {
        None => Ok(false),
        Some((r, n)) if (r, n) == (comm.replica(), comm.replicas()) => Ok(n > 1),
        Some((r, n)) => Err(SaeError::BadInput(format!(
            "{}: opened for data replica {r} of {n}, but this process is replica {} of {}",
            src.describe(),
            comm.replica(),
            comm.replicas()
        ))),
    }
}

/// Fraction of the SAE's latents dead now (over every shard).
fn dead_fraction(st: &TrainState, c: &TrainConfig, comm: &dyn Collective) -> f64 {
    let mut dead = [st.since_fired.iter().filter(|&&s| s >= c.dead_tokens).count() as f64];
    comm.shard_sum_f64(&mut dead);
    dead[0] / c.d_sae as f64
}

/// A fresh run: plan the config, read ahead to prepare the data, initialise this process's
/// latents of the SAE (all of them in one process), bit for bit the slice of the one-process
/// init, without making the others (at 1M latents the whole SAE with its Adam state is 14 GB).
/// `own_share`: each replica reads its own share of the data, and takes rank 0's preparation.
fn start(
    out: &Path,
    cfg: TrainConfig,
    (src, own_share): (&mut dyn ActivationSource, bool),
    comm: &dyn Collective,
) -> Result<(TrainPlan, TrainState), SaeError> {
    let (root, latents) = (comm.rank() == 0, comm.latent_slice(cfg.d_sae));
    let data_start = src.cursor();
    let cfg = with_rank0_precision(cfg, comm)?;
    let plan = TrainPlan::new(cfg, src.d_in(), src.d_out(), crate::config::memory_budget())?;
    plan.warn_short_run_lr();
    let c = &plan.config;
    let d_out = src.d_out();
    let prep = if own_share {
        prepare_on_rank0(c, src, (plan.d_in, d_out), comm)?
    } else {
        prepare(c, src, plan.d_in, d_out)?
    };
    let (act, norm) = (plan.activation(), plan.schedule.decoder_init_norm);
    let mut sae = if plan.is_transcoder() {
        Sae::init_transcoder_latents(plan.d_in, plan.d_out, latents, act, norm, c.seed, c.skip)
    } else {
        Sae::init_latents(plan.d_in, latents, act, norm, c.seed)
    };
    sae.params.b_dec = prep.b_dec;
    if let ArchSettings::JumpRelu(s) = plan.arch {
        sae.params.threshold.fill(s.init_threshold);
    }
    sae.metadata = plan.metadata();
    let opt = AdamState::zeros(&sae);
    let n = sae.d_sae;
    if root {
        std::fs::remove_file(out.join("metrics.jsonl")).ok();
    }
    let st = TrainState {
        sae,
        opt,
        since_fired: vec![0; n],
        fire_count: vec![0; n],
        window_fire: vec![0; n],
        window_tokens: 0,
        step: 0,
        tokens: 0,
        excluded_rows: 0,
        input_scale: prep.input_scale,
        output_scale: prep.output_scale,
        max_norm: prep.max_norm,
        max_norm_out: prep.max_norm_out,
        batchtopk_threshold: 0.0,
        data_start,
    };
    Ok((plan, st))
}

/// `cfg` with rank 0's precision resolved on rank 0 (its `--precision` turned into `f32`, `bf16` or
/// `bf16-reference`), on every process: `auto` measures on each CPU and may come out differently on
/// two ranks (an AVX512-BF16 CPU without AMX, busy or not), and shards and replicas that multiply
/// in different precisions would train no one-process SAE. Unset stays unset (f32).
fn with_rank0_precision(mut cfg: TrainConfig, comm: &dyn Collective) -> Result<TrainConfig, SaeError> {
    if comm.shards() * comm.replicas() == 1 {
        return Ok(cfg);
    }
    let sent = from_rank0(comm, || match &cfg.precision {
        Some(_) => TrainPlan::resolve_precision(&cfg).map(|p| p.choice_name().as_bytes().to_vec()),
        None => Ok(Vec::new()),
    })?;
    let root = String::from_utf8(sent).context("the precision from rank 0 arrived garbled")?;
    if cfg.precision.as_deref() != Some(root.as_str()) && comm.rank() != 0 {
        tracing::info!("precision {:?} asked here; every rank trains in rank 0's {root:?}", cfg.precision);
    }
    cfg.precision = (!root.is_empty()).then_some(root);
    Ok(cfg)
}

/// Continue the run in `out` from its newest checkpoint, which must match the requested config and
/// data; this process gets its own latents of it (all of them in one process).
fn resume(
    out: &Path,
    requested: &TrainConfig,
    (src, own_share): (&mut dyn ActivationSource, bool),
    prov: &Provenance,
    comm: &dyn Collective,
) -> Result<(TrainPlan, TrainState), SaeError> {
    let all = checkpoint::list(out)?;
    let last = all.last().ok_or_else(|| {
        SaeError::BadInput(format!("--resume: no checkpoint in {}", checkpoint::folder(out).display()))
    })?;
    let meta = checkpoint::read_meta(last)?;
    let d = src.d_in();
    if meta.d_in != d || meta.d_out != src.d_out() {
        let width = |o: Option<usize>| o.map_or(String::new(), |o| format!(" -> d_out {o}"));
        return Err(SaeError::BadInput(format!(
            "--resume: checkpoint has d_in {}{} but the activations have d_in {d}{}",
            meta.d_in,
            width(meta.d_out),
            width(src.d_out())
        )));
    }
    check_resume_matches(last, &meta, requested, prov)?;
    let ReplicaPosition { cursor, data_start } = data_position(last, &meta, own_share, comm)?;
    let mut cfg = meta.config.clone();
    // the destination may have been moved; everything else comes from the checkpoint
    cfg.out = requested.out.clone();
    // the checkpoint names a resolved precision, but one written before `auto` was recorded resolved
    // still says `auto`
    let plan = TrainPlan::new(with_rank0_precision(cfg, comm)?, d, src.d_out(), None)?;
    // this process's latents only (a sharded checkpoint's other files are not read)
    let mut st = checkpoint::read(last, &meta, &plan, comm.latent_slice(plan.config.d_sae))?;
    st.data_start = data_start;
    // the run's first position (where its final FVU is measured) is read back at the end: check it now
    if !st.data_start.is_null() {
        src.seek(&st.data_start).with_context(|| {
            format!("--resume: the run's first data position recorded in {}/state.json", last.display())
        })?;
    }
    src.seek(&cursor)
        .with_context(|| format!("--resume: restoring the data position recorded in {}/state.json", last.display()))?;
    if comm.rank() == 0 {
        rewrite_metrics_upto(&out.join("metrics.jsonl"), meta.step)?;
    }
    tracing::info!("resuming from {} (step {})", last.display(), meta.step);
    Ok((plan, st))
}

/// Where this process's data continues: the checkpoint's position, or, when each replica reads its
/// own share, its replica's. Such a checkpoint resumes with as many replicas (each continues its own
/// stream; one process cannot replay several), and a checkpoint of one stream with one replica.
fn data_position(
    ckpt: &Path,
    meta: &CheckpointMeta,
    own_share: bool,
    comm: &dyn Collective,
) -> Result<ReplicaPosition, SaeError> {
    let (had, now) = (meta.replicas.len(), if own_share { comm.replicas() } else { 0 });
    if had != now {
        let layout = |n: usize| match n {
            0 => "one stream of rows read by every replica".to_string(),
            n => format!("{n} data replicas that each forward their own contexts"),
        };
        let how = match had {
            0 => "in one process, or under mpirun with --shards equal to the ranks".to_string(),
            n => format!("under mpirun with {n} replicas (ranks = {n} x --shards)"),
        };
        return Err(SaeError::BadInput(format!(
            "--resume: {} was trained by {}, this run has {}; resume it {how}",
            ckpt.display(),
            layout(had),
            layout(now)
        )));
    }
    Ok(match meta.replicas.get(comm.replica()) {
        Some(mine) if own_share => mine.clone(),
        _ => ReplicaPosition { cursor: meta.cursor.clone(), data_start: meta.data_start.clone() },
    })
}

/// What the read-ahead fixes before the first step.
struct Prepared {
    /// Rows with a larger raw norm are excluded.
    max_norm: f32,
    /// Rows whose target has a larger raw norm are excluded (infinite for an SAE).
    max_norm_out: f32,
    input_scale: f32,
    /// A transcoder's target scale (`input_scale` for an SAE).
    output_scale: f32,
    b_dec: Vec<f32>,
}

impl Prepared {
    /// Every value as little-endian f32 bytes, b_dec last (what rank 0 sends the other replicas).
    fn to_bytes(&self) -> Vec<u8> {
        let head = [self.max_norm, self.max_norm_out, self.input_scale, self.output_scale];
        head.iter().chain(&self.b_dec).flat_map(|v| v.to_le_bytes()).collect()
    }

    fn from_bytes(bytes: &[u8]) -> Option<Prepared> {
        let v: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let (head, b_dec) = (v.get(..4)?, v.get(4..)?);
        let [max_norm, max_norm_out, input_scale, output_scale] = head.try_into().ok()?;
        Some(Prepared { max_norm, max_norm_out, input_scale, output_scale, b_dec: b_dec.to_vec() })
    }
}

/// [`prepare`] when each replica reads its own share of the data: rank 0 prepares on its first rows
/// and every process takes its values, so that the replicas train one model with one scale, one
/// outlier threshold and one b_dec (OpenAI's sparse_autoencoder broadcasts its data-dependent init
/// from rank 0 likewise; a mean over the replicas would not extend to the median norm or the
/// geometric median). The others read nothing ahead. Every process calls it.
fn prepare_on_rank0(
    cfg: &TrainConfig,
    src: &mut dyn ActivationSource,
    (d, d_out): (usize, Option<usize>),
    comm: &dyn Collective,
) -> Result<Prepared> {
    let sent = from_rank0(comm, || prepare(cfg, src, d, d_out).map(|p| p.to_bytes()))?;
    let prep = Prepared::from_bytes(&sent);
    prep.filter(|p| p.b_dec.len() == d_out.unwrap_or(d)).context("the preparation from rank 0 arrived cut short")
}

/// The bytes `make` gives on rank 0, on every process (the others send nothing, so the gather is
/// rank 0's bytes alone). A failure of `make` ends the job (the caller's abort) while the others wait
/// in the gather.
fn from_rank0<E>(comm: &dyn Collective, make: impl FnOnce() -> Result<Vec<u8>, E>) -> Result<Vec<u8>, E> {
    let mine = if comm.rank() == 0 { make()? } else { Vec::new() };
    Ok(comm.gather_all(&mine))
}

/// Read the first rows of the source (then seek back) to fix the outlier thresholds, the input
/// (and target) scale and the b_dec init. `d_out` is the targets' width for a pair source.
fn prepare(cfg: &TrainConfig, src: &mut dyn ActivationSource, d: usize, d_out: Option<usize>) -> Result<Prepared> {
    let (mut x, mut y) = read_ahead(cfg, src, d, d_out)?;
    let got = x.len() / d;
    let med = crate::metrics::median_norm(&x, d);
    let threshold =
        |med: f32| if cfg.outlier_norm_factor > 0.0 { cfg.outlier_norm_factor * med } else { f32::INFINITY };
    let max_norm = threshold(med);
    let (max_norm_out, dropped) = match d_out {
        None => (f32::INFINITY, crate::metrics::drop_outliers(&mut x, d, max_norm)),
        Some(o) => {
            let m = threshold(crate::metrics::median_norm(&y, o));
            (m, drop_pair_outliers((&mut x, d, max_norm), (&mut y, o, m)))
        }
    };
    let input_scale = scale_to_unit_norm(cfg, &mut x, d);
    let (target, dt, output_scale) = match d_out {
        None => (&x, d, input_scale),
        Some(o) => {
            let s = scale_to_unit_norm(cfg, &mut y, o);
            (&y, o, s)
        }
    };
    let rows = target.len() / dt;
    let b_dec = match cfg.b_dec_init {
        BDecInit::Mean => {
            let mut m = vec![0.0f32; dt];
            kernels::column_sum(target, dt, &mut m);
            m.iter().map(|v| v / rows as f32).collect()
        }
        BDecInit::GeometricMedian => geometric_median(&target[..rows.min(8192) * dt], dt, 30),
        BDecInit::Zeros => vec![0.0; dt],
    };
    tracing::info!(
        "prepared on {got} rows: median norm {med:.3}, excluding rows with norm > {max_norm:.3} ({dropped} of the first {got}), input scale {input_scale:.5}"
    );
    if d_out.is_some() {
        tracing::info!("targets: excluding rows with target norm > {max_norm_out:.3}, target scale {output_scale:.5}");
    }
    Ok(Prepared { max_norm, max_norm_out, input_scale, output_scale, b_dec })
}

/// The first `prepare_rows` rows (and a pair source's targets, else an empty vector), the source
/// left where it was; non-finite values refused.
fn read_ahead(
    cfg: &TrainConfig,
    src: &mut dyn ActivationSource,
    d: usize,
    d_out: Option<usize>,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let start = src.cursor();
    let n = cfg.prepare_rows();
    let mut x = vec![0.0f32; n * d];
    let mut y = vec![0.0f32; n * d_out.unwrap_or(0)];
    let got = if d_out.is_some() { src.next_pairs(&mut x, &mut y)? } else { src.next_batch(&mut x)? };
    x.truncate(got * d);
    y.truncate(got * d_out.unwrap_or(0));
    src.seek(&start)?;
    if got == 0 {
        bail!("the activation source is empty");
    }
    for (what, m, w) in [("input", &x, d), ("target", &y, d_out.unwrap_or(1))] {
        if let Some(p) = m.iter().position(|v| !v.is_finite()) {
            bail!("non-finite value in the {what} activations (row {} of the first {} rows read)", p / w, got);
        }
    }
    Ok((x, y))
}

/// Drop the pairs whose input or target norm exceeds its threshold, from both; returns how many.
fn drop_pair_outliers((x, d, max_x): (&mut Vec<f32>, usize, f32), (y, o, max_y): (&mut Vec<f32>, usize, f32)) -> usize {
    let rows = x.len() / d;
    let mut w = 0usize;
    for r in 0..rows {
        let (xr, yr) = (&x[r * d..(r + 1) * d], &y[r * o..(r + 1) * o]);
        if kernels::dot(xr, xr).sqrt() <= max_x && kernels::dot(yr, yr).sqrt() <= max_y {
            x.copy_within(r * d..(r + 1) * d, w * d);
            y.copy_within(r * o..(r + 1) * o, w * o);
            w += 1;
        }
    }
    x.truncate(w * d);
    y.truncate(w * o);
    rows - w
}

/// The scalar that makes E‖row‖² = d over `m`'s rows (1 without `normalize_inputs`), applied to `m`.
fn scale_to_unit_norm(cfg: &TrainConfig, m: &mut [f32], d: usize) -> f32 {
    let rows = m.len() / d;
    let mean_sq = kernels::row_reduce(rows, |r| kernels::dot(&m[r * d..(r + 1) * d], &m[r * d..(r + 1) * d]) as f64)
        / rows.max(1) as f64;
    let scale = if cfg.normalize_inputs && mean_sq > 0.0 { (d as f64 / mean_sq).sqrt() as f32 } else { 1.0 };
    for v in m.iter_mut() {
        *v *= scale;
    }
    scale
}

/// The step loop's companions: the batch and step buffers, metrics.jsonl, the progress bar, timers.
struct Run<'a> {
    plan: &'a TrainPlan,
    out: &'a Path,
    comm: &'a dyn Collective,
    /// Each replica reads its own share of the data: only its rows of a batch, its own position.
    own_share: bool,
    /// `[batch, d_in]` inputs.
    batch: Vec<f32>,
    /// `[batch, d_out]` a transcoder's targets; empty for an SAE, whose targets are `batch` itself.
    target: Vec<f32>,
    ws: Workspace,
    metrics_path: PathBuf,
    /// Open on rank 0 only: one process writes the run's files.
    metrics: Option<std::fs::File>,
    progress: Option<indicatif::ProgressBar>,
    started: Instant,
    window_started: Instant,
    window_steps: u64,
    /// (time, step) after this process's second step: throughput excludes preparation and warm-up.
    steady_from: Option<(Instant, u64)>,
    /// The exchanges with the other processes up to `steady_from` (`None` in one process).
    steady_traffic: Option<Traffic>,
}

impl<'a> Run<'a> {
    fn new(
        plan: &'a TrainPlan,
        out: &'a Path,
        progress: bool,
        step: u64,
        (comm, own_share): (&'a dyn Collective, bool),
    ) -> Result<Run<'a>, SaeError> {
        let b = plan.config.batch_size;
        let metrics_path = out.join("metrics.jsonl");
        let open = || std::fs::OpenOptions::new().create(true).append(true).open(&metrics_path);
        let metrics = if comm.rank() == 0 {
            Some(open().with_context(|| format!("opening {}", metrics_path.display()))?)
        } else {
            None
        };
        let progress = progress.then(|| progress_bar(plan.total_steps() * b as u64, step * b as u64));
        Ok(Run {
            plan,
            out,
            comm,
            own_share,
            batch: vec![0.0f32; b * plan.d_in],
            target: vec![0.0f32; if plan.is_transcoder() { b * plan.d_out } else { 0 }],
            ws: Workspace::default(),
            metrics_path,
            metrics,
            progress,
            started: Instant::now(),
            window_started: Instant::now(),
            window_steps: 0,
            steady_from: None,
            steady_traffic: None,
        })
    }

    /// Train until the last step, a stop request or `stop_after_steps`; returns the last step's
    /// stats, the steps this process did, and whether it stopped early (a checkpoint holds the state).
    fn steps(
        &mut self,
        st: &mut TrainState,
        src: &mut dyn ActivationSource,
        opts: &RunOptions,
        data_fingerprint: &str,
    ) -> Result<(StepStats, u64, bool), SaeError> {
        let (plan, total) = (self.plan, self.plan.total_steps());
        let mut last = StepStats::default();
        let mut steps_this_run = 0u64;
        let mut interrupted = false;
        while st.step < total && !interrupted {
            last = self.step(st, src)?;
            steps_this_run += 1;
            if steps_this_run == 2 {
                self.steady_from = Some((Instant::now(), st.step));
                self.steady_traffic = self.comm.traffic();
            }
            self.log(st, &last)?;
            let is_last = st.step == total;
            let due =
                plan.config.checkpoint_every > 0 && st.step.is_multiple_of(plan.config.checkpoint_every) && !is_last;
            // every process stops at the same step, whichever saw the signal
            let stop = !is_last && self.comm.any(opts.stop.as_ref().is_some_and(|f| f.load(Ordering::SeqCst)));
            if due || stop {
                self.checkpoint(st, src.cursor(), data_fingerprint, &opts.source_config)?;
            }
            if stop {
                // Ctrl-C / SIGTERM: the batch in flight is done and kept in the checkpoint
                tracing::info!("interrupted: checkpoint at step {} written", st.step);
            }
            interrupted = stop || (opts.stop_after_steps == Some(steps_this_run) && !is_last);
        }
        if let Some(pb) = &self.progress {
            pb.finish_and_clear();
        }
        Ok((last, steps_this_run, interrupted))
    }

    /// One checkpoint: by rank 0 alone when it holds every latent, else one slice per shard; with
    /// every replica's position when each reads its own share.
    fn checkpoint(
        &self,
        st: &TrainState,
        cursor: serde_json::Value,
        data_fingerprint: &str,
        source: &toml::Table,
    ) -> Result<(), SaeError> {
        let cfg = &ConfigFile { train: self.plan.config.clone(), source: source.clone() };
        let replicas = if self.own_share {
            let mine = ReplicaPosition { cursor: cursor.clone(), data_start: st.data_start.clone() };
            layout::replica_positions(&mine, self.comm)?
        } else {
            Vec::new()
        };
        let data = DataAt { cursor, replicas, fingerprint: data_fingerprint };
        if self.comm.shards() > 1 {
            return checkpoint::write_sharded(self.out, st, cfg, data, self.comm);
        }
        if self.comm.rank() == 0 {
            checkpoint::write(self.out, st, cfg, data)?;
        }
        Ok(())
    }

    /// One step: read a batch, forward and backward, update, count firings.
    fn step(&mut self, st: &mut TrainState, src: &mut dyn ActivationSource) -> Result<StepStats, SaeError> {
        let (plan, step) = (self.plan, st.step);
        let (b, d, o) = (plan.config.batch_size, plan.d_in, plan.d_out);
        let mut prof = Prof::new();
        // every process reads the whole batch (the same rows in the same order) and trains on its
        // replica's share of it: disjoint, deterministic, and together the one-process batch; or,
        // when each replica reads its own share of the data, it reads just its rows
        let rows = self.comm.replica_rows(b);
        let (read, mine) = if self.own_share { (rows.len(), 0..rows.len()) } else { (b, rows.clone()) };
        let input = Rows { m: &mut self.batch[..read * d], d, max_norm: st.max_norm, scale: st.input_scale };
        let target = (!self.target.is_empty()).then(|| Rows {
            m: &mut self.target[..read * o],
            d: o,
            max_norm: st.max_norm_out,
            scale: st.output_scale,
        });
        let mut excluded = [fill_batch(src, input, target, step)? as f64];
        if self.own_share {
            self.comm.sum_f64(&mut excluded); // each replica excluded rows of its own
        }
        st.excluded_rows = st.excluded_rows.saturating_add(excluded[0] as u64);
        prof.mark("read batch");
        let mut lp = plan.loss_at(step);
        let latents = self.comm.latent_slice(plan.config.d_sae);
        lp.latent_offset = latents.start;
        let x = &self.batch[mine.start * d..mine.end * d];
        let y = if self.target.is_empty() { x } else { &self.target[mine.start * o..mine.end * o] };
        let mut stats = step::forward_backward(&st.sae, &mut self.ws, x, y, &st.since_fired, &lp, self.comm)?;
        prof.mark("forward + backward");
        if step == 0 {
            if let Some(dir) = std::env::var_os("SAEKIT_DEBUG_DUMP_STEP") {
                layout::dump_step(Path::new(&dir), &self.ws, st, plan.config.arch, latents, rows, self.comm)?;
            }
        }
        if !stats.loss.is_finite() {
            return Err(SaeError::BadInput(format!(
                "step {step}: loss is {} (fvu {}, auxk {}); stopping. The last good checkpoint is kept in {}",
                stats.loss,
                stats.fvu,
                stats.auxk_loss,
                checkpoint::folder(self.out).display()
            )));
        }
        let up = plan
            .update_at(step, (step + 1).is_multiple_of(plan.config.log_every.max(1)) || step + 1 == plan.total_steps());
        stats.grad_norm = step::apply_update(&mut st.sae, &mut st.opt, &mut self.ws, &up, self.comm);
        prof.mark("update");
        if stats.grad_norm.is_infinite() || (stats.grad_norm.is_nan() && (up.grad_clip > 0.0 || up.need_norm)) {
            return Err(SaeError::BadInput(format!(
                "step {step}: gradient norm is {}; stopping. The last good checkpoint is kept in {}",
                stats.grad_norm,
                checkpoint::folder(self.out).display()
            )));
        }
        if let ArchSettings::BatchTopK(s) = plan.arch {
            st.batchtopk_threshold =
                batchtopk_threshold_update(st.batchtopk_threshold, self.ws.batch_min_selected, s.threshold_lr);
        }
        count_firings(st, &self.ws.fires, b as u64);
        prof.mark("count firings");
        prof.print("train step");
        st.step += 1;
        st.tokens += b as u64;
        self.window_steps += 1;
        if let Some(pb) = &self.progress {
            pb.set_position(st.step * b as u64);
            pb.set_message(format!("fvu {:.4} L0 {:.1}", stats.fvu, stats.l0));
        }
        Ok(stats)
    }

    /// Every `log_every` steps (and at the last), one line of metrics.jsonl.
    fn log(&mut self, st: &mut TrainState, stats: &StepStats) -> Result<(), SaeError> {
        let c = &self.plan.config;
        if !st.step.is_multiple_of(c.log_every.max(1)) && st.step != self.plan.total_steps() {
            return Ok(());
        }
        let dt = self.window_started.elapsed().as_secs_f64();
        let dead = dead_fraction(st, c, self.comm);
        let mut dense = [st.window_fire.iter().filter(|&&n| n as f64 > 0.1 * st.window_tokens as f64).count() as f64];
        self.comm.shard_sum_f64(&mut dense);
        let dense = dense[0] / c.d_sae as f64;
        let line = serde_json::json!({
            "step": st.step, "tokens": st.tokens, "loss": stats.loss, "fvu": stats.fvu, "mse": stats.mse,
            "auxk_loss": stats.auxk_loss, "multi_topk_fvu": stats.multi_topk_fvu, "sparsity_loss": stats.sparsity_loss, "pre_act_loss": stats.pre_act_loss,
            "l0": stats.l0, "dead_pct": 100.0 * dead, "dense_pct": 100.0 * dense, "lr": self.plan.schedule.lr_at(st.step - 1),
            "grad_norm": stats.grad_norm, "excluded_rows": st.excluded_rows,
            "tokens_per_s": (self.window_steps * c.batch_size as u64) as f64 / dt.max(1e-9),
        });
        if let Some(metrics) = &mut self.metrics {
            writeln!(metrics, "{line}").with_context(|| format!("writing {}", self.metrics_path.display()))?;
            metrics.flush().ok();
        }
        tracing::debug!("{line}");
        self.window_started = Instant::now();
        self.window_steps = 0;
        st.window_fire.iter_mut().for_each(|n| *n = 0);
        st.window_tokens = 0;
        Ok(())
    }

    /// Steady-state tokens/s of this process: from the end of its second step when it did more.
    fn tokens_per_s(&self, step: u64, steps_this_run: u64) -> f64 {
        let b = self.plan.config.batch_size as u64;
        match self.steady_from {
            Some((t0, s0)) if step > s0 => ((step - s0) * b) as f64 / t0.elapsed().as_secs_f64(),
            _ => (steps_this_run * b) as f64 / self.started.elapsed().as_secs_f64().max(1e-9),
        }
    }
}

impl Run<'_> {
    /// Under MPI, what the steady steps (those `tokens_per_s` counts) spent exchanging, as this
    /// process saw it: seconds inside MPI calls and their share of the wall time, payload bytes
    /// handed to MPI and calls per step. `None` in one process, or with fewer than three steps.
    fn mpi_meter(&self, step: u64) -> Option<serde_json::Value> {
        let ((t0, s0), before, now) = (self.steady_from?, self.steady_traffic?, self.comm.traffic()?);
        let steps = step.checked_sub(s0).filter(|&n| n > 0)? as f64;
        let wall = t0.elapsed().as_secs_f64();
        let seconds = now.seconds - before.seconds;
        Some(serde_json::json!({
            "rank": self.comm.rank(), "shards": self.comm.shards(), "replicas": self.comm.replicas(),
            "steps": steps, "wall_seconds": wall, "seconds_in_calls": seconds,
            "share_of_wall": seconds / wall.max(1e-9),
            "bytes_sent_per_step": (now.bytes_sent - before.bytes_sent) as f64 / steps,
            "calls_per_step": (now.calls - before.calls) as f64 / steps,
        }))
    }
}

fn progress_bar(len: u64, pos: u64) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(len);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} tok ({per_sec}, ETA {eta}) {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    pb.set_position(pos);
    pb
}

/// Dead-latent bookkeeping after a step whose firings per latent are `fires`, over `rows` rows.
fn count_firings(st: &mut TrainState, fires: &[u32], rows: u64) {
    for (j, &f) in fires[..st.sae.d_sae].iter().enumerate() {
        if f > 0 {
            st.since_fired[j] = 0;
            st.fire_count[j] += f as u64;
            st.window_fire[j] += f as u64;
        } else {
            st.since_fired[j] = st.since_fired[j].saturating_add(rows);
        }
    }
    st.window_tokens += rows;
}

/// SAELens BatchTopK: an EMA of the smallest selected activation, used as the inference threshold.
fn batchtopk_threshold_update(threshold: f32, min_selected: f32, lr: f32) -> f32 {
    if min_selected > 0.0 {
        (1.0 - lr) * threshold + lr * min_selected
    } else {
        threshold
    }
}

/// Rows the final evaluation reads: the first ones of the run's data, at most this many.
const FINAL_EVAL_ROWS: usize = 8192;

/// The first `min(prepare_rows, FINAL_EVAL_ROWS)` raw rows of the run's data (inputs and a pair
/// source's targets, no outlier excluded), read from `start` with the source then left where it
/// was; `None` when the start is unknown (a run resumed from an older checkpoint).
fn first_rows(
    src: &mut dyn ActivationSource,
    start: &serde_json::Value,
    plan: &TrainPlan,
) -> Result<Option<(Vec<f32>, Vec<f32>)>> {
    if start.is_null() {
        return Ok(None);
    }
    let (d, o) = (plan.d_in, plan.d_out);
    let n = plan.config.prepare_rows().min(FINAL_EVAL_ROWS);
    let now = src.cursor();
    src.seek(start)?;
    let mut x = vec![0.0f32; n * d];
    let mut y = vec![0.0f32; if plan.is_transcoder() { n * o } else { 0 }];
    let got = if plan.is_transcoder() { src.next_pairs(&mut x, &mut y)? } else { src.next_batch(&mut x)? };
    src.seek(&now)?;
    x.truncate(got * d);
    if !y.is_empty() {
        y.truncate(got * o);
    }
    Ok(Some((x, y)))
}

/// What the step loop hands to the output: the last step's stats and the run's throughput, dead
/// fraction and first rows (for the final evaluation).
struct Finished<'a> {
    last: &'a StepStats,
    tokens_per_s: f64,
    dead_frac: f64,
    first_rows: Option<(Vec<f32>, Vec<f32>)>,
    /// Under MPI: the exchanges' cost ([`Run::mpi_meter`]) and each rank's peak memory.
    mpi: Option<serde_json::Value>,
}

/// FVU of the saved (raw-space) SAE or transcoder on raw rows `x` with targets `y` (`x` itself when
/// empty): Σ‖y − ŷ‖² / Σ‖y − mean‖², in f64.
fn final_fvu(sae: &Sae, x: &[f32], y: &[f32]) -> f64 {
    let y = if y.is_empty() { x } else { y };
    let o = sae.d_out();
    let yhat = sae.forward(x);
    let rows = y.len() / o;
    let mut mean = vec![0.0f64; o];
    for r in 0..rows {
        for i in 0..o {
            mean[i] += y[r * o + i] as f64 / rows as f64;
        }
    }
    let (mut err, mut var) = (0.0f64, 0.0f64);
    for q in 0..rows * o {
        err += (y[q] as f64 - yhat[q] as f64).powi(2);
        var += (y[q] as f64 - mean[q % o]).powi(2);
    }
    err / var.max(1e-30)
}

/// Write the SAELens folder: the SAE in raw activation space (input scale folded in, BatchTopK's
/// threshold broadcast), the firing densities, the config and a summary.
fn save_output(
    out: &Path,
    st: &mut TrainState,
    plan: &TrainPlan,
    source_config: &toml::Table,
    done: Finished,
) -> Result<(), SaeError> {
    let Finished { last, tokens_per_s, dead_frac, first_rows, mpi } = done;
    // training is over: fold the scale in place (a clone would double the peak memory at 1M latents)
    if let ArchSettings::BatchTopK(_) = plan.arch {
        st.sae.params.threshold = vec![st.batchtopk_threshold; st.sae.d_sae];
    }
    st.sae.fold_scales(st.input_scale, st.output_scale);
    st.sae.metadata = plan.metadata();
    st.sae.metadata.input_scale = Some(st.input_scale);
    if plan.is_transcoder() {
        st.sae.metadata.output_scale = Some(st.output_scale);
    }
    let freq: Vec<f32> =
        st.fire_count.iter().map(|&c| ((c as f64 / st.tokens.max(1) as f64) + 1e-10).log10() as f32).collect();
    let hist = density_histogram(&freq);
    tracing::info!("log10 feature density histogram (bucket lower edge: count): {hist:?}");
    // the saved weights on the run's first rows, raw: what a reader of the folder gets
    let first = first_rows.map(|(x, y)| {
        let fvu = final_fvu(&st.sae, &x, &y);
        tracing::info!("final FVU on the first {} rows of the data: {fvu:.4}", x.len() / st.sae.d_in);
        serde_json::json!({"rows": x.len() / st.sae.d_in, "fvu": fvu})
    });
    let mut summary = serde_json::json!({
        "steps": st.step, "tokens": st.tokens, "excluded_rows": st.excluded_rows, "input_scale": st.input_scale,
        "outlier_max_norm_raw": st.max_norm, "tokens_per_s": tokens_per_s, "last": last,
        "dead_frac": dead_frac, "log10_density_histogram": hist, "resolved": plan.schedule,
        "final_on_first_rows": first,
        "precision": plan.precision.name(),
        "bf16_path": plan.precision.bf16_path().map(|p| p.name()),
    });
    if let Some(mpi) = mpi {
        summary["mpi"] = mpi;
    }
    if plan.is_transcoder() {
        summary["output_scale"] = serde_json::json!(st.output_scale);
        summary["outlier_max_norm_out_raw"] = serde_json::json!(st.max_norm_out);
    }
    let summary = serde_json::to_string_pretty(&summary).context("rendering training_summary.json")?;
    let toml = ConfigFile { train: plan.config.clone(), source: source_config.clone() }.to_toml();
    let extra: [(&str, &[u8]); 2] =
        [("train_config.toml", toml.as_bytes()), ("training_summary.json", summary.as_bytes())];
    format::save_saelens_set(out, &st.sae, Some(&freq), None, &extra)?;
    Ok(())
}

/// Geometric median by Weiszfeld iterations (OpenAI's pre-bias init).
fn geometric_median(x: &[f32], d: usize, iters: usize) -> Vec<f32> {
    let n = x.len() / d;
    let mut m = vec![0.0f64; d];
    for r in 0..n {
        for i in 0..d {
            m[i] += x[r * d + i] as f64 / n as f64;
        }
    }
    for _ in 0..iters {
        let mut num = vec![0.0f64; d];
        let mut den = 0.0f64;
        for r in 0..n {
            let row = &x[r * d..(r + 1) * d];
            let dist = row.iter().zip(&m).map(|(&a, &b)| (a as f64 - b).powi(2)).sum::<f64>().sqrt().max(1e-8);
            for i in 0..d {
                num[i] += row[i] as f64 / dist;
            }
            den += 1.0 / dist;
        }
        for i in 0..d {
            m[i] = num[i] / den;
        }
    }
    m.iter().map(|&v| v as f32).collect()
}

/// Names a training run writes in its output folder; `--force` clears these and nothing else.
fn is_training_output(name: &str) -> bool {
    const NAMES: [&str; 8] = [
        "checkpoints",
        "metrics.jsonl",
        "train_config.toml",
        "training_summary.json",
        format::CFG,
        format::SAE_WEIGHTS,
        format::SPARSITY,
        format::FILE_LIST,
    ];
    NAMES.contains(&name) || saekit_files::is_temp_name(name)
}

/// A fresh run needs an empty output folder: a previous run's checkpoints would be resumed, its
/// files mixed with the new ones. `force` clears saekit's files; anything else there is refused. The run's
/// own data file may lie inside it (`saekit.train(array, out)` writes the array there): it is kept.
fn prepare_fresh_output(out: &Path, data: Option<&Path>, force: bool) -> Result<()> {
    let data_name = data.and_then(|d| data_file_inside(out, d));
    let is_data = |name: &str| data_name.as_deref() == Some(name);
    let names = saekit_files::entry_names(out)?;
    if names.iter().all(|n| is_data(n)) {
        return Ok(());
    }
    if !force {
        bail!(
            "{}: the output folder is not empty (an earlier run?); pass --force to clear it, --resume {} to continue it, or choose another --out",
            out.display(),
            out.display()
        );
    }
    saekit_files::ensure_only_owned(out, "SAE training output", |n| is_data(n) || is_training_output(n))?;
    for name in names.iter().filter(|n| !is_data(n)) {
        let p = out.join(name);
        let res = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
        res.with_context(|| format!("--force: cannot remove {}", p.display()))?;
    }
    tracing::info!("--force: cleared {}", out.display());
    Ok(())
}

/// The name of `data` when it is a file directly inside `out`.
fn data_file_inside(out: &Path, data: &Path) -> Option<String> {
    let parent = std::fs::canonicalize(data.parent()?).ok()?;
    (std::fs::canonicalize(out).ok()? == parent).then(|| data.file_name()?.to_str().map(str::to_owned)).flatten()
}

/// One side of a batch being filled: `m` holds `[rows, d]`; rows with a raw norm above `max_norm`
/// are excluded, the rest multiplied by `scale`.
struct Rows<'a> {
    m: &'a mut [f32],
    d: usize,
    max_norm: f32,
    scale: f32,
}

/// Fill `input` (and a pair source's `target`, row for row) with whole batches, skipping the rows
/// whose input or target is an outlier, scaled; errors on non-finite values. Returns the rows excluded.
fn fill_batch(src: &mut dyn ActivationSource, input: Rows, mut target: Option<Rows>, step: u64) -> Result<u64> {
    let (batch, d) = (input.m, input.d);
    let rows = batch.len() / d;
    let mut filled = 0usize;
    let mut excluded = 0u64;
    let mut empty_reads = 0;
    while filled < rows {
        let got = match &mut target {
            None => src.next_batch(&mut batch[filled * d..])?,
            Some(t) => src.next_pairs(&mut batch[filled * d..], &mut t.m[filled * t.d..])?,
        };
        if got == 0 {
            empty_reads += 1;
            if empty_reads > 2 {
                bail!("step {step}: the activation source ran out of rows");
            }
            continue;
        }
        let norms = row_norms(&batch[filled * d..(filled + got) * d], d);
        let target_norms = target.as_ref().map(|t| row_norms(&t.m[filled * t.d..(filled + got) * t.d], t.d));
        let mut w = filled;
        for r in filled..filled + got {
            let nn = finite_norm(norms[r - filled], &batch[r * d..], ("input", r, step), src)?;
            let target_ok = match (&target, &target_norms) {
                (Some(t), Some(tn)) => {
                    finite_norm(tn[r - filled], &t.m[r * t.d..], ("target", r, step), src)? <= t.max_norm
                }
                _ => true,
            };
            if nn > input.max_norm || !target_ok {
                excluded += 1;
                continue;
            }
            if w != r {
                batch.copy_within(r * d..(r + 1) * d, w * d);
                if let Some(t) = &mut target {
                    t.m.copy_within(r * t.d..(r + 1) * t.d, w * t.d);
                }
            }
            w += 1;
        }
        filled = w;
    }
    for (m, scale) in std::iter::once((batch, input.scale)).chain(target.map(|t| (t.m, t.scale))) {
        if scale != 1.0 {
            m.par_chunks_mut(1 << 14).for_each(|c| c.iter_mut().for_each(|v| *v *= scale));
        }
    }
    Ok(excluded)
}

/// Each row's L2 norm, or the column of its first non-finite value; in parallel.
fn row_norms(rows: &[f32], d: usize) -> Vec<Result<f32, usize>> {
    rows.par_chunks(d)
        .map(|row| match row.iter().position(|v| !v.is_finite()) {
            Some(i) => Err(i),
            None => Ok(kernels::dot(row, row).sqrt()),
        })
        .collect()
}

/// A row's norm from [`row_norms`], or the error naming its first non-finite value (`row` starts at
/// the row; `at` is the hook's role, the row in the batch and the step).
fn finite_norm(
    norm: Result<f32, usize>,
    row: &[f32],
    at: (&str, usize, u64),
    src: &dyn ActivationSource,
) -> Result<f32> {
    let (what, r, step) = at;
    norm.or_else(|i| {
        bail!(
            "step {step}: non-finite {what} activation ({} at row {r} of the batch, column {i}); source position {}",
            row[i],
            src.cursor()
        )
    })
}

fn rewrite_metrics_upto(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                .is_some_and(|s| s <= step)
        })
        .collect();
    let mut s = kept.join("\n");
    if !s.is_empty() {
        s.push('\n');
    }
    atomic_write(path, s.as_bytes())
}

/// A resume continues one run: the checkpoint's configuration and data must be the requested ones.
fn check_resume_matches(ckpt: &Path, meta: &CheckpointMeta, cfg: &TrainConfig, prov: &Provenance) -> Result<()> {
    let diff = cfg.differing_fields(&meta.config);
    if !diff.is_empty() {
        bail!(
            "--resume: {} was made with another configuration (requested vs checkpoint: {}); start a fresh run with --force or resume without changing flags",
            ckpt.display(),
            diff.join(", ")
        );
    }
    let (was, now) = (&meta.data_fingerprint, &prov.data_fingerprint);
    if !was.is_empty() && !now.is_empty() && was != now {
        bail!(
            "--resume: {} was trained on other data (fingerprint {was}); the data given now has fingerprint {now} (rebuilt or replaced?)",
            ckpt.display()
        );
    }
    Ok(())
}

/// Counts of latents per log10-density bucket [-10, -9), ..., [-1, 0].
pub fn density_histogram(log10: &[f32]) -> Vec<(i32, usize)> {
    let mut h = vec![0usize; 11];
    for &v in log10 {
        let b = (v.floor() as i32).clamp(-10, 0);
        h[(b + 10) as usize] += 1;
    }
    h.into_iter().enumerate().map(|(i, c)| (i as i32 - 10, c)).collect()
}
