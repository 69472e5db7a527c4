//! `saekit.Model`: load a language model, tokenize, run it with a cache of hook activations, generate
//! (optionally steered by SAE features).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::{anyhow, Context};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};
use saekit_model::{ChatMessage, GenerateOptions, HookPoint, Hooks, LoadOptions, Logits, Model, Sampling};
use saekit_steer::{EditSpec, FeatureEdit, Positions};

use crate::arrays;
use crate::errors::{detached, existing, to_py};
use crate::feature_db::PyFeatureDb;
use crate::sae::PySae;

/// A transformer language model (SmolLM2 by default) with TransformerLens hook names.
#[pyclass(frozen, module = "saekit", name = "Model")]
pub struct PyModel {
    pub model: Model,
}

/// The model file saekit uses when none is named (`$SAEKIT_MODEL`, else the fetched SmolLM2 GGUF).
#[pyfunction]
pub fn default_model_path() -> PathBuf {
    saekit_model::default_model_path()
}

#[pymethods]
impl PyModel {
    /// Load a `.gguf` file or a Hugging Face folder; `None` loads the default model.
    #[staticmethod]
    #[pyo3(signature = (path=None))]
    fn load(py: Python<'_>, path: Option<PathBuf>) -> PyResult<Self> {
        let path = existing(&path.unwrap_or_else(saekit_model::default_model_path), "model file or folder")?;
        let model = detached(py, || Ok(Model::load(&path, &LoadOptions::default())?))?;
        Ok(PyModel { model })
    }

