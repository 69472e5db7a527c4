//! The bad-input campaign: for every format saekit reads, seeded mutations of a valid file
//! (truncations, bit flips, huge header fields, wrong dtypes / shapes / types in JSON and TOML)
//! are fed to the real reader, each format in a child process under an address-space limit and a
//! counting allocator. Every case must end in `Ok` (the mutation left a valid file) or in an `Err`
//! whose one-line message names the file; a panic, an abort, an allocation above the limit or a
//! multi-line message fails the test. Files a checksum protects must never be accepted changed.
//!
//! `SAEKIT_MUTATIONS=N` sets the cases per format (default 200; http_json runs N/10, at least 10, as
//! each of its cases runs the model), `SAEKIT_MUTATION_FORMATS=a,b` picks formats. The per-format counts are printed (and reported in BENCHMARKS.md).

mod formats;
mod mutate;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Formats whose readers this campaign still breaks, run only when named in `SAEKIT_MUTATION_FORMATS`
/// until they are fixed. Empty: every format runs by default. (The first run found train_checkpoint,
/// feature_db, toml_config and corpus failing, and http_json's seed naming a feature that never fired;
/// BENCHMARKS.md says what each was.)
const OPEN_FINDINGS: &[&str] = &[];

/// The most one case may hold allocated at once, beyond what the worker held when it started.
const CASE_ALLOC_LIMIT: usize = 512 << 20;
/// Address-space limit of a worker: a huge reservation fails here instead of swapping the machine.
const WORKER_ADDRESS_SPACE: u64 = 8 << 30;

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// Largest single request seen in the current case.
static BIGGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        self.note(l.size());
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        self.note(l.size());
        System.alloc_zeroed(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if new > l.size() {
            self.note(new - l.size());
            BIGGEST.fetch_max(new, Ordering::Relaxed);
        } else {
            LIVE.fetch_sub(l.size() - new, Ordering::Relaxed);
        }
        System.realloc(p, l, new)
    }
}

