//! Crash safety with real signals: `saekit harvest`, `saekit train` and `saekit analyze` are SIGKILLed at
//! seeded random moments (checkpoint writes included: analysis checkpoints after every batch, training
//! every 2 steps) and rerun until they finish; the end state must be byte-identical to an uninterrupted
//! run. Then a file-size limit (RLIMIT_FSIZE, as a full disk would) must give a clear error naming the
//! file and leave a state the next run resumes to the same bytes.
//!
//! `SAEKIT_KILLS=N` sets the kills per command (default 3; a soak uses 10 or more).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn saekit() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_saekit"));
    // f32, not `auto`: every run is compared byte for byte with a reference run, and each process would
    // measure its own pick (on AVX512-BF16 without AMX it sits near the threshold and flips under load)
    c.env("RAYON_NUM_THREADS", "2").env("SAEKIT_PRECISION", "f32").env_remove("RUST_LOG");
    c
}

fn kills() -> usize {
    std::env::var("SAEKIT_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(3)
}

fn ok(out: Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every file under `dir` (relative path, bytes), with `skip` (volatile files) left out.
fn tree(dir: &Path, skip: &[&str]) -> Vec<(PathBuf, Vec<u8>)> {
    fn walk(root: &Path, d: &Path, skip: &[&str], out: &mut Vec<(PathBuf, Vec<u8>)>) {
        let mut ents: Vec<_> = std::fs::read_dir(d).unwrap().flatten().map(|e| e.path()).collect();
        ents.sort();
        for p in ents {
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            if skip.iter().any(|s| rel.to_string_lossy().contains(s)) {
                continue;
            }
            if p.is_dir() {
                walk(root, &p, skip, out);
            } else {
                out.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    let mut out = vec![];
    walk(dir, dir, skip, &mut out);
    out
}

/// A JSON file with the keys that hold wall-clock facts (timings, rates) removed.
fn json_without(path: &Path, volatile: &[&str]) -> serde_json::Value {
    fn strip(v: &mut serde_json::Value, keys: &[&str]) {
        match v {
            serde_json::Value::Object(m) => {
                m.retain(|k, _| !keys.contains(&k.as_str()));
                m.values_mut().for_each(|c| strip(c, keys));
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(|c| strip(c, keys)),
            _ => {}
        }
    }
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    strip(&mut v, volatile);
    v
}

fn assert_same_tree(a: &Path, b: &Path, skip: &[&str], what: &str) {
    let (ta, tb) = (tree(a, skip), tree(b, skip));
    let names = |t: &[(PathBuf, Vec<u8>)]| t.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>();
    assert_eq!(names(&ta), names(&tb), "{what}: different files");
    for ((p, x), (_, y)) in ta.iter().zip(&tb) {
        assert!(x == y, "{what}: {} differs from the uninterrupted run", p.display());
    }
}

/// Run `make()` to completion, SIGKILLing it `n` times at seeded moments within `typical`
/// (the uninterrupted run's wall time); `before_restart` repairs nothing, it only decides the command
/// of the next attempt. Returns how many kills landed before the command finished on its own.
// a child that finished is reaped by `try_wait`; a killed one by `wait`
#[allow(clippy::zombie_processes)]
fn run_with_kills(
    n: usize,
    typical: Duration,
    rng: &mut ChaCha8Rng,
    mut make: impl FnMut() -> Command,
    what: &str,
) -> usize {
    let mut landed = 0;
    for _ in 0..n {
        let mut child: Child = make().stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        // each resumed run has less left to do: with many kills the moments come earlier, so that
        // most of them land before the work is done
        let scale = (2.0 / n.max(1) as f64).min(1.0);
        let wait = typical.mul_f64(rng.gen_range(0.2..0.9) * scale);
        let t0 = Instant::now();
        let mut finished = false;
        while t0.elapsed() < wait {
            if let Some(st) = child.try_wait().unwrap() {
                assert!(st.success(), "{what} failed before the kill ({st})");
                finished = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if finished {
            return landed;
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        landed += 1;
    }
    ok(make().output().unwrap(), what);
    landed
}

fn timed(mut c: Command, what: &str) -> Duration {
    let t0 = Instant::now();
    ok(c.output().unwrap(), what);
    t0.elapsed()
}

/// `cmd` under a file-size limit: writes past `bytes` fail with EFBIG (SIGXFSZ ignored), as on a full disk.
fn with_file_limit(cmd: &mut Command, bytes: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let lim = libc::rlimit { rlim_cur: bytes, rlim_max: bytes };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn disk_full_then_resume(mut cmd: Command, limit: u64, out_dir: &Path, what: &str) {
    with_file_limit(&mut cmd, limit);
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code().is_some_and(|c| c != 0),
        "{what} under a {limit}-byte file limit should exit with an error: {err}"
    );
    // the OS's words, or SQLite's when a page write was cut short
    let said = err.contains("File too large") || err.contains("database or disk is full");
    assert!(said, "{what}: the error does not say what happened: {err}");
    assert!(err.contains(&out_dir.display().to_string()), "{what}: the error should name the file: {err}");
}

#[test]
fn sigkill_sweep_and_disk_full_resume_to_identical_bytes() {
    assert!(saekit_model::default_model_path().exists(), "needs the model: scripts/fetch-model.sh");
    let n = kills();
    let mut rng =
        ChaCha8Rng::seed_from_u64(std::env::var("SAEKIT_KILL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(12));
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/mini-corpus");
    let mut tok = saekit();
    tok.arg("tokenize").arg(&corpus).arg("-o").arg(t.join("tokens"));
    tok.args(["--context", "64", "--validation-fraction", "0.25", "--max-tokens", "40k"]);
    ok(tok.output().unwrap(), "tokenize");

    // ---- harvest: shards and manifest identical (the manifest's timing facts aside)
    let harvest = |out: &Path| {
        let mut c = saekit();
        c.args(["harvest", "--hooks", "blocks.3.hook_resid_post", "--tokens", "6k", "--batch", "4"]);
        c.args(["--contexts-per-shard", "8", "--contexts"]).arg(t.join("tokens")).arg(out);
        c
    };
    let typical = timed(harvest(&t.join("acts-ref")), "harvest");
    let landed = run_with_kills(n, typical, &mut rng, || harvest(&t.join("acts")), "harvest");
    let volatile = ["extra"];
    assert_same_tree(&t.join("acts-ref"), &t.join("acts"), &["manifest.json"], "harvest");
    assert_eq!(
        json_without(&t.join("acts-ref/manifest.json"), &volatile),
        json_without(&t.join("acts/manifest.json"), &volatile),
        "harvest manifest"
    );
    println!("harvest: {landed} kills landed (typical run {typical:?})");

    // ---- train: checkpoints every 2 steps; a killed run resumes from the newest complete one
    let train = |out: &Path, resume: bool| {
        let mut c = saekit();
        c.args([
            "train",
            "--d-sae",
            "256",
            "--k",
            "8",
            "--tokens",
            "24k",
            "--batch-size",
            "512",
            "--checkpoint-every",
            "2",
        ]);
        c.args(["--log-every", "1000", "--quiet", "--acts"]).arg(t.join("acts-ref"));
        if resume {
            c.arg("--resume").arg(out);
        } else {
            c.arg("--out").arg(out);
        }
        c
    };
    let typical = timed(train(&t.join("sae-ref"), false), "train");
    let out = t.join("sae");
    let landed = run_with_kills(
        n,
        typical,
        &mut rng,
        || {
            let has_ckpt = saekit_sae::checkpoint::list(&out).map(|v| !v.is_empty()).unwrap_or(false);
            if !has_ckpt {
                std::fs::remove_dir_all(&out).ok(); // killed before the first checkpoint: nothing to resume
            }
            train(&out, has_ckpt)
        },
        "train",
    );
    for f in ["sae_weights.safetensors", "sparsity.safetensors"] {
        assert!(
            std::fs::read(t.join("sae-ref").join(f)).unwrap() == std::fs::read(out.join(f)).unwrap(),
            "train: {f} differs after {landed} kills"
        );
    }
    println!("train: {landed} kills landed (typical run {typical:?})");

    // ---- analyze: checkpoint after every batch; the database must come out the same
    let analyze = |db: &Path| {
        let mut c = saekit();
        c.arg("analyze").arg(t.join("sae-ref")).arg("--contexts").arg(t.join("tokens"));
        c.args(["--tokens", "2k", "--batch", "2", "--checkpoint-secs", "0", "--out"]).arg(db);
        // the database's creation time is its one wall-clock field: fixed, the whole file must match
        c.env("SOURCE_DATE_EPOCH", "1700000000");
        c
    };
    let typical = timed(analyze(&t.join("ref.sqlite")), "analyze");
    let landed = run_with_kills(n, typical, &mut rng, || analyze(&t.join("f.sqlite")), "analyze");
    assert!(
        std::fs::read(t.join("ref.sqlite")).unwrap() == std::fs::read(t.join("f.sqlite")).unwrap(),
        "analyze: the database differs after {landed} kills"
    );
    assert!(!t.join("f.sqlite.ckpt").exists());
    let left: Vec<_> = std::fs::read_dir(t).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(!left.iter().any(|n| n.to_string_lossy().starts_with(".f.sqlite")), "analyze left temporaries: {left:?}");
    println!("analyze: {landed} kills landed (typical run {typical:?})");

    // ---- a full disk: a clear error, then the same command finishes to the same bytes
    let acts = t.join("acts-full");
    disk_full_then_resume(harvest(&acts), 40_000, &acts, "harvest");
    ok(harvest(&acts).output().unwrap(), "harvest after the disk-full error");
    assert_same_tree(&t.join("acts-ref"), &acts, &["manifest.json"], "harvest after disk full");
    let sae = t.join("sae-full");
    disk_full_then_resume(train(&sae, false), 200_000, &sae, "train");
    let has_ckpt = saekit_sae::checkpoint::list(&sae).map(|v| !v.is_empty()).unwrap_or(false);
    if !has_ckpt {
        std::fs::remove_dir_all(&sae).ok();
    }
    ok(train(&sae, has_ckpt).output().unwrap(), "train after the disk-full error");
    assert!(
        std::fs::read(t.join("sae-ref/sae_weights.safetensors")).unwrap()
            == std::fs::read(sae.join("sae_weights.safetensors")).unwrap(),
        "train after disk full: weights differ"
    );
    let db = t.join("full.sqlite");
    // half the database, on a page boundary: the pass and its checkpoints fit, the database does not
    let limit = std::fs::metadata(t.join("ref.sqlite")).unwrap().len() / 2 / 8192 * 8192;
    disk_full_then_resume(analyze(&db), limit, &db, "analyze");
    assert!(t.join("full.sqlite.ckpt").exists(), "analyze after disk full: no checkpoint to resume from");
    ok(analyze(&db).output().unwrap(), "analyze after the disk-full error");
    assert!(
        std::fs::read(t.join("ref.sqlite")).unwrap() == std::fs::read(&db).unwrap(),
        "analyze after disk full: the database differs"
    );
}