    /// The model's shape: name, arch, n_layers, d_model, n_heads, d_vocab, n_ctx.
    #[getter]
    fn cfg<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let c = self.model.config();
        let d = PyDict::new(py);
        d.set_item("model_name", &c.name)?;
        d.set_item("arch", format!("{:?}", c.arch).to_lowercase())?;
        d.set_item("n_layers", c.n_layers)?;
        d.set_item("d_model", c.d_model)?;
        d.set_item("n_heads", c.n_heads)?;
        d.set_item("d_mlp", c.d_ff)?;
        d.set_item("d_vocab", c.vocab_size)?;
        d.set_item("n_ctx", c.max_positions)?;
        d.set_item("source", self.model.source())?;
        Ok(d)
    }

    /// Token ids `[batch, pos]` (int64) of a text or a list of texts of equal token length.
    /// `prepend_bos` adds the model's own leading special tokens (BOS when the model uses one), as
    /// `saekit activations` does.
    #[pyo3(signature = (text, prepend_bos=true))]
    fn to_tokens<'py>(
        &self,
        py: Python<'py>,
        text: &Bound<'py, PyAny>,
        prepend_bos: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (ids, batch) = self.tokens_of(text, prepend_bos)?;
        let ids: Vec<i64> = ids.into_iter().map(i64::from).collect();
        let pos = ids.len() / batch;
        Ok(arrays::owned(py, ids, &[batch, pos])?.into_any())
    }

    /// The text of token ids: a string for one sequence, a list of strings for `[batch, pos]`.
    fn to_string<'py>(&self, py: Python<'py>, ids: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let ids = plain(ids)?;
        let tok = self.model.tokenizer();
        if let Ok(seq) = ids.extract::<Vec<u32>>() {
            return Ok(PyString::new(py, &tok.decode(&seq).map_err(to_py)?).into_any());
        }
        let rows: Vec<Vec<u32>> =
            ids.extract().map_err(|_| PyValueError::new_err("ids: expected token ids [pos] or [batch, pos]"))?;
        let texts = rows.iter().map(|r| tok.decode(r)).collect::<anyhow::Result<Vec<_>>>().map_err(to_py)?;
        Ok(PyList::new(py, texts)?.into_any())
    }

    /// Run the model and capture activations: returns `(logits, cache)` with `cache[name]` a float32
    /// array `[batch, pos, d_model]` (`d_mlp` wide at `mlp.hook_pre` / `mlp.hook_post`). Without
    /// `return_logits` the pass stops after the deepest hook in `names` and `logits` is None; with it,
    /// logits are `[batch, pos, d_vocab]`. `names=None` caches every hook point.
    #[pyo3(signature = (input, names=None, prepend_bos=true, return_logits=false))]
    fn run_with_cache<'py>(
        &self,
        py: Python<'py>,
        input: &Bound<'py, PyAny>,
        names: Option<Vec<String>>,
        prepend_bos: bool,
        return_logits: bool,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyDict>)> {
        let (ids, batch) = self.tokens_of(input, prepend_bos)?;
        let n_layers = self.model.config().n_layers;
        let names = names.unwrap_or_else(|| HookPoint::all(n_layers).iter().map(|p| p.to_string()).collect());
        let points = names
            .iter()
            .map(|n| n.parse::<HookPoint>().and_then(|p| p.check(n_layers).map(|_| p)))
            .collect::<anyhow::Result<Vec<_>>>()
            .map_err(to_py)?;
        let model = &self.model;
        let (mut acts, logits) = detached(py, || capture(model, &ids, batch, &points, return_logits))?;
        let (pos, d, vocab) = (ids.len() / batch, model.config().d_model, model.config().vocab_size);
        let cache = PyDict::new(py);
        for (i, (name, p)) in names.iter().zip(&points).enumerate() {
            // a hook named twice (or under two spellings) shares one capture: its last use takes it
            let last_use = points.iter().rposition(|q| q == p) == Some(i);
            let data = if last_use { acts.remove(p) } else { acts.get(p).cloned() };
            let data = data.ok_or_else(|| PyValueError::new_err(format!("{name}: the hook did not fire")))?;
            cache.set_item(name, arrays::owned(py, data, &[batch, pos, p.width(d, model.config().d_ff)])?)?;
        }
        let logits = match logits {
            Some(l) => arrays::owned(py, l, &[batch, pos, vocab])?.into_any(),
            None => py.None().into_bound(py),
        };
        Ok((logits, cache))
    }

    /// Continue `prompt` and return the new text. `chat=True` wraps it in the chat template;
    /// `temperature=0` is greedy. With `sae` (an `SAE` or a folder), `steer={feature: value}` clamps
    /// features keeping the SAE error term (`"10x"` = 10 times the feature's max activation, from
    /// `db`), `add={feature: coeff}` adds decoder directions, `ablate=[feature]` clamps to 0. Ctrl-C
    /// stops generating with `KeyboardInterrupt`.
    #[pyo3(signature = (prompt, max_new_tokens=64, chat=false, system=None, temperature=0.0, top_p=0.95, seed=0,
        sae=None, steer=None, add=None, ablate=None, db=None, hook=None, steer_first=false))]
    #[allow(clippy::too_many_arguments)]
    fn generate(
        &self,
        py: Python<'_>,
        prompt: &str,
        max_new_tokens: usize,
        chat: bool,
        system: Option<&str>,
        temperature: f32,
        top_p: f32,
        seed: u64,
        sae: Option<&Bound<'_, PyAny>>,
        steer: Option<HashMap<u32, Bound<'_, PyAny>>>,
        add: Option<HashMap<u32, Bound<'_, PyAny>>>,
        ablate: Option<Vec<u32>>,
        db: Option<&Bound<'_, PyAny>>,
        hook: Option<&str>,
        steer_first: bool,
    ) -> PyResult<String> {
        if temperature.is_nan() || temperature < 0.0 {
            return Err(PyValueError::new_err(format!("temperature must be >= 0 (got {temperature})")));
        }
        let sampling = if temperature == 0.0 { Sampling::Greedy } else { Sampling::TopP { temperature, top_p } };
        let opts = GenerateOptions { max_new_tokens, sampling, seed, stop_at_eos: true };
        let ids = self.prompt_ids(prompt, chat, system)?;
        let sae = sae.map(PySae::from_arg).transpose()?;
        let wants_edits = steer.is_some() || add.is_some() || ablate.is_some();
        let edits = match &sae {
            Some(_) => edits_of(steer, add, ablate, db)?,
            None if wants_edits => return Err(PyValueError::new_err("steer, add and ablate need sae=")),
            None => Vec::new(),
        };
        let point = match &sae {
            Some(s) => Some(sae_hook(&self.model, &s.get().sae, hook)?),
            None => None,
        };
        let positions = if steer_first { Positions::All } else { Positions::SkipFirst };
        let model = &self.model;
        let sae_ref = sae.as_ref().map(|s| &s.get().sae);
        let interrupt: Mutex<Option<PyErr>> = Mutex::new(None);
        let out = detached(py, || {
            let mut hooks = Hooks::new();
            if let (Some(sae), Some(point)) = (sae_ref, point) {
                saekit_steer::validate(model, sae, point, &edits)?;
                saekit_steer::add_steering_hook(&mut hooks, sae, point, &edits, positions);
            }
            // once per forward pass (per new token): Ctrl-C in the interpreter stops the loop
            let interrupt = &interrupt;
            hooks.add(HookPoint::Embed, move |_, _| {
                Python::attach(|py| py.check_signals()).map_err(|e| {
                    *interrupt.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    anyhow!("interrupted")
                })
            });
            Ok(model.generate(&ids, &opts, &mut hooks)?)
        });
        if let Some(e) = interrupt.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(e);
        }
        Ok(out?.text)
    }

    fn __repr__(&self) -> String {
        let c = self.model.config();
        format!("saekit.Model({:?}, n_layers={}, d_model={})", self.model.source(), c.n_layers, c.d_model)
    }
}

