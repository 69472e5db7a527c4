//! Ctrl-C with a real signal to a real `saekit train` process: it finishes the batch in flight, writes a
//! checkpoint, exits 130 naming the resume command, and `--resume` continues from that step.

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
    let cks = saekit_sae::train::list_checkpoints(&out).unwrap();
    assert_eq!(cks.len(), 1, "{cks:?}");
    assert!(cks[0].ends_with(format!("step_{s1:09}")), "{cks:?} vs step {s1}");
    // the run continues from that checkpoint, and SIGTERM stops it the same way
    let (code, err) = train_and_signal(&["train", "--resume", out_s, "--quiet"], &metrics, "-TERM");
    assert_eq!(code, Some(130), "{err}");
    assert!(step_of(&err) > s1, "{err}");
    assert!(!out.join("sae_weights.safetensors").exists(), "an interrupted run writes no final SAE");
}
