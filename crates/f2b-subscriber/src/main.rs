//! `f2b-subscriber`: receives the cluster's bans and applies them on this node.

use std::io::Write;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use f2b_common::daemon::{self, CommonArgs, Daemon};

/// Receive ban/unban events from the fail2ban-cluster publisher(s) and apply them
/// locally (fail2ban-client, a log file, a command, or nothing).
#[derive(Debug, Parser)]
#[command(name = "f2b-subscriber", version, about)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
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
        return print_help_file(command);
    }
    daemon::main(
        Daemon {
            name: "f2b-subscriber",
            pidfile: |c| &c.subscriber.pidfile,
            summary: f2b_subscriber::summary,
        },
        &args.common,
        |cfg, token| f2b_subscriber::run(cfg.node, cfg.subscriber, token),
    )
}

/// `completions SHELL` and `man`: generated from the command line's definition,
/// in memory first so that a closed standard output is an error, not a panic.
fn print_help_file(command: &Command) -> ExitCode {
    let mut text = Vec::new();
    match command {
        Command::Completions { shell } => {
            clap_complete::generate(*shell, &mut Args::command(), "f2b-subscriber", &mut text)
        }
        Command::Man => {
            if let Err(e) = clap_mangen::Man::new(Args::command()).render(&mut text) {
                eprintln!("f2b-subscriber: cannot render the man page: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let mut out = std::io::stdout().lock();
    match out.write_all(&text).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("f2b-subscriber: cannot write to standard output: {e}");
            ExitCode::FAILURE
        }
    }
}
