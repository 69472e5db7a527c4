//! saekit-python: the `saekit` Python package (`import saekit`), a PyO3 extension built by maturin.
//!
//! Owns: the conversions between Python/numpy and the library crates (arrays in and out, keyword
//! arguments to configs, errors to exceptions), releasing the GIL around heavy work, and turning Ctrl-C
//! into `KeyboardInterrupt`. Must not touch: any computation of its own. Every number it returns comes
//! from saekit-model, -sae, -analysis or -steer, so the Python API and the CLI cannot disagree.
//!
//! A member of the root workspace: one Cargo.lock, so the library crates build against the same
//! dependency versions as the CLI, and scripts/test.sh builds the extension with the workspace's dev
//! profile, reusing what `cargo test --workspace` compiled. A user's `pip install ./python` builds it in
//! release mode.
//!
//! Errors, by the kind the library crates' typed errors give them (`errors::to_py`): arguments the caller
//! got wrong raise `ValueError` (`TypeError` for a wrong array dtype or a non-array), a damaged file saekit
//! wrote `saekit.CorruptFileError` (a `ValueError`), files that are missing or unreadable `OSError`
//! (`FileNotFoundError` when absent, `PermissionError`), a failure inside saekit or the model
//! `RuntimeError`, all with saekit's own one-line messages; a Rust panic is caught and raised as
//! `RuntimeError` too.

mod arrays;
mod errors;
mod feature_db;
mod model;
mod sae;
mod train;

use pyo3::prelude::*;

#[pymodule]
fn _saekit(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<model::PyModel>()?;
    m.add_class::<sae::PySae>()?;
    m.add_class::<feature_db::PyFeatureDb>()?;
    m.add_function(wrap_pyfunction!(train::train, m)?)?;
    m.add_function(wrap_pyfunction!(feature_db::search, m)?)?;
    m.add_function(wrap_pyfunction!(feature_db::search_contrast, m)?)?;
    m.add_function(wrap_pyfunction!(feature_db::steering_features, m)?)?;
    m.add_function(wrap_pyfunction!(model::default_model_path, m)?)?;
    m.add("CorruptFileError", m.py().get_type::<errors::CorruptFileError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
