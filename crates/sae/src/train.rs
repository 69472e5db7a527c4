//! The training driver: data preparation (outlier exclusion, scaling, b_dec init), the step loop,
//! metrics.jsonl, atomic checkpoints and bit-identical resume, and the SAELens output folder.

use crate::adam::AdamHyper;
use crate::config::{Arch, Resolved, TrainConfig};
use crate::format::{self, atomic_write};
use crate::kernels;
use crate::sae::{Activation, Sae, SaeMetadata};
use crate::source::{ActivationSource, Provenance};
use crate::step::{self, AdamState, LossParams, StepStats, UpdateParams, Workspace};
use anyhow::{bail, Context, Result};
use safetensors::tensor::SafeTensors;
use serde::{Deserialize, Serialize};
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
}

#[derive(Debug, Clone, Serialize)]
pub struct TrainOutcome {
    pub out_dir: PathBuf,
    pub steps: u64,
    pub tokens: u64,
    pub excluded_rows: u64,
    pub input_scale: f32,
    pub max_norm: f32,
    pub last: StepStats,
    /// steady-state tokens/s of this process (excludes preparation and the final save)
    pub tokens_per_s: f64,
    /// tokens trained by this process (less than `tokens` after a resume)
    pub tokens_this_run: u64,
    pub interrupted: bool,
    pub dead_frac: f64,
}

/// Everything that defines the run's future besides the data: saved in each checkpoint.
#[derive(Serialize, Deserialize, Clone)]
struct CheckpointMeta {
    step: u64,
    tokens: u64,
    excluded_rows: u64,
    input_scale: f32,
    max_norm: f32,
    cursor: serde_json::Value,
    config: TrainConfig,
    d_in: usize,
    batchtopk_threshold: f32,
    /// Content fingerprint of the training data (empty in checkpoints from before it was recorded).
    #[serde(default)]
    data_fingerprint: String,
    /// Size and CRC32 of `state.safetensors`, checked before a resume trusts it.
    #[serde(default)]
    state_bytes: u64,
    #[serde(default)]
    state_crc32: Option<u32>,
}

pub(crate) struct State {
    pub sae: Sae,
    pub opt: AdamState,
    pub since_fired: Vec<u64>,
    pub fire_count: Vec<u64>,
    pub window_fire: Vec<u64>,
    pub window_tokens: u64,
    pub step: u64,
    pub tokens: u64,
    pub excluded_rows: u64,
    pub input_scale: f32,
    pub max_norm: f32,
    pub batchtopk_threshold: f32,
}

fn activation_for(cfg: &TrainConfig) -> Activation {
    match cfg.arch {
        Arch::TopK => Activation::TopK { k: cfg.k },
        Arch::BatchTopK | Arch::JumpRelu => Activation::JumpRelu,
        Arch::Relu => Activation::Relu,
    }
}

