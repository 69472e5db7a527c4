//! SAE folders on disk: write SAELens v6, read SAELens v6 / legacy (<= 5.x), sparsify and Gemma
//! Scope `params.npz`. Anything that cannot be reproduced exactly is refused with the reason.

use crate::params::Params;
use crate::sae::{Activation, Sae, SaeMetadata};
use anyhow::{bail, Context, Result};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::Path;

/// SAELens' weights file.
pub const SAE_WEIGHTS: &str = "sae_weights.safetensors";
/// SAELens' log10 firing densities.
pub const SPARSITY: &str = "sparsity.safetensors";
/// SAELens' config file.
pub const CFG: &str = "cfg.json";
/// The list of the folder's files with sizes and CRC32s, written last: without it (or with files that
/// differ from it) a saekit-written folder is a torn write and is refused.
pub const FILE_LIST: &str = "saekit_files.json";

pub(crate) fn f32_bytes(v: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * 4);
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// Write `bytes` to `path` atomically (the workspace's one helper: temp file, fsync, rename, folder fsync).
pub use saekit_files::write_atomic as atomic_write;

/// A tensor to stream into a safetensors file without materialising its bytes.
pub enum TensorSrc<'a> {
    /// f32 values as they are.
    F32(&'a [f32]),
    /// row-major `[rows, cols]` source written transposed as `[cols, rows]`
    F32Transposed {
        /// The row-major source.
        src: &'a [f32],
        /// Its rows.
        rows: usize,
        /// Its columns.
        cols: usize,
    },
    /// u64 values (checkpoint counters).
    U64(&'a [u64]),
}

impl TensorSrc<'_> {
    fn nbytes(&self) -> usize {
        match self {
            TensorSrc::F32(v) => v.len() * 4,
            TensorSrc::F32Transposed { src, .. } => src.len() * 4,
            TensorSrc::U64(v) => v.len() * 8,
        }
    }
    fn dtype(&self) -> &'static str {
        match self {
            TensorSrc::U64(_) => "U64",
            _ => "F32",
        }
    }
    fn write(&self, w: &mut impl Write) -> std::io::Result<()> {
        let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
        match self {
            TensorSrc::F32(v) => {
                for c in v.chunks(1 << 18) {
                    buf.clear();
                    for x in c {
                        buf.extend_from_slice(&x.to_le_bytes());
                    }
                    w.write_all(&buf)?;
                }
            }
            TensorSrc::U64(v) => {
                for c in v.chunks(1 << 17) {
                    buf.clear();
                    for x in c {
                        buf.extend_from_slice(&x.to_le_bytes());
                    }
                    w.write_all(&buf)?;
                }
            }
            TensorSrc::F32Transposed { src, rows, cols } => {
                // output row c = source column c; 16 columns per sweep keeps the reads sequential
                const CB: usize = 16;
                let mut blk = vec![0u8; CB * rows * 4];
                for c0 in (0..*cols).step_by(CB) {
                    let nc = CB.min(cols - c0);
                    for r in 0..*rows {
                        let row = &src[r * cols + c0..r * cols + c0 + nc];
                        for (cc, v) in row.iter().enumerate() {
                            blk[(cc * rows + r) * 4..(cc * rows + r) * 4 + 4].copy_from_slice(&v.to_le_bytes());
                        }
                    }
                    w.write_all(&blk[..nc * rows * 4])?;
                }
            }
        }
        Ok(())
    }
}

