//! `f2b-monitor scan FILE`: the events a log file holds, with the daemon's rules,
//! one JSON object per line, nothing sent.

use std::io::{BufRead, Write};
use std::path::Path;
use std::time::Instant;

use chrono::{Local, SecondsFormat, TimeZone};
use f2b_proto::JailName;

use crate::parse;
use crate::stop::{Seen, StopFilter, Verdict};
use crate::MonitorError;

/// Reads `input` to its end and returns the events it reports, in log order:
/// Ban and Unban lines with a valid jail and address, not of `ignore_jails`, and
/// not the Unbans of a stopping fail2ban.
pub fn scan_reader(input: impl BufRead, ignore_jails: &[JailName]) -> std::io::Result<Vec<Seen>> {
    let mut filter = StopFilter::default();
    // One instant for the whole scan: holds end by the log's own timestamps (or at
    // the end of the file), not by how long reading takes.
    let t0 = Instant::now();
    let now_local = Local::now().naive_local();
    let mut verdicts = Vec::new();
    let mut number = 0u64;
    for line in input.split(b'\n') {
        let line = line?;
        number += 1;
        let text = String::from_utf8_lossy(&line);
        if let Some(entry) = parse::parse_line_at(&text, now_local) {
            filter.push(&entry, number, t0, &mut verdicts);
        }
    }
    filter.release_all(&mut verdicts);
    let mut seen: Vec<Seen> = verdicts
        .into_iter()
        .filter_map(|v| match v {
            Verdict::Report(s) if !ignore_jails.contains(&s.jail) => Some(s),
            _ => None,
        })
        .collect();
    seen.sort_by_key(|s| s.line);
    Ok(seen)
}

/// One event as `scan` prints it: `{"line":..,"time":..,"jail":..,"action":..,"ip":..}`
/// with `time` in RFC 3339 (local offset), or null when the line had none.
pub fn to_json(s: &Seen) -> serde_json::Value {
    let time = s
        .time
        .and_then(|t| Local.from_local_datetime(&t).earliest())
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, false));
    serde_json::json!({
        "line": s.line,
        "time": time,
        "jail": s.jail.as_str(),
        "action": s.action.as_str(),
        "ip": s.ip.to_string(),
    })
}

/// Scans the file at `path` and writes its events to `out`; returns how many.
pub fn scan_file(
    path: &Path,
    ignore_jails: &[JailName],
    mut out: impl Write,
) -> Result<usize, MonitorError> {
    let read_err = |source| MonitorError::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let seen = scan_reader(std::io::BufReader::new(file), ignore_jails).map_err(read_err)?;
    for s in &seen {
        writeln!(out, "{}", to_json(s)).map_err(MonitorError::Output)?;
    }
    out.flush().map_err(MonitorError::Output)?;
    Ok(seen.len())
}
