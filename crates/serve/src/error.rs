//! Every error the server answers with, and the one place that picks its HTTP status
//! ([`ServeError::status`]). `/api` writes it as `{"error": "..."}` ([`ServeError`]'s `IntoResponse`), `/v1`
//! in OpenAI's shape (`openai::OaiError`, which wraps a `ServeError`); both take the status from here.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use saekit_analysis::AnalysisError;
use saekit_circuits::CircuitsError;
use saekit_model::ModelError;
use saekit_steer::SteerError;

/// What went wrong with a request, by whose fault.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The request is malformed or a value is out of range (400).
    #[error("{0}")]
    BadRequest(String),
    /// The request names a feature, endpoint or model that does not exist (404).
    #[error("{0}")]
    NotFound(String),
    /// A well-formed request the model cannot take: more tokens than the limit or the context, edits the
    /// SAE refuses (422).
    #[error("{0}")]
    Unprocessable(String),
    /// Refused before a handler saw it, with the status the HTTP layer chose (413 body too large, 415 wrong
    /// content type, 422 JSON of the wrong shape, 405 wrong method).
    #[error("{message}")]
    Refused {
        /// The status the HTTP layer answered with.
        status: StatusCode,
        /// Its explanation.
        message: String,
    },
    /// The model queue is full: this many requests are already waiting (503, with `Retry-After`).
    #[error("the model is busy ({0} requests already waiting); try again in a moment")]
    Busy(usize),
    /// Started without a model and SAE, so model routes are off (503).
    #[error("this server was started without a model and SAE (saekit serve --sae DIR): {0} off")]
    NoModel(&'static str),
    /// Everything else: the database could not be read, the model worker stopped or failed, a bug (500).
    #[error(transparent)]
    Internal(anyhow::Error),
}

impl ServeError {
    /// The HTTP status of each kind of error; the only place the server decides one.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            // the HTTP layer's refusals are client errors; a success status here would be a bug in axum
            Self::Refused { status, .. } if status.is_client_error() => *status,
            Self::Refused { .. } => StatusCode::BAD_REQUEST,
            Self::Busy(_) | Self::NoModel(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The message a client reads: the whole cause chain on one line.
    pub fn message(&self) -> String {
        format!("{self:#}")
    }

    /// An internal error with this message.
    pub(crate) fn internal(message: impl std::fmt::Display) -> Self {
        Self::Internal(anyhow::anyhow!("{message}"))
    }

    /// `response` with the headers every answer of this kind carries: `Retry-After` when busy (OpenAI's
    /// clients retry with backoff on it), and a log line for a failure of the server's own.
    pub(crate) fn finish(&self, mut response: Response) -> Response {
        let status = self.status();
        if matches!(self, Self::Internal(_)) {
            tracing::warn!(status = %status, "{}", self.message());
        }
        if matches!(self, Self::Busy(_)) {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

impl IntoResponse for ServeError {
    fn into_response(self) -> Response {
        let response = (self.status(), Json(serde_json::json!({ "error": self.message() }))).into_response();
        self.finish(response)
    }
}

/// The model's own sorting: input it refuses is the request's fault (422), anything else the server's.
impl From<ModelError> for ServeError {
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::BadInput(m) => Self::Unprocessable(m),
            e @ (ModelError::BadFile(_) | ModelError::Io(_) | ModelError::Internal(_)) => Self::Internal(e.into()),
        }
    }
}

impl From<SteerError> for ServeError {
    fn from(e: SteerError) -> Self {
        match e {
            SteerError::BadInput(m) => Self::Unprocessable(m),
            SteerError::Model(e) => e.into(),
            SteerError::Lookup(e) => Self::Internal(e),
        }
    }
}

/// The circuits crate's sorting: a transcoder set, prompt or node edit it refuses as bad input is the
/// request's fault (422); a damaged transcoder file, a failed forward pass or a bug is the server's (500).
impl From<CircuitsError> for ServeError {
    fn from(e: CircuitsError) -> Self {
        match e {
            CircuitsError::BadInput(e) => Self::Unprocessable(format!("{e:#}")),
            e @ (CircuitsError::Corrupt(_) | CircuitsError::Io(_) | CircuitsError::Other(_)) => {
                Self::Internal(e.into())
            }
        }
    }
}

/// The feature database's sorting: a read it refuses as bad input is the request's fault (422); a damaged
/// database, a failed read or a bug is the server's (500).
impl From<AnalysisError> for ServeError {
    fn from(e: AnalysisError) -> Self {
        match e {
            AnalysisError::BadInput(e) => Self::Unprocessable(format!("{e:#}")),
            e @ (AnalysisError::Corrupt(_) | AnalysisError::Io(_) | AnalysisError::Other(_)) => {
                Self::Internal(e.into())
            }
        }
    }
}

/// `Result` with a [`ServeError`].
pub type ServeResult<T> = std::result::Result<T, ServeError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_errors_are_the_request_s_fault_only_when_the_model_says_so() {
        let bad = ServeError::from(ModelError::bad_input("token id 99999 is outside the vocabulary"));
        assert_eq!(bad.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let hook = ServeError::from(ModelError::Internal(anyhow::anyhow!("a hook failed")));
        assert_eq!(hook.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let steer = ServeError::from(SteerError::Model(ModelError::bad_input("the prompt is empty")));
        assert_eq!(steer.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let twice = ServeError::from(SteerError::BadInput("feature 3 is edited more than once".into()));
        assert_eq!(twice.status(), StatusCode::UNPROCESSABLE_ENTITY);
    }

    #[test]
    fn database_errors_are_the_request_s_fault_only_when_the_database_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let missing = saekit_analysis::FeatureDb::open(&dir.path().join("features.sqlite")).err().unwrap();
        let refused = ServeError::from(missing);
        assert_eq!(refused.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert!(refused.message().contains("features.sqlite"), "{}", refused.message());
        let truncated = AnalysisError::from(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
        assert!(matches!(truncated, AnalysisError::Corrupt(_)));
        assert_eq!(ServeError::from(truncated).status(), StatusCode::INTERNAL_SERVER_ERROR);
        let denied = AnalysisError::from(std::io::Error::from(std::io::ErrorKind::PermissionDenied));
        assert!(matches!(denied, AnalysisError::Io(_)));
        assert_eq!(ServeError::from(denied).status(), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn a_busy_answer_says_when_to_retry() {
        let r = ServeError::Busy(4).into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
    }
}
