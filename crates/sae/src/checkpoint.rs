//! Training checkpoints: `<out>/checkpoints/step_NNNNNNNNN/` holds `state.safetensors` (the weights,
//! both Adam moments and the dead-latent counters, named after [`Params::NAMES`]) and `state.json`
//! (progress, the data position, the config, and the safetensors file's size and CRC32). Written
//! into a temporary folder and renamed, the last two kept. Only this module reads or writes them.
//!
//! A run whose latents are sharded over processes writes one `state.latents-NNNNNNNNN.safetensors`
//! per shard (its slice, the same tensor names; `NNNNNNNNN` is its first latent) and rank 0 writes
//! `state.json` last, listing them with their sizes and CRC32s. A reader joins the slices into the
//! whole state, so any layout (one process too) resumes any checkpoint.
//!
//! A run whose data-parallel replicas each read their own share of the data (`train --live` under
//! mpirun) records every replica's position in `state.json` (`replicas`); such a checkpoint resumes
//! with the same number of replicas only (each continues its own stream).

use crate::config::{ConfigFile, TrainConfig};
use crate::format::{self, TensorSrc};
use crate::params::Params;
use crate::plan::TrainPlan;
use crate::sae::Sae;
use crate::step::{AdamState, Collective};
use crate::SaeError;
use anyhow::Context;
use safetensors::tensor::SafeTensors;
use serde::{Deserialize, Serialize};
use std::ops::Range;
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
    /// The scalar a transcoder's targets are multiplied by (`input_scale` for an SAE).
    pub output_scale: f32,
    /// Rows with a larger (raw) norm are excluded as outliers.
    pub max_norm: f32,
    /// Rows whose (raw) target has a larger norm are excluded (infinite for an SAE).
    pub max_norm_out: f32,
    /// BatchTopK's learned inference threshold.
    pub batchtopk_threshold: f32,
    /// The source's position before the run's first row (null when unknown: an older checkpoint).
    pub data_start: serde_json::Value,
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
    /// The source's position before the run's first row (the final evaluation reads from there).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub data_start: serde_json::Value,
    pub config: TrainConfig,
    /// The data source's keys (see [`ConfigFile::source`]).
    #[serde(default, skip_serializing_if = "toml::Table::is_empty")]
    pub source: toml::Table,
    pub d_in: usize,
    /// A transcoder's target width, scale and outlier threshold (absent for an SAE).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub d_out: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_scale: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_norm_out: Option<f32>,
    pub batchtopk_threshold: f32,
    /// Content fingerprint of the training data (empty in checkpoints from before it was recorded).
    #[serde(default)]
    pub data_fingerprint: String,
    /// Size and CRC32 of `state.safetensors`, checked before a resume trusts it.
    #[serde(default)]
    pub state_bytes: u64,
    #[serde(default)]
    pub state_crc32: Option<u32>,
    /// A sharded checkpoint's slice files, in latent order (empty: one `state.safetensors`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shards: Vec<ShardFile>,
    /// A run whose replicas each read their own share of the data: every replica's position, in
    /// replica order (`cursor` and `data_start` are replica 0's). Empty: the replicas read one stream.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<ReplicaPosition>,
}

/// Where one data replica stands in its own share of the data.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub(crate) struct ReplicaPosition {
    /// Its source's position now.
    pub cursor: serde_json::Value,
    /// Its source's position before the run's first row.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub data_start: serde_json::Value,
}

/// The data side of a checkpoint: where the source stands and what it holds.
pub(crate) struct DataAt<'a> {
    /// The source's position (replica 0's when the replicas read their own shares).
    pub cursor: serde_json::Value,
    /// Every replica's position when each reads its own share, else empty.
    pub replicas: Vec<ReplicaPosition>,
    /// Content fingerprint of the data.
    pub fingerprint: &'a str,
}

/// One shard's slice of a sharded checkpoint.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub(crate) struct ShardFile {
    pub file: String,
    /// The latents it holds, `[start, end)`.
    pub latents: [usize; 2],
    pub bytes: u64,
    pub crc32: u32,
}

