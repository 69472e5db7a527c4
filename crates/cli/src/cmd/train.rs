//! `saekit train`: train a sparse autoencoder from a TOML config and/or flags.

use super::train_live::LiveConfig;
use anyhow::{bail, Result};
use clap::Args;
use saekit_sae::config::parse_count;
use saekit_sae::{Arch, ConfigFile, NpySource, RunOptions, TrainConfig};

/// Train a sparse autoencoder (topk, batchtopk, jumprelu, relu) on stored activations or live from the model.
///
/// Every field has a default (`--print-config` shows them all, with the recipe values for the
/// chosen architecture); a `--config` TOML sets any of them and flags override the file.
/// Writes a SAELens v6 folder (cfg.json, sae_weights.safetensors, sparsity.safetensors) plus
/// metrics.jsonl and checkpoints/ (the last two kept; `--resume DIR` continues bit-identically).
///
/// Inputs: a float32 .npy [N, d_in], an activation store folder (`saekit harvest`), or `--live`:
/// the model run over a tokenized dataset (`saekit tokenize`) with nothing written to disk
/// (`saekit train --live --contexts TOKENS_DIR --hook-name blocks.15.hook_resid_post`).
///
/// Sinks: stores and --live skip position 0, BOS and end-of-text rows; then rows whose L2 norm
/// exceeds 10x the median norm of the first 65,536 rows are excluded (SmolLM2's attention sinks
/// carry ~100x the median norm and 93% of the raw variance); the count is reported. Set
/// `--outlier-norm-factor 0` to keep every row. Inputs are scaled by one scalar so that
/// E||x||^2 = d_in while training; the scale is folded into the saved weights.
///
/// Transcoders: `--input-hook` and `--target-hook` name two hooks of one activation store (harvest
/// both in one pass: `saekit harvest --hooks blocks.L.ln2.hook_normalized,blocks.L.hook_mlp_out`), or
/// with --live two hooks the model computes in one forward (`saekit train-transcoders` trains every layer);
/// the transcoder reads the first and reconstructs the second (FVU is measured against it), and is
/// saved in SAELens' transcoder layout (cfg.json with hook_name and hook_name_out, W_dec [d_sae, d_out],
/// W_skip [d_out, d_in] with --skip), which `saekit eval-model --transcoders` and `attribute` load.
///
/// Examples:
///   saekit train --acts acts/ --d-sae 16384 --k 32 --tokens 20M --out sae/
///   saekit train --acts acts/ --input-hook blocks.0.ln2.hook_normalized --target-hook blocks.0.hook_mlp_out --skip --out tc/
///   saekit train --arch relu --acts x.npy --lr 1e-3 --tokens 2M --out sae-relu/
///   saekit train --print-config --arch jumprelu > train.toml   # edit, then --config train.toml
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct TrainArgs {
    /// TOML file with any TrainConfig fields.
    #[arg(long)]
    pub config: Option<String>,
    /// Activations: a float32 .npy file [N, d_in], or an activation store folder (`saekit harvest`).
    #[arg(long)]
    pub acts: Option<String>,
    /// Train straight from the model (no activations on disk): needs --contexts; reads the hook
    /// point given by --hook-name. Rows are shuffled within blocks of --live-block-tokens.
    #[arg(long)]
    pub live: bool,
    /// Tokenized dataset (`saekit tokenize`) for --live.
    #[arg(long, value_name = "TOKENS_DIR")]
    pub contexts: Option<String>,
    /// Model for --live: a .gguf, an HF folder or a fetched hub name (default: SmolLM2-135M-Instruct).
    #[arg(long, short = 'm', env = "SAEKIT_MODEL")]
    pub model: Option<String>,
    /// Split of the tokenized dataset for --live.
    #[arg(long)]
    pub split: Option<String>,
    /// Contexts per forward pass for --live.
    #[arg(long)]
    pub live_batch: Option<usize>,
    /// Tokens per shuffle block for --live (default 65536; held in memory as f32).
    #[arg(long)]
    pub live_block_tokens: Option<String>,
    /// Hook to read from a multi-hook store (default: its only hook).
    #[arg(long, default_value = "")]
    pub hook: String,
    /// Train a transcoder: the hook it reads (e.g. blocks.0.ln2.hook_normalized), of a store or --live; needs --target-hook.
    #[arg(long, requires = "target_hook", conflicts_with_all = ["hook", "hook_name"])]
    pub input_hook: Option<String>,
    /// Train a transcoder: the store hook it reconstructs from --input-hook's rows (e.g. blocks.0.hook_mlp_out).
    #[arg(long, requires = "input_hook")]
    pub target_hook: Option<String>,
    /// A transcoder's learned linear skip connection W_skip [d_out, d_in] (SAELens' skip_transcoder).
    #[arg(long)]
    pub skip: bool,
    /// topk | batchtopk | jumprelu | relu
    #[arg(long)]
    pub arch: Option<String>,
    /// Dictionary size: number of latents (default 16384).
    #[arg(long)]
    pub d_sae: Option<usize>,
    /// Active latents per token for topk / batchtopk (default 32).
    #[arg(long)]
    pub k: Option<usize>,
    /// Training tokens, e.g. 2M, 500k, 409600.
    #[arg(long)]
    pub tokens: Option<String>,
    /// Rows per optimizer step (default 4096).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Learning rate (default: the architecture's recipe; topk 2e-4/sqrt(d_sae/2^14)).
    #[arg(long)]
    pub lr: Option<f32>,
    /// Seed of the initialisation and of the data order (default 0).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Output folder.
    #[arg(long)]
    pub out: Option<String>,
    /// Continue the run in DIR from its newest checkpoint (same config, same data order). The
    /// checkpoint's config is the base: a flag that changes it, or data whose content changed, is refused.
    #[arg(long, value_name = "DIR")]
    pub resume: Option<String>,
    /// Start afresh in an output folder that holds an earlier run: clear its saekit files first
    /// (without it a fresh run refuses a non-empty folder; files saekit did not write are never removed).
    #[arg(long)]
    pub force: bool,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Exclude rows whose L2 norm exceeds this multiple of the median norm of the first 65,536 rows
    /// (default 10; 0 keeps every row). SmolLM2's attention sinks (position 0, <|endoftext|>) have
    /// ~100x the median norm and carry 93% of the raw variance; the excluded count is reported.
    #[arg(long)]
    pub outlier_norm_factor: Option<f32>,
    /// Train on raw activations (default: one dataset-wide scalar so E||x||^2 = d_in, folded into the saved weights).
    #[arg(long)]
    pub no_normalize: bool,
    /// Multi-TopK: extra loss at 4k latents, weight 1/8.
    #[arg(long)]
    pub multi_topk: bool,
    /// AuxK coefficient (default 1/32 for topk).
    #[arg(long)]
    pub auxk_alpha: Option<f32>,
    /// Tokens without firing after which a latent counts as dead (e.g. 10M).
    #[arg(long)]
    pub dead_tokens: Option<String>,
    #[arg(long)]
    pub log_every: Option<u64>,
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Hook point: what --live reads, which hook of a store to train on (when --hook is not given),
    /// and for a bare .npy the hook written to cfg.json. A store or --live records its own hook in the
    /// SAE; a different --hook-name is refused.
    #[arg(long)]
    pub hook_name: Option<String>,
    /// Model name for cfg.json when training on a bare .npy (stores and --live record their model).
    #[arg(long)]
    pub model_name: Option<String>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Under `mpirun -np N` (a build with `--features mpi`): ranks per replica that split the
    /// latents between them (model parallel); the N / S replicas split each batch's rows (data
    /// parallel; with --live each replica forwards its own shuffle blocks of the contexts, and
    /// `--resume` needs the same number of replicas). Default: all N ranks shard the latents.
    #[arg(long, value_name = "S")]
    pub shards: Option<usize>,
    /// Precision of the encoder GEMM, the step's biggest product: `bf16` runs it on AMX tiles or
    /// AVX512-BF16 with f32 accumulation (Adam, the decoder and every reduction stay f32); `f32`
    /// keeps every product in f32; `auto` takes bf16 where this CPU runs it at least 1.3x faster than
    /// f32 (measured once per machine and kept in ~/.cache/saekit/precision-auto-*.txt; `saekit bench
    /// gemm` shows both rates). A resumed run keeps the precision it started with unless
    /// this flag is given. [default: auto]
    #[arg(long, value_name = "auto|bf16|f32", env = "SAEKIT_PRECISION")]
    pub precision: Option<String>,
}

