//! Encode and decode the first rows of a .npy with an SAE folder; writes dense codes and
//! reconstructions as .npy (interop checks against SAELens / sparsify).
//!
//! cargo run --release -p saekit-sae --example encode_rows -- SAE_DIR ACTS.npy ROWS OUT_PREFIX

use anyhow::{Context, Result};
use saekit_sae::source::write_npy_f32;
use saekit_sae::{load_sae, NpySource};

fn main() -> Result<()> {
    let a: Vec<String> = std::env::args().collect();
    let (dir, acts) = (a.get(1).context("SAE_DIR")?, a.get(2).context("ACTS.npy")?);
    let rows: usize = a.get(3).context("ROWS")?.parse()?;
    let prefix = a.get(4).context("OUT_PREFIX")?;
    let sae = load_sae(dir)?;
    let src = NpySource::open(acts, 0, false)?;
    let d = sae.d_in;
    let mut x = vec![0.0f32; rows * d];
    for r in 0..rows {
        src.row(r, &mut x[r * d..(r + 1) * d]);
    }
    let f = sae.encode_dense(&x);
    let xh = sae.decode(&sae.encode(&x));
    write_npy_f32(std::path::Path::new(&format!("{prefix}_codes.npy")), &f, rows, sae.d_sae)?;
    write_npy_f32(std::path::Path::new(&format!("{prefix}_recon.npy")), &xh, rows, d)?;
    Ok(())
}
