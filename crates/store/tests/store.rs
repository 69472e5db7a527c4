//! Activation store and reader: format round trip, statistics, crash safety (a real `kill -9` of a
//! child writer), corruption reports, and the reader's shuffle / epochs / exact resumption.

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use saekit_store::*;

const CTX: usize = 16;
const D: usize = 8;
const EOT: u32 = 0;
const BOS: u32 = 1;

fn config(dtype: Dtype, per_shard: usize) -> StoreConfig {
    StoreConfig {
        model: ModelInfo { name: "synthetic".into(), d_model: D, n_layers: 2, ..Default::default() },
        hooks: vec!["blocks.0.hook_resid_post".into(), "blocks.1.hook_resid_post".into()],
        d_model: D,
        dtype,
        context: CTX,
        contexts_per_shard: per_shard,
        bos_token: Some(BOS),
        eot_tokens: vec![EOT],
        outlier_factor: Some(10.0),
        source: SourceInfo {
            tokens: "synthetic".into(),
            split: "train".into(),
            first_context: 0,
            ..Default::default()
        },
        tokenizer_fingerprint: String::new(),
    }
}

/// Deterministic token of (context, position): every 7th is end-of-text.
fn token(c: usize, p: usize) -> u32 {
    let x = (c * CTX + p) as u32;
    if x % 7 == 3 {
        EOT
    } else {
        10 + x % 1000
    }
}

/// One attention-sink-like row away from position 0: must be marked OUTLIER.
fn is_outlier(c: usize, p: usize) -> bool {
    c == 2 && p == 5
}

/// Row value; dim 0 holds the global row id (exact in f32), the rest are small and smooth.
fn value(c: usize, p: usize, h: usize, j: usize) -> f32 {
    let row = (c * CTX + p) as f32;
    if j == 0 {
        row
    } else {
        let v = ((c * 31 + p * 7 + j * 3 + h * 11) % 97) as f32 * 0.37 - 15.0 + if p == 0 { 500.0 } else { 0.0 };
        if is_outlier(c, p) {
            v * 1000.0
        } else {
            v
        }
    }
}

fn batch(c0: usize, n: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut toks = vec![];
    let mut acts = vec![vec![], vec![]];
    for c in c0..c0 + n {
        for p in 0..CTX {
            toks.push(token(c, p));
            for (h, a) in acts.iter_mut().enumerate() {
                for j in 0..D {
                    a.push(value(c, p, h, j));
                }
            }
        }
    }
    (toks, acts)
}

fn write_store(dir: &Path, dtype: Dtype, n_ctx: usize, per_shard: usize) -> StoreManifest {
    let mut w = ActivationWriter::create_or_resume(dir, config(dtype, per_shard)).unwrap();
    let mut c = 0;
    while c < n_ctx {
        let n = 3.min(n_ctx - c);
        let (t, a) = batch(c, n);
        w.push(&t, &[&a[0], &a[1]]).unwrap();
        c += n;
    }
    w.finish().unwrap()
}