/// The run's two configs: the trainer's ([`TrainConfig`]) and `--live`'s data source.
pub struct TrainSetup {
    pub train: TrainConfig,
    pub live: LiveConfig,
}

pub fn effective_config(a: &TrainArgs) -> Result<TrainSetup> {
    let base = match &a.config {
        Some(p) => config_file(a, p)?,
        None => TrainSetup { train: TrainConfig::default(), live: LiveConfig::default() },
    };
    apply_flags(a, base)
}

/// The config file `path` (the trainer's keys and `--live`'s), its input paths checked unless flags
/// replace them.
fn config_file(a: &TrainArgs, path: &str) -> Result<TrainSetup> {
    let file = ConfigFile::read(path, &LiveConfig::KEYS)?;
    let live = LiveConfig::from_table(file.source, path)?;
    if a.acts.is_none() && a.contexts.is_none() {
        file.train.check_paths(path)?;
        live.check_paths(path)?;
    }
    Ok(TrainSetup { train: file.train, live })
}

/// Flags override `s` (the defaults, a --config file, or a resumed run's config).
pub(super) fn apply_flags(a: &TrainArgs, s: TrainSetup) -> Result<TrainSetup> {
    Ok(TrainSetup { train: apply_train_flags(a, s.train)?, live: s.live.with_flags(a)? })
}