/// Write a safetensors file tensor by tensor (memory stays O(1) beyond the tensors themselves),
/// atomically (temp file, fsync, rename).
pub fn write_safetensors(path: &Path, tensors: &[(&str, Vec<usize>, TensorSrc<'_>)]) -> Result<()> {
    let mut header = serde_json::Map::new();
    let mut off = 0usize;
    for (name, shape, src) in tensors {
        let n = src.nbytes();
        let numel: usize = shape.iter().product();
        let elem = if src.dtype() == "U64" { 8 } else { 4 };
        if numel * elem != n {
            bail!("tensor {name}: shape {shape:?} does not match {n} bytes");
        }
        header.insert(name.to_string(), json!({"dtype": src.dtype(), "shape": shape, "data_offsets": [off, off + n]}));
        off += n;
    }
    let mut h = serde_json::to_string(&Value::Object(header))?;
    while h.len() % 8 != 0 {
        h.push(' ');
    }
    saekit_files::write_atomic_with(path, |f| {
        let mut w = std::io::BufWriter::with_capacity(1 << 22, f);
        w.write_all(&(h.len() as u64).to_le_bytes())?;
        w.write_all(h.as_bytes())?;
        for (name, _, src) in tensors {
            src.write(&mut w).with_context(|| format!("writing tensor {name}"))?;
        }
        w.flush()?;
        Ok(())
    })
}

/// Memory-map a file read-only.
pub(crate) fn map_file(path: &Path) -> Result<memmap2::Mmap> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: read-only mapping of a file we do not modify while it is mapped.
    unsafe { memmap2::Mmap::map(&f) }.with_context(|| format!("mapping {}", path.display()))
}

/// Serialise named f32 tensors (plus optional raw tensors of other dtypes) to safetensors bytes.
pub fn safetensors_bytes(
    tensors: &[(&str, Vec<usize>, &[f32])],
    meta: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let bufs: Vec<(String, Vec<usize>, Vec<u8>)> =
        tensors.iter().map(|(n, s, d)| (n.to_string(), s.clone(), f32_bytes(d))).collect();
    let views: Vec<(String, TensorView<'_>)> = bufs
        .iter()
        .map(|(n, s, b)| Ok((n.clone(), TensorView::new(Dtype::F32, s.clone(), b)?)))
        .collect::<Result<_, safetensors::SafeTensorError>>()?;
    Ok(safetensors::serialize(views, meta)?)
}

pub(crate) fn transpose(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; src.len()];
    const B: usize = 64;
    for r0 in (0..rows).step_by(B) {
        for c0 in (0..cols).step_by(B) {
            for r in r0..(r0 + B).min(rows) {
                for c in c0..(c0 + B).min(cols) {
                    out[c * rows + r] = src[r * cols + c];
                }
            }
        }
    }
    out
}

/// Write `sae` as a SAELens v6 inference folder: `cfg.json`, `sae_weights.safetensors` and, when
/// given, `sparsity.safetensors` (log10 of per-latent firing frequency).
pub fn save_saelens(dir: &Path, sae: &Sae, log10_sparsity: Option<&[f32]>, extra_cfg: Option<Value>) -> Result<()> {
    save_saelens_set(dir, sae, log10_sparsity, extra_cfg, &[])
}

/// [`save_saelens`] plus `extra_files` (name, bytes), written as one set: the old file list is removed
/// first and the new one (sizes + CRC32s of every file) written last, so a kill in between leaves a
/// folder that [`load_sae`] refuses instead of new weights beside an old `cfg.json`.
pub fn save_saelens_set(
    dir: &Path,
    sae: &Sae,
    log10_sparsity: Option<&[f32]>,
    extra_cfg: Option<Value>,
    extra_files: &[(&str, &[u8])],
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    saekit_files::FileSet::begin(dir, FILE_LIST)?;
    let (d_in, d_sae, d_out) = (sae.d_in, sae.d_sae, sae.d_out());
    // SAELens W_enc is [d_in, d_sae]: stream the transpose of our latent-major encoder
    let mut tensors: Vec<(&str, Vec<usize>, TensorSrc<'_>)> = vec![
        ("W_enc", vec![d_in, d_sae], TensorSrc::F32Transposed { src: &sae.params.w_enc, rows: d_sae, cols: d_in }),
        ("W_dec", vec![d_sae, d_out], TensorSrc::F32(&sae.params.w_dec)),
        ("b_enc", vec![d_sae], TensorSrc::F32(&sae.params.b_enc)),
        ("b_dec", vec![d_out], TensorSrc::F32(&sae.params.b_dec)),
    ];
    let mut cfg = json!({
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "model_name": sae.metadata.model_name,
            "hook_name": sae.metadata.hook_name,
            "hook_head_index": null,
            "context_size": sae.metadata.context_size,
            "prepend_bos": sae.metadata.prepend_bos,
            "seqpos_slice": [null],
            "model_from_pretrained_kwargs": {},
            "dataset_path": sae.metadata.dataset_path,
            "sae_lens_training_version": format!("saekit {}", env!("CARGO_PKG_VERSION")),
            "tokenizer_fingerprint": sae.metadata.tokenizer_fingerprint,
            "sink_rule": sae.metadata.sink_rule,
            "input_scale": sae.metadata.input_scale,
            "saekit_file_list": FILE_LIST,
        }
    });
    match sae.activation {
        Activation::TopK { k } => {
            cfg["architecture"] = json!("topk");
            cfg["k"] = json!(k);
            cfg["rescale_acts_by_decoder_norm"] = json!(false);
        }
        Activation::JumpRelu => {
            cfg["architecture"] = json!("jumprelu");
            tensors.push(("threshold", vec![d_sae], TensorSrc::F32(&sae.params.threshold)));
        }
        Activation::Relu => {
            cfg["architecture"] = json!("standard");
        }
    }
    if sae.is_transcoder() {
        transcoder_cfg(&mut cfg, sae);
        if !sae.params.w_skip.is_empty() {
            tensors.push(("W_skip", vec![d_out, d_in], TensorSrc::F32(&sae.params.w_skip)));
        }
    }
    if let (Some(extra), Some(obj)) = (extra_cfg, cfg.as_object_mut()) {
        if let Some(e) = extra.as_object() {
            for (k, v) in e {
                obj.insert(k.clone(), v.clone());
            }
        }
    }
    let mut files = vec![SAE_WEIGHTS];
    write_safetensors(&dir.join(SAE_WEIGHTS), &tensors)?;
    if let Some(sp) = log10_sparsity {
        write_safetensors(&dir.join(SPARSITY), &[("sparsity", vec![d_sae], TensorSrc::F32(sp))])?;
        files.push(SPARSITY);
    } else {
        // a sparsity file from an earlier write would describe other weights
        remove_if_present(&dir.join(SPARSITY))?;
    }
    for (name, bytes) in extra_files {
        atomic_write(&dir.join(name), bytes)?;
        files.push(*name);
    }
    atomic_write(&dir.join(CFG), serde_json::to_string_pretty(&cfg)?.as_bytes())?;
    files.push(CFG);
    saekit_files::FileSet::commit(dir, FILE_LIST, &files)?;
    Ok(())
}

