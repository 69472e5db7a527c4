//! The crate's error at its public boundary: what went wrong, by kind, so a caller (the CLI, the
//! server, the Python module) can tell the user's mistake from a broken file or a bug.

use std::path::PathBuf;

/// Why an SAE could not be trained, loaded or saved.
#[derive(Debug, thiserror::Error)]
pub enum SaeError {
    /// A training setting is invalid; `field` is its TOML name (`--field-name` on the CLI).
    #[error("{field}: {message}")]
    Config {
        /// The setting's TOML name.
        field: &'static str,
        /// What is wrong with it and what would do.
        message: String,
    },
    /// The data or a file given as input cannot be used (bad shape, non-finite values, ...).
    #[error("{0}")]
    BadInput(String),
    /// A file saekit wrote is damaged (checksum mismatch, impossible progress, missing tensor).
    #[error("{path}: {message}")]
    Corrupt {
        /// The damaged file or folder.
        path: PathBuf,
        /// What is inconsistent.
        message: String,
    },
    /// Reading or writing failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Anything else, with its context chain (formats, sources and kernels report through anyhow).
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl SaeError {
    /// A [`SaeError::Config`] for `field`.
    pub fn config(field: &'static str, message: impl Into<String>) -> SaeError {
        SaeError::Config { field, message: message.into() }
    }

    /// A [`SaeError::Corrupt`] for `path`.
    pub fn corrupt(path: impl Into<PathBuf>, message: impl Into<String>) -> SaeError {
        SaeError::Corrupt { path: path.into(), message: message.into() }
    }
}

/// The crate's result type.
pub type Result<T, E = SaeError> = std::result::Result<T, E>;
