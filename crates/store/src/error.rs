//! The error of this crate's public entry points, by whose fault it is: the caller's input (a flag, a
//! folder or file that is missing or does not fit), a damaged file saekit wrote, the disk, or saekit.
//!
//! Inside the crate functions return `anyhow` and raise a known kind with `bad_input!` or `corrupt!`
//! (or their `ensure_*` forms, or `Kind::mark` on an error from elsewhere); the kind survives any
//! context added on the way out, and `From<anyhow::Error>` reads it off the chain at the boundary.
//! Every message is kept whole.

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

impl StoreError {
    /// Whose fault: the first cause in the chain that tells wins (a kind raised inside the crate, a
    /// `StoreError` or model error passed through); an I/O error is the disk's (or the caller's, for a
    /// path that does not exist); a JSON error is a damaged file.
    fn sort(e: anyhow::Error) -> StoreError {
        let kind = e.chain().find_map(Self::kind_told_by).unwrap_or(StoreError::Other);
        kind(e)
    }

    /// The variant `cause` says an error is, if it says.
    fn kind_told_by(cause: &(dyn std::error::Error + 'static)) -> Option<fn(anyhow::Error) -> StoreError> {
        use std::io::ErrorKind as Io;
        if let Some(marked) = cause.downcast_ref::<Marked>() {
            return Some(match marked.kind {
                Kind::BadInput => StoreError::BadInput,
                Kind::Corrupt => StoreError::Corrupt,
            });
        }
        if let Some(typed) = cause.downcast_ref::<StoreError>() {
            return Some(typed.variant());
        }
        #[cfg(feature = "model")]
        if let Some(model) = cause.downcast_ref::<saekit_model::ModelError>() {
            use saekit_model::ModelError as M;
            return Some(match model {
                M::BadInput(_) | M::BadFile(_) => StoreError::BadInput,
                M::Io(_) => StoreError::Io,
                M::Internal(_) => StoreError::Other,
            });
        }
        if cause.is::<serde_json::Error>() {
            return Some(StoreError::Corrupt);
        }
        let io = cause.downcast_ref::<std::io::Error>()?;
        Some(match io.kind() {
            Io::NotFound => StoreError::BadInput,
            Io::UnexpectedEof | Io::InvalidData => StoreError::Corrupt,
            _ => StoreError::Io,
        })
    }

    /// This error's variant, as a constructor.
    fn variant(&self) -> fn(anyhow::Error) -> StoreError {
        match self {
            StoreError::BadInput(_) => StoreError::BadInput,
            StoreError::Corrupt(_) => StoreError::Corrupt,
            StoreError::Io(_) => StoreError::Io,
            StoreError::Other(_) => StoreError::Other,
        }
    }
}

/// An anyhow chain keeps the kind an inner function raised (or a `StoreError` it passed through);
/// anything unmarked is sorted by its cause.
impl From<anyhow::Error> for StoreError {
    fn from(e: anyhow::Error) -> Self {
        StoreError::sort(e)
    }
}

/// `Result` with a [`StoreError`].
pub type StoreResult<T> = std::result::Result<T, StoreError>;

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

/// `ensure!` raising a bad-input error.
macro_rules! ensure_input {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            return Err($crate::error::bad_input!($($arg)*).into());
        }
    };
}

/// `ensure!` raising a corrupt-file error.
macro_rules! ensure_intact {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            return Err($crate::error::corrupt!($($arg)*).into());
        }
    };
}

pub(crate) use {bad_input, corrupt, ensure_input, ensure_intact};

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
