//! Transcoders, the replacement model and attribution graphs on the Llama fixture (SmolLM2's config shrunk,
//! random weights made by transformers: tests/fixtures/llama, scripts/make_model_fixtures.py) with random
//! transcoders made here. A missing fixture fails the test.
//!
//! Each check compares against an independent computation: the replacement model with its error terms
//! against transformers' logits; the attribution edges against a separate forward of the frozen
//! replacement model written here (attention computed forwards through the recorded patterns) with one
//! source removed at a time, and each target's incoming edges plus biases against its value in that
//! forward and in the real model.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use saekit_circuits::graph_json::{graph_json, write_graph_files, GraphMeta};
use saekit_circuits::prune::prune;
use saekit_circuits::replacement::{error_terms, replacement_forward, Splice};
use saekit_circuits::{
    attribute, evaluate_replacement, AttributeOptions, Attribution, ReplacementEvalOptions, Transcoder,
    TranscoderActivation, TranscoderSet,
};
use saekit_model::linalg::dot;
use saekit_model::{HookPoint, Hooks, LoadOptions, Logits, Model};

fn fixture(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llama").join(name);
    assert!(p.exists(), "{}: fixture missing; run scripts/make_model_fixtures.sh", p.display());
    p
}

fn model() -> Model {
    fixture("config.json");
    Model::load(&fixture(""), &LoadOptions::default()).unwrap()
}

fn prompt_ids() -> Vec<u32> {
    let f = std::fs::File::open(fixture("ref_token_ids.npy")).unwrap();
    npyz::NpyFile::new(f).unwrap().into_vec::<i64>().unwrap().iter().map(|&x| x as u32).collect()
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn normal(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    // a sum of uniforms: close enough to normal for random weights
    (0..n).map(|_| scale * ((0..4).map(|_| rng.gen::<f32>()).sum::<f32>() - 2.0) * 1.7).collect()
}

/// Random transcoders for every layer of `model`, reading ln2.hook_normalized and writing hook_mlp_out;
/// about a third of the features fire.
fn random_set(model: &Model, d_sae: usize, skip: bool, activation: TranscoderActivation, seed: u64) -> TranscoderSet {
    let (n, d) = (model.config().n_layers, model.config().d_model);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let layers = (0..n)
        .map(|l| Transcoder {
            d_in: d,
            d_sae,
            d_out: d,
            activation: activation.clone(),
            w_enc: normal(&mut rng, d * d_sae, 1.0 / (d as f32).sqrt()),
            b_enc: normal(&mut rng, d_sae, 0.3),
            w_dec: normal(&mut rng, d_sae * d, 0.5 / (d_sae as f32).sqrt()),
            b_dec: normal(&mut rng, d, 0.1),
            w_skip: skip.then(|| normal(&mut rng, d * d, 0.3 / (d as f32).sqrt())),
            input_hook: HookPoint::Ln2Normalized(l),
            output_hook: HookPoint::MlpOut(l),
        })
        .collect();
    TranscoderSet { layers, scan: "test".into() }
}

fn same_outputs(a: &TranscoderSet, b: &TranscoderSet, x: &[f32]) {
    assert_eq!(a.layers.len(), b.layers.len());
    for (s, t) in a.layers.iter().zip(&b.layers) {
        assert_eq!((s.input_hook, s.output_hook), (t.input_hook, t.output_hook));
        assert_eq!(s.activation, t.activation);
        assert_eq!(s.forward(x), t.forward(x));
    }
}

#[test]
fn transcoders_round_trip_through_saelens_and_circuit_tracer_layouts() {
    let m = model();
    let d = m.config().d_model;
    let x = normal(&mut ChaCha8Rng::seed_from_u64(9), 5 * d, 1.0);
    let thresholds = TranscoderActivation::JumpRelu(vec![0.2; 48]);
    for (skip, act) in [(true, TranscoderActivation::Relu), (false, thresholds), (false, TranscoderActivation::TopK(7))]
    {
        let set = random_set(&m, 48, skip, act, 1);
        let tmp = tempfile::tempdir().unwrap();
        for (l, t) in set.layers.iter().enumerate() {
            t.save_saelens(&tmp.path().join(format!("saelens/blocks.{l}.transcoder"))).unwrap();
        }
        same_outputs(&set, &TranscoderSet::load(&tmp.path().join("saelens")).unwrap(), &x);
        set.save_circuit_tracer(&tmp.path().join("ct")).unwrap();
        let yaml = std::fs::read_to_string(tmp.path().join("ct/transcoders.yaml")).unwrap();
        assert!(
            yaml.contains("model_kind: transcoder_set") && yaml.contains("feature_input_hook: mlp.hook_in"),
            "{yaml}"
        );
        same_outputs(&set, &TranscoderSet::load(&tmp.path().join("ct")).unwrap(), &x);
    }
}

#[test]
fn a_transcoder_computes_what_saelens_defines() {
    // out = relu(x W_enc + b_enc) W_dec + b_dec + x W_skipᵀ, written out by hand for one row
    let m = model();
    let set = random_set(&m, 32, true, TranscoderActivation::Relu, 2);
    let t = &set.layers[0];
    let x = normal(&mut ChaCha8Rng::seed_from_u64(3), t.d_in, 1.0);
    let mut want = t.b_dec.clone();
    for f in 0..t.d_sae {
        let a = (0..t.d_in).map(|i| x[i] * t.w_enc[i * t.d_sae + f]).sum::<f32>() + t.b_enc[f];
        for (j, w) in want.iter_mut().enumerate() {
            *w += a.max(0.0) * t.w_dec[f * t.d_out + j];
        }
    }
    let ws = t.w_skip.as_ref().unwrap();
    for (j, w) in want.iter_mut().enumerate() {
        *w += (0..t.d_in).map(|i| ws[j * t.d_in + i] * x[i]).sum::<f32>();
    }
    assert!(rel_l2(&t.forward(&x), &want) < 1e-5);
}

#[test]
fn bad_transcoder_folders_give_one_line_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let err = TranscoderSet::load(tmp.path()).unwrap_err().to_string();
    assert!(err.contains("no transcoders found"), "{err}");
    std::fs::write(tmp.path().join("transcoders.yaml"), "model_kind: cross_layer_transcoder\n").unwrap();
    let err = TranscoderSet::load(tmp.path()).unwrap_err().to_string();
    assert!(err.contains("cross-layer"), "{err}");
    std::fs::write(
        tmp.path().join("transcoders.yaml"),
        "model_kind: transcoder_set\nfeature_input_hook: mlp.hook_in\nfeature_output_hook: mlp.hook_out\ntranscoders: [missing.safetensors]\n",
    )
    .unwrap();
    let err = format!("{:#}", TranscoderSet::load(tmp.path()).unwrap_err());
    assert!(err.contains("missing.safetensors"), "{err}");
}

