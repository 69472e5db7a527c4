//! Transcoders: an encoder on one hook point, a decoder to another, an optional skip connection.
//!
//! `out = act(x · W_enc + b_enc) · W_dec + b_dec (+ x · W_skipᵀ)`, as SAELens' `Transcoder` /
//! `SkipTranscoder` / `JumpReLUTranscoder` and circuit-tracer's `SingleLayerTranscoder` compute it. The
//! input is not shifted by `b_dec` (its width is the output's).
//!
//! Two layouts on disk:
//! - SAELens: a folder with `cfg.json` (`architecture` = `transcoder` | `skip_transcoder` |
//!   `jumprelu_transcoder` | `jumprelu_skip_transcoder`, `d_in`, `d_sae`, `d_out`, `hook_name`, `hook_name_out`; the hooks also read from
//!   `metadata`) and `sae_weights.safetensors` (`W_enc [d_in, d_sae]`, `W_dec [d_sae, d_out]`, `b_enc`,
//!   `b_dec`, `threshold`, `W_skip [d_out, d_in]`). saekit adds `topk_transcoder` with `k` in the cfg.
//! - circuit-tracer: `transcoders.yaml` (or `config.yaml`, as on the hub) with `model_kind: transcoder_set`,
//!   `feature_input_hook`, `feature_output_hook`, `transcoders` (one file per layer, in order; without it
//!   `layer_{i}.safetensors`), optional `activation` (`relu` | `topk`, with `k`); each file holds `W_enc
//!   [d_sae, d_in]` (transposed against SAELens), `W_dec [d_sae, d_out]`, `b_enc`, `b_dec`, optional
//!   `activation_function.threshold` (JumpReLU) and `W_skip [d_out, d_in]`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::error::{bad_input, bail_input, corrupt, CircuitsResult};
use saekit_model::linalg::matmul;
use saekit_model::HookPoint;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde_json::{json, Value};

/// The nonlinearity between encoder and decoder.
#[derive(Debug, Clone, PartialEq)]
pub enum TranscoderActivation {
    /// `relu(pre)`.
    Relu,
    /// `relu(pre)` where `pre > threshold[f]`, else 0 (SAELens / Gemma Scope).
    JumpRelu(Vec<f32>),
    /// The `k` largest ReLU activations of each row.
    TopK(usize),
}

/// A transcoder: reads `input_hook`, writes an approximation of `output_hook` (an MLP's output).
#[derive(Debug, Clone)]
pub struct Transcoder {
    /// Width of the input.
    pub d_in: usize,
    /// Number of features.
    pub d_sae: usize,
    /// Width of the output.
    pub d_out: usize,
    /// The nonlinearity.
    pub activation: TranscoderActivation,
    /// `[d_in, d_sae]`.
    pub w_enc: Vec<f32>,
    /// `[d_sae]`.
    pub b_enc: Vec<f32>,
    /// `[d_sae, d_out]`.
    pub w_dec: Vec<f32>,
    /// `[d_out]`.
    pub b_dec: Vec<f32>,
    /// `[d_out, d_in]`, as both SAELens and circuit-tracer store it (`skip = x · W_skipᵀ`).
    pub w_skip: Option<Vec<f32>>,
    /// Where it reads (e.g. `blocks.L.ln2.hook_normalized`).
    pub input_hook: HookPoint,
    /// What it reconstructs (e.g. `blocks.L.hook_mlp_out`).
    pub output_hook: HookPoint,
}

impl Transcoder {
    /// Pre-activations `x · W_enc + b_enc` of `[rows, d_in]` inputs, `[rows, d_sae]`.
    pub fn pre_activations(&self, x: &[f32]) -> Vec<f32> {
        let rows = x.len() / self.d_in;
        let mut pre = vec![0f32; rows * self.d_sae];
        for row in pre.chunks_mut(self.d_sae) {
            row.copy_from_slice(&self.b_enc);
        }
        matmul(x, rows, self.d_in, &self.w_enc, self.d_sae, &mut pre, true);
        pre
    }

