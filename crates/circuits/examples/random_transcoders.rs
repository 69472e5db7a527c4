//! A random TopK transcoder set shaped for a model, in circuit-tracer's layout, for timing attribution
//! (`scripts/bench-attribute.sh`): `k` active features per token in every layer, as trained transcoders
//! have, so a prompt yields as many graph nodes as a real set would. The weights explain nothing.
//!
//!     cargo run --example random_transcoders -- MODEL OUT_DIR D_SAE K

use anyhow::{Context, Result};
use rand::{Rng, SeedableRng};
use saekit_circuits::{Transcoder, TranscoderActivation, TranscoderSet};
use saekit_model::HookPoint;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, out, d_sae, k] = &args[..] else {
        anyhow::bail!("usage: random_transcoders MODEL OUT_DIR D_SAE K");
    };
    let (d_sae, k): (usize, usize) = (d_sae.parse().context("D_SAE")?, k.parse().context("K")?);
    let model = saekit_model::Model::load(std::path::Path::new(model), &Default::default())?;
    let (d, n_layers) = (model.config().d_model, model.config().n_layers);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut uniform =
        |n: usize, scale: f32| (0..n).map(|_| scale * (rng.gen::<f32>() * 2.0 - 1.0)).collect::<Vec<f32>>();
    let layers = (0..n_layers)
        .map(|l| Transcoder {
            d_in: d,
            d_sae,
            d_out: d,
            activation: TranscoderActivation::TopK(k),
            w_enc: uniform(d_sae * d, 0.1),
            b_enc: uniform(d_sae, 0.1),
            w_dec: uniform(d_sae * d, 0.05),
            b_dec: uniform(d, 0.01),
            w_skip: None,
            input_hook: HookPoint::Ln2Normalized(l),
            output_hook: HookPoint::MlpOut(l),
        })
        .collect();
    TranscoderSet { layers, scan: format!("random-topk-{d_sae}-k{k}") }
        .save_circuit_tracer(std::path::Path::new(out))?;
    println!("{out}: {n_layers} random TopK transcoders, {d_sae} features, k = {k}");
    Ok(())
}