/// A transcoder's cfg.json as SAELens writes one (`sae_lens/saes/transcoder.py`): `d_out`, the
/// architecture `transcoder` / `skip_transcoder` (ReLU), `jumprelu_transcoder` /
/// `jumprelu_skip_transcoder`, or saekit's `topk_transcoder` (with `k`; SAELens has no TopK
/// transcoder), and both hooks, in `metadata` and at the top as older SAELens and circuit-tracer
/// read them.
fn transcoder_cfg(cfg: &mut Value, sae: &Sae) {
    let skip = !sae.params.w_skip.is_empty();
    let arch = match (sae.activation, skip) {
        (Activation::Relu, false) => "transcoder",
        (Activation::Relu, true) => "skip_transcoder",
        (Activation::JumpRelu, false) => "jumprelu_transcoder",
        (Activation::JumpRelu, true) => "jumprelu_skip_transcoder",
        (Activation::TopK { .. }, _) => "topk_transcoder",
    };
    let md = &sae.metadata;
    let layer = |hook: &str| hook.strip_prefix("blocks.").and_then(|h| h.split('.').next()?.parse::<u64>().ok());
    cfg["architecture"] = json!(arch);
    cfg["d_out"] = json!(sae.d_out());
    cfg["apply_b_dec_to_input"] = json!(false);
    cfg["hook_name"] = json!(md.hook_name);
    cfg["hook_name_out"] = json!(md.hook_name_out);
    cfg["hook_layer"] = json!(layer(&md.hook_name));
    cfg["hook_layer_out"] = json!(layer(&md.hook_name_out));
    cfg["metadata"]["hook_name_out"] = json!(md.hook_name_out);
    cfg["metadata"]["output_scale"] = json!(md.output_scale);
}

fn remove_if_present(p: &Path) -> Result<()> {
    match std::fs::remove_file(p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove {}", p.display()))
        }
        _ => Ok(()),
    }
}

/// A folder saekit wrote (its cfg.json names the file list) must hold its complete, unaltered list.
fn check_file_set(dir: &Path, cfg: &Value) -> Result<()> {
    let names_list = cfg.get("metadata").and_then(|m| m.get("saekit_file_list")).is_some();
    match saekit_files::FileSet::verify(dir, FILE_LIST)? {
        Some(_) => Ok(()),
        None if names_list => bail!(
            "{}: incomplete SAE folder: {FILE_LIST} is missing, so a write was interrupted (files may belong to different runs); write it again",
            dir.display()
        ),
        None => Ok(()),
    }
}