    /// Apply the nonlinearity to pre-activations in place.
    pub fn activate(&self, pre: &mut [f32]) {
        for row in pre.chunks_mut(self.d_sae) {
            match &self.activation {
                TranscoderActivation::Relu => row.iter_mut().for_each(|v| *v = v.max(0.0)),
                TranscoderActivation::JumpRelu(t) => {
                    row.iter_mut().zip(t).for_each(|(v, t)| *v = if *v > *t { v.max(0.0) } else { 0.0 })
                }
                TranscoderActivation::TopK(k) => keep_top_k(row, *k),
            }
        }
    }

    /// Feature activations of `[rows, d_in]` inputs, `[rows, d_sae]`.
    pub fn encode(&self, x: &[f32]) -> Vec<f32> {
        let mut a = self.pre_activations(x);
        self.activate(&mut a);
        a
    }

    /// `acts · W_dec + b_dec (+ x · W_skipᵀ)`, `[rows, d_out]`.
    pub fn decode(&self, acts: &[f32], x: &[f32]) -> Vec<f32> {
        let rows = acts.len() / self.d_sae;
        let mut out = vec![0f32; rows * self.d_out];
        for row in out.chunks_mut(self.d_out) {
            row.copy_from_slice(&self.b_dec);
        }
        matmul(acts, rows, self.d_sae, &self.w_dec, self.d_out, &mut out, true);
        self.add_skip(x, &mut out);
        out
    }

    /// Add `x · W_skipᵀ` to `out` (nothing without a skip connection).
    pub fn add_skip(&self, x: &[f32], out: &mut [f32]) {
        let Some(ws) = &self.w_skip else { return };
        for (o, xr) in out.chunks_mut(self.d_out).zip(x.chunks(self.d_in)) {
            for (j, o) in o.iter_mut().enumerate() {
                *o += saekit_model::linalg::dot(&ws[j * self.d_in..][..self.d_in], xr);
            }
        }
    }