#[test]
fn round_trip_marks_and_stats() {
    let dir = tempfile::tempdir().unwrap();
    let m = write_store(dir.path(), Dtype::F32, 20, 6);
    assert_eq!(m.n_contexts, 20);
    assert_eq!(m.n_tokens, 20 * CTX as u64);
    assert_eq!(m.shards.len(), 4); // 6 + 6 + 6 + 2
    assert!(m.complete);
    let s = ActivationStore::open(dir.path()).unwrap();
    let mut row = vec![0f32; D];
    let mut n_marked = 0;
    let mut sum = [0f64; D];
    let mut sumsq = [0f64; D];
    let mut n = 0f64;
    for i in 0..s.n_shards() {
        let v = s.shard(i);
        let first = v.entry().first_context as usize;
        for r in 0..v.n_rows() {
            let (c, p) = (first + r / CTX, r % CTX);
            assert_eq!(v.tokens()[r], token(c, p));
            assert_eq!(v.positions()[r] as usize, p);
            let want = (if p == 0 { marks::POS0 } else { 0 })
                | (if token(c, p) == EOT { marks::EOT } else { 0 })
                | (if is_outlier(c, p) { marks::OUTLIER } else { 0 });
            // Position-0 rows are also far above the median norm: they may carry OUTLIER too.
            let got = if p == 0 { v.marks()[r] & !marks::OUTLIER } else { v.marks()[r] };
            assert_eq!(got, want, "context {c} position {p}");
            n_marked += (want != 0) as u64;
            v.row(1, r, &mut row);
            for (j, &x) in row.iter().enumerate() {
                assert_eq!(x, value(c, p, 1, j));
            }
            if want == 0 {
                n += 1.0;
                for j in 0..D {
                    sum[j] += row[j] as f64;
                    sumsq[j] += (row[j] as f64).powi(2);
                }
            }
        }
    }
    assert_eq!(n_marked, m.n_marked);
    let st = s.manifest().stats("blocks.1.hook_resid_post").unwrap();
    assert_eq!(st.n_rows as f64, n);
    for j in 0..D {
        let mean = sum[j] / n;
        assert!((st.mean[j] as f64 - mean).abs() < 1e-3 * mean.abs().max(1.0));
        let var = sumsq[j] / n - mean * mean;
        assert!((st.var[j] as f64 - var).abs() < 1e-3 * var.max(1.0), "{j}: {} vs {var}", st.var[j]);
    }
    assert!(st.marked_mean_norm > st.mean_norm, "position-0 rows carry the large norm");
    assert!((st.norm_scale() - (D as f64 / st.mean_sq_norm).sqrt()).abs() < 1e-12);
}

#[test]
fn bf16_and_f16_rounding() {
    for dtype in [Dtype::Bf16, Dtype::F16] {
        let dir = tempfile::tempdir().unwrap();
        write_store(dir.path(), dtype, 4, 4);
        let s = ActivationStore::open(dir.path()).unwrap();
        let mut row = vec![0f32; D];
        s.shard(0).row(0, 5, &mut row);
        for (j, &x) in row.iter().enumerate().skip(1) {
            let want = value(0, 5, 0, j);
            assert!((x - want).abs() <= want.abs() / 128.0, "{dtype}: {x} vs {want}");
        }
        assert_eq!(s.manifest().shards[0].bytes % 64, 0);
    }
}

#[test]
fn corrupt_and_truncated_shards_are_reported_by_name() {
    let dir = tempfile::tempdir().unwrap();
    write_store(dir.path(), Dtype::Bf16, 12, 4);
    let p = dir.path().join("shard-000001.bin");
    let mut b = std::fs::read(&p).unwrap();
    let k = b.len() - 100;
    b[k] ^= 0x40;
    std::fs::write(&p, &b).unwrap();
    let e = format!("{:#}", ActivationStore::open(dir.path()).err().unwrap());
    assert!(e.contains("shard-000001.bin") && e.contains("corrupt"), "{e}");
    // Without verification the size check still passes; a truncated shard fails either way.
    ActivationStore::open_with(dir.path(), &OpenOptions { verify: false }).unwrap();
    std::fs::write(&p, &b[..b.len() - 64]).unwrap();
    let e = format!("{:#}", ActivationStore::open_with(dir.path(), &OpenOptions { verify: false }).err().unwrap());
    assert!(e.contains("shard-000001.bin") && e.contains("truncated"), "{e}");
}

#[test]
fn manifest_arithmetic_and_names_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    write_store(dir.path(), Dtype::F32, 8, 4);
    let mpath = dir.path().join("manifest.json");
    let orig: serde_json::Value = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
    type Edit = (&'static str, fn(&mut serde_json::Value));
    let edits: [Edit; 5] = [
        // n_rows * d_model * 4 overflows: the old layout wrapped, then sliced out of bounds
        ("overflows", |m| {
            m["shards"][0]["n_rows"] = (1u64 << 62).into();
            m["shards"][0]["n_contexts"] = (1u64 << 58).into();
            m["contexts_per_shard"] = (1u64 << 58).into();
        }),
        ("overflows", |m| m["d_model"] = (1u64 << 61).into()),
        ("not a shard-* file", |m| m["shards"][0]["file"] = "../../etc/passwd".into()),
        ("contexts", |m| m["n_contexts"] = 9.into()),
        ("statistics", |m| m["d_model"] = (D as u64 + 1).into()),
    ];
    for (needle, edit) in edits {
        let mut m = orig.clone();
        edit(&mut m);
        std::fs::write(&mpath, m.to_string()).unwrap();
        let e = format!("{:#}", ActivationStore::open(dir.path()).err().unwrap());
        assert!(e.contains("manifest.json") && e.contains(needle), "{needle}: {e}");
    }
}