fn read_f32_tensor(st: &SafeTensors<'_>, name: &str, path: &Path) -> Result<(Vec<usize>, Vec<f32>)> {
    let t = st.tensor(name).with_context(|| format!("{}: no tensor {name:?}", path.display()))?;
    let data = t.data();
    let v: Vec<f32> = match t.dtype() {
        Dtype::F32 => data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::BF16 => data.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::F16 => data.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        other => bail!("{}: tensor {name:?} has dtype {other:?}; expected f32, bf16 or f16", path.display()),
    };
    Ok((t.shape().to_vec(), v))
}

fn expect_shape(name: &str, got: &[usize], want: &[usize], path: &Path) -> Result<()> {
    if got != want {
        bail!("{}: tensor {name} has shape {got:?}, expected {want:?}", path.display());
    }
    Ok(())
}

fn get_str<'a>(v: &'a Value, k: &str) -> Option<&'a str> {
    v.get(k).and_then(|x| x.as_str())
}

/// Load an SAE folder (SAELens v6 or legacy, sparsify) or a Gemma Scope `params.npz`.
pub fn load_sae(path: impl AsRef<Path>) -> Result<Sae> {
    let path = path.as_ref();
    let sae = load_sae_parts(path)?;
    check_loaded(&sae, path)?;
    Ok(sae)
}

/// What every consumer assumes of an SAE, whatever the file said.
fn check_loaded(sae: &Sae, path: &Path) -> Result<()> {
    if sae.d_in == 0 || sae.d_sae == 0 {
        bail!("{}: empty SAE (d_in {}, d_sae {})", path.display(), sae.d_in, sae.d_sae);
    }
    if let Activation::TopK { k } = sae.activation {
        if k == 0 || k > sae.d_sae {
            bail!("{}: topk k = {k} must be in 1..={} (d_sae)", path.display(), sae.d_sae);
        }
    }
    Ok(())
}

fn load_sae_parts(path: &Path) -> Result<Sae> {
    if path.is_file() {
        if path.extension().and_then(|e| e.to_str()) == Some("npz") {
            return load_gemma_scope_npz(path);
        }
        bail!("{}: not an SAE folder or params.npz", path.display());
    }
    if path.join("params.npz").is_file() && !path.join(CFG).exists() {
        return load_gemma_scope_npz(&path.join("params.npz"));
    }
    let cfg_path = path.join(CFG);
    let cfg_text = std::fs::read_to_string(&cfg_path).with_context(|| format!("reading {}", cfg_path.display()))?;
    let cfg: Value = serde_json::from_str(&cfg_text).with_context(|| format!("parsing {}", cfg_path.display()))?;
    check_file_set(path, &cfg)?;
    if path.join("sae.safetensors").is_file() && !path.join(SAE_WEIGHTS).exists() {
        return load_sparsify(path, &cfg);
    }
    load_saelens(path, &cfg)
}

