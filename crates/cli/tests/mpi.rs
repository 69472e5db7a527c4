//! `mpirun -np N saekit train` against the one-process run, with real processes over Open MPI
//! (`cargo test -p saekit --features mpi --test mpi`; needs `mpirun` on the PATH).
//!
//! - One step: every layout (2 shards; 2 replicas; 2 shards x 2 replicas) selects the same active
//!   latents on every row as one process, and its gradients (assembled from each rank's slice)
//!   are within 1e-6 relative of the one-process gradients, for every architecture that runs
//!   across processes. Each process dumps its first step (`SAEKIT_DEBUG_DUMP_STEP`).
//! - The MPI meter (training_summary.json): bytes sent per step as the layout's shapes imply.
//! - A short run: the SAE rank 0 gathers into one SAELens folder has its FVU on the whole data
//!   (computed here by `saekit_sae::evaluate`) within 1% of the one-process run's.
//! - `train --live` on 2 shards ends with the one-process live run's weights; on 2 data replicas
//!   (and 2 x 2) each replica forwards its own shuffle blocks, none twice, with the one-process
//!   preparation and budget and its final FVU within 1%; a killed live replica run resumes to the
//!   unkilled weights (one process refuses its checkpoint).
//! - Harvest on the real model: 2 and 3 ranks write the one-process store, shard for shard and byte
//!   for byte (the manifest's timing record aside); a rank killed mid-harvest ends the job, and the
//!   same `mpirun` resumes it to those bytes.
//! - Two "hosts": two network namespaces joined by a veth pair, made by the test, with a hostfile, an
//!   rsh agent that enters the other namespace (as ssh would reach the other machine) and Open MPI's
//!   TCP transport between them: training ends with the weights of the same job on one host, and a
//!   harvest writes the one-process store.
//! - Analyze on the real model: 2 and 3 ranks write a database whose every feature has the one-process
//!   density, maximum, firing count, histogram and top contexts (the mean within f32 rounding).
//! - A rank that stops answering without dying (SIGSTOP) ends the job after `SAEKIT_MPI_TIMEOUT`,
//!   with a message, instead of holding the other ranks forever.
#![cfg(feature = "mpi")]

use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

const D_IN: usize = 16;
const ROWS: usize = 4096;

/// Rows that are sparse mixtures of 128 random directions (4 per row, exponential weights).
fn write_data(dir: &Path) -> (PathBuf, Vec<f32>) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let atoms: Vec<f32> = (0..128 * D_IN).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    let mut x = vec![0.0f32; ROWS * D_IN];
    for row in x.chunks_mut(D_IN) {
        for _ in 0..4 {
            let (j, w) = (rng.gen_range(0..128), -rng.gen::<f32>().max(1e-6).ln());
            for (v, a) in row.iter_mut().zip(&atoms[j * D_IN..(j + 1) * D_IN]) {
                *v += w * a;
            }
        }
        for v in row.iter_mut() {
            *v += 0.05 * rng.gen_range(-1.0f32..1.0);
        }
    }
    let path = dir.join("acts.npy");
    saekit_sae::source::write_npy_f32(&path, &x, ROWS, D_IN).expect("writing acts.npy");
    (path, x)
}

