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
}

pub fn run(a: ServeArgs) -> Result<()> {
    let limits = saekit_serve::Limits { max_new_tokens: a.max_new_tokens.clamp(1, 1024), ..Default::default() };
    let state = app_state(&a.db, a.sae.as_deref(), &a.model, a.queue, limits)?;
    saekit_serve::serve_blocking(state, SocketAddr::new(a.host, a.port), a.workers)
}

/// The server's state: the database, and with an SAE the model queue (checked to belong together).
pub fn app_state(
    db_path: &std::path::Path,
    sae: Option<&std::path::Path>,
    model: &ModelArgs,
    queue: usize,
    limits: saekit_serve::Limits,
) -> Result<Arc<saekit_serve::AppState>> {
    let db = saekit_serve::open_store(db_path)?;
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
            let info = json!({
                "name": model.config().name,
                "layers": model.config().n_layers,
                "hook": sae.metadata.hook_name,
                "d_sae": sae.d_sae,
            });
            let engine = saekit_serve::Engine::new(model, sae)?;
            (Some(saekit_serve::ModelQueue::start(engine, queue.max(1))?), info)
        }
        None => (None, serde_json::Value::Null),
    };
    Ok(Arc::new(saekit_serve::AppState::new(db, queue, model_info, limits)))
}
