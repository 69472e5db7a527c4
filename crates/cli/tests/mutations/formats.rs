//! Each format saekit reads: how to make a small valid instance, which of its files to mutate, and
//! the real reader run on a (mutated) copy, driven as far as a consumer would drive it.

use crate::mutate::{protected, target, Kind, Target};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

pub struct Format {
    pub name: &'static str,
    pub make_seed: fn(&Path),
    pub read: fn(&Path) -> Result<()>,
    pub targets: Vec<Target>,
}

pub const NAMES: &[&str] = &[
    "gguf",
    "hf_folder",
    "npy",
    "npz",
    "saelens",
    "sparsify",
    "token_shards",
    "activation_store",
    "train_checkpoint",
    "analysis_checkpoint",
    "feature_db",
    "toml_config",
    "corpus",
    "http_json",
];

pub fn by_name(name: &str) -> Option<Format> {
    use Kind::*;
    let f = |name, make_seed, read, targets| Some(Format { name, make_seed, read, targets });
    match name {
        "gguf" => f("gguf", gguf_seed, gguf_read, vec![target(".gguf", Binary)]),
        "hf_folder" => f(
            "hf_folder",
            hf_seed,
            model_read,
            vec![target("model.safetensors", Safetensors), target("config.json", Json), target("tokenizer.json", Json)],
        ),
        "npy" => f("npy", npy_seed, npy_read, vec![target(".npy", Npy)]),
        "npz" => f("npz", npz_seed, npz_read, vec![target(".npz", Binary)]),
        "saelens" => f(
            "saelens",
            saelens_seed,
            sae_read,
            vec![target("sae_weights.safetensors", Safetensors), target("cfg.json", Json)],
        ),
        "sparsify" => f(
            "sparsify",
            sparsify_seed,
            sae_read,
            vec![target("sae.safetensors", Safetensors), target("cfg.json", Json)],
        ),
        "token_shards" => {
            f("token_shards", tokens_seed, tokens_read, vec![protected(".u32", Binary), target("manifest.json", Json)])
        }
        "activation_store" => f(
            "activation_store",
            store_seed,
            store_read,
            vec![protected(".bin", Binary), target("manifest.json", Json)],
        ),
        "train_checkpoint" => f(
            "train_checkpoint",
            train_seed,
            train_read,
            vec![target("state.safetensors", Safetensors), target("state.json", Json)],
        ),
        "analysis_checkpoint" => {
            f("analysis_checkpoint", stats_seed, stats_read, vec![protected("features.sqlite.ckpt", Binary)])
        }
        "feature_db" => f("feature_db", db_seed, db_read, vec![target(".sqlite", Binary)]),
        "toml_config" => f("toml_config", toml_seed, toml_read, vec![target(".toml", Toml)]),
        "corpus" => f(
            "corpus",
            corpus_seed,
            corpus_read,
            vec![
                target(".txt", Text),
                target(".jsonl", Text),
                target(".gz", Binary),
                target(".zst", Binary),
                target(".parquet", Binary),
            ],
        ),
        "http_json" => f("http_json", http_seed, http_read, vec![target(".json", Json)]),
        _ => None,
    }
}

// ------------------------------------------------------------------------------------------ models