fn load_saelens(dir: &Path, cfg: &Value) -> Result<Sae> {
    let cfg_path = dir.join(CFG);
    let d_in =
        cfg.get("d_in").and_then(|v| v.as_u64()).with_context(|| format!("{}: no d_in", cfg_path.display()))? as usize;
    let d_sae =
        cfg.get("d_sae").and_then(|v| v.as_u64()).with_context(|| format!("{}: no d_sae", cfg_path.display()))?
            as usize;
    let arch = get_str(cfg, "architecture").unwrap_or("standard");
    let norm = get_str(cfg, "normalize_activations").unwrap_or("none");
    if norm != "none" {
        bail!(
            "{}: normalize_activations = {norm:?} needs activation statistics that the folder does not carry; only \"none\" is supported (SAELens folds expected_average_only_in into the weights on save)",
            cfg_path.display()
        );
    }
    if let Some(r) = get_str(cfg, "reshape_activations") {
        if r != "none" {
            bail!("{}: reshape_activations = {r:?} is not supported", cfg_path.display());
        }
    }
    if cfg.get("d_out").is_some() || arch.contains("transcoder") {
        bail!(
            "{}: a transcoder (architecture {arch:?}) maps one hook to another, it is not an SAE over one activation; load it as a transcoder (saekit eval-model / attribute --transcoders)",
            cfg_path.display()
        );
    }
    let legacy_fn = get_str(cfg, "activation_fn_str").unwrap_or("");
    let legacy_k = cfg.get("activation_fn_kwargs").and_then(|a| a.get("k")).and_then(|k| k.as_u64());
    let activation = match arch {
        "topk" => {
            if cfg.get("rescale_acts_by_decoder_norm").and_then(|v| v.as_bool()) == Some(true) {
                bail!("{}: rescale_acts_by_decoder_norm = true (a training-time TopK config); save the inference SAE so the decoder norms are folded", cfg_path.display());
            }
            let k = cfg
                .get("k")
                .and_then(|v| v.as_u64())
                .or(legacy_k)
                .with_context(|| format!("{}: topk without k", cfg_path.display()))?;
            Activation::TopK { k: k as usize }
        }
        "jumprelu" => Activation::JumpRelu,
        "standard" => match legacy_fn {
            "" | "relu" => Activation::Relu,
            "topk" => Activation::TopK {
                k: legacy_k
                    .with_context(|| format!("{}: legacy topk without activation_fn_kwargs.k", cfg_path.display()))?
                    as usize,
            },
            other => bail!("{}: legacy activation_fn_str {other:?} is not supported", cfg_path.display()),
        },
        other => bail!(
            "{}: architecture {other:?} is not supported (supported: standard, topk, jumprelu)",
            cfg_path.display()
        ),
    };
    if let Some(f) = cfg.get("finetuning_scaling_factor").and_then(|v| v.as_bool()) {
        if f {
            bail!("{}: finetuning_scaling_factor is set; not supported", cfg_path.display());
        }
    }
    let wpath = dir.join(SAE_WEIGHTS);
    let bytes = map_file(&wpath)?;
    let st = SafeTensors::deserialize(&bytes).with_context(|| format!("parsing {}", wpath.display()))?;
    let (s, w_enc_t) = read_f32_tensor(&st, "W_enc", &wpath)?;
    expect_shape("W_enc", &s, &[d_in, d_sae], &wpath)?;
    let (s, w_dec) = read_f32_tensor(&st, "W_dec", &wpath)?;
    expect_shape("W_dec", &s, &[d_sae, d_in], &wpath)?;
    let (s, b_enc) = read_f32_tensor(&st, "b_enc", &wpath)?;
    expect_shape("b_enc", &s, &[d_sae], &wpath)?;
    let (s, b_dec) = read_f32_tensor(&st, "b_dec", &wpath)?;
    expect_shape("b_dec", &s, &[d_in], &wpath)?;
    let threshold = if activation == Activation::JumpRelu {
        let (s, t) = if st.names().contains(&"threshold") {
            read_f32_tensor(&st, "threshold", &wpath)?
        } else if st.names().contains(&"log_threshold") {
            let (s, l) = read_f32_tensor(&st, "log_threshold", &wpath)?;
            (s, l.iter().map(|v| v.exp()).collect())
        } else {
            bail!(
                "{}: jumprelu SAE without a threshold tensor; refusing (reconstructions would be wrong)",
                wpath.display()
            );
        };
        expect_shape("threshold", &s, &[d_sae], &wpath)?;
        t
    } else {
        Vec::new()
    };
    for extra in ["b_gate", "b_mag", "r_mag", "W_skip"] {
        if st.names().contains(&extra) {
            bail!("{}: has tensor {extra} (gated / skip SAE); not supported", wpath.display());
        }
    }
    let md = cfg.get("metadata").unwrap_or(cfg);
    let metadata = SaeMetadata {
        model_name: get_str(md, "model_name").unwrap_or("").into(),
        hook_name: get_str(md, "hook_name").or_else(|| get_str(md, "hook_point")).unwrap_or("").into(),
        context_size: md.get("context_size").and_then(|v| v.as_u64()).unwrap_or(128) as usize,
        prepend_bos: md.get("prepend_bos").and_then(|v| v.as_bool()).unwrap_or(true),
        dataset_path: get_str(md, "dataset_path").unwrap_or("").into(),
        tokenizer_fingerprint: get_str(md, "tokenizer_fingerprint").unwrap_or("").into(),
        sink_rule: get_str(md, "sink_rule").unwrap_or("").into(),
        input_scale: md.get("input_scale").and_then(|v| v.as_f64()).map(|v| v as f32),
        ..Default::default()
    };
    Ok(Sae {
        d_in,
        d_sae,
        activation,
        params: Params { w_enc: transpose(&w_enc_t, d_in, d_sae), b_enc, w_dec, b_dec, threshold, w_skip: Vec::new() },
        apply_b_dec_to_input: cfg.get("apply_b_dec_to_input").and_then(|v| v.as_bool()).unwrap_or(true),
        metadata,
    })
}