impl PyModel {
    /// Token ids of a text, a list of texts, or ids given directly (`[pos]` or `[batch, pos]`).
    fn tokens_of(&self, input: &Bound<'_, PyAny>, prepend_bos: bool) -> PyResult<(Vec<u32>, usize)> {
        let tok = self.model.tokenizer();
        let rows: Vec<Vec<u32>> = if let Ok(text) = input.extract::<String>() {
            vec![tok.encode(&text, prepend_bos).map_err(to_py)?]
        } else if let Ok(texts) = input.extract::<Vec<String>>() {
            texts.iter().map(|t| tok.encode(t, prepend_bos)).collect::<anyhow::Result<_>>().map_err(to_py)?
        } else {
            let ids = plain(input)?;
            if let Ok(seq) = ids.extract::<Vec<u32>>() {
                vec![seq]
            } else {
                ids.extract().map_err(|_| {
                    PyValueError::new_err("input: expected a text, a list of texts, or token ids [pos] / [batch, pos]")
                })?
            }
        };
        let pos = rows.first().map_or(0, Vec::len);
        if pos == 0 {
            return Err(PyValueError::new_err("input: no tokens (empty text or empty ids)"));
        }
        if rows.iter().any(|r| r.len() != pos) {
            let lens: Vec<usize> = rows.iter().map(Vec::len).collect();
            return Err(PyValueError::new_err(format!(
                "input: the sequences have different token lengths {lens:?}; a batch needs equal lengths"
            )));
        }
        let vocab = self.model.config().vocab_size;
        if let Some(&t) = rows.iter().flatten().find(|&&t| t as usize >= vocab) {
            return Err(PyValueError::new_err(format!("token id {t} is outside the vocabulary (size {vocab})")));
        }
        Ok((rows.concat(), rows.len()))
    }

    /// The prompt as `saekit generate` renders it (chat template or plain text).
    fn prompt_ids(&self, prompt: &str, chat: bool, system: Option<&str>) -> PyResult<Vec<u32>> {
        let tok = self.model.tokenizer();
        let ids = if chat {
            let mut msgs: Vec<ChatMessage> = system.map(ChatMessage::system).into_iter().collect();
            msgs.push(ChatMessage::user(prompt));
            tok.apply_chat_template(&msgs).and_then(|p| tok.encode(&p, false))
        } else {
            tok.encode(prompt, true)
        };
        ids.map_err(to_py)
    }
}

