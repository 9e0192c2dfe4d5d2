//! `completions SHELL` and `man`: each binary prints a completion script and its
//! man page, generated from its command line, that know its options.

use std::process::{Command, Output};

use f2b_tests::bins;

const BINARIES: [&str; 3] = ["f2b-monitor", "f2b-publisher", "f2b-subscriber"];

fn run(binary: &str, args: &[&str]) -> Output {
    Command::new(bins::bin_path(binary))
        .args(args)
        // A missing configuration file must not matter.
        .args(["--config", "/nonexistent/fail2ban-cluster.conf"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {binary}: {e}"))
}

fn stdout_of(binary: &str, args: &[&str]) -> String {
    let out = run(binary, args);
    assert!(
        out.status.success(),
        "{binary} {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

#[test]
fn completions_know_the_binary_and_its_options() {
    for binary in BINARIES {
        for shell in ["bash", "zsh", "fish"] {
            let script = stdout_of(binary, &["completions", shell]);
            assert!(
                script.contains(binary),
                "{binary} completions {shell}: no {binary}:\n{script}"
            );
            for option in ["--config", "--check", "--log-level"] {
                // fish names long options without their dashes (`-l config`).
                let option = if shell == "fish" {
                    format!("-l {}", &option[2..])
                } else {
                    option.to_owned()
                };
                assert!(
                    script.contains(&option),
                    "{binary} completions {shell}: no {option}"
                );
            }
            assert!(
                script.contains("completions") && script.contains("man"),
                "{binary} completions {shell}: the subcommands are missing"
            );
        }
    }
}

#[test]
fn completions_refuse_an_unknown_shell() {
    for binary in BINARIES {
        let out = run(binary, &["completions", "cmd.exe"]);
        assert_eq!(out.status.code(), Some(2), "{binary}: clap's usage error");
        assert!(out.stdout.is_empty(), "{binary}: printed a script anyway");
    }
}

#[test]
fn man_pages_document_the_options() {
    for binary in BINARIES {
        let roff = stdout_of(binary, &["man"]);
        assert!(
            roff.contains(&format!(".TH {binary} 1")),
            "{binary} man: no title header:\n{roff}"
        );
        // roff escapes the dashes: `\-\-config`.
        let text = roff.replace("\\-", "-");
        for needle in [
            "--config",
            "--check",
            "--daemon",
            "/etc/fail2ban-cluster.conf",
        ] {
            assert!(text.contains(needle), "{binary} man: no {needle}");
        }
        assert!(
            text.contains(".SH SUBCOMMANDS"),
            "{binary} man: subcommands"
        );
    }
}