fn apply_train_flags(a: &TrainArgs, mut c: TrainConfig) -> Result<TrainConfig> {
    if let Some(v) = &a.acts {
        c.acts = Some(v.clone());
    }
    match (&a.precision, &c.precision) {
        (Some(v), _) => c.precision = Some(v.clone()),
        (None, None) => c.precision = Some("auto".into()),
        (None, Some(_)) => {}
    }
    if let Some(v) = &a.arch {
        c.arch = Arch::parse(v)?;
    }
    if let Some(v) = a.d_sae {
        c.d_sae = v;
    }
    if let Some(v) = a.k {
        c.k = v;
    }
    if let Some(v) = &a.tokens {
        c.tokens = parse_count(v)?;
    }
    if let Some(v) = a.batch_size {
        c.batch_size = v;
    }
    if a.lr.is_some() {
        c.lr = a.lr;
    }
    if let Some(v) = a.seed {
        c.seed = v;
    }
    if let Some(v) = &a.out {
        c.out = v.clone();
    }
    if let Some(v) = a.outlier_norm_factor {
        c.outlier_norm_factor = v;
    }
    if a.no_normalize {
        c.normalize_inputs = false;
    }
    if a.multi_topk {
        c.multi_topk = true;
    }
    if a.auxk_alpha.is_some() {
        c.auxk_alpha = a.auxk_alpha;
    }
    if let Some(v) = &a.dead_tokens {
        c.dead_tokens = parse_count(v)?;
    }
    if let Some(v) = a.log_every {
        c.log_every = v;
    }
    if let Some(v) = a.checkpoint_every {
        c.checkpoint_every = v;
    }
    if let Some(v) = &a.hook_name {
        c.hook_name = v.clone();
    }
    if let Some(v) = &a.model_name {
        c.model_name = v.clone();
    }
    if let (Some(i), Some(t)) = (&a.input_hook, &a.target_hook) {
        (c.hook_name, c.hook_name_out) = (i.clone(), t.clone());
    }
    if a.skip {
        c.skip = true;
    }
    Ok(c)
}

pub fn run(a: TrainArgs) -> Result<()> {
    let mut setup = effective_config(&a)?;
    if a.print_config {
        print_config(&setup);
        return Ok(());
    }
    let resume = a.resume.is_some();
    if let Some(dir) = &a.resume {
        setup = resumed_config(&a, dir)?;
    }
    let stop = super::interrupt::stop_flag()?;
    let collective = super::mpi_job::join(a.shards)?.map(|job| job.trainer);
    let distributed = collective.is_some();
    let opts = RunOptions {
        resume,
        progress: !a.quiet,
        force: a.force,
        stop: Some(stop),
        source_config: setup.live.to_table(),
        collective,
        ..Default::default()
    };
    let c = setup.train;
    if setup.live.live {
        let trained = super::train_live::run(c, &setup.live, &opts);
        if distributed {
            super::mpi_job::fatal_across_ranks(trained.as_ref().err());
        }
        return trained;
    }
    let trained = train_stored(&a, &c, resume, &opts);
    if distributed {
        // a failure on one rank ends the whole job: the others would wait in a collective
        super::mpi_job::fatal_across_ranks(trained.as_ref().err());
    }
    let o = trained?;
    if opts.collective.as_ref().is_some_and(|m| m.rank() != 0) {
        return Ok(()); // rank 0 reports
    }
    finish(&o, o.tokens_per_s)
}

