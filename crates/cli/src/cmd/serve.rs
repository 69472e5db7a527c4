//! `saekit serve`: the feature browser and its JSON API on a local port.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use serde_json::json;

use super::model_arg::ModelArgs;

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// The feature database: SQLite from `saekit analyze`, or a `.json` export.
    #[arg(long)]
    pub db: PathBuf,
    /// The SAE folder the database describes. With it (and the model) the live-text and steering pages run;
    /// without it only the database pages do.
    #[arg(long)]
    pub sae: Option<PathBuf>,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Hook point the SAE reads. Default: the SAE's own (cfg.json hook_name); for an SAE that names none
    /// (a Gemma Scope params.npz), the hook the database was analysed on.
    #[arg(long)]
    pub hook: Option<String>,
    /// Address to bind. The API has no authentication: keep it on loopback unless you mean it.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port (0 picks a free one; the URL is printed).
    #[arg(long, default_value_t = 7860)]
    pub port: u16,
    /// Model requests that may wait while one runs; more are answered 503 at once.
    #[arg(long, default_value_t = 8)]
    pub queue: usize,
    /// Longest generation a steering request may ask for.
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// HTTP worker threads (the model runs on its own thread).
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// A transcoder set (circuit-tracer's transcoders.yaml folder, or SAELens transcoder folders) for the
    /// /graph page: a prompt's attribution graph, and interventions on its nodes. Needs --sae (the model
    /// runs on its queue); Llama-family models only.
    #[arg(long, requires = "sae")]
    pub transcoders: Option<PathBuf>,
}

pub fn run(a: ServeArgs) -> Result<()> {
    let limits = saekit_serve::Limits { max_new_tokens: a.max_new_tokens.clamp(1, 1024), ..Default::default() };
    let engine = EngineArgs { sae: a.sae.as_deref(), hook: a.hook.as_deref(), transcoders: a.transcoders.as_deref() };
    let state = app_state(&a.db, engine, &a.model, a.queue, limits)?;
    saekit_serve::serve_blocking(state, SocketAddr::new(a.host, a.port), a.workers)
}

/// What the model queue runs: the SAE (none: the database pages only), the hook it reads (see
/// [`engine_hook`]), and the transcoder set of the graph page.
#[derive(Default, Clone, Copy)]
pub struct EngineArgs<'a> {
    pub sae: Option<&'a std::path::Path>,
    pub hook: Option<&'a str>,
    pub transcoders: Option<&'a std::path::Path>,
}

/// The server's state: the database, and with an SAE the model queue (checked to belong together).
pub fn app_state(
    db_path: &std::path::Path,
    e: EngineArgs<'_>,
    model: &ModelArgs,
    queue: usize,
    limits: saekit_serve::Limits,
) -> Result<Arc<saekit_serve::AppState>> {
    let db = saekit_serve::open_store(db_path)?;
    let (sae, hook) = (e.sae, e.hook);
    let (queue, model_info) = match sae {
        Some(sae_dir) => {
            let sae =
                saekit_sae::load_sae(sae_dir).with_context(|| format!("{}: cannot load the SAE", sae_dir.display()))?;
            if sae.d_sae as u32 != db.n_features() {
                anyhow::bail!(
                    "{} has {} features but the database {} describes {}: they do not belong together",
                    sae_dir.display(),
                    sae.d_sae,
                    db_path.display(),
                    db.n_features()
                );
            }
            let model = model.load()?;
            let hook = engine_hook(hook, &sae, db.as_ref())?;
            let (name, layers, d_sae) = (model.config().name.clone(), model.config().n_layers, sae.d_sae);
            let mut engine = saekit_serve::Engine::with_hook(model, sae, hook.as_deref())
                .with_context(|| format!("{}: cannot serve this SAE", sae_dir.display()))?;
            let mut info = json!({ "name": name, "layers": layers, "hook": engine.hook().to_string(), "d_sae": d_sae });
            if let Some(dir) = e.transcoders {
                let set = saekit_circuits::TranscoderSet::load(dir)?;
                info["transcoders"] = json!({ "scan": set.scan, "layers": set.layers.len() });
                engine = engine
                    .with_transcoders(set)
                    .with_context(|| format!("{}: cannot attribute through these transcoders", dir.display()))?;
            }
            (Some(saekit_serve::ModelQueue::start(engine, queue.max(1))?), info)
        }
        None => (None, serde_json::Value::Null),
    };
    Ok(Arc::new(saekit_serve::AppState::new(db, queue, model_info, limits)))
}

/// The hook the live and steering pages run the SAE on: `--hook`, else the SAE's own, else (an SAE
/// without metadata) the hook the database was analysed on, which `saekit analyze --hook` recorded.
fn engine_hook(
    asked: Option<&str>,
    sae: &saekit_sae::Sae,
    db: &dyn saekit_serve::FeatureStore,
) -> Result<Option<String>> {
    if asked.is_some() || !sae.metadata.hook_name.is_empty() {
        return Ok(asked.map(str::to_string));
    }
    let info = db.info()?;
    Ok(info.get("hook").and_then(|h| h.as_str()).filter(|h| !h.is_empty()).map(str::to_string))
}
