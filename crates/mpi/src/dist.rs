//! MPI (cargo feature `mpi`): the [`Collective`] of a run started by `mpirun -np N saekit train`,
//! over rsmpi and the system's MPI library.
//!
//! The N ranks form a grid of `replicas × shards` (rank = replica · shards + shard): the ranks of one
//! replica split the latents into contiguous slices (model parallel) and see the same rows; the
//! replicas split each batch's rows (data parallel). Two sub-communicators carry the two kinds of
//! reduction. MPI's default error handler stays in place (errors are fatal to the whole job), and a
//! rank that fails outside MPI must call [`MpiCollective::abort`] so that no other rank waits forever.

use mpi::collective::SystemOperation;
use mpi::datatype::PartitionMut;
use mpi::environment::Universe;
use mpi::topology::{Color, SimpleCommunicator};
use mpi::traits::*;
use mpi::Threading;
use saekit_sae::Collective;
use saekit_sae::SaeError;
use saekit_sae::Traffic;
use saekit_store::Ranks;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The ranks of one `mpirun`, as a grid of replicas × shards.
pub struct MpiCollective {
    world: SimpleCommunicator,
    /// The ranks of this replica (one per shard): partial reconstructions, candidate gathers.
    shard_group: SimpleCommunicator,
    /// The ranks holding this shard (one per replica): gradients, loss sums, firing counts.
    replica_group: SimpleCommunicator,
    rank: usize,
    shards: usize,
    replicas: usize,
    shard: usize,
    replica: usize,
    watchdog: Watchdog,
    /// Time, bytes and calls spent in MPI so far (the benchmark's communication share).
    traffic: Mutex<Traffic>,
    /// Values per message of a gather to rank 0 ([`CHUNK`]; `SAEKIT_MPI_GATHER_CHUNK` in tests).
    chunk: usize,
    /// Declared last: dropped (MPI_Finalize) after the communicators are freed.
    _universe: Universe,
}

// SAFETY: MPI is initialised with `Threading::Serialized`, and the trainer makes every call from
// the one thread that runs the step, between its parallel kernels (never inside them), so no two
// MPI calls are ever concurrent.
unsafe impl Send for MpiCollective {}
unsafe impl Sync for MpiCollective {}

impl std::fmt::Debug for MpiCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "MpiCollective(rank {}: shard {}/{}, replica {}/{})",
            self.rank, self.shard, self.shards, self.replica, self.replicas
        )
    }
}

/// Whether an MPI launcher (Open MPI's mpirun, or a PMI/PMIx one) started this process.
pub fn launched_by_mpirun() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"].iter().any(|v| std::env::var_os(v).is_some())
}

impl MpiCollective {
    /// Join the job this process was launched in, with `shards` ranks per replica (default: all
    /// ranks shard the latents). `None` when no MPI launcher started it or it is the only rank:
    /// then the run is the one-process run, unchanged.
    pub fn from_launcher(shards: Option<usize>) -> Result<Option<MpiCollective>, SaeError> {
        if !launched_by_mpirun() {
            return Ok(None);
        }
        let (universe, threading) = mpi::initialize_with_threading(Threading::Serialized)
            .ok_or_else(|| SaeError::BadInput("MPI was already initialised in this process".into()))?;
        if matches!(threading, Threading::Single | Threading::Funneled) {
            return Err(SaeError::BadInput(format!(
                "the MPI library offers only {threading:?} threading; saekit needs Serialized"
            )));
        }
        let world = universe.world();
        let (size, rank) = (world.size() as usize, world.rank() as usize);
        if size == 1 {
            return Ok(None);
        }
        collective_timeout()?;
        let shards = shards.unwrap_or(size);
        if shards == 0 || size % shards != 0 {
            return Err(SaeError::config("shards", format!("--shards {shards} must divide the {size} ranks")));
        }
        let (replica, shard) = (rank / shards, rank % shards);
        let split = |color: usize, key: usize| {
            world
                .split_by_color_with_key(Color::with_value(color as i32), key as i32)
                .ok_or_else(|| SaeError::BadInput(format!("MPI: rank {rank} was left out of its sub-communicator")))
        };
        let shard_group = split(replica, shard)?;
        let replica_group = split(shard, replica)?;
        tracing::info!(
            "MPI rank {rank} of {size}: latent shard {shard} of {shards}, data replica {replica} of {}",
            size / shards
        );
        Ok(Some(MpiCollective {
            world,
            shard_group,
            replica_group,
            rank,
            shards,
            replicas: size / shards,
            shard,
            replica,
            watchdog: Watchdog::start(rank, collective_timeout()?),
            traffic: Mutex::default(),
            chunk: gather_chunk()?,
            _universe: universe,
        }))
    }
}

