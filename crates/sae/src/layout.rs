//! The trainer's side of the 2-D layout (see [`Collective`]): cutting a resumed run's state down to
//! this process's latents, gathering the trained SAE back whole for the SAELens folder that rank 0
//! writes, joining a sharded checkpoint's slices (they keep the one-process format, so a run moves
//! between layouts), collecting the replicas' data positions when each reads its own share, and
//! the debug dump of one step that the MPI tests compare across layouts.

use crate::checkpoint::{ReplicaPosition, TrainState};
use crate::config::Arch;
use crate::plan::TrainPlan;
use crate::step::{AdamState, Collective, Workspace};
use crate::SaeError;
use anyhow::Context;
use std::ops::Range;
use std::path::Path;

/// Refuse a layout the step cannot run: a TopK shard must hold at least the candidates one row keeps;
/// transcoders train in one process (the slicing and gathering here know one width per latent row).
pub(crate) fn check(plan: &TrainPlan, comm: &dyn Collective) -> Result<(), SaeError> {
    let c = &plan.config;
    if comm.shards() * comm.replicas() == 1 {
        return Ok(());
    }
    if plan.is_transcoder() {
        return Err(SaeError::config(
            "hook_name_out",
            format!(
                "transcoders train in one process; run without mpirun / --shards ({} processes here)",
                comm.shards() * comm.replicas()
            ),
        ));
    }
    // TopK keeps k (Multi-TopK 4k) candidates per row; BatchTopK, ReLU and JumpReLU need one latent
    let kept = if c.arch == Arch::TopK { 4 * plan.loss_at(0).k } else { 1 };
    let smallest = c.d_sae / comm.shards();
    if smallest < kept {
        return Err(SaeError::config(
            "d_sae",
            format!("{} latents over {} shards leaves {smallest} per shard, fewer than the {kept} candidates a row keeps; use fewer --shards", c.d_sae, comm.shards()),
        ));
    }
    if c.batch_size < comm.replicas() {
        return Err(SaeError::config(
            "batch_size",
            format!("{} rows cannot be split over {} replicas", c.batch_size, comm.replicas()),
        ));
    }
    Ok(())
}

/// Keep only the latents `r` of a whole state: their weights, Adam moments and firing counters
/// (b_dec, the input scale and the progress stay whole: every shard holds them).
pub(crate) fn slice_state(st: &mut TrainState, r: Range<usize>) {
    let d = st.sae.d_in;
    for params in [&mut st.sae.params, &mut st.opt.m, &mut st.opt.v] {
        slice_rows(&mut params.w_enc, d, &r);
        slice_rows(&mut params.w_dec, d, &r);
        slice_rows(&mut params.b_enc, 1, &r);
        if !params.threshold.is_empty() {
            slice_rows(&mut params.threshold, 1, &r);
        }
    }
    for counter in [&mut st.since_fired, &mut st.fire_count, &mut st.window_fire] {
        slice_rows(counter, 1, &r);
    }
    st.sae.d_sae = r.len();
}

fn slice_rows<T: Copy>(v: &mut Vec<T>, width: usize, r: &Range<usize>) {
    v.truncate(r.end * width);
    v.drain(..r.start * width);
}

/// The trained SAE and its firing counts whole on rank 0 (`None` on the others), every shard's
/// latents put back in order: what the SAELens folder needs. The Adam moments are freed first and
/// not gathered (the run is over), and each slice is freed once sent, so rank 0 holds the whole
/// SAE and little else, and no other rank ever holds it. Every rank must call it.
pub(crate) fn gather_output(st: &mut TrainState, comm: &dyn Collective) -> Option<TrainState> {
    let empty = crate::params::Params::default();
    st.opt = AdamState { m: empty.clone(), v: empty };
    if comm.replica() != 0 {
        return None; // the other replicas hold the same weights: replica 0's shards give them
    }
    let p = &mut st.sae.params;
    let gather = |v: &mut Vec<f32>| comm.shard_gather_f32_to_root(&std::mem::take(v));
    let (w_enc, w_dec, b_enc, threshold) =
        (gather(&mut p.w_enc), gather(&mut p.w_dec), gather(&mut p.b_enc), gather(&mut p.threshold));
    let bytes: Vec<u8> = st.fire_count.iter().flat_map(|x| x.to_le_bytes()).collect();
    let fire_count: Vec<u64> = comm
        .shard_gather_to_root(&bytes)
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
        .collect();
    if comm.rank() != 0 {
        return None;
    }
    let mut whole = st.clone();
    whole.sae.params =
        crate::params::Params { w_enc, w_dec, b_enc, threshold, ..std::mem::take(&mut whole.sae.params) };
    whole.sae.d_sae = whole.sae.params.b_enc.len();
    whole.fire_count = fire_count;
    Some(whole)
}