    /// The transcoder's output for `[rows, d_in]` inputs.
    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        self.decode(&self.encode(x), x)
    }

    /// The layer this transcoder replaces the MLP of (its output hook's block).
    pub fn layer(&self) -> Option<usize> {
        self.output_hook.layer()
    }

    fn check(&self, what: &str) -> Result<()> {
        let (i, s, o) = (self.d_in, self.d_sae, self.d_out);
        let shapes = [
            ("W_enc", self.w_enc.len(), i * s),
            ("b_enc", self.b_enc.len(), s),
            ("W_dec", self.w_dec.len(), s * o),
            ("b_dec", self.b_dec.len(), o),
            ("W_skip", self.w_skip.as_ref().map_or(o * i, |w| w.len()), o * i),
        ];
        for (name, got, want) in shapes {
            if got != want {
                bail_input!("{what}: {name} has {got} values, expected {want} (d_in {i}, d_sae {s}, d_out {o})");
            }
        }
        match &self.activation {
            TranscoderActivation::JumpRelu(t) if t.len() != s => {
                bail_input!("{what}: threshold has {} values, expected d_sae {s}", t.len())
            }
            TranscoderActivation::TopK(k) if *k == 0 || *k > s => bail_input!("{what}: k = {k} is not in 1..={s}"),
            _ => Ok(()),
        }
    }

    /// Load a transcoder saved in SAELens' layout (`cfg.json` + `sae_weights.safetensors`).
    pub fn load_saelens(dir: &Path) -> CircuitsResult<Transcoder> {
        let cfg_path = dir.join("cfg.json");
        let cfg: Value = serde_json::from_str(
            &std::fs::read_to_string(&cfg_path).with_context(|| format!("{}: cannot read", cfg_path.display()))?,
        )
        .with_context(|| format!("{}: not JSON", cfg_path.display()))?;
        let what = cfg_path.display().to_string();
        let arch = cfg["architecture"].as_str().unwrap_or("transcoder");
        let dim = |k: &str| -> Result<usize> {
            cfg[k].as_u64().map(|v| v as usize).ok_or_else(|| bad_input!("{what}: no integer `{k}`"))
        };
        let (d_in, d_sae) = (dim("d_in")?, dim("d_sae")?);
        let d_out = cfg["d_out"].as_u64().map_or(d_in, |v| v as usize);
        let hook_in = cfg_str(&cfg, "hook_name").ok_or_else(|| bad_input!("{what}: no `hook_name`"))?;
        let input_hook = parse_hook(&hook_in, None).with_context(|| what.clone())?;
        let output_hook = match cfg_str(&cfg, "hook_name_out") {
            Some(h) => parse_hook(&h, None).with_context(|| what.clone())?,
            // SAELens' newest config dropped the output hook; a transcoder over an MLP writes its output
            None => HookPoint::MlpOut(input_hook.layer().ok_or_else(|| bad_input!("{what}: no `hook_name_out`"))?),
        };
        let weights_path = dir.join("sae_weights.safetensors");
        let bytes = read_file(&weights_path)?;
        let t = Tensors::parse(&bytes, &weights_path)?;
        let activation = match arch {
            "transcoder" | "skip_transcoder" => TranscoderActivation::Relu,
            "jumprelu_transcoder" | "jumprelu_skip_transcoder" => {
                TranscoderActivation::JumpRelu(t.get("threshold", &[d_sae])?)
            }
            "topk_transcoder" => TranscoderActivation::TopK(dim("k")?),
            other => bail_input!("{what}: architecture {other:?} is not a transcoder (transcoder, skip_transcoder, jumprelu_transcoder, jumprelu_skip_transcoder, topk_transcoder)"),
        };
        let w_skip = if t.has("W_skip") { Some(t.get("W_skip", &[d_out, d_in])?) } else { None };
        if arch.contains("skip_transcoder") && w_skip.is_none() {
            bail_input!("{}: a skip_transcoder without W_skip", weights_path.display());
        }
        let tc = Transcoder {
            d_in,
            d_sae,
            d_out,
            activation,
            w_enc: t.get("W_enc", &[d_in, d_sae])?,
            b_enc: t.get("b_enc", &[d_sae])?,
            w_dec: t.get("W_dec", &[d_sae, d_out])?,
            b_dec: t.get("b_dec", &[d_out])?,
            w_skip,
            input_hook,
            output_hook,
        };
        tc.check(&what)?;
        Ok(tc)
    }

    /// Save in SAELens' transcoder layout.
    pub fn save_saelens(&self, dir: &Path) -> CircuitsResult<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
        let arch = match (&self.activation, &self.w_skip) {
            (TranscoderActivation::Relu, None) => "transcoder",
            (TranscoderActivation::Relu, Some(_)) => "skip_transcoder",
            (TranscoderActivation::JumpRelu(_), _) => "jumprelu_transcoder",
            (TranscoderActivation::TopK(_), _) => "topk_transcoder",
        };
        let (hin, hout) = (self.input_hook.to_string(), self.output_hook.to_string());
        let mut cfg = json!({
            "architecture": arch, "d_in": self.d_in, "d_sae": self.d_sae, "d_out": self.d_out,
            "hook_name": hin, "hook_name_out": hout, "hook_layer": self.input_hook.layer(),
            "hook_layer_out": self.output_hook.layer(), "apply_b_dec_to_input": false,
            "normalize_activations": "none", "dtype": "float32", "device": "cpu",
            "metadata": { "hook_name": hin, "hook_name_out": hout },
        });
        if let TranscoderActivation::TopK(k) = self.activation {
            cfg["k"] = json!(k);
        }
        let mut tensors = vec![
            ("W_enc", vec![self.d_in, self.d_sae], &self.w_enc),
            ("W_dec", vec![self.d_sae, self.d_out], &self.w_dec),
            ("b_enc", vec![self.d_sae], &self.b_enc),
            ("b_dec", vec![self.d_out], &self.b_dec),
        ];
        if let TranscoderActivation::JumpRelu(t) = &self.activation {
            tensors.push(("threshold", vec![self.d_sae], t));
        }
        if let Some(w) = &self.w_skip {
            tensors.push(("W_skip", vec![self.d_out, self.d_in], w));
        }
        write_safetensors(&dir.join("sae_weights.safetensors"), &tensors)?;
        Ok(saekit_files::write_json_atomic(&dir.join("cfg.json"), &cfg)?)
    }

    /// Load one layer of a circuit-tracer transcoder set.
    fn load_circuit_tracer(
        path: &Path,
        input_hook: HookPoint,
        output_hook: HookPoint,
        activation: Option<TranscoderActivation>,
    ) -> Result<Transcoder> {
        let bytes = read_file(path)?;
        let t = Tensors::parse(&bytes, path)?;
        let b_enc = t.get_any("b_enc")?;
        let b_dec = t.get_any("b_dec")?;
        let (d_sae, d_out) = (b_enc.len(), b_dec.len());
        let enc_shape = t.shape("W_enc")?;
        let d_in = match enc_shape.as_slice() {
            [s, i] if *s == d_sae => *i,
            other => bail_input!("{}: W_enc has shape {other:?}, expected [d_sae {d_sae}, d_in]", path.display()),
        };
        let enc_t = t.get("W_enc", &[d_sae, d_in])?;
        let activation = match activation {
            Some(a) => a,
            None if t.has("activation_function.threshold") => {
                TranscoderActivation::JumpRelu(t.get("activation_function.threshold", &[d_sae])?)
            }
            None => TranscoderActivation::Relu,
        };
        let tc = Transcoder {
            d_in,
            d_sae,
            d_out,
            activation,
            w_enc: transpose(&enc_t, d_sae, d_in),
            b_enc,
            w_dec: t.get("W_dec", &[d_sae, d_out])?,
            b_dec,
            w_skip: if t.has("W_skip") { Some(t.get("W_skip", &[d_out, d_in])?) } else { None },
            input_hook,
            output_hook,
        };
        tc.check(&path.display().to_string())?;
        Ok(tc)
    }

    /// Save one layer in circuit-tracer's safetensors layout.
    fn save_circuit_tracer(&self, path: &Path) -> Result<()> {
        let enc_t = transpose(&self.w_enc, self.d_in, self.d_sae);
        let mut tensors = vec![
            ("W_enc", vec![self.d_sae, self.d_in], &enc_t),
            ("W_dec", vec![self.d_sae, self.d_out], &self.w_dec),
            ("b_enc", vec![self.d_sae], &self.b_enc),
            ("b_dec", vec![self.d_out], &self.b_dec),
        ];
        if let TranscoderActivation::JumpRelu(t) = &self.activation {
            tensors.push(("activation_function.threshold", vec![self.d_sae], t));
        }
        if let Some(w) = &self.w_skip {
            tensors.push(("W_skip", vec![self.d_out, self.d_in], w));
        }
        write_safetensors(path, &tensors)
    }
}