/// Values per message of a gather to rank 0: [`CHUNK`], or `SAEKIT_MPI_GATHER_CHUNK` (tests: small
/// chunks exercise the path a matrix over 2 GiB takes).
fn gather_chunk() -> Result<usize, SaeError> {
    let Ok(v) = std::env::var("SAEKIT_MPI_GATHER_CHUNK") else { return Ok(CHUNK) };
    v.trim().parse().ok().filter(|&n| n > 0 && n <= CHUNK).ok_or_else(|| {
        SaeError::BadInput(format!("SAEKIT_MPI_GATHER_CHUNK={v:?} is not a count of values from 1 to {CHUNK}"))
    })
}

/// End the whole MPI job with `code` (after a failure on this rank, so that no other rank waits
/// forever in a collective). Call only while MPI is initialised.
pub fn abort_job(code: i32) -> ! {
    SimpleCommunicator::world().abort(code)
}

/// How long one rank may wait in one collective before it ends the job: `SAEKIT_MPI_TIMEOUT` seconds
/// (default 600; 0 waits forever).
fn collective_timeout() -> Result<Option<Duration>, SaeError> {
    let Ok(v) = std::env::var("SAEKIT_MPI_TIMEOUT") else { return Ok(Some(Duration::from_secs(600))) };
    let secs: f64 = v.trim().parse().ok().filter(|s: &f64| s.is_finite() && *s >= 0.0).ok_or_else(|| {
        SaeError::BadInput(format!("SAEKIT_MPI_TIMEOUT={v:?} is not a number of seconds (0 waits forever)"))
    })?;
    Ok((secs > 0.0).then(|| Duration::from_secs_f64(secs)))
}

/// Ends the job when this rank has waited longer than the timeout in one collective. MPI waits forever
/// for a rank that stopped answering without dying (a hung machine, a lost link); `mpirun` ends the job
/// only when a process exits.
struct Watchdog {
    /// Milliseconds since `t0` at which the collective in flight began; 0 when none is.
    since_ms: Arc<AtomicU64>,
    what: Arc<Mutex<&'static str>>,
    t0: Instant,
}

impl Watchdog {
    fn start(rank: usize, timeout: Option<Duration>) -> Watchdog {
        let w = Watchdog { since_ms: Arc::default(), what: Arc::new(Mutex::new("")), t0: Instant::now() };
        if let Some(limit) = timeout {
            let (since, what, t0) = (w.since_ms.clone(), w.what.clone(), w.t0);
            let tick = (limit / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
            std::thread::spawn(move || loop {
                std::thread::sleep(tick);
                let began = since.load(Ordering::SeqCst);
                if began != 0 && t0.elapsed().as_millis() as u64 - began > limit.as_millis() as u64 {
                    let what = *what.lock().unwrap_or_else(|e| e.into_inner());
                    eprintln!(
                        "error: MPI rank {rank} waited over {:.0} s in {what}: another rank stopped answering; ending the job (SAEKIT_MPI_TIMEOUT sets the limit)",
                        limit.as_secs_f64()
                    );
                    // not MPI_Abort: this thread may not call MPI while the main thread is inside it
                    std::process::abort();
                }
            });
        }
        w
    }

    /// Run the collective `f`, watched.
    fn watch<R>(&self, what: &'static str, f: impl FnOnce() -> R) -> R {
        *self.what.lock().unwrap_or_else(|e| e.into_inner()) = what;
        self.since_ms.store((self.t0.elapsed().as_millis() as u64).max(1), Ordering::SeqCst);
        let r = f();
        self.since_ms.store(0, Ordering::SeqCst);
        r
    }
}

impl MpiCollective {
    /// Run `f` (`calls` MPI calls handing `bytes` to the library) under the watchdog, metered.
    fn call<R>(&self, what: &'static str, bytes: usize, calls: u64, f: impl FnOnce() -> R) -> R {
        let t = Instant::now();
        let r = self.watchdog.watch(what, f);
        let mut m = self.traffic.lock().unwrap_or_else(|e| e.into_inner());
        m.seconds += t.elapsed().as_secs_f64();
        m.bytes_sent += bytes as u64;
        m.calls += calls;
        r
    }

