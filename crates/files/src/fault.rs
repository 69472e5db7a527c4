//! Whose fault an error is, carried through an `anyhow` chain to a library crate's typed error.
//!
//! saekit-store and saekit-analysis return `anyhow` inside and a typed error (`StoreError`,
//! `AnalysisError`) at their public boundary, one variant per [`Fault`]. An inner function that knows
//! whose fault a failure is raises it marked ([`bad_input!`](crate::bad_input), [`corrupt!`](crate::corrupt),
//! their `bail_*` / `ensure_*` forms, or [`Fault::mark`] on an error from elsewhere); the mark survives
//! any context added on the way out, and the boundary reads it back with [`Fault::of`]. A mark changes
//! no message: the error reads exactly as the one it marks.

/// Whose fault a failure is: the four variants every saekit library error is sorted into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    /// The caller's: a flag or setting out of range, a file or folder given that is missing or is not
    /// what the call needs.
    BadInput,
    /// A file saekit wrote is damaged: a checksum mismatch, a truncated or inconsistent file.
    Corrupt,
    /// The disk's or the system's: permissions, a full disk, a device error.
    Io,
    /// Nothing in the chain says: a failed computation, a bug in saekit.
    Other,
}

impl Fault {
    /// `error` marked as this fault, its message and causes unchanged.
    pub fn mark(self, error: anyhow::Error) -> anyhow::Error {
        anyhow::Error::new(Marked { fault: self, error })
    }

