//! The error of this crate's public entry points, by whose fault it is: the caller's input (a flag, a
//! file that is missing or does not fit, an SAE for another hook), a damaged file saekit wrote (a
//! feature database, an analysis checkpoint), the disk, or saekit.
//!
//! Inside the crate functions return `anyhow` and raise a known kind with `bad_input!` or `corrupt!`
//! (or their `ensure_*` forms, or `Kind::mark` on an error from elsewhere); the kind survives any
//! context added on the way out, and `From<anyhow::Error>` reads it off the chain at the boundary.
//! Every message is kept whole.

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

/// The kind an inner function raised, carried in an anyhow chain by [`Marked`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Kind {
    BadInput,
    Corrupt,
}

impl Kind {
    /// `error` marked as of this kind, its message and causes unchanged.
    pub(crate) fn mark(self, error: anyhow::Error) -> anyhow::Error {
        anyhow::Error::new(Marked { kind: self, error })
    }
}

/// An error whose kind is known; it reads exactly as the error it marks.
#[derive(Debug)]
pub(crate) struct Marked {
    kind: Kind,
    error: anyhow::Error,
}

impl std::fmt::Display for Marked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // the top message only: a `{:#}` of the chain reaches the causes through `source`
        write!(f, "{}", self.error)
    }
}

impl std::error::Error for Marked {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.error.source()
    }
}

impl AnalysisError {
    /// Whose fault: the first cause in the chain that tells wins (a kind raised inside the crate, a
    /// `AnalysisError` or model error passed through); an I/O error is the disk's (or the caller's, for a
    /// path that does not exist); a JSON error is a damaged file.
    fn sort(e: anyhow::Error) -> AnalysisError {
        let kind = e.chain().find_map(Self::kind_told_by).unwrap_or(AnalysisError::Other);
        kind(e)
    }

    /// The variant `cause` says an error is, if it says.
    fn kind_told_by(cause: &(dyn std::error::Error + 'static)) -> Option<fn(anyhow::Error) -> AnalysisError> {
        use std::io::ErrorKind as Io;
        if let Some(marked) = cause.downcast_ref::<Marked>() {
            return Some(match marked.kind {
                Kind::BadInput => AnalysisError::BadInput,
                Kind::Corrupt => AnalysisError::Corrupt,
            });
        }
        if let Some(typed) = cause.downcast_ref::<AnalysisError>() {
            return Some(typed.variant());
        }
        if let Some(store) = cause.downcast_ref::<saekit_store::StoreError>() {
            use saekit_store::StoreError as S;
            return Some(match store {
                S::BadInput(_) => AnalysisError::BadInput,
                S::Corrupt(_) => AnalysisError::Corrupt,
                S::Io(_) => AnalysisError::Io,
                S::Other(_) => AnalysisError::Other,
            });
        }
        if let Some(sae) = cause.downcast_ref::<saekit_sae::SaeError>() {
            use saekit_sae::SaeError as S;
            return Some(match sae {
                S::Config { .. } | S::BadInput(_) => AnalysisError::BadInput,
                S::Corrupt { .. } => AnalysisError::Corrupt,
                S::Io(_) => AnalysisError::Io,
                S::Other(_) => AnalysisError::Other,
            });
        }
        if let Some(model) = cause.downcast_ref::<saekit_model::ModelError>() {
            use saekit_model::ModelError as M;
            return Some(match model {
                M::BadInput(_) | M::BadFile(_) => AnalysisError::BadInput,
                M::Io(_) => AnalysisError::Io,
                M::Internal(_) => AnalysisError::Other,
            });
        }
        if let Some(sqlite) = cause.downcast_ref::<rusqlite::Error>() {
            return Self::kind_of_sqlite(sqlite);
        }
        if cause.is::<serde_json::Error>() {
            return Some(AnalysisError::Corrupt);
        }
        let io = cause.downcast_ref::<std::io::Error>()?;
        Some(match io.kind() {
            Io::NotFound => AnalysisError::BadInput,
            Io::UnexpectedEof | Io::InvalidData => AnalysisError::Corrupt,
            _ => AnalysisError::Io,
        })
    }

    /// SQLite's own sorting: a file that is not a database is the caller's, a malformed one is damaged,
    /// a failed read or write or a full disk is the disk's; anything else is left to a cause below.
    fn kind_of_sqlite(e: &rusqlite::Error) -> Option<fn(anyhow::Error) -> AnalysisError> {
        use rusqlite::ErrorCode as C;
        let rusqlite::Error::SqliteFailure(failure, _) = e else { return None };
        match failure.code {
            C::NotADatabase | C::CannotOpen => Some(AnalysisError::BadInput),
            C::DatabaseCorrupt => Some(AnalysisError::Corrupt),
            C::SystemIoFailure | C::DiskFull | C::PermissionDenied | C::ReadOnly => Some(AnalysisError::Io),
            _ => None,
        }
    }

    /// This error's variant, as a constructor.
    fn variant(&self) -> fn(anyhow::Error) -> AnalysisError {
        match self {
            AnalysisError::BadInput(_) => AnalysisError::BadInput,
            AnalysisError::Corrupt(_) => AnalysisError::Corrupt,
            AnalysisError::Io(_) => AnalysisError::Io,
            AnalysisError::Other(_) => AnalysisError::Other,
        }
    }
}

/// An anyhow chain keeps the kind an inner function raised (or a `AnalysisError` it passed through);
/// anything unmarked is sorted by its cause.
impl From<anyhow::Error> for AnalysisError {
    fn from(e: anyhow::Error) -> Self {
        AnalysisError::sort(e)
    }
}

/// The errors of the crates and libraries underneath convert as their anyhow form does, sorted.
macro_rules! sorted_from {
    ($($source:ty),* $(,)?) => {$(
        impl From<$source> for AnalysisError {
            fn from(e: $source) -> Self {
                AnalysisError::sort(e.into())
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

/// Raise a bad-input error (the caller's fault) as anyhow: `return Err(bad_input!("..."))`.
macro_rules! bad_input {
    ($($arg:tt)*) => {
        $crate::error::Kind::BadInput.mark(anyhow::anyhow!($($arg)*))
    };
}

/// Raise a corrupt-file error (a file saekit wrote is damaged) as anyhow: `return Err(corrupt!("..."))`.
macro_rules! corrupt {
    ($($arg:tt)*) => {
        $crate::error::Kind::Corrupt.mark(anyhow::anyhow!($($arg)*))
    };
}

/// `anyhow::bail!` for a function returning either `anyhow::Result` or [`AnalysisResult`]: an error of
/// no known kind (sorted by its causes, else [`AnalysisError::Other`]).
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err(anyhow::anyhow!($($arg)*).into())
    };
}

/// `bail!` with a bad-input error.
macro_rules! bail_input {
    ($($arg:tt)*) => {
        return Err($crate::error::bad_input!($($arg)*).into())
    };
}

/// `bail!` with a corrupt-file error.
macro_rules! bail_corrupt {
    ($($arg:tt)*) => {
        return Err($crate::error::corrupt!($($arg)*).into())
    };
}

pub(crate) use {bad_input, bail, bail_corrupt, bail_input, corrupt};

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

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