impl Counting {
    fn note(&self, n: usize) {
        let live = LIVE.fetch_add(n, Ordering::Relaxed) + n;
        PEAK.fetch_max(live, Ordering::Relaxed);
        BIGGEST.fetch_max(n, Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn main() {
    match std::env::var("SAEKIT_MUTATION_WORKER") {
        Ok(fmt) => worker(&fmt),
        Err(_) => parent(),
    }
}

fn cases_per_format() -> usize {
    std::env::var("SAEKIT_MUTATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(200)
}

/// How one case ended, as the worker reports it on stdout.
#[derive(Default, Clone)]
struct Tally {
    err: usize,
    ok: usize,
    failures: Vec<String>,
}

fn parent() {
    let n = cases_per_format();
    let only: Option<Vec<String>> =
        std::env::var("SAEKIT_MUTATION_FORMATS").ok().map(|s| s.split(',').map(str::to_string).collect());
    let exe = std::env::current_exe().expect("test binary path");
    let t0 = std::time::Instant::now();
    let mut total = Tally::default();
    println!("{:<18} {:>6} {:>8} {:>8} {:>8} {:>9}", "format", "cases", "Err", "Ok", "failed", "seconds");
    for fmt in formats::NAMES {
        if only.as_ref().is_some_and(|o| !o.iter().any(|x| x == fmt)) {
            continue;
        }
        if only.is_none() && OPEN_FINDINGS.contains(fmt) {
            println!(
                "{fmt:<18} not run by default: its readers still fail cases (SAEKIT_MUTATION_FORMATS={fmt} runs it)"
            );
            continue;
        }
        // each HTTP case runs the real model (a short generation and a live pass): a tenth of the cases
        let n = if *fmt == "http_json" { (n / 10).max(10) } else { n };
        let t_fmt = std::time::Instant::now();
        let t = run_format(&exe, fmt, n);
        println!(
            "{:<18} {:>6} {:>8} {:>8} {:>8} {:>9.1}",
            fmt,
            t.err + t.ok + t.failures.len(),
            t.err,
            t.ok,
            t.failures.len(),
            t_fmt.elapsed().as_secs_f64()
        );
        total.err += t.err;
        total.ok += t.ok;
        total.failures.extend(t.failures.into_iter().map(|f| format!("{fmt}: {f}")));
    }
    println!(
        "{:<18} {:>6} {:>8} {:>8} {:>8}   ({:.1} s)",
        "total",
        total.err + total.ok + total.failures.len(),
        total.err,
        total.ok,
        total.failures.len(),
        t0.elapsed().as_secs_f64()
    );
    if !total.failures.is_empty() {
        for f in total.failures.iter().take(60) {
            eprintln!("FAIL {f}");
        }
        eprintln!("{} mutation case(s) failed", total.failures.len());
        std::process::exit(1);
    }
}

/// Run the cases of one format in child processes, restarting after a crash with the next case.
fn run_format(exe: &Path, fmt: &str, n: usize) -> Tally {
    let mut tally = Tally::default();
    let mut first = 0;
    while first < n {
        let mut cmd = Command::new(exe);
        cmd.env("SAEKIT_MUTATION_WORKER", fmt)
            .env("SAEKIT_MUTATION_FIRST", first.to_string())
            .env("SAEKIT_MUTATIONS", n.to_string())
            .env("RAYON_NUM_THREADS", "1")
            // a config asking for more than a case may hold is refused by the trainer's own size check
            .env("SAEKIT_MAX_MEMORY", "256M")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        limit_address_space(&mut cmd);
        let mut child = cmd.spawn().expect("spawn mutation worker");
        let out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut current: Option<(usize, String)> = None;
        let mut panic_message = String::new();
        let mut last_done = first;
        for line in out.lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("PANIC ") {
                panic_message = format!(": {rest}");
            } else if let Some(rest) = line.strip_prefix("CASE ") {
                let (i, what) = rest.split_once(' ').unwrap_or((rest, ""));
                current = Some((i.parse().unwrap_or(0), what.to_string()));
            } else if let Some(rest) = line.strip_prefix("DONE ") {
                let mut parts = rest.splitn(3, ' ');
                let i: usize = parts.next().and_then(|x| x.parse().ok()).unwrap_or(0);
                let outcome = parts.next().unwrap_or("");
                let detail = parts.next().unwrap_or("");
                match outcome {
                    "err" => tally.err += 1,
                    "ok" => tally.ok += 1,
                    _ => tally.failures.push(format!(
                        "case {i} ({}): {detail}{}",
                        current.as_ref().map(|c| c.1.as_str()).unwrap_or(""),
                        std::mem::take(&mut panic_message)
                    )),
                }
                panic_message.clear();
                current = None;
                last_done = i + 1;
            }
        }
        let status = child.wait().expect("wait for worker");
        match current {
            Some((i, what)) => {
                tally.failures.push(format!("case {i} ({what}): worker died ({status}); its stderr is above"));
                first = i + 1;
            }
            None if !status.success() => {
                tally.failures.push(format!("worker failed outside a case ({status}); its stderr is above"));
                break;
            }
            None => first = last_done.max(n),
        }
    }
    tally
}

fn limit_address_space(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit { rlim_cur: WORKER_ADDRESS_SPACE, rlim_max: WORKER_ADDRESS_SPACE };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn worker(fmt: &str) {
    let n = cases_per_format();
    let first: usize = std::env::var("SAEKIT_MUTATION_FIRST").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    let fmt = formats::by_name(fmt).unwrap_or_else(|| panic!("unknown format {fmt}"));
    let tmp = tempfile::tempdir().expect("tempdir");
    let seed_dir = tmp.path().join("seed");
    std::fs::create_dir_all(&seed_dir).expect("seed dir");
    (fmt.make_seed)(&seed_dir);
    // the valid input must read cleanly, or every mutation below is meaningless
    if let Err(e) = (fmt.read)(&seed_dir) {
        panic!("{}: the unmutated seed does not read: {e:#}", fmt.name);
    }
    let seed_files = mutate::load_tree(&seed_dir);
    std::panic::set_hook(Box::new(|info| {
        let msg = info.to_string().replace('\n', " ");
        println!("PANIC {msg}");
    }));
    let stdout = std::io::stdout();
    for i in first..n {
        let case_dir = tmp.path().join(format!("case-{i:06}"));
        let mut rng = mutate::rng_for(fmt.name, i as u64);
        let m = mutate::mutate(&seed_files, &fmt.targets, &mut rng);
        mutate::write_tree(&case_dir, &m.files);
        {
            let mut o = stdout.lock();
            writeln!(o, "CASE {i} {}", m.what).ok();
            o.flush().ok();
        }
        let base = LIVE.load(Ordering::Relaxed);
        PEAK.store(base, Ordering::Relaxed);
        BIGGEST.store(0, Ordering::Relaxed);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (fmt.read)(&case_dir)));
        let peak = PEAK.load(Ordering::Relaxed).saturating_sub(base);
        let biggest = BIGGEST.load(Ordering::Relaxed);
        let case_name = case_dir.file_name().and_then(|s| s.to_str()).unwrap_or("").to_string();
        let outcome = match r {
            Err(_) => "fail panicked".to_string(),
            _ if peak > CASE_ALLOC_LIMIT || biggest > CASE_ALLOC_LIMIT => {
                format!("fail allocated {} MiB (largest block {} MiB)", peak >> 20, biggest >> 20)
            }
            Ok(Ok(())) if m.protected => "fail a checksummed file was changed and still accepted".into(),
            Ok(Ok(())) => "ok".into(),
            Ok(Err(e)) => {
                let msg = format!("{e:#}");
                let named = msg.contains(&case_name) || msg.contains(&m.file);
                if msg.contains('\n') {
                    format!("fail multi-line message: {}", msg.replace('\n', "\\n"))
                } else if !named {
                    format!("fail message does not name {} or the folder: {msg}", m.file)
                } else {
                    "err".into()
                }
            }
        };
        std::fs::remove_dir_all(&case_dir).ok();
        let mut o = stdout.lock();
        writeln!(o, "DONE {i} {outcome}").ok();
        o.flush().ok();
    }
}