fn metadata_for(cfg: &TrainConfig) -> SaeMetadata {
    SaeMetadata {
        model_name: cfg.model_name.clone(),
        hook_name: cfg.hook_name.clone(),
        context_size: cfg.context_size,
        prepend_bos: cfg.prepend_bos,
        dataset_path: if cfg.dataset_path.is_empty() {
            cfg.acts.clone().unwrap_or_default()
        } else {
            cfg.dataset_path.clone()
        },
        tokenizer_fingerprint: cfg.tokenizer_fingerprint.clone(),
        sink_rule: cfg.sink_rule.clone(),
        input_scale: None,
    }
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

/// Read the first rows of the source (then seek back) to fix the outlier threshold, the input
/// scale and the b_dec init.
fn prepare(cfg: &TrainConfig, src: &mut dyn ActivationSource, d: usize) -> Result<(f32, f32, Vec<f32>, usize)> {
    let start = src.cursor();
    let n = cfg.prepare_rows();
    let mut x = vec![0.0f32; n * d];
    let got = src.next_batch(&mut x)?;
    x.truncate(got * d);
    src.seek(&start)?;
    if got == 0 {
        bail!("the activation source is empty");
    }
    if let Some(p) = x.iter().position(|v| !v.is_finite()) {
        bail!("non-finite value in the input activations (row {} of the first {} rows read)", p / d, got);
    }
    let med = crate::metrics::median_norm(&x, d);
    let max_norm = if cfg.outlier_norm_factor > 0.0 { cfg.outlier_norm_factor * med } else { f32::INFINITY };
    let dropped = crate::metrics::drop_outliers(&mut x, d, max_norm);
    let rows = x.len() / d;
    let mean_sq = kernels::row_reduce(rows, |r| kernels::dot(&x[r * d..(r + 1) * d], &x[r * d..(r + 1) * d]) as f64)
        / rows.max(1) as f64;
    let scale = if cfg.normalize_inputs && mean_sq > 0.0 { (d as f64 / mean_sq).sqrt() as f32 } else { 1.0 };
    for v in x.iter_mut() {
        *v *= scale;
    }
    let b_dec = match cfg.b_dec_init.as_str() {
        "mean" => {
            let mut m = vec![0.0f32; d];
            kernels::column_sum(&x, d, &mut m);
            m.iter().map(|v| v / rows as f32).collect()
        }
        "geometric_median" => {
            let take = rows.min(8192);
            geometric_median(&x[..take * d], d, 30)
        }
        "zeros" => vec![0.0; d],
        other => bail!("b_dec_init {other:?}: expected mean, geometric_median or zeros"),
    };
    tracing::info!(
        "prepared on {got} rows: median norm {med:.3}, excluding rows with norm > {max_norm:.3} ({dropped} of the first {got}), input scale {scale:.5}"
    );
    Ok((max_norm, scale, b_dec, dropped))
}

fn ckpt_dir(out: &Path) -> PathBuf {
    out.join("checkpoints")
}

fn write_checkpoint(
    out: &Path,
    st: &State,
    cfg: &TrainConfig,
    cursor: serde_json::Value,
    data_fingerprint: &str,
) -> Result<()> {
    let root = ckpt_dir(out);
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let name = format!("step_{:09}", st.step);
    let tmp = root.join(format!("{name}.tmp"));
    let fin = root.join(&name);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).ok();
    }
    std::fs::create_dir_all(&tmp)?;
    let (s, o) = (&st.sae, &st.opt);
    let (d, n) = (s.d_in, s.d_sae);
    use crate::format::TensorSrc::{F32, U64};
    let wt = [st.window_tokens];
    let tensors: Vec<(&str, Vec<usize>, crate::format::TensorSrc<'_>)> = vec![
        ("w_enc", vec![n, d], F32(&s.w_enc)),
        ("b_enc", vec![n], F32(&s.b_enc)),
        ("w_dec", vec![n, d], F32(&s.w_dec)),
        ("b_dec", vec![d], F32(&s.b_dec)),
        ("threshold", vec![s.threshold.len()], F32(&s.threshold)),
        ("m_enc", vec![n, d], F32(&o.m_enc)),
        ("v_enc", vec![n, d], F32(&o.v_enc)),
        ("m_dec", vec![n, d], F32(&o.m_dec)),
        ("v_dec", vec![n, d], F32(&o.v_dec)),
        ("m_benc", vec![n], F32(&o.m_benc)),
        ("v_benc", vec![n], F32(&o.v_benc)),
        ("m_bdec", vec![d], F32(&o.m_bdec)),
        ("v_bdec", vec![d], F32(&o.v_bdec)),
        ("m_thr", vec![o.m_thr.len()], F32(&o.m_thr)),
        ("v_thr", vec![o.v_thr.len()], F32(&o.v_thr)),
        ("since_fired", vec![n], U64(&st.since_fired)),
        ("fire_count", vec![n], U64(&st.fire_count)),
        ("window_fire", vec![n], U64(&st.window_fire)),
        ("window_tokens", vec![1], U64(&wt)),
    ];
    crate::format::write_safetensors(&tmp.join("state.safetensors"), &tensors)?;
    let (state_bytes, crc) = saekit_files::file_crc32(&tmp.join("state.safetensors"))?;
    let meta = CheckpointMeta {
        step: st.step,
        tokens: st.tokens,
        excluded_rows: st.excluded_rows,
        input_scale: st.input_scale,
        max_norm: st.max_norm,
        cursor,
        config: cfg.clone(),
        d_in: d,
        batchtopk_threshold: st.batchtopk_threshold,
        data_fingerprint: data_fingerprint.to_string(),
        state_bytes,
        state_crc32: Some(crc),
    };
    atomic_write(&tmp.join("state.json"), serde_json::to_string_pretty(&meta)?.as_bytes())?;
    if fin.exists() {
        std::fs::remove_dir_all(&fin).with_context(|| format!("removing the stale {}", fin.display()))?;
    }
    saekit_files::persist_path(&tmp, &fin)?;
    // keep the last two
    let mut all = list_checkpoints(out)?;
    while all.len() > 2 {
        let old = all.remove(0);
        std::fs::remove_dir_all(&old).with_context(|| format!("removing old checkpoint {}", old.display()))?;
    }
    Ok(())
}

