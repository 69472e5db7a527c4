//! A harvest shared by the processes of an `mpirun`: which shards each rank harvests, and how rank 0
//! joins their part stores into the one store a single process writes.
//!
//! Shard k of a store holds contexts k·S .. (k+1)·S (S contexts per shard). Rank r of N harvests the
//! shards k ≡ r (mod N) into its own part store, `OUT/.harvest-rank-r-of-N`: an ordinary store, so a
//! killed rank resumes as any harvest does. Once every rank has finished, rank 0 links each part's
//! shards into OUT under their global numbers, recomputes the statistics shard by shard in store order
//! (the one-process sums, bit for bit), writes the manifest and removes the parts. A shard's bytes
//! depend only on its contexts (outliers are marked against the shard's own median norm), so the
//! joined store equals the one-process store in every shard, mark and statistic; only the manifest's
//! timing record (`extra.last_run`) differs.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use anyhow::{anyhow, Context};
use saekit_files::{read_json, sync_dir, write_json_atomic};

use crate::error::{bad_input, corrupt, StoreResult};
use crate::store::{
    shard_hook_stats, ActivationStore, HookStats, StoreConfig, StoreManifest, MANIFEST, STORE_FORMAT, STORE_VERSION,
};

/// The processes of an `mpirun` sharing one command's work (a harvest, an analysis), each taking a share
/// of the contexts; saekit-mpi implements it.
pub trait Ranks: Send + Sync + std::fmt::Debug {
    /// This process's rank, `0..size`.
    fn rank(&self) -> usize;
    /// How many processes share the harvest.
    fn size(&self) -> usize;
    /// Wait for every rank; true when every rank passed `ok = true`. Every rank must call it the
    /// same number of times, so a rank that fails reports it here instead of returning early.
    fn all_ok(&self, ok: bool) -> bool;
    /// Rank 0 gets every rank's `local` bytes, in rank order; the other ranks get an empty list
    /// (only rank 0 holds the whole, which may exceed 2 GiB).
    fn gather(&self, local: &[u8]) -> Vec<Vec<u8>>;
}

const PART_PREFIX: &str = ".harvest-rank-";

fn part_dir_name(rank: usize, size: usize) -> String {
    format!("{PART_PREFIX}{rank}-of-{size}")
}

/// Whether `name` is a rank's part store inside a store folder.
pub(crate) fn is_part_dir_name(name: &str) -> bool {
    name.starts_with(PART_PREFIX)
}

/// The contexts (in store order) of the shards rank `rank` of `size` harvests: shards k ≡ rank (mod size).
fn share(n_ctx: u64, per_shard: u64, rank: usize, size: usize) -> Vec<u64> {
    let n_shards = n_ctx.div_ceil(per_shard);
    (rank as u64..n_shards).step_by(size).flat_map(|k| k * per_shard..((k + 1) * per_shard).min(n_ctx)).collect()
}

/// Harvest this rank's share of `n_ctx` contexts into its part store with `harvest_part(part_dir,
/// contexts)`, then (rank 0) join the parts into `out`. Returns the joined store's manifest, or this
/// rank's part manifest (not `complete`) when the harvest was interrupted.
pub(crate) fn harvest_share(
    out: &Path,
    config: &StoreConfig,
    n_ctx: u64,
    ranks: &dyn Ranks,
    harvest_part: impl FnOnce(&Path, &[u64]) -> StoreResult<StoreManifest>,
) -> StoreResult<StoreManifest> {
    let (rank, size) = (ranks.rank(), ranks.size());
    let found = finished_store(out, rank, size);
    agree(ranks, found.is_ok())?;
    if let Some(m) = found? {
        return Ok(m);
    }
    let per_shard = config.contexts_per_shard as u64;
    let done = harvest_part(&out.join(part_dir_name(rank, size)), &share(n_ctx, per_shard, rank, size));
    let finished = matches!(&done, Ok(m) if m.complete);
    if !ranks.all_ok(finished) {
        return match done {
            Ok(m) if m.complete => Err(anyhow!(
                "{}: another rank of this harvest failed or was interrupted; every rank's part is kept, and rerunning the same mpirun resumes it",
                out.display()
            )
            .into()),
            other => other,
        };
    }
    let joined = if rank == 0 { join_parts(out, config, n_ctx, size).map(Some) } else { Ok(None) };
    agree(ranks, joined.is_ok())?;
    match joined? {
        Some(m) => Ok(m),
        None => Ok(read_json(&out.join(MANIFEST))?),
    }
}

/// Every rank's `ok`; an error naming the failure elsewhere when this rank's part was fine.
fn agree(ranks: &dyn Ranks, ok: bool) -> StoreResult<()> {
    if ranks.all_ok(ok) || !ok {
        return Ok(());
    }
    Err(anyhow!("another rank of this harvest failed (its error is above)").into())
}

