//! What a subscriber applied, read from the file of its `log` action
//! ([`crate::NodeAction::LogFile`]): one line per applied event, with the event's
//! id and sequence number, written by the subscriber itself (no process per event,
//! unlike the `exec` recorder), so that tests of thousands of events can count
//! exactly what each subscriber applied.
//!
//! The line format is the `log` action's (stable: a fail2ban filter depends on it):
//!
//! ```text
//! 2026-11-21 04:52:53,446 f2b-subscriber[4242]: Ban 203.0.113.5 jail=sshd node=web1 id=0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0 seq=17
//! ```

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Ban or Unban.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verb {
    Ban,
    Unban,
}

/// One applied event: a line of the `log` action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub verb: Verb,
    pub ip: String,
    /// The local jail it was applied in.
    pub jail: String,
    /// The node that reported it.
    pub node: String,
    /// The event id (a catch-up unban carries an id of its own).
    pub id: String,
    pub seq: u64,
    /// The subscriber's process id (which run of the subscriber applied it).
    pub pid: u32,
}

/// Parses one line of the `log` action; `None` when it is not one.
pub fn parse_line(line: &str) -> Option<Applied> {
    let rest = &line[line.find(" f2b-subscriber[")? + " f2b-subscriber[".len()..];
    let (pid, rest) = rest.split_once("]: ")?;
    let mut words = rest.split(' ');
    let verb = match words.next()? {
        "Ban" => Verb::Ban,
        "Unban" => Verb::Unban,
        _ => return None,
    };
    let ip = words.next()?.to_owned();
    let mut value = |key: &str| {
        words
            .next()
            .and_then(|w| w.strip_prefix(key))
            .and_then(|w| w.strip_prefix('='))
            .map(str::to_owned)
    };
    let jail = value("jail")?;
    let node = value("node")?;
    let id = value("id")?;
    let seq = value("seq")?.parse().ok()?;
    if words.next().is_some() {
        return None;
    }
    Some(Applied {
        verb,
        ip,
        jail,
        node,
        id,
        seq,
        pid: pid.parse().ok()?,
    })
}

/// A `log` action file read incrementally: each [`ActionLog::refresh`] reads only
/// what was appended since the last one, so polling a file of 10,000 lines costs
/// nothing.
#[derive(Debug)]
pub struct ActionLog {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
    entries: Vec<Applied>,
    /// Lines that are not the action's format (there must be none).
    bad: Vec<String>,
}

impl ActionLog {
    /// Follows `path` (which may not exist yet).
    pub fn new(path: &Path) -> ActionLog {
        ActionLog {
            path: path.to_owned(),
            offset: 0,
            partial: Vec::new(),
            entries: Vec::new(),
            bad: Vec::new(),
        }
    }

    /// Reads what was appended since the last call; returns every entry so far.
    pub fn refresh(&mut self) -> &[Applied] {
        let mut file = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return &self.entries,
            Err(e) => panic!("open {}: {e}", self.path.display()),
        };
        let mut data = Vec::new();
        file.seek(SeekFrom::Start(self.offset))
            .and_then(|_| file.read_to_end(&mut data))
            .unwrap_or_else(|e| panic!("read {}: {e}", self.path.display()));
        self.offset += data.len() as u64;
        self.partial.extend_from_slice(&data);
        let complete = match self.partial.iter().rposition(|&b| b == b'\n') {
            Some(i) => i + 1,
            None => return &self.entries,
        };
        let rest = self.partial.split_off(complete);
        let text = String::from_utf8_lossy(&self.partial).into_owned();
        self.partial = rest;
        for line in text.lines() {
            match parse_line(line) {
                Some(a) => self.entries.push(a),
                None => self.bad.push(line.to_owned()),
            }
        }
        &self.entries
    }

    /// The entries read so far.
    pub fn entries(&self) -> &[Applied] {
        &self.entries
    }

    /// Lines read so far that are not in the action's format.
    pub fn bad_lines(&self) -> &[String] {
        &self.bad
    }

    /// How many Ban lines each address has so far.
    pub fn ban_counts(&self) -> HashMap<&str, usize> {
        let mut counts = HashMap::new();
        for a in self.entries.iter().filter(|a| a.verb == Verb::Ban) {
            *counts.entry(a.ip.as_str()).or_insert(0) += 1;
        }
        counts
    }

    /// The addresses whose last line is a Ban: what the node holds banned.
    pub fn held(&self) -> HashSet<&str> {
        let mut last: HashMap<&str, Verb> = HashMap::new();
        for a in &self.entries {
            last.insert(a.ip.as_str(), a.verb);
        }
        last.into_iter()
            .filter(|(_, v)| *v == Verb::Ban)
            .map(|(ip, _)| ip)
            .collect()
    }

    /// How these bans compare with `expected`, the addresses this subscriber must
    /// have banned exactly once.
    pub fn tally(&self, expected: &HashSet<String>) -> Tally {
        let counts = self.ban_counts();
        Tally {
            sent: expected.len(),
            applied: counts.values().sum(),
            lost: expected
                .iter()
                .filter(|ip| !counts.contains_key(ip.as_str()))
                .count(),
            duplicated: counts.values().filter(|n| **n > 1).count(),
            unexpected: counts.keys().filter(|ip| !expected.contains(**ip)).count(),
        }
    }
}