/// Completed checkpoints, oldest first (by step number, whatever the width of the name).
pub fn list_checkpoints(out: &Path) -> Result<Vec<PathBuf>> {
    let root = ckpt_dir(out);
    let mut v: Vec<(u64, PathBuf)> = Vec::new();
    if let Ok(rd) = std::fs::read_dir(&root) {
        for e in rd.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().to_string();
            let step = name.strip_prefix("step_").and_then(|n| n.parse::<u64>().ok());
            if let Some(step) = step.filter(|_| p.is_dir() && p.join("state.json").is_file()) {
                v.push((step, p));
            }
        }
    }
    v.sort();
    Ok(v.into_iter().map(|(_, p)| p).collect())
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

/// A step and token count the run could have reached: within its budget, a whole number of batches.
/// (state.json is not under the checksum, and a wild count would overflow the training loop.)
fn check_progress(meta: &CheckpointMeta, dir: &Path) -> Result<()> {
    let cfg = &meta.config;
    let reachable = meta.tokens <= cfg.tokens && meta.step.checked_mul(cfg.batch_size as u64) == Some(meta.tokens);
    if !reachable {
        bail!(
            "{}/state.json: step {} and {} tokens do not fit a run of {} tokens in batches of {}: the checkpoint is corrupt",
            dir.display(),
            meta.step,
            meta.tokens,
            cfg.tokens,
            cfg.batch_size
        );
    }
    Ok(())
}