#[test]
fn replacement_model_with_error_terms_is_the_real_model() {
    let m = model();
    let ids = prompt_ids();
    let set = random_set(&m, 96, true, TranscoderActivation::Relu, 4);
    let n = set.layers.len();
    let errors = error_terms(&m, &set, &ids, 1).unwrap();
    let with_errors = Splice { errors: Some(&errors), ..Splice::replace_all(n) };
    let logits = replacement_forward(&m, &set, &ids, 1, &with_errors, Logits::All).unwrap();
    // transformers' logits for the same prompt: a forward that shares no code with saekit's
    let f = std::fs::File::open(fixture("ref_logits.npy")).unwrap();
    let want = npyz::NpyFile::new(f).unwrap().into_vec::<f32>().unwrap();
    let e = rel_l2(&logits, &want);
    assert!(e < 1e-5, "replacement model + error terms vs transformers: relative L2 {e:.2e}");
    // without the error terms the random transcoders change the output: the check above can fail
    let bare = replacement_forward(&m, &set, &ids, 1, &Splice::replace_all(n), Logits::All).unwrap();
    assert!(rel_l2(&bare, &want) > 1e-2);
}

#[test]
fn kept_rows_keep_the_real_mlp_output() {
    let m = model();
    let ids = prompt_ids();
    let set = random_set(&m, 96, false, TranscoderActivation::Relu, 5);
    let n = set.layers.len();
    let v = m.config().vocab_size;
    // position 0 kept in every layer: it attends only to itself, so its logits are the real model's
    let keep: Vec<Vec<bool>> = (0..n).map(|_| (0..ids.len()).map(|i| i == 0).collect()).collect();
    let forward = |s: &Splice| replacement_forward(&m, &set, &ids, 1, s, Logits::All).unwrap();
    let clean = forward(&Splice::clean(n));
    let kept = forward(&Splice { keep: Some(&keep), ..Splice::replace_all(n) });
    let bare = forward(&Splice::replace_all(n));
    assert!(rel_l2(&kept[..v], &clean[..v]) < 1e-6, "position 0 kept: {:.2e}", rel_l2(&kept[..v], &clean[..v]));
    assert!(rel_l2(&bare[..v], &clean[..v]) > 1e-2);
    // the next position is replaced: the mask is per row, not per pass
    assert!(rel_l2(&kept[v..2 * v], &clean[v..2 * v]) > 1e-2);
    let ablated = forward(&Splice { keep: Some(&keep), ablate: vec![true; n], ..Splice::clean(n) });
    assert!(rel_l2(&ablated[..v], &clean[..v]) < 1e-6);
    assert!(rel_l2(&ablated[v..2 * v], &clean[v..2 * v]) > 1e-2);
}

