//! Feature statistics and the database, on synthetic codes (no model).

use saekit_analysis::analyze::{write_db, WeightInputs};
use saekit_analysis::stats::{BatchCodes, FeatureStats, StatsOptions};
use saekit_analysis::{DbInfo, FeatureDb, SortBy};
use saekit_sae::{Activation, Sae};

const SEQ: usize = 16;
const D_SAE: usize = 40;
const D: usize = 8;
const VOCAB: usize = 50;

/// Context c, token t: id = (c * 7 + t * 3) % VOCAB. Feature j fires on tokens whose id % 10 == j % 10
/// with activation (1 + j) * (1 + t) / SEQ, and feature 39 never fires.
fn batch(c0: usize, n: usize) -> (Vec<usize>, Vec<u32>, Vec<f32>) {
    let mut indptr = vec![0];
    let (mut idx, mut val) = (vec![], vec![]);
    for c in c0..c0 + n {
        for t in 0..SEQ {
            let id = (c * 7 + t * 3) % VOCAB;
            for j in 0..D_SAE - 1 {
                if id % 10 == j % 10 {
                    idx.push(j as u32);
                    val.push((1 + j) as f32 * (1 + t) as f32 / SEQ as f32 + (c % 5) as f32 * 0.01);
                }
            }
            indptr.push(idx.len());
        }
    }
    (indptr, idx, val)
}

fn tokens(c: u64) -> Vec<u32> {
    (0..SEQ).map(|t| ((c as usize * 7 + t * 3) % VOCAB) as u32).collect()
}

fn run(stats: &mut FeatureStats, c0: usize, n: usize, step: usize) {
    for s in (c0..c0 + n).step_by(step) {
        let m = step.min(c0 + n - s);
        let (indptr, idx, val) = batch(s, m);
        // position 0 of every context is a sink
        let skip: Vec<bool> = (0..m * SEQ).map(|r| r % SEQ == 0).collect();
        stats
            .update(&BatchCodes { indptr: &indptr, idx: &idx, val: &val, seq: SEQ, first_ctx: s as u64, skip: &skip })
            .unwrap();
    }
}

fn opts() -> StatsOptions {
    StatsOptions { top_k: 5, n_quantiles: 4, per_quantile: 2, before: 4, after: 2, seed: 3 }
}

#[test]
fn checkpoint_resume_gives_the_same_state_as_one_pass() {
    let mut one = FeatureStats::new(D_SAE, opts());
    run(&mut one, 0, 60, 4);
    let mut a = FeatureStats::new(D_SAE, opts());
    run(&mut a, 0, 24, 4);
    let bytes = a.to_bytes("fp");
    let mut b = FeatureStats::from_bytes(&bytes, "fp").unwrap();
    assert_eq!(a, b);
    assert!(FeatureStats::from_bytes(&bytes, "other").is_err());
    assert!(FeatureStats::from_bytes(&bytes[..bytes.len() - 3], "fp").is_err());
    run(&mut b, 24, 36, 4);
    assert_eq!(one, b);
    // batch size does not matter either
    let mut c = FeatureStats::new(D_SAE, opts());
    run(&mut c, 0, 60, 7);
    assert_eq!(one, c);
}

#[test]
fn corrupt_or_hostile_checkpoints_are_refused() {
    let mut a = FeatureStats::new(D_SAE, opts());
    run(&mut a, 0, 24, 4);
    let bytes = a.to_bytes("fp");
    // any flipped bit, counters and activations included, is caught (the old format took them)
    for i in (0..bytes.len()).step_by(7) {
        let mut b = bytes.clone();
        b[i] ^= 1 << (i % 8);
        let e = FeatureStats::from_bytes(&b, "fp").unwrap_err().to_string();
        assert!(e.contains("CRC32") || e.contains("not a saekit"), "byte {i}: {e}");
    }
    // a well-formed checksum over a header that declares 2^40 features: refused before allocating
    let mut h: Vec<u8> = b"SKANCKP2".to_vec();
    h.extend(2u64.to_le_bytes());
    h.extend(b"fp");
    let o = serde_json::to_vec(&opts()).unwrap();
    h.extend((o.len() as u64).to_le_bytes());
    h.extend(&o);
    h.extend((1u64 << 40).to_le_bytes());
    h.extend([0u8; 24]);
    let crc = crc32fast::hash(&h);
    h.extend(crc.to_le_bytes());
    let e = FeatureStats::from_bytes(&h, "fp").unwrap_err().to_string();
    assert!(e.contains("features"), "{e}");
}

