//! The `f2b-monitor` binary: command line, then [`f2b_monitor::run`],
//! [`f2b_monitor::scan`] or [`f2b_monitor::manual`].

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use f2b_common::config::{self, Config};
use f2b_common::daemon::{self, CommonArgs, Daemon, HelpFile};
use f2b_monitor::manual::{self, ManualArgs};
use f2b_proto::Action;

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
    /// Report one Ban or Unban to the publisher by hand, as this node (its name
    /// and [trust] credential), exactly like one read from fail2ban's log, and
    /// wait for the answer. Exit status: 0 acknowledged (broadcast, duplicate or
    /// unchanged), 1 refused (NAK), 2 invalid argument or configuration (nothing
    /// sent), 3 no answer that can be trusted within the timeout.
    #[command(group(clap::ArgGroup::new("action").required(true).args(["ban", "unban"])))]
    Send {
        /// The jail the event is reported in (as fail2ban names it, e.g. sshd).
        #[arg(long, value_name = "JAIL")]
        jail: String,
        /// Ban this address across the cluster.
        #[arg(long, value_name = "IP")]
        ban: Option<String>,
        /// Unban this address across the cluster.
        #[arg(long, value_name = "IP")]
        unban: Option<String>,
        /// How long to wait for the publisher's answer (e.g. 10s, 1m).
        #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = timeout)]
        timeout: Duration,
        /// Print the outcome as one JSON object on standard output, for scripts.
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
}

fn timeout(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => Err("must be greater than zero".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(format!("{e}; try \"10s\" or \"1m\"")),
    }
}

/// How reports are authenticated, for `--check`: the credential's name and
/// source, never the secret.
fn credential_summary(c: &Config) -> String {
    if c.monitor.legacy.is_some() {
        "not used (legacy format)".to_owned()
    } else if c.trust.secret.is_some() {
        format!(
            "{} (from {})",
            c.node.name,
            c.trust.secret_source.as_deref().unwrap_or("trust.secret")
        )
    } else {
        "none: reports go unauthenticated (trust.allow_unauthenticated)".to_owned()
    }
}

fn summary(c: &Config) -> String {
    let jails: Vec<&str> = c.monitor.ignore_jails.iter().map(|j| j.as_str()).collect();
    format!(
        "node: {}\nlog_path: {}\npublisher: {}{}\ncredential: {}\nignore_jails: [{}]\nstate_dir: {}\nmetrics: {}",
        c.node.name,
        c.monitor.log_path.display(),
        c.monitor.publisher,
        if c.monitor.legacy.is_some() {
            " (legacy format)"
        } else {
            ""
        },
        credential_summary(c),
        jails.join(", "),
        c.monitor.state_dir.display(),
        c.metrics
            .monitor
            .map_or_else(|| "off".to_owned(), |a| format!("http://{a}/metrics")),
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
    match &args.command {
        Some(Command::Scan { file }) => return scan(&args.common, explicit_config, file),
        Some(Command::Send {
            jail,
            ban,
            unban,
            timeout,
            json,
        }) => {
            let (action, ip) = match (ban, unban) {
                (Some(ip), _) => (Action::Ban, ip.clone()),
                (None, Some(ip)) => (Action::Unban, ip.clone()),
                // clap requires one of them.
                (None, None) => return ExitCode::from(manual::EXIT_INVALID),
            };
            let m = ManualArgs {
                jail: jail.clone(),
                action,
                ip,
                timeout: *timeout,
                json: *json,
            };
            return send(&args.common, &m);
        }
        _ => {}
    }
    daemon::main(
        Daemon {
            name: "f2b-monitor",
            pidfile: |c| &c.monitor.pidfile,
            summary,
            // A fail2ban-zmq-tools publisher (legacy) takes no credential.
            require: |c| match c.monitor.legacy {
                Some(_) => Ok(()),
                None => c.trust.require_monitor(),
            },
            // The tail, the pipeline and the position's saver take turns on one
            // path (the sender and the saves run on threads of their own): a
            // second worker only added wake-ups between them (a Ban line reached
            // the publisher about 10% sooner on one thread).
            runtime: daemon::Runtime::OneThread,
        },
        &args.common,
        |cfg, token| async move {
            daemon::ignore_sighup(token.clone()).map_err(f2b_monitor::MonitorError::Signal)?;
            let telemetry = f2b_monitor::Telemetry::new(cfg.metrics.monitor);
            f2b_monitor::run_with(cfg.node, cfg.monitor, cfg.trust, telemetry, token).await
        },
    )
}

/// `send`: a manual event. The configuration must be valid (exit status 2 if not).
fn send(common: &CommonArgs, m: &ManualArgs) -> ExitCode {
    let config = match config::load(&common.config) {
        Ok(c) => c,
        Err(e) => {
            let message = daemon::error_chain(&e);
            if m.json {
                let v = serde_json::json!({
                    "ok": false,
                    "outcome": "error",
                    "error": "config",
                    "message": message,
                });
                println!("{v}");
            } else {
                eprintln!("f2b-monitor send: {message}");
            }
            return ExitCode::from(manual::EXIT_INVALID);
        }
    };
    let code = manual::cli(
        &config,
        m,
        &mut std::io::stdout().lock(),
        &mut std::io::stderr().lock(),
    );
    ExitCode::from(code)
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