/// A 1-block llama (d_model 32) with a 5-token BPE vocabulary, as candle's GGUF writer writes it.
fn gguf_seed(dir: &Path) {
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    use candle_core::{Device, Tensor};
    use gguf_file::Value as V;
    let toks = ["a", "b", "c", "ab", "<|endoftext|>"];
    let meta: Vec<(String, V)> = vec![
        ("general.architecture".into(), V::String("llama".into())),
        ("general.alignment".into(), V::U32(32)),
        ("llama.block_count".into(), V::U32(1)),
        ("llama.embedding_length".into(), V::U32(32)),
        ("llama.attention.head_count".into(), V::U32(2)),
        ("llama.attention.head_count_kv".into(), V::U32(1)),
        ("llama.feed_forward_length".into(), V::U32(64)),
        ("llama.context_length".into(), V::U32(64)),
        ("llama.attention.layer_norm_rms_epsilon".into(), V::F32(1e-5)),
        ("tokenizer.ggml.model".into(), V::String("gpt2".into())),
        ("tokenizer.ggml.tokens".into(), V::Array(toks.iter().map(|t| V::String(t.to_string())).collect())),
        ("tokenizer.ggml.merges".into(), V::Array(vec![V::String("a b".into())])),
        ("tokenizer.ggml.eos_token_id".into(), V::U32(4)),
    ];
    let shapes: [(&str, &[usize]); 11] = [
        ("token_embd.weight", &[5, 32]),
        ("output_norm.weight", &[32]),
        ("blk.0.attn_norm.weight", &[32]),
        ("blk.0.attn_q.weight", &[32, 32]),
        ("blk.0.attn_k.weight", &[16, 32]),
        ("blk.0.attn_v.weight", &[16, 32]),
        ("blk.0.attn_output.weight", &[32, 32]),
        ("blk.0.ffn_norm.weight", &[32]),
        ("blk.0.ffn_gate.weight", &[64, 32]),
        ("blk.0.ffn_up.weight", &[64, 32]),
        ("blk.0.ffn_down.weight", &[32, 64]),
    ];
    let qts: Vec<(String, QTensor)> = shapes
        .iter()
        .enumerate()
        .map(|(i, (n, s))| {
            let t = Tensor::ones(*s, candle_core::DType::F32, &Device::Cpu).unwrap();
            let t = (t * (0.01 * (i + 1) as f64)).unwrap();
            // one quantized tensor, so block arithmetic is exercised too
            let q = if i == 3 { GgmlDType::Q8_0 } else { GgmlDType::F32 };
            (n.to_string(), QTensor::quantize(&t, q).unwrap())
        })
        .collect();
    let meta_refs: Vec<(&str, &V)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = qts.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut f = std::fs::File::create(dir.join("tiny.gguf")).unwrap();
    gguf_file::write(&mut f, &meta_refs, &t_refs).unwrap();
}

fn gguf_read(dir: &Path) -> Result<()> {
    model_read(&dir.join("tiny.gguf"))
}

/// Load a model and run what every stage runs: a forward pass with a hook, and the tokenizer.
fn model_read(path: &Path) -> Result<()> {
    let m = saekit_model::Model::load(path, &Default::default())?;
    let hook: saekit_model::HookPoint = "blocks.0.hook_resid_post".parse()?;
    let ids = m.tokenizer().encode("ab c", false)?;
    let ids = if ids.is_empty() { vec![0] } else { ids };
    let mut cache = m.run_with_cache(&ids, 1, &[hook])?;
    cache.take(&hook).context("hook not captured")?;
    Ok(())
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)
}

/// The GPT-2 folder transformers wrote (tests/fixtures/gpt2-tiny): config, weights, tokenizer.
fn hf_seed(dir: &Path) {
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture("gpt2-tiny").join(f), dir.join(f)).unwrap();
    }
}

// --------------------------------------------------------------------------------------- SAE files

const D: usize = 8;
const D_SAE: usize = 32;

fn rows(n: usize) -> Vec<f32> {
    (0..n * D).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect()
}

fn npy_seed(dir: &Path) {
    saekit_sae::source::write_npy_f32(&dir.join("acts.npy"), &rows(64), 64, D).unwrap();
}

fn npy_read(dir: &Path) -> Result<()> {
    use saekit_sae::ActivationSource;
    let mut s = saekit_sae::NpySource::open(dir.join("acts.npy"), 1, true)?;
    let mut out = vec![0f32; s.d_in() * 16];
    for _ in 0..s.rows().div_ceil(16) + 1 {
        s.next_batch(&mut out)?;
    }
    Ok(())
}

fn sae(act: saekit_sae::Activation) -> saekit_sae::Sae {
    let mut s = saekit_sae::Sae::init(D, D_SAE, act, 1.0, 7);
    for (i, t) in s.params.threshold.iter_mut().enumerate() {
        *t = 0.01 * i as f32;
    }
    s
}

fn saelens_seed(dir: &Path) {
    saekit_sae::save_saelens(dir, &sae(saekit_sae::Activation::TopK { k: 4 }), None, None).unwrap();
}

fn sparsify_seed(dir: &Path) {
    let s = sae(saekit_sae::Activation::TopK { k: 4 });
    let bytes = saekit_sae::format::safetensors_bytes(
        &[
            ("encoder.weight", vec![D_SAE, D], &s.params.w_enc),
            ("encoder.bias", vec![D_SAE], &s.params.b_enc),
            ("W_dec", vec![D_SAE, D], &s.params.w_dec),
            ("b_dec", vec![D], &s.params.b_dec),
        ],
        None,
    )
    .unwrap();
    std::fs::write(dir.join("sae.safetensors"), bytes).unwrap();
    let cfg = serde_json::json!({"activation": "topk", "expansion_factor": 4, "normalize_decoder": true,
        "num_latents": D_SAE, "k": 4, "multi_topk": false, "skip_connection": false, "transcode": false, "d_in": D});
    std::fs::write(dir.join("cfg.json"), cfg.to_string()).unwrap();
}