#[test]
fn statistics_are_exact_where_they_can_be() {
    let mut s = FeatureStats::new(D_SAE, opts());
    run(&mut s, 0, 60, 4);
    assert_eq!(s.n_tokens, 60 * (SEQ as u64 - 1));
    let (f3, _) = s.feature(3);
    // brute force over the same events
    let (indptr, idx, val) = batch(0, 60);
    let mut n = 0;
    let mut max = 0f32;
    for r in 0..60 * SEQ {
        if r % SEQ == 0 {
            continue;
        }
        for k in indptr[r]..indptr[r + 1] {
            if idx[k] == 3 {
                n += 1;
                max = max.max(val[k]);
            }
        }
    }
    assert_eq!(f3.n, n);
    assert_eq!(f3.max, max);
    assert_eq!(f3.top.len(), 5);
    assert!(f3.top.windows(2).all(|w| w[0].act >= w[1].act));
    // one entry per context
    let mut ctxs: Vec<u64> = f3.top.iter().map(|s| s.ctx).collect();
    ctxs.sort();
    ctxs.dedup();
    assert_eq!(ctxs.len(), 5);
    assert_eq!(s.feature(39).0.n, 0);
}

fn build_db(dir: &std::path::Path) -> std::path::PathBuf {
    let mut s = FeatureStats::new(D_SAE, opts());
    run(&mut s, 0, 60, 4);
    let mut sae = Sae::init(D, D_SAE, Activation::TopK { k: 4 }, 1.0, 5);
    sae.metadata.hook_name = "blocks.3.hook_resid_post".into();
    let unembed: Vec<f32> = (0..VOCAB * D).map(|i| ((i * 13 % 17) as f32 - 8.0) / 8.0).collect();
    let vocab: Vec<String> = (0..VOCAB).map(|i| format!(" w{i}")).collect();
    let w = WeightInputs { unembed: &unembed, vocab: VOCAB, gain: None, n_logits: 3, n_neighbours: 4 };
    let info = DbInfo {
        model: "test".into(),
        hook: "blocks.3.hook_resid_post".into(),
        d_sae: D_SAE as u32,
        n_tokens: s.n_tokens,
        ..Default::default()
    };
    let out = dir.join("f.sqlite");
    write_db(&s, &sae, &w, info, &vocab, tokens, &out).unwrap();
    out
}

