//! saekit-serve: the local feature browser behind `saekit serve`.
//!
//! Owns the HTTP server (axum on a small tokio runtime), the JSON API under `/api`, the pages and their
//! assets (embedded in the binary: no file is read after start-up except the feature database), and the
//! queue that serialises model work. It reads the feature database through [`FeatureStore`]
//! (`store_trait.rs`; [`MemoryDb`] for JSON files, `store_sqlite.rs` for the SQLite database), whose records
//! are `saekit_analysis`' (this crate defines none of its own), runs the model and SAE through
//! [`engine::Engine`] (and, for the `/graph` page, its transcoder set through saekit-circuits: [`graph`]), and speaks the OpenAI chat and text-completion API under `/v1` ([`openai`]). Every
//! error a request can meet is a [`ServeError`], whose kind alone decides the HTTP status. It must not compute
//! or write analysis results itself (`fixture`, behind the `fixture` feature, builds small databases for
//! tests only).
//!
//! A feature page's data, end to end: the page script (`assets/app.js`, `featurePage`, routed from `/feature/{id}` by `route`) fetches
//! `GET /api/features/{id}`; [`api`]'s `feature` handler checks the id and asks the [`FeatureStore`] on the
//! blocking pool (`AppState::with_db`); for SQLite that is `SqliteStore::feature` (`store_sqlite.rs`), a
//! forward to `saekit_analysis::FeatureDb::feature` (`crates/analysis/src/feature_db.rs`), which reads the
//! feature's row and its zstd-compressed detail blob and resolves token ids to text into a
//! [`saekit_analysis::FeatureRecord`]; the handler returns that record as JSON (less its map coordinates),
//! and the page draws it. DEVELOPERS.md ("Where things are") has the same path as a table.

#![warn(missing_docs)]

pub mod api;
pub mod engine;
mod error;
#[cfg(feature = "fixture")]
pub mod fixture;
pub mod graph;
pub mod openai;
mod store_json;
mod store_sqlite;
mod store_trait;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context as _, Result};

pub use api::{router, AppState, Limits};
pub use engine::{Engine, ModelQueue};
pub use error::{ServeError, ServeResult};
pub use store_json::{top_tokens, MemoryDb};
pub use store_sqlite::SqliteStore;
pub use store_trait::{open_store, FeatureStore};

/// Bind `addr` and serve until Ctrl-C. Prints the URL on stdout once listening (the e2e harness reads it).
pub async fn serve(state: Arc<AppState>, addr: SocketAddr) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener.local_addr()?;
    println!("saekit serve: listening on http://{local}/");
    if !local.ip().is_loopback() {
        tracing::warn!("listening on {local}: reachable from other machines; the API has no authentication");
    }
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("server error")?;
    Ok(())
}

/// Run [`serve`] on a runtime with `workers` threads (the model has its own worker thread besides).
pub fn serve_blocking(state: Arc<AppState>, addr: SocketAddr, workers: usize) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers.max(1))
        .max_blocking_threads(8)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(serve(state, addr))
}

/// Start the server on a background thread (its own small runtime) and return the address it listens on;
/// it runs until the process exits. `saekit explain` uses this to explain with the local model when no
/// endpoint is given.
pub fn spawn_background(state: Arc<AppState>, addr: SocketAddr) -> Result<SocketAddr> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("saekit-serve".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(anyhow::anyhow!("cannot start the async runtime: {e}")));
                    return;
                }
            };
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::bind(addr).await {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = tx.send(Err(anyhow::anyhow!("cannot listen on {addr}: {e}")));
                        return;
                    }
                };
                let _ = tx.send(listener.local_addr().context("no local address"));
                if let Err(e) = axum::serve(listener, router(state)).await {
                    tracing::warn!("background server stopped: {e}");
                }
            });
        })
        .context("cannot start the server thread")?;
    rx.recv().context("the server thread stopped before listening")?
}
