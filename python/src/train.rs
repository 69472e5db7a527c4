//! `saekit.train`: the saekit trainer from Python, with progress lines, Ctrl-C and resume.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use pyo3::exceptions::{PyKeyboardInterrupt, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use saekit_sae::config::parse_count;
use saekit_sae::{ActivationSource, NpySource, RunOptions, StoreSource, TrainConfig};
use serde_json::Value;

use numpy::PyUntypedArrayMethods;

use crate::arrays;
use crate::errors::{detached, existing, from_pyobject, panic_error, to_py, to_pyobject};

/// The file an in-memory array is written to inside `out`, so `resume` finds the same rows.
const ARRAY_FILE: &str = "train_acts.npy";

/// Train an SAE like `saekit train` and return its metrics (a dict: steps, tokens, last-batch fvu/l0,
/// dead_frac, tokens_per_s, ...).
///
/// `acts`: a float32 numpy array `[N, d_in]` (written once to `out/train_acts.npy`, which the
/// trainer memory-maps), a `.npy` path, or an activation-store folder. Any `TrainConfig` field is a
/// keyword (`lr=1e-3`, `batch_size=1024`, `seed=1`, ...; `saekit train --print-config` lists them).
/// `resume=out` continues an interrupted run bit-identically. Ctrl-C stops after the step in flight,
/// writes a checkpoint and raises `KeyboardInterrupt`.
#[pyfunction]
#[pyo3(signature = (acts=None, out=None, arch=None, d_sae=None, k=None, tokens=None, resume=None, hook="",
    progress=true, **config))]
#[allow(clippy::too_many_arguments)]
pub fn train<'py>(
    py: Python<'py>,
    acts: Option<&Bound<'py, PyAny>>,
    out: Option<PathBuf>,
    arch: Option<&str>,
    d_sae: Option<usize>,
    k: Option<usize>,
    tokens: Option<&Bound<'py, PyAny>>,
    resume: Option<PathBuf>,
    hook: &str,
    progress: bool,
    config: Option<&Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyAny>> {
    let out = match (&resume, out) {
        (Some(r), _) => r.clone(),
        (None, Some(o)) => o,
        (None, None) => return Err(PyValueError::new_err("train: give out= (the output folder) or resume=")),
    };
    let overrides =
        arch.is_some() || d_sae.is_some() || k.is_some() || tokens.is_some() || config.is_some_and(|c| !c.is_empty());
    let mut cfg = match &resume {
        Some(_) if overrides => {
            return Err(PyValueError::new_err(
                "train: resume= continues the checkpoint's own config; drop the other settings",
            ))
        }
        // the newest checkpoint's config (data file, seed and recipe come from there)
        Some(dir) => resumed_config(dir)?,
        None => new_config(arch, d_sae, k, tokens, config)?,
    };
    cfg.out = out.to_string_lossy().into_owned();
    if let Some(a) = acts {
        cfg.acts = Some(acts_path(py, a, &out)?);
    }
    let Some(acts_path) = cfg.acts.clone() else {
        return Err(PyValueError::new_err("train: no activations: pass acts= (a numpy array, a .npy path or a store)"));
    };
    let mut src = open_source(py, &acts_path, hook, &cfg)?;
    let stop = Arc::new(AtomicBool::new(false));
    let opts = RunOptions { resume: resume.is_some(), stop: Some(Arc::clone(&stop)), ..RunOptions::default() };
    let outcome = run_interruptible(py, &cfg, src.as_mut(), &opts, &stop, progress)?;
    let metrics = to_pyobject(py, &outcome)?;
    if outcome.interrupted {
        return Err(PyKeyboardInterrupt::new_err(format!(
            "training stopped at step {} with a checkpoint in {}; saekit.train(resume={:?}) continues it",
            outcome.steps,
            out.join("checkpoints").display(),
            out.display()
        )));
    }
    Ok(metrics)
}

/// The default config with the keyword arguments laid over it (unknown keys are refused by serde).
fn new_config(
    arch: Option<&str>,
    d_sae: Option<usize>,
    k: Option<usize>,
    tokens: Option<&Bound<'_, PyAny>>,
    config: Option<&Bound<'_, PyDict>>,
) -> PyResult<TrainConfig> {
    let internal = |e: serde_json::Error| PyValueError::new_err(format!("internal: {e}"));
    let mut v = serde_json::to_value(TrainConfig::default()).map_err(internal)?;
    if let Some(c) = config {
        if let Value::Object(m) = from_pyobject(c.as_any())? {
            for (key, value) in m {
                v[key] = value;
            }
        }
    }
    if let Some(a) = arch {
        v["arch"] = Value::from(a.to_lowercase());
    }
    if let Some(d) = d_sae {
        v["d_sae"] = Value::from(d);
    }
    if let Some(k) = k {
        v["k"] = Value::from(k);
    }
    if let Some(t) = tokens {
        let n = match t.extract::<u64>() {
            Ok(n) => n,
            Err(_) => parse_count(&t.str()?.to_string()).map_err(to_py)?,
        };
        v["tokens"] = Value::from(n);
    }
    serde_json::from_value(v).map_err(|e| PyValueError::new_err(format!("train: {e}")))
}