#[test]
fn replacement_eval_reports_every_layer() {
    let m = model();
    let ids = prompt_ids();
    let seq = 21;
    let tokens = &ids[..2 * seq];
    let set = random_set(&m, 96, false, TranscoderActivation::Relu, 5);
    let opts = ReplacementEvalOptions { batch: 2, ..Default::default() };
    let r = evaluate_replacement(&m, &set, tokens, seq, &opts).unwrap();
    assert_eq!(r.per_layer.len(), set.layers.len());
    assert_eq!(r.n_predicted, 2 * (seq as u64 - 1));
    assert!(r.ce_loss_clean.is_finite() && r.ce_loss_clean > 0.0);
    assert!(r.all.kl_div_replaced > 0.0 && r.all.ce_loss_replaced.is_finite());
    // position 0 of both contexts at least, in every layer
    assert!(r.sink_rows.iter().all(|&s| s >= 2), "{:?}", r.sink_rows);
    let every_row =
        evaluate_replacement(&m, &set, tokens, seq, &ReplacementEvalOptions { keep_sinks: false, ..opts }).unwrap();
    assert!(every_row.sink_rows.iter().all(|&s| s == 0));
    assert!(every_row.all.kl_div_replaced > r.all.kl_div_replaced, "replacing the sinks too costs more");
    for s in &r.per_layer {
        let fvu = s.fvu.unwrap();
        assert!(fvu.is_finite() && fvu > 0.0, "{s:?}");
        let score = (s.ce_loss_ablated - s.ce_loss_replaced) / (s.ce_loss_ablated - r.ce_loss_clean);
        assert!((score - s.ce_loss_score).abs() < 1e-9);
    }
}

/// What an independent frozen forward needs from the clean pass, read through hooks and the KV cache.
struct CleanPass {
    embed: Vec<f32>,
    resid_pre: Vec<Vec<f32>>,
    resid_mid: Vec<Vec<f32>>,
    resid_final: Vec<f32>,
    mlp_in: Vec<Vec<f32>>,
    mlp_out: Vec<Vec<f32>>,
    patterns: Vec<Vec<f32>>,
    last_logits: Vec<f32>,
}

fn clean_pass(m: &Model, ids: &[u32]) -> CleanPass {
    let n = m.config().n_layers;
    let got = Mutex::new(std::collections::HashMap::new());
    let mut hooks = Hooks::new();
    let mut points = vec![HookPoint::Embed, HookPoint::ResidPost(n - 1)];
    for l in 0..n {
        points.extend([
            HookPoint::ResidPre(l),
            HookPoint::ResidMid(l),
            HookPoint::Ln2Normalized(l),
            HookPoint::MlpOut(l),
        ]);
    }
    for p in points {
        let got = &got;
        hooks.add(p, move |ctx, x| {
            got.lock().unwrap().insert(ctx.point, x.to_vec());
            Ok(())
        });
    }
    let mut cache = m.new_cache(1);
    cache.record_patterns();
    let last_logits = m.forward(ids, 1, &mut cache, &mut hooks, Logits::Last).unwrap();
    drop(hooks);
    let mut got = got.into_inner().unwrap();
    let mut take = |p: HookPoint| got.remove(&p).unwrap();
    CleanPass {
        embed: take(HookPoint::Embed),
        resid_pre: (0..n).map(|l| take(HookPoint::ResidPre(l))).collect(),
        resid_mid: (0..n).map(|l| take(HookPoint::ResidMid(l))).collect(),
        resid_final: take(HookPoint::ResidPost(n - 1)),
        mlp_in: (0..n).map(|l| take(HookPoint::Ln2Normalized(l))).collect(),
        mlp_out: (0..n).map(|l| take(HookPoint::MlpOut(l))).collect(),
        patterns: (0..n).map(|l| cache.pattern(l).unwrap().to_vec()).collect(),
        last_logits,
    }
}