/// numpy arrays and nested lists alike: `.tolist()` when the object has it.
fn plain<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    if obj.hasattr("tolist")? {
        obj.call_method0("tolist")
    } else {
        Ok(obj.clone())
    }
}

/// Activations by hook point, `[rows, d_model]` each.
type Captured = HashMap<HookPoint, Vec<f32>>;

/// The activations at `points` (the library's `run_with_cache`, which stops after the deepest hook) and,
/// when asked, the logits of every position from a full pass of their own.
fn capture(
    model: &Model,
    ids: &[u32],
    batch: usize,
    points: &[HookPoint],
    with_logits: bool,
) -> anyhow::Result<(Captured, Option<Vec<f32>>)> {
    let mut cache = model.run_with_cache(ids, batch, points)?;
    let acts = points.iter().filter_map(|p| cache.take(p).map(|v| (*p, v))).collect();
    let logits = if with_logits {
        Some(model.forward(ids, batch, &mut model.new_cache(batch), &mut Hooks::new(), Logits::All)?)
    } else {
        None
    };
    Ok((acts, logits))
}

/// The hook an SAE reads in `model`: `hook` if given, else its cfg's `hook_name`; an SAE made for
/// another model, width or hook is refused with both sides named (as the CLI refuses it).
pub fn sae_hook(model: &Model, sae: &saekit_sae::Sae, hook: Option<&str>) -> PyResult<HookPoint> {
    let parsed = hook.map(str::parse::<HookPoint>).transpose().map_err(to_py)?;
    saekit_analysis::analyze::sae_hook(model, sae, "sae", parsed).map_err(to_py)
}

/// `steer`/`add`/`ablate` as feature edits; `"Nx"` values are multiples of the feature's max
/// activation in `db` (as `saekit generate --steer F=Nx --db ...`).
fn edits_of(
    steer: Option<HashMap<u32, Bound<'_, PyAny>>>,
    add: Option<HashMap<u32, Bound<'_, PyAny>>>,
    ablate: Option<Vec<u32>>,
    db: Option<&Bound<'_, PyAny>>,
) -> PyResult<Vec<FeatureEdit>> {
    let db = db.map(PyFeatureDb::from_arg).transpose()?;
    let max_act = |f: u32| -> anyhow::Result<f32> {
        let db = db.as_ref().context("a multiple like \"10x\" needs the feature database: pass db=")?;
        let rec = db.get().db.summary(f)?.with_context(|| format!("feature {f} is not in the database"))?;
        if rec.max_act <= 0.0 {
            anyhow::bail!("feature {f} never fired in the analysed tokens, so Nx of its max activation is 0");
        }
        Ok(rec.max_act)
    };
    let spec = |f: u32, v: &Bound<'_, PyAny>| -> PyResult<f32> {
        let s: EditSpec = format!("{f}={}", v.str()?).parse().map_err(|e: saekit_steer::SteerError| to_py(e))?;
        saekit_steer::parse_edit(&s, max_act).map_err(to_py)
    };
    let mut edits = Vec::new();
    for (f, v) in sorted(steer) {
        edits.push(FeatureEdit::Clamp { feature: f, value: spec(f, &v)? });
    }
    for (f, v) in sorted(add) {
        edits.push(FeatureEdit::Add { feature: f, coeff: spec(f, &v)? });
    }
    for f in ablate.unwrap_or_default() {
        edits.push(FeatureEdit::Clamp { feature: f, value: 0.0 });
    }
    Ok(edits)
}

/// Dict items in feature order, so the same call applies its edits in the same order every time.
fn sorted<'py>(m: Option<HashMap<u32, Bound<'py, PyAny>>>) -> Vec<(u32, Bound<'py, PyAny>)> {
    let mut v: Vec<_> = m.unwrap_or_default().into_iter().collect();
    v.sort_by_key(|(f, _)| *f);
    v
}
