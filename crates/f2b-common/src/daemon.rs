//! What every daemon's `main` does: common command-line options, loading the
//! configuration, `--check`, logging, `--daemon`, signals, telling systemd when the
//! daemon is ready or stopping (`sd_notify`), and reporting a fatal error with its
//! whole chain.

use std::error::Error;
use std::future::Future;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use crate::config::{self, defaults, Config};
use crate::log_batch::HoldingWriter;

/// Options every daemon takes.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// Configuration file (TOML).
    #[arg(long, short = 'c', value_name = "PATH", default_value = defaults::CONFIG_PATH, global = true)]
    pub config: PathBuf,
    /// Validate the configuration file and exit: 0 when valid, 2 with the key and
    /// the problem when not.
    #[arg(long)]
    pub check: bool,
    /// Detach into the background and write the pidfile named in the configuration.
    #[arg(long)]
    pub daemon: bool,
    /// Log level: error, warn, info, debug or trace (default info; RUST_LOG is used
    /// when this is not given and takes filter directives).
    #[arg(long, value_name = "LEVEL", global = true)]
    pub log_level: Option<String>,
    /// Append logs to this file instead of standard error (useful with --daemon,
    /// which otherwise discards them).
    #[arg(long, value_name = "PATH")]
    pub log_file: Option<PathBuf>,
}

/// A file generated from a binary's command-line definition.
#[derive(Debug, Clone, Copy)]
pub enum HelpFile {
    /// A shell completion script.
    Completions(clap_complete::Shell),
    /// The man page, in roff.
    Man,
}

/// Prints `file` for the command `cmd` (the binary's `Args::command()`) to standard
/// output. It is generated in memory first, so that a closed standard output is an
/// error, not a panic.
pub fn print_help_file(mut cmd: clap::Command, file: HelpFile) -> ExitCode {
    let name = cmd.get_name().to_owned();
    let mut text = Vec::new();
    match file {
        HelpFile::Completions(shell) => clap_complete::generate(shell, &mut cmd, &name, &mut text),
        HelpFile::Man => {
            if let Err(e) = clap_mangen::Man::new(cmd).render(&mut text) {
                eprintln!("{name}: cannot render the man page: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let mut out = std::io::stdout().lock();
    match out.write_all(&text).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: cannot write to standard output: {e}");
            ExitCode::FAILURE
        }
    }
}

/// An error with its whole chain of causes, `outer: inner: innermost`.
pub fn error_chain(err: &dyn Error) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let m = e.to_string();
        if !s.ends_with(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = e.source();
    }
    s
}

/// Installs the tracing subscriber: structured logs to standard error (or
/// `log_file`), level from `--log-level`, else RUST_LOG, else info. Each line is
/// written at once, unless its thread holds its lines
/// ([`hold_log_lines`](crate::log_batch::hold_log_lines)).
pub fn init_tracing(level: Option<&str>, log_file: Option<&Path>) -> Result<(), String> {
    let filter = match level {
        Some(l) => EnvFilter::try_new(l).map_err(|e| format!("--log-level {l:?}: {e}"))?,
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match log_file {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("--log-file {}: {e}", path.display()))?;
            builder
                .with_ansi(false)
                .with_writer(HoldingWriter::new(file))
                .try_init()
        }
        None => builder
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(HoldingWriter::stderr())
            .try_init(),
    }
    .map_err(|e| format!("cannot install the logger: {e}"))
}

/// Detaches into the background (double fork, new session, working directory `/`)
/// and writes `pidfile`, creating its directory. Call before any thread is started.
pub fn daemonize(pidfile: &Path) -> Result<(), String> {
    if let Some(dir) = pidfile.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create the pidfile directory {}: {e}", dir.display()))?;
    }
    daemonize::Daemonize::new()
        .pid_file(pidfile)
        .working_directory("/")
        .start()
        .map_err(|e| format!("cannot daemonize (pidfile {}): {e}", pidfile.display()))
}

/// A token cancelled on the first SIGTERM or SIGINT; a second one exits the
/// process at once (status 130). Must be called inside a tokio runtime.
pub fn shutdown_on_signals() -> std::io::Result<CancellationToken> {
    use tokio::signal::unix::{signal, SignalKind};
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let t = token.clone();
    tokio::spawn(async move {
        let which = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = which, "shutting down");
        t.cancel();
        notify_stopping(&format!("stopping ({which})"));
        // A second signal means the operator will not wait for a clean stop.
        let which = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::warn!(signal = which, "second signal: exiting at once");
        std::process::exit(130);
    });
    Ok(token)
}

/// Tells systemd (a `Type=notify` unit) that the daemon has started: `READY=1`,
/// so that `systemctl start` returns, and `status` as the unit's STATUS= line
/// (`systemctl status`). Call once, when the daemon is serving. Does nothing
/// when `NOTIFY_SOCKET` is unset (not started by systemd, or not `Type=notify`);
/// a failure to send is logged as a warning, never fatal.
pub fn notify_ready(status: &str) {
    let status = one_line(status);
    notify(
        &[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&status),
        ],
        "READY=1",
    );
}