fn npz_seed(dir: &Path) {
    use npyz::WriterBuilder;
    let s = sae(saekit_sae::Activation::JumpRelu);
    let mut w = npyz::npz::NpzWriter::create(dir.join("params.npz")).unwrap();
    let mut w_enc_t = vec![0f32; D * D_SAE];
    for j in 0..D_SAE {
        for i in 0..D {
            w_enc_t[i * D_SAE + j] = s.params.w_enc[j * D + i];
        }
    }
    for (name, shape, data) in [
        ("W_enc", vec![D as u64, D_SAE as u64], &w_enc_t),
        ("W_dec", vec![D_SAE as u64, D as u64], &s.params.w_dec),
        ("b_enc", vec![D_SAE as u64], &s.params.b_enc),
        ("b_dec", vec![D as u64], &s.params.b_dec),
        ("threshold", vec![D_SAE as u64], &s.params.threshold),
    ] {
        let mut a = w.array::<f32>(name, Default::default()).unwrap().default_dtype().shape(&shape).begin_nd().unwrap();
        a.extend(data.iter().copied()).unwrap();
        a.finish().unwrap();
    }
}

fn npz_read(dir: &Path) -> Result<()> {
    use_sae(&saekit_sae::load_sae(dir.join("params.npz"))?)
}

fn sae_read(dir: &Path) -> Result<()> {
    use_sae(&saekit_sae::load_sae(dir)?)
}

/// What analyze / steer / eval do with a loaded SAE: encode and decode rows of its width.
fn use_sae(s: &saekit_sae::Sae) -> Result<()> {
    if s.d_in > 1 << 16 {
        bail!("test harness: an SAE of d_in {} loaded from a tiny file", s.d_in);
    }
    let x: Vec<f32> = (0..3 * s.d_in).map(|i| (i % 7) as f32 - 3.0).collect();
    let codes = s.encode(&x);
    s.decode(&codes);
    s.encode_dense(&x[..s.d_in]);
    Ok(())
}

// ------------------------------------------------------------------------------- tokens and store

fn tokens_seed(dir: &Path) {
    use saekit_store::{tokenize_corpus, Document, ReadStats, TokenizeOptions};
    let docs: Vec<Document> = (0..60)
        .map(|i| Document {
            text: format!("document {i} {}", "y".repeat(i % 23)),
            source: format!("d{i}"),
            ..Default::default()
        })
        .collect();
    let opts = TokenizeOptions {
        context: 16,
        seed: 5,
        validation_fraction: 0.2,
        contexts_per_shard: 20,
        ..Default::default()
    };
    let encode = |t: &str| -> Result<Vec<u32>> { Ok(t.bytes().map(|b| b as u32 + 10).collect()) };
    tokenize_corpus(
        |sink| {
            for d in docs {
                sink(d)?;
            }
            Ok(ReadStats::default())
        },
        &encode,
        &opts,
        dir,
        "bytes",
        &[PathBuf::from("synthetic")],
        None,
    )
    .unwrap();
}

fn tokens_read(dir: &Path) -> Result<()> {
    let ds = saekit_store::TokenDataset::open(dir)?;
    for split in ["train", "validation"] {
        let sp = ds.split(split)?;
        for i in 0..sp.n_contexts() {
            sp.context(i);
        }
    }
    Ok(())
}

fn store_config() -> saekit_store::StoreConfig {
    use saekit_store::*;
    StoreConfig {
        model: ModelInfo { name: "synthetic".into(), d_model: D, n_layers: 2, ..Default::default() },
        hooks: vec!["blocks.0.hook_resid_post".into(), "blocks.1.hook_resid_post".into()],
        d_model: D,
        dtype: Dtype::Bf16,
        context: 8,
        contexts_per_shard: 4,
        bos_token: Some(1),
        eot_tokens: vec![0],
        outlier_factor: Some(10.0),
        source: SourceInfo {
            tokens: "synthetic".into(),
            split: "train".into(),
            first_context: 0,
            fingerprint: String::new(),
        },
        tokenizer_fingerprint: String::new(),
    }
}

