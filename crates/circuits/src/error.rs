//! The error of this crate's public entry points, by whose fault it is: the caller's input (a transcoder
//! folder or config that does not fit, a set for another model, a prompt too long, a node the graph lacks),
//! a damaged transcoder file, the disk, or saekit.
//!
//! Inside the crate functions return `anyhow` and raise a known kind with `bad_input!` or `corrupt!`
//! (or their `bail_*` forms, or `Fault::mark` on an error from elsewhere: saekit-files' tagging, which
//! saekit-store and saekit-analysis share); the kind survives any context added on the way out, and
//! `From<anyhow::Error>` reads it off the chain at the boundary. Every message is kept whole.

use saekit_files::Fault;

/// What went wrong in saekit-circuits; each kind holds the whole message chain (the file first).
#[derive(Debug, thiserror::Error)]
pub enum CircuitsError {
    /// The call or a file given to it does not fit: a folder that is not a transcoder set, a config or
    /// tensor of the wrong shape, a set whose layers are not the model's, an empty or too long prompt, an
    /// intervention on a feature or position the graph lacks, a setting out of range, a missing path.
    #[error(transparent)]
    BadInput(anyhow::Error),
    /// A file is damaged: a safetensors file that cannot be parsed.
    #[error(transparent)]
    Corrupt(anyhow::Error),
    /// Reading or writing failed (permissions, a full disk, a device error).
    #[error(transparent)]
    Io(anyhow::Error),
    /// Anything else: the model failed during a forward pass, a bug in saekit.
    #[error(transparent)]
    Other(anyhow::Error),
}

impl CircuitsError {
    /// What the errors of this crate and the model say about whose fault they are: a `CircuitsError`
    /// passed through keeps its variant, a model error is sorted by its own kind.
    fn told_by(cause: &(dyn std::error::Error + 'static)) -> Option<Fault> {
        if let Some(typed) = cause.downcast_ref::<CircuitsError>() {
            return Some(typed.fault());
        }
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

saekit_files::fault_error!(CircuitsError, CircuitsError::told_by);

/// A model error keeps the model's own sorting (a prompt past the context is bad input).
impl From<saekit_model::ModelError> for CircuitsError {
    fn from(e: saekit_model::ModelError) -> Self {
        anyhow::Error::from(e).into()
    }
}

/// `Result` with a [`CircuitsError`].
pub type CircuitsResult<T> = std::result::Result<T, CircuitsError>;

pub(crate) use saekit_files::{bad_input, bail_input, corrupt};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_transcoder_folder_is_bad_input_and_keeps_its_message() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nothing-here");
        let e = crate::TranscoderSet::load(&missing).unwrap_err();
        assert!(matches!(e, CircuitsError::BadInput(_)), "{e:?}");
        assert_eq!(e.to_string(), format!("{}: not a folder of transcoders", missing.display()));
        let passed_through =
            anyhow::Error::from(CircuitsError::from(corrupt!("t.safetensors: not a safetensors file"))).context("load");
        assert!(matches!(CircuitsError::from(passed_through), CircuitsError::Corrupt(_)));
    }

    #[test]
    fn unmarked_errors_are_sorted_by_their_cause() {
        use std::io::{Error, ErrorKind};
        let io = |kind| CircuitsError::from(anyhow::Error::from(Error::new(kind, "x")).context("f: cannot read"));
        assert!(matches!(io(ErrorKind::NotFound), CircuitsError::BadInput(_)));
        assert!(matches!(io(ErrorKind::PermissionDenied), CircuitsError::Io(_)));
        assert!(matches!(CircuitsError::from(anyhow::anyhow!("a bug")), CircuitsError::Other(_)));
    }
}