/// Replaces the unit's STATUS= line with `status` (a short human sentence). Not
/// for a hot path: each call is a datagram to the service manager. A no-op
/// without `NOTIFY_SOCKET`.
pub fn notify_status(status: &str) {
    let status = one_line(status);
    notify(&[sd_notify::NotifyState::Status(&status)], "STATUS=");
}

/// Tells systemd that the daemon is stopping (`STOPPING=1`, and `status`). Sent by
/// [`shutdown_on_signals`] on the first SIGTERM or SIGINT. A no-op without
/// `NOTIFY_SOCKET`.
pub fn notify_stopping(status: &str) {
    let status = one_line(status);
    notify(
        &[
            sd_notify::NotifyState::Stopping,
            sd_notify::NotifyState::Status(&status),
        ],
        "STOPPING=1",
    );
}

/// A status on one line: a newline would start another `KEY=value` assignment.
fn one_line(status: &str) -> String {
    status.replace(['\n', '\r'], " ")
}

fn notify(states: &[sd_notify::NotifyState<'_>], what: &str) {
    if let Err(e) = sd_notify::notify(states) {
        let socket = std::env::var_os("NOTIFY_SOCKET").unwrap_or_default();
        tracing::warn!(
            error = %e,
            socket = %Path::new(&socket).display(),
            "cannot notify the service manager ({what}); is NOTIFY_SOCKET a datagram socket this process may write to?"
        );
    }
}

/// What SIGHUP does to a daemon with nothing to reload: an info line. Its default
/// action, ending the process, would stop the daemon on a `kill -HUP` or
/// `systemctl reload` meant for another one. Installs the handler (for the life
/// of the process) and a task that logs each SIGHUP until `shutdown`. Must be
/// called inside a tokio runtime.
pub fn ignore_sighup(shutdown: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                got = hup.recv() => {
                    if got.is_none() {
                        return;
                    }
                    tracing::info!(
                        signal = "SIGHUP",
                        "nothing to reload; restart to apply configuration changes"
                    );
                }
            }
        }
    });
    Ok(())
}

/// A daemon as `main` sees it.
#[derive(Debug, Clone, Copy)]
pub struct Daemon {
    /// The binary's name, for messages.
    pub name: &'static str,
    /// Its pidfile in the configuration.
    pub pidfile: fn(&Config) -> &Path,
    /// What `--check` prints after "valid".
    pub summary: fn(&Config) -> String,
    /// What this daemon needs of a valid configuration before it may start (its
    /// `[trust]` keys): checked by `--check` too, and before detaching. The error
    /// names the key.
    pub require: fn(&Config) -> Result<(), config::TrustError>,
    /// The threads that run its tasks.
    pub runtime: Runtime,
}

/// The threads that run a daemon's tasks (its blocking threads, for ZeroMQ
/// sockets and files, come on top).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    /// Every task on the thread that starts the daemon. For a daemon whose tasks
    /// take turns on one path anyway: no other worker is woken for nothing
    /// when input arrives.
    OneThread,
    /// This many worker threads.
    Workers(usize),
}

/// Loads the configuration or prints why it cannot (exit status 2).
pub fn load_config(name: &str, args: &CommonArgs) -> Result<Config, ExitCode> {
    config::load(&args.config).map_err(|e| {
        eprintln!("{name}: {}", error_chain(&e));
        ExitCode::from(2)
    })
}

/// The whole life of a daemon: configuration, `--check`, logging, `--daemon`,
/// runtime, signals, `run`, and the exit status.
pub fn main<F, Fut, E>(daemon: Daemon, args: &CommonArgs, run: F) -> ExitCode
where
    F: FnOnce(Config, CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Error,
{
    let config = match load_config(daemon.name, args) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Err(e) = (daemon.require)(&config) {
        eprintln!("{}: {}: {e}", daemon.name, args.config.display());
        return ExitCode::from(2);
    }
    if args.check {
        println!(
            "{}: {} is valid\n{}",
            daemon.name,
            args.config.display(),
            (daemon.summary)(&config)
        );
        return ExitCode::SUCCESS;
    }
    if args.daemon {
        if let Err(e) = daemonize((daemon.pidfile)(&config)) {
            eprintln!("{}: {e}", daemon.name);
            return ExitCode::FAILURE;
        }
    }
    if let Err(e) = init_tracing(args.log_level.as_deref(), args.log_file.as_deref()) {
        eprintln!("{}: {e}", daemon.name);
        return ExitCode::from(2);
    }
    let built = match daemon.runtime {
        Runtime::OneThread => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        Runtime::Workers(n) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n.max(1))
            .enable_all()
            .build(),
    };
    let runtime = match built {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{}: cannot start the runtime: {e}", daemon.name);
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let token =
            shutdown_on_signals().map_err(|e| format!("cannot install signal handlers: {e}"))?;
        run(config, token).await.map_err(|e| error_chain(&e))
    });
    match result {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "fatal");
            eprintln!("{}: {e}", daemon.name);
            ExitCode::FAILURE
        }
    }
}
