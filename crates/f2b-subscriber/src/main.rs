//! `f2b-subscriber`: receives the cluster's bans and applies them on this node.

use std::process::ExitCode;

use clap::Parser;
use f2b_common::daemon::{self, CommonArgs, Daemon};

/// Receive ban/unban events from the fail2ban-cluster publisher(s) and apply them
/// locally (fail2ban-client, a log file, a command, or nothing).
#[derive(Debug, Parser)]
#[command(name = "f2b-subscriber", version, about)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
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
