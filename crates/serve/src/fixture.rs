//! Small feature databases for tests and demos, computed on the real model over a handful of built-in texts.
//!
//! This is not the analysis pass (`saekit analyze` owns that): it exists so that the browser's tests run on
//! real activations without a corpus or a trained SAE. It computes the same fields the analysis database
//! holds, over a few hundred tokens.

use std::collections::HashMap;

use anyhow::{anyhow, Result};
use saekit_analysis::{Context, FeatureRecord, Histogram, Neighbour, QuantileGroup, TokenLogit};
use saekit_model::linalg;
use saekit_sae::SparseCodes;
use serde_json::json;

use crate::engine::Engine;
use crate::MemoryDb;

/// Varied short texts: prose, French, code, numbers, a chat turn.
pub const FIXTURE_TEXTS: &[&str] = &[
    "The Golden Gate Bridge is a suspension bridge spanning the strait between San Francisco Bay and the Pacific Ocean.",
    "Paris est la capitale de la France, et la tour Eiffel est son monument le plus célèbre.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm afternoon sun.",
    "In 1969, Neil Armstrong became the first person to walk on the Moon during the Apollo 11 mission.",
    "for (int i = 0; i < 10; i++) { printf(\"%d\\n\", i * i); }",
    "Photosynthesis converts light energy into chemical energy stored in glucose molecules inside plant cells.",
    "She opened the old wooden door slowly, afraid of what she might find in the dark room beyond.",
    "The stock market fell by 3.5 percent on Monday after the central bank raised interest rates again.",
    "Water boils at 100 degrees Celsius at sea level, but at lower temperatures on high mountains.",
    "import numpy as np\nx = np.linspace(0, 1, 100)\ny = np.sin(2 * np.pi * x)\nprint(y.mean())",
    "Le chat noir dort sur le canapé pendant que la pluie tombe doucement sur les fenêtres.",
    "Mitochondria are often called the powerhouse of the cell because they produce most of its ATP.",
    "The Pacific Ocean is the largest and deepest of Earth's five oceanic divisions.",
    "Shakespeare wrote Hamlet, Macbeth, Othello and King Lear, among many other famous plays.",
    "SELECT name, age FROM users WHERE age > 30 ORDER BY name ASC;",
    "The bridge was painted international orange so that ships could see it through the thick fog.",
    "Einstein's theory of relativity changed how physicists think about space, time and gravity.",
    "1, 2, 3, 5, 8, 13, 21, 34, 55, 89 are the first Fibonacci numbers after one.",
    "Please remember to bring your passport, your tickets and a warm jacket for the trip to Norway.",
    "The recipe calls for two cups of flour, one egg, a pinch of salt and a spoon of sugar.",
    "Der Hund läuft schnell durch den Park, und die Kinder spielen am See.",
    "function add(a, b) { return a + b; }\nconsole.log(add(2, 3));",
    "Volcanoes erupt when molten rock, called magma, rises to the surface of the Earth.",
];

const LEFT: usize = 10;
const RIGHT: usize = 4;
const TOP: usize = 20;
const GROUPS: usize = 10;
const PER_GROUP: usize = 5;
const BINS: usize = 24;

struct Text {
    ids: Vec<u32>,
    codes: SparseCodes,
}

fn act_of(codes: &SparseCodes, row: usize, f: u32) -> f32 {
    let (idx, val) = codes.row(row);
    idx.iter().zip(val).find(|(i, _)| **i == f).map_or(0.0, |(_, v)| *v)
}