/// Which sources a frozen forward switches off.
#[derive(Default, Clone, Copy)]
struct Removed {
    feature: Option<usize>,
    error: Option<(usize, usize)>,
    token: Option<usize>,
}

/// The frozen replacement model, forwards: returns every target node's value (features' pre-activations,
/// logits minus the mean logit) with `removed` switched off. Attention runs forwards through the recorded
/// patterns; norms use the clean pass's `1/rms`.
fn frozen_forward(m: &Model, set: &TranscoderSet, c: &CleanPass, g: &Attribution, removed: Removed) -> Vec<f32> {
    let cfg = m.config();
    let (n, d, seq, eps) = (cfg.n_layers, cfg.d_model, g.n_pos(), cfg.norm_eps);
    let (hd, q_dim, kv_dim, heads) = (cfg.head_dim, cfg.q_dim(), cfg.kv_dim(), cfg.n_heads);
    let group = heads / cfg.n_kv_heads;
    let inv = |x: &[f32], p: usize| 1.0 / (x[p * d..][..d].iter().map(|v| v * v).sum::<f32>() / d as f32 + eps).sqrt();
    let mut out = vec![0f32; g.n_nodes()];
    let mut x = c.embed.clone();
    if let Some(p) = removed.token {
        x[p * d..][..d].fill(0.0);
    }
    for l in 0..n {
        let b = m.rms_block_weights(l).unwrap();
        let (wqkv, wo) = (b.wqkv.values(), b.wo.values());
        let mut v = vec![0f32; seq * kv_dim];
        for p in 0..seq {
            let s = inv(&c.resid_pre[l], p);
            let h: Vec<f32> = (0..d).map(|i| x[p * d + i] * s * b.ln1_gain[i]).collect();
            for j in 0..kv_dim {
                let col = q_dim + kv_dim + j;
                v[p * kv_dim + j] =
                    (0..d).map(|i| h[i] * wqkv[i * b.wqkv.cols + col]).sum::<f32>() + b.bqkv.map_or(0.0, |bb| bb[col]);
            }
        }
        let pat = &c.patterns[l];
        let mut mid = x.clone();
        for q in 0..seq {
            let mut z = vec![0f32; q_dim];
            for h in 0..heads {
                for k in 0..seq {
                    let w = pat[(h * seq + q) * seq + k];
                    for e in 0..hd {
                        z[h * hd + e] += w * v[k * kv_dim + (h / group) * hd + e];
                    }
                }
            }
            for j in 0..d {
                mid[q * d + j] += (0..q_dim).map(|i| z[i] * wo[i * d + j]).sum::<f32>();
            }
        }
        let t = &set.layers[l];
        let input: Vec<f32> = (0..seq * d).map(|r| mid[r] * inv(&c.resid_mid[l], r / d) * b.ln2_gain[r % d]).collect();
        let pre = t.pre_activations(&input);
        for (node, f) in g.features.iter().enumerate().filter(|(_, f)| f.layer == l) {
            out[node] = pre[f.pos * t.d_sae + f.feature];
        }
        // the MLP output: kept features, b_dec, skip, error (the clean pass's MLP minus its reconstruction)
        let mut acts = vec![0f32; seq * t.d_sae];
        for (node, f) in g.features.iter().enumerate().filter(|(_, f)| f.layer == l) {
            if removed.feature != Some(node) {
                acts[f.pos * t.d_sae + f.feature] = f.activation;
            }
        }
        let mut all = vec![0f32; seq * t.d_sae];
        for f in g.features.iter().filter(|f| f.layer == l) {
            all[f.pos * t.d_sae + f.feature] = f.activation;
        }
        let clean_recon = t.decode(&all, &c.mlp_in[l]);
        let recon = t.decode(&acts, &input);
        for r in 0..seq * d {
            let err = if removed.error == Some((l, r / d)) { 0.0 } else { c.mlp_out[l][r] - clean_recon[r] };
            x[r] = mid[r] + recon[r] + err;
        }
    }
    let gain = m.final_norm_gain().unwrap();
    let w_u = m.unembedding();
    let last = seq - 1;
    let s = inv(&c.resid_final, last);
    let h: Vec<f32> = (0..d).map(|i| x[last * d + i] * s * gain[i]).collect();
    let all_logits: Vec<f32> = w_u.chunks(d).map(|row| dot(row, &h)).collect();
    let mean = all_logits.iter().map(|&v| v as f64).sum::<f64>() / all_logits.len() as f64;
    for (i, lg) in g.logits.iter().enumerate() {
        out[g.logit_node(i)] = (all_logits[lg.token as usize] as f64 - mean) as f32;
    }
    out
}

