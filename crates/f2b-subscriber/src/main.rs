//! `f2b-subscriber`: receives the cluster's bans and applies them on this node.

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use f2b_common::daemon::{self, CommonArgs, Daemon, HelpFile};

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
        let file = match command {
            Command::Completions { shell } => HelpFile::Completions(*shell),
            Command::Man => HelpFile::Man,
        };
        return daemon::print_help_file(Args::command(), file);
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
