//! The `f2b-monitor` binary: command line, then [`f2b_monitor::run`] or
//! [`f2b_monitor::scan`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use f2b_common::config::{self, Config};
use f2b_common::daemon::{self, CommonArgs, Daemon, HelpFile};

/// Tails fail2ban.log and reports every Ban and Unban to the fail2ban-cluster
/// publisher.
#[derive(Debug, Parser)]
#[command(name = "f2b-monitor", version)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the events a fail2ban log file holds, one JSON object per line, with
    /// the daemon's rules (ignore_jails from the configuration if it is readable;
    /// stop suppression). Sends nothing.
    Scan {
        /// The log file.
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

fn summary(c: &Config) -> String {
    let jails: Vec<&str> = c.monitor.ignore_jails.iter().map(|j| j.as_str()).collect();
    format!(
        "node: {}\nlog_path: {}\npublisher: {}{}\nignore_jails: [{}]\nstate_dir: {}",
        c.node.name,
        c.monitor.log_path.display(),
        c.monitor.publisher,
        if c.monitor.legacy.is_some() {
            " (legacy format)"
        } else {
            ""
        },
        jails.join(", "),
        c.monitor.state_dir.display()
    )
}

fn main() -> ExitCode {
    let matches = Args::command().get_matches();
    let args = match Args::from_arg_matches(&matches) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    let explicit_config =
        matches.value_source("config") == Some(clap::parser::ValueSource::CommandLine);

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
    if let Some(Command::Scan { file }) = &args.command {
        return scan(&args.common, explicit_config, file);
    }

    daemon::main(
        Daemon {
            name: "f2b-monitor",
            pidfile: |c| &c.monitor.pidfile,
            summary,
        },
        &args.common,
        |cfg, token| f2b_monitor::run(cfg.node, cfg.monitor, token),
    )
}

/// `scan FILE`: works without a configuration file; an explicit `--config` must
/// be valid.
fn scan(common: &CommonArgs, explicit_config: bool, file: &std::path::Path) -> ExitCode {
    let ignore_jails = if explicit_config || common.config.exists() {
        match config::load(&common.config) {
            Ok(c) => c.monitor.ignore_jails,
            Err(e) if explicit_config => {
                eprintln!("f2b-monitor: {}", daemon::error_chain(&e));
                return ExitCode::from(2);
            }
            Err(e) => {
                eprintln!(
                    "f2b-monitor: warning: {}; scanning without ignore_jails",
                    daemon::error_chain(&e)
                );
                Vec::new()
            }
        }
    } else {
        Vec::new()
    };
    match f2b_monitor::scan::scan_file(file, &ignore_jails, std::io::stdout().lock()) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("f2b-monitor: {}", daemon::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