fn load_sparsify(dir: &Path, cfg: &Value) -> Result<Sae> {
    let cfg_path = dir.join(CFG);
    let act = get_str(cfg, "activation").unwrap_or("topk");
    if act != "topk" {
        bail!("{}: sparsify activation {act:?} is not supported (only topk)", cfg_path.display());
    }
    if cfg.get("transcode").and_then(|v| v.as_bool()) == Some(true) {
        bail!("{}: sparsify transcoder; not supported", cfg_path.display());
    }
    if cfg.get("skip_connection").and_then(|v| v.as_bool()) == Some(true) {
        bail!("{}: sparsify skip connection (W_skip); not supported", cfg_path.display());
    }
    let k = cfg.get("k").and_then(|v| v.as_u64()).with_context(|| format!("{}: no k", cfg_path.display()))? as usize;
    let wpath = dir.join("sae.safetensors");
    let bytes = map_file(&wpath)?;
    let st = SafeTensors::deserialize(&bytes).with_context(|| format!("parsing {}", wpath.display()))?;
    let (s, w_enc) = read_f32_tensor(&st, "encoder.weight", &wpath)?;
    if s.len() != 2 {
        bail!("{}: encoder.weight has shape {s:?}", wpath.display());
    }
    // sparsify stores nn.Linear weights: encoder.weight is [num_latents, d_in], same as ours
    let (d_sae, d_in) = (s[0], s[1]);
    if let Some(di) = cfg.get("d_in").and_then(|v| v.as_u64()) {
        if di as usize != d_in {
            bail!("{}: cfg d_in {di} but encoder.weight is {s:?}", wpath.display());
        }
    }
    let (s, b_enc) = read_f32_tensor(&st, "encoder.bias", &wpath)?;
    expect_shape("encoder.bias", &s, &[d_sae], &wpath)?;
    let (s, w_dec) = read_f32_tensor(&st, "W_dec", &wpath)?;
    expect_shape("W_dec", &s, &[d_sae, d_in], &wpath)?;
    let (s, b_dec) = read_f32_tensor(&st, "b_dec", &wpath)?;
    expect_shape("b_dec", &s, &[d_in], &wpath)?;
    if st.names().contains(&"W_skip") {
        bail!("{}: has W_skip; not supported", wpath.display());
    }
    Ok(Sae {
        d_in,
        d_sae,
        activation: Activation::TopK { k },
        params: Params { w_enc, b_enc, w_dec, b_dec, threshold: Vec::new(), w_skip: Vec::new() },
        apply_b_dec_to_input: true,
        metadata: SaeMetadata {
            hook_name: dir.file_name().and_then(|s| s.to_str()).unwrap_or("").into(),
            ..Default::default()
        },
    })
}

type Npz = zip::ZipArchive<std::io::BufReader<File>>;

