//! The Hugging Face loading path, checked on real weights: write SmolLM2's GGUF weights out as an HF folder
//! (safetensors with the Q/K rows un-permuted for the half-split rotary embedding, config.json,
//! tokenizer.json) and require the same activations as the transformers reference.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::weights::WeightSource;
use crate::{HookPoint, LoadOptions, Model};

/// GGUF stores Q/K rows of each head as interleaved pairs; HF stores the two halves apart.
fn unpermute(w: &[f32], n_heads: usize, hd: usize, d_in: usize) -> Vec<f32> {
    let mut out = vec![0f32; w.len()];
    for h in 0..n_heads {
        for i in 0..hd / 2 {
            for j in 0..2 {
                let src = (h * hd + 2 * i + j) * d_in;
                let dst = (h * hd + j * hd / 2 + i) * d_in;
                out[dst..dst + d_in].copy_from_slice(&w[src..src + d_in]);
            }
        }
    }
    out
}

fn export(gguf: &Path, dir: &Path) {
    let model = Model::load(gguf, &LoadOptions::default()).unwrap();
    let c = model.config().clone();
    let src = WeightSource::open_gguf(gguf).unwrap();
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut put = |name: String, data: Vec<f32>, shape: &[usize]| {
        tensors.insert(name, Tensor::from_vec(data, shape, &Device::Cpu).unwrap());
    };
    let (d, ff, qd, kvd) = (c.d_model, c.d_ff, c.q_dim(), c.kv_dim());
    put(
        "model.embed_tokens.weight".into(),
        src.get("token_embd.weight", &[c.vocab_size, d]).unwrap(),
        &[c.vocab_size, d],
    );
    put("model.norm.weight".into(), src.get("output_norm.weight", &[d]).unwrap(), &[d]);
    for l in 0..c.n_layers {
        let g = |n: &str, shape: &[usize]| src.get(&format!("blk.{l}.{n}.weight"), shape).unwrap();
        let hf = |n: &str| format!("model.layers.{l}.{n}.weight");
        put(hf("input_layernorm"), g("attn_norm", &[d]), &[d]);
        put(hf("post_attention_layernorm"), g("ffn_norm", &[d]), &[d]);
        put(hf("self_attn.q_proj"), unpermute(&g("attn_q", &[qd, d]), c.n_heads, c.head_dim, d), &[qd, d]);
        put(hf("self_attn.k_proj"), unpermute(&g("attn_k", &[kvd, d]), c.n_kv_heads, c.head_dim, d), &[kvd, d]);
        put(hf("self_attn.v_proj"), g("attn_v", &[kvd, d]), &[kvd, d]);
        put(hf("self_attn.o_proj"), g("attn_output", &[d, qd]), &[d, qd]);
        put(hf("mlp.gate_proj"), g("ffn_gate", &[ff, d]), &[ff, d]);
        put(hf("mlp.up_proj"), g("ffn_up", &[ff, d]), &[ff, d]);
        put(hf("mlp.down_proj"), g("ffn_down", &[d, ff]), &[d, ff]);
    }
    // Two shards and an index, as large checkpoints come.
    let mut names: Vec<String> = tensors.keys().cloned().collect();
    names.sort();
    let (a, b): (Vec<_>, Vec<_>) = names.iter().partition(|n| n.contains("layers.1") || n.contains("embed"));
    let mut weight_map = serde_json::Map::new();
    for (file, part) in [("model-00001-of-00002.safetensors", a), ("model-00002-of-00002.safetensors", b)] {
        let sub: HashMap<String, Tensor> = part.iter().map(|n| ((*n).clone(), tensors[*n].clone())).collect();
        candle_core::safetensors::save(&sub, dir.join(file)).unwrap();
        for n in part {
            weight_map.insert(n.clone(), file.into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let config = serde_json::json!({
        "model_type": "llama", "hidden_size": d, "intermediate_size": ff, "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads, "num_hidden_layers": c.n_layers, "vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_positions, "rope_theta": c.rope_theta, "rms_norm_eps": c.norm_eps,
        "tie_word_embeddings": true,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    model.tokenizer().save_hf(dir).unwrap();
}

#[test]
fn hf_folder_matches_transformers() {
    let gguf = crate::default_model_path();
    assert!(gguf.exists(), "needs {} (scripts/fetch-model.sh)", gguf.display());
    let dir = tempfile::tempdir().unwrap();
    export(&gguf, dir.path());
    let m = Model::load(dir.path(), &LoadOptions::default()).unwrap();
    assert!(!m.config().rope_interleaved);

    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/smollm2");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures.join("ref_meta.json")).unwrap()).unwrap();
    let ids = m.tokenizer().encode(meta["prompt"].as_str().unwrap(), true).unwrap();
    let f = std::fs::File::open(fixtures.join("ref_token_ids.npy")).unwrap();
    let want_ids: Vec<u32> =
        npyz::NpyFile::new(f).unwrap().into_vec::<i64>().unwrap().iter().map(|&x| x as u32).collect();
    assert_eq!(ids, want_ids);

    let cache = m.run_with_cache(&ids, 1, &[HookPoint::ResidPost(15)]).unwrap();
    let got = cache.get(&HookPoint::ResidPost(15)).unwrap();
    let f = std::fs::File::open(fixtures.join("ref_resid_post_L15.npy")).unwrap();
    let want = npyz::NpyFile::new(f).unwrap().into_vec::<f32>().unwrap();
    let num: f64 = got.iter().zip(&want).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    let err = (num / den).sqrt();
    assert!(err < 1e-4, "HF folder: relative L2 error {err:.3e} at layer 15");

    let msgs = [crate::ChatMessage::user("What is the capital of France?")];
    let text = m.tokenizer().apply_chat_template(&msgs).unwrap();
    assert!(text.starts_with("<|im_start|>system\n"), "chat template from tokenizer_config.json: {text}");
}