/// Run the model and SAE over `texts` and describe every feature.
pub fn build_db(engine: &Engine, texts: &[&str]) -> Result<MemoryDb> {
    let tok = engine.model.tokenizer();
    let mut docs = Vec::new();
    // feature -> (text, position, activation)
    let mut fires: HashMap<u32, Vec<(usize, usize, f32)>> = HashMap::new();
    let mut n_tokens = 0usize;
    for (t, text) in texts.iter().enumerate() {
        let ids = tok.encode(text, true)?;
        let cache = engine.model.run_with_cache(&ids, 1, &[engine.hook])?;
        let x = cache.get(&engine.hook).ok_or_else(|| anyhow!("internal: hook not captured"))?;
        let codes = engine.sae.encode(x);
        for (r, &id) in ids.iter().enumerate() {
            // attention sinks (position 0, special tokens: ~100x the median norm) are excluded, as training
            // and analysis exclude them
            if r == 0 || tok.is_special(id) {
                continue;
            }
            n_tokens += 1;
            let (idx, val) = codes.row(r);
            for (&f, &a) in idx.iter().zip(val) {
                if a > 0.0 {
                    fires.entry(f).or_default().push((t, r, a));
                }
            }
        }
        docs.push(Text { ids, codes });
    }
    let token_text: Vec<Vec<String>> =
        docs.iter().map(|d| d.ids.iter().map(|&i| tok.token_text(i)).collect()).collect();
    let context = |f: u32, t: usize, pos: usize| -> Context {
        let d = &docs[t];
        let lo = pos.saturating_sub(LEFT).max(1);
        let hi = (pos + RIGHT + 1).min(d.ids.len());
        let acts: Vec<f32> = (lo..hi).map(|r| act_of(&d.codes, r, f)).collect();
        Context { tokens: token_text[t][lo..hi].to_vec(), max_act: acts[pos - lo], acts, peak: pos - lo }
    };

    let sae = &engine.sae;
    let (d, n) = (sae.d_in, sae.d_sae);
    let logit_effects = logit_effects(engine)?;
    let neighbours = neighbours(&sae.params.w_dec, n, d, 10);
    let map_xy = pca_2d(&sae.params.w_dec, n, d);

    let mut features = Vec::with_capacity(n);
    for (f, (x, y)) in (0..n as u32).zip(map_xy) {
        let mut acts = fires.remove(&f).unwrap_or_default();
        acts.sort_by(|a, b| b.2.total_cmp(&a.2).then((a.0, a.1).cmp(&(b.0, b.1))));
        let max_act = acts.first().map_or(0.0, |a| a.2);
        let mean_act = if acts.is_empty() { 0.0 } else { acts.iter().map(|a| a.2).sum::<f32>() / acts.len() as f32 };
        let top_contexts: Vec<Context> = acts.iter().take(TOP).map(|&(t, p, _)| context(f, t, p)).collect();
        let mut quantiles = Vec::new();
        if max_act > 0.0 {
            for g in (0..GROUPS).rev() {
                let lo = max_act * g as f32 / GROUPS as f32;
                let hi = max_act * (g + 1) as f32 / GROUPS as f32;
                let members: Vec<&(usize, usize, f32)> =
                    acts.iter().filter(|a| a.2 > lo && (a.2 <= hi || g + 1 == GROUPS)).collect();
                if members.is_empty() {
                    continue;
                }
                let step = (members.len() as f32 / PER_GROUP as f32).max(1.0);
                let contexts = (0..PER_GROUP.min(members.len()))
                    .map(|i| {
                        let &(t, p, _) = members[(i as f32 * step) as usize];
                        context(f, t, p)
                    })
                    .collect();
                quantiles.push(QuantileGroup { lo, hi, count: members.len() as u64, contexts });
            }
        }
        let histogram = histogram(acts.iter().map(|a| a.2));
        let (promoted, suppressed) = logit_effects[f as usize].clone();
        let mut rec = FeatureRecord {
            id: f,
            density: acts.len() as f64 / n_tokens.max(1) as f64,
            max_act,
            mean_act,
            n_fired: acts.len() as u64,
            explanation: None,
            explanation_auto: true,
            top_contexts,
            quantiles,
            histogram,
            promoted,
            suppressed,
            neighbours: neighbours[f as usize].clone(),
            x,
            y,
            explanations: Vec::new(),
        };
        let tops = crate::top_tokens(&rec, 3);
        if !tops.is_empty() {
            let quoted: Vec<String> = tops.iter().map(|t| format!("“{t}”")).collect();
            rec.explanation = Some(format!("Fires most on {}", quoted.join(", ")));
        }
        features.push(rec);
    }
    Ok(MemoryDb {
        info: json!({
            "source": "saekit-serve fixture (built-in texts)",
            "hook_name": sae.metadata.hook_name,
            "d_sae": n,
            "n_tokens": n_tokens,
            "n_texts": texts.len(),
        }),
        features,
    })
}