/// One float array of a `.npz`, read as f32. The declared shape is checked against the stored
/// size before anything is allocated, and the data is read up to that size only.
fn npz_f32(ar: &mut Npz, name: &str, path: &Path) -> Result<(Vec<usize>, Vec<f32>)> {
    use std::io::Read;
    let mut f = match ar.by_name(&format!("{name}.npy")) {
        Ok(f) => f,
        Err(zip::result::ZipError::FileNotFound) => bail!("{}: no array {name:?}", path.display()),
        Err(e) => bail!("{}: reading {name}: {e}", path.display()),
    };
    let entry = path.join(format!("{name}.npy"));
    let stored = f.size();
    // magic and version (10 bytes), 2 more length bytes for format 2 and 3, then the header text
    let truncated = || format!("{}: truncated .npy header", entry.display());
    let mut head = vec![0u8; 10];
    f.read_exact(&mut head).with_context(truncated)?;
    if head[6] >= 2 {
        head.resize(12, 0);
        f.read_exact(&mut head[10..]).with_context(truncated)?;
    }
    let (start, hlen) = crate::source::npy_preamble(&head, &entry)?;
    head.resize(start + hlen, 0);
    f.read_exact(&mut head[start..]).with_context(truncated)?;
    let h = crate::source::npy_header(&head, &entry)?;
    if h.fortran_order && h.shape.len() > 2 {
        bail!(
            "{}: {name} is a Fortran-ordered {}-D array; only 1-D and 2-D are supported",
            path.display(),
            h.shape.len()
        );
    }
    let elem = match h.descr.as_str() {
        "<f4" => 4,
        "<f8" => 8,
        other => bail!("{}: {name} has dtype {other:?}; expected <f4 or <f8", path.display()),
    };
    let data = stored.saturating_sub(head.len() as u64);
    if h.data_bytes(elem).is_none_or(|n| n as u64 != data) {
        bail!("{}: {name} declares shape {:?} but holds {data} bytes of {} data", path.display(), h.shape, h.descr);
    }
    let mut bytes = Vec::new();
    f.take(data).read_to_end(&mut bytes).with_context(|| format!("{}: reading {name}", path.display()))?;
    if bytes.len() as u64 != data {
        bail!("{}: {name} is truncated ({} of {data} bytes)", path.display(), bytes.len());
    }
    let v: Vec<f32> = if elem == 4 {
        bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    } else {
        bytes.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap_or_default()) as f32).collect()
    };
    // numpy writes a transposed view (`W.T`) column-major; a 2-D [r, c] array in Fortran order is the
    // row-major [c, r] array, so one transpose brings it back to the layout the rest of the loader reads.
    if h.fortran_order && h.shape.len() == 2 {
        let (rows, cols) = (h.shape[0], h.shape[1]);
        return Ok((h.shape, transpose(&v, cols, rows)));
    }
    Ok((h.shape, v))
}

/// Gemma Scope `params.npz`: W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc, b_dec, threshold;
/// JumpReLU without the pre-encoder bias subtraction.
pub fn load_gemma_scope_npz(path: &Path) -> Result<Sae> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut ar = zip::ZipArchive::new(std::io::BufReader::new(file))
        .with_context(|| format!("{}: not a .npz (zip) archive", path.display()))?;
    let (s, w_enc_t) = npz_f32(&mut ar, "W_enc", path)?;
    if s.len() != 2 {
        bail!("{}: W_enc has shape {s:?}", path.display());
    }
    let (d_in, d_sae) = (s[0], s[1]);
    let (s, w_dec) = npz_f32(&mut ar, "W_dec", path)?;
    expect_shape("W_dec", &s, &[d_sae, d_in], path)?;
    let (s, b_enc) = npz_f32(&mut ar, "b_enc", path)?;
    expect_shape("b_enc", &s, &[d_sae], path)?;
    let (s, b_dec) = npz_f32(&mut ar, "b_dec", path)?;
    expect_shape("b_dec", &s, &[d_in], path)?;
    let (s, threshold) = npz_f32(&mut ar, "threshold", path).with_context(|| {
        format!("{}: Gemma Scope SAEs are JumpReLU; refusing to load without threshold", path.display())
    })?;
    expect_shape("threshold", &s, &[d_sae], path)?;
    Ok(Sae {
        d_in,
        d_sae,
        activation: Activation::JumpRelu,
        params: Params { w_enc: transpose(&w_enc_t, d_in, d_sae), b_enc, w_dec, b_dec, threshold, w_skip: Vec::new() },
        apply_b_dec_to_input: false,
        metadata: SaeMetadata { context_size: 1024, prepend_bos: true, ..Default::default() },
    })
}

/// Read `sparsity.safetensors` (log10 firing frequency) if present.
pub fn load_sparsity(dir: &Path) -> Result<Option<Vec<f32>>> {
    let p = dir.join(SPARSITY);
    if !p.is_file() {
        return Ok(None);
    }
    let bytes = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
    let st = SafeTensors::deserialize(&bytes).with_context(|| format!("parsing {}", p.display()))?;
    Ok(Some(read_f32_tensor(&st, "sparsity", &p)?.1))
}
