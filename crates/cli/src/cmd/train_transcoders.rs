//! `saekit train-transcoders`: one transcoder per layer, all fed by one forward pass per block of
//! contexts. Each layer's trainer is the ordinary `saekit_sae::train` on its own thread, reading its
//! layer's (ln2.hook_normalized, hook_mlp_out) pairs through a `LiveLayerSource` from the shared
//! `LiveHookSet`; so each layer checkpoints, resumes and writes its folder as `saekit train` does.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use saekit_model::HookPoint;
use saekit_sae::{ConfigFile, RunOptions, TrainConfig, TrainOutcome};

use super::train::TrainArgs;
use super::train_live::LiveConfig;

/// Train one transcoder per layer (MLP input -> MLP output) from one pass of the model over the data.
///
/// Each forward pass over a block of contexts (from `saekit tokenize`) stops after the deepest layer
/// asked for and feeds every layer's trainer its (blocks.L.ln2.hook_normalized, blocks.L.hook_mlp_out)
/// row pairs; sinks are skipped and rows shuffled within blocks as in `saekit train --live`. Every
/// trainer has the same config (--arch, --d-sae, --k, --skip, --lr, --tokens, ...).
///
/// Writes OUT/layer_L/ (a SAELens transcoder folder per layer, with its metrics.jsonl and
/// checkpoints), OUT/summary.json (per-layer FVU, L0, dead %, tokens/s) and, when the layers are
/// 0..N, OUT/transcoders.yaml with OUT/layer_L.safetensors: circuit-tracer's transcoder set, which
/// `saekit eval-model --transcoders OUT` and `saekit attribute --transcoders OUT` load.
///
/// Ctrl-C checkpoints every layer; `--resume OUT` continues each layer where it stopped (a finished
/// layer is skipped) and ends with the weights an uninterrupted run writes.
///
/// Memory: every layer's trainer is held at once (its weights, Adam moments and step buffers), plus
/// at most 4 GiB of shuffle blocks (--live-block-tokens, default 8192 here; 30 layers x 2 hooks x
/// 8192 rows x d_model 576 x 4 bytes = 1.1 GB a block): the block the slowest trainer reads, a window
/// behind it for seeks back and as far ahead as the others may run, never fewer than one each side.
/// Each trainer first reads `norm_estimate_rows` rows ahead (default 65,536) and goes back; blocks of
/// that read-ahead that left the window are computed a second time (`norm_estimate_rows = 16384`
/// keeps it to one block at 30 layers). All 30 layers of SmolLM2 at --d-sae 4096 peak at 9.8 GB
/// resident with --batch-size 2048 and 11.1 GB with 4096 (BENCHMARKS.md).
///
/// Examples:
///   saekit tokenize corpus/ -o tokens/
///   saekit train-transcoders --layers 0-29 --contexts tokens/ --d-sae 4096 --k 32 --tokens 2M --out tcs/
///   saekit train-transcoders --resume tcs/
///   saekit attribute --transcoders tcs/ --prompt "The capital of France is" --out graph.json
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct TrainTranscodersArgs {
    /// Layers to train: a range and/or list, e.g. 0-29, 0,3,7 or 0-3,10.
    #[arg(long)]
    pub layers: Option<String>,
    #[command(flatten)]
    pub train: TrainArgs,
}

/// The run's own config, kept in OUT so that `--resume OUT` reopens the same run.
const RUN_CONFIG: &str = "train_transcoders.toml";
/// Per-layer results.
const SUMMARY: &str = "summary.json";
/// Shuffle block when none is given: smaller than `train --live`'s, since every layer's rows are held.
const BLOCK_TOKENS: usize = 8192;
/// Bytes of live rows held at once: behind the slowest trainer, its block and ahead of it.
const KEEP_BYTES: usize = 4 << 30;

