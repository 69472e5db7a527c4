//! `saekit demo`: the whole pipeline on the built-in defaults, each stage reusing what an earlier run left.

use std::path::PathBuf;

use anyhow::Result;
use saekit_model::{GenerateOptions, HookPoint, Hooks};

use super::model_arg::ModelArgs;

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Where every stage writes its output (re-running reuses it).
    #[arg(long, default_value = "saekit-demo")]
    pub dir: PathBuf,
    /// The hook point the SAE is trained on.
    #[arg(long, default_value = "blocks.15.hook_resid_post")]
    pub hook: String,
}

pub fn run(args: DemoArgs) -> Result<()> {
    let point: HookPoint = args.hook.parse()?;
    if args.model.model.is_none() {
        super::fetch_model::fetch_default(&saekit_model::cache_dir())?;
    }
    let model = args.model.load()?;
    point.check(model.config().n_layers)?;
    std::fs::create_dir_all(&args.dir)?;

    println!(
        "== model: {} ({} layers, d_model {})",
        model.config().name,
        model.config().n_layers,
        model.config().d_model
    );
    let ids = super::generate::prompt_ids(&model, "What is the capital of France?", true, None)?;
    let g = model.generate(&ids, &GenerateOptions { max_new_tokens: 24, ..Default::default() }, &mut Hooks::new())?;
    println!("chat> What is the capital of France?\nSmolLM2> {}", g.text.trim_end_matches("<|im_end|>"));

    let text = "The quick brown fox jumps over the lazy dog. def add(a, b): return a + b";
    let ids = model.tokenizer().encode(text, true)?;
    let cache = model.run_with_cache(&ids, 1, &[point])?;
    let d = model.config().d_model;
    println!("\n== {point}: L2 norm per token (position 0 is an attention sink)");
    for (i, row) in cache.get(&point).unwrap_or_default().chunks(d).enumerate() {
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        println!("{i:>3} {:<14} {norm:>9.1}", format!("{:?}", model.tokenizer().token_text(ids[i])));
    }
    Ok(())
}