/// The finished store in `out`, if there is one; an error when `out` holds anything but this
/// layout's parts (another rank count's parts, a one-process store, other files).
fn finished_store(out: &Path, rank: usize, size: usize) -> StoreResult<Option<StoreManifest>> {
    let mpath = out.join(MANIFEST);
    if mpath.exists() {
        let m: StoreManifest = read_json(&mpath)?;
        if !m.complete {
            return Err(bad_input!(
                "{} holds a store a single process began; resume it without mpirun, or harvest into a new folder",
                out.display()
            )
            .into());
        }
        if rank == 0 {
            remove_parts(out)?; // left when a join stopped after writing the manifest
        }
        return Ok(Some(m));
    }
    let names = saekit_files::entry_names(out)?;
    if let Some(other) = names.iter().find(|n| is_part_dir_name(n) && !n.ends_with(&format!("-of-{size}"))) {
        return Err(bad_input!(
            "{}: {other} is the part of a harvest by another number of ranks; resume it with that many (mpirun -np), or harvest into a new folder",
            out.display()
        )
        .into());
    }
    // this layout's parts, and the shards and temporaries of a join that stopped part way
    let ours = |n: &str| is_part_dir_name(n) || n.starts_with("shard-") || saekit_files::is_temp_name(n);
    saekit_files::ensure_only_owned(out, "activation store", ours)
        .map_err(|e| saekit_files::Fault::BadInput.mark(e))?;
    Ok(None)
}

/// Rank 0: the parts' shards under their global numbers, the statistics merged in store order, the
/// manifest, then the parts removed. Safe to rerun after a crash at any point.
fn join_parts(out: &Path, config: &StoreConfig, n_ctx: u64, size: usize) -> StoreResult<StoreManifest> {
    let parts =
        (0..size).map(|r| ActivationStore::open(&out.join(part_dir_name(r, size)))).collect::<StoreResult<Vec<_>>>()?;
    let n_shards = n_ctx.div_ceil(config.contexts_per_shard as u64) as usize;
    for (r, p) in parts.iter().enumerate() {
        let want = (r..n_shards).step_by(size).count();
        if p.n_shards() != want {
            return Err(corrupt!(
                "{}: {} shards, rank {r} of {size} should have {want}",
                p.dir().display(),
                p.n_shards()
            )
            .into());
        }
    }
    let d = config.d_model;
    let mut m = StoreManifest {
        format: STORE_FORMAT.into(),
        version: STORE_VERSION,
        config: config.clone(),
        n_tokens: 0,
        n_contexts: 0,
        n_marked: 0,
        complete: true,
        shards: Vec::with_capacity(n_shards),
        stats: config.hooks.iter().map(|h| (h.clone(), HookStats::new(d))).collect(),
        extra: BTreeMap::new(),
    };
    for k in 0..n_shards {
        let view = parts[k % size].shard(k / size);
        let mut entry = view.entry().clone();
        let from = parts[k % size].dir().join(&entry.file);
        entry.file = format!("shard-{k:06}.bin");
        entry.first_context = m.n_contexts;
        link_or_copy(&from, &out.join(&entry.file))?;
        for (h, name) in config.hooks.iter().enumerate() {
            let stats = shard_hook_stats(&view, h, config);
            m.stats.get_mut(name).expect("a statistic per hook").merge(&stats);
        }
        m.n_tokens += entry.n_rows;
        m.n_contexts += entry.n_contexts;
        m.n_marked += entry.n_marked;
        m.shards.push(entry);
    }
    m.extra.insert("last_run".into(), joined_run(&parts));
    sync_dir(out)?;
    write_json_atomic(&out.join(MANIFEST), &m)
        .with_context(|| format!("cannot write the manifest in {}", out.display()))?;
    remove_parts(out)?;
    Ok(m)
}

/// The ranks' timing records: tokens summed, seconds of the slowest rank.
fn joined_run(parts: &[ActivationStore]) -> serde_json::Value {
    let runs: Vec<&serde_json::Value> = parts.iter().filter_map(|p| p.manifest().extra.get("last_run")).collect();
    let tokens: u64 = runs.iter().filter_map(|r| r["tokens"].as_u64()).sum();
    let seconds = runs.iter().filter_map(|r| r["seconds"].as_f64()).fold(0.0, f64::max);
    serde_json::json!({
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens as f64 / seconds.max(f64::MIN_POSITIVE),
        "ranks": parts.len(),
        "per_rank": runs,
    })
}

fn link_or_copy(from: &Path, to: &Path) -> StoreResult<()> {
    if to.exists() {
        fs::remove_file(to).with_context(|| format!("cannot replace {}", to.display()))?;
    }
    if fs::hard_link(from, to).is_err() {
        saekit_files::write_atomic_with(to, |f| {
            let mut src = fs::File::open(from)?;
            std::io::copy(&mut src, f)?;
            Ok(())
        })
        .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
    }
    Ok(())
}

fn remove_parts(out: &Path) -> StoreResult<()> {
    for name in saekit_files::entry_names(out)?.into_iter().filter(|n| is_part_dir_name(n)) {
        let p = out.join(name);
        fs::remove_dir_all(&p).with_context(|| format!("cannot remove {}", p.display()))?;
    }
    Ok(sync_dir(out)?)
}

#[cfg(test)]
mod tests {
    use super::share;

    #[test]
    fn shares_cover_every_context_once_in_whole_shards() {
        for size in 1..5 {
            let mut all: Vec<u64> = (0..size).flat_map(|r| share(23, 4, r, size)).collect();
            all.sort_unstable();
            assert_eq!(all, (0..23).collect::<Vec<_>>(), "{size} ranks");
        }
        assert_eq!(share(23, 4, 1, 2), vec![4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22]);
        assert_eq!(share(23, 4, 0, 3), vec![0, 1, 2, 3, 12, 13, 14, 15]);
        assert_eq!(share(23, 4, 2, 3), vec![8, 9, 10, 11, 20, 21, 22]);
    }
}
