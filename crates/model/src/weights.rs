//! Reading named tensors as f32 from a GGUF file or a folder of safetensors, with shape checks.
//!
//! Quantized GGUF blocks (Q4_0, Q4_1, Q8_0, K-quants, ...) are dequantized once at load: on AVX2 CPUs
//! without VNNI the f32 GEMM is both the fastest and the only exact path (see BENCHMARKS.md).

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device};

/// candle attaches a multi-line backtrace to its errors when RUST_BACKTRACE is set; users need one line.
pub(crate) fn candle_msg(e: candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => candle_msg(*inner),
        e => e.to_string().lines().next().unwrap_or_default().to_string(),
    }
}

pub enum WeightSource {
    Gguf { file: PathBuf, content: gguf_file::Content },
    Safetensors { files: Vec<PathBuf>, tensors: candle_core::safetensors::MmapedSafetensors },
}

impl WeightSource {
    pub fn open_gguf(path: &Path) -> Result<Self> {
        let f = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
        let mut r = BufReader::new(f);
        let content = gguf_file::Content::read(&mut r)
            .map_err(|e| anyhow!("{}: not a valid GGUF file: {}", path.display(), candle_msg(e)))?;
        Ok(Self::Gguf { file: path.to_path_buf(), content })
    }

    /// Open every `*.safetensors` of a Hugging Face folder (the shards named by
    /// `model.safetensors.index.json` when it exists).
    pub fn open_safetensors(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            let s = std::fs::read_to_string(&index).with_context(|| format!("{}: cannot read", index.display()))?;
            let v: serde_json::Value =
                serde_json::from_str(&s).with_context(|| format!("{}: invalid JSON", index.display()))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| anyhow!("{}: no weight_map", index.display()))?;
            let mut names: Vec<String> = map.values().filter_map(|f| f.as_str().map(String::from)).collect();
            names.sort();
            names.dedup();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
                .with_context(|| format!("{}: cannot list folder", dir.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                .collect();
            v.sort();
            v
        };
        if files.is_empty() {
            bail!("{}: no *.safetensors files in the folder", dir.display());
        }
        for f in &files {
            if !f.exists() {
                bail!("{}: shard listed in the index is missing", f.display());
            }
        }
        // SAFETY: the files are mapped read-only; modifying them while saekit runs is not supported.
        let tensors = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }.map_err(|e| {
            anyhow!("{}: not a valid safetensors file (truncated or corrupt?): {}", files[0].display(), candle_msg(e))
        })?;
        Ok(Self::Safetensors { files, tensors })
    }

    pub fn describe(&self) -> String {
        match self {
            WeightSource::Gguf { file, .. } => file.display().to_string(),
            WeightSource::Safetensors { files, .. } => {
                files.first().and_then(|f| f.parent()).map(|p| p.display().to_string()).unwrap_or_default()
            }
        }
    }

    pub fn has(&self, name: &str) -> bool {
        match self {
            WeightSource::Gguf { content, .. } => content.tensor_infos.contains_key(name),
            WeightSource::Safetensors { tensors, .. } => tensors.get(name).is_ok(),
        }
    }

    /// The tensor's shape in PyTorch order (`[d_out, d_in]` for a linear weight).
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        match self {
            WeightSource::Gguf { content, .. } => content.tensor_infos.get(name).map(|t| t.shape.dims().to_vec()),
            WeightSource::Safetensors { tensors, .. } => tensors.get(name).ok().map(|v| v.shape().to_vec()),
        }
    }

    /// Load a tensor as f32, checking that its shape is `expected` (PyTorch order).
    pub fn get(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        let shape = self.shape(name).ok_or_else(|| anyhow!("{}: missing tensor '{name}'", self.describe()))?;
        if shape != expected {
            bail!("{}: tensor '{name}' has shape {shape:?} but the model config implies {expected:?}", self.describe());
        }
        let t = match self {
            WeightSource::Gguf { file, content } => {
                let f = File::open(file).with_context(|| format!("{}: cannot open", file.display()))?;
                let mut r = BufReader::new(f);
                let q = content
                    .tensor(&mut r, name, &Device::Cpu)
                    .map_err(|e| anyhow!("{}: tensor '{name}': {}", file.display(), candle_msg(e)))?;
                q.dequantize(&Device::Cpu)
                    .map_err(|e| anyhow!("{}: cannot dequantize '{name}': {}", file.display(), candle_msg(e)))?
            }
            WeightSource::Safetensors { tensors, .. } => tensors
                .load(name, &Device::Cpu)
                .map_err(|e| anyhow!("{}: tensor '{name}': {}", self.describe(), candle_msg(e)))?,
        };
        let t =
            t.to_dtype(DType::F32).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1::<f32>()).map_err(|e| {
                anyhow!("{}: tensor '{name}' cannot be read as f32: {}", self.describe(), candle_msg(e))
            })?;
        if let Some(bad) = t.iter().position(|v| !v.is_finite()) {
            bail!("{}: tensor '{name}' holds a non-finite value at element {bad}", self.describe());
        }
        Ok(t)
    }

    /// Like [`get`](Self::get) but `None` when the tensor is absent (optional biases, untied heads).
    pub fn get_opt(&self, name: &str, expected: &[usize]) -> Result<Option<Vec<f32>>> {
        if self.has(name) {
            self.get(name, expected).map(Some)
        } else {
            Ok(None)
        }
    }

    pub fn gguf_content(&self) -> Option<&gguf_file::Content> {
        match self {
            WeightSource::Gguf { content, .. } => Some(content),
            _ => None,
        }
    }
}
