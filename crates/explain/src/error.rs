//! The error of this crate's public entry points, by whose fault it is: the caller's input (a feature
//! range outside the database, an endpoint, key or model the chat API refuses), a damaged database, the
//! disk, or saekit.
//!
//! Inside the crate functions return `anyhow` and raise a known kind with `bad_input!` (saekit-files'
//! tagging, which saekit-store and saekit-analysis share); the kind survives any context added on the way
//! out, and `From<anyhow::Error>` reads it off the chain at the boundary, together with what an
//! `AnalysisError` or a [`ChatError`] underneath says. The chat client keeps its own [`ChatError`] (a
//! request that failed vs. a run that must stop). Every message is kept whole.

use saekit_files::Fault;

use crate::client::ChatError;

/// What went wrong in saekit-explain; each kind holds the whole message chain (the file first).
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    /// The call does not fit: a feature range outside the database, an endpoint that is not a plain-http
    /// URL, a key, URL or model the endpoint refuses (401/403/404), a database that does not exist or is
    /// not a feature database.
    #[error(transparent)]
    BadInput(anyhow::Error),
    /// The feature database is damaged.
    #[error(transparent)]
    Corrupt(anyhow::Error),
    /// Reading or writing failed (permissions, a full disk, a device error).
    #[error(transparent)]
    Io(anyhow::Error),
    /// Anything else: a chat request that kept failing, a bug in saekit.
    #[error(transparent)]
    Other(anyhow::Error),
}

impl ExplainError {
    /// What the errors of this crate, the feature database and the chat client say about whose fault
    /// they are: a stop (bad key, URL or model) is the caller's, a request that kept failing is not.
    fn told_by(cause: &(dyn std::error::Error + 'static)) -> Option<Fault> {
        if let Some(typed) = cause.downcast_ref::<ExplainError>() {
            return Some(typed.fault());
        }
        if let Some(analysis) = cause.downcast_ref::<saekit_analysis::AnalysisError>() {
            return Some(analysis.fault());
        }
        Some(match cause.downcast_ref::<ChatError>()? {
            ChatError::Fatal(_) => Fault::BadInput,
            ChatError::Failed(_) => Fault::Other,
        })
    }
}

saekit_files::fault_error!(ExplainError, ExplainError::told_by);

/// The feature database's error keeps its kind.
impl From<saekit_analysis::AnalysisError> for ExplainError {
    fn from(e: saekit_analysis::AnalysisError) -> Self {
        anyhow::Error::from(e).into()
    }
}

/// A chat client's error: a stop is the caller's (bad endpoint, key or model), a failed request is not.
impl From<ChatError> for ExplainError {
    fn from(e: ChatError) -> Self {
        anyhow::Error::from(e).into()
    }
}

/// `Result` with an [`ExplainError`].
pub type ExplainResult<T> = std::result::Result<T, ExplainError>;

pub(crate) use saekit_files::bail_input;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_feature_range_past_the_database_is_bad_input_and_keeps_its_message() {
        let e = crate::run::parse_feature_list("0-10", 10).unwrap_err();
        assert!(matches!(e, ExplainError::BadInput(_)), "{e:?}");
        assert_eq!(e.to_string(), "--features: '0-10' is not within 0-9");
        let e = crate::run::parse_feature_list("x", 10).unwrap_err();
        assert!(matches!(e, ExplainError::BadInput(_)), "{e:?}");
        assert_eq!(e.to_string(), "--features: 'x' is not an id or a range like 0-999");
    }

    #[test]
    fn a_stopped_chat_is_bad_input_and_a_failed_one_is_not() {
        let opts = crate::ClientOptions {
            endpoint: "ftp://x".into(),
            model: "m".into(),
            api_key: None,
            timeout: std::time::Duration::from_secs(1),
            retries: 0,
            backoff: std::time::Duration::from_millis(1),
        };
        let refused = crate::ChatClient::new(opts).err().expect("an ftp endpoint is refused");
        assert!(matches!(ExplainError::from(refused), ExplainError::BadInput(_)));
        let failed = ChatError::Failed("u after 3 attempts: 503".into());
        assert!(matches!(ExplainError::from(failed), ExplainError::Other(_)));
    }
}