/// Bans expected and applied on one subscriber; `Display` is the report line
/// `sent=N applied=N lost=N duplicated=N` (plus `unexpected=N` when some are).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// Bans this subscriber must apply (reported by the other nodes).
    pub sent: usize,
    /// Ban lines in its action file.
    pub applied: usize,
    /// Expected addresses never banned.
    pub lost: usize,
    /// Addresses banned more than once.
    pub duplicated: usize,
    /// Addresses banned that were not expected (its own node's, or unknown).
    pub unexpected: usize,
}

impl fmt::Display for Tally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sent={} applied={} lost={} duplicated={}",
            self.sent, self.applied, self.lost, self.duplicated
        )?;
        if self.unexpected > 0 {
            write!(f, " unexpected={}", self.unexpected)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = "2026-11-21 04:52:53,446 f2b-subscriber[4242]: Ban 203.0.113.5 jail=sshd node=web1 id=0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0 seq=17";

    #[test]
    fn parses_the_log_actions_lines() {
        let a = parse_line(LINE).expect("a line");
        assert_eq!(a.verb, Verb::Ban);
        assert_eq!(a.ip, "203.0.113.5");
        assert_eq!(a.jail, "sshd");
        assert_eq!(a.node, "web1");
        assert_eq!(a.id, "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0");
        assert_eq!(a.seq, 17);
        assert_eq!(a.pid, 4242);
        let unban = LINE
            .replace("]: Ban ", "]: Unban ")
            .replace("203.0.113.5", "2001:db8::1");
        let u = parse_line(&unban).expect("an unban");
        assert_eq!((u.verb, u.ip.as_str()), (Verb::Unban, "2001:db8::1"));
        for bad in [
            "",
            "garbage",
            &LINE.replace("]: Ban ", "]: Drop "),
            &LINE.replace(" seq=17", ""),
            &LINE.replace(" seq=17", " seq=x"),
            &format!("{LINE} extra"),
        ] {
            assert_eq!(parse_line(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn reads_incrementally_and_tallies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("applied.log");
        let mut log = ActionLog::new(&path);
        assert!(log.refresh().is_empty(), "a missing file is empty");
        let line = |verb: &str, ip: &str| {
            LINE.replace("]: Ban ", &format!("]: {verb} "))
                .replace("203.0.113.5", ip)
        };
        let mut text = format!(
            "{}\n{}\n",
            line("Ban", "192.0.2.1"),
            line("Ban", "192.0.2.2")
        );
        // A line still being written is read once complete.
        let cut = line("Ban", "192.0.2.1");
        text.push_str(&cut[..20]);
        std::fs::write(&path, &text).unwrap();
        assert_eq!(log.refresh().len(), 2);
        text.push_str(&cut[20..]);
        text.push('\n');
        text.push_str(&line("Unban", "192.0.2.2"));
        text.push('\n');
        std::fs::write(&path, &text).unwrap();
        assert_eq!(log.refresh().len(), 4);
        assert!(log.bad_lines().is_empty());
        assert_eq!(log.held(), HashSet::from(["192.0.2.1"]));
        let expected: HashSet<String> = ["192.0.2.1", "192.0.2.2", "192.0.2.3"]
            .map(String::from)
            .into();
        let t = log.tally(&expected);
        assert_eq!(t.to_string(), "sent=3 applied=3 lost=1 duplicated=1");
        assert_eq!(t.unexpected, 0);
    }
}
