//! `saekit.SAE`: load and save SAE folders, weights as zero-copy numpy views, encode and decode.

use std::path::PathBuf;

use numpy::ndarray::{ArrayView1, ArrayView2};
use numpy::{PyArray1, PyArray2, PyReadonlyArrayDyn};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use saekit_sae::{Activation, Sae, SparseCodes};

use crate::arrays;
use crate::errors::{detached, existing, to_pyobject};

/// A sparse autoencoder in raw activation space (SAELens conventions: `W_enc` is `[d_in, d_sae]`,
/// `W_dec` is `[d_sae, d_in]`). Immutable: the weight arrays are read-only views of its memory.
#[pyclass(frozen, module = "saekit", name = "SAE")]
pub struct PySae {
    pub sae: Sae,
}

#[pymethods]
impl PySae {
    /// Load a saekit / SAELens (v6 or legacy) / sparsify folder or a Gemma Scope `params.npz`; folders
    /// saekit cannot read faithfully are refused with the reason.
    #[staticmethod]
    fn load(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let path = existing(&path, "SAE folder or file")?;
        let sae = detached(py, || saekit_sae::load_sae(&path))?;
        Ok(PySae { sae })
    }

    /// Write a SAELens v6 folder (`cfg.json`, `sae_weights.safetensors`).
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        let sae = &self.sae;
        detached(py, || saekit_sae::save_saelens(&path, sae, None, None))
    }

    /// The SAELens-style config: d_in, d_sae, architecture, k (TopK), apply_b_dec_to_input, metadata.
    #[getter]
    fn cfg<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = &self.sae;
        let d = PyDict::new(py);
        d.set_item("d_in", s.d_in)?;
        d.set_item("d_sae", s.d_sae)?;
        let (arch, k) = match s.activation {
            Activation::TopK { k } => ("topk", Some(k)),
            Activation::JumpRelu => ("jumprelu", None),
            Activation::Relu => ("standard", None),
        };
        d.set_item("architecture", arch)?;
        d.set_item("k", k)?;
        d.set_item("apply_b_dec_to_input", s.apply_b_dec_to_input)?;
        d.set_item("dtype", "float32")?;
        d.set_item("metadata", to_pyobject(py, &s.metadata)?)?;
        Ok(d)
    }

    #[getter]
    fn d_in(&self) -> usize {
        self.sae.d_in
    }

    #[getter]
    fn d_sae(&self) -> usize {
        self.sae.d_sae
    }

    /// `[d_in, d_sae]`: a transposed view of saekit's latent-major encoder (no copy).
    #[getter(W_enc)]
    fn w_enc<'py>(this: Bound<'py, Self>) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let s = &this.get().sae;
        let view = matrix(&s.params.w_enc, s.d_sae, s.d_in)?.reversed_axes();
        read_only(unsafe { PyArray2::borrow_from_array(&view, this.clone().into_any()) })
    }

    /// `[d_sae, d_in]` (no copy).
    #[getter(W_dec)]
    fn w_dec<'py>(this: Bound<'py, Self>) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let s = &this.get().sae;
        let view = matrix(&s.params.w_dec, s.d_sae, s.d_in)?;
        read_only(unsafe { PyArray2::borrow_from_array(&view, this.clone().into_any()) })
    }

    /// `[d_sae]` (no copy).
    #[getter]
    fn b_enc<'py>(this: Bound<'py, Self>) -> PyResult<Bound<'py, PyArray1<f32>>> {
        vector(&this, |s| &s.params.b_enc)
    }

    /// `[d_in]` (no copy).
    #[getter]
    fn b_dec<'py>(this: Bound<'py, Self>) -> PyResult<Bound<'py, PyArray1<f32>>> {
        vector(&this, |s| &s.params.b_dec)
    }

    /// `[d_sae]` JumpReLU thresholds (no copy); None for other architectures.
    #[getter]
    fn threshold<'py>(this: Bound<'py, Self>) -> PyResult<Option<Bound<'py, PyArray1<f32>>>> {
        if this.get().sae.params.threshold.is_empty() {
            return Ok(None);
        }
        vector(&this, |s| &s.params.threshold).map(Some)
    }

    /// Feature activations of `x` (float32 `[..., d_in]`, C-contiguous): dense `[..., d_sae]`, or with
    /// `sparse=True` one row per input row as a `scipy.sparse.csr_matrix` `[N, d_sae]` when scipy is
    /// installed, else `(indices, values)` in `torch.sparse_coo_tensor` form: int64 `[2, nnz]` (row,
    /// feature) and float32 `[nnz]`.
    #[pyo3(signature = (x, sparse=false))]
    fn encode<'py>(&self, py: Python<'py>, x: &Bound<'py, PyAny>, sparse: bool) -> PyResult<Bound<'py, PyAny>> {
        let arr = arrays::borrow::<f32>(x, "x")?;
        let (data, lead) = arrays::rows_f32(&arr, self.sae.d_in, "x")?;
        let sae = &self.sae;
        let codes = detached(py, || Ok(sae.encode(data)))?;
        if sparse {
            return sparse_out(py, codes, sae.d_sae);
        }
        let mut dense = vec![0f32; codes.rows() * sae.d_sae];
        for r in 0..codes.rows() {
            let (idx, val) = codes.row(r);
            for (&j, &v) in idx.iter().zip(val) {
                dense[r * sae.d_sae + j as usize] = v;
            }
        }
        Ok(arrays::owned(py, dense, &[lead, vec![sae.d_sae]].concat())?.into_any())
    }

    /// Reconstruction `[..., d_in]` from feature activations: a dense float32 `[..., d_sae]` array or a
    /// scipy sparse matrix `[N, d_sae]`.
    fn decode<'py>(&self, py: Python<'py>, f: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let (codes, lead) = if f.hasattr("tocsr")? {
            csr_codes(f, self.sae.d_sae)?
        } else {
            let arr = arrays::borrow::<f32>(f, "f")?;
            let (data, lead) = arrays::rows_f32(&arr, self.sae.d_sae, "f")?;
            (dense_codes(data, self.sae.d_sae), lead)
        };
        let sae = &self.sae;
        let x = detached(py, || Ok(sae.decode(&codes)))?;
        Ok(arrays::owned(py, x, &[lead, vec![sae.d_in]].concat())?.into_any())
    }

    fn __repr__(&self) -> String {
        let s = &self.sae;
        format!("saekit.SAE(d_in={}, d_sae={}, {:?}, hook={:?})", s.d_in, s.d_sae, s.activation, s.metadata.hook_name)
    }
}