pub fn run(a: TrainTranscodersArgs) -> Result<()> {
    refuse_other_sources(&a.train)?;
    return_freed_blocks_to_the_system();
    let (dir, layers_text, mut c, live) = run_config(&a)?;
    let Some(contexts) = live.contexts.clone() else {
        bail!("train-transcoders reads the model's rows live: pass --contexts TOKENS_DIR (from `saekit tokenize`)");
    };
    let data = saekit_store::TokenDataset::open(Path::new(&contexts))?;
    let model_path = super::model_arg::resolve_model(live.model.as_deref())?;
    let model = saekit_model::Model::load(&model_path, &saekit_model::LoadOptions::default())?;
    let layers = parse_layers(&layers_text, model.config().n_layers)?;
    if c.model_name == TrainConfig::default().model_name && !model.config().name.is_empty() {
        c.model_name = model.config().name.clone();
    }
    c.context_size = data.context();
    if c.dataset_path.is_empty() {
        c.dataset_path = contexts.clone();
    }
    c.threads = 0; // the trainers share the global pool (--threads)
    let resume = a.train.resume.is_some();
    if !resume {
        prepare_fresh(&dir, a.train.force)?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut source = live.to_table();
    source.insert("layers".into(), layers_text.clone().into());
    let file = ConfigFile { train: c.clone(), source };
    saekit_files::write_atomic(&dir.join(RUN_CONFIG), file.to_toml().as_bytes())?;

    let pending: Vec<usize> = layers.iter().copied().filter(|&l| !layer_done(&dir, l)).collect();
    let t0 = std::time::Instant::now();
    let trained = if pending.is_empty() {
        LayersRun::default()
    } else {
        let opts = saekit_store::live::LiveOptions {
            hook: HookPoint::Ln2Normalized(pending[0]),
            split: live.split.clone(),
            batch: live.live_batch,
            block_tokens: live.live_block_tokens,
            seed: c.seed,
            keep_rows: keep_rows(pending.len(), model.config().d_model, &c),
            share: Default::default(),
        };
        let hooks = pending.iter().flat_map(|&l| [HookPoint::Ln2Normalized(l), HookPoint::MlpOut(l)]).collect();
        let set = saekit_store::live_set::LiveHookSet::new(&model, &data, hooks, opts)?.holding_at_most(KEEP_BYTES);
        eprintln!(
            "training {} transcoders (layers {}) on {} ({} contexts of {}, {} shuffle blocks per epoch); {} already done",
            pending.len(),
            list_text(&pending),
            contexts,
            set.n_contexts(),
            set.context_len(),
            set.blocks_per_epoch(),
            layers.len() - pending.len()
        );
        let stop = super::interrupt::stop_flag()?;
        let opts = RunOptions { force: true, stop: Some(stop), source_config: live.to_table(), ..Default::default() };
        train_layers(&set, &dir, &c, &pending, &opts)?
    };
    let wall = t0.elapsed().as_secs_f64();
    if trained.outcomes.iter().any(|o| o.interrupted) {
        super::interrupt::exit_interrupted(
            "every layer stopped with a checkpoint",
            &format!("saekit train-transcoders --resume {}", dir.display()),
        );
    }
    write_set(&dir, &layers)?;
    let summary = write_summary(&dir, &layers, &trained, wall)?;
    report(&summary);
    println!("{}", dir.display());
    Ok(())
}

/// glibc's malloc raises its mmap threshold each time it frees a large mapping, then serves blocks of
/// that size from per-thread arenas, which keep freed pages. With a trainer thread per layer and every
/// shuffle block's rows (60 hooks x ~19 MB at 30 layers) allocated and freed by whichever thread ran the
/// forward, resident memory grew past 20 GB while 11 GB was live. A fixed threshold maps every
/// allocation over 1 MiB on its own and unmaps it when freed.
fn return_freed_blocks_to_the_system() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes a malloc tunable; no allocation is in flight on another thread yet
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

/// The layers trained in this process and the shared forward's cost.
#[derive(Default)]
struct LayersRun {
    outcomes: Vec<TrainOutcome>,
    forward: (f64, u64),
}

/// One trainer per layer, each on its own thread over its reader of `set`; every error is reported.
fn train_layers(
    set: &saekit_store::live_set::LiveHookSet,
    dir: &Path,
    c: &TrainConfig,
    pending: &[usize],
    opts: &RunOptions,
) -> Result<LayersRun> {
    // every reader exists before any trainer runs: none is left behind by the others' first blocks
    let mut sources = Vec::new();
    for &l in pending {
        let reader = set.pair_reader(HookPoint::Ln2Normalized(l), HookPoint::MlpOut(l))?;
        let desc = format!("live layer {l}: {} -> {}", reader.input_hook(), reader.target_hook());
        sources.push(saekit_sae::LiveLayerSource::new(reader, desc));
    }
    let results: Vec<Result<TrainOutcome>> = std::thread::scope(|s| {
        let handles: Vec<_> = pending
            .iter()
            .zip(sources)
            .map(|(&l, mut src)| {
                let cfg = layer_config(c, dir, l);
                let opts = RunOptions { resume: has_checkpoint(&layer_dir(dir, l)), ..opts.clone() };
                s.spawn(move || saekit_sae::train(&cfg, &mut src, &opts).with_context(|| format!("layer {l}")))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a trainer panicked")))).collect()
    });
    let mut outcomes = Vec::new();
    let mut failed = Vec::new();
    for r in results {
        match r {
            Ok(o) => outcomes.push(o),
            Err(e) => failed.push(format!("{e:#}")),
        }
    }
    if !failed.is_empty() {
        bail!("{}", failed.join("; "));
    }
    Ok(LayersRun { outcomes, forward: set.forward_stats() })
}

/// Layer `l`'s trainer config: the shared one on its hooks, into OUT/layer_L.
fn layer_config(c: &TrainConfig, dir: &Path, l: usize) -> TrainConfig {
    TrainConfig {
        hook_name: HookPoint::Ln2Normalized(l).to_string(),
        hook_name_out: HookPoint::MlpOut(l).to_string(),
        out: layer_dir(dir, l).display().to_string(),
        ..c.clone()
    }
}

fn layer_dir(dir: &Path, l: usize) -> PathBuf {
    dir.join(format!("layer_{l}"))
}

/// A layer is done when its SAELens folder is complete (its file list verifies).
fn layer_done(dir: &Path, l: usize) -> bool {
    matches!(saekit_files::FileSet::verify(&layer_dir(dir, l), saekit_sae::format::FILE_LIST), Ok(Some(_)))
}

fn has_checkpoint(out: &Path) -> bool {
    saekit_sae::checkpoint::list(out).is_ok_and(|l| !l.is_empty())
}

/// Rows of every hook kept behind the slowest trainer: its read-ahead when that fits `KEEP_BYTES` (the
/// set then shrinks its window to hold at most `KEEP_BYTES` in all).
fn keep_rows(layers: usize, d_model: usize, c: &TrainConfig) -> usize {
    let row_bytes = 2 * layers * d_model * 4;
    c.prepare_rows().min(KEEP_BYTES / row_bytes.max(1)).max(1)
}

/// The output folder, the layers, the trainer's config and the live source's: from the flags, or for
/// `--resume OUT` from OUT's saved config (flags may only restate it).
fn run_config(a: &TrainTranscodersArgs) -> Result<(PathBuf, String, TrainConfig, LiveConfig)> {
    let t = &a.train;
    if let Some(dir) = &t.resume {
        let path = Path::new(dir).join(RUN_CONFIG);
        if !path.exists() {
            bail!("--resume {dir}: no {RUN_CONFIG} there (not a train-transcoders output folder)");
        }
        let keys: Vec<&str> = LiveConfig::KEYS.iter().copied().chain(["layers"]).collect();
        let mut file = ConfigFile::read(&path.display().to_string(), &keys)?;
        let saved = file.source.remove("layers").and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
        let layers = a.layers.clone().unwrap_or(saved.clone());
        if layers != saved {
            bail!("--resume {dir}: the run trains layers {saved}; resume without --layers or with the same");
        }
        let checkpointed = LiveConfig::from_table(file.source, &path.display().to_string())?;
        let saved_setup = super::train::TrainSetup { train: file.train, live: checkpointed.clone() };
        let setup = super::train::apply_flags(t, saved_setup)?;
        checkpointed.check_resume(&setup.live)?;
        return Ok((PathBuf::from(dir), layers, setup.train, setup.live));
    }
    let Some(layers) = a.layers.clone() else { bail!("--layers is required, e.g. --layers 0-29") };
    let mut setup = super::train::effective_config(t)?;
    if setup.train.out.is_empty() || t.out.is_none() && t.config.is_none() {
        bail!("--out DIR is required: the folder that gets one transcoder folder per layer");
    }
    setup.live.live = true;
    if t.live_block_tokens.is_none() {
        setup.live.live_block_tokens = BLOCK_TOKENS;
    }
    Ok((PathBuf::from(&setup.train.out), layers, setup.train, setup.live))
}

/// The flags of `saekit train` that pick another data source or hook make no sense here.
fn refuse_other_sources(t: &TrainArgs) -> Result<()> {
    if t.acts.is_some() {
        bail!("train-transcoders reads the model's rows live: drop --acts and pass --contexts TOKENS_DIR");
    }
    if t.input_hook.is_some() || t.target_hook.is_some() || t.hook_name.is_some() || !t.hook.is_empty() {
        bail!("train-transcoders reads blocks.L.ln2.hook_normalized -> blocks.L.hook_mlp_out of each --layers L: drop --input-hook/--target-hook/--hook/--hook-name");
    }
    if t.shards.is_some() || t.print_config {
        bail!("train-transcoders takes neither --shards nor --print-config (use `saekit train --print-config` for the trainer's keys)");
    }
    Ok(())
}

/// `0-29`, `0,3,7`, `0-3,10` -> sorted distinct layers, each below `n_layers`.
fn parse_layers(text: &str, n_layers: usize) -> Result<Vec<usize>> {
    let num = |s: &str| -> Result<usize> {
        s.trim().parse().with_context(|| format!("--layers {text:?}: {s:?} is not a layer number"))
    };
    let mut layers = Vec::new();
    for part in text.split(',') {
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => (num(part)?, num(part)?),
        };
        if lo > hi {
            bail!("--layers {text:?}: range {lo}-{hi} is backwards");
        }
        layers.extend(lo..=hi);
    }
    layers.sort_unstable();
    layers.dedup();
    if let Some(&bad) = layers.iter().find(|&&l| l >= n_layers) {
        bail!("--layers {text:?}: layer {bad} is out of range; the model has {n_layers} layers (0-{})", n_layers - 1);
    }
    Ok(layers)
}

fn list_text(layers: &[usize]) -> String {
    layers.iter().map(|l| l.to_string()).collect::<Vec<_>>().join(",")
}

/// A fresh run needs OUT empty, or `--force` (which clears what an earlier train-transcoders wrote there).
fn prepare_fresh(dir: &Path, force: bool) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let names = saekit_files::entry_names(dir)?;
    if names.is_empty() {
        return Ok(());
    }
    if !force {
        bail!(
            "{}: the output folder is not empty (an earlier run?); pass --force to clear it, --resume {} to continue it, or choose another --out",
            dir.display(),
            dir.display()
        );
    }
    let ours = |n: &str| {
        n == RUN_CONFIG
            || n == SUMMARY
            || n == "transcoders.yaml"
            || n.starts_with("layer_")
            || saekit_files::is_temp_name(n)
    };
    saekit_files::ensure_only_owned(dir, "train-transcoders output", ours)?;
    for n in names {
        let p = dir.join(&n);
        let res = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
        res.with_context(|| format!("--force: cannot remove {}", p.display()))?;
    }
    Ok(())
}

/// circuit-tracer's set (`transcoders.yaml` listing `layer_L.safetensors`) when the layers are 0..N.
fn write_set(dir: &Path, layers: &[usize]) -> Result<()> {
    if layers.iter().enumerate().any(|(i, &l)| i != l) {
        eprintln!(
            "no transcoders.yaml: a circuit-tracer set holds layers 0..N (each layer's SAELens folder is in {})",
            dir.display()
        );
        return Ok(());
    }
    let loaded: Result<Vec<_>, _> =
        layers.iter().map(|&l| saekit_circuits::Transcoder::load_saelens(&layer_dir(dir, l))).collect();
    let scan = dir.file_name().map_or_else(|| "transcoders".into(), |n| n.to_string_lossy().into_owned());
    let set = saekit_circuits::TranscoderSet { layers: loaded?, scan };
    set.save_circuit_tracer(dir)?;
    Ok(())
}

/// OUT/summary.json from every layer's training_summary.json (layers done in an earlier run too).
fn write_summary(dir: &Path, layers: &[usize], run: &LayersRun, wall: f64) -> Result<serde_json::Value> {
    let mut rows = Vec::new();
    for &l in layers {
        let path = layer_dir(dir, l).join("training_summary.json");
        let s: serde_json::Value = saekit_files::read_json(&path)?;
        rows.push(serde_json::json!({
            "layer": l,
            "fvu": s["final_on_first_rows"]["fvu"],
            "last_batch_fvu": s["last"]["fvu"],
            "l0": s["last"]["l0"],
            "dead_pct": s["dead_frac"].as_f64().map(|f| 100.0 * f),
            "tokens_per_s": s["tokens_per_s"],
            "steps": s["steps"],
            "tokens": s["tokens"],
        }));
    }
    let tokens: u64 = run.outcomes.iter().map(|o| o.tokens_this_run).sum();
    let summary = serde_json::json!({
        "layers": rows,
        "this_run": {
            "layers_trained": run.outcomes.len(),
            "wall_s": wall,
            "layer_tokens_per_s": tokens as f64 / wall.max(1e-9),
            "forward_s": run.forward.0,
            "forward_tokens": run.forward.1,
            "peak_rss_bytes": saekit_sae::peak_rss_bytes(),
        },
    });
    let text = serde_json::to_string_pretty(&summary).context("rendering summary.json")?;
    saekit_files::write_atomic(&dir.join(SUMMARY), text.as_bytes())?;
    Ok(summary)
}

fn report(s: &serde_json::Value) {
    eprintln!("layer   FVU      L0     dead %   tokens/s");
    for r in s["layers"].as_array().into_iter().flatten() {
        let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        eprintln!(
            "{:>5} {:>7.4} {:>7.1} {:>8.2} {:>10.0}",
            r["layer"],
            f("fvu"),
            f("l0"),
            f("dead_pct"),
            f("tokens_per_s")
        );
    }
    let t = &s["this_run"];
    eprintln!(
        "this run: {} layers in {:.1} s, model forward {:.1} s, peak RSS {} MB",
        t["layers_trained"],
        t["wall_s"].as_f64().unwrap_or(0.0),
        t["forward_s"].as_f64().unwrap_or(0.0),
        t["peak_rss_bytes"].as_u64().unwrap_or(0) >> 20
    );
}

#[cfg(test)]
mod tests {
    use super::parse_layers;

    #[test]
    fn layers_parse_as_ranges_and_lists_and_refuse_layers_the_model_lacks() {
        assert_eq!(parse_layers("0-2,5,1", 30).unwrap(), vec![0, 1, 2, 5]);
        assert_eq!(parse_layers("29", 30).unwrap(), vec![29]);
        assert!(format!("{:#}", parse_layers("0-30", 30).unwrap_err()).contains("layer 30 is out of range"));
        assert!(parse_layers("3-1", 30).is_err());
        assert!(parse_layers("a", 30).is_err());
    }
}
