//! saekit errors as Python exceptions, and running library work with the GIL released.

use std::path::{Path, PathBuf};

use pyo3::exceptions::{PyFileNotFoundError, PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;

/// An `anyhow` error from a library crate as the Python exception a caller expects: `OSError` when an
/// I/O error is in its chain (a file that cannot be read or written), else `ValueError` (bad
/// arguments, malformed contents). The message is saekit's, with its context chain.
pub fn to_py(e: impl Into<anyhow::Error>) -> PyErr {
    let e: anyhow::Error = e.into();
    let msg = format!("{e:#}");
    match e.chain().find_map(|c| c.downcast_ref::<std::io::Error>()) {
        Some(io) if io.kind() == std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(msg),
        Some(_) => PyOSError::new_err(msg),
        None => PyValueError::new_err(msg),
    }
}

/// A training error as the Python exception its kind calls for (files as `to_py` maps them).
pub fn sae_to_py(e: saekit_sae::SaeError) -> PyErr {
    match e {
        saekit_sae::SaeError::Io(io) => to_py(io),
        saekit_sae::SaeError::Other(e) => to_py(e),
        e => PyValueError::new_err(e.to_string()),
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