fn histogram(acts: impl Iterator<Item = f32>) -> Histogram {
    let v: Vec<f32> = acts.filter(|a| *a > 0.0).collect();
    if v.is_empty() {
        return Histogram::default();
    }
    let lo = v.iter().copied().fold(f32::INFINITY, f32::min).max(1e-6);
    let hi = v.iter().copied().fold(0.0, f32::max).max(lo * 1.0001);
    let (l0, l1) = (lo.ln(), hi.ln());
    let edges: Vec<f32> = (0..=BINS).map(|i| (l0 + (l1 - l0) * i as f32 / BINS as f32).exp()).collect();
    let mut counts = vec![0u64; BINS];
    for a in v {
        let b = (((a.ln() - l0) / (l1 - l0)) * BINS as f32) as usize;
        counts[b.min(BINS - 1)] += 1;
    }
    Histogram { edges, counts }
}

/// Top 10 promoted and suppressed tokens of each decoder direction through the final norm's gain and the
/// unembedding.
fn logit_effects(engine: &Engine) -> Result<Vec<(Vec<TokenLogit>, Vec<TokenLogit>)>> {
    let sae = &engine.sae;
    let d = sae.d_in;
    let v = engine.model.config().vocab_size;
    let gain = engine.model.final_norm_gain();
    let tok = engine.model.tokenizer();
    let mut out = Vec::with_capacity(sae.d_sae);
    for block in sae.params.w_dec.chunks(256 * d) {
        let mut rows = block.to_vec();
        if let Some(g) = gain {
            for row in rows.chunks_mut(d) {
                for (x, gj) in row.iter_mut().zip(g) {
                    *x *= gj;
                }
            }
        }
        let logits = engine.model.unembed(&rows);
        for lg in logits.chunks(v) {
            let mut order: Vec<u32> = (0..v as u32).collect();
            order.sort_unstable_by(|a, b| lg[*b as usize].total_cmp(&lg[*a as usize]));
            let mk = |id: u32| TokenLogit { token: tok.token_text(id), id, logit: lg[id as usize] };
            out.push((
                order[..10].iter().map(|&i| mk(i)).collect(),
                order[v - 10..].iter().rev().map(|&i| mk(i)).collect(),
            ));
        }
    }
    Ok(out)
}

fn normalized(w: &[f32], n: usize, d: usize) -> Vec<f32> {
    let mut u = w[..n * d].to_vec();
    for row in u.chunks_mut(d) {
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        row.iter_mut().for_each(|x| *x /= norm);
    }
    u
}

fn neighbours(w: &[f32], n: usize, d: usize, k: usize) -> Vec<Vec<Neighbour>> {
    let u = normalized(w, n, d);
    let mut out = Vec::with_capacity(n);
    let mut sims = vec![0f32; n];
    for i in 0..n {
        linalg::matmul_transposed(&u[i * d..(i + 1) * d], 1, d, &u, n, &mut sims);
        let mut order: Vec<usize> = (0..n).filter(|&j| j != i).collect();
        order.sort_unstable_by(|a, b| sims[*b].total_cmp(&sims[*a]).then(a.cmp(b)));
        out.push(order.iter().take(k).map(|&j| Neighbour { id: j as u32, cosine: sims[j] }).collect());
    }
    out
}

