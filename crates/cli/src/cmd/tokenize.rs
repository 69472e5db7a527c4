//! `saekit tokenize`: corpus inputs -> fixed-length token contexts (memory-mappable u32 shards + manifest).

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{anyhow, Result};
use saekit_model::Model;
use saekit_store::harvest::tokenize_options_for;
use saekit_store::{read_corpus, tokenize_corpus, CorpusOptions, Document, TokenizeOptions};

use super::model_arg::ModelArgs;

#[derive(clap::Args, Debug)]
pub struct TokenizeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Files or folders: text files, .jsonl / .jsonl.gz / .jsonl.zst, .parquet.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Output directory: new, empty, or an earlier tokenized dataset (replaced); a folder holding
    /// anything else is refused, untouched.
    #[arg(long, short = 'o')]
    pub out: PathBuf,
    /// JSONL / Parquet field holding the text.
    #[arg(long, default_value = "text")]
    pub text_field: String,
    /// Tokens per context.
    #[arg(long, default_value_t = 128)]
    pub context: usize,
    /// Seed of the train/validation split and of the document shuffle.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Fraction of documents held out as the validation split.
    #[arg(long, default_value_t = 0.01)]
    pub validation_fraction: f64,
    /// Stop after about this many tokens (accepts 10M, 500k, 1e6).
    #[arg(long, value_parser = super::harvest::parse_count)]
    pub max_tokens: Option<u64>,
    /// Contexts per shard file.
    #[arg(long, default_value_t = 65536)]
    pub contexts_per_shard: usize,
}

pub fn run(a: TokenizeArgs) -> Result<()> {
    let path = a.model.path()?;
    let model = a.model.load()?;
    let mut opts = tokenize_options_for(&model);
    opts.context = a.context;
    opts.seed = a.seed;
    opts.validation_fraction = a.validation_fraction;
    opts.max_tokens = a.max_tokens;
    opts.contexts_per_shard = a.contexts_per_shard;
    let copts = CorpusOptions { text_field: a.text_field.clone(), ..Default::default() };
    tokenize_with(&model, &path, &a.inputs, &copts, &opts, &a.out)
}

/// Tokenize `inputs` with `model`'s tokenizer into `out`, with a progress spinner; a signal while
/// reading exits 130 with nothing written.
pub fn tokenize_with(
    model: &Model,
    path: &Path,
    inputs: &[PathBuf],
    copts: &CorpusOptions,
    opts: &TokenizeOptions,
    out: &Path,
) -> Result<()> {
    let tok = model.tokenizer();
    eprintln!(
        "tokenizing with {}: separator id {}, {}",
        path.display(),
        opts.separator,
        match opts.bos {
            Some(b) => format!("BOS id {b} at the start of each context"),
            None => "no BOS (the tokenizer does not add one)".into(),
        }
    );
    let pb = indicatif::ProgressBar::new_spinner();
    pb.set_style(
        indicatif::ProgressStyle::with_template("{spinner} tokenize [{elapsed_precise}] {human_pos} tokens {per_sec}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    let t0 = Instant::now();
    let encode = |t: &str| tok.encode(t, false);
    let stop = super::interrupt::stop_flag()?;
    let stopped = || stop.load(Ordering::SeqCst);
    // Reading and encoding is the long part and writes nothing: a signal there ends the read before
    // the output folder is touched (the dataset is written in one go afterwards, and a rerun starts over).
    let read = |sink: &mut dyn FnMut(Document) -> Result<()>| {
        let mut checked = |doc: Document| if stopped() { Err(anyhow!("interrupted by a signal")) } else { sink(doc) };
        let st = read_corpus(inputs, copts, &mut checked)?;
        if stopped() {
            return Err(anyhow!("interrupted by a signal").into());
        }
        Ok(st)
    };
    let m = match tokenize_corpus(read, &encode, opts, out, &path.display().to_string(), inputs, Some(&pb)) {
        // the read stopped because of the signal (its error passes through the corpus reader)
        Err(_) if stopped() => {
            pb.finish_and_clear();
            super::interrupt::exit_interrupted(
                &format!("stopped while reading; nothing was written to {} (tokenize starts over)", out.display()),
                &super::interrupt::this_command(),
            )
        }
        r => r?,
    };
    pb.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    eprintln!("read: {}", m.read.summary());
    for e in &m.read.examples {
        eprintln!("  dropped: {e}");
    }
    let mut total = 0;
    for (name, s) in &m.splits {
        total += s.stream_tokens;
        eprintln!(
            "{name}: {} documents, {} contexts of {} tokens ({} stream tokens, {} dropped at the end)",
            s.n_docs, s.n_contexts, opts.context, s.stream_tokens, s.dropped_tail
        );
    }
    eprintln!("{} tokens in {secs:.1} s ({:.0} tokens/s) -> {}", total, total as f64 / secs, out.display());
    Ok(())
}