    /// `values[i] ← Σ over the group`, unless the group is this process alone.
    fn all_sum<T: Equivalence + Copy>(&self, group: &SimpleCommunicator, values: &mut [T]) {
        if group.size() == 1 || values.is_empty() {
            return;
        }
        let send = values.to_vec();
        self.call("an all-reduce", size_of_val(values), 1, || {
            group.all_reduce_into(&send[..], values, SystemOperation::sum())
        });
    }

    /// Every rank's bytes of the group, concatenated in rank order (each may send a different count).
    fn all_gather(&self, group: &SimpleCommunicator, local: &[u8]) -> Vec<u8> {
        if group.size() == 1 {
            return local.to_vec();
        }
        // the part's length (an i32), then the part
        self.call("an all-gather", 4 + local.len(), 2, || all_gather(group, local))
    }

    /// Rank 0 of the group gets every rank's bytes in rank order; the others get nothing.
    fn gather_to_root<T: Equivalence + Copy + Default>(&self, group: &SimpleCommunicator, local: &[T]) -> Vec<T> {
        if group.size() == 1 {
            return local.to_vec();
        }
        let (bytes, calls) =
            if group.rank() == 0 { (0, 0) } else { (8 + size_of_val(local), 1 + local.len().div_ceil(self.chunk)) };
        self.call("a gather", bytes, calls as u64, || gather_to_root(group, local, self.chunk))
    }
}

/// The most values one point-to-point call carries (MPI counts are i32; 1 GiB of f32).
const CHUNK: usize = 1 << 28;

/// Rank 0 receives each rank's part (its length, then messages of at most `chunk` values), in rank
/// order, so neither a part nor the whole is limited to 2^31 values; the other ranks return nothing.
fn gather_to_root<T: Equivalence + Copy + Default>(group: &SimpleCommunicator, local: &[T], chunk: usize) -> Vec<T> {
    let root = group.process_at_rank(0);
    if group.rank() != 0 {
        root.send(&(local.len() as u64));
        for part in local.chunks(chunk) {
            root.send(part);
        }
        return Vec::new();
    }
    let lens: Vec<usize> = (1..group.size()).map(|r| group.process_at_rank(r).receive::<u64>().0 as usize).collect();
    let mut all = Vec::with_capacity(local.len() + lens.iter().sum::<usize>());
    all.extend_from_slice(local);
    for (r, n) in (1..).zip(lens) {
        let start = all.len();
        all.resize(start + n, T::default());
        for part in all[start..].chunks_mut(chunk) {
            group.process_at_rank(r).receive_into(part);
        }
    }
    all
}

/// Every rank's bytes of the group, concatenated in rank order (each may send a different count).
fn all_gather(group: &SimpleCommunicator, local: &[u8]) -> Vec<u8> {
    if group.size() == 1 {
        return local.to_vec();
    }
    // MPI counts are i32: a part over 2 GiB would be cut silently
    let len = i32::try_from(local.len()).unwrap_or_else(|_| {
        eprintln!("error: MPI gather of {} bytes from one rank (over 2 GiB); use more shards", local.len());
        abort_job(1)
    });
    let mut counts = vec![0i32; group.size() as usize];
    group.all_gather_into(&len, &mut counts[..]);
    let displs: Vec<i32> = counts.iter().scan(0, |acc, &c| Some(std::mem::replace(acc, *acc + c))).collect();
    let total: usize = counts.iter().map(|&c| c as usize).sum();
    if total == 0 {
        return Vec::new(); // MPI refuses a zero-length receive buffer
    }
    let mut all = vec![0u8; total];
    let mut partition = PartitionMut::new(&mut all[..], counts, &displs[..]);
    group.all_gather_varcount_into(local, &mut partition);
    all
}

/// The `i`-th of `parts` near-equal contiguous pieces of `0..n`.
fn piece(n: usize, parts: usize, i: usize) -> Range<usize> {
    i * n / parts..(i + 1) * n / parts
}

impl Collective for MpiCollective {
    fn sum_f64(&self, values: &mut [f64]) {
        self.all_sum(&self.replica_group, values);
    }
    fn sum_f32(&self, values: &mut [f32]) {
        self.all_sum(&self.replica_group, values);
    }
    fn sum_u32(&self, values: &mut [u32]) {
        self.all_sum(&self.replica_group, values);
    }
    fn total_rows(&self, local_rows: usize) -> usize {
        let mut rows = [local_rows as u64];
        self.all_sum(&self.replica_group, &mut rows);
        rows[0] as usize
    }
    fn replicas(&self) -> usize {
        self.replicas
    }
    fn replica(&self) -> usize {
        self.replica
    }
    fn replica_rows(&self, rows: usize) -> Range<usize> {
        piece(rows, self.replicas, self.replica)
    }
    fn shards(&self) -> usize {
        self.shards
    }
    fn latent_slice(&self, d_sae: usize) -> Range<usize> {
        piece(d_sae, self.shards, self.shard)
    }
    fn shard_sum_f32(&self, values: &mut [f32]) {
        self.all_sum(&self.shard_group, values);
    }
    fn shard_sum_f64(&self, values: &mut [f64]) {
        self.all_sum(&self.shard_group, values);
    }
    fn shard_gather(&self, local: &[u8]) -> Vec<u8> {
        self.all_gather(&self.shard_group, local)
    }
    fn gather_all(&self, local: &[u8]) -> Vec<u8> {
        self.all_gather(&self.world, local)
    }
    fn any(&self, flag: bool) -> bool {
        let mut v = [flag as u32];
        self.all_sum(&self.world, &mut v);
        v[0] > 0
    }
    fn rank(&self) -> usize {
        self.rank
    }
    fn traffic(&self) -> Option<Traffic> {
        Some(*self.traffic.lock().unwrap_or_else(|e| e.into_inner()))
    }
    fn shard_gather_to_root(&self, local: &[u8]) -> Vec<u8> {
        self.gather_to_root(&self.shard_group, local)
    }
    fn shard_gather_f32_to_root(&self, local: &[f32]) -> Vec<f32> {
        self.gather_to_root(&self.shard_group, local)
    }
}

/// A harvest's or an analysis's ranks are the whole job: each takes its share of the contexts.
impl Ranks for MpiCollective {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.shards * self.replicas
    }
    fn all_ok(&self, ok: bool) -> bool {
        let mut failed = [!ok as u32];
        self.all_sum(&self.world, &mut failed);
        failed[0] == 0
    }
    fn gather(&self, local: &[u8]) -> Vec<Vec<u8>> {
        let lens = self.gather_to_root(&self.world, &(local.len() as u64).to_le_bytes());
        let all = self.gather_to_root(&self.world, local);
        let mut at = 0;
        lens.chunks_exact(8)
            .map(|n| {
                let n = u64::from_le_bytes(n.try_into().expect("8 bytes")) as usize;
                at += n;
                all[at - n..at].to_vec()
            })
            .collect()
    }
}
