//! The crate's error at its public boundary, by kind: a name or file the caller gave that does not
//! resolve, a hub that cannot be reached or refuses, a download that fails its checksum, a local file
//! that cannot be read or written, or a failure of the client itself.

use std::path::PathBuf;

/// Why a listing, a download or a release name failed.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The caller's input does not resolve: an unknown release or SAE id, a registry file that is not a
    /// SAELens `pretrained_saes.yaml` (the message names the file).
    #[error("{0}")]
    BadInput(String),
    /// The hub could not be reached, refused the request (with a hint for 401/403/404), or answered with
    /// something that is not a listing.
    #[error("{0}")]
    Remote(String),
    /// A downloaded file does not match the hub's listing (size, SHA-256 or git blob SHA-1).
    #[error("{file}: {message}")]
    Corrupt {
        /// The file as `owner/name/path-in-repo`.
        file: String,
        /// What does not match, and what was done about it.
        message: String,
    },
    /// Reading or writing a local file failed.
    #[error("{}: {action}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done (`cannot read`, `cannot write the downloaded file`).
        action: &'static str,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
    /// The hub client could not be set up.
    #[error(transparent)]
    Other(anyhow::Error),
}

impl HubError {
    /// A [`HubError::Io`] for `path`.
    pub(crate) fn io(path: impl Into<PathBuf>, action: &'static str) -> impl FnOnce(std::io::Error) -> HubError {
        let path = path.into();
        move |source| HubError::Io { path, action, source }
    }
}

/// `Result` with a [`HubError`].
pub type Result<T, E = HubError> = std::result::Result<T, E>;
