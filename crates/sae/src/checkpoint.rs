//! Training checkpoints: `<out>/checkpoints/step_NNNNNNNNN/` holds `state.safetensors` (the weights,
//! both Adam moments and the dead-latent counters, named after [`Params::NAMES`]) and `state.json`
//! (progress, the data position, the config, and the safetensors file's size and CRC32). Written
//! into a temporary folder and renamed, the last two kept. Only this module reads or writes them.

use crate::config::TrainConfig;
use crate::format::{self, TensorSrc};
use crate::params::Params;
use crate::plan::TrainPlan;
use crate::sae::Sae;
use crate::step::AdamState;
use crate::SaeError;
use anyhow::Context;
use safetensors::tensor::SafeTensors;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Everything a run carries from step to step besides the data.
#[derive(Clone)]
pub(crate) struct TrainState {
    pub sae: Sae,
    pub opt: AdamState,
    /// Per latent: tokens since it last fired (dead when ≥ `dead_tokens`).
    pub since_fired: Vec<u64>,
    /// Per latent: rows it fired on over the whole run (the saved sparsity).
    pub fire_count: Vec<u64>,
    /// Per latent: rows it fired on since the last log line (dense %).
    pub window_fire: Vec<u64>,
    pub window_tokens: u64,
    pub step: u64,
    pub tokens: u64,
    pub excluded_rows: u64,
    /// The scalar the rows are multiplied by while training.
    pub input_scale: f32,
    /// Rows with a larger (raw) norm are excluded as outliers.
    pub max_norm: f32,
    /// BatchTopK's learned inference threshold.
    pub batchtopk_threshold: f32,
}

/// `state.json`: the progress and what a resume must match.
#[derive(Serialize, Deserialize, Clone)]
pub(crate) struct CheckpointMeta {
    pub step: u64,
    pub tokens: u64,
    pub excluded_rows: u64,
    pub input_scale: f32,
    pub max_norm: f32,
    pub cursor: serde_json::Value,
    pub config: TrainConfig,
    pub d_in: usize,
    pub batchtopk_threshold: f32,
    /// Content fingerprint of the training data (empty in checkpoints from before it was recorded).
    #[serde(default)]
    pub data_fingerprint: String,
    /// Size and CRC32 of `state.safetensors`, checked before a resume trusts it.
    #[serde(default)]
    pub state_bytes: u64,
    #[serde(default)]
    pub state_crc32: Option<u32>,
}

/// Checkpoint tensor names of the two Adam moments, in [`Params::NAMES`] order after `m_` / `v_`.
const MOMENT_NAMES: [&str; 5] = ["enc", "benc", "dec", "bdec", "thr"];

/// The folder holding a run's checkpoints.
pub fn folder(out: &Path) -> PathBuf {
    out.join("checkpoints")
}

fn moment_name(prefix: &str, param: &str) -> String {
    let i = Params::<()>::NAMES.iter().position(|n| *n == param).unwrap_or(0);
    format!("{prefix}{}", MOMENT_NAMES[i])
}

/// Write step `st.step`'s checkpoint atomically and drop all but the last two.
pub(crate) fn write(
    out: &Path,
    st: &TrainState,
    cfg: &TrainConfig,
    cursor: serde_json::Value,
    data_fingerprint: &str,
) -> Result<(), SaeError> {
    let root = folder(out);
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let name = format!("step_{:09}", st.step);
    let (tmp, fin) = (root.join(format!("{name}.tmp")), root.join(&name));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).ok();
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    write_tensors(&tmp.join("state.safetensors"), st)?;
    let (state_bytes, crc) = saekit_files::file_crc32(&tmp.join("state.safetensors"))?;
    let meta = CheckpointMeta {
        step: st.step,
        tokens: st.tokens,
        excluded_rows: st.excluded_rows,
        input_scale: st.input_scale,
        max_norm: st.max_norm,
        cursor,
        config: cfg.clone(),
        d_in: st.sae.d_in,
        batchtopk_threshold: st.batchtopk_threshold,
        data_fingerprint: data_fingerprint.to_string(),
        state_bytes,
        state_crc32: Some(crc),
    };
    let json = serde_json::to_string_pretty(&meta).context("rendering state.json")?;
    format::atomic_write(&tmp.join("state.json"), json.as_bytes())?;
    if fin.exists() {
        std::fs::remove_dir_all(&fin).with_context(|| format!("removing the stale {}", fin.display()))?;
    }
    saekit_files::persist_path(&tmp, &fin)?;
    let mut all = list(out)?;
    while all.len() > 2 {
        let old = all.remove(0);
        std::fs::remove_dir_all(&old).with_context(|| format!("removing old checkpoint {}", old.display()))?;
    }
    Ok(())
}