/// The whole state from its slices in latent order (a sharded checkpoint's files).
pub(crate) fn join_states(parts: Vec<TrainState>) -> Option<TrainState> {
    let mut parts = parts.into_iter();
    let mut all = parts.next()?;
    for part in parts {
        for (whole, p) in
            [(&mut all.sae.params, part.sae.params), (&mut all.opt.m, part.opt.m), (&mut all.opt.v, part.opt.v)]
        {
            whole.w_enc.extend(p.w_enc);
            whole.w_dec.extend(p.w_dec);
            whole.b_enc.extend(p.b_enc);
            whole.threshold.extend(p.threshold);
        }
        all.since_fired.extend(part.since_fired);
        all.fire_count.extend(part.fire_count);
        all.window_fire.extend(part.window_fire);
    }
    all.sae.d_sae = all.sae.params.b_enc.len();
    Some(all)
}

/// Every replica's data position, in replica order, on every process, when each replica reads its
/// own share of the data (a checkpoint records them all). The ranks of one replica read the same
/// rows, so they must stand at one position. Every process calls it.
pub(crate) fn replica_positions(
    mine: &ReplicaPosition,
    comm: &dyn Collective,
) -> Result<Vec<ReplicaPosition>, SaeError> {
    let mut line = serde_json::to_vec(mine).context("rendering a data position")?;
    line.push(b'\n');
    let all = comm.gather_all(&line);
    let per_rank: Vec<ReplicaPosition> = String::from_utf8_lossy(&all)
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("reading the replicas' data positions")?;
    // rank = replica · shards + shard
    let shards = comm.shards();
    if let Some(rank) = (0..per_rank.len()).find(|&r| per_rank[r] != per_rank[r - r % shards]) {
        return Err(SaeError::BadInput(format!(
            "rank {rank} reads other rows than rank {} of its replica: the ranks of a replica must forward the same contexts",
            rank - rank % shards
        )));
    }
    Ok(per_rank.into_iter().step_by(shards).collect())
}

/// `SAEKIT_DEBUG_DUMP_STEP=DIR` (tests only): after the first step's forward and backward, each
/// process writes `DIR/rank-R.json`: its latent slice and rows, the active latents of each of its
/// rows (global ids, ascending), and its gradients (dense over its latents, before clipping).
pub(crate) fn dump_step(
    dir: &Path,
    ws: &Workspace,
    st: &TrainState,
    arch: Arch,
    latents: Range<usize>,
    rows: Range<usize>,
    comm: &dyn Collective,
) -> Result<(), SaeError> {
    let (d, ds) = (st.sae.d_in, st.sae.d_sae);
    let grads = ws.grads.dense(d, st.sae.d_out(), ds);
    let active: Vec<Vec<u32>> = ws
        .active_latents(arch, rows.len(), ds)
        .into_iter()
        .map(|row| row.into_iter().map(|j| j + latents.start as u32).collect())
        .collect();
    let json = serde_json::json!({
        "latents": [latents.start, latents.end], "rows": [rows.start, rows.end], "active": active,
        "w_enc": grads.w_enc, "b_enc": grads.b_enc, "w_dec": grads.w_dec, "b_dec": grads.b_dec,
        "threshold": grads.threshold,
    });
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("rank-{}.json", comm.rank()));
    std::fs::write(&path, json.to_string()).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