#[test]
fn database_round_trip_and_read_api() {
    let dir = tempfile::tempdir().unwrap();
    let path = build_db(dir.path());
    assert!(!dir.path().join("f.sqlite.tmp").exists());
    let db = FeatureDb::open(&path).unwrap();
    let info = db.info().unwrap();
    assert_eq!(info.d_sae, D_SAE as u32);
    assert_eq!(info.format, "saekit-feature-db");
    let f = db.feature(3).unwrap().unwrap();
    assert_eq!(f.top_contexts.len(), 5);
    let c = &f.top_contexts[0];
    assert_eq!(c.acts[c.peak], c.max_act);
    assert_eq!(c.tokens.len(), c.acts.len());
    assert!(c.tokens.iter().all(|t| t.starts_with(" w")));
    // the peak token has id % 10 == 3
    let peak_id: usize = c.tokens[c.peak][2..].parse().unwrap();
    assert_eq!(peak_id % 10, 3);
    assert_eq!(f.quantiles.len(), 4);
    assert!(f.quantiles.iter().all(|q| q.contexts.iter().all(|c| c.max_act >= q.lo && c.max_act <= q.hi + 1e-6)));
    assert_eq!(f.histogram.counts.iter().sum::<u64>(), f.n_fired);
    assert_eq!(f.histogram.edges.len(), f.histogram.counts.len() + 1);
    assert_eq!(f.promoted.len(), 3);
    assert_eq!(f.neighbours.len(), 4);
    assert!(f.explanation.as_deref().unwrap().starts_with("fires on:"));
    assert!(f.explanation_auto);
    assert!(db.feature(D_SAE as u32).unwrap().is_none());
    let dead = db.feature(39).unwrap().unwrap();
    assert_eq!(dead.density, 0.0);
    assert!(dead.top_contexts.is_empty());

    let by_max = db.list(SortBy::MaxAct, true, 0, 5).unwrap();
    assert_eq!(by_max[0].id, 38);
    assert!(by_max.windows(2).all(|w| w[0].max_act >= w[1].max_act));
    let page2 = db.list(SortBy::Id, false, 10, 3).unwrap();
    assert_eq!(page2.iter().map(|s| s.id).collect::<Vec<_>>(), vec![10, 11, 12]);
    assert_eq!(db.list(SortBy::Density, true, 0, 100).unwrap().len(), D_SAE);

    assert_eq!(db.search("17", 5).unwrap()[0].id, 17);
    let hits = db.search("w13", 50).unwrap();
    assert!(!hits.is_empty());
    assert!(hits.iter().any(|h| h.id % 10 == 3), "{hits:?}");
    assert!(db.search("zzzz", 5).unwrap().is_empty());
    assert!(db.search("\"(*", 5).unwrap().is_empty());

    let map = db.map().unwrap();
    assert_eq!(map.len(), D_SAE);
    assert!(map.iter().all(|p| p.x.abs() <= 1.0001 && p.y.abs() <= 1.0001));
    let json = serde_json::to_string(&f).unwrap();
    assert!(json.contains("top_contexts"));
}

#[test]
fn open_refuses_what_is_not_a_feature_db() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.sqlite");
    std::fs::write(&p, b"not sqlite at all, just some bytes that are long enough to be a header").unwrap();
    let e = FeatureDb::open(&p).err().unwrap().to_string();
    assert!(e.contains("x.sqlite"), "{e}");
    let q = dir.path().join("other.sqlite");
    rusqlite::Connection::open(&q).unwrap().execute_batch("CREATE TABLE t (a)").unwrap();
    let e = format!("{:#}", FeatureDb::open(&q).err().unwrap());
    assert!(e.contains("not a saekit feature database"), "{e}");
    assert!(FeatureDb::open(&dir.path().join("missing.sqlite")).is_err());
}

#[test]
fn a_stored_peak_outside_its_context_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = build_db(dir.path());
    let conn = rusqlite::Connection::open(&path).unwrap();
    let blob: Vec<u8> = conn.query_row("SELECT data FROM feature_detail WHERE id = 3", [], |r| r.get(0)).unwrap();
    let mut d: saekit_analysis::feature_db::StoredDetail =
        serde_json::from_slice(&zstd::stream::decode_all(&blob[..]).unwrap()).unwrap();
    d.top[0].peak = 999; // `search` and `demo` indexed tokens[peak] with this
    let blob = zstd::stream::encode_all(&serde_json::to_vec(&d).unwrap()[..], 3).unwrap();
    conn.execute("UPDATE feature_detail SET data = ?1 WHERE id = 3", [blob]).unwrap();
    drop(conn);
    let db = FeatureDb::open(&path).unwrap();
    let e = format!("{:#}", db.feature(3).unwrap_err());
    assert!(e.contains("f.sqlite") && e.contains("feature 3") && e.contains("999"), "{e}");
    assert!(db.feature(4).is_ok());
}