impl PySae {
    /// An `SAE` object as given, or one loaded from a path.
    pub fn from_arg<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PySae>> {
        if let Ok(s) = obj.cast::<PySae>() {
            return Ok(s.clone());
        }
        let path: PathBuf = obj.extract().map_err(|_| PyValueError::new_err("sae: expected a saekit.SAE or a path"))?;
        Bound::new(obj.py(), PySae::load(obj.py(), path)?)
    }
}

fn matrix(data: &[f32], rows: usize, cols: usize) -> PyResult<ArrayView2<'_, f32>> {
    ArrayView2::from_shape((rows, cols), data).map_err(|e| PyValueError::new_err(format!("internal: {e}")))
}

/// A read-only numpy view of one of the SAE's vectors, keeping the SAE alive.
fn vector<'py>(this: &Bound<'py, PySae>, field: impl Fn(&Sae) -> &Vec<f32>) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let view = ArrayView1::from(field(&this.get().sae).as_slice());
    // SAFETY: the array's base is the (frozen, never mutated) SAE object, so the Vec behind the view
    // is neither freed nor reallocated while numpy can reach it.
    read_only(unsafe { PyArray1::borrow_from_array(&view, this.clone().into_any()) })
}

/// The SAE is immutable from Python (its weights are shared with running computations).
fn read_only<'py, D: numpy::ndarray::Dimension>(
    arr: Bound<'py, numpy::PyArray<f32, D>>,
) -> PyResult<Bound<'py, numpy::PyArray<f32, D>>> {
    let kwargs = PyDict::new(arr.py());
    kwargs.set_item("write", false)?;
    arr.as_any().call_method("setflags", (), Some(&kwargs))?;
    Ok(arr)
}