/// Zero all but the `k` largest positive values of `row`.
fn keep_top_k(row: &mut [f32], k: usize) {
    row.iter_mut().for_each(|v| *v = v.max(0.0));
    if k >= row.len() {
        return;
    }
    let mut sorted: Vec<f32> = row.to_vec();
    sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    let kth = sorted[k - 1];
    let mut kept = 0;
    for v in row.iter_mut() {
        if *v >= kth && kept < k && *v > 0.0 {
            kept += 1;
        } else {
            *v = 0.0;
        }
    }
}

fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; m.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = m[r * cols + c];
        }
    }
    t
}

/// A string field at the top of a SAELens cfg or in its `metadata`.
fn cfg_str(cfg: &Value, key: &str) -> Option<String> {
    cfg[key].as_str().or_else(|| cfg["metadata"][key].as_str()).filter(|s| !s.is_empty()).map(String::from)
}

/// A hook name as SAELens or circuit-tracer writes it. circuit-tracer's `mlp.hook_in` / `mlp.hook_out` are
/// the MLP's input and output: `ln2.hook_normalized` and `hook_mlp_out` here. A name without `blocks.L.`
/// is placed in `layer`.
pub fn parse_hook(name: &str, layer: Option<usize>) -> CircuitsResult<HookPoint> {
    let name = name.trim();
    let full = match (name.starts_with("blocks."), layer) {
        (true, _) => name.to_string(),
        (false, Some(l)) => format!("blocks.{l}.{name}"),
        (false, None) => name.to_string(),
    };
    let full = full.replace(".mlp.hook_in", ".ln2.hook_normalized").replace(".mlp.hook_out", ".hook_mlp_out");
    // a hook name the model does not have is the caller's (a flag or a transcoder config)
    full.parse().map_err(|e| saekit_files::Fault::BadInput.mark(e).into())
}

/// The per-layer name circuit-tracer's config uses for a hook point.
fn circuit_tracer_hook_name(p: HookPoint) -> String {
    match p {
        HookPoint::Ln2Normalized(_) => "mlp.hook_in".into(),
        HookPoint::MlpOut(_) => "mlp.hook_out".into(),
        p => {
            let s = p.to_string();
            match p.layer() {
                Some(l) => s.trim_start_matches(&format!("blocks.{l}.")).to_string(),
                None => s,
            }
        }
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))
}