fn target_nodes(g: &Attribution) -> Vec<usize> {
    (0..g.features.len()).chain((0..g.logits.len()).map(|i| g.logit_node(i))).collect()
}

fn check_attribution(skip: bool, seed: u64) {
    let m = model();
    let set = random_set(&m, 48, skip, TranscoderActivation::Relu, seed);
    check_attribution_on(&m, &set, &prompt_ids()[..12], seed, 400);
}

/// Completeness, the frozen forward against the real model, and edges against removing sources.
fn check_attribution_on(m: &Model, set: &TranscoderSet, ids: &[u32], seed: u64, max_feature_nodes: usize) {
    let opts = AttributeOptions { target_logits: 3, max_feature_nodes, batch_targets: 37 };
    let g = attribute(m, set, ids, &opts).unwrap();
    assert!(g.features.len() > 50, "too few active features to test: {}", g.features.len());
    let c = clean_pass(m, ids);

    // the frozen forward reproduces the real model at the prompt
    let base = frozen_forward(m, set, &c, &g, Removed::default());
    let (feat_pre, logits) = (&base[..g.features.len()], (0..g.logits.len()).map(|i| base[g.logit_node(i)]));
    for (node, f) in g.features.iter().enumerate() {
        let t = &set.layers[f.layer];
        let real = t.pre_activations(&c.mlp_in[f.layer][f.pos * t.d_in..][..t.d_in])[f.feature];
        assert!(
            (feat_pre[node] - real).abs() < 1e-4 * real.abs().max(1.0),
            "feature {f:?}: {} vs {real}",
            feat_pre[node]
        );
    }
    let mean = c.last_logits.iter().map(|&v| v as f64).sum::<f64>() / c.last_logits.len() as f64;
    for (i, got) in logits.enumerate() {
        let real = (c.last_logits[g.logits[i].token as usize] as f64 - mean) as f32;
        assert!((got - real).abs() < 1e-4 * real.abs().max(1.0), "logit {i}: {got} vs {real}");
    }

    // completeness: incoming edges plus bias terms are each target's value
    let nn = g.n_nodes();
    for t in target_nodes(&g) {
        let row = &g.adjacency[t * nn..][..nn];
        let sum: f64 = row.iter().map(|&v| v as f64).sum::<f64>() + g.bias[t] as f64;
        let scale = row.iter().map(|v| v.abs() as f64).sum::<f64>() + g.bias[t].abs() as f64;
        assert!((sum - g.values[t] as f64).abs() <= 1e-4 * scale.max(1e-3), "target {t}: {sum} vs {}", g.values[t]);
        assert!((g.values[t] - base[t]).abs() <= 1e-4 * base[t].abs().max(1.0));
    }

    // edges = the change in each target when one source is removed from the frozen forward
    let mut rng = ChaCha8Rng::seed_from_u64(seed + 100);
    let mut sources: Vec<(usize, Removed)> = (0..12)
        .map(|_| {
            let i = rng.gen_range(0..g.features.len());
            (i, Removed { feature: Some(i), ..Default::default() })
        })
        .collect();
    for _ in 0..6 {
        let (l, p) = (rng.gen_range(0..g.n_layers), rng.gen_range(0..g.n_pos()));
        sources.push((g.error_node(l, p), Removed { error: Some((l, p)), ..Default::default() }));
    }
    for p in [0, 3, g.n_pos() - 1] {
        sources.push((g.token_node(p), Removed { token: Some(p), ..Default::default() }));
    }
    let mut checked = 0;
    for (s, removed) in sources {
        let without = frozen_forward(m, set, &c, &g, removed);
        for t in target_nodes(&g) {
            let effect = base[t] - without[t];
            let edge = g.edge(t, s);
            let tol = 1e-3 * base[t].abs().max(effect.abs()).max(1.0);
            assert!((effect - edge).abs() <= tol, "edge {s} -> {t}: attribution {edge}, perturbation {effect}");
            checked += (edge != 0.0) as usize;
        }
    }
    assert!(checked > 100, "only {checked} non-zero edges were checked");
}