#[test]
fn resume_refuses_a_different_config_and_cleans_orphans() {
    let dir = tempfile::tempdir().unwrap();
    write_store(dir.path(), Dtype::Bf16, 8, 4);
    let e = ActivationWriter::create_or_resume(dir.path(), config(Dtype::F32, 4)).err().unwrap();
    assert!(format!("{e:#}").contains("different configuration"));
    // A shard renamed just before a crash (not yet in the manifest) and a stray temporary file.
    std::fs::write(dir.path().join("shard-000002.bin"), b"partial").unwrap();
    std::fs::write(dir.path().join("shard-000003.bin.tmp"), b"partial").unwrap();
    let w = ActivationWriter::create_or_resume(dir.path(), config(Dtype::Bf16, 4)).unwrap();
    assert_eq!(w.contexts_done(), 8);
    assert!(!dir.path().join("shard-000002.bin").exists());
    assert!(!dir.path().join("shard-000003.bin.tmp").exists());
}

#[test]
fn a_new_store_refuses_a_folder_that_holds_other_files() {
    let dir = tempfile::tempdir().unwrap();
    // someone else's files, one of them named like a shard: neither may be deleted
    std::fs::write(dir.path().join("shard-000000.bin"), b"not ours").unwrap();
    std::fs::write(dir.path().join("paper.tex"), b"not ours").unwrap();
    let e = format!("{:#}", ActivationWriter::create_or_resume(dir.path(), config(Dtype::Bf16, 4)).err().unwrap());
    assert!(e.contains("refusing") && e.contains("paper.tex") && e.contains("shard-000000.bin"), "{e}");
    assert_eq!(std::fs::read(dir.path().join("shard-000000.bin")).unwrap(), b"not ours");
    let e = format!("{:#}", remove_store(dir.path()).err().unwrap());
    assert!(e.contains("paper.tex"), "{e}");
    assert!(dir.path().join("shard-000000.bin").exists());
}

#[test]
fn a_resume_verifies_every_listed_shard_before_appending() {
    let dir = tempfile::tempdir().unwrap();
    write_store(dir.path(), Dtype::Bf16, 8, 4);
    let p = dir.path().join("shard-000000.bin");
    let mut b = std::fs::read(&p).unwrap();
    let n = b.len();
    b[n / 2] ^= 0x10; // same size, other content
    std::fs::write(&p, &b).unwrap();
    let e = format!("{:#}", ActivationWriter::create_or_resume(dir.path(), config(Dtype::Bf16, 4)).err().unwrap());
    assert!(e.contains("shard-000000.bin") && e.contains("crc32"), "{e}");
    std::fs::remove_file(&p).unwrap();
    let e = format!("{:#}", ActivationWriter::create_or_resume(dir.path(), config(Dtype::Bf16, 4)).err().unwrap());
    assert!(e.contains("shard-000000.bin") && e.contains("missing"), "{e}");
}

#[test]
fn disk_full_leaves_the_store_consistent_and_resumable() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = ActivationWriter::create_or_resume(dir.path(), config(Dtype::Bf16, 4)).unwrap();
    let (t, a) = batch(0, 4);
    w.push(&t, &[&a[0], &a[1]]).unwrap();
    w.fail_after_bytes = Some(1000);
    let (t, a) = batch(4, 4);
    let e = format!("{:#}", w.push(&t, &[&a[0], &a[1]]).err().unwrap());
    assert!(e.contains("No space left on device") && e.contains("unchanged"), "{e}");
    assert_eq!(w.contexts_done(), 4);
    let names: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(!names.iter().any(|n| n.ends_with(".tmp")), "{names:?}");
    let s = ActivationStore::open(dir.path()).unwrap();
    assert_eq!(s.manifest().n_contexts, 4);
    drop(s);
    // Space freed: the buffered contexts are written on the next flush.
    w.fail_after_bytes = None;
    let m = w.finish().unwrap();
    assert_eq!(m.n_contexts, 8);
    ActivationStore::open(dir.path()).unwrap();
}

