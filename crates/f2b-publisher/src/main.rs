//! `f2b-publisher`: the fail2ban-cluster hub daemon. See the library for what it does.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use f2b_common::daemon::{self, CommonArgs, Daemon, HelpFile};

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
        let file = match command {
            Command::Completions { shell } => Some(HelpFile::Completions(*shell)),
            Command::Man => Some(HelpFile::Man),
            _ => None,
        };
        if let Some(file) = file {
            return daemon::print_help_file(Args::command(), file);
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