/// The first two principal components of the unit decoder directions, scaled to [-1, 1].
fn pca_2d(w: &[f32], n: usize, d: usize) -> Vec<(f32, f32)> {
    let mut u = normalized(w, n, d);
    let mut mean = vec![0f32; d];
    for row in u.chunks(d) {
        mean.iter_mut().zip(row).for_each(|(m, x)| *m += x / n as f32);
    }
    for row in u.chunks_mut(d) {
        row.iter_mut().zip(&mean).for_each(|(x, m)| *x -= m);
    }
    let mut comps: Vec<Vec<f32>> = Vec::new();
    for c in 0..2 {
        // power iteration on UᵀU, deflated against earlier components; a fixed start keeps it deterministic
        let mut v: Vec<f32> = (0..d).map(|j| ((j * 7 + c * 13) % 11) as f32 - 5.0).collect();
        for _ in 0..60 {
            let mut proj = vec![0f32; n];
            linalg::matmul_transposed(&u, n, d, &v, 1, &mut proj);
            let mut nv = vec![0f32; d];
            for (row, p) in u.chunks(d).zip(&proj) {
                nv.iter_mut().zip(row).for_each(|(a, x)| *a += p * x);
            }
            for prev in &comps {
                let dot: f32 = nv.iter().zip(prev).map(|(a, b)| a * b).sum();
                nv.iter_mut().zip(prev).for_each(|(a, b)| *a -= dot * b);
            }
            let norm = nv.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            v = nv.into_iter().map(|x| x / norm).collect();
        }
        comps.push(v);
    }
    let coords: Vec<(f32, f32)> = u
        .chunks(d)
        .map(|row| {
            let x: f32 = row.iter().zip(&comps[0]).map(|(a, b)| a * b).sum();
            let y: f32 = row.iter().zip(&comps[1]).map(|(a, b)| a * b).sum();
            (x, y)
        })
        .collect();
    let sx = coords.iter().map(|c| c.0.abs()).fold(1e-12, f32::max);
    let sy = coords.iter().map(|c| c.1.abs()).fold(1e-12, f32::max);
    coords.into_iter().map(|(x, y)| (x / sx, y / sy)).collect()
}

/// A random-init TopK SAE on `hook` for `model`: a stand-in dictionary for tests (its features are random
/// directions, but their activations, contexts and logit effects are computed for real).
pub fn random_sae(model: &saekit_model::Model, hook: &str, d_sae: usize, k: usize, seed: u64) -> saekit_sae::Sae {
    let mut sae = saekit_sae::Sae::init(model.config().d_model, d_sae, saekit_sae::Activation::TopK { k }, 0.1, seed);
    sae.metadata.hook_name = hook.to_string();
    sae.metadata.model_name = model.config().name.clone();
    sae
}

/// A random TopK transcoder set for `model` (one `ln2.hook_normalized` -> `hook_mlp_out` transcoder per
/// block, `d_sae` features, `k` active per token): the graph page's fixture, whose graphs are real
/// attributions through a replacement model that explains little (most influence flows through errors).
pub fn random_transcoders(
    model: &saekit_model::Model,
    d_sae: usize,
    k: usize,
    seed: u64,
) -> saekit_circuits::TranscoderSet {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let d = model.config().d_model;
    let mut uniform =
        |n: usize, scale: f32| (0..n).map(|_| scale * (rng.gen::<f32>() * 2.0 - 1.0)).collect::<Vec<f32>>();
    let layers = (0..model.config().n_layers)
        .map(|l| saekit_circuits::Transcoder {
            d_in: d,
            d_sae,
            d_out: d,
            activation: saekit_circuits::TranscoderActivation::TopK(k),
            w_enc: uniform(d_sae * d, 0.1),
            b_enc: uniform(d_sae, 0.1),
            w_dec: uniform(d_sae * d, 0.3),
            b_dec: uniform(d, 0.01),
            w_skip: None,
            input_hook: saekit_model::HookPoint::Ln2Normalized(l),
            output_hook: saekit_model::HookPoint::MlpOut(l),
        })
        .collect();
    saekit_circuits::TranscoderSet { layers, scan: "saekit-fixture-random-transcoders".into() }
}

/// Write a fixture SAE (`out/sae`, SAELens layout), its feature database (`out/features.json`) and a random
/// transcoder set (`out/transcoders`, circuit-tracer's layout) for
/// `saekit serve --sae out/sae --db out/features.json --transcoders out/transcoders`. Returns the engine,
/// ready to serve (with the transcoders).
pub fn write_fixture(model: saekit_model::Model, out: &std::path::Path) -> Result<Engine> {
    let sae = random_sae(&model, "blocks.6.hook_resid_post", 512, 16, 7);
    std::fs::create_dir_all(out).map_err(|e| anyhow!("{}: cannot create: {e}", out.display()))?;
    saekit_sae::save_saelens(&out.join("sae"), &sae, None, None)?;
    let transcoders = random_transcoders(&model, 64, 4, 11);
    transcoders.save_circuit_tracer(&out.join("transcoders"))?;
    let engine = Engine::new(model, sae)?;
    build_db(&engine, FIXTURE_TEXTS)?.save(&out.join("features.json"))?;
    engine.with_transcoders(transcoders)
}