#[test]
fn attribution_edges_match_perturbing_the_frozen_replacement_model() {
    check_attribution(false, 11);
}

#[test]
fn attribution_with_skip_connections_matches_perturbation() {
    check_attribution(true, 12);
}

/// The real model (SmolLM2-135M-Instruct, GGUF Q4_1: 30 blocks, grouped KV heads) with random transcoders.
#[test]
fn attribution_on_smollm2_matches_perturbation() {
    let path = saekit_model::default_model_path();
    assert!(path.exists(), "{}: the real model is missing; run scripts/fetch-model.sh", path.display());
    let m = Model::load(&path, &LoadOptions::default()).unwrap();
    let set = random_set(&m, 128, true, TranscoderActivation::Relu, 21);
    let ids = m.tokenizer().encode("The capital of France is", true).unwrap();
    check_attribution_on(&m, &set, &ids, 21, 300);
}

#[test]
fn graph_json_follows_circuit_tracers_schema() {
    let m = model();
    let ids = &prompt_ids()[..10];
    let set = random_set(&m, 48, false, TranscoderActivation::Relu, 13);
    let g = attribute(&m, &set, ids, &AttributeOptions::default()).unwrap();
    let tok = |t: u32| m.tokenizer().decode(&[t]).unwrap();
    let meta = GraphMeta {
        slug: "fixture".into(),
        scan: set.scan.clone(),
        prompt: m.tokenizer().decode(ids).unwrap(),
        prompt_tokens: ids.iter().map(|&t| tok(t)).collect(),
        logit_tokens: g.logits.iter().map(|l| tok(l.token)).collect(),
        node_threshold: 0.8,
    };
    let tmp = tempfile::tempdir().unwrap();
    let files = write_graph_files(&g, &meta, &tmp.path().join("graph.json"), 0.8, 0.98).unwrap();
    assert!(files.pruned_nodes < files.full_nodes && files.pruned_links < files.full_links, "{files:?}");
    assert!((0.0..=1.0).contains(&files.error_influence_share));
    // the full graph: circuit-tracer's Graph tensors, the adjacency exactly the computed one
    let bytes = std::fs::read(&files.full).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let adj = st.tensor("adjacency_matrix").unwrap();
    assert_eq!(adj.shape(), [g.n_nodes(), g.n_nodes()]);
    let adj: Vec<f32> = adj.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    assert!(adj == g.adjacency, "the saved adjacency is not the computed one");
    let feats = st.tensor("active_features").unwrap();
    assert_eq!(feats.shape(), [g.features.len(), 3]);
    let first: Vec<i64> =
        feats.data()[..24].chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect();
    assert_eq!(first, [g.features[0].layer as i64, g.features[0].pos as i64, g.features[0].feature as i64]);
    for path in [&files.pruned] {
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(v["metadata"]["prompt_tokens"].as_array().unwrap().len(), ids.len());
        let nodes = v["nodes"].as_array().unwrap();
        let ids_set: std::collections::HashSet<&str> = nodes.iter().map(|n| n["node_id"].as_str().unwrap()).collect();
        for n in nodes {
            for k in ["node_id", "feature", "layer", "ctx_idx", "feature_type", "jsNodeId", "clerp"] {
                assert!(!n[k].is_null(), "node without {k}: {n}");
            }
        }
        let kinds = |k: &str| nodes.iter().filter(|n| n["feature_type"] == k).count();
        assert_eq!(kinds("embedding"), ids.len());
        assert_eq!(kinds("logit"), g.logits.len());
        assert!(kinds("cross layer transcoder") > 0);
        for l in v["links"].as_array().unwrap() {
            assert!(ids_set.contains(l["source"].as_str().unwrap()) && ids_set.contains(l["target"].as_str().unwrap()));
        }
    }
    // the pruned graph's links are the full graph's, a subset
    let pruned = prune(&g, 0.8, 0.98).unwrap();
    let full = graph_json(&g, &pruned, true, &meta);
    let n = g.n_nodes();
    let nonzero = g.adjacency.iter().filter(|&&w| w != 0.0).count();
    assert_eq!(full["links"].as_array().unwrap().len(), nonzero);
    assert!(pruned.edge_mask.iter().filter(|&&e| e).count() <= n * n);
}