fn write_safetensors(path: &Path, tensors: &[(&str, Vec<usize>, &Vec<f32>)]) -> Result<()> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, v)| (n.to_string(), s.clone(), v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views = bytes
        .iter()
        .map(|(n, s, b)| Ok((n.clone(), TensorView::new(Dtype::F32, s.clone(), b)?)))
        .collect::<Result<Vec<_>>>()?;
    let data = safetensors::serialize(views, None).with_context(|| format!("{}: serialising", path.display()))?;
    saekit_files::write_atomic(path, &data)
}

/// The tensors of one safetensors file, read as f32 with their shapes checked.
struct Tensors<'a> {
    st: SafeTensors<'a>,
    path: &'a Path,
}

impl<'a> Tensors<'a> {
    fn parse(bytes: &'a [u8], path: &'a Path) -> Result<Self> {
        let st =
            SafeTensors::deserialize(bytes).map_err(|e| corrupt!("{}: not a safetensors file: {e}", path.display()))?;
        Ok(Self { st, path })
    }

    fn has(&self, name: &str) -> bool {
        self.st.tensor(name).is_ok()
    }

    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        let t = self.st.tensor(name).map_err(|_| bad_input!("{}: no tensor `{name}`", self.path.display()))?;
        Ok(t.shape().to_vec())
    }

    fn get_any(&self, name: &str) -> Result<Vec<f32>> {
        let shape = self.shape(name)?;
        self.get(name, &shape)
    }

    fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let p = self.path.display();
        let t = self.st.tensor(name).map_err(|_| bad_input!("{p}: no tensor `{name}`"))?;
        if t.shape() != shape {
            bail_input!("{p}: `{name}` has shape {:?}, expected {shape:?}", t.shape());
        }
        let d = t.data();
        Ok(match t.dtype() {
            Dtype::F32 => d.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Dtype::BF16 => d.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            Dtype::F16 => d.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            other => bail_input!("{p}: `{name}` is {other:?}; expected F32, BF16 or F16"),
        })
    }
}

/// One transcoder per layer, layer `i` at index `i`, as circuit-tracer's `TranscoderSet`.
#[derive(Debug, Clone)]
pub struct TranscoderSet {
    /// The transcoders, by layer.
    pub layers: Vec<Transcoder>,
    /// Names the set in a graph's metadata (circuit-tracer's `scan`).
    pub scan: String,
}

impl TranscoderSet {
    /// Load `dir`: a circuit-tracer set (`transcoders.yaml` or `config.yaml`), or SAELens transcoder folders
    /// (each sub-folder with a `cfg.json`; or `dir` itself for a single transcoder).
    pub fn load(dir: &Path) -> CircuitsResult<TranscoderSet> {
        if !dir.is_dir() {
            bail_input!("{}: not a folder of transcoders", dir.display());
        }
        let scan = dir.file_name().map_or_else(|| "transcoders".into(), |n| n.to_string_lossy().into_owned());
        let yaml = ["transcoders.yaml", "config.yaml"].iter().map(|n| dir.join(n)).find(|p| p.exists());
        let layers = match yaml {
            Some(y) => load_circuit_tracer_set(dir, &y)?,
            None => load_saelens_folders(dir)?,
        };
        let set = TranscoderSet { layers, scan };
        set.check_layers(dir)?;
        Ok(set)
    }

    fn check_layers(&self, dir: &Path) -> Result<()> {
        if self.layers.is_empty() {
            bail_input!(
                "{}: no transcoders found (expected transcoders.yaml, or SAELens folders with cfg.json)",
                dir.display()
            );
        }
        for (i, t) in self.layers.iter().enumerate() {
            if t.layer() != Some(i) || t.input_hook.layer() != Some(i) {
                bail_input!(
                    "{}: transcoder {i} reads {} and writes {}; a set needs layers 0..{} each reading and writing its own block",
                    dir.display(),
                    t.input_hook,
                    t.output_hook,
                    self.layers.len()
                );
            }
        }
        Ok(())
    }

