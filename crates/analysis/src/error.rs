//! The error of this crate's public entry points, by whose fault it is: the caller's input (a flag, a
//! file that is missing or does not fit, an SAE for another hook), a damaged file saekit wrote (a
//! feature database, an analysis checkpoint), the disk, or saekit.
//!
//! Inside the crate functions return `anyhow` and raise a known kind with `bad_input!` or `corrupt!`
//! (or their `bail_*` forms, or `Fault::mark` on an error from elsewhere: saekit-files' tagging, which
//! saekit-store shares); the kind survives any context added on the way out, and
//! `From<anyhow::Error>` reads it off the chain at the boundary. Every message is kept whole.

use saekit_files::Fault;

/// What went wrong in saekit-analysis; each kind holds the whole message chain (the file first).
#[derive(Debug, thiserror::Error)]
pub enum AnalysisError {
    /// The call or a file given to it does not fit: a file that is not a feature database, an SAE whose
    /// width is not its hook's, a labelled set without its fields, a split without contexts, an unknown
    /// sort key, a setting out of range, a path that does not exist.
    #[error(transparent)]
    BadInput(anyhow::Error),
    /// A file saekit wrote is damaged: a feature database with a gap in its vocabulary or an oversized
    /// detail blob, a truncated or mismatched analysis checkpoint, a corrupt store or token shard.
    #[error(transparent)]
    Corrupt(anyhow::Error),
    /// Reading or writing failed (permissions, a full disk, a device error).
    #[error(transparent)]
    Io(anyhow::Error),
    /// Anything else: the model failed during a forward pass, a bug in saekit.
    #[error(transparent)]
    Other(anyhow::Error),
}

impl AnalysisError {
    /// What the errors of this crate, the crates underneath and SQLite say about whose fault they are:
    /// an `AnalysisError` or `StoreError` passed through keeps its variant, an SAE or model error is
    /// sorted by its own kind.
    fn told_by(cause: &(dyn std::error::Error + 'static)) -> Option<Fault> {
        if let Some(typed) = cause.downcast_ref::<AnalysisError>() {
            return Some(typed.fault());
        }
        if let Some(store) = cause.downcast_ref::<saekit_store::StoreError>() {
            return Some(store.fault());
        }
        if let Some(sae) = cause.downcast_ref::<saekit_sae::SaeError>() {
            use saekit_sae::SaeError as S;
            return Some(match sae {
                S::Config { .. } | S::BadInput(_) => Fault::BadInput,
                S::Corrupt { .. } => Fault::Corrupt,
                S::Io(_) => Fault::Io,
                S::Other(_) => Fault::Other,
            });
        }
        if let Some(model) = cause.downcast_ref::<saekit_model::ModelError>() {
            use saekit_model::ModelError as M;
            return Some(match model {
                M::BadInput(_) | M::BadFile(_) => Fault::BadInput,
                M::Io(_) => Fault::Io,
                M::Internal(_) => Fault::Other,
            });
        }
        Self::told_by_sqlite(cause.downcast_ref::<rusqlite::Error>()?)
    }

    /// SQLite's own sorting: a file that is not a database is the caller's, a malformed one is damaged,
    /// a failed read or write or a full disk is the disk's; anything else is left to a cause below.
    fn told_by_sqlite(e: &rusqlite::Error) -> Option<Fault> {
        use rusqlite::ErrorCode as C;
        let rusqlite::Error::SqliteFailure(failure, _) = e else { return None };
        match failure.code {
            C::NotADatabase | C::CannotOpen => Some(Fault::BadInput),
            C::DatabaseCorrupt => Some(Fault::Corrupt),
            C::SystemIoFailure | C::DiskFull | C::PermissionDenied | C::ReadOnly => Some(Fault::Io),
            _ => None,
        }
    }
}

saekit_files::fault_error!(AnalysisError, AnalysisError::told_by);

/// The errors of the crates and libraries underneath convert as their anyhow form does, sorted.
macro_rules! sorted_from {
    ($($source:ty),* $(,)?) => {$(
        impl From<$source> for AnalysisError {
            fn from(e: $source) -> Self {
                AnalysisError::from(anyhow::Error::from(e))
            }
        }
    )*};
}

sorted_from!(
    std::io::Error,
    serde_json::Error,
    rusqlite::Error,
    saekit_store::StoreError,
    saekit_sae::SaeError,
    saekit_model::ModelError,
);

/// `Result` with an [`AnalysisError`].
pub type AnalysisResult<T> = std::result::Result<T, AnalysisError>;

/// `anyhow::bail!` for a function returning either `anyhow::Result` or [`AnalysisResult`]: an error of
/// no known kind (sorted by its causes, else [`AnalysisError::Other`]).
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err(anyhow::anyhow!($($arg)*).into())
    };
}

pub(crate) use bail;
pub(crate) use saekit_files::{bad_input, bail_corrupt, bail_input};

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;
    use saekit_files::corrupt;

    #[test]
    fn a_raised_kind_survives_context_and_the_message_stays_whole() {
        let e: anyhow::Error = bad_input!("labelled set has no field {:?}", "label");
        let e = AnalysisError::from(e.context("/tmp/set.jsonl"));
        assert!(matches!(e, AnalysisError::BadInput(_)));
        assert_eq!(format!("{e:#}"), "/tmp/set.jsonl: labelled set has no field \"label\"");
        let passed_through =
            anyhow::Error::from(AnalysisError::from(corrupt!("checkpoint is truncated"))).context("resume");
        assert!(matches!(AnalysisError::from(passed_through), AnalysisError::Corrupt(_)));
        let store = saekit_store::ActivationStore::open(std::path::Path::new("/nonexistent/store")).err().unwrap();
        assert!(matches!(AnalysisError::from(anyhow::Error::from(store)), AnalysisError::BadInput(_)));
    }

    #[test]
    fn unmarked_errors_are_sorted_by_their_cause() {
        use std::io::{Error, ErrorKind};
        let io = |kind| AnalysisError::from(anyhow::Error::from(Error::new(kind, "x")).context("f: cannot read"));
        assert!(matches!(io(ErrorKind::NotFound), AnalysisError::BadInput(_)));
        assert!(matches!(io(ErrorKind::UnexpectedEof), AnalysisError::Corrupt(_)));
        assert!(matches!(io(ErrorKind::PermissionDenied), AnalysisError::Io(_)));
        let json = serde_json::from_str::<u32>("{").map_err(anyhow::Error::from).context("manifest.json");
        assert!(matches!(AnalysisError::from(json.unwrap_err()), AnalysisError::Corrupt(_)));
        assert!(matches!(AnalysisError::from(anyhow::anyhow!("a bug")), AnalysisError::Other(_)));
    }
}
