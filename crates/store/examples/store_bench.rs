//! Reader throughput against a plain sequential read of the same shard files.
//!
//! cargo run --release -p saekit-store --example store_bench -- STORE [--hook H] [--batch 4096] [--batches 200]
//! cargo run --release -p saekit-store --example store_bench -- --synthetic ROWS STORE   (write a store first)
//!
//! Prints one JSON line per measurement. Both sides read from the page cache when the store fits in RAM
//! (the open-time CRC pass warms it), so this compares the reader's gather + convert with a memcpy-speed
//! sequential read.

use std::io::Read;
use std::path::PathBuf;
use std::time::Instant;

use rand::{Rng, SeedableRng};
use saekit_store::*;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = PathBuf::from(args.last().cloned().unwrap_or_default());
    if let Some(rows) = arg(&args, "--synthetic") {
        let rows: usize = rows.parse()?;
        let d = 576;
        let cfg = StoreConfig {
            model: ModelInfo { name: "synthetic".into(), d_model: d, ..Default::default() },
            hooks: vec!["blocks.15.hook_resid_post".into()],
            d_model: d,
            dtype: Dtype::Bf16,
            context: 128,
            contexts_per_shard: 256,
            bos_token: None,
            eot_tokens: vec![0],
            outlier_factor: Some(10.0),
            source: SourceInfo::default(),
            tokenizer_fingerprint: String::new(),
        };
        remove_store(&dir)?;
        let mut w = ActivationWriter::create_or_resume(&dir, cfg)?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let t0 = Instant::now();
        let chunk = 128 * 64;
        let mut done = 0;
        while done < rows {
            let toks: Vec<u32> = (0..chunk).map(|_| rng.gen_range(1..49152)).collect();
            let acts: Vec<f32> = (0..chunk * d).map(|_| rng.gen::<f32>() * 8.0 - 4.0).collect();
            w.push(&toks, &[&acts])?;
            done += chunk;
        }
        let m = w.finish()?;
        let bytes: u64 = m.shards.iter().map(|s| s.bytes).sum();
        let s = t0.elapsed().as_secs_f64();
        println!(
            "{}",
            serde_json::json!({"what": "write", "rows": m.n_tokens, "bytes": bytes, "seconds": s, "MB_per_s": bytes as f64 / s / 1e6})
        );
        return Ok(());
    }
    let batch: usize = arg(&args, "--batch").map(|s| s.parse()).transpose()?.unwrap_or(4096);
    let batches: usize = arg(&args, "--batches").map(|s| s.parse()).transpose()?.unwrap_or(200);
    let hook = arg(&args, "--hook").unwrap_or_default();

    let t0 = Instant::now();
    let store = ActivationStore::open(&dir)?;
    let open_s = t0.elapsed().as_secs_f64();
    let m = store.manifest();
    let total: u64 = m.shards.iter().map(|s| s.bytes).sum();
    println!(
        "{}",
        serde_json::json!({"what": "open+verify crc32", "bytes": total, "seconds": open_s, "GB_per_s": total as f64 / open_s / 1e9})
    );

    // Plain sequential read of the same files into one reused buffer.
    let mut buf = vec![0u8; 8 << 20];
    let t0 = Instant::now();
    let mut n = 0u64;
    for s in &m.shards {
        let mut f = std::fs::File::open(dir.join(&s.file))?;
        loop {
            let k = f.read(&mut buf)?;
            if k == 0 {
                break;
            }
            n += k as u64;
        }
    }
    let seq_s = t0.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({"what": "sequential read", "bytes": n, "seconds": seq_s, "GB_per_s": n as f64 / seq_s / 1e9})
    );

    let d = m.config.d_model;
    let esize = m.config.dtype.size();
    for shuffle in [false, true] {
        let opts = ReaderOptions { hook: hook.clone(), batch_tokens: batch, seed: 1, shuffle, ..Default::default() };
        let t_new = Instant::now();
        let mut r = ActivationReader::new(&store, opts, None)?;
        let new_s = t_new.elapsed().as_secs_f64();
        let mut out = vec![0f32; batch * d];
        r.next_batch(&mut out)?; // builds the first window
        let mut times = vec![];
        let t0 = Instant::now();
        for _ in 0..batches {
            let t = Instant::now();
            r.next_batch(&mut out)?;
            times.push(t.elapsed().as_secs_f64());
        }
        let s = t0.elapsed().as_secs_f64();
        times.sort_by(f64::total_cmp);
        let rows = (batch * batches) as f64;
        let per_batch = s / batches as f64;
        println!(
            "{}",
            serde_json::json!({
                "what": if shuffle { "reader shuffled" } else { "reader sequential" },
                "batch": batch, "batches": batches, "reader_new_s": new_s,
                "rows_per_s": rows / s,
                "stored_GB_per_s": rows * (d * esize) as f64 / s / 1e9,
                "f32_out_GB_per_s": rows * (d * 4) as f64 / s / 1e9,
                "ms_per_batch_mean": per_batch * 1e3,
                "ms_per_batch_p50": times[times.len() / 2] * 1e3,
                "ms_per_batch_max": times[times.len() - 1] * 1e3,
                "wait_fraction_of_0.5s_step": per_batch / 0.5,
                "wait_fraction_of_1s_step": per_batch / 1.0,
                "epochs": r.epoch(),
            })
        );
    }
    Ok(())
}