#[test]
fn pruning_keeps_the_influential_nodes() {
    // tok -> f0 (1), tok -> f1 (1), f0 -> logit (3), f1 -> logit (1): influence f0 0.75, f1 0.25, tok 1;
    // 0.8 of the total (2.0) is reached with tok and f0, so f1 goes.
    let mut g = Attribution {
        tokens: vec![7],
        n_layers: 1,
        features: vec![
            saekit_circuits::attribution::FeatureNode { layer: 0, pos: 0, feature: 0, activation: 1.0 },
            saekit_circuits::attribution::FeatureNode { layer: 0, pos: 0, feature: 1, activation: 1.0 },
        ],
        logits: vec![saekit_circuits::attribution::LogitNode { token: 3, prob: 1.0 }],
        adjacency: vec![0.0; 25],
        values: vec![0.0; 5],
        bias: vec![0.0; 5],
    };
    let (tok, logit) = (g.token_node(0), g.logit_node(0));
    for (t, s, w) in [(0, tok, 1.0), (1, tok, 1.0), (logit, 0, 3.0), (logit, 1, 1.0)] {
        g.adjacency[t * 5 + s] = w;
    }
    let p = prune(&g, 0.8, 1.0).unwrap();
    assert_eq!(p.node_mask, vec![true, false, false, true, true]);
    assert!((p.node_influence[0] - 0.75).abs() < 1e-6 && (p.node_influence[tok] - 1.0).abs() < 1e-6);
    assert!(p.edge_mask[logit * 5] && !p.edge_mask[logit * 5 + 1]);
}

#[test]
fn interventions_parse_and_change_the_real_model_as_the_decoder_says() {
    use saekit_circuits::{intervene, Intervention};
    assert_eq!("12@1:3".parse::<Intervention>().unwrap(), Intervention { feature: 12, layer: 1, pos: 3, value: 0.0 });
    assert_eq!("4@0:2=2.5".parse::<Intervention>().unwrap().value, 2.5);
    for bad in ["12@1", "x@1:2", "1@2:3=nan", "1@2:3=abc"] {
        assert!(bad.parse::<Intervention>().is_err(), "{bad}");
    }
    let m = model();
    let ids = &prompt_ids()[..9];
    let set = random_set(&m, 48, false, TranscoderActivation::Relu, 31);
    let (n, d) = (m.config().n_layers, m.config().d_model);
    let clean = m.forward(ids, 1, &mut m.new_cache(1), &mut Hooks::new(), Logits::Last).unwrap();
    let c = clean_pass(&m, ids);
    // the last block's feature at the last position: only the final norm and unembedding lie after it,
    // so the new logits follow from the clean residual stream plus (value - activation) * W_dec[f]
    let (l, p) = (n - 1, ids.len() - 1);
    let t = &set.layers[l];
    let acts = t.encode(&c.mlp_in[l][p * d..][..d]);
    let f = (0..t.d_sae).max_by(|&a, &b| acts[a].total_cmp(&acts[b])).unwrap();
    assert!(acts[f] > 0.1);
    let same = intervene(&m, &set, ids, &[Intervention { feature: f, layer: l, pos: p, value: acts[f] }]).unwrap();
    assert!(rel_l2(&same, &clean) < 1e-6);
    for value in [0.0, 3.0] {
        let got = intervene(&m, &set, ids, &[Intervention { feature: f, layer: l, pos: p, value }]).unwrap();
        let mut x = c.resid_final[p * d..][..d].to_vec();
        x.iter_mut().zip(&t.w_dec[f * d..][..d]).for_each(|(x, w)| *x += (value - acts[f]) * w);
        let inv = 1.0 / (x.iter().map(|v| v * v).sum::<f32>() / d as f32 + m.config().norm_eps).sqrt();
        let h: Vec<f32> = x.iter().zip(m.final_norm_gain().unwrap()).map(|(x, g)| x * inv * g).collect();
        let want: Vec<f32> = m.unembedding().chunks(d).map(|row| dot(row, &h)).collect();
        assert!(rel_l2(&got, &want) < 1e-5, "value {value}: {:.2e}", rel_l2(&got, &want));
        assert!(rel_l2(&got, &clean) > 1e-4);
    }
}