fn store_seed(dir: &Path) {
    let mut w = saekit_store::ActivationWriter::create_or_resume(dir, store_config()).unwrap();
    for c in 0..10usize {
        let toks: Vec<u32> = (0..8).map(|p| ((c * 8 + p) % 50) as u32 + 2).collect();
        let a = rows(8);
        w.push(&toks, &[&a, &a]).unwrap();
    }
    w.finish().unwrap();
}

fn store_read(dir: &Path) -> Result<()> {
    use saekit_store::*;
    let s = ActivationStore::open(dir)?;
    let opts =
        ReaderOptions { hook: "blocks.1.hook_resid_post".into(), batch_tokens: 16, seed: 3, ..Default::default() };
    let mut r = ActivationReader::new(&s, opts, None)?;
    let mut out = vec![0f32; 16 * r.d_model()];
    for _ in 0..r.rows_per_epoch().div_ceil(16) + 1 {
        r.next_batch(&mut out)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------- training

fn train_cfg(dir: &Path) -> saekit_sae::TrainConfig {
    saekit_sae::TrainConfig {
        acts: Some(dir.join("acts.npy").display().to_string()),
        out: dir.join("sae").display().to_string(),
        tokens: 32 * 12,
        batch_size: 32,
        d_sae: D_SAE,
        k: 4,
        threads: 1,
        log_every: 100,
        checkpoint_every: 5,
        norm_estimate_rows: 64,
        dead_tokens: 64,
        ..Default::default()
    }
}

fn train_seed(dir: &Path) {
    npy_seed(dir);
    let cfg = train_cfg(dir);
    let mut src = saekit_sae::NpySource::open(dir.join("acts.npy"), cfg.seed, true).unwrap();
    let opts = saekit_sae::RunOptions { stop_after_steps: Some(6), ..Default::default() };
    saekit_sae::train(&cfg, &mut src, &opts).unwrap();
}

/// Resume from the (mutated) checkpoint and finish the run.
fn train_read(dir: &Path) -> Result<()> {
    let cfg = train_cfg(dir);
    let mut src = saekit_sae::NpySource::open(dir.join("acts.npy"), cfg.seed, true)?;
    let opts = saekit_sae::RunOptions { resume: true, ..Default::default() };
    saekit_sae::train(&cfg, &mut src, &opts)?;
    Ok(())
}

fn toml_seed(dir: &Path) {
    npy_seed(dir);
    let mut cfg = train_cfg(dir);
    cfg.out = "placeholder".into();
    std::fs::write(dir.join("train.toml"), cfg.to_toml()).unwrap();
}

/// Parse the config and train with it on the case's activations (its own output folder).
fn toml_read(dir: &Path) -> Result<()> {
    let path = dir.join("train.toml");
    let mut cfg = saekit_sae::TrainConfig::from_toml_file(&path.display().to_string())?;
    cfg.check_paths(&path.display().to_string())?;
    cfg.out = dir.join("sae").display().to_string();
    // as `saekit train --config` does when no --acts flag is given
    let acts = cfg.acts.clone().with_context(|| format!("no activations: set acts in {}", path.display()))?;
    let mut src = saekit_sae::NpySource::open(&acts, cfg.seed, true)?;
    saekit_sae::train(&cfg, &mut src, &saekit_sae::RunOptions { stop_after_steps: Some(3), ..Default::default() })
        .with_context(|| format!("training with {}", path.display()))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------- analysis

const SEQ: usize = 16;

fn feature_stats() -> saekit_analysis::stats::FeatureStats {
    use saekit_analysis::stats::*;
    let opts = StatsOptions { top_k: 5, n_quantiles: 4, per_quantile: 2, before: 4, after: 2, seed: 3 };
    let mut st = FeatureStats::new(D_SAE, opts);
    let n_ctx = 12;
    let mut indptr = vec![0];
    let (mut idx, mut val) = (vec![], vec![]);
    for c in 0..n_ctx {
        for t in 0..SEQ {
            for j in 0..D_SAE - 1 {
                if (c * 7 + t * 3) % 10 == j % 10 {
                    idx.push(j as u32);
                    val.push((1 + j) as f32 * (1 + t) as f32 / SEQ as f32);
                }
            }
            indptr.push(idx.len());
        }
    }
    st.update(&BatchCodes { indptr: &indptr, idx: &idx, val: &val, seq: SEQ, first_ctx: 0, skip: &[] }).unwrap();
    st
}

fn stats_seed(dir: &Path) {
    std::fs::write(dir.join("features.sqlite.ckpt"), feature_stats().to_bytes("fingerprint")).unwrap();
}

fn stats_read(dir: &Path) -> Result<()> {
    let p = dir.join("features.sqlite.ckpt");
    let bytes = std::fs::read(&p)?;
    saekit_analysis::stats::FeatureStats::from_bytes(&bytes, "fingerprint").with_context(|| p.display().to_string())?;
    Ok(())
}

fn db_seed(dir: &Path) {
    use saekit_analysis::analyze::{write_db, WeightInputs};
    let vocab_n = 50;
    let unembed: Vec<f32> = (0..vocab_n * D).map(|i| ((i * 13 % 17) as f32 - 8.0) / 8.0).collect();
    let vocab: Vec<String> = (0..vocab_n).map(|i| format!(" w{i}")).collect();
    let w = WeightInputs { unembed: &unembed, vocab: vocab_n, gain: None, n_logits: 3, n_neighbours: 4 };
    let st = feature_stats();
    let info = saekit_analysis::DbInfo {
        model: "test".into(),
        hook: "blocks.3.hook_resid_post".into(),
        d_sae: D_SAE as u32,
        n_tokens: st.n_tokens,
        ..Default::default()
    };
    let toks = |c: u64| -> Vec<u32> { (0..SEQ).map(|t| ((c as usize * 7 + t * 3) % vocab_n) as u32).collect() };
    write_db(&st, &sae(saekit_sae::Activation::TopK { k: 4 }), &w, info, &vocab, toks, &dir.join("features.sqlite"))
        .unwrap();
}

/// Everything `saekit feature`, `search`, `demo` and the browser read from a database.
fn db_read(dir: &Path) -> Result<()> {
    use saekit_analysis::{FeatureDb, SortBy};
    let db = FeatureDb::open(&dir.join("features.sqlite"))?;
    db.info()?;
    let n = db.len()?;
    for id in 0..(n as u32).min(64) {
        if let Some(f) = db.feature(id)? {
            for c in f.top_contexts.iter().chain(f.quantiles.iter().flat_map(|q| q.contexts.iter())) {
                let _ = (&c.tokens[c.peak], c.acts[c.peak]);
            }
        }
    }
    db.list(SortBy::MaxAct, true, 0, 10)?;
    db.search("w13", 5)?;
    db.map()?;
    Ok(())
}

// ------------------------------------------------------------------------------------------ corpus

fn corpus_seed(dir: &Path) {
    use std::io::Write;
    let rows = (0..20)
        .map(|i| format!("{{\"text\": \"row {i} {}\", \"src\": \"s{i}\"}}\n", "z".repeat(i)))
        .collect::<String>();
    std::fs::write(dir.join("a.txt"), "plain text document\nwith two lines\n").unwrap();
    std::fs::write(dir.join("b.jsonl"), &rows).unwrap();
    let mut gz =
        flate2::write::GzEncoder::new(std::fs::File::create(dir.join("c.jsonl.gz")).unwrap(), Default::default());
    gz.write_all(rows.as_bytes()).unwrap();
    gz.finish().unwrap();
    std::fs::write(dir.join("d.jsonl.zst"), zstd::encode_all(rows.as_bytes(), 3).unwrap()).unwrap();
    parquet_seed(&dir.join("e.parquet"));
}

fn parquet_seed(path: &Path) {
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use std::sync::Arc;
    let schema = Arc::new(
        parquet::schema::parser::parse_message_type(
            "message schema { REQUIRED BYTE_ARRAY text (UTF8); OPTIONAL BYTE_ARRAY kind (UTF8); }",
        )
        .unwrap(),
    );
    let props = Arc::new(WriterProperties::builder().set_compression(parquet::basic::Compression::SNAPPY).build());
    let mut w = SerializedFileWriter::new(std::fs::File::create(path).unwrap(), schema, props).unwrap();
    let mut rg = w.next_row_group().unwrap();
    let texts: Vec<ByteArray> = (0..30).map(|i| format!("parquet row {i}").into_bytes().into()).collect();
    let mut col = rg.next_column().unwrap().unwrap();
    col.typed::<ByteArrayType>().write_batch(&texts, None, None).unwrap();
    col.close().unwrap();
    let mut col = rg.next_column().unwrap().unwrap();
    let kinds: Vec<ByteArray> = (0..15).map(|_| b"web".to_vec().into()).collect();
    let defs: Vec<i16> = (0..30).map(|i| (i % 2) as i16).collect();
    col.typed::<ByteArrayType>().write_batch(&kinds, Some(&defs), None).unwrap();
    col.close().unwrap();
    rg.close().unwrap();
    w.close().unwrap();
}

/// The corpus reader counts a bad row or an unreadable file and goes on; a mutated file that it
/// could not read is reported as an error naming it (as `saekit tokenize` prints it).
fn corpus_read(dir: &Path) -> Result<()> {
    let st = saekit_store::read_corpus(&[dir.to_path_buf()], &Default::default(), |_| Ok(()))?;
    if st.unreadable_files + st.bad_rows() > 0 {
        bail!("{}", st.examples.join("; "));
    }
    Ok(())
}

// -------------------------------------------------------------------------------------------- HTTP

/// The bodies name the two features that fired most in the server's database: a `unit: "max"` edit of
/// a feature with no recorded activation is rightly refused, and a random SAE's feature 3 need not fire
/// on the three fixture texts at all.
fn http_seed(dir: &Path) {
    let (_, [a, b]) = http_state();
    let steer = serde_json::json!({"prompt": "The weather is", "chat": false, "max_new_tokens": 2, "temperature": 0.5,
        "seed": 1, "edits": [{"feature": a, "mode": "clamp", "value": 2.0, "unit": "max"},
                             {"feature": b, "mode": "add", "value": -1.5}]});
    std::fs::write(dir.join("steer.json"), serde_json::to_vec_pretty(&steer).unwrap()).unwrap();
    let live = serde_json::json!({"text": "Hello world", "feature": a, "top_k": 5, "lens": true});
    std::fs::write(dir.join("live.json"), serde_json::to_vec_pretty(&live).unwrap()).unwrap();
}

/// One server (the real model, a random SAE, a small database) for every case of the worker, and the
/// two features with the largest recorded activation.
fn http_state() -> (std::sync::Arc<saekit_serve::AppState>, [u32; 2]) {
    use saekit_serve::FeatureStore;
    use std::sync::{Arc, OnceLock};
    static STATE: OnceLock<(Arc<saekit_serve::AppState>, [u32; 2])> = OnceLock::new();
    STATE
        .get_or_init(|| {
            let path = saekit_model::default_model_path();
            assert!(path.exists(), "{}: the HTTP cases need SmolLM2 (scripts/fetch-model.sh)", path.display());
            let model = saekit_model::Model::load(&path, &Default::default()).expect("load model");
            let sae = saekit_serve::fixture::random_sae(&model, "blocks.6.hook_resid_post", 64, 8, 3);
            let engine = saekit_serve::Engine::new(model, sae).expect("engine");
            let db = saekit_serve::fixture::build_db(&engine, &saekit_serve::fixture::FIXTURE_TEXTS[..3]).expect("db");
            let top = db.list(saekit_analysis::SortBy::MaxAct, true, 0, 2).expect("list features");
            assert!(top.len() == 2 && top[1].max_act > 0.0, "the fixture database has fewer than two live features");
            let queue = saekit_serve::ModelQueue::start(engine, 4).expect("queue");
            let limits = saekit_serve::Limits { max_new_tokens: 2, max_live_tokens: 32, ..Default::default() };
            let state = saekit_serve::AppState::new(Arc::new(db), Some(queue), serde_json::json!({}), limits);
            (Arc::new(state), [top[0].id, top[1].id])
        })
        .clone()
}

/// POST each body; a 2xx is `Ok`, a 4xx/503 must carry a JSON error (reported as the case's `Err`),
/// anything else is a server fault.
fn http_read(dir: &Path) -> Result<()> {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut errors = vec![];
    for (file, uri) in [("steer.json", "/api/steer"), ("live.json", "/api/live")] {
        let body = std::fs::read(dir.join(file))?;
        let req = axum::http::Request::builder()
            .method("POST")
            .uri(uri)
            .header("content-type", "application/json")
            .body(axum::body::Body::from(body))?;
        let (status, bytes) = rt.block_on(async {
            let resp = saekit_serve::router(http_state().0).oneshot(req).await.expect("infallible");
            let status = resp.status();
            (status, resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default())
        });
        if status.is_success() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_slice(&bytes).with_context(|| {
            format!("{file}: HTTP {status} without a JSON body: {}", String::from_utf8_lossy(&bytes))
        })?;
        let msg = v["error"].as_str().with_context(|| format!("{file}: HTTP {status} without an error: {v}"))?;
        assert!(
            status.is_client_error() || status == axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "{file}: HTTP {status}: {msg}"
        );
        errors.push(format!("{file}: HTTP {status}: {msg}"));
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("; ").replace('\n', " "));
    }
    Ok(())
}