#[test]
fn unwritable_output_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let e =
        format!("{:#}", ActivationWriter::create_or_resume(&file.join("out"), config(Dtype::Bf16, 4)).err().unwrap());
    assert!(e.contains("cannot create output directory"), "{e}");
}

// ---------------------------------------------------------------------------- kill -9

const KILL_CTX: usize = 240;

/// Child half of `kill_minus_9_at_any_moment_resumes_exactly`: does nothing unless the parent set the env var.
#[test]
fn kill9_child_writer() {
    let Ok(dir) = std::env::var("SAEKIT_STORE_KILL_CHILD") else { return };
    let dir = Path::new(&dir);
    let mut w = ActivationWriter::create_or_resume(dir, config(Dtype::Bf16, 8)).unwrap();
    let mut c = w.contexts_done() as usize;
    while c < KILL_CTX {
        let n = 3.min(KILL_CTX - c);
        let (t, a) = batch(c, n);
        w.push(&t, &[&a[0], &a[1]]).unwrap();
        c += n;
        std::thread::sleep(Duration::from_micros(300));
    }
    w.finish().unwrap();
}

#[test]
fn kill_minus_9_at_any_moment_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut kills = 0;
    for attempt in 0..200 {
        let mut child = Command::new(&exe)
            .args(["--exact", "kill9_child_writer", "--test-threads=1", "--nocapture"])
            .env("SAEKIT_STORE_KILL_CHILD", dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_micros(rng.gen_range(2_000..25_000)));
        match child.try_wait().unwrap() {
            Some(status) => {
                assert!(status.success(), "child writer failed on attempt {attempt}");
                break;
            }
            None => {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                kills += 1;
                // Between kills the directory must always open as a consistent store.
                if dir.path().join("manifest.json").exists() {
                    let s = ActivationStore::open(dir.path()).unwrap();
                    assert_eq!(s.manifest().n_contexts % 8, 0);
                }
            }
        }
    }
    assert!(kills >= 3, "only {kills} kills landed; the test did not exercise anything");
    let s = ActivationStore::open(dir.path()).unwrap();
    let m = s.manifest();
    assert!(m.complete);
    assert_eq!(m.n_contexts, KILL_CTX as u64);
    let mut rows = 0;
    let mut row = vec![0f32; D];
    for i in 0..s.n_shards() {
        let v = s.shard(i);
        assert_eq!(v.entry().first_context, i as u64 * 8);
        for r in 0..v.n_rows() {
            let c = v.entry().first_context as usize + r / CTX;
            let p = r % CTX;
            assert_eq!(v.tokens()[r], token(c, p));
            v.row(0, r, &mut row);
            rows += 1;
            for (j, &x) in row.iter().enumerate() {
                assert_eq!(x, half::bf16::from_f32(value(c, p, 0, j)).to_f32());
            }
        }
    }
    assert_eq!(rows, KILL_CTX * CTX);
    // Statistics equal those of an uninterrupted run.
    let dir2 = tempfile::tempdir().unwrap();
    let clean = write_store(dir2.path(), Dtype::Bf16, KILL_CTX, 8);
    assert_eq!(m.stats, clean.stats);
    eprintln!("{kills} kills, store intact");
}

// ---------------------------------------------------------------------------- reader

fn read_ids(r: &mut ActivationReader, batches: usize) -> Vec<u64> {
    let d = r.d_model();
    let mut out = vec![0f32; r.batch_tokens() * d];
    let mut ids = vec![];
    for _ in 0..batches {
        r.next_batch(&mut out).unwrap();
        ids.extend(out.chunks_exact(d).map(|row| row[0] as u64));
    }
    ids
}