fn write_tensors(path: &Path, st: &TrainState) -> Result<(), SaeError> {
    let (s, o) = (&st.sae, &st.opt);
    let shapes = s.params.shapes(s.d_in, s.d_sae);
    let mut names: Vec<String> = Vec::new();
    let mut data: Vec<(Vec<usize>, TensorSrc<'_>)> = Vec::new();
    for ((name, w), (_, shape)) in s.params.each().into_iter().zip(shapes.each()) {
        names.push(name.to_string());
        data.push((shape.clone(), TensorSrc::F32(w)));
    }
    for (prefix, moment) in [("m_", &o.m), ("v_", &o.v)] {
        for ((name, t), (_, shape)) in moment.each().into_iter().zip(shapes.each()) {
            names.push(moment_name(prefix, name));
            data.push((shape.clone(), TensorSrc::F32(t)));
        }
    }
    let wt = [st.window_tokens];
    let n = s.d_sae;
    for (name, v, shape) in [
        ("since_fired", &st.since_fired[..], n),
        ("fire_count", &st.fire_count[..], n),
        ("window_fire", &st.window_fire[..], n),
        ("window_tokens", &wt[..], 1),
    ] {
        names.push(name.to_string());
        data.push((vec![shape], TensorSrc::U64(v)));
    }
    let tensors: Vec<(&str, Vec<usize>, TensorSrc<'_>)> =
        names.iter().zip(data).map(|(n, (shape, src))| (n.as_str(), shape, src)).collect();
    format::write_safetensors(path, &tensors)?;
    Ok(())
}

/// Completed checkpoints of the run in `out`, oldest first (by step number).
pub fn list(out: &Path) -> Result<Vec<PathBuf>, SaeError> {
    let mut v: Vec<(u64, PathBuf)> = Vec::new();
    if let Ok(rd) = std::fs::read_dir(folder(out)) {
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

/// The configuration of the newest checkpoint in `out` (the base of a resumed run).
pub fn latest_config(out: &Path) -> Result<TrainConfig, SaeError> {
    let all = list(out)?;
    let last = all
        .last()
        .ok_or_else(|| SaeError::BadInput(format!("--resume: no checkpoint in {}", folder(out).display())))?;
    Ok(read_meta(last)?.config)
}

pub(crate) fn read_meta(dir: &Path) -> Result<CheckpointMeta, SaeError> {
    let path = dir.join("state.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let meta: CheckpointMeta =
        serde_json::from_str(&text).map_err(|e| SaeError::corrupt(&path, format!("cannot parse: {e}")))?;
    check_progress(&meta, &path)?;
    Ok(meta)
}

/// A step and token count the run could have reached: within its budget, a whole number of batches.
/// (state.json is not under the checksum, and a wild count would overflow the training loop.)
fn check_progress(meta: &CheckpointMeta, path: &Path) -> Result<(), SaeError> {
    let cfg = &meta.config;
    let reachable = meta.tokens <= cfg.tokens && meta.step.checked_mul(cfg.batch_size as u64) == Some(meta.tokens);
    if reachable {
        return Ok(());
    }
    Err(SaeError::corrupt(
        path,
        format!(
            "step {} and {} tokens do not fit a run of {} tokens in batches of {}: the checkpoint is corrupt",
            meta.step, meta.tokens, cfg.tokens, cfg.batch_size
        ),
    ))
}

/// Read the tensors of the checkpoint in `dir` (whose state.json is `meta`), checked against the
/// size and CRC32 recorded there, into the state of a run planned by `plan`.
pub(crate) fn read(dir: &Path, meta: &CheckpointMeta, plan: &TrainPlan) -> Result<TrainState, SaeError> {
    let p = dir.join("state.safetensors");
    verify_checksum(meta, &p, dir)?;
    let bytes = format::map_file(&p)?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| SaeError::corrupt(&p, format!("cannot parse: {e}")))?;
    let tensor = |name: &str| st.tensor(name).map_err(|_| SaeError::corrupt(&p, format!("missing {name}")));
    let f32s = |name: &str| -> Result<Vec<f32>, SaeError> {
        Ok(tensor(name)?.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    };
    let u64s = |name: &str| -> Result<Vec<u64>, SaeError> {
        Ok(tensor(name)?.data().chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect())
    };
    let params = Params::try_from_names(f32s)?;
    let d_sae = params.w_enc.len() / meta.d_in.max(1);
    let sae = Sae {
        d_in: meta.d_in,
        d_sae,
        activation: plan.activation(),
        params,
        apply_b_dec_to_input: true,
        metadata: plan.metadata(),
    };
    let opt = AdamState {
        m: Params::try_from_names(|n| f32s(&moment_name("m_", n)))?,
        v: Params::try_from_names(|n| f32s(&moment_name("v_", n)))?,
    };
    Ok(TrainState {
        sae,
        opt,
        since_fired: u64s("since_fired")?,
        fire_count: u64s("fire_count")?,
        window_fire: u64s("window_fire")?,
        window_tokens: u64s("window_tokens")?.first().copied().unwrap_or(0),
        step: meta.step,
        tokens: meta.tokens,
        excluded_rows: meta.excluded_rows,
        input_scale: meta.input_scale,
        max_norm: meta.max_norm,
        batchtopk_threshold: meta.batchtopk_threshold,
    })
}

fn verify_checksum(meta: &CheckpointMeta, p: &Path, dir: &Path) -> Result<(), SaeError> {
    let Some(want) = meta.state_crc32 else {
        tracing::warn!("{}: a checkpoint without a checksum (older saekit); not verified", dir.display());
        return Ok(());
    };
    let (bytes, crc) = saekit_files::file_crc32(p)?;
    if bytes != meta.state_bytes || crc != want {
        return Err(SaeError::corrupt(
            p,
            format!(
                "{bytes} bytes, crc32 {crc:08x}, but state.json records {} bytes, crc32 {want:08x}: the checkpoint is corrupt",
                meta.state_bytes
            ),
        ));
    }
    Ok(())
}
