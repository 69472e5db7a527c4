//! `saekit activations`: one hook point's activations for a text, as .npy, to check saekit against any
//! other tooling.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use saekit_model::HookPoint;

use super::model_arg::ModelArgs;

#[derive(clap::Args, Debug)]
pub struct ActivationsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The text to run (tokenised without a chat template; BOS added only if the model expects one).
    #[arg(long, conflicts_with = "text_file")]
    pub text: Option<String>,
    /// Read the text from a file instead.
    #[arg(long)]
    pub text_file: Option<PathBuf>,
    /// TransformerLens hook name, e.g. blocks.15.hook_resid_post, hook_embed, ln_final.hook_normalized.
    #[arg(long, default_value = "blocks.15.hook_resid_post")]
    pub hook: String,
    /// Weights are always dequantized to f32: on AVX2 CPUs it is the exact path and the fastest
    /// (see BENCHMARKS.md). Accepted so scripts written for other tools keep working.
    #[arg(long)]
    pub dequantize: bool,
    /// Output .npy, f32 [n_tokens, d_model] (d_mlp at mlp.hook_pre / mlp.hook_post).
    #[arg(long, short = 'o')]
    pub out: PathBuf,
    /// Also write the token ids as .npy (u32 [n_tokens]).
    #[arg(long)]
    pub ids_out: Option<PathBuf>,
}

pub fn run(args: ActivationsArgs) -> Result<()> {
    let text = match (&args.text, &args.text_file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => std::fs::read_to_string(f).with_context(|| format!("{}: cannot read", f.display()))?,
        (None, None) => bail!("give the text with --text or --text-file"),
    };
    let point: HookPoint = args.hook.parse()?;
    let model = args.model.load()?;
    let ids = model.tokenizer().encode(&text, true)?;
    if ids.is_empty() {
        bail!("the text tokenises to nothing");
    }
    let cache = model.run_with_cache(&ids, 1, &[point])?;
    let acts = cache.get(&point).context("internal: hook did not fire")?;
    let d = point.width(model.config().d_model, model.config().d_ff);
    write_npy_f32(&args.out, acts, &[ids.len() as u64, d as u64])?;
    if let Some(p) = &args.ids_out {
        write_npy_u32(p, &ids)?;
    }
    let norms: Vec<f32> = acts.chunks(d).map(|r| r.iter().map(|v| v * v).sum::<f32>().sqrt()).collect();
    eprintln!(
        "{point}: {} tokens x {d} -> {} (row L2 norm: first {:.1}, median {:.1}, max {:.1})",
        ids.len(),
        args.out.display(),
        norms[0],
        median(&norms),
        norms.iter().copied().fold(0.0, f32::max)
    );
    Ok(())
}

pub fn median(v: &[f32]) -> f32 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s.get(s.len() / 2).copied().unwrap_or(0.0)
}

pub fn write_npy_f32(path: &Path, data: &[f32], shape: &[u64]) -> Result<()> {
    write_npy(path, data, shape)
}

pub fn write_npy_u32(path: &Path, data: &[u32]) -> Result<()> {
    write_npy(path, data, &[data.len() as u64])
}

fn write_npy<T: npyz::Serialize + npyz::AutoSerialize + Copy>(path: &Path, data: &[T], shape: &[u64]) -> Result<()> {
    use npyz::WriterBuilder;
    saekit_files::write_atomic_with(path, |f| {
        let mut w =
            npyz::WriteOptions::new().default_dtype().shape(shape).writer(std::io::BufWriter::new(f)).begin_nd()?;
        w.extend(data.iter().copied()).context("write failed (disk full?)")?;
        w.finish()?;
        Ok(())
    })
}
