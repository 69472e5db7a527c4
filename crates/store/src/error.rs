//! The error of this crate's public entry points, by whose fault it is: the caller's input (a flag, a
//! folder or file that is missing or does not fit), a damaged file saekit wrote, the disk, or saekit.
//!
//! Inside the crate functions return `anyhow` and raise a known kind with `bad_input!` or `corrupt!`
//! (or their `ensure_*` forms, or `Fault::mark` on an error from elsewhere: saekit-files' tagging,
//! which saekit-analysis shares); the kind survives any context added on the way out, and
//! `From<anyhow::Error>` reads it off the chain at the boundary. Every message is kept whole.

use saekit_files::Fault;

/// What went wrong in saekit-store; each kind holds the whole message chain (the file first).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The call or a file given to it does not fit: a folder that is not a store or tokenized dataset, a
    /// hook or split it lacks, a corpus file that cannot be parsed, a tokenizer other than the data's,
    /// a setting out of range, a path that does not exist.
    #[error(transparent)]
    BadInput(anyhow::Error),
    /// A file saekit wrote is damaged: a CRC32 mismatch, a truncated shard, an inconsistent manifest.
    #[error(transparent)]
    Corrupt(anyhow::Error),
    /// Reading or writing failed (permissions, a full disk, a device error).
    #[error(transparent)]
    Io(anyhow::Error),
    /// Anything else: the model failed during a harvest, a bug in saekit.
    #[error(transparent)]
    Other(anyhow::Error),
}

impl StoreError {
    /// What the errors of this crate and the crates underneath say about whose fault they are: a
    /// `StoreError` passed through keeps its variant, a model error is sorted by its own kind.
    fn told_by(cause: &(dyn std::error::Error + 'static)) -> Option<Fault> {
        if let Some(typed) = cause.downcast_ref::<StoreError>() {
            return Some(typed.fault());
        }
        #[cfg(feature = "model")]
        if let Some(model) = cause.downcast_ref::<saekit_model::ModelError>() {
            use saekit_model::ModelError as M;
            return Some(match model {
                M::BadInput(_) | M::BadFile(_) => Fault::BadInput,
                M::Io(_) => Fault::Io,
                M::Internal(_) => Fault::Other,
            });
        }
        None
    }
}

saekit_files::fault_error!(StoreError, StoreError::told_by);

/// `Result` with a [`StoreError`].
pub type StoreResult<T> = std::result::Result<T, StoreError>;

pub(crate) use saekit_files::{bad_input, corrupt, ensure_input, ensure_intact};

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn a_raised_kind_survives_context_and_the_message_stays_whole() {
        let e: anyhow::Error = bad_input!("store has no hook {:?}", "blocks.9");
        let e = StoreError::from(e.context("/tmp/s: cannot open"));
        assert!(matches!(e, StoreError::BadInput(_)));
        assert_eq!(format!("{e:#}"), "/tmp/s: cannot open: store has no hook \"blocks.9\"");
        let passed_through =
            anyhow::Error::from(StoreError::from(corrupt!("shard 3: CRC32 mismatch"))).context("reader");
        assert!(matches!(StoreError::from(passed_through), StoreError::Corrupt(_)));
    }

    #[test]
    fn unmarked_errors_are_sorted_by_their_cause() {
        use std::io::{Error, ErrorKind};
        let io = |kind| StoreError::from(anyhow::Error::from(Error::new(kind, "x")).context("f: cannot read"));
        assert!(matches!(io(ErrorKind::NotFound), StoreError::BadInput(_)));
        assert!(matches!(io(ErrorKind::UnexpectedEof), StoreError::Corrupt(_)));
        assert!(matches!(io(ErrorKind::PermissionDenied), StoreError::Io(_)));
        let json = serde_json::from_str::<u32>("{").map_err(anyhow::Error::from).context("manifest.json");
        assert!(matches!(StoreError::from(json.unwrap_err()), StoreError::Corrupt(_)));
        assert!(matches!(StoreError::from(anyhow::anyhow!("a bug")), StoreError::Other(_)));
    }
}
