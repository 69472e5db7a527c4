//! Parity against transformers for Gemma 2, Gemma 3, Pythia (GPT-NeoX), Qwen3, Phi-3 and Llama (SmolLM2's config):
//! small random-weight
//! models built by transformers from each published config shrunk in size (scripts/make_model_fixtures.py;
//! the fixtures are committed, so these tests need no Python). A missing fixture fails the test.
//!
//! Per architecture: identical token ids and chat-template rendering, every TransformerLens hook point and
//! the logits within 1e-5 relative L2 (f32), the identical 12-token greedy generation, and the KV cache
//! reproducing a full pass.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use saekit_model::{Arch, ChatMessage, GenerateOptions, HookPoint, Hooks, LoadOptions, Logits, Model, Sampling};

fn dir(arch: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(arch)
}

fn fixture_file(arch: &str, name: &str) -> PathBuf {
    let p = dir(arch).join(name);
    assert!(p.exists(), "{}: fixture missing; run scripts/make_model_fixtures.sh", p.display());
    p
}

fn meta(arch: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture_file(arch, "ref_meta.json")).unwrap()).unwrap()
}

fn npy<T: npyz::Deserialize>(arch: &str, name: &str) -> Vec<T> {
    let f = std::fs::File::open(fixture_file(arch, name)).unwrap();
    npyz::NpyFile::new(f).unwrap().into_vec::<T>().unwrap()
}

