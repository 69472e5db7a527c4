//! Ctrl-C / SIGTERM for long commands: the first signal sets a flag that the running stage reads
//! between batches (it finishes the batch in flight, writes its checkpoint and returns); a second
//! signal exits at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use anyhow::{Context, Result};

/// Exit status of a command stopped by a signal (128 + SIGINT), as shells report it.
pub const EXIT_INTERRUPTED: i32 = 130;

static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
/// Set by a command that runs others in-process (`saekit demo`): rerunning it is the way to resume.
static RESUME_HINT: OnceLock<String> = OnceLock::new();

/// Make `exit_interrupted` name `command` (the outer command) instead of the stage's own.
pub fn set_resume_hint(command: &str) {
    let _ = RESUME_HINT.set(command.to_string());
}

/// The process-wide stop flag, with the SIGINT and SIGTERM handlers installed on first use.
pub fn stop_flag() -> Result<Arc<AtomicBool>> {
    if let Some(f) = FLAG.get() {
        return Ok(f.clone());
    }
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // registered first, so it sees the flag before this signal sets it: a second signal exits now
        signal_hook::flag::register_conditional_shutdown(sig, EXIT_INTERRUPTED, flag.clone())
            .context("installing the signal handler")?;
        signal_hook::flag::register(sig, flag.clone()).context("installing the signal handler")?;
    }
    Ok(FLAG.get_or_init(|| flag).clone())
}

/// True once SIGINT or SIGTERM arrived.
pub fn stopped() -> bool {
    FLAG.get().is_some_and(|f| f.load(Ordering::SeqCst))
}

/// Say what was kept and how to continue, then exit with status 130.
pub fn exit_interrupted(what: &str, resume: &str) -> ! {
    let resume = RESUME_HINT.get().map(String::as_str).unwrap_or(resume);
    eprintln!("interrupted: {what}; resume with: {resume}");
    std::process::exit(EXIT_INTERRUPTED)
}

/// The command line of this process, to rerun as is (quoted only as far as a shell needs).
pub fn this_command() -> String {
    let quote = |a: String| {
        if !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=,:@+".contains(c)) {
            a
        } else {
            format!("'{}'", a.replace('\'', r"'\''"))
        }
    };
    std::env::args().map(quote).collect::<Vec<_>>().join(" ")
}