/// Checkpoint tensor names of the two Adam moments, in [`Params::NAMES`] order after `m_` / `v_`.
const MOMENT_NAMES: [&str; 6] = ["enc", "benc", "dec", "bdec", "thr", "skip"];

/// The folder holding a run's checkpoints.
pub fn folder(out: &Path) -> PathBuf {
    out.join("checkpoints")
}

fn moment_name(prefix: &str, param: &str) -> String {
    let i = Params::<()>::NAMES.iter().position(|n| *n == param).unwrap_or(0);
    format!("{prefix}{}", MOMENT_NAMES[i])
}

/// Write step `st.step`'s checkpoint atomically and drop all but the last two.
pub(crate) fn write(out: &Path, st: &TrainState, cfg: &ConfigFile, data: DataAt) -> Result<(), SaeError> {
    let tmp = fresh_temp_folder(out, st.step)?;
    write_tensors(&tmp.join("state.safetensors"), st)?;
    let (state_bytes, crc) = saekit_files::file_crc32(&tmp.join("state.safetensors"))?;
    finish(out, st, cfg, data, (state_bytes, Some(crc)), Vec::new())
}

/// The empty temporary folder of step `step`'s checkpoint (an interrupted write's leftovers removed).
fn fresh_temp_folder(out: &Path, step: u64) -> Result<PathBuf, SaeError> {
    let root = folder(out);
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let tmp = root.join(format!("step_{step:09}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).ok();
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    Ok(tmp)
}

/// Write state.json into the temporary folder (last), rename it into place, keep the last two.
fn finish(
    out: &Path,
    st: &TrainState,
    cfg: &ConfigFile,
    data: DataAt,
    (state_bytes, crc): (u64, Option<u32>),
    shards: Vec<ShardFile>,
) -> Result<(), SaeError> {
    let root = folder(out);
    let name = format!("step_{:09}", st.step);
    let (tmp, fin) = (root.join(format!("{name}.tmp")), root.join(&name));
    let transcoder = st.sae.is_transcoder();
    let meta = CheckpointMeta {
        step: st.step,
        tokens: st.tokens,
        excluded_rows: st.excluded_rows,
        input_scale: st.input_scale,
        max_norm: st.max_norm,
        cursor: data.cursor,
        data_start: st.data_start.clone(),
        config: cfg.train.clone(),
        source: cfg.source.clone(),
        d_in: st.sae.d_in,
        d_out: transcoder.then(|| st.sae.d_out()),
        output_scale: transcoder.then_some(st.output_scale),
        max_norm_out: transcoder.then_some(st.max_norm_out),
        batchtopk_threshold: st.batchtopk_threshold,
        data_fingerprint: data.fingerprint.to_string(),
        state_bytes,
        state_crc32: crc,
        shards,
        replicas: data.replicas,
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

/// A sharded run's checkpoint: every rank of replica 0 writes its slice of the latents, then rank 0
/// writes state.json listing them and renames the folder. Every process calls it.
pub(crate) fn write_sharded(
    out: &Path,
    st: &TrainState,
    cfg: &ConfigFile,
    data: DataAt,
    comm: &dyn Collective,
) -> Result<(), SaeError> {
    let root_rank = comm.rank() == 0;
    if root_rank {
        fresh_temp_folder(out, st.step)?;
    }
    comm.any(false); // the folder exists before anyone writes into it
    let tmp = folder(out).join(format!("step_{:09}.tmp", st.step));
    let mut mine = Vec::new();
    if comm.replica() == 0 {
        let latents = comm.latent_slice(cfg.train.d_sae);
        let file = format!("state.latents-{:09}.safetensors", latents.start);
        write_tensors(&tmp.join(&file), st)?;
        let (bytes, crc32) = saekit_files::file_crc32(&tmp.join(&file))?;
        let entry = ShardFile { file, latents: [latents.start, latents.end], bytes, crc32 };
        mine = serde_json::to_vec(&entry).context("rendering a shard entry")?;
        mine.push(b'\n');
    }
    let all = comm.gather_all(&mine);
    if !root_rank {
        return Ok(());
    }
    let mut shards: Vec<ShardFile> = String::from_utf8_lossy(&all)
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("reading the shards' entries")?;
    shards.sort_by_key(|s| s.latents[0]);
    finish(out, st, cfg, data, (0, None), shards)
}

fn write_tensors(path: &Path, st: &TrainState) -> Result<(), SaeError> {
    let (s, o) = (&st.sae, &st.opt);
    let shapes = s.params.shapes(s.d_in, s.d_out(), s.d_sae);
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

/// The configuration of the newest checkpoint in `out` (the base of a resumed run), with the data
/// source's keys the run was started with.
pub fn latest_config(out: &Path) -> Result<ConfigFile, SaeError> {
    let all = list(out)?;
    let last = all
        .last()
        .ok_or_else(|| SaeError::BadInput(format!("--resume: no checkpoint in {}", folder(out).display())))?;
    let meta = read_meta(last)?;
    Ok(ConfigFile { train: meta.config, source: meta.source })
}

pub(crate) fn read_meta(dir: &Path) -> Result<CheckpointMeta, SaeError> {
    let path = dir.join("state.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let cannot_parse = |e: serde_json::Error| SaeError::corrupt(&path, format!("cannot parse: {e}"));
    let mut value: serde_json::Value = serde_json::from_str(&text).map_err(cannot_parse)?;
    move_legacy_source_keys(&mut value);
    let meta: CheckpointMeta = serde_json::from_value(value).map_err(cannot_parse)?;
    check_progress(&meta, &path)?;
    Ok(meta)
}

/// Checkpoints written before the data source's keys left [`TrainConfig`] hold `--live`'s keys in
/// `config`: they move to `source`, so those runs still resume.
fn move_legacy_source_keys(meta: &mut serde_json::Value) {
    const LEGACY: [&str; 6] = ["live", "contexts", "model", "split", "live_batch", "live_block_tokens"];
    let Some(config) = meta.get_mut("config").and_then(|c| c.as_object_mut()) else { return };
    let moved: serde_json::Map<String, serde_json::Value> = LEGACY
        .iter()
        .filter_map(|k| config.remove(*k).map(|v| (k.to_string(), v)))
        .filter(|(_, v)| !v.is_null())
        .collect();
    if !moved.is_empty() && meta.get("source").is_none() {
        meta["source"] = serde_json::Value::Object(moved);
    }
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
/// size and CRC32 recorded there, into the state of the `latents` of a run planned by `plan` (a
/// process's slice; the checkpoint may have been cut into other slices, or be whole).
pub(crate) fn read(
    dir: &Path,
    meta: &CheckpointMeta,
    plan: &TrainPlan,
    latents: Range<usize>,
) -> Result<TrainState, SaeError> {
    if meta.shards.is_empty() {
        let p = dir.join("state.safetensors");
        verify_checksum(meta, &p, dir)?;
        let mut st = read_file(&p, meta, plan)?;
        if latents != (0..st.sae.d_sae) {
            crate::layout::slice_state(&mut st, latents);
        }
        return Ok(st);
    }
    // only the shard files that hold some of `latents` are read (at 1M latents the whole state is
    // 14 GB); every entry of the list is checked to follow the one before
    let (mut parts, mut first) = (Vec::new(), None);
    let mut next = 0;
    for shard in &meta.shards {
        let p = dir.join(&shard.file);
        if shard.latents[0] != next {
            return Err(SaeError::corrupt(
                dir.join("state.json"),
                format!(
                    "lists {} from latent {} where latent {next} was due: the checkpoint is corrupt",
                    shard.file, shard.latents[0]
                ),
            ));
        }
        next = shard.latents[1];
        let [l0, l1] = shard.latents;
        if l1 <= latents.start || l0 >= latents.end {
            continue;
        }
        let (bytes, crc) = saekit_files::file_crc32(&p)?;
        if (bytes, crc) != (shard.bytes, shard.crc32) {
            return Err(SaeError::corrupt(
                &p,
                format!("{bytes} bytes, crc32 {crc:08x}, but state.json records {} bytes, crc32 {:08x}: the checkpoint is corrupt", shard.bytes, shard.crc32),
            ));
        }
        first.get_or_insert(l0);
        parts.push(read_file(&p, meta, plan)?);
    }
    let mut st = crate::layout::join_states(parts).ok_or_else(|| {
        SaeError::corrupt(dir.join("state.json"), format!("lists no shard file holding latents {latents:?}"))
    })?;
    let first = first.unwrap_or(0);
    if latents.len() != st.sae.d_sae {
        crate::layout::slice_state(&mut st, latents.start - first..latents.end - first);
    }
    Ok(st)
}

/// The state in one safetensors file (a whole checkpoint, or one shard's slice).
fn read_file(p: &Path, meta: &CheckpointMeta, plan: &TrainPlan) -> Result<TrainState, SaeError> {
    let bytes = format::map_file(p)?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| SaeError::corrupt(p, format!("cannot parse: {e}")))?;
    let tensor = |name: &str| st.tensor(name).map_err(|_| SaeError::corrupt(p, format!("missing {name}")));
    let f32s = |name: &str| -> Result<Vec<f32>, SaeError> {
        Ok(tensor(name)?.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    };
    let u64s = |name: &str| -> Result<Vec<u64>, SaeError> {
        Ok(tensor(name)?.data().chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect())
    };
    // checkpoints from before skip transcoders hold no w_skip: an empty one
    let param = |name: &str| if name == "w_skip" && st.tensor(name).is_err() { Ok(Vec::new()) } else { f32s(name) };
    let params = Params::try_from_names(&param)?;
    let d_sae = params.w_enc.len() / meta.d_in.max(1);
    let sae = Sae {
        d_in: meta.d_in,
        d_sae,
        activation: plan.activation(),
        params,
        apply_b_dec_to_input: !plan.is_transcoder(),
        metadata: plan.metadata(),
    };
    let moment = |prefix: &str, n: &str| {
        if n == "w_skip" {
            param(&moment_name(prefix, n))
        } else {
            f32s(&moment_name(prefix, n))
        }
    };
    let opt =
        AdamState { m: Params::try_from_names(|n| moment("m_", n))?, v: Params::try_from_names(|n| moment("v_", n))? };
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
        output_scale: meta.output_scale.unwrap_or(meta.input_scale),
        max_norm: meta.max_norm,
        max_norm_out: meta.max_norm_out.unwrap_or(f32::INFINITY),
        batchtopk_threshold: meta.batchtopk_threshold,
        data_start: meta.data_start.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_with_live_keys_in_its_config_reads_them_as_the_source() {
        let mut config = serde_json::to_value(TrainConfig::default()).unwrap();
        let legacy = serde_json::json!({"live": true, "contexts": "tok", "model": null, "split": "train",
            "live_batch": 8, "live_block_tokens": 65536});
        config.as_object_mut().unwrap().extend(legacy.as_object().unwrap().clone());
        let mut meta = serde_json::json!({"step": 0, "tokens": 0, "excluded_rows": 0, "input_scale": 1.0,
            "max_norm": 0.0, "cursor": null, "config": config, "d_in": 4, "batchtopk_threshold": 0.0});
        assert!(serde_json::from_value::<CheckpointMeta>(meta.clone()).is_err(), "TrainConfig has no live keys");
        move_legacy_source_keys(&mut meta);
        let meta: CheckpointMeta = serde_json::from_value(meta).unwrap();
        assert_eq!(meta.source.get("contexts").and_then(|v| v.as_str()), Some("tok"));
        assert_eq!(meta.source.get("live_block_tokens").and_then(|v| v.as_integer()), Some(65536));
        assert!(!meta.source.contains_key("model"), "a null is no TOML value: the key is left out");
    }
}
