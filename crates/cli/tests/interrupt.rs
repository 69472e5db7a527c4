//! Ctrl-C with a real signal to a real `saekit train` process: it finishes the batch in flight, writes a
//! checkpoint, exits 130 naming the resume command, and `--resume` continues from that step. A real
//! `saekit tokenize` stops reading, writes nothing, exits 130, and its rerun equals an uninterrupted run.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const D: usize = 64;

fn write_acts(path: &Path, rows: usize) {
    // deterministic, varied rows (no rand dependency needed)
    let x: Vec<f32> = (0..rows * D).map(|i| ((i as u64 * 2654435761 % 1000) as f32 / 500.0) - 1.0).collect();
    saekit_sae::source::write_npy_f32(path, &x, rows, D).unwrap();
}

/// Start `saekit train`, wait until it has logged a step, send `signal`, and return (status, stderr).
fn train_and_signal(args: &[&str], metrics: &Path, signal: &str) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_saekit"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start saekit train");
    let lines = || std::fs::read_to_string(metrics).map(|s| s.lines().count()).unwrap_or(0);
    let before = lines();
    let t0 = Instant::now();
    while lines() <= before {
        assert!(t0.elapsed() < Duration::from_secs(120), "training logged no step in 120 s");
        assert!(child.try_wait().unwrap().is_none(), "training ended before the signal");
        std::thread::sleep(Duration::from_millis(20));
    }
    let kill = Command::new("kill").args([signal, &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    (child.wait().unwrap().code(), err)
}

fn step_of(stderr: &str) -> u64 {
    let tail = stderr.split("stopped after step ").nth(1).unwrap_or_else(|| panic!("no step in: {stderr}"));
    tail.split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn sigint_and_sigterm_checkpoint_and_exit_130_with_the_resume_command() {
    let t = tempfile::tempdir().unwrap();
    let acts = t.path().join("x.npy");
    write_acts(&acts, 20_000);
    let out = t.path().join("sae");
    let out_s = out.to_str().unwrap();
    let metrics = out.join("metrics.jsonl");
    // far more steps than the test waits for; no periodic checkpoint, so only the signal writes one
    let args = [
        "train",
        "--acts",
        acts.to_str().unwrap(),
        "--d-sae",
        "512",
        "--k",
        "8",
        "--batch-size",
        "256",
        "--tokens",
        "1G",
        "--log-every",
        "2",
        "--checkpoint-every",
        "1000000000",
        "--quiet",
        "--out",
        out_s,
    ];
    let (code, err) = train_and_signal(&args, &metrics, "-INT");
    assert_eq!(code, Some(130), "{err}");
    assert!(err.contains(&format!("resume with: saekit train --resume {out_s}")), "{err}");
    let s1 = step_of(&err);
    let cks = saekit_sae::checkpoint::list(&out).unwrap();
    assert_eq!(cks.len(), 1, "{cks:?}");
    assert!(cks[0].ends_with(format!("step_{s1:09}")), "{cks:?} vs step {s1}");
    // the run continues from that checkpoint, and SIGTERM stops it the same way
    let (code, err) = train_and_signal(&["train", "--resume", out_s, "--quiet"], &metrics, "-TERM");
    assert_eq!(code, Some(130), "{err}");
    assert!(step_of(&err) > s1, "{err}");
    assert!(!out.join("sae_weights.safetensors").exists(), "an interrupted run writes no final SAE");
}

/// Every file under `dir` (relative name, bytes), sorted.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap())
        })
        .collect();
    out.sort();
    out
}