fn sparse_out(py: Python<'_>, codes: SparseCodes, d_sae: usize) -> PyResult<Bound<'_, PyAny>> {
    let rows = codes.rows();
    match py.import("scipy.sparse") {
        Ok(sp) => {
            let indptr: Vec<i64> = codes.indptr.iter().map(|&i| i as i64).collect();
            let indices: Vec<i32> = codes.idx.iter().map(|&j| j as i32).collect();
            let data = PyTuple::new(
                py,
                [
                    PyArray1::from_vec(py, codes.val).into_any(),
                    PyArray1::from_vec(py, indices).into_any(),
                    PyArray1::from_vec(py, indptr).into_any(),
                ],
            )?;
            sp.getattr("csr_matrix")?.call1((data, (rows, d_sae)))
        }
        Err(_) => {
            let nnz = codes.idx.len();
            let mut coo = Vec::with_capacity(2 * nnz);
            for r in 0..rows {
                coo.extend(std::iter::repeat_n(r as i64, codes.indptr[r + 1] - codes.indptr[r]));
            }
            coo.extend(codes.idx.iter().map(|&j| j as i64));
            let indices = arrays::owned(py, coo, &[2, nnz])?;
            Ok(PyTuple::new(py, [indices.into_any(), PyArray1::from_vec(py, codes.val).into_any()])?.into_any())
        }
    }
}

/// The non-zero entries of dense codes `[rows, d_sae]`.
fn dense_codes(data: &[f32], d_sae: usize) -> SparseCodes {
    let mut c = SparseCodes { indptr: vec![0], ..Default::default() };
    for row in data.chunks(d_sae) {
        for (j, &v) in row.iter().enumerate().filter(|(_, v)| **v != 0.0) {
            c.idx.push(j as u32);
            c.val.push(v);
        }
        c.indptr.push(c.idx.len());
    }
    c
}

/// A scipy sparse matrix `[N, d_sae]` as codes (through `.tocsr()` and numpy casts).
fn csr_codes(f: &Bound<'_, PyAny>, d_sae: usize) -> PyResult<(SparseCodes, Vec<usize>)> {
    let shape: (usize, usize) = f.getattr("shape")?.extract()?;
    if shape.1 != d_sae {
        return Err(PyValueError::new_err(format!("f: expected shape [N, {d_sae}], got [{}, {}]", shape.0, shape.1)));
    }
    let csr = f.call_method0("tocsr")?;
    let indptr: Vec<i64> = csr_part(&csr, "indptr", "int64")?;
    let idx: Vec<i64> = csr_part(&csr, "indices", "int64")?;
    let val: Vec<f32> = csr_part(&csr, "data", "float32")?;
    let consistent = indptr.len() == shape.0 + 1
        && indptr.first() == Some(&0)
        && indptr.windows(2).all(|w| w[0] <= w[1])
        && indptr.last() == Some(&(idx.len() as i64))
        && val.len() == idx.len();
    if !consistent || idx.iter().any(|&j| j < 0 || j as usize >= d_sae) {
        return Err(PyValueError::new_err("f: malformed sparse matrix (indptr/indices/data disagree)"));
    }
    let codes = SparseCodes {
        indptr: indptr.into_iter().map(|i| i as usize).collect(),
        idx: idx.into_iter().map(|j| j as u32).collect(),
        val,
    };
    Ok((codes, vec![shape.0]))
}

/// One array of a CSR matrix, cast by numpy to `dtype` and copied out.
fn csr_part<T: numpy::Element + Copy>(csr: &Bound<'_, PyAny>, name: &str, dtype: &str) -> PyResult<Vec<T>> {
    let np = csr.py().import("numpy")?;
    let a = np.call_method1("ascontiguousarray", (csr.getattr(name)?, dtype))?;
    let a: PyReadonlyArrayDyn<'_, T> = arrays::borrow(&a, name)?;
    Ok(a.as_slice().map_err(|e| PyValueError::new_err(format!("f.{name}: {e}")))?.to_vec())
}