    /// Save in circuit-tracer's layout: `layer_{i}.safetensors` and a `transcoders.yaml` listing them.
    pub fn save_circuit_tracer(&self, dir: &Path) -> CircuitsResult<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
        let first = self.layers.first().context("an empty transcoder set")?;
        let mut files = Vec::new();
        for (i, t) in self.layers.iter().enumerate() {
            let name = format!("layer_{i}.safetensors");
            t.save_circuit_tracer(&dir.join(&name))?;
            files.push(name);
        }
        let mut cfg = serde_norway::Mapping::new();
        let mut put = |k: &str, v: serde_norway::Value| cfg.insert(k.into(), v);
        put("model_kind", "transcoder_set".into());
        put("feature_input_hook", circuit_tracer_hook_name(first.input_hook).into());
        put("feature_output_hook", circuit_tracer_hook_name(first.output_hook).into());
        put("scan", self.scan.clone().into());
        match first.activation {
            TranscoderActivation::Relu => put("activation", "relu".into()),
            TranscoderActivation::TopK(k) => {
                put("activation", "topk".into());
                put("k", (k as u64).into())
            }
            TranscoderActivation::JumpRelu(_) => None,
        };
        put("transcoders", files.into_iter().map(serde_norway::Value::from).collect::<Vec<_>>().into());
        let text = serde_norway::to_string(&cfg).map_err(anyhow::Error::from)?;
        Ok(saekit_files::write_atomic(&dir.join("transcoders.yaml"), text.as_bytes())?)
    }
}

fn load_circuit_tracer_set(dir: &Path, yaml: &Path) -> Result<Vec<Transcoder>> {
    let y = yaml.display();
    let cfg: HashMap<String, serde_norway::Value> =
        serde_norway::from_str(&std::fs::read_to_string(yaml).with_context(|| format!("{y}: cannot read"))?)
            .with_context(|| format!("{y}: not a YAML mapping"))
            .map_err(|e| saekit_files::Fault::Corrupt.mark(e))?;
    let s = |k: &str| cfg.get(k).and_then(|v| v.as_str()).map(String::from);
    match s("model_kind").as_deref() {
        Some("transcoder_set") => {}
        Some("cross_layer_transcoder") => bail_input!("{y}: cross-layer transcoders are not supported yet"),
        other => bail_input!("{y}: model_kind {other:?}; expected transcoder_set"),
    }
    let hin = s("feature_input_hook").ok_or_else(|| bad_input!("{y}: no feature_input_hook"))?;
    let hout = s("feature_output_hook").ok_or_else(|| bad_input!("{y}: no feature_output_hook"))?;
    let activation = match s("activation").as_deref() {
        Some("relu") => Some(TranscoderActivation::Relu),
        Some("topk") => {
            let k = cfg.get("k").and_then(|v| v.as_u64()).ok_or_else(|| bad_input!("{y}: activation topk needs k"))?;
            Some(TranscoderActivation::TopK(k as usize))
        }
        None | Some("jumprelu") => None,
        Some(other) => bail_input!("{y}: activation {other:?}; expected relu, topk or jumprelu"),
    };
    let files: Vec<PathBuf> = match cfg.get("transcoders") {
        Some(list) => list
            .as_sequence()
            .ok_or_else(|| bad_input!("{y}: `transcoders` is not a list"))?
            .iter()
            .map(|v| {
                let p = v.as_str().ok_or_else(|| bad_input!("{y}: a `transcoders` entry is not a path"))?;
                if p.starts_with("hf://") {
                    bail_input!("{y}: {p} is on the hub; download it and list the local file");
                }
                Ok(dir.join(p))
            })
            .collect::<Result<_>>()?,
        None => (0..).map(|i| dir.join(format!("layer_{i}.safetensors"))).take_while(|p| p.exists()).collect(),
    };
    files
        .iter()
        .enumerate()
        .map(|(l, f)| {
            let (i, o) = (parse_hook(&hin, Some(l))?, parse_hook(&hout, Some(l))?);
            Transcoder::load_circuit_tracer(f, i, o, activation.clone())
        })
        .collect()
}

fn load_saelens_folders(dir: &Path) -> Result<Vec<Transcoder>> {
    if dir.join("cfg.json").exists() {
        return Ok(vec![Transcoder::load_saelens(dir)?]);
    }
    let mut found = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("{}: cannot list", dir.display()))? {
        let p = e?.path();
        if p.join("cfg.json").exists() {
            found.push(Transcoder::load_saelens(&p)?);
        }
    }
    found.sort_by_key(|t| t.layer());
    Ok(found)
}
