//! numpy arrays in and out: checked borrows of float32 inputs, zero-copy outputs.

use numpy::{
    Element, PyArray1, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArray,
    PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

/// A read-only borrow of a C-contiguous numpy array of `T`; `TypeError` for anything else than a
/// numpy array of that dtype, `ValueError` for a non-contiguous one (no silent copies).
pub fn borrow<'py, T: Element>(obj: &Bound<'py, PyAny>, name: &str) -> PyResult<PyReadonlyArrayDyn<'py, T>> {
    let py = obj.py();
    let arr = obj.cast::<PyUntypedArray>().map_err(|_| {
        PyTypeError::new_err(format!(
            "{name}: expected a numpy array, got {}",
            obj.get_type().name().map(|n| n.to_string()).unwrap_or_default()
        ))
    })?;
    let want = numpy::dtype::<T>(py);
    if !arr.dtype().is_equiv_to(&want) {
        return Err(PyTypeError::new_err(format!(
            "{name}: expected dtype {}, got {} (convert with .astype(np.{}))",
            want.str()?,
            arr.dtype().str()?,
            want.str()?
        )));
    }
    if !arr.is_c_contiguous() {
        return Err(PyValueError::new_err(format!(
            "{name}: the array is not C-contiguous (a slice or a transpose); pass np.ascontiguousarray({name})"
        )));
    }
    let typed = arr.cast::<PyArrayDyn<T>>().map_err(|e| PyTypeError::new_err(format!("{name}: {e}")))?;
    typed.try_readonly().map_err(|e| PyValueError::new_err(format!("{name}: {e}")))
}

/// A float32 array whose last axis has `width` entries: the data and the shape of the leading axes.
pub fn rows_f32<'a>(
    arr: &'a PyReadonlyArrayDyn<'_, f32>,
    width: usize,
    name: &str,
) -> PyResult<(&'a [f32], Vec<usize>)> {
    let shape = arr.shape().to_vec();
    match shape.split_last() {
        Some((&last, lead)) if last == width && !shape.contains(&0) => {
            let data = arr.as_slice().map_err(|e| PyValueError::new_err(format!("{name}: {e}")))?;
            Ok((data, lead.to_vec()))
        }
        _ => Err(PyValueError::new_err(format!("{name}: expected shape [..., {width}], got {shape:?}"))),
    }
}

/// Move `data` into a numpy array of `shape` without copying it.
pub fn owned<'py, T: Element>(py: Python<'py>, data: Vec<T>, shape: &[usize]) -> PyResult<Bound<'py, PyArrayDyn<T>>> {
    PyArray1::from_vec(py, data).reshape(shape.to_vec())
}
