//! The `mpirun` job a command was launched in (feature `mpi`); without the feature, a launch by
//! `mpirun` with several ranks is refused rather than run as N copies of one command.

#[cfg(not(feature = "mpi"))]
use anyhow::bail;
use anyhow::Result;
use std::sync::Arc;

/// This process's place in the job, as the trainer and the harvest each ask for it.
pub struct Job {
    /// Every reduction of a training step.
    pub trainer: Arc<dyn saekit_sae::Collective>,
    /// Which share of a harvest's or an analysis's contexts is this rank's, and the agreements between
    /// shares.
    pub harvest: Arc<dyn saekit_store::Ranks>,
}

/// Join the job with `shards` ranks per training replica; `None` in a one-process run.
#[cfg(feature = "mpi")]
pub fn join(shards: Option<usize>) -> Result<Option<Job>> {
    let job = saekit_mpi::MpiCollective::from_launcher(shards)?.map(Arc::new);
    Ok(job.map(|m| Job { trainer: m.clone(), harvest: m }))
}

/// Without MPI support, refuse `mpirun` and `--shards` rather than run N copies of one command.
#[cfg(not(feature = "mpi"))]
pub fn join(shards: Option<usize>) -> Result<Option<Job>> {
    let ranks: usize =
        ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"].iter().find_map(|v| std::env::var(v).ok()?.parse().ok()).unwrap_or(1);
    if shards.is_some() || ranks > 1 {
        bail!(
            "this saekit was built without MPI: rebuild it with `cargo build --features mpi` to run across processes"
        );
    }
    Ok(None)
}

/// A failure on one rank ends the whole job: the other ranks would wait in a collective forever.
#[cfg(feature = "mpi")]
pub fn fatal_across_ranks(err: Option<&anyhow::Error>) {
    if let Some(e) = err {
        eprintln!("error: {e:#}");
        saekit_mpi::abort_job(1);
    }
}

/// One process: an error is returned as usual.
#[cfg(not(feature = "mpi"))]
pub fn fatal_across_ranks(_: Option<&anyhow::Error>) {}
