//! `f2b-publisher`: the fail2ban-cluster hub daemon. See the library for what it does.

use std::process::ExitCode;

use clap::Parser;
use f2b_common::daemon::{self, CommonArgs, Daemon};

/// The fail2ban-cluster hub: validates ban reports from monitors and broadcasts them
/// to subscribers.
#[derive(Debug, Parser)]
#[command(name = "f2b-publisher", version, about)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
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