#[test]
fn sigint_stops_tokenize_before_it_writes_and_a_rerun_matches_an_uninterrupted_run() {
    assert!(saekit_model::default_model_path().exists(), "needs the model: scripts/fetch-model.sh");
    let t = tempfile::tempdir().unwrap();
    let docs: Vec<String> = (0..400)
        .map(|i| format!("{{\"text\": \"Document {i}: the {} fox jumps over {} lazy dogs.\"}}\n", i * 7 % 13, i % 5))
        .collect();
    let corpus = t.path().join("corpus.jsonl");
    // the interrupted run reads a named pipe at the corpus's path: the test decides when documents arrive
    let c = std::ffi::CString::new(corpus.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    let tokenize = |out: &Path| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_saekit"));
        cmd.arg("tokenize").arg(&corpus).arg("-o").arg(out).args(["--context", "16", "--validation-fraction", "0.2"]);
        cmd
    };
    let out = t.path().join("tokens");
    let mut child = tokenize(&out).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    {
        use std::io::Write;
        // opening blocks until tokenize opens the pipe (after loading the model)
        let mut pipe = std::fs::OpenOptions::new().write(true).open(&corpus).unwrap();
        pipe.write_all(docs[..100].concat().as_bytes()).unwrap();
        pipe.flush().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let kill = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
        assert!(kill.success());
        std::thread::sleep(Duration::from_millis(300));
        // the next document meets the stop flag; tokenize exits and the pipe may break under us
        let _ = pipe.write_all(docs[100..].concat().as_bytes());
    }
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(130), "{err}");
    assert!(err.contains("nothing was written to") && err.contains("resume with: "), "{err}");
    assert!(err.contains(&format!("tokenize {}", corpus.display())), "the resume command is the same command: {err}");
    assert!(
        files(&out).is_empty(),
        "an interrupted tokenize left files: {:?}",
        files(&out).iter().map(|f| &f.0).collect::<Vec<_>>()
    );

    // the same path as a plain file: the rerun and an uninterrupted run write the same bytes
    std::fs::remove_file(&corpus).unwrap();
    std::fs::write(&corpus, docs.concat()).unwrap();
    for dir in [&out, &t.path().join("ref")] {
        let o = tokenize(dir).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let (a, b) = (files(&out), files(&t.path().join("ref")));
    assert!(a.iter().any(|f| f.0 == "manifest.json"), "{:?}", a.iter().map(|f| &f.0).collect::<Vec<_>>());
    assert_eq!(a.iter().map(|f| &f.0).collect::<Vec<_>>(), b.iter().map(|f| &f.0).collect::<Vec<_>>());
    for (x, y) in a.iter().zip(&b) {
        assert!(x.1 == y.1, "{} differs from the uninterrupted run", x.0);
    }
}

/// `--live`'s keys (contexts, split, shuffle blocks) sit in the config file beside the trainer's; a
/// run interrupted by SIGINT resumes from its checkpoint alone (no flags, no config: the checkpoint
/// keeps the live source's keys) and ends with the bytes of an uninterrupted run.
#[test]
fn a_live_run_from_a_config_file_resumes_from_its_checkpoint_alone() {
    assert!(saekit_model::default_model_path().exists(), "needs the model: scripts/fetch-model.sh");
    let t = tempfile::tempdir().unwrap();
    let docs: Vec<String> = (0..300)
        .map(|i| format!("{{\"text\": \"Note {i}: {} red kites circled over {} quiet hills.\"}}\n", i * 11 % 17, i % 7))
        .collect();
    let corpus = t.path().join("corpus.jsonl");
    std::fs::write(&corpus, docs.concat()).unwrap();
    let tokens = t.path().join("tokens");
    let o = Command::new(env!("CARGO_BIN_EXE_saekit"))
        .arg("tokenize")
        .arg(&corpus)
        .arg("-o")
        .arg(&tokens)
        .args(["--context", "16", "--validation-fraction", "0.1"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let config = t.path().join("live.toml");
    let toml = format!(
        "live = true\ncontexts = {:?}\nsplit = \"train\"\nlive_batch = 4\nlive_block_tokens = 256\n\
         hook_name = \"blocks.3.hook_resid_post\"\nd_sae = 256\nk = 8\nbatch_size = 64\ntokens = 8192\n\
         norm_estimate_rows = 256\nlog_every = 1\ncheckpoint_every = 1000000\nprecision = \"f32\"\n",
        tokens.to_str().unwrap()
    );
    // f32, not `auto`: two processes compared byte for byte must not each measure their own pick (on
    // AVX512-BF16 without AMX the measured speed-up sits near the threshold and flips under load)
    std::fs::write(&config, toml).unwrap();
    let cfg = config.to_str().unwrap();
    let whole = t.path().join("whole");
    let o = Command::new(env!("CARGO_BIN_EXE_saekit"))
        .args(["train", "--config", cfg, "--quiet", "--out", whole.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let saved = std::fs::read_to_string(whole.join("train_config.toml")).unwrap();
    assert!(saved.contains("live_block_tokens = 256") && saved.contains("d_sae = 256"), "{saved}");

    let cut = t.path().join("cut");
    let cut_s = cut.to_str().unwrap();
    let (code, err) =
        train_and_signal(&["train", "--config", cfg, "--quiet", "--out", cut_s], &cut.join("metrics.jsonl"), "-INT");
    assert_eq!(code, Some(130), "{err}");
    let o = Command::new(env!("CARGO_BIN_EXE_saekit")).args(["train", "--resume", cut_s, "--quiet"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let weights = |d: &Path| std::fs::read(d.join("sae_weights.safetensors")).unwrap();
    assert!(weights(&cut) == weights(&whole), "the resumed live run differs from the uninterrupted one");

    // the checkpoint's split is the run's: resuming on another split is refused, naming the key
    let o = Command::new(env!("CARGO_BIN_EXE_saekit"))
        .args(["train", "--resume", cut_s, "--split", "validation", "--quiet"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("split"), "{err}");
}
