//! `f2b-test-fail2ban-client ARG...`: appends its ARGs as one line to the file named
//! by `F2B_TEST_CALLS_FILE`, then executes the real `fail2ban-client` (or
//! `F2B_TEST_REAL_CLIENT`) with the same ARGs in its place. The integration tests set
//! it as the subscriber's `fail2ban_client`, to count the calls the subscriber makes
//! (batching) without depending on its log lines.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    let Some(calls) = std::env::var_os("F2B_TEST_CALLS_FILE") else {
        eprintln!(
            "f2b-test-fail2ban-client: F2B_TEST_CALLS_FILE is not set \
             (the subscriber must pass its environment on to the program it runs)"
        );
        return ExitCode::from(2);
    };
    let words: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let line = format!("{}\n", words.join(" "));
    if let Err(e) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&calls)
        .and_then(|mut f| f.write_all(line.as_bytes()))
    {
        eprintln!("f2b-test-fail2ban-client: {}: {e}", calls.to_string_lossy());
        return ExitCode::from(2);
    }
    let real = std::env::var_os("F2B_TEST_REAL_CLIENT").unwrap_or_else(|| "fail2ban-client".into());
    // exec only returns on failure.
    let err = Command::new(&real).args(&args).exec();
    eprintln!(
        "f2b-test-fail2ban-client: cannot run {}: {err}",
        real.to_string_lossy()
    );
    ExitCode::from(2)
}
