//! `saekit train --live`: the model runs over tokenized contexts and its rows go straight into
//! training, nothing written to disk. saekit-sae never touches the model, so this data source's keys
//! live here; they sit in the same TOML file as the trainer's, and the trainer keeps them with its
//! checkpoints (without reading them) so that `--resume` reopens the same source.

use super::train::TrainArgs;
use anyhow::{bail, Context, Result};
use saekit_sae::config::parse_count;
use saekit_sae::{RunOptions, TrainConfig};
use serde::{Deserialize, Serialize};

/// `--live`'s keys of a train config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LiveConfig {
    /// Train on the model's rows computed on the fly: `contexts` is a tokenized dataset
    /// (`saekit tokenize`), `model` the model, the trainer's `hook_name` the hook point.
    pub live: bool,
    /// Tokenized dataset folder.
    pub contexts: Option<String>,
    /// A .gguf, an HF folder or a fetched hub name (default: SmolLM2-135M-Instruct).
    pub model: Option<String>,
    /// Split of `contexts` to train on.
    pub split: String,
    /// Contexts per forward pass.
    pub live_batch: usize,
    /// Tokens per shuffle block (rows are mixed within a block; it is held in memory).
    pub live_block_tokens: usize,
}

impl Default for LiveConfig {
    fn default() -> Self {
        LiveConfig {
            live: false,
            contexts: None,
            model: None,
            split: "train".into(),
            live_batch: 8,
            live_block_tokens: 1 << 16,
        }
    }
}

