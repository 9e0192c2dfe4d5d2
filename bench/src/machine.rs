//! The machine a run measured, from /proc, and the header of the results.

use std::fmt::Write as _;
use std::time::Duration;

use crate::Sizes;

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The CPU model, the number of CPUs this process may use, the memory and the
/// kernel.
pub fn summary() -> String {
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let mhz = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("cpu MHz"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| format!(" at {} MHz", m.trim()))
        .unwrap_or_default();
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or_else(
            || "unknown".into(),
            |kib| format!("{:.1} GiB", kib / 1048576.0),
        );
    let kernel = read("/proc/sys/kernel/osrelease").trim().to_owned();
    format!("{model}{mhz}, {nproc} CPUs (nproc), {mem_gib} memory, Linux {kernel}")
}

/// The header of a run's results.
pub fn describe(command: Option<&str>, sizes: &Sizes, took: Duration, secure: bool) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Run of {} UTC, {} mode, {:.0} s in all.\n",
        chrono::Utc::now().format("%Y-%m-%d %H:%M"),
        if sizes.quick {
            "**quick** (small sizes: not figures to quote)"
        } else {
            "full"
        },
        took.as_secs_f64()
    );
    let _ = writeln!(s, "- Machine: {}", summary());
    let _ = writeln!(
        s,
        "- Command: `{}`",
        command.unwrap_or("scripts/bench (target/release/f2b-bench)")
    );
    let _ = writeln!(
        s,
        "- Security: {}",
        if secure {
            "authentication on (monitor credentials, signed broadcasts and snapshots), as deployed"
        } else {
            "no authentication (the daemons do not have it yet)"
        }
    );
    let _ = writeln!(
        s,
        "- Sizes: latency {} events per configuration; throughput {} s per configuration; \
         bursts of {} bans x {}, fail2ban-client sampled over {} calls; idle CPU over {} s; \
         load of {} Ban lines; {} events behind a stalled subscriber; fan-out to {} \
         subscribers, {} events timed, {} bursts of {}.",
        sizes.latency_events,
        sizes.throughput_secs,
        sizes.burst_bans,
        sizes.burst_reps,
        sizes.client_sample,
        sizes.idle_secs,
        sizes.load_lines,
        sizes.stalled_events,
        sizes.fanout_subs,
        sizes.fanout_events,
        sizes.fanout_bursts,
        sizes.fanout_burst
    );
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_summary_names_the_cpus_and_kernel() {
        let s = super::summary();
        assert!(s.contains("CPUs (nproc)") && s.contains("Linux "), "{s}");
    }
}