#[test]
fn reader_epochs_cover_every_kept_row_once() {
    let dir = tempfile::tempdir().unwrap();
    write_store(dir.path(), Dtype::F32, 30, 4);
    let s = ActivationStore::open(dir.path()).unwrap();
    let opts = ReaderOptions {
        hook: "blocks.0.hook_resid_post".into(),
        batch_tokens: 10,
        seed: 3,
        shuffle_buffer: 100,
        ..Default::default()
    };
    let mut r = ActivationReader::new(&s, opts.clone(), None).unwrap();
    let per_epoch = r.rows_per_epoch() as usize;
    let kept: HashSet<u64> = (0..30 * CTX)
        .filter(|&x| x % CTX != 0 && token(x / CTX, x % CTX) != EOT && !is_outlier(x / CTX, x % CTX))
        .map(|x| x as u64)
        .collect();
    assert_eq!(per_epoch, kept.len());
    let ids = read_ids(&mut r, per_epoch * 2 / 10 + 1);
    let e0: HashSet<u64> = ids[..per_epoch].iter().copied().collect();
    let e1: HashSet<u64> = ids[per_epoch..2 * per_epoch].iter().copied().collect();
    assert_eq!(e0, kept);
    assert_eq!(e1, kept);
    assert_ne!(ids[..per_epoch], ids[per_epoch..2 * per_epoch], "each epoch has its own order");
    assert_eq!(r.epoch(), 2);
    // Shuffled: not in store order.
    let sorted = {
        let mut v = ids[..per_epoch].to_vec();
        v.sort();
        v
    };
    assert_ne!(ids[..per_epoch], sorted[..]);
    // Same seed, same order; another seed, another order.
    let again = read_ids(&mut ActivationReader::new(&s, opts.clone(), None).unwrap(), 5);
    assert_eq!(again, ids[..50]);
    let other = read_ids(&mut ActivationReader::new(&s, ReaderOptions { seed: 4, ..opts.clone() }, None).unwrap(), 5);
    assert_ne!(other, ids[..50]);
}

#[test]
fn reader_sequential_and_unskipped() {
    let dir = tempfile::tempdir().unwrap();
    write_store(dir.path(), Dtype::F32, 6, 4);
    let s = ActivationStore::open(dir.path()).unwrap();
    let opts = ReaderOptions {
        hook: "blocks.1.hook_resid_post".into(),
        batch_tokens: 16,
        shuffle: false,
        skip_marked: false,
        ..Default::default()
    };
    let mut r = ActivationReader::new(&s, opts, None).unwrap();
    let ids = read_ids(&mut r, 6);
    assert_eq!(ids, (0..96).collect::<Vec<u64>>());
    // The last batch was rows 80..96: context 5, shard 1 (4 contexts per shard), rows 16..32.
    let rows = r.last_batch_rows();
    assert_eq!(rows.len(), 16);
    let (sh, row) = rows[3];
    assert_eq!((sh, row), (1, 19));
    assert_eq!(s.shard(sh as usize).tokens()[row as usize], token(5, 3));
    let e = ActivationReader::new(&s, ReaderOptions::default(), None).err().unwrap();
    assert!(format!("{e:#}").contains("several hooks"));
}

#[test]
fn reader_cursor_resumes_exactly_across_epochs() {
    let dir = tempfile::tempdir().unwrap();
    write_store(dir.path(), Dtype::Bf16, 25, 3);
    let s = ActivationStore::open(dir.path()).unwrap();
    let opts = ReaderOptions {
        hook: "blocks.0.hook_resid_post".into(),
        batch_tokens: 37,
        seed: 11,
        shuffle_buffer: 64,
        ..Default::default()
    };
    let mut full = ActivationReader::new(&s, opts.clone(), None).unwrap();
    let mut out = vec![0f32; 37 * D];
    let mut want = vec![];
    let mut cursors = vec![];
    for _ in 0..40 {
        cursors.push(full.cursor());
        full.next_batch(&mut out).unwrap();
        want.push(out.clone());
    }
    assert!(full.epoch() >= 3);
    for k in [0, 1, 9, 17, 33] {
        let c = cursors[k].clone();
        let json = serde_json::to_string(&c).unwrap();
        let c: ReaderCursor = serde_json::from_str(&json).unwrap();
        let mut r = ActivationReader::new(&s, opts.clone(), Some(c)).unwrap();
        for w in &want[k..] {
            r.next_batch(&mut out).unwrap();
            assert_eq!(&out, w);
        }
    }
    let e = ActivationReader::new(&s, ReaderOptions { seed: 12, ..opts }, Some(cursors[3].clone())).err().unwrap();
    assert!(format!("{e:#}").contains("cursor"));
}
