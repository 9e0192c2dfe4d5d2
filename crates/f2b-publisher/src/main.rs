//! `f2b-publisher`: the fail2ban-cluster hub daemon. See the library for what it does.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use f2b_common::daemon::{self, CommonArgs, Daemon};

/// The fail2ban-cluster hub: validates ban reports from monitors and broadcasts them
/// to subscribers.
#[derive(Debug, Parser)]
#[command(name = "f2b-publisher", version, about)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print a fail2ban-cluster configuration (TOML) converted from a
    /// fail2ban-zmq-tools configuration file; exit 2 if it cannot be converted.
    ImportLegacyConfig {
        /// The old configuration (INI).
        file: PathBuf,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish or powershell) to
    /// standard output.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to standard output.
    Man,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(command) = &args.command {
        if let Some(code) = print_help_file(command) {
            return code;
        }
    }
    if let Some(Command::ImportLegacyConfig { file }) = &args.command {
        return match f2b_publisher::import_legacy_config(file) {
            Ok(toml) => {
                print!("{toml}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("f2b-publisher: {}", daemon::error_chain(&e));
                ExitCode::from(2)
            }
        };
    }
    daemon::main(
        Daemon {
            name: "f2b-publisher",
            pidfile: |c| &c.publisher.pidfile,
            summary: f2b_publisher::summary,
        },
        &args.common,
        |config, token| f2b_publisher::run(config.publisher, token),
    )
}

/// `completions SHELL` and `man`: generated from the command line's definition,
/// in memory first so that a closed standard output is an error, not a panic.
fn print_help_file(command: &Command) -> Option<ExitCode> {
    let mut text = Vec::new();
    match command {
        Command::Completions { shell } => {
            clap_complete::generate(*shell, &mut Args::command(), "f2b-publisher", &mut text)
        }
        Command::Man => {
            if let Err(e) = clap_mangen::Man::new(Args::command()).render(&mut text) {
                eprintln!("f2b-publisher: cannot render the man page: {e}");
                return Some(ExitCode::FAILURE);
            }
        }
        _ => return None,
    }
    let mut out = std::io::stdout().lock();
    Some(match out.write_all(&text).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("f2b-publisher: cannot write to standard output: {e}");
            ExitCode::FAILURE
        }
    })
}