fn reference_hooks(arch: &str) -> Vec<(String, Vec<f32>)> {
    let path = fixture_file(arch, "ref_hooks.npz");
    let mut ar = npyz::npz::NpzArchive::open(&path).unwrap();
    let names: Vec<String> = ar.array_names().map(String::from).collect();
    names
        .into_iter()
        .map(|n| {
            let v = ar.by_name(&n).unwrap().unwrap().into_vec::<f32>().unwrap();
            (n, v)
        })
        .collect()
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn load(arch: &str) -> Model {
    fixture_file(arch, "config.json");
    Model::load(&dir(arch), &LoadOptions::default()).unwrap()
}

/// Everything one fixture checks.
fn check(arch: &str, want_arch: Arch) {
    let m = load(arch);
    assert_eq!(m.config().arch, want_arch);
    let meta = meta(arch);
    let ids = m.tokenizer().encode(meta["text"].as_str().unwrap(), true).unwrap();
    let want: Vec<u32> = npy::<i64>(arch, "ref_token_ids.npy").iter().map(|&x| x as u32).collect();
    assert_eq!(ids, want, "{arch}: token ids differ from transformers'");
    check_chat(&m, &meta, arch);
    check_forward(&m, arch, &ids, &meta);
}

/// Every hook point and the logits within 1e-5 of transformers', the KV cache and the greedy generation.
fn check_forward(m: &Model, arch: &str, ids: &[u32], meta: &serde_json::Value) {
    let reference = reference_hooks(arch);
    let mut names: Vec<String> = m.hook_points().iter().map(|p| p.to_string()).collect();
    let mut want_names: Vec<String> = reference.iter().map(|(n, _)| n.clone()).collect();
    names.sort();
    want_names.sort();
    assert_eq!(names, want_names, "{arch}: saekit's hook points are not TransformerLens's");

    let got = Mutex::new(Vec::new());
    let mut hooks = Hooks::new();
    for p in m.hook_points() {
        let got = &got;
        hooks.add(p, move |ctx, x| {
            got.lock().unwrap().push((ctx.point, x.to_vec()));
            Ok(())
        });
    }
    let mut cache = m.new_cache(1);
    let logits = m.forward(ids, 1, &mut cache, &mut hooks, Logits::All).unwrap();
    drop(hooks);
    let got = got.into_inner().unwrap();
    let mut errors = Vec::new();
    for (name, want) in &reference {
        let p: HookPoint = name.parse().unwrap();
        let x = &got.iter().find(|(q, _)| *q == p).unwrap_or_else(|| panic!("{arch}: {name} never ran")).1;
        errors.push((name.clone(), rel_l2(x, want)));
    }
    let worst = errors.iter().map(|e| e.1).fold(0.0, f64::max);
    assert!(worst < 1e-5, "{arch}: a hook point is off by more than 1e-5 relative L2: {errors:#?}");
    let e = rel_l2(&logits, &npy::<f32>(arch, "ref_logits.npy"));
    assert!(e < 1e-5, "{arch} logits: relative L2 error {e:.3e}");

    check_kv_cache(m, ids, &logits);
    let opts = GenerateOptions { max_new_tokens: 12, sampling: Sampling::Greedy, seed: 0, stop_at_eos: false };
    let gen = m.generate(ids, &opts, &mut Hooks::new()).unwrap();
    let want_gen: Vec<u32> =
        meta["generated_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    assert_eq!(gen.generated_ids, want_gen, "{arch}: greedy generation differs from transformers'");
}

fn check_chat(m: &Model, meta: &serde_json::Value, arch: &str) {
    let Some(text) = meta.get("chat_text").and_then(|t| t.as_str()) else {
        assert!(m.tokenizer().chat_template().is_none(), "{arch}: unexpected chat template");
        return;
    };
    let msgs: Vec<ChatMessage> = meta["chat_messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| ChatMessage {
            role: v["role"].as_str().unwrap().into(),
            content: v["content"].as_str().unwrap().into(),
        })
        .collect();
    let rendered = m.tokenizer().apply_chat_template(&msgs).unwrap();
    assert_eq!(rendered, text, "{arch}: chat template renders differently");
    let ids = m.tokenizer().encode(&rendered, false).unwrap();
    let want: Vec<u32> = meta["chat_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    assert_eq!(ids, want, "{arch}: chat prompt token ids differ");
}

/// Decoding the last tokens one at a time through the KV cache gives the full pass's last logits.
fn check_kv_cache(m: &Model, ids: &[u32], full: &[f32]) {
    let mut cache = m.new_cache(1);
    let n = ids.len();
    m.forward(&ids[..n - 3], 1, &mut cache, &mut Hooks::new(), Logits::Last).unwrap();
    let mut last = Vec::new();
    for &t in &ids[n - 3..] {
        last = m.forward(&[t], 1, &mut cache, &mut Hooks::new(), Logits::Last).unwrap();
    }
    let v = m.config().vocab_size;
    assert!(rel_l2(&last, &full[(n - 1) * v..]) < 1e-5);
}

#[test]
fn gemma2_matches_transformers() {
    check("gemma2", Arch::Gemma2);
}

#[test]
fn gemma2_fixture_exercises_softcaps_and_sliding_window() {
    let meta = meta("gemma2");
    let cap = &meta["softcap"];
    assert!(cap["max_abs_raw_final_logit"].as_f64().unwrap() > 1.5 * cap["final_logit_softcapping"].as_f64().unwrap());
    let attn = cap["max_abs_layer0_attn_score_before_rope"].as_f64().unwrap();
    assert!(attn > 1.5 * cap["attn_logit_softcapping"].as_f64().unwrap());
    let n = npy::<i64>("gemma2", "ref_token_ids.npy").len();
    assert!(n as u64 > meta["sliding_window"].as_u64().unwrap());
    let m = load("gemma2");
    assert_eq!(m.config().details.sliding_layers, vec![true, false, true, false]);
    assert_eq!(m.config().details.final_softcap, Some(30.0));
}

#[test]
fn gemma3_matches_transformers() {
    check("gemma3", Arch::Gemma3);
}

#[test]
fn pythia_matches_transformers() {
    check("pythia", Arch::GptNeox);
    let m = load("pythia");
    let err = m.run_with_cache(&[1, 2, 3], 1, &[HookPoint::ResidMid(0)]).err().unwrap().to_string();
    assert!(err.contains("hook_resid_mid") && err.contains("parallel"), "{err}");
}

/// Qwen2 runs as the Llama family with q/k/v biases.
#[test]
fn qwen2_matches_transformers() {
    check("qwen2", Arch::Llama);
}

#[test]
fn qwen3_matches_transformers() {
    check("qwen3", Arch::Qwen3);
}

#[test]
fn llama_matches_transformers() {
    check("llama", Arch::Llama);
}

/// What a hook writes inside the MLP is what the rest of the pass uses: a gate pre-activation pushed far
/// negative, or a zeroed hidden activation, silences the MLP (SwiGLU, no biases).
#[test]
fn writes_inside_the_mlp_reach_its_output() {
    let m = load("llama");
    let ids: Vec<u32> = npy::<i64>("llama", "ref_token_ids.npy").iter().map(|&x| x as u32).collect();
    for point in [HookPoint::MlpPre(1), HookPoint::MlpPost(1)] {
        let out = Mutex::new(Vec::new());
        let mut hooks = Hooks::new();
        hooks.add(point, |ctx, x| {
            assert_eq!(ctx.width, m.config().d_ff);
            x.iter_mut().for_each(|v| *v = if ctx.point == HookPoint::MlpPre(1) { -1e4 } else { 0.0 });
            Ok(())
        });
        hooks.add(HookPoint::MlpOut(1), |_, x| {
            out.lock().unwrap().extend_from_slice(x);
            Ok(())
        });
        m.forward(&ids, 1, &mut m.new_cache(1), &mut hooks, Logits::None).unwrap();
        drop(hooks);
        let max = out.into_inner().unwrap().iter().fold(0f32, |a, v| a.max(v.abs()));
        assert!(max < 1e-3, "{point}: the MLP still writes {max}");
    }
}

#[test]
fn phi3_matches_transformers() {
    check("phi3", Arch::Phi3);
}

/// The GGUF that llama.cpp's gguf-py makes of a fixture (scripts/make_gguf_fixtures.py: llama.cpp's tensor
/// names, Q/K rows as llama.cpp's converter leaves them for this architecture) runs as transformers does.
fn check_gguf(arch: &str, want_arch: Arch) {
    let m = Model::load(&fixture_file(arch, "model.gguf"), &LoadOptions::default()).unwrap();
    assert_eq!(m.config().arch, want_arch);
    let ids: Vec<u32> = npy::<i64>(arch, "ref_token_ids.npy").iter().map(|&x| x as u32).collect();
    check_forward(&m, arch, &ids, &meta(arch));
}

/// llama.cpp leaves Qwen2's Q/K rows unpermuted (NEOX rotary) and names its biases `attn_{q,k,v}.bias`.
#[test]
fn qwen2_gguf_with_llama_cpp_names_matches_transformers() {
    check_gguf("qwen2", Arch::Llama);
}

#[test]
fn qwen3_gguf_with_llama_cpp_names_matches_transformers() {
    check_gguf("qwen3", Arch::Qwen3);
}

#[test]
fn phi3_gguf_with_llama_cpp_names_matches_transformers() {
    check_gguf("phi3", Arch::Phi3);
}

/// llama.cpp's converter stores Gemma 2's RMSNorm gains as 1 + w and leaves the layer pattern and the
/// query scale to the loader (the tiny fixture's scale is written as `attention.scale`).
#[test]
fn gemma2_gguf_with_llama_cpp_names_matches_transformers() {
    check_gguf("gemma2", Arch::Gemma2);
}

/// Gemma 3 from GGUF: q/k norms, 5 local : 1 global layers with the local base llama.cpp assumes, linear
/// rope scaling of the global layers, all from the converter's metadata.
#[test]
fn gemma3_gguf_with_llama_cpp_names_matches_transformers() {
    check_gguf("gemma3", Arch::Gemma3);
}

/// llama.cpp's converter regroups GPT-NeoX's per-head fused QKV rows into all q, all k, all v, and
/// records the rotating share of each head as `rope.dimension_count`.
#[test]
fn pythia_gguf_with_llama_cpp_names_matches_transformers() {
    check_gguf("pythia", Arch::GptNeox);
}

/// A model loaded with its first blocks only (`LoadOptions::blocks`, how a 2B model's middle layer is read
/// in less memory) gives transformers' values at every hook point of those blocks, and refuses a deeper
/// hook or logits with a message naming the model.
#[test]
fn a_partly_loaded_model_matches_transformers_up_to_its_last_block() {
    for arch in ["gemma2", "pythia"] {
        fixture_file(arch, "config.json");
        let m = Model::load(&dir(arch), &LoadOptions { blocks: Some(1), ..Default::default() }).unwrap();
        let ids = m.tokenizer().encode(meta(arch)["text"].as_str().unwrap(), true).unwrap();
        for (name, want) in reference_hooks(arch) {
            let p: HookPoint = name.parse().unwrap();
            if p.layer().is_none_or(|l| l > 0) {
                continue;
            }
            let got = m
                .run_with_cache(&ids, 1, &[p])
                .unwrap()
                .get(&p)
                .unwrap_or_else(|| panic!("{arch} {name}: not captured"))
                .to_vec();
            let e = rel_l2(&got, &want);
            assert!(e < 1e-5, "{arch} {name}: relative L2 error {e:.3e}");
        }
        let deeper = m.run_with_cache(&ids, 1, &["blocks.1.hook_resid_post".parse().unwrap()]).unwrap_err().to_string();
        assert!(deeper.contains("needs 2 blocks") && deeper.contains(arch), "{deeper}");
        let mut cache = m.new_cache(1);
        let logits = m.forward(&ids, 1, &mut cache, &mut Hooks::new(), Logits::Last).unwrap_err().to_string();
        assert!(logits.contains("for logits") && logits.contains("first 1 only"), "{logits}");
    }
    // more blocks than the model has: all of them (a hook past the end is refused by its own check)
    let all = Model::load(&dir("pythia"), &LoadOptions { blocks: Some(99), ..Default::default() }).unwrap();
    let ids = all.tokenizer().encode("a b", true).unwrap();
    all.forward(&ids, 1, &mut all.new_cache(1), &mut Hooks::new(), Logits::Last).unwrap();
}
