//! Time `nearest_neighbours` on N random decoder directions (d = 576) and measure recall@10 of the
//! approximate (IVF) path against brute force on 200 queries.
//!
//! cargo run --release -p saekit-analysis --example neighbours_bench -- 1000000

use std::time::Instant;

use saekit_analysis::geometry::nearest_neighbours;

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(200_000);
    let d = 576;
    let mut state = 0x1234_5678_9abc_def0u64;
    let mut rnd = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f32 / (1u64 << 53) as f32 - 0.5
    };
    // features clustered around 2,000 random centres, as real decoders are far from isotropic
    let centres: Vec<f32> = (0..2000 * d).map(|_| rnd()).collect();
    let w: Vec<f32> = (0..n)
        .flat_map(|i| {
            let c = (i * 7919) % 2000;
            (0..d).map(|j| centres[c * d + j] + 0.6 * rnd()).collect::<Vec<_>>()
        })
        .collect();
    let t = Instant::now();
    let (nn, method) = nearest_neighbours(&w, d, 10);
    let secs = t.elapsed().as_secs_f64();
    let norm = |r: &[f32]| r.iter().map(|x| x * x).sum::<f32>().sqrt();
    let mut hit = 0usize;
    let q = 200.min(n);
    for s in 0..q {
        let i = (s * 104_729) % n;
        let a = &w[i * d..(i + 1) * d];
        let na = norm(a);
        let mut all: Vec<(usize, f32)> = (0..n)
            .filter(|&j| j != i)
            .map(|j| {
                let b = &w[j * d..(j + 1) * d];
                (j, a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>() / (na * norm(b)))
            })
            .collect();
        all.sort_by(|x, y| y.1.total_cmp(&x.1));
        let truth: Vec<usize> = all[..10].iter().map(|x| x.0).collect();
        hit += nn[i].iter().filter(|(j, _)| truth.contains(&(*j as usize))).count();
    }
    println!(
        "{}",
        serde_json::json!({"features": n, "secs": secs, "method": method, "recall_at_10": hit as f64 / (q * 10) as f64})
    );
}