impl LiveConfig {
    /// The TOML keys this config owns.
    pub const KEYS: [&'static str; 6] = ["live", "contexts", "model", "split", "live_batch", "live_block_tokens"];

    /// Read the keys a config file (or checkpoint) at `origin` holds for the live source.
    pub fn from_table(table: toml::Table, origin: &str) -> Result<LiveConfig> {
        LiveConfig::deserialize(toml::Value::Table(table)).map_err(|e| {
            let msg = e.message().split_whitespace().collect::<Vec<_>>().join(" ");
            anyhow::anyhow!("parsing config {origin}: {msg}")
        })
    }

    /// Every key, for the trainer to keep with its checkpoints (none when the run is not live).
    pub fn to_table(&self) -> toml::Table {
        if !self.live {
            return toml::Table::new();
        }
        toml::Table::try_from(self).unwrap_or_default()
    }

    /// `contexts` read from the config file `config` must exist.
    pub fn check_paths(&self, config: &str) -> Result<()> {
        if let Some(p) = self.contexts.as_deref().filter(|p| !std::path::Path::new(p).exists()) {
            bail!("config {config}: contexts = {p:?} does not exist");
        }
        Ok(())
    }

    /// Flags override the file's (or checkpoint's) values; `--contexts` alone means `--live`.
    pub fn with_flags(mut self, a: &TrainArgs) -> Result<LiveConfig> {
        self.live |= a.live || a.contexts.is_some();
        if let Some(v) = &a.contexts {
            self.contexts = Some(v.clone());
        }
        if let Some(v) = &a.model {
            self.model = Some(v.clone());
        }
        if let Some(v) = &a.split {
            self.split = v.clone();
        }
        if let Some(v) = a.live_batch {
            self.live_batch = v;
        }
        if let Some(v) = &a.live_block_tokens {
            self.live_block_tokens = parse_count(v)? as usize;
        }
        Ok(self)
    }

    /// A resumed run reads the rows its checkpoint was cut from: the same split and shuffle blocks
    /// (the folders may move: the trainer compares the data by content).
    pub fn check_resume(&self, requested: &LiveConfig) -> Result<()> {
        let (a, b) = (self, requested);
        let keys = [
            ("live", a.live.to_string(), b.live.to_string()),
            ("split", format!("{:?}", a.split), format!("{:?}", b.split)),
            ("live_block_tokens", a.live_block_tokens.to_string(), b.live_block_tokens.to_string()),
        ];
        let differ: Vec<String> =
            keys.iter().filter(|(_, x, y)| x != y).map(|(k, x, y)| format!("{k} = {x} vs {y}")).collect();
        if !differ.is_empty() {
            bail!(
                "--resume: the run read other rows (checkpoint vs requested: {}); resume without changing them",
                differ.join(", ")
            );
        }
        Ok(())
    }
}

/// Train on the rows `live` describes, with the trainer's config `c`.
///
/// Under `mpirun` each data-parallel replica forwards its own shuffle blocks (replica r of R: blocks
/// r, r + R, ... of every epoch, see `saekit_store::live::BlockShare`) and trains on its share of
/// each batch from them, so the R replicas forward the one-process run's blocks once between them.
/// The ranks of one replica (its latent shards) all run the model over the replica's contexts, so
/// they see the same rows with no exchange of them. The alternative, one rank forwarding and
/// broadcasting each batch ([batch, d_in] f32 a step), leaves the other ranks idle while it
/// forwards, so the step waits for one forward pass either way and the broadcast adds its traffic
/// (reasoned, not measured).
pub fn run(mut c: TrainConfig, live: &LiveConfig, opts: &RunOptions) -> Result<()> {
    if c.acts.is_some() {
        bail!("--live reads activations from the model: drop --acts (or `acts` in the config), or drop --live");
    }
    let Some(contexts) = live.contexts.clone() else {
        bail!("--live needs a tokenized dataset: --contexts TOKENS_DIR (from `saekit tokenize`)");
    };
    let hook = parse_hook(&c.hook_name, "--hook-name")?;
    let data = saekit_store::TokenDataset::open(std::path::Path::new(&contexts))?;
    let model_path = super::model_arg::resolve_model(live.model.as_deref())?;
    let model = saekit_model::Model::load(&model_path, &saekit_model::LoadOptions::default())?;
    // The default name fits the default model; another model's cfg.json metadata names that model.
    if c.model_name == TrainConfig::default().model_name
        && model_path != saekit_model::default_model_path()
        && !model.config().name.is_empty()
    {
        c.model_name = model.config().name.clone();
    }
    c.context_size = data.context();
    if c.dataset_path.is_empty() {
        c.dataset_path = contexts.clone();
    }
    let lopts = saekit_store::live::LiveOptions {
        hook,
        split: live.split.clone(),
        batch: live.live_batch,
        block_tokens: live.live_block_tokens,
        seed: c.seed,
        // what the trainer reads ahead before seeking back to the start
        keep_rows: c.prepare_rows(),
        share: Default::default(),
    };
    if !c.hook_name_out.is_empty() {
        return train_live_pairs(&c, (&model, &model_path), &data, lopts, opts);
    }
    let share = replica_share(opts);
    let rows =
        saekit_store::live::LiveActivations::new(&model, &data, saekit_store::live::LiveOptions { share, ..lopts })?;
    let desc = format!(
        "live {} at {hook} over {contexts} split {} ({} contexts of {}, {} shuffle blocks per epoch{}, sinks skipped)",
        model_path.display(),
        live.split,
        rows.n_contexts(),
        rows.context_len(),
        rows.blocks_per_epoch(),
        if share.is_whole() {
            String::new()
        } else {
            let (r, n) = (share.index, share.count);
            format!(" of which replica {r} of {n} forwards blocks {r}, {}, ...", r + n)
        }
    );
    let mut src = saekit_sae::LiveSource::new(rows, desc);
    let t0 = std::time::Instant::now();
    let o = saekit_sae::train(&c, &mut src, opts)?;
    if opts.collective.as_ref().is_some_and(|m| m.rank() != 0) {
        return Ok(()); // rank 0 reports
    }
    let wall = t0.elapsed().as_secs_f64();
    let (fs, ft) = src.forward_stats();
    let whose = if share.is_whole() { String::new() } else { format!(" (replica 0 of {})", share.count) };
    eprintln!(
        "model forward{whose}: {ft} tokens in {fs:.1} s ({:.0} tokens/s), {:.0}% of the {wall:.1} s run",
        ft as f64 / fs.max(1e-9),
        100.0 * fs / wall.max(1e-9)
    );
    // end to end: the blocks computed while preparing count too
    super::train::finish(&o, o.tokens_this_run as f64 / wall.max(1e-9))
}

/// This process's data-parallel replica under `mpirun`: its own shuffle blocks (every block in one
/// process, or when all ranks shard the latents).
fn replica_share(opts: &RunOptions) -> saekit_store::live::BlockShare {
    opts.collective.as_ref().map_or_else(Default::default, |m| saekit_store::live::BlockShare {
        index: m.replica() as u64,
        count: m.replicas() as u64,
    })
}

fn parse_hook(name: &str, flag: &str) -> Result<saekit_model::HookPoint> {
    name.parse().with_context(|| format!("{flag} {name:?}: not a hook point the model can run to"))
}

/// A transcoder trained live: `--input-hook` and `--target-hook` from one forward per block, read
/// through the same shared-forward source as `saekit train-transcoders`.
fn train_live_pairs(
    c: &TrainConfig,
    (model, model_path): (&saekit_model::Model, &std::path::Path),
    data: &saekit_store::TokenDataset,
    lopts: saekit_store::live::LiveOptions,
    opts: &RunOptions,
) -> Result<()> {
    let (input, target) = (parse_hook(&c.hook_name, "--input-hook")?, parse_hook(&c.hook_name_out, "--target-hook")?);
    let set = saekit_store::live_set::LiveHookSet::new(model, data, vec![input, target], lopts)?;
    let desc = format!(
        "live {} at {input} -> {target} over {} ({} contexts of {}, {} shuffle blocks per epoch, sinks skipped)",
        model_path.display(),
        data.dir().display(),
        set.n_contexts(),
        set.context_len(),
        set.blocks_per_epoch()
    );
    let mut src = saekit_sae::LiveLayerSource::new(set.pair_reader(input, target)?, desc);
    let t0 = std::time::Instant::now();
    let o = saekit_sae::train(c, &mut src, opts)?;
    drop(src);
    let wall = t0.elapsed().as_secs_f64();
    let (fs, ft) = set.forward_stats();
    eprintln!("model forward: {ft} tokens in {fs:.1} s, {:.0}% of the {wall:.1} s run", 100.0 * fs / wall.max(1e-9));
    super::train::finish(&o, o.tokens_this_run as f64 / wall.max(1e-9))
}