    /// The fault of `error`: the first cause in its chain, outermost first, that tells. A cause tells by
    /// a [`mark`](Self::mark), by what `told_by` reads off the caller's own types (its typed error passed
    /// through, the errors of the crates underneath), or as a standard error ([`Fault::of_std`]).
    /// [`Fault::Other`] when none tells.
    pub fn of(error: &anyhow::Error, told_by: impl Fn(&(dyn std::error::Error + 'static)) -> Option<Fault>) -> Fault {
        let tells = |cause: &(dyn std::error::Error + 'static)| {
            cause.downcast_ref::<Marked>().map(|m| m.fault).or_else(|| told_by(cause)).or_else(|| Self::of_std(cause))
        };
        error.chain().find_map(tells).unwrap_or(Fault::Other)
    }

    /// What a standard error says by itself: an I/O error is the disk's, except a path that does not
    /// exist (the caller's) and a short or invalid read (a damaged file); a JSON error is a damaged file
    /// (saekit writes every JSON file it reads back). `None` for any other error.
    pub fn of_std(cause: &(dyn std::error::Error + 'static)) -> Option<Fault> {
        use std::io::ErrorKind as Io;
        if cause.is::<serde_json::Error>() {
            return Some(Fault::Corrupt);
        }
        let io = cause.downcast_ref::<std::io::Error>()?;
        Some(match io.kind() {
            Io::NotFound => Fault::BadInput,
            Io::UnexpectedEof | Io::InvalidData => Fault::Corrupt,
            _ => Fault::Io,
        })
    }
}

/// An error whose fault is known; it reads exactly as the error it marks.
#[derive(Debug)]
struct Marked {
    fault: Fault,
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

/// The `Fault` plumbing of a crate's error enum with the variants `BadInput`, `Corrupt`, `Io` and
/// `Other` (each holding an `anyhow::Error`): `fault()`, the variant of a fault, and
/// `From<anyhow::Error>`, which reads the kind an inner function raised off the chain and sorts anything
/// unmarked by its cause, asking the crate's own `told_by` first. The enum and its docs stay in the crate.
#[macro_export]
macro_rules! fault_error {
    ($error:ident, $told_by:path) => {
        impl $error {
            /// Whose fault this error is (its variant).
            pub fn fault(&self) -> $crate::Fault {
                match self {
                    $error::BadInput(_) => $crate::Fault::BadInput,
                    $error::Corrupt(_) => $crate::Fault::Corrupt,
                    $error::Io(_) => $crate::Fault::Io,
                    $error::Other(_) => $crate::Fault::Other,
                }
            }

            /// `e` as the variant of `fault`.
            fn with_fault(fault: $crate::Fault, e: anyhow::Error) -> $error {
                match fault {
                    $crate::Fault::BadInput => $error::BadInput(e),
                    $crate::Fault::Corrupt => $error::Corrupt(e),
                    $crate::Fault::Io => $error::Io(e),
                    $crate::Fault::Other => $error::Other(e),
                }
            }
        }

        /// An anyhow chain keeps the kind an inner function raised (or an error it passed through);
        /// anything unmarked is sorted by its cause.
        impl From<anyhow::Error> for $error {
            fn from(e: anyhow::Error) -> Self {
                $error::with_fault($crate::Fault::of(&e, $told_by), e)
            }
        }
    };
}

/// A bad-input error (the caller's fault) as `anyhow::Error`, formatted as `anyhow!`:
/// `return Err(bad_input!("{}: no hook {hook}", path.display()))`.
#[macro_export]
macro_rules! bad_input {
    ($($arg:tt)*) => {
        $crate::Fault::BadInput.mark($crate::__anyhow::anyhow!($($arg)*))
    };
}

/// A corrupt-file error (a file saekit wrote is damaged) as `anyhow::Error`, formatted as `anyhow!`.
#[macro_export]
macro_rules! corrupt {
    ($($arg:tt)*) => {
        $crate::Fault::Corrupt.mark($crate::__anyhow::anyhow!($($arg)*))
    };
}

/// `bail!` with a [`bad_input!`](crate::bad_input) error, in a function returning `anyhow::Result` or a
/// typed error that converts from `anyhow::Error`.
#[macro_export]
macro_rules! bail_input {
    ($($arg:tt)*) => {
        return Err($crate::bad_input!($($arg)*).into())
    };
}

/// `bail!` with a [`corrupt!`](crate::corrupt) error.
#[macro_export]
macro_rules! bail_corrupt {
    ($($arg:tt)*) => {
        return Err($crate::corrupt!($($arg)*).into())
    };
}

/// `ensure!` raising a [`bad_input!`](crate::bad_input) error.
#[macro_export]
macro_rules! ensure_input {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            $crate::bail_input!($($arg)*);
        }
    };
}

/// `ensure!` raising a [`corrupt!`](crate::corrupt) error.
#[macro_export]
macro_rules! ensure_intact {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            $crate::bail_corrupt!($($arg)*);
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    fn untold(_: &(dyn std::error::Error + 'static)) -> Option<Fault> {
        None
    }

    #[test]
    fn a_mark_survives_context_and_changes_no_message() {
        let e = bad_input!("store has no hook {:?}", "blocks.9").context("/tmp/s: cannot open");
        assert_eq!(Fault::of(&e, untold), Fault::BadInput);
        assert_eq!(format!("{e:#}"), "/tmp/s: cannot open: store has no hook \"blocks.9\"");
        let io = std::io::Error::new(std::io::ErrorKind::PermissionDenied, "denied");
        let marked = Fault::Corrupt.mark(anyhow::Error::from(io).context("shard 3"));
        assert_eq!(format!("{marked:#}"), "shard 3: denied");
        // the outermost cause that tells wins: the mark, not the I/O error under it
        assert_eq!(Fault::of(&marked.context("reader"), untold), Fault::Corrupt);
    }

    #[test]
    fn unmarked_errors_are_sorted_by_their_cause() {
        use std::io::{Error, ErrorKind};
        let io = |kind| Fault::of(&anyhow::Error::from(Error::new(kind, "x")).context("f: cannot read"), untold);
        assert_eq!(io(ErrorKind::NotFound), Fault::BadInput);
        assert_eq!(io(ErrorKind::UnexpectedEof), Fault::Corrupt);
        assert_eq!(io(ErrorKind::PermissionDenied), Fault::Io);
        let json = serde_json::from_str::<u32>("{").map_err(anyhow::Error::from).context("manifest.json");
        assert_eq!(Fault::of(&json.unwrap_err(), untold), Fault::Corrupt);
        assert_eq!(Fault::of(&anyhow::anyhow!("a bug"), untold), Fault::Other);
        // a caller's own reading comes before the standard one
        let told = |_: &(dyn std::error::Error + 'static)| Some(Fault::Io);
        assert_eq!(Fault::of(&anyhow::anyhow!("a bug"), told), Fault::Io);
    }

    #[test]
    fn the_bail_and_ensure_forms_return_marked_errors() {
        fn check(n: usize) -> anyhow::Result<()> {
            ensure_input!(n > 0, "n must be positive, got {n}");
            ensure_intact!(n < 10, "n is {n}, past the end");
            bail_input!("n is {n}")
        }
        let faults: Vec<Fault> = [0, 20, 5].map(|n| Fault::of(&check(n).unwrap_err(), untold)).to_vec();
        assert_eq!(faults, [Fault::BadInput, Fault::Corrupt, Fault::BadInput]);
        assert_eq!(check(0).unwrap_err().to_string(), "n must be positive, got 0");
    }
}
