//! saekit errors as Python exceptions, and running library work with the GIL released.

use std::path::{Path, PathBuf};

use pyo3::exceptions::{PyFileNotFoundError, PyOSError, PyPermissionError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use saekit_files::Fault;

pyo3::create_exception!(
    saekit,
    CorruptFileError,
    PyValueError,
    "A file saekit wrote is damaged (a checksum mismatch, a truncated or inconsistent file); the message \
     names it. Delete it and write it again (a run's checkpoint: restart the run)."
);

/// An error from a library crate as the Python exception its kind calls for, with saekit's message
/// and its context chain. The first typed error in the chain (`StoreError`, `AnalysisError`, `SaeError`,
/// `ModelError`, `SteerError`) says whose fault it is: the caller's input raises `ValueError`
/// (`FileNotFoundError` for a path that does not exist), a damaged file saekit wrote
/// [`CorruptFileError`] (a `ValueError`), the disk `OSError` (`PermissionError`, `FileNotFoundError` by
/// the I/O error's kind), a failure inside saekit or the model `RuntimeError`. An error no typed error
/// sorted is taken by its cause, as before the crates had typed errors: an I/O error is an `OSError`,
/// anything else (an argument that does not parse) a `ValueError`.
pub fn to_py(e: impl Into<anyhow::Error>) -> PyErr {
    let e: anyhow::Error = e.into();
    let msg = format!("{e:#}");
    let io_kind = e.chain().find_map(io_error_in).map(std::io::Error::kind);
    let os_error = |msg: String| match io_kind {
        Some(std::io::ErrorKind::NotFound) => PyFileNotFoundError::new_err(msg),
        Some(std::io::ErrorKind::PermissionDenied) => PyPermissionError::new_err(msg),
        _ => PyOSError::new_err(msg),
    };
    match e.chain().find_map(fault_told_by_saekit) {
        Some(Fault::BadInput) if io_kind == Some(std::io::ErrorKind::NotFound) => PyFileNotFoundError::new_err(msg),
        Some(Fault::BadInput) => PyValueError::new_err(msg),
        Some(Fault::Corrupt) => CorruptFileError::new_err(msg),
        Some(Fault::Io) => os_error(msg),
        Some(Fault::Other) => PyRuntimeError::new_err(msg),
        None if io_kind.is_some() => os_error(msg),
        None => PyValueError::new_err(msg),
    }
}

/// The I/O error `cause` is or holds (an `SaeError::Io` reads as its I/O error but does not list it as
/// its source).
fn io_error_in<'a>(cause: &'a (dyn std::error::Error + 'static)) -> Option<&'a std::io::Error> {
    match cause.downcast_ref::<saekit_sae::SaeError>() {
        Some(saekit_sae::SaeError::Io(io)) => Some(io),
        _ => cause.downcast_ref::<std::io::Error>(),
    }
}

/// Whose fault `cause` says an error is, when it is one of the library crates' typed errors that tells
/// (an `SaeError::Other` or a `SteerError` of the model or a lookup leaves it to the causes below it).
fn fault_told_by_saekit(cause: &(dyn std::error::Error + 'static)) -> Option<Fault> {
    if let Some(e) = cause.downcast_ref::<saekit_store::StoreError>() {
        return Some(e.fault());
    }
    if let Some(e) = cause.downcast_ref::<saekit_analysis::AnalysisError>() {
        return Some(e.fault());
    }
    if let Some(e) = cause.downcast_ref::<saekit_sae::SaeError>() {
        use saekit_sae::SaeError as S;
        return match e {
            S::Config { .. } | S::BadInput(_) => Some(Fault::BadInput),
            S::Corrupt { .. } => Some(Fault::Corrupt),
            S::Io(_) => Some(Fault::Io),
            S::Other(_) => None,
        };
    }
    if let Some(e) = cause.downcast_ref::<saekit_model::ModelError>() {
        use saekit_model::ModelError as M;
        return Some(match e {
            M::BadInput(_) | M::BadFile(_) => Fault::BadInput,
            M::Io(_) => Fault::Io,
            M::Internal(_) => Fault::Other,
        });
    }
    match cause.downcast_ref::<saekit_steer::SteerError>() {
        Some(saekit_steer::SteerError::BadInput(_)) => Some(Fault::BadInput),
        _ => None,
    }
}

/// A path that must exist, else `FileNotFoundError` naming it (the library's own check would say the
/// same thing as a `ValueError`).
pub fn existing(path: &Path, what: &str) -> PyResult<PathBuf> {
    if path.exists() {
        Ok(path.to_path_buf())
    } else {
        Err(PyFileNotFoundError::new_err(format!("{}: no such {what}", path.display())))
    }
}

/// Run `f` with the GIL released; its error becomes a Python exception and a panic a `RuntimeError`
/// (never an abort of the interpreter).
pub fn detached<T, F>(py: Python<'_>, f: F) -> PyResult<T>
where
    T: Send,
    F: FnOnce() -> anyhow::Result<T> + Send,
{
    match py.detach(|| std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))) {
        Ok(r) => r.map_err(to_py),
        Err(payload) => Err(panic_error(payload)),
    }
}

pub fn panic_error(payload: Box<dyn std::any::Any + Send>) -> PyErr {
    let msg = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic");
    PyRuntimeError::new_err(format!("internal error in saekit (please report it): {msg}"))
}

/// A serde value as the Python object `json.loads` makes of it (dicts, lists, floats, ...).
pub fn to_pyobject<'py>(py: Python<'py>, v: &impl serde::Serialize) -> PyResult<Bound<'py, PyAny>> {
    let s = serde_json::to_string(v).map_err(|e| PyRuntimeError::new_err(format!("internal: {e}")))?;
    py.import("json")?.call_method1("loads", (s,))
}

/// A Python object (dict of plain values) as JSON, through `json.dumps`.
pub fn from_pyobject(obj: &Bound<'_, PyAny>) -> PyResult<serde_json::Value> {
    let s: String = obj.py().import("json")?.call_method1("dumps", (obj,))?.extract()?;
    serde_json::from_str(&s).map_err(|e| PyValueError::new_err(format!("not JSON-like: {e}")))
}