/// Run `saekit train` (under `mpirun -np ranks` when ranks > 0), insist it succeeds, return its stderr.
fn train(ranks: usize, args: &[&str], dump: Option<&Path>) -> String {
    let bin = env!("CARGO_BIN_EXE_saekit");
    let mut cmd = Command::new("timeout");
    cmd.arg("120");
    if ranks > 0 {
        cmd.args(["mpirun", "--oversubscribe", "-np", &ranks.to_string()]);
    }
    cmd.arg(bin).args(["train", "--quiet", "--threads", "1"]).args(args);
    cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    if let Some(d) = dump {
        cmd.env("SAEKIT_DEBUG_DUMP_STEP", d);
    }
    let out = cmd.output().expect("running saekit train (is mpirun installed?)");
    assert!(out.status.success(), "{cmd:?} failed ({}):\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// One step's dump, assembled over the ranks into the one-process shapes.
struct Step {
    active: Vec<Vec<u32>>,
    grads: Vec<(String, Vec<f64>)>,
}

fn read_step(dir: &Path, d_sae: usize) -> Step {
    let mut active = vec![Vec::new(); 256];
    let names = ["w_enc", "w_dec", "b_enc", "b_dec", "threshold"];
    let mut grads: Vec<(String, Vec<f64>)> = names.iter().map(|n| (n.to_string(), Vec::new())).collect();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    for f in files {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
        let range = |k: &str| (v[k][0].as_u64().unwrap() as usize, v[k][1].as_u64().unwrap() as usize);
        let ((l0, l1), (r0, _)) = (range("latents"), range("rows"));
        for (i, row) in v["active"].as_array().unwrap().iter().enumerate() {
            active[r0 + i].extend(row.as_array().unwrap().iter().map(|j| j.as_u64().unwrap() as u32));
        }
        for (name, whole) in grads.iter_mut() {
            let part: Vec<f64> = v[name.as_str()].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
            // latent-major tensors are put in place; b_dec (replicated) is taken once
            let per_latent = part.len() / (l1 - l0).max(1);
            if name == "b_dec" || part.is_empty() {
                if whole.is_empty() {
                    *whole = part;
                }
                continue;
            }
            whole.resize(d_sae * per_latent, f64::NAN);
            whole[l0 * per_latent..l1 * per_latent].copy_from_slice(&part);
        }
    }
    for row in active.iter_mut() {
        row.sort_unstable();
        row.dedup();
    }
    Step { active, grads }
}

fn relative_error(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let diff: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt();
    let norm: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    diff / norm.max(1e-30)
}

/// The architectures that run across processes, with flags that engage their extra terms
/// (AuxK on dead latents from the first step, Multi-TopK, BatchTopK's batch-wide threshold with
/// rows recomputed in full when a shard holds fewer latents than 4k candidates, JumpReLU's
/// pre-activation loss).
const ARCHS: [(&str, &[&str]); 5] = [
    ("topk-auxk", &["--arch", "topk", "--k", "4", "--dead-tokens", "0"]),
    ("topk-multi", &["--arch", "topk", "--k", "4", "--multi-topk"]),
    ("batchtopk", &["--arch", "batchtopk", "--k", "4"]),
    ("relu", &["--arch", "relu"]),
    ("jumprelu", &["--arch", "jumprelu", "--dead-tokens", "0"]),
];

/// (label, ranks, extra flags): 2 shards; 2 replicas of 1 shard; 2 shards x 2 replicas.
const LAYOUTS: [(&str, usize, &[&str]); 3] =
    [("2 shards", 2, &[]), ("2 replicas", 2, &["--shards", "1"]), ("2x2", 4, &["--shards", "2"])];

#[test]
fn one_step_on_any_layout_equals_the_one_process_step() {
    pin_f32();
    let tmp = tempfile::tempdir().unwrap();
    let (acts, _) = write_data(tmp.path());
    let acts = acts.display().to_string();
    for (arch, flags) in ARCHS {
        let base = [&["--acts", &acts, "--d-sae", "64", "--tokens", "256", "--batch-size", "256"][..], flags].concat();
        let run = |label: &str, ranks: usize, extra: &[&str]| {
            let (out, dump) =
                (tmp.path().join(format!("{arch}-{label}")), tmp.path().join(format!("{arch}-{label}-dump")));
            let out_s = out.display().to_string();
            train(ranks, &[&base[..], extra, &["--out", &out_s]].concat(), Some(&dump));
            read_step(&dump, 64)
        };
        let one = run("one", 0, &[]);
        assert!(one.active.iter().any(|r| !r.is_empty()), "{arch}: no latent fired in the one-process step");
        for (label, ranks, extra) in LAYOUTS {
            let many = run(label, ranks, extra);
            assert_eq!(many.active, one.active, "{arch} on {label}: other active latents than one process");
            for ((name, got), (_, want)) in many.grads.iter().zip(&one.grads) {
                let err = relative_error(got, want);
                assert!(err <= 1e-6, "{arch} on {label}: gradient of {name} off by {err:e} (relative)");
            }
        }
    }
}

#[test]
fn a_short_sharded_run_reaches_the_one_process_fvu() {
    pin_f32();
    let tmp = tempfile::tempdir().unwrap();
    let (acts, x) = write_data(tmp.path());
    let acts = acts.display().to_string();
    for (arch, flags) in [ARCHS[0], ARCHS[2], ARCHS[3]] {
        let base =
            [&["--acts", &acts, "--d-sae", "64", "--tokens", "32768", "--batch-size", "256"][..], flags].concat();
        let fvu = |label: &str, ranks: usize, extra: &[&str]| {
            let out = tmp.path().join(format!("{arch}-{label}"));
            train(ranks, &[&base[..], extra, &["--out", &out.display().to_string()]].concat(), None);
            let sae = saekit_sae::load_sae(&out).expect("loading the gathered SAE");
            assert_eq!(sae.d_sae, 64, "{arch} on {label}: the output folder holds {} latents", sae.d_sae);
            saekit_sae::evaluate(&sae, &x).fvu
        };
        let one = fvu("one", 0, &[]);
        for (label, ranks, extra) in [LAYOUTS[0], LAYOUTS[2]] {
            let many = fvu(label, ranks, extra);
            assert!((many - one).abs() <= 0.01 * one, "{arch} on {label}: FVU {many} vs {one} in one process");
        }
    }
}

/// The MPI meter in training_summary.json: the payload bytes each step hands to MPI are what the
/// layout implies, counted here from the shapes: with 2 latent shards one all-reduce of the partial
/// reconstructions (batch x d_in f32), one all-gather of each row's k candidates (index u32 + value
/// f32, after the part's i32 length) and one all-reduce of b_dec's gradient (d_in f32); with 2
/// replicas the dense gradient all-reduce (W_enc, W_dec, b_enc, b_dec), the firing counts (d_sae
/// u32) and the batch mean (d_in f32). The rest are a few scalars (loss sums, row counts, the stop
/// flag), under 128 bytes a step. One process writes no meter. The SAE is gathered to rank 0 in
/// messages of 100 values (`SAEKIT_MPI_GATHER_CHUNK`: the path of a matrix over 2 GiB) and ends
/// with the one-process weights.
#[test]
fn the_mpi_meter_counts_the_bytes_the_layout_implies() {
    pin_f32();
    let tmp = tempfile::tempdir().unwrap();
    let (acts, _) = write_data(tmp.path());
    let (batch, d_sae, k) = (256usize, 64usize, 4usize);
    let base = ["--acts", &acts.display().to_string(), "--d-sae", "64", "--k", "4", "--tokens", "8192"]
        .map(str::to_string)
        .to_vec();
    let summary = |label: &str, ranks: usize, extra: &[&str]| -> Value {
        let out = tmp.path().join(label);
        let args = [&base.iter().map(String::as_str).collect::<Vec<_>>()[..], extra].concat();
        let flags = ["--batch-size", "256", "--checkpoint-every", "0", "--out", &out.display().to_string()];
        let mut cmd = saekit_job(ranks);
        cmd.args(["train", "--quiet", "--threads", "1"]).args(&args).args(flags);
        cmd.env("SAEKIT_MPI_GATHER_CHUNK", "100");
        succeeds(cmd);
        serde_json::from_str(&std::fs::read_to_string(out.join("training_summary.json")).unwrap()).unwrap()
    };
    assert!(summary("one", 0, &[]).get("mpi").is_none(), "one process wrote an MPI meter");
    let shards = D_IN * batch * 4 + (4 + batch * k * 8) + D_IN * 4;
    let replicas = (2 * d_sae * D_IN + d_sae + D_IN) * 4 + d_sae * 4 + D_IN * 4;
    for (label, extra, want) in [("shards", &[][..], shards), ("replicas", &["--shards", "1"][..], replicas)] {
        let m = &summary(label, 2, extra)["mpi"];
        let got = m["bytes_sent_per_step"].as_f64().unwrap();
        assert!(
            got >= want as f64 && got <= (want + 128) as f64,
            "2 {label}: {got} bytes sent per step, the layout implies {want} (+ < 128 of scalars): {m}"
        );
        let share = m["share_of_wall"].as_f64().unwrap();
        assert!(share > 0.0 && share < 1.0, "2 {label}: share of wall time in MPI {share}: {m}");
        assert!(m["calls_per_step"].as_f64().unwrap() >= 3.0, "2 {label}: {m}");
        let peaks = m["peak_rss_bytes_per_rank"].as_array().unwrap();
        assert_eq!(peaks.len(), 2, "2 {label}: one peak per rank: {m}");
        assert!(peaks.iter().all(|p| p.as_u64().unwrap() > 1 << 20), "2 {label}: {m}");
    }
    let w_dec = |label: &str| -> Vec<f64> {
        let sae = saekit_sae::load_sae(tmp.path().join(label)).expect("loading the SAE");
        sae.params.w_dec.iter().map(|&v| v as f64).collect()
    };
    let e = relative_error(&w_dec("shards"), &w_dec("one"));
    assert!(e < 1e-3, "W_dec gathered in chunks from 2 shards is {e} (relative) from the one-process W_dec");
}

#[test]
fn a_checkpoint_resumes_on_another_layout() {
    pin_f32();
    let tmp = tempfile::tempdir().unwrap();
    let (acts, x) = write_data(tmp.path());
    let acts = acts.display().to_string();
    let flags = topk_run(&acts, "16384", "32");
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let eval = |out: &Path| saekit_sae::evaluate(&saekit_sae::load_sae(out).expect("loading the SAE"), &x).fvu;
    // (first layout, the layout that resumes its step-32 checkpoint): sharded -> one process, and back
    for (first, then) in [(2usize, 0usize), (0, 2)] {
        let straight = tmp.path().join(format!("straight-{first}"));
        train(first, &[&flags[..], &["--out", &straight.display().to_string()]].concat(), None);
        let files = saekit_files_in(&straight.join("checkpoints/step_000000032"));
        let want: &[&str] = if first == 2 {
            // one slice per shard, state.json listing them
            &["state.json", "state.latents-000000000.safetensors", "state.latents-000000032.safetensors"]
        } else {
            &["state.json", "state.safetensors"]
        };
        assert_eq!(files, want, "ranks {first}: the checkpoint's files");
        let resumed = tmp.path().join(format!("resumed-{first}-{then}"));
        let copied = Command::new("cp").arg("-r").arg(&straight).arg(&resumed).status().unwrap();
        assert!(copied.success());
        std::fs::remove_file(resumed.join("sae_weights.safetensors")).unwrap();
        let log = train(then, &["--resume", &resumed.display().to_string()], None);
        assert!(log.contains("(step 32)"), "ranks {first} -> {then}: did not resume at step 32:\n{log}");
        let (a, b) = (eval(&straight), eval(&resumed));
        assert!((a - b).abs() <= 0.01 * a, "ranks {first} -> {then}: resumed FVU {b} vs {a} straight");
    }
}

#[test]
fn a_killed_rank_ends_the_job_and_resume_reaches_the_unkilled_end() {
    pin_f32();
    let tmp = tempfile::tempdir().unwrap();
    let (acts, _) = write_data(tmp.path());
    let acts = acts.display().to_string();
    let flags = topk_run(&acts, "1048576", "256");
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let (straight, killed) = (tmp.path().join("straight"), tmp.path().join("killed"));
    train(2, &[&flags[..], &["--out", &straight.display().to_string()]].concat(), None);

    let mut job = saekit_job(2);
    job.args(["train", "--quiet", "--threads", "1"]).args(&flags).arg("--out").arg(&killed);
    kill_a_rank_after_a_checkpoint(job, &killed);
    train(2, &["--resume", &killed.display().to_string()], None);
    let weights = |dir: &Path| std::fs::read(dir.join("sae_weights.safetensors")).unwrap();
    assert!(weights(&killed) == weights(&straight), "the resumed run ended elsewhere than the unkilled one");
}

/// Start the mpirun `job` (under `timeout` or not), SIGKILL one of its ranks once `out` holds a
/// finished checkpoint, and return the job's stderr, insisting that the job then ended (no hang),
/// failed, said why, and wrote no SAE.
fn kill_a_rank_after_a_checkpoint(mut job: Command, out: &Path) -> String {
    let mut job = job.stderr(std::process::Stdio::piped()).spawn().expect("starting mpirun");
    let waited = |what: &str, done: &mut dyn FnMut() -> bool| {
        let t0 = std::time::Instant::now();
        while !done() {
            assert!(t0.elapsed().as_secs() < 60, "no {what} within 60 s");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    // a checkpoint folder is renamed into place once its state.json is written
    let finished = |e: std::fs::DirEntry| !e.file_name().to_string_lossy().ends_with(".tmp");
    waited("checkpoint", &mut || std::fs::read_dir(out.join("checkpoints")).is_ok_and(|d| d.flatten().any(finished)));
    let rank = a_rank_of(job.id());
    assert!(Command::new("kill").args(["-9", &rank]).status().unwrap().success());
    let mut status = None;
    waited("end of the job after SIGKILL (a hang)", &mut || {
        status = job.try_wait().unwrap();
        status.is_some()
    });
    let mut log = String::new();
    std::io::Read::read_to_string(&mut job.stderr.take().unwrap(), &mut log).unwrap();
    assert!(!status.unwrap().success(), "the job succeeded although a rank was killed");
    assert!(log.contains("signal 9"), "mpirun did not say why the job ended:\n{log}");
    assert!(!out.join("sae_weights.safetensors").exists(), "the rank was killed after the run ended");
    log
}

/// A rank of the job started as process `pid`: the newest process at the bottom of its tree
/// (`timeout` -> `mpirun` -> the ranks).
fn a_rank_of(pid: u32) -> String {
    let mut pid = pid.to_string();
    loop {
        let out = Command::new("pgrep").args(["-P", &pid]).output().unwrap();
        match String::from_utf8_lossy(&out.stdout).lines().last() {
            Some(child) => pid = child.to_string(),
            None => return pid,
        }
    }
}

#[test]
fn a_stopped_rank_ends_the_job_after_the_collective_timeout() {
    pin_f32();
    let tmp = tempfile::tempdir().unwrap();
    let (acts, _) = write_data(tmp.path());
    let flags = topk_run(&acts.display().to_string(), "4194304", "1000000");
    let bin = env!("CARGO_BIN_EXE_saekit");
    let mut job = Command::new("mpirun")
        .args(["--oversubscribe", "-np", "2", bin, "train", "--quiet", "--threads", "1"])
        .args(&flags)
        .arg("--out")
        .arg(tmp.path().join("sae"))
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("SAEKIT_MPI_TIMEOUT", "3")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting mpirun");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let ranks = Command::new("pgrep").args(["-P", &job.id().to_string()]).output().unwrap();
    let rank = String::from_utf8_lossy(&ranks.stdout).lines().last().expect("a rank of the job").to_string();
    // SIGSTOP: the process lives on but answers nothing, as on a hung machine
    assert!(Command::new("kill").args(["-STOP", &rank]).status().unwrap().success());
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(status) = job.try_wait().unwrap() {
            break status;
        }
        if t0.elapsed().as_secs() > 60 {
            let _ = Command::new("kill").args(["-9", &rank]).status();
            let _ = job.kill();
            panic!("the job still waits 60 s after a rank stopped (a hang)");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let _ = Command::new("kill").args(["-9", &rank]).status();
    let mut log = String::new();
    std::io::Read::read_to_string(&mut job.stderr.take().unwrap(), &mut log).unwrap();
    assert!(!status.success(), "the job succeeded although a rank stopped:\n{log}");
    assert!(log.contains("waited over 3 s in an all-"), "no rank said why the job ended:\n{log}");
}

fn saekit_files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

/// The flags of a TopK run (64 latents, k 4, batches of 256) of `tokens` on `acts`, with a
/// checkpoint every `every` steps.
fn topk_run(acts: &str, tokens: &str, every: &str) -> Vec<String> {
    let flags =
        ["--acts", acts, "--arch", "topk", "--d-sae", "64", "--k", "4", "--tokens", tokens, "--batch-size", "256"];
    flags.iter().chain(&["--checkpoint-every", every]).map(|f| f.to_string()).collect()
}

/// `saekit` under `mpirun -np ranks` (as root too; each line of output tagged `[1,R]<stderr>:` with
/// its rank R), or alone when ranks is 0; ended after 180 s (`SAEKIT_TEST_TIMEOUT` seconds on a
/// slower or busy machine).
fn saekit_job(ranks: usize) -> Command {
    let mut cmd = timed_job();
    if ranks > 0 {
        cmd.args(["mpirun", "--oversubscribe", "--tag-output", "-np", &ranks.to_string()]);
    }
    cmd.arg(env!("CARGO_BIN_EXE_saekit"));
    cmd
}

/// `timeout` (180 s, or `SAEKIT_TEST_TIMEOUT`) with the environment every job here runs in.
fn timed_job() -> Command {
    let mut cmd = Command::new("timeout");
    cmd.arg(std::env::var("SAEKIT_TEST_TIMEOUT").unwrap_or_else(|_| "180".into()));
    cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    cmd.env("RAYON_NUM_THREADS", "1").env_remove("RUST_LOG");
    cmd
}

/// `mpirun` with one rank per entry of `ranks`, each running `saekit` with its own arguments (an
/// MPMD job: `-np 1 saekit ARGS : -np 1 saekit ARGS ...`), as [`saekit_job`] runs it otherwise.
fn mpmd_job(ranks: &[Vec<&str>]) -> Command {
    let mut cmd = timed_job();
    cmd.args(["mpirun", "--oversubscribe", "--tag-output"]);
    for (i, args) in ranks.iter().enumerate() {
        if i > 0 {
            cmd.arg(":");
        }
        cmd.args(["-np", "1", env!("CARGO_BIN_EXE_saekit")]).args(args);
    }
    cmd
}

/// Run `cmd`, insist it succeeds, return its stderr.
fn succeeds(mut cmd: Command) -> String {
    let out = cmd.output().expect("running saekit (is mpirun installed?)");
    assert!(out.status.success(), "{cmd:?} failed ({}):\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Tokenized mini-corpus contexts of 64 tokens.
fn tokens(dir: &Path) -> PathBuf {
    assert!(saekit_model::default_model_path().exists(), "needs the model: scripts/fetch-model.sh");
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/mini-corpus");
    let out = dir.join("tokens");
    let mut cmd = saekit_job(0);
    cmd.arg("tokenize").arg(&corpus).arg("-o").arg(&out);
    cmd.args(["--context", "64", "--validation-fraction", "0.25", "--max-tokens", "40k"]);
    succeeds(cmd);
    out
}

/// The mini corpus's tokens and a train config for `--live` runs: the read-ahead that fixes the
/// input scale has no flag, and reads 512 rows instead of 65,536 to forward.
fn live_inputs(dir: &Path) -> (PathBuf, PathBuf) {
    let config = dir.join("live.toml");
    std::fs::write(&config, "norm_estimate_rows = 512\n").unwrap();
    (tokens(dir), config)
}

/// `saekit train --live` at blocks.2 (64 latents, k 4, batches of 256, 4 contexts a forward) on the
/// `(tokens, config)` of [`live_inputs`], under `ranks` ranks.
fn live_train(ranks: usize, (tokens, config): (&Path, &Path), out: &Path, extra: &[&str]) -> Command {
    let mut cmd = saekit_job(ranks);
    cmd.args(["train", "--live", "--quiet", "--threads", "1", "--hook-name", "blocks.2.hook_resid_post"]);
    cmd.args(["--live-batch", "4", "--d-sae", "64", "--k", "4", "--batch-size", "256"]);
    cmd.arg("--config").arg(config).arg("--contexts").arg(tokens).arg("--out").arg(out).args(extra);
    cmd
}

/// W_enc and W_dec of the SAE in `b` are within `tol` (relative) of those in `a`.
fn assert_weights_close(a: &Path, b: &Path, tol: f64, what: &str) {
    let (a, b) = (saekit_sae::load_sae(a).unwrap(), saekit_sae::load_sae(b).unwrap());
    assert_eq!(b.d_sae, a.d_sae);
    for (name, x, y) in [("W_enc", &a.params.w_enc, &b.params.w_enc), ("W_dec", &a.params.w_dec, &b.params.w_dec)] {
        let (x, y): (Vec<f64>, Vec<f64>) =
            (x.iter().map(|&v| v as f64).collect(), y.iter().map(|&v| v as f64).collect());
        let e = relative_error(&y, &x);
        assert!(e < tol, "{name} of {what} is {e} (relative) from the other run's");
    }
}

fn summary(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("training_summary.json")).unwrap()).unwrap()
}

/// `train --live` with 2 latent shards: both ranks forward the same contexts, so the sharded run
/// trains on the one-process live run's rows and ends with its weights (within f32 rounding of the
/// sharded sums, compounded over the steps) and its final FVU.
#[test]
fn a_live_run_on_two_shards_ends_with_the_one_process_weights() {
    pin_f32();
    let tmp = tempfile::tempdir().unwrap();
    let (tokens, config) = live_inputs(tmp.path());
    let flags = ["--live-block-tokens", "512", "--tokens", "2048", "--checkpoint-every", "0"];
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    succeeds(live_train(0, (&tokens, &config), &one, &flags));
    succeeds(live_train(2, (&tokens, &config), &two, &flags));
    assert_weights_close(&one, &two, 1e-3, "the 2-shard live run");
    let fvu = |d: &Path| summary(d)["final_on_first_rows"]["fvu"].as_f64().unwrap();
    let (f1, f2) = (fvu(&one), fvu(&two));
    assert!((f1 - f2).abs() <= 0.01 * f1, "final FVU {f2} on 2 shards vs {f1} in one process");
}

/// Epoch-0 shuffle blocks the live source of rank `rank` forwarded, from its debug log (mpirun's
/// `[1,R]<stderr>:` tags; a line without one is the one process's).
fn forwarded_blocks(log: &str, rank: usize) -> BTreeSet<u64> {
    let parse = |line: &str| -> Option<(usize, u64, u64)> {
        let who = match line.strip_prefix('[') {
            Some(tag) => tag.split(']').next()?.split(',').nth(1)?.parse().ok()?,
            None => 0,
        };
        let (block, rest) = line.split("live block ").nth(1)?.split_once(" of epoch ")?;
        Some((who, block.parse().ok()?, rest.split(':').next()?.parse().ok()?))
    };
    log.lines().filter_map(parse).filter(|&(who, _, epoch)| who == rank && epoch == 0).map(|(_, b, _)| b).collect()
}

/// `train --live` on 2 data replicas (`--shards 1`) against one process on the same contexts and
/// budget: each replica forwards its own shuffle blocks (mpirun's rank tags on the live source's
/// log: no block twice, together blocks 0..n as many as one process forwards give or take one a
/// replica), rank 0's preparation is the one-process one (both read it from block 0), the budget
/// is spent exactly, and the final FVU is within 1%. On 2 shards x 2 replicas the ranks of a
/// replica forward its blocks, so that run ends with the 2-replica run's weights.
#[test]
fn a_live_run_on_data_replicas_forwards_each_block_once_and_reaches_the_one_process_fvu() {
    pin_f32();
    let tmp = tempfile::tempdir().unwrap();
    let (tokens, config) = live_inputs(tmp.path());
    let flags = ["--live-block-tokens", "1024", "--tokens", "8192", "--checkpoint-every", "0"];
    let run = |label: &str, ranks: usize, extra: &[&str]| -> (Value, String) {
        let out = tmp.path().join(label);
        let mut cmd = live_train(ranks, (&tokens, &config), &out, &[&flags[..], extra].concat());
        cmd.env("RUST_LOG", "saekit=info,saekit_store::live=debug");
        let log = succeeds(cmd);
        (summary(&out), log)
    };
    let (one, one_log) = run("one", 0, &[]);
    let (two, two_log) = run("replicas", 2, &["--shards", "1"]);
    for (label, s) in [("one process", &one), ("2 replicas", &two)] {
        assert_eq!((s["steps"].as_u64(), s["tokens"].as_u64()), (Some(32), Some(8192)), "{label}: {s}");
    }
    for key in ["input_scale", "outlier_max_norm_raw"] {
        assert_eq!(two[key], one[key], "{key}: rank 0 prepared other values than one process");
    }
    let alone = forwarded_blocks(&one_log, 0);
    let (r0, r1) = (forwarded_blocks(&two_log, 0), forwarded_blocks(&two_log, 1));
    assert!(r0.iter().all(|b| b % 2 == 0) && r1.iter().all(|b| b % 2 == 1), "replica blocks {r0:?} / {r1:?}");
    let both: BTreeSet<u64> = r0.union(&r1).copied().collect();
    assert_eq!(both.len(), r0.len() + r1.len(), "a block forwarded by both replicas");
    assert_eq!(both, (0..both.len() as u64).collect(), "the replicas' blocks leave gaps: {r0:?} / {r1:?}");
    assert!(both.len().abs_diff(alone.len()) <= 2, "2 replicas forwarded {both:?}, one process {alone:?}");
    let fvu = |s: &Value| s["final_on_first_rows"]["fvu"].as_f64().unwrap();
    assert_eq!(one["final_on_first_rows"]["rows"], two["final_on_first_rows"]["rows"]);
    let (f1, f2) = (fvu(&one), fvu(&two));
    assert!((f2 - f1).abs() <= 0.01 * f1, "final FVU {f2} on 2 replicas vs {f1} in one process");

    let (grid, grid_log) = run("2x2", 4, &["--shards", "2"]);
    for (rank, want) in [(0, &r0), (1, &r0), (2, &r1), (3, &r1)] {
        assert_eq!(&forwarded_blocks(&grid_log, rank), want, "2x2: rank {rank} forwarded other blocks");
    }
    let f4 = fvu(&grid);
    assert!((f4 - f1).abs() <= 0.01 * f1, "final FVU {f4} on 2 shards x 2 replicas vs {f1} in one process");
    assert_weights_close(&tmp.path().join("replicas"), &tmp.path().join("2x2"), 1e-3, "the 2x2 live run");
}

/// A live run on 2 data replicas, killed after a checkpoint, resumes under the same layout to the
/// unkilled run's weights byte for byte: each replica continues its own blocks from its own position,
/// all recorded in the checkpoint. One process, which cannot replay two replicas' streams, refuses it.
#[test]
fn a_killed_live_run_on_data_replicas_resumes_to_the_unkilled_weights() {
    pin_f32();
    let tmp = tempfile::tempdir().unwrap();
    let (tokens, config) = live_inputs(tmp.path());
    let flags = ["--live-block-tokens", "1024", "--tokens", "8192", "--checkpoint-every", "4", "--shards", "1"];
    let (straight, killed) = (tmp.path().join("straight"), tmp.path().join("killed"));
    succeeds(live_train(2, (&tokens, &config), &straight, &flags));
    kill_a_rank_after_a_checkpoint(live_train(2, (&tokens, &config), &killed, &flags), &killed);
    let newest = saekit_files_in(&killed.join("checkpoints")).into_iter().rfind(|n| !n.ends_with(".tmp")).unwrap();
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(killed.join("checkpoints").join(newest).join("state.json")).unwrap(),
    )
    .unwrap();
    let replicas = state["replicas"].as_array().expect("each replica's position in state.json");
    let block = |r: &Value| r["cursor"]["live"]["block"].as_u64().unwrap();
    assert_eq!((replicas.len(), block(&replicas[0]) % 2, block(&replicas[1]) % 2), (2, 0, 1), "{state}");
    assert_eq!(replicas[0]["cursor"], state["cursor"]);

    let resume = |ranks: usize| {
        let mut cmd = saekit_job(ranks);
        cmd.args(["train", "--quiet", "--threads", "1", "--shards", "1", "--resume"]).arg(&killed);
        cmd
    };
    let alone = resume(0).output().unwrap();
    let err = String::from_utf8_lossy(&alone.stderr);
    assert!(
        !alone.status.success() && err.contains("2 data replicas that each forward"),
        "one process resumed:\n{err}"
    );
    succeeds(resume(2));
    let weights = |dir: &Path| std::fs::read(dir.join("sae_weights.safetensors")).unwrap();
    assert!(weights(&killed) == weights(&straight), "the resumed live run ended elsewhere than the unkilled one");
}

/// `harvest` of `hooks`, `n` tokens in shards of 7 contexts (of 64 tokens), under `ranks` ranks.
fn harvest(ranks: usize, hooks: &str, n: &str, tokens: &Path, out: &Path) -> Command {
    let mut cmd = saekit_job(ranks);
    cmd.args(["harvest", "--hooks", hooks, "--tokens", n, "--batch", "4", "--contexts-per-shard", "7"]);
    cmd.arg("--contexts").arg(tokens).arg(out);
    cmd
}

/// Two hooks, 94 contexts: 14 shards, the last one short.
const SMALL: (&str, &str) = ("blocks.2.hook_resid_post,blocks.1.ln2.hook_normalized", "6k");
/// 125 contexts through 9 blocks: long enough to kill a rank part way.
const LONG: (&str, &str) = ("blocks.8.hook_resid_post", "8k");

/// Every file of a store folder (name, bytes), the manifest without its timing record.
fn store_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    saekit_files_in(dir)
        .into_iter()
        .map(|name| {
            let path = dir.join(&name);
            assert!(path.is_file(), "{} is left in the store", path.display());
            let mut bytes = std::fs::read(&path).unwrap();
            if name == "manifest.json" {
                let mut m: Value = serde_json::from_slice(&bytes).unwrap();
                m.as_object_mut().unwrap().remove("extra");
                bytes = serde_json::to_vec_pretty(&m).unwrap();
            }
            (name, bytes)
        })
        .collect()
}

#[test]
fn a_harvest_across_ranks_writes_the_one_process_store() {
    pin_f32();
    let tmp = tempfile::tempdir().unwrap();
    let tokens = tokens(tmp.path());
    let alone = tmp.path().join("alone");
    succeeds(harvest(0, SMALL.0, SMALL.1, &tokens, &alone));
    let expected = store_files(&alone);
    assert_eq!(expected.iter().filter(|(n, _)| n.starts_with("shard-")).count(), 14, "94 contexts in shards of 7");
    for ranks in [2, 3] {
        let out = tmp.path().join(format!("ranks-{ranks}"));
        succeeds(harvest(ranks, SMALL.0, SMALL.1, &tokens, &out));
        let got = store_files(&out);
        assert_eq!(got.len(), expected.len(), "{ranks} ranks wrote other files");
        for ((name, a), (_, b)) in expected.iter().zip(&got) {
            assert!(a == b, "{name} differs between 1 process and {ranks} ranks");
        }
        // a second run finds the finished store and changes nothing
        succeeds(harvest(ranks, SMALL.0, SMALL.1, &tokens, &out));
        assert!(store_files(&out) == got, "rerunning a finished harvest changed it");
    }
}

#[test]
fn a_killed_harvest_rank_ends_the_job_and_the_same_mpirun_resumes_it() {
    pin_f32();
    let tmp = tempfile::tempdir().unwrap();
    let tokens = tokens(tmp.path());
    let alone = tmp.path().join("alone");
    succeeds(harvest(0, LONG.0, LONG.1, &tokens, &alone));
    let out = tmp.path().join("killed");
    let mut job = harvest(2, LONG.0, LONG.1, &tokens, &out)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting mpirun");
    let part = out.join(".harvest-rank-1-of-2");
    let t0 = std::time::Instant::now();
    // a shard of rank 1 on disk, then kill it while it works on the next
    while !part.join("shard-000000.bin").exists() {
        assert!(t0.elapsed().as_secs() < 90, "rank 1 wrote no shard within 90 s");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let rank = a_rank_of(job.id());
    assert!(Command::new("kill").args(["-9", &rank]).status().unwrap().success());
    let status = job.wait().unwrap();
    let mut log = String::new();
    std::io::Read::read_to_string(&mut job.stderr.take().unwrap(), &mut log).unwrap();
    assert!(!status.success(), "the job succeeded although a rank was killed:\n{log}");
    assert!(!out.join("manifest.json").exists(), "the store was joined although a rank was killed");

    assert!(!store_files(&alone).is_empty() && out.join(".harvest-rank-1-of-2").exists(), "the parts were not kept");
    succeeds(harvest(2, LONG.0, LONG.1, &tokens, &out));
    assert!(store_files(&out) == store_files(&alone), "the resumed harvest differs from the one-process store");
}

/// Two network namespaces, `10.77.0.1` and `10.77.0.2` on the two ends of a veth pair, removed on drop.
struct TwoHosts {
    names: [String; 2],
    hostfile: PathBuf,
    agent: PathBuf,
}

impl TwoHosts {
    /// `None` (after saying why) where this process may not make network namespaces.
    fn new(dir: &Path) -> Option<TwoHosts> {
        let id = std::process::id() % 100_000;
        let names = [format!("saekit-{id}-a"), format!("saekit-{id}-b")];
        let made = Command::new("ip").args(["netns", "add", &names[0]]).output();
        match made {
            Ok(out) if out.status.success() => {}
            Ok(out) if String::from_utf8_lossy(&out.stderr).contains("ermission") => {
                eprintln!("SKIPPED: no permission to make network namespaces (needs root with CAP_SYS_ADMIN)");
                return None;
            }
            Ok(out) => panic!("ip netns add: {}", String::from_utf8_lossy(&out.stderr)),
            Err(e) => panic!("running `ip` (iproute2): {e}"),
        }
        let hosts = TwoHosts { names, hostfile: dir.join("hostfile"), agent: dir.join("rsh-agent") };
        let (a, b) = (&hosts.names[0], &hosts.names[1]);
        let (va, vb) = (format!("sk{id}a"), format!("sk{id}b"));
        let steps: [&[&str]; 8] = [
            &["netns", "add", b],
            &["link", "add", &va, "netns", a, "type", "veth", "peer", "name", &vb, "netns", b],
            &["-n", a, "addr", "add", "10.77.0.1/24", "dev", &va],
            &["-n", b, "addr", "add", "10.77.0.2/24", "dev", &vb],
            &["-n", a, "link", "set", &va, "up"],
            &["-n", b, "link", "set", &vb, "up"],
            &["-n", a, "link", "set", "lo", "up"],
            &["-n", b, "link", "set", "lo", "up"],
        ];
        for step in steps {
            let out = Command::new("ip").args(step).output().unwrap();
            assert!(out.status.success(), "ip {step:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::fs::write(&hosts.hostfile, "10.77.0.1 slots=1\n10.77.0.2 slots=1\n").unwrap();
        let agent = format!(
            "#!/bin/sh\n# mpirun's ssh: run the command on the \"host\" that owns the address\nhost=$1; shift\n\
             case $host in 10.77.0.1) ns={a} ;; 10.77.0.2) ns={b} ;; *) echo \"unknown host $host\" >&2; exit 1 ;; esac\n\
             exec ip netns exec $ns sh -c \"$*\"\n"
        );
        std::fs::write(&hosts.agent, agent).unwrap();
        let chmod = Command::new("chmod").arg("+x").arg(&hosts.agent).status().unwrap();
        assert!(chmod.success());
        Some(hosts)
    }

    /// `saekit` with one rank on each host, launched from the first over TCP.
    fn saekit(&self) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.names[0], "timeout", "180", "mpirun", "-np", "2", "--hostfile"]);
        cmd.arg(&self.hostfile).args(["--mca", "plm_rsh_agent"]).arg(&self.agent);
        cmd.args(["--mca", "btl", "tcp,self", "--mca", "btl_tcp_if_include", "10.77.0.0/24"]);
        cmd.args(["--mca", "oob_tcp_if_include", "10.77.0.0/24", env!("CARGO_BIN_EXE_saekit")]);
        cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
        cmd.env("RAYON_NUM_THREADS", "1").env_remove("RUST_LOG");
        cmd
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

#[test]
fn two_hosts_over_tcp_train_and_harvest_as_one_host_does() {
    pin_f32();
    let tmp = tempfile::tempdir().unwrap();
    let Some(hosts) = TwoHosts::new(tmp.path()) else { return };
    let (acts, _) = write_data(tmp.path());
    let flags = topk_run(&acts.display().to_string(), "65536", "1000000");
    let one_host = tmp.path().join("one-host");
    train(
        2,
        &[flags.iter().map(String::as_str).collect::<Vec<_>>(), vec!["--out", &one_host.display().to_string()]]
            .concat(),
        None,
    );
    let two_hosts = tmp.path().join("two-hosts");
    let mut cmd = hosts.saekit();
    cmd.args(["train", "--quiet", "--threads", "1"]).args(&flags).arg("--out").arg(&two_hosts);
    succeeds(cmd);
    let weights = |dir: &Path| std::fs::read(dir.join("sae_weights.safetensors")).unwrap();
    assert!(weights(&one_host) == weights(&two_hosts), "two hosts trained other weights than one host");

    let tokens = tokens(tmp.path());
    let alone = tmp.path().join("alone");
    succeeds(harvest(0, SMALL.0, SMALL.1, &tokens, &alone));
    let harvested = tmp.path().join("harvested");
    let mut cmd = hosts.saekit();
    cmd.args(["harvest", "--hooks", SMALL.0, "--tokens", SMALL.1, "--batch", "4", "--contexts-per-shard", "7"]);
    cmd.arg("--contexts").arg(&tokens).arg(&harvested);
    succeeds(cmd);
    assert!(store_files(&harvested) == store_files(&alone), "a harvest on two hosts differs from one process's");
}

#[test]
fn an_analysis_across_ranks_finds_the_one_process_statistics() {
    pin_f32();
    let tmp = tempfile::tempdir().unwrap();
    let tokens = tokens(tmp.path());
    let acts = tmp.path().join("acts");
    succeeds(harvest(0, "blocks.2.hook_resid_post", "6k", &tokens, &acts));
    let sae = tmp.path().join("sae");
    let mut cmd = saekit_job(0);
    cmd.args(["train", "--quiet", "--d-sae", "256", "--k", "8", "--tokens", "24k", "--batch-size", "512"]);
    cmd.arg("--acts").arg(&acts).arg("--out").arg(&sae);
    succeeds(cmd);
    let analyze = |ranks: usize, db: &Path| {
        let mut cmd = saekit_job(ranks);
        cmd.arg("analyze").arg(&sae).arg("--contexts").arg(&tokens);
        cmd.args(["--tokens", "3k", "--batch", "2", "--out"]).arg(db).env("SOURCE_DATE_EPOCH", "1700000000");
        succeeds(cmd);
        saekit_analysis::FeatureDb::open(db).unwrap()
    };
    let alone = analyze(0, &tmp.path().join("alone.sqlite"));
    for ranks in [2, 3] {
        let db = tmp.path().join(format!("ranks-{ranks}.sqlite"));
        let shared = analyze(ranks, &db);
        let mut fired = 0;
        for id in 0..256 {
            let (a, b) = (alone.feature(id).unwrap().unwrap(), shared.feature(id).unwrap().unwrap());
            let what = format!("feature {id} with {ranks} ranks");
            assert_eq!((a.density, a.max_act, a.n_fired), (b.density, b.max_act, b.n_fired), "{what}");
            assert!((a.mean_act - b.mean_act).abs() <= 1e-6 * a.mean_act.abs(), "{what}: mean activation");
            let hist = |r: &saekit_analysis::FeatureRecord| serde_json::to_string(&r.histogram).unwrap();
            let top = |r: &saekit_analysis::FeatureRecord| serde_json::to_string(&r.top_contexts).unwrap();
            assert_eq!(hist(&a), hist(&b), "{what}: histogram");
            assert_eq!(top(&a), top(&b), "{what}: top contexts");
            assert_eq!(a.quantiles.is_empty(), b.quantiles.is_empty(), "{what}: quantile groups");
            fired += (a.n_fired > 0) as usize;
        }
        assert!(fired > 100, "only {fired} features fired: the check is too weak");
        let left: Vec<String> = saekit_files_in(tmp.path()).into_iter().filter(|n| n.contains(".ckpt")).collect();
        assert!(left.is_empty(), "checkpoints left after {ranks} ranks: {left:?}");
    }
}

/// Ranks asked for different precisions (an MPMD job: rank 0 `bf16-reference`, the portable bf16
/// path any CPU runs, rank 1 `f32`; as two `auto` ranks may measure differently) train in rank 0's:
/// the summary says bf16, and the 2-shard weights are those of the one-process bf16 run within the
/// shards' f32 rounding, far closer to it than the one-process f32 run's are (which the old
/// per-rank precision would have mixed in).
#[test]
fn ranks_asked_for_different_precisions_train_in_rank_0s() {
    let tmp = tempfile::tempdir().unwrap();
    let (acts, _) = write_data(tmp.path());
    let acts = acts.display().to_string();
    let base = ["--acts", &acts, "--arch", "topk", "--d-sae", "64", "--k", "4", "--tokens", "16384"];
    let base = [&base[..], &["--batch-size", "256", "--checkpoint-every", "0", "--quiet", "--threads", "1"]].concat();
    let run = |label: &str, precision: &str| -> PathBuf {
        let out = tmp.path().join(label);
        let mut cmd = saekit_job(0);
        cmd.arg("train").args(&base).args(["--precision", precision]).arg("--out").arg(&out);
        succeeds(cmd);
        out
    };
    let (one_bf16, one_f32) = (run("one-bf16", "bf16-reference"), run("one-f32", "f32"));
    let mixed = tmp.path().join("mixed");
    let out = mixed.display().to_string();
    // rank 0 asks for bf16-reference, rank 1 for f32
    let ranks: Vec<Vec<&str>> = ["bf16-reference", "f32"]
        .iter()
        .map(|&p| [&["train"][..], &base[..], &["--precision", p, "--out", out.as_str()]].concat())
        .collect();
    succeeds(mpmd_job(&ranks));
    assert_eq!(summary(&mixed)["precision"], "bf16", "the job's recorded precision");
    assert_eq!(summary(&mixed)["bf16_path"], "bf16-reference", "the job's recorded bf16 path");
    let w_enc = |dir: &Path| -> Vec<f64> {
        saekit_sae::load_sae(dir).expect("loading the SAE").params.w_enc.iter().map(|&v| v as f64).collect()
    };
    let (to_bf16, f32_to_bf16) =
        (relative_error(&w_enc(&mixed), &w_enc(&one_bf16)), relative_error(&w_enc(&one_f32), &w_enc(&one_bf16)));
    eprintln!("W_enc from the one-process bf16 run: 2-rank job {to_bf16:e}, one-process f32 run {f32_to_bf16:e}");
    assert!(
        to_bf16 < f32_to_bf16 / 20.0,
        "the 2-rank job is {to_bf16:e} from the bf16 run (the f32 run: {f32_to_bf16:e})"
    );
}

/// Every run here is checked bit for bit against one process in f32; the CLI's `auto` would pick bf16 on
/// an AMX box. `mpirun` passes the environment to its local ranks.
fn pin_f32() {
    std::env::set_var("SAEKIT_PRECISION", "f32");
}
