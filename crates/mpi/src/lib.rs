//! saekit-mpi: training and harvesting across processes on MPI (cargo feature `mpi`).
//!
//! Owns `MpiCollective`, over rsmpi and the system's MPI library: saekit-sae's
//! [`Collective`](saekit_sae::Collective) for a run started by `mpirun -np N saekit train`, and
//! saekit-store's [`Ranks`](saekit_store::Ranks) for `mpirun -np N saekit harvest`. It must not hold any of the
//! step's or the harvest's work: they call every reduction through those traits, so the kernels are the same
//! in one process and in N. Without the `mpi` feature this crate is empty; it lives apart from
//! saekit-sae so that turning MPI on recompiles only this crate and the CLI, not every crate
//! downstream of the trainer.
#![warn(missing_docs)]

#[cfg(feature = "mpi")]
mod dist;
#[cfg(feature = "mpi")]
pub use dist::{abort_job, MpiCollective};