fn read_checkpoint(dir: &Path) -> Result<(CheckpointMeta, State)> {
    let meta: CheckpointMeta = serde_json::from_str(
        &std::fs::read_to_string(dir.join("state.json"))
            .with_context(|| format!("reading {}/state.json", dir.display()))?,
    )
    .with_context(|| format!("parsing {}/state.json", dir.display()))?;
    check_progress(&meta, dir)?;
    let p = dir.join("state.safetensors");
    match meta.state_crc32 {
        Some(want) => {
            let (bytes, crc) = saekit_files::file_crc32(&p)?;
            if bytes != meta.state_bytes || crc != want {
                bail!(
                    "{}: {bytes} bytes, crc32 {crc:08x}, but state.json records {} bytes, crc32 {want:08x}: the checkpoint is corrupt",
                    p.display(),
                    meta.state_bytes
                );
            }
        }
        None => tracing::warn!("{}: a checkpoint without a checksum (older saekit); not verified", dir.display()),
    }
    let bytes = crate::format::map_file(&p)?;
    let st = SafeTensors::deserialize(&bytes).with_context(|| format!("parsing {}", p.display()))?;
    let f = |name: &str| -> Result<Vec<f32>> {
        let t = st.tensor(name).with_context(|| format!("{}: missing {name}", p.display()))?;
        Ok(t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    };
    let u = |name: &str| -> Result<Vec<u64>> {
        let t = st.tensor(name).with_context(|| format!("{}: missing {name}", p.display()))?;
        Ok(t.data().chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect())
    };
    let cfg = &meta.config;
    let d = meta.d_in;
    let w_enc = f("w_enc")?;
    let n = w_enc.len() / d.max(1);
    let sae = Sae {
        d_in: d,
        d_sae: n,
        activation: activation_for(cfg),
        w_enc,
        b_enc: f("b_enc")?,
        w_dec: f("w_dec")?,
        b_dec: f("b_dec")?,
        threshold: f("threshold")?,
        apply_b_dec_to_input: true,
        metadata: metadata_for(cfg),
    };
    let opt = AdamState {
        m_enc: f("m_enc")?,
        v_enc: f("v_enc")?,
        m_dec: f("m_dec")?,
        v_dec: f("v_dec")?,
        m_benc: f("m_benc")?,
        v_benc: f("v_benc")?,
        m_bdec: f("m_bdec")?,
        v_bdec: f("v_bdec")?,
        m_thr: f("m_thr")?,
        v_thr: f("v_thr")?,
    };
    let state = State {
        sae,
        opt,
        since_fired: u("since_fired")?,
        fire_count: u("fire_count")?,
        window_fire: u("window_fire")?,
        window_tokens: u("window_tokens")?.first().copied().unwrap_or(0),
        step: meta.step,
        tokens: meta.tokens,
        excluded_rows: meta.excluded_rows,
        input_scale: meta.input_scale,
        max_norm: meta.max_norm,
        batchtopk_threshold: meta.batchtopk_threshold,
    };
    Ok((meta, state))
}

/// Fill `batch` with `rows` rows, skipping outliers, scaled; errors on non-finite input.
fn fill_batch(
    src: &mut dyn ActivationSource,
    batch: &mut [f32],
    d: usize,
    max_norm: f32,
    scale: f32,
    step: u64,
) -> Result<u64> {
    let rows = batch.len() / d;
    let mut filled = 0usize;
    let mut excluded = 0u64;
    let mut empty_reads = 0;
    while filled < rows {
        let got = src.next_batch(&mut batch[filled * d..])?;
        if got == 0 {
            empty_reads += 1;
            if empty_reads > 2 {
                bail!("step {step}: the activation source ran out of rows");
            }
            continue;
        }
        let mut w = filled;
        for r in filled..filled + got {
            let row = &batch[r * d..(r + 1) * d];
            if let Some(i) = row.iter().position(|v| !v.is_finite()) {
                bail!("step {step}: non-finite input activation ({} at row {} of the batch, column {i}); source position {}", row[i], r, src.cursor());
            }
            let nn = kernels::dot(row, row).sqrt();
            if nn > max_norm {
                excluded += 1;
                continue;
            }
            if w != r {
                batch.copy_within(r * d..(r + 1) * d, w * d);
            }
            w += 1;
        }
        filled = w;
    }
    if scale != 1.0 {
        for v in batch.iter_mut() {
            *v *= scale;
        }
    }
    Ok(excluded)
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

/// Train an SAE on `src` following `cfg`; writes `<out>` (SAELens folder, metrics.jsonl,
/// checkpoints/). Runs inside a rayon pool of `cfg.threads` threads (0 = the current pool).
pub fn train(cfg: &TrainConfig, src: &mut dyn ActivationSource, opts: &RunOptions) -> Result<TrainOutcome> {
    if cfg.threads == 0 {
        // the caller's pool (the CLI's global --threads)
        return train_in_pool(cfg, src, opts);
    }
    let pool =
        rayon::ThreadPoolBuilder::new().num_threads(cfg.threads).build().context("building the rayon thread pool")?;
    pool.install(|| train_in_pool(cfg, src, opts))
}

fn train_in_pool(cfg_in: &TrainConfig, src: &mut dyn ActivationSource, opts: &RunOptions) -> Result<TrainOutcome> {
    let out = PathBuf::from(&cfg_in.out);
    if !opts.resume {
        prepare_fresh_output(&out, cfg_in.acts.as_deref().map(Path::new), opts.force)?;
    }
    std::fs::create_dir_all(&out).with_context(|| format!("creating output folder {}", out.display()))?;
    let d = src.d_in();
    let metrics_path = out.join("metrics.jsonl");
    let prov = src.provenance()?;
    let cfg_in = &cfg_in.clone().with_provenance(&prov);
    let (cfg, mut st) = if opts.resume {
        let all = list_checkpoints(&out)?;
        let last = all.last().with_context(|| format!("--resume: no checkpoint in {}", ckpt_dir(&out).display()))?;
        let (meta, st) = read_checkpoint(last)?;
        if meta.d_in != d {
            bail!("--resume: checkpoint has d_in {} but the activations have {d}", meta.d_in);
        }
        check_resume_matches(last, &meta, cfg_in, &prov)?;
        src.seek(&meta.cursor).with_context(|| {
            format!("--resume: restoring the data position recorded in {}/state.json", last.display())
        })?;
        rewrite_metrics_upto(&metrics_path, meta.step)?;
        tracing::info!("resuming from {} (step {})", last.display(), meta.step);
        let mut cfg = meta.config.clone();
        // the destination may have been moved; everything else comes from the checkpoint
        cfg.out = cfg_in.out.clone();
        (cfg, st)
    } else {
        if let Some(di) = cfg_in.d_in {
            if di != d {
                bail!("config d_in = {di} but the activations have {d} columns");
            }
        }
        if cfg_in.k == 0 && matches!(cfg_in.arch, Arch::TopK | Arch::BatchTopK) {
            bail!("k must be at least 1");
        }
        if cfg_in.d_sae == 0 || cfg_in.batch_size == 0 {
            bail!("d_sae and batch_size must be positive");
        }
        if cfg_in.d_sae > u32::MAX as usize - 1 {
            bail!("d_sae too large");
        }
        cfg_in.check_sizes(d, crate::config::memory_budget())?;
        if cfg_in.arch == Arch::JumpRelu
            && cfg_in.jumprelu_sparsity_loss_mode == crate::config::JumpReluSparsity::Quadratic
        {
            match cfg_in.target_l0 {
                Some(t) if t > 0.0 && t <= cfg_in.d_sae as f32 => {}
                Some(t) => {
                    bail!("target_l0 = {t}: the quadratic penalty needs 0 < target_l0 <= d_sae ({})", cfg_in.d_sae)
                }
                None => bail!("jumprelu_sparsity_loss_mode = \"quadratic\" needs target_l0 (the L0 to aim for)"),
            }
        }
        if cfg_in.jumprelu_bandwidth.is_nan() || cfg_in.jumprelu_bandwidth <= 0.0 {
            bail!("jumprelu_bandwidth must be > 0 (got {})", cfg_in.jumprelu_bandwidth);
        }
        let r = cfg_in.resolved();
        if cfg_in.lr.is_none() && matches!(cfg_in.arch, Arch::Relu | Arch::JumpRelu) && cfg_in.tokens < 100_000_000 {
            // measured in BENCHMARKS.md: at these rates L0 stays above a quarter of d_sae for 1M tokens
            tracing::warn!(
                "{} uses its recipe lr {:e}, tuned for runs of billions of tokens; in {} tokens L0 will stay high. \
                 For short runs pass a larger --lr (1e-3 brings ReLU to L0 ~27 in 1M tokens at d_sae 4096)",
                cfg_in.arch.name(),
                r.lr,
                cfg_in.tokens
            );
        }
        let (max_norm, scale, b_dec, _) = prepare(cfg_in, src, d)?;
        let mut sae = Sae::init(d, cfg_in.d_sae, activation_for(cfg_in), r.decoder_init_norm, cfg_in.seed);
        sae.b_dec = b_dec;
        if cfg_in.arch == Arch::JumpRelu {
            sae.threshold.fill(cfg_in.jumprelu_init_threshold);
        }
        sae.metadata = metadata_for(cfg_in);
        let opt = AdamState::zeros(&sae);
        let n = cfg_in.d_sae;
        std::fs::remove_file(&metrics_path).ok();
        (
            cfg_in.clone(),
            State {
                sae,
                opt,
                since_fired: vec![0; n],
                fire_count: vec![0; n],
                window_fire: vec![0; n],
                window_tokens: 0,
                step: 0,
                tokens: 0,
                excluded_rows: 0,
                input_scale: scale,
                max_norm,
                batchtopk_threshold: 0.0,
            },
        )
    };
    let res: Resolved = cfg.resolved();
    let total = res.total_steps;
    if total == 0 {
        bail!("tokens ({}) < batch_size ({}): nothing to train", cfg.tokens, cfg.batch_size);
    }
    tracing::info!(
        "training {} SAE {} -> {} on {}; {} steps of {}",
        cfg.arch.name(),
        d,
        cfg.d_sae,
        src.describe(),
        total,
        cfg.batch_size
    );
    let b = cfg.batch_size;
    let mut batch = vec![0.0f32; b * d];
    let mut ws = Workspace::default();
    let mut metrics_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .with_context(|| format!("opening {}", metrics_path.display()))?;
    let pb = if opts.progress {
        let pb = indicatif::ProgressBar::new(total * b as u64);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} tok ({per_sec}, ETA {eta}) {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb.set_position(st.step * b as u64);
        Some(pb)
    } else {
        None
    };
    let t_run = Instant::now();
    let mut t_window = Instant::now();
    let mut window_steps = 0u64;
    let mut steady_start: Option<(Instant, u64)> = None;
    let mut last = StepStats::default();
    let mut steps_this_run = 0u64;
    let mut interrupted = false;
    while st.step < total {
        let step = st.step;
        let excl = fill_batch(src, &mut batch, d, st.max_norm, st.input_scale, step)?;
        st.excluded_rows = st.excluded_rows.saturating_add(excl);
        let lp = LossParams::from_config(&cfg, &res, step);
        let mut stats = step::forward_backward(&st.sae, &mut ws, &batch, &st.since_fired, &lp)?;
        if !stats.loss.is_finite() {
            bail!(
                "step {step}: loss is {} (fvu {}, auxk {}); stopping. The last good checkpoint is kept in {}",
                stats.loss,
                stats.fvu,
                stats.auxk_loss,
                ckpt_dir(&out).display()
            );
        }
        let up = UpdateParams {
            adam: AdamHyper {
                lr: res.lr_at(step),
                beta1: cfg.adam_beta1,
                beta2: cfg.adam_beta2,
                eps: cfg.adam_eps,
                t: step + 1,
            },
            grad_clip: res.grad_clip,
            unit_norm_decoder: res.unit_norm_decoder,
            need_norm: (step + 1) % cfg.log_every.max(1) == 0 || step + 1 == total,
        };
        stats.grad_norm = step::apply_update(&mut st.sae, &mut st.opt, &mut ws.grads, &up);
        if stats.grad_norm.is_infinite() || (stats.grad_norm.is_nan() && (res.grad_clip > 0.0 || up.need_norm)) {
            bail!(
                "step {step}: gradient norm is {}; stopping. The last good checkpoint is kept in {}",
                stats.grad_norm,
                ckpt_dir(&out).display()
            );
        }
        if cfg.arch == Arch::BatchTopK {
            st.batchtopk_threshold = stats_threshold_update(&ws, st.batchtopk_threshold, cfg.topk_threshold_lr, step);
        }
        // dead-latent bookkeeping
        for (j, &f) in ws.fires[..cfg.d_sae].iter().enumerate() {
            if f > 0 {
                st.since_fired[j] = 0;
                st.fire_count[j] += f as u64;
                st.window_fire[j] += f as u64;
            } else {
                st.since_fired[j] = st.since_fired[j].saturating_add(b as u64);
            }
        }
        st.window_tokens += b as u64;
        st.step += 1;
        st.tokens += b as u64;
        steps_this_run += 1;
        window_steps += 1;
        if steps_this_run == 2 {
            steady_start = Some((Instant::now(), st.step));
        }
        if let Some(pb) = &pb {
            pb.set_position(st.step * b as u64);
            pb.set_message(format!("fvu {:.4} L0 {:.1}", stats.fvu, stats.l0));
        }
        let is_last = st.step == total;
        if st.step % cfg.log_every.max(1) == 0 || is_last {
            let dt = t_window.elapsed().as_secs_f64();
            let dead = st.since_fired.iter().filter(|&&s| s >= cfg.dead_tokens).count() as f64 / cfg.d_sae as f64;
            let dense = st.window_fire.iter().filter(|&&c| c as f64 > 0.1 * st.window_tokens as f64).count() as f64
                / cfg.d_sae as f64;
            let line = serde_json::json!({
                "step": st.step, "tokens": st.tokens, "loss": stats.loss, "fvu": stats.fvu, "mse": stats.mse,
                "auxk_loss": stats.auxk_loss, "multi_topk_fvu": stats.multi_topk_fvu, "sparsity_loss": stats.sparsity_loss, "pre_act_loss": stats.pre_act_loss,
                "l0": stats.l0, "dead_pct": 100.0 * dead, "dense_pct": 100.0 * dense, "lr": up.adam.lr,
                "grad_norm": stats.grad_norm, "excluded_rows": st.excluded_rows,
                "tokens_per_s": (window_steps * b as u64) as f64 / dt.max(1e-9),
            });
            writeln!(metrics_file, "{line}").with_context(|| format!("writing {}", metrics_path.display()))?;
            metrics_file.flush().ok();
            tracing::debug!("{line}");
            t_window = Instant::now();
            window_steps = 0;
            st.window_fire.iter_mut().for_each(|c| *c = 0);
            st.window_tokens = 0;
        }
        last = stats;
        let due = cfg.checkpoint_every > 0 && (st.step % cfg.checkpoint_every == 0) && !is_last;
        let stop = !is_last && opts.stop.as_ref().is_some_and(|f| f.load(Ordering::SeqCst));
        if due || stop {
            write_checkpoint(&out, &st, &cfg, src.cursor(), &prov.data_fingerprint)?;
        }
        if stop {
            // Ctrl-C / SIGTERM: the batch in flight is done and kept in the checkpoint
            tracing::info!("interrupted: checkpoint at step {} written", st.step);
            interrupted = true;
            break;
        }
        if opts.stop_after_steps == Some(steps_this_run) && !is_last {
            interrupted = true;
            break;
        }
    }
    if let Some(pb) = &pb {
        pb.finish_and_clear();
    }
    let tokens_per_s = match steady_start {
        Some((t0, s0)) if st.step > s0 => ((st.step - s0) * b as u64) as f64 / t0.elapsed().as_secs_f64(),
        _ => (steps_this_run * b as u64) as f64 / t_run.elapsed().as_secs_f64().max(1e-9),
    };
    let dead_frac = st.since_fired.iter().filter(|&&s| s >= cfg.dead_tokens).count() as f64 / cfg.d_sae as f64;
    drop(ws); // release the [batch, d_sae] buffers before writing the output
    if !interrupted {
        // training is over: fold the scale in place (a clone would double the peak memory at 1M latents)
        finalize_in_place(&mut st, &cfg);
        let sae = &st.sae;
        let freq: Vec<f32> =
            st.fire_count.iter().map(|&c| ((c as f64 / st.tokens.max(1) as f64) + 1e-10).log10() as f32).collect();
        let hist = density_histogram(&freq);
        tracing::info!("log10 feature density histogram (bucket lower edge: count): {hist:?}");
        let summary = serde_json::json!({
            "steps": st.step, "tokens": st.tokens, "excluded_rows": st.excluded_rows, "input_scale": st.input_scale,
            "outlier_max_norm_raw": st.max_norm, "tokens_per_s": tokens_per_s, "last": last,
            "dead_frac": dead_frac, "log10_density_histogram": hist, "resolved": res,
        });
        let summary = serde_json::to_string_pretty(&summary)?;
        let toml = cfg.to_toml();
        let extra: [(&str, &[u8]); 2] =
            [("train_config.toml", toml.as_bytes()), ("training_summary.json", summary.as_bytes())];
        format::save_saelens_set(&out, sae, Some(&freq), None, &extra)?;
    }
    Ok(TrainOutcome {
        out_dir: out,
        steps: st.step,
        tokens: st.tokens,
        excluded_rows: st.excluded_rows,
        input_scale: st.input_scale,
        max_norm: st.max_norm,
        last,
        tokens_per_s,
        tokens_this_run: steps_this_run * b as u64,
        interrupted,
        dead_frac,
    })
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

/// SAELens BatchTopK: EMA of the smallest selected activation, used as the inference threshold.
fn stats_threshold_update(ws: &Workspace, thr: f32, lr: f32, _step: u64) -> f32 {
    if ws.batch_min_selected > 0.0 {
        (1.0 - lr) * thr + lr * ws.batch_min_selected
    } else {
        thr
    }
}

/// Turn the training state's SAE into the inference SAE in raw activation space (input scale
/// folded in, BatchTopK's global threshold broadcast).
fn finalize_in_place(st: &mut State, cfg: &TrainConfig) {
    if cfg.arch == Arch::BatchTopK {
        st.sae.threshold = vec![st.batchtopk_threshold; st.sae.d_sae];
    }
    st.sae.fold_input_scale(st.input_scale);
    st.sae.metadata = metadata_for(cfg);
    st.sae.metadata.input_scale = Some(st.input_scale);
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
