//! `f2b-test-record FILE ARG...`: appends one line, the ARGs joined by spaces, to
//! FILE. The integration tests use it as the subscriber's `exec` action
//! (`exec = [".../f2b-test-record", "<file>", "<action>", "<jail>", "<ip>", "<node>"]`)
//! and read FILE to see what was applied. No shell is involved.

use std::io::Write;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let Some(path) = args.next() else {
        eprintln!("usage: f2b-test-record FILE ARG...");
        return ExitCode::from(2);
    };
    let words: Vec<String> = args.map(|a| a.to_string_lossy().into_owned()).collect();
    let line = format!("{}\n", words.join(" "));
    // One write of a short line to a file opened with O_APPEND: concurrent recorders
    // never interleave within a line.
    let result = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("f2b-test-record: {}: {e}", path.to_string_lossy());
            ExitCode::FAILURE
        }
    }
}
