//! Feature-database scale benchmark: fill a database with N synthetic features shaped like real ones
//! (20 top contexts + 10 x 5 quantile contexts of 25 tokens, sparse activations, histogram, logits,
//! neighbours), then time opening feature pages, list pages, search and the map.
//!
//! cargo run --release -p saekit-analysis --example db_bench -- /tmp/bench.sqlite 1000000

use std::time::Instant;

use anyhow::Result;
use saekit_analysis::feature_db::{DbInfo, FeatureDbWriter, FeatureRow, StoredContext, StoredDetail, StoredGroup};
use saekit_analysis::stats::hist_edges;
use saekit_analysis::{FeatureDb, SortBy};

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const VOCAB: usize = 49_152;

fn context(seed: u64, max: f32) -> StoredContext {
    let ids: Vec<u32> = (0..25).map(|i| (mix(seed * 31 + i) % VOCAB as u64) as u32).collect();
    let acts: Vec<(u16, f32)> = (0..5u16)
        .map(|i| (12 + i * 2 - 4, max * (0.2 + 0.2 * i as f32) * (1.0 + (mix(seed + i as u64) % 100) as f32 / 1000.0)))
        .collect();
    StoredContext { ctx: mix(seed) % 1_000_000, start: 3, ids, acts, peak: 12, max_act: max }
}

fn row(j: u32) -> FeatureRow {
    let s = j as u64 * 1000;
    let max = 1.0 + (mix(s) % 1000) as f32 / 100.0;
    let top: Vec<StoredContext> = (0..20).map(|i| context(s + i, max * (1.0 - i as f32 / 40.0))).collect();
    let quantiles: Vec<StoredGroup> = (0..10)
        .map(|b| StoredGroup {
            lo: max * b as f32 / 10.0,
            hi: max * (b + 1) as f32 / 10.0,
            count: 1000 - b * 90,
            contexts: (0..5).map(|i| context(s + 100 + b * 5 + i, max * (b as f32 + 0.5) / 10.0)).collect(),
        })
        .collect();
    let toks = |o: u64| -> Vec<(u32, f32)> {
        (0..10).map(|i| ((mix(s + o + i) % VOCAB as u64) as u32, 1.0 - i as f32 * 0.05)).collect()
    };
    let density = (mix(s + 7) % 10_000) as f64 / 1e6;
    FeatureRow {
        id: j,
        density,
        max_act: max,
        mean_act: max / 3.0,
        n_fired: (density * 1e7) as u64,
        top_tokens: vec![format!(" tok{}", j % 5000), format!(" w{}", j % 777)],
        explanation: Some(format!("fires on: \" tok{}\"; promotes: \" w{}\"", j % 5000, j % 777)),
        explanation_auto: true,
        x: (mix(s + 1) % 2000) as f32 / 1000.0 - 1.0,
        y: (mix(s + 2) % 2000) as f32 / 1000.0 - 1.0,
        search_text: format!("tok{} w{} ctx{}", j % 5000, j % 777, j % 123),
        detail: StoredDetail {
            top,
            quantiles,
            hist_first: 10,
            hist: (0..30).map(|i| 1000 / (i + 1)).collect(),
            promoted: toks(11),
            suppressed: toks(22),
            neighbours: (0..10).map(|i| ((mix(s + 33 + i) % 1_000_000) as u32, 0.5 - i as f32 * 0.01)).collect(),
        },
    }
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p) as usize]
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let path = std::path::PathBuf::from(args.get(1).map(String::as_str).unwrap_or("/tmp/db_bench.sqlite"));
    let n: u32 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(100_000);
    if !path.exists() {
        let t = Instant::now();
        let info = DbInfo {
            model: "synthetic".into(),
            hook: "blocks.15.hook_resid_post".into(),
            d_sae: n,
            n_tokens: 10_000_000,
            ..Default::default()
        };
        let vocab: Vec<String> = (0..VOCAB).map(|i| format!(" tok{i}")).collect();
        let mut w = FeatureDbWriter::create(&path, &info, &hist_edges(), &vocab)?;
        use rayon::prelude::*;
        for j0 in (0..n).step_by(8192) {
            let rows: Vec<(FeatureRow, Vec<u8>)> = (j0..(j0 + 8192).min(n))
                .into_par_iter()
                .map(|j| {
                    let r = row(j);
                    let blob = zstd::bulk::compress(&serde_json::to_vec(&r.detail).unwrap(), 3).unwrap();
                    (r, blob)
                })
                .collect();
            for (r, b) in &rows {
                w.insert_raw(r, b)?;
            }
        }
        w.finish()?;
        println!("{{\"fill_features\": {n}, \"fill_secs\": {:.1}}}", t.elapsed().as_secs_f64());
    }
    let size = std::fs::metadata(&path)?.len();
    let t = Instant::now();
    let db = FeatureDb::open(&path)?;
    let open_ms = t.elapsed().as_secs_f64() * 1e3;
    let nf = db.len()? as u32;
    let t = Instant::now();
    let first = db.feature(0)?;
    let first_page_ms = t.elapsed().as_secs_f64() * 1e3; // includes loading the vocabulary once
    assert!(first.is_some());
    let mut page = Vec::new();
    for i in 0..500u64 {
        let id = (mix(i + 12345) % nf as u64) as u32;
        let t = Instant::now();
        let f = db.feature(id)?.expect("feature");
        let _ = serde_json::to_string(&f)?;
        page.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let mut list = Vec::new();
    for (i, s) in [SortBy::Density, SortBy::MaxAct, SortBy::Id].iter().enumerate() {
        let t = Instant::now();
        db.list(*s, true, 1000 * i, 50)?;
        list.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let t = Instant::now();
    let hits = db.search("tok1234", 20)?;
    let search_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let map = db.map()?;
    let map_ms = t.elapsed().as_secs_f64() * 1e3;
    println!(
        "{}",
        serde_json::json!({
            "features": nf,
            "db_bytes": size,
            "bytes_per_feature": size as f64 / nf as f64,
            "gb_per_million_features": size as f64 / nf as f64 * 1e6 / 1e9,
            "open_ms": open_ms,
            "first_page_ms_incl_vocab": first_page_ms,
            "page_ms_median": percentile(&mut page.clone(), 0.5),
            "page_ms_p99": percentile(&mut page, 0.99),
            "list_ms": list,
            "search_ms": search_ms,
            "search_hits": hits.len(),
            "map_ms": map_ms,
            "map_points": map.len(),
        })
    );
    Ok(())
}