/// A path as given, or an array written to `out/train_acts.npy`.
fn acts_path(py: Python<'_>, acts: &Bound<'_, PyAny>, out: &Path) -> PyResult<String> {
    if let Ok(p) = acts.extract::<PathBuf>() {
        return Ok(existing(&p, "activations file or store")?.to_string_lossy().into_owned());
    }
    let arr = arrays::borrow::<f32>(acts, "acts")?;
    let shape = arr.shape().to_vec();
    let [rows, cols] = shape[..] else {
        return Err(PyValueError::new_err(format!("acts: expected a 2-D array [N, d_in], got shape {shape:?}")));
    };
    let (data, _) = arrays::rows_f32(&arr, cols, "acts")?;
    let file = out.join(ARRAY_FILE);
    detached(py, || {
        std::fs::create_dir_all(out).with_context(|| format!("creating output folder {}", out.display()))?;
        saekit_sae::source::write_npy_f32(&file, data, rows, cols)
    })?;
    Ok(file.to_string_lossy().into_owned())
}

/// The source `saekit train --acts` would open for this path.
fn open_source(py: Python<'_>, acts: &str, hook: &str, cfg: &TrainConfig) -> PyResult<Box<dyn ActivationSource>> {
    let path = existing(Path::new(acts), "activations file or store")?;
    let (seed, batch) = (cfg.seed, cfg.batch_size);
    detached(py, || -> anyhow::Result<Box<dyn ActivationSource>> {
        if path.is_dir() {
            Ok(Box::new(StoreSource::open(&path, hook, seed, true, batch)?))
        } else if acts.ends_with(".npy") {
            Ok(Box::new(NpySource::open(&path, seed, true)?))
        } else {
            anyhow::bail!("{acts}: expected a float32 .npy file or an activation store folder")
        }
    })
}

/// Train on a worker thread while this (the interpreter's) thread, GIL released between polls,
/// watches for Ctrl-C and prints new metrics lines through Python's `print` (so they show in notebooks).
fn run_interruptible(
    py: Python<'_>,
    cfg: &TrainConfig,
    src: &mut dyn ActivationSource,
    opts: &RunOptions,
    stop: &AtomicBool,
    progress: bool,
) -> PyResult<saekit_sae::TrainOutcome> {
    let metrics = Path::new(&cfg.out).join("metrics.jsonl");
    let mut printed = 0usize;
    let mut pending: Option<PyErr> = None;
    let joined = std::thread::scope(|s| {
        let worker = s.spawn(|| saekit_sae::train(cfg, src, opts));
        while !worker.is_finished() {
            py.detach(|| wait_for(&worker, Duration::from_millis(200)));
            let mut interrupt = py.check_signals().err();
            if progress {
                let in_print;
                (printed, in_print) = print_new_lines(py, &metrics, printed, cfg.total_steps());
                interrupt = interrupt.or(in_print);
            }
            if let Some(e) = interrupt {
                stop.store(true, Ordering::Relaxed);
                pending.get_or_insert(e);
            }
        }
        worker.join()
    });
    let outcome = match joined {
        Ok(r) => r.map_err(to_py),
        Err(payload) => Err(panic_error(payload)),
    };
    // a Ctrl-C that came before the first step (or during a failure) still interrupts
    match (outcome, pending) {
        (Ok(o), Some(e)) if !o.interrupted => Err(e),
        (Ok(o), _) => Ok(o),
        (Err(e), _) => Err(e),
    }
}

fn wait_for<T>(worker: &std::thread::ScopedJoinHandle<'_, T>, total: Duration) {
    let step = Duration::from_millis(20);
    let mut waited = Duration::ZERO;
    while waited < total && !worker.is_finished() {
        std::thread::sleep(step);
        waited += step;
    }
}

/// Print metrics.jsonl lines past the first `printed` as one short line each; returns the new count,
/// and the `KeyboardInterrupt` that Python raised inside `print` if it did: the interpreter runs a
/// pending Ctrl-C's handler there too, so dropping print's error would lose the user's Ctrl-C.
fn print_new_lines(py: Python<'_>, metrics: &Path, printed: usize, total_steps: u64) -> (usize, Option<PyErr>) {
    let Ok(text) = std::fs::read_to_string(metrics) else { return (printed, None) };
    let lines: Vec<&str> = text.lines().collect();
    // a resumed run rewrites the file up to its checkpoint
    let start = if lines.len() < printed { 0 } else { printed };
    for line in &lines[start..] {
        let Ok(v) = serde_json::from_str::<Value>(line) else { continue };
        let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        let msg = format!(
            "step {}/{total_steps}  tokens {}  fvu {:.4}  l0 {:.1}  dead {:.1}%  {:.0} tokens/s",
            v["step"],
            v["tokens"],
            f("fvu"),
            f("l0"),
            f("dead_pct"),
            f("tokens_per_s")
        );
        let kwargs = PyDict::new(py);
        let shown = kwargs
            .set_item("flush", true)
            .and_then(|_| py.import("builtins")?.getattr("print")?.call((msg,), Some(&kwargs)).map(|_| ()));
        if let Err(e) = shown {
            return (lines.len(), e.is_instance_of::<PyKeyboardInterrupt>(py).then_some(e));
        }
    }
    (lines.len(), None)
}

/// A checkpoint's trainer config; a run the CLI trains live from the model (`saekit train --live`) is
/// resumed there, where the model runs.
fn resumed_config(dir: &std::path::Path) -> PyResult<TrainConfig> {
    let file = saekit_sae::checkpoint::latest_config(dir).map_err(to_py)?;
    if file.source.get("live").and_then(|v| v.as_bool()) == Some(true) {
        return Err(PyValueError::new_err(format!(
            "train: {} trains live from the model; resume it with `saekit train --resume {}`",
            dir.display(),
            dir.display()
        )));
    }
    Ok(file.train)
}
