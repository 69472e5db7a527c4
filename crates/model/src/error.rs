//! The error of this crate's public entry points ([`crate::Model::load`], [`crate::Model::forward`],
//! generation), by whose fault it is: the caller's input, the model file, the disk, or saekit itself.
//!
//! The functions inside the crate return `anyhow` as before; the entry points sort what comes out. An inner
//! function that knows it is looking at bad input returns `ModelError::BadInput(..)` converted into anyhow,
//! and [`From<anyhow::Error>`] takes it back out, so the kind survives the trip through `?`.

/// What went wrong in saekit-model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The call does not fit the model: a token id outside the vocabulary, a sequence past the context
    /// length, a hook point the model lacks, an empty prompt, out-of-range sampling settings.
    #[error("{0}")]
    BadInput(String),
    /// The model file or folder is missing, or is not a model saekit can load (malformed, truncated,
    /// unsupported architecture or quantization).
    #[error(transparent)]
    BadFile(anyhow::Error),
    /// A model file could not be read from disk (permissions, an I/O failure).
    #[error(transparent)]
    Io(anyhow::Error),
    /// Anything else: a hook that failed, NaN logits, a bug in saekit.
    #[error(transparent)]
    Internal(anyhow::Error),
}

impl ModelError {
    /// A [`ModelError::BadInput`] with this message.
    pub fn bad_input(message: impl Into<String>) -> Self {
        Self::BadInput(message.into())
    }

    /// Sort an error from loading a model file: a failure of the disk or the system (permissions, a device
    /// error) is [`Self::Io`]; a missing, truncated or malformed file is the file's fault ([`Self::BadFile`]).
    pub(crate) fn from_load(e: anyhow::Error) -> Self {
        use std::io::ErrorKind as K;
        let io_failure = e
            .chain()
            .filter_map(|c| c.downcast_ref::<std::io::Error>())
            .any(|io| !matches!(io.kind(), K::NotFound | K::UnexpectedEof | K::InvalidData | K::InvalidInput));
        if io_failure {
            Self::Io(e)
        } else {
            Self::BadFile(e)
        }
    }
}

/// An anyhow error that carries a `ModelError` (raised as such by an inner function) keeps its kind; any
/// other is [`ModelError::Internal`].
impl From<anyhow::Error> for ModelError {
    fn from(e: anyhow::Error) -> Self {
        match e.downcast::<ModelError>() {
            Ok(typed) => typed,
            Err(e) => Self::Internal(e),
        }
    }
}

/// `Result` with a [`ModelError`].
pub type ModelResult<T> = std::result::Result<T, ModelError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_typed_error_survives_anyhow() {
        let raised: anyhow::Error = ModelError::bad_input("token 9 is outside the vocabulary").into();
        assert!(matches!(ModelError::from(raised), ModelError::BadInput(m) if m.contains("token 9")));
        assert!(matches!(ModelError::from(anyhow::anyhow!("hook failed")), ModelError::Internal(_)));
    }

    #[test]
    fn load_errors_are_sorted_by_their_io_cause() {
        let denied = std::io::Error::new(std::io::ErrorKind::PermissionDenied, "denied");
        let e = anyhow::Error::from(denied).context("model.gguf: cannot read");
        assert!(matches!(ModelError::from_load(e), ModelError::Io(_)));
        let missing = std::io::Error::new(std::io::ErrorKind::NotFound, "missing");
        assert!(matches!(ModelError::from_load(missing.into()), ModelError::BadFile(_)));
        let truncated = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "failed to fill whole buffer");
        assert!(matches!(ModelError::from_load(truncated.into()), ModelError::BadFile(_)));
        assert!(matches!(ModelError::from_load(anyhow::anyhow!("bad magic")), ModelError::BadFile(_)));
    }
}
