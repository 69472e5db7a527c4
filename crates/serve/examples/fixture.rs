//! Write a fixture SAE and feature database for the browser tests:
//! `cargo run -p saekit-serve --example fixture -- OUT_DIR` then
//! `saekit serve --sae OUT_DIR/sae --db OUT_DIR/features.json`.

use anyhow::{Context, Result};

fn main() -> Result<()> {
    let out = std::env::args().nth(1).context("usage: fixture OUT_DIR")?;
    let path = saekit_model::default_model_path();
    let model = saekit_model::Model::load(&path, &saekit_model::LoadOptions::default())
        .with_context(|| format!("{}: the fixture needs the real model (scripts/fetch-model.sh)", path.display()))?;
    saekit_serve::fixture::write_fixture(model, std::path::Path::new(&out))?;
    println!("wrote {out}/sae and {out}/features.json");
    Ok(())
}
