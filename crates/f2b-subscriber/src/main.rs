//! `f2b-subscriber`: receives the cluster's bans and applies them on this node.

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use f2b_common::daemon::{self, CommonArgs, Daemon, HelpFile};
use f2b_proto::JailName;

const NAME: &str = "f2b-subscriber";

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
    /// Print the live, verified stream of events from the configured publisher(s),
    /// one line per event, and apply nothing (Ctrl-C to stop).
    ///
    /// Connects like the daemon and checks the same signatures; warnings (refused
    /// broadcasts, missed events, no traffic) go to standard error.
    Watch {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// Only this jail's events (repeat for several; default: `[subscriber]
        /// jails`, or all).
        #[arg(long = "jail", value_name = "JAIL", value_parser = parse_jail)]
        jails: Vec<JailName>,
        /// Print heartbeats too.
        #[arg(long)]
        heartbeats: bool,
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

fn parse_jail(s: &str) -> Result<JailName, String> {
    JailName::new(s).map_err(|e| e.to_string())
}

/// Loads the configuration and checks that it lets a subscriber run (exit
/// status 2 when not, like any configuration error).
fn load(args: &CommonArgs) -> Result<f2b_common::config::Config, ExitCode> {
    let config = daemon::load_config(NAME, args)?;
    if let Err(e) = f2b_subscriber::check_trust(&config) {
        eprintln!("{NAME}: {}: {e}", args.config.display());
        return Err(ExitCode::from(2));
    }
    Ok(config)
}

fn watch(args: &CommonArgs, opts: f2b_subscriber::watch::WatchOptions) -> ExitCode {
    let config = match load(args) {
        Ok(c) => c,
        Err(code) => return code,
    };
    // Standard error carries watch's own warnings; the log only errors, unless
    // asked for.
    if let Err(e) = daemon::init_tracing(Some(args.log_level.as_deref().unwrap_or("error")), None) {
        eprintln!("{NAME}: {e}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{NAME}: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let token = daemon::shutdown_on_signals()
            .map_err(|e| format!("cannot install signal handlers: {e}"))?;
        f2b_subscriber::watch::watch(&config, opts, token)
            .await
            .map_err(|e| daemon::error_chain(&e))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{NAME} watch: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match args.command {
        Some(Command::Completions { shell }) => {
            return daemon::print_help_file(Args::command(), HelpFile::Completions(shell))
        }
        Some(Command::Man) => return daemon::print_help_file(Args::command(), HelpFile::Man),
        Some(Command::Watch {
            json,
            jails,
            heartbeats,
        }) => {
            return watch(
                &args.common,
                f2b_subscriber::watch::WatchOptions {
                    json,
                    jails,
                    heartbeats,
                },
            )
        }
        None => {}
    }
    daemon::main(
        Daemon {
            name: NAME,
            pidfile: |c| &c.subscriber.pidfile,
            summary: f2b_subscriber::summary,
            require: f2b_subscriber::check_trust,
            // The receive loop, the intake and the executor take turns on the
            // path of each event, so one thread runs them: a second worker was
            // woken, for nothing, at every event.
            runtime: daemon::Runtime::OneThread,
        },
        &args.common,
        |config, token| async move {
            // Nothing to reload: a SIGHUP (for instance a `kill -HUP` meant for the
            // publisher) is logged, and must not end the daemon.
            daemon::ignore_sighup(token.clone())
                .map_err(|source| f2b_subscriber::SubscriberError::Signal { source })?;
            f2b_subscriber::run(config, token).await
        },
    )
}
