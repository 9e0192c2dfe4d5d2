//! `f2b-publisher`: the fail2ban-cluster hub daemon. See the library for what it does.

use std::path::{Path, PathBuf};
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
    /// List the active bans in the ledger (origin node, jail, address, since,
    /// expiry, sequence number, the credential that reported it). Reads the
    /// ledger in [publisher] state_dir read-only: safe while the daemon runs.
    Bans {
        /// Only this address, or the addresses of this network (CIDR).
        #[arg(long, value_name = "IP")]
        ip: Option<String>,
        /// Only this jail.
        #[arg(long, value_name = "JAIL")]
        jail: Option<String>,
        /// Only bans from this node (the node that reported them).
        #[arg(long, value_name = "NODE")]
        node: Option<String>,
        /// Print one JSON array of objects (`[]` when there is none) instead of a
        /// table.
        #[arg(long)]
        json: bool,
        /// Every event the ledger still keeps (recent unbans, expired or
        /// superseded bans not pruned yet), with its action and whether it is
        /// active.
        #[arg(long)]
        all: bool,
    },
    /// Whether the daemon runs (pidfile, process, metrics endpoint), the ledger's
    /// epoch, last sequence number and active bans per jail and node, the
    /// monitors' credentials (names only) and the public key. Exit status 0 when
    /// the daemon runs, 3 when it does not.
    Status {
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish or powershell) to
    /// standard output.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to standard output.
    Man,
    /// Make the publisher's Ed25519 signing key (written with mode 0600; prints the
    /// `publisher_key = "ed25519:..."` line for the subscribers' [trust]), or with
    /// --monitor a monitor node's credential (prints the publisher's
    /// [trust.monitors] line and the node's [trust] line). Random bytes come from
    /// the operating system. An existing file is never overwritten without --force.
    Keygen {
        /// The file to write: the signing key [default:
        /// /etc/fail2ban-cluster/publisher.key]; with --monitor, the credential (when
        /// not given, the secret is printed in the config lines instead).
        #[arg(long, value_name = "PATH")]
        out: Option<PathBuf>,
        /// Replace the file if it exists (what used the old key or secret stops
        /// working).
        #[arg(long)]
        force: bool,
        /// Make a credential for this monitor node instead of the signing key.
        #[arg(long, value_name = "NODE")]
        monitor: Option<String>,
    },
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
    if let Some(Command::Keygen {
        out,
        force,
        monitor,
    }) = &args.command
    {
        let made = match monitor {
            Some(node) => f2b_publisher::keygen::monitor(node, out.as_deref(), *force),
            None => f2b_publisher::keygen::signing_key(
                out.as_deref()
                    .unwrap_or(Path::new(f2b_publisher::keygen::DEFAULT_KEY_PATH)),
                *force,
            ),
        };
        return match made {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("f2b-publisher: keygen: {}", daemon::error_chain(&e));
                ExitCode::FAILURE
            }
        };
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
    if let Some(Command::Bans { .. } | Command::Status { .. }) = &args.command {
        return fleet(&args);
    }
    // SIGHUP reads the file again: by its absolute path, since --daemon moves to /.
    let config_path =
        std::fs::canonicalize(&args.common.config).unwrap_or_else(|_| args.common.config.clone());
    daemon::main(
        Daemon {
            name: "f2b-publisher",
            pidfile: |c| &c.publisher.pidfile,
            summary: f2b_publisher::summary,
            require: |c| c.trust.require_publisher(),
            runtime: daemon::Runtime::Workers(2),
        },
        &args.common,
        |config, token| f2b_publisher::run(config, Some(config_path), token),
    )
}

/// `bans` and `status`: exit 0 (status: the daemon runs), 1 on an error reading
/// the ledger, 2 on a configuration or argument error, 3 (status) when the
/// daemon does not run.
fn fleet(args: &Args) -> ExitCode {
    let config = match daemon::load_config("f2b-publisher", &args.common) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match &args.command {
        Some(Command::Bans {
            ip,
            jail,
            node,
            json,
            all,
        }) => {
            let ip = match ip.as_deref().map(f2b_publisher::fleet::parse_ip_filter) {
                Some(Err(e)) => {
                    eprintln!("f2b-publisher: bans: {e}");
                    return ExitCode::from(2);
                }
                Some(Ok(net)) => Some(net),
                None => None,
            };
            let jail = match jail.as_deref().map(f2b_proto::JailName::new) {
                Some(Err(e)) => {
                    eprintln!("f2b-publisher: bans: --jail: {e}");
                    return ExitCode::from(2);
                }
                Some(Ok(j)) => Some(j.to_string()),
                None => None,
            };
            let node = match node.as_deref().map(f2b_proto::NodeName::new) {
                Some(Err(e)) => {
                    eprintln!("f2b-publisher: bans: --node: {e}");
                    return ExitCode::from(2);
                }
                Some(Ok(n)) => Some(n.to_string()),
                None => None,
            };
            let filter = f2b_publisher::ledger::inspect::Filter {
                ip,
                jail,
                node,
                all: *all,
            };
            match f2b_publisher::fleet::bans(&config, &filter, *json) {
                Ok(text) => print_out(&text),
                Err(e) => {
                    eprintln!("f2b-publisher: bans: {}", daemon::error_chain(&e));
                    ExitCode::FAILURE
                }
            }
        }
        Some(Command::Status { json }) => {
            let (text, running) = f2b_publisher::fleet::status(&config, &args.common.config, *json);
            let code = print_out(&text);
            if code != ExitCode::SUCCESS {
                code
            } else if running {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(3)
            }
        }
        _ => ExitCode::FAILURE,
    }
}

/// Prints `text` to standard output; a closed pipe (`| head`) is not an error
/// worth a panic.
fn print_out(text: &str) -> ExitCode {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("f2b-publisher: cannot write to standard output: {e}");
            ExitCode::FAILURE
        }
    }
}