/// Train from a .npy file or an activation store.
fn train_stored(a: &TrainArgs, c: &TrainConfig, resume: bool, opts: &RunOptions) -> Result<saekit_sae::TrainOutcome> {
    let Some(acts) = c.acts.clone() else {
        let config = a.config.as_deref().map(|p| format!(", or set `acts` in {p}")).unwrap_or_default();
        bail!("no activations: pass --acts FILE.npy or STORE_DIR, or --live --contexts TOKENS_DIR{config}");
    };
    let store = std::path::Path::new(&acts);
    if !c.hook_name_out.is_empty() {
        if !store.is_dir() {
            bail!("{acts}: a transcoder trains on an activation store holding its input and target hooks (saekit harvest --hooks IN,OUT); a .npy holds one");
        }
        let mut src =
            saekit_sae::StorePairSource::open(store, &c.hook_name, &c.hook_name_out, c.seed, true, c.batch_size)?;
        return Ok(saekit_sae::train(c, &mut src, opts)?);
    }
    Ok(if store.is_dir() {
        // a resumed run reads the hook its checkpoint recorded
        let hook = store_hook(a, resume.then_some(c.hook_name.as_str()))?;
        train_from_store(c, std::path::Path::new(&acts), &hook, opts)?
    } else if acts.ends_with(".npy") {
        let mut src = NpySource::open(&acts, c.seed, true)?;
        saekit_sae::train(c, &mut src, opts)?
    } else {
        bail!("{acts}: expected a float32 .npy file or an activation store folder");
    })
}

/// Train on hook `hook` of the activation store `store` (rows shuffled by the config's seed), then
/// report the run; a signal exits 130 naming the resume command.
pub fn train_on_store(c: &TrainConfig, store: &std::path::Path, hook: &str, opts: &RunOptions) -> Result<()> {
    let o = train_from_store(c, store, hook, opts)?;
    finish(&o, o.tokens_per_s)
}

fn train_from_store(
    c: &TrainConfig,
    store: &std::path::Path,
    hook: &str,
    opts: &RunOptions,
) -> Result<saekit_sae::TrainOutcome> {
    let mut src = saekit_sae::StoreSource::open(store, hook, c.seed, true, c.batch_size)?;
    Ok(saekit_sae::train(c, &mut src, opts)?)
}

/// `--print-config`: every key with its value, then the recipe values resolved for the architecture.
fn print_config(s: &TrainSetup) {
    let file = ConfigFile { train: s.train.clone(), source: s.live.to_table() };
    print!("{}", file.to_toml());
    println!("\n# recipe values resolved for arch = {:?}:", s.train.arch.name());
    for line in toml::to_string_pretty(&s.train.resolved()).unwrap_or_default().lines() {
        println!("# {line}");
    }
}

/// A resumed run continues with its own config (the given --config, else its newest checkpoint's);
/// flags may only restate it (the trainer checks its keys, [`LiveConfig::check_resume`] the live ones).
fn resumed_config(a: &TrainArgs, dir: &str) -> Result<TrainSetup> {
    let base = match &a.config {
        Some(p) => config_file(a, p)?,
        None => {
            let file = saekit_sae::checkpoint::latest_config(std::path::Path::new(dir))?;
            let origin = saekit_sae::checkpoint::folder(std::path::Path::new(dir)).display().to_string();
            TrainSetup { train: file.train, live: LiveConfig::from_table(file.source, &origin)? }
        }
    };
    let checkpointed = base.live.clone();
    let mut s = apply_flags(a, base)?;
    checkpointed.check_resume(&s.live)?;
    s.train.out = dir.to_string();
    Ok(s)
}

/// The store hook to train on: --hook, else an explicit --hook-name, else the resumed run's hook (the
/// store's only hook when none is given). The SAE's metadata then names the hook actually read.
fn store_hook(a: &TrainArgs, resumed: Option<&str>) -> Result<String> {
    match (a.hook.as_str(), a.hook_name.as_deref().or(resumed)) {
        ("", Some(h)) => Ok(h.to_string()),
        (h, Some(n)) if h != n => {
            bail!("--hook {h} and --hook-name {n} disagree; the SAE is labelled with the hook it reads")
        }
        (h, _) => Ok(h.to_string()),
    }
}

/// Report a finished run, or exit 130 with the resume command after Ctrl-C / SIGTERM.
pub(super) fn finish(o: &saekit_sae::TrainOutcome, tokens_per_s: f64) -> Result<()> {
    if o.interrupted {
        super::interrupt::exit_interrupted(
            &format!("stopped after step {} with a checkpoint", o.steps),
            &format!("saekit train --resume {}", o.out_dir.display()),
        );
    }
    report(o, tokens_per_s);
    Ok(())
}

fn report(o: &saekit_sae::TrainOutcome, tokens_per_s: f64) {
    eprintln!(
        "trained {} steps ({} tokens, {:.0} tokens/s); excluded {} outlier rows (norm > {:.1}); last batch FVU {:.4}, L0 {:.1}, dead {:.2}%",
        o.steps,
        o.tokens,
        tokens_per_s,
        o.excluded_rows,
        o.max_norm,
        o.last.fvu,
        o.last.l0,
        100.0 * o.dead_frac
    );
    println!("{}", o.out_dir.display());
}
