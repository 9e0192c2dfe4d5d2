//! Converts a fail2ban-zmq-tools `fail2ban-cluster.conf` (INI) into this project's
//! TOML configuration, with a comment for every setting that has no equivalent.
//!
//! The result speaks the legacy protocol wherever the old tool did, so that the
//! converted machine keeps working with the old peers it had; comments say what to
//! change once the rest of the cluster has moved.

use std::fmt::Write as _;

use crate::config;

/// Why an old configuration cannot be converted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LegacyConfigError {
    #[error("not an INI file: {0}")]
    Syntax(String),
    #[error("no [monitor], [publisher] or [subscriber] section")]
    Empty,
    #[error("the converted configuration is invalid ({0}); please report this")]
    Invalid(String),
}

fn quote(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn is_true(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "true" | "yes" | "on" | "1"
    )
}

struct Section<'a> {
    props: Option<&'a ini::Properties>,
}

impl Section<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        let props = self.props?;
        props
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.trim())
            .filter(|v| !v.is_empty())
    }

    fn unknown_keys(&self, known: &[&str]) -> Vec<String> {
        self.props
            .map(|p| {
                p.iter()
                    .filter(|(k, _)| !known.iter().any(|n| k.eq_ignore_ascii_case(n)))
                    .map(|(k, v)| format!("{k} = {v}"))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Converts the text of an old configuration. `source` names it in the header.
pub fn convert(ini_text: &str, source: &str) -> Result<String, LegacyConfigError> {
    let opts = ini::ParseOption {
        enabled_quote: false,
        enabled_escape: false,
        ..Default::default()
    };
    let ini = ini::Ini::load_from_str_opt(ini_text, opts)
        .map_err(|e| LegacyConfigError::Syntax(e.to_string()))?;
    let section = |name: &'static str| Section {
        props: ini
            .iter()
            .find(|(s, _)| s.is_some_and(|s| s.eq_ignore_ascii_case(name)))
            .map(|(_, p)| p),
    };
    let monitor = section("monitor");
    let publisher = section("publisher");
    let subscriber = section("subscriber");
    if monitor.props.is_none() && publisher.props.is_none() && subscriber.props.is_none() {
        return Err(LegacyConfigError::Empty);
    }

    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(
        w,
        "# fail2ban-cluster.conf, converted from the fail2ban-zmq-tools configuration {source}."
    );
    let _ = writeln!(
        w,
        "# Every setting of the old file is carried over or commented below. Check it with"
    );
    let _ = writeln!(
        w,
        "# `f2b-publisher --check --config THIS_FILE`; the shipped fail2ban-cluster.conf documents"
    );
    let _ = writeln!(w, "# every key.\n");
    let _ = writeln!(w, "[node]");
    let _ = writeln!(
        w,
        "# The old tools used the machine's host name; so does this file when `name` is not set."
    );
    let _ = writeln!(w, "# name = \"{}\"\n", config::hostname().replace('"', ""));

    let mut notes = Vec::new();
    let pidfile_note = |s: &Section, w: &mut String| {
        if let Some(p) = s.get("pidfile") {
            let _ = writeln!(w, "# Written with --daemon (the old tool always wrote it).");
            let _ = writeln!(w, "pidfile = {}", quote(p));
        }
    };

    if monitor.props.is_some() {
        let _ = writeln!(w, "[monitor]");
        if let Some(v) = monitor.get("fail2banlogpath") {
            let _ = writeln!(w, "log_path = {}", quote(v));
        }
        if let Some(v) = monitor.get("zmqreplyserver") {
            let _ = writeln!(w, "publisher = {}", quote(v));
        }
        let _ = writeln!(w, "# The old monitor ignored the jail `fail2bancluster`, where its subscribers' bans landed.");
        let _ = writeln!(w, "ignore_jails = [\"fail2bancluster\", \"cluster\"]");
        let _ = writeln!(w, "# Report in the old format, so an old publisher understands. f2b-publisher understands");
        let _ = writeln!(
            w,
            "# both: once the hub runs it, remove `legacy` and `legacy_token` to get event ids,"
        );
        let _ = writeln!(w, "# times, IPv6 and de-duplication.");
        let _ = writeln!(w, "legacy = true");
        if monitor.get("auth").is_some_and(is_true) {
            if let Some(t) = monitor.get("authtoken") {
                let _ = writeln!(w, "legacy_token = {}", quote(t));
            } else {
                notes.push("[monitor] auth = true but no authtoken: set legacy_token".to_owned());
            }
        }
        pidfile_note(&monitor, w);
        for k in monitor.unknown_keys(&[
            "pidfile",
            "zmqreplyserver",
            "fail2banlogpath",
            "auth",
            "authtoken",
        ]) {
            let _ = writeln!(w, "# no equivalent, not carried over: {k}");
        }
        let _ = writeln!(w);
    }

    if publisher.props.is_some() {
        let _ = writeln!(w, "[publisher]");
        if let Some(v) = publisher.get("replybindurl") {
            let _ = writeln!(w, "# Monitors report here, old and new alike.");
            let _ = writeln!(w, "reply_bind = {}", quote(v));
        }
        let old_pub = publisher
            .get("broadcasterbindurl")
            .unwrap_or("tcp://*:5680");
        let _ = writeln!(
            w,
            "# Old subscribers cannot read this project's messages, so they keep the old address,"
        );
        let _ = writeln!(
            w,
            "# which now carries copies of every event in the old format, and new subscribers get"
        );
        let _ = writeln!(
            w,
            "# a new one. Once every subscriber is migrated, set broadcast_bind to the old address"
        );
        let _ = writeln!(w, "# and remove legacy_broadcast_bind.");
        let _ = writeln!(w, "broadcast_bind = {}", quote(&next_port(old_pub)));
        let _ = writeln!(w, "# Accept reports from old monitors.");
        let _ = writeln!(w, "legacy = true");
        if publisher.get("auth").is_some_and(is_true) {
            if let Some(t) = publisher.get("authtoken") {
                let _ = writeln!(w, "legacy_token = {}", quote(t));
            } else {
                notes.push("[publisher] auth = true but no authtoken: set legacy_token".to_owned());
            }
        }
        let _ = writeln!(w, "legacy_broadcast_bind = {}", quote(old_pub));
        pidfile_note(&publisher, w);
        for k in publisher.unknown_keys(&[
            "pidfile",
            "broadcasterbindurl",
            "replybindurl",
            "auth",
            "authtoken",
        ]) {
            let _ = writeln!(w, "# no equivalent, not carried over: {k}");
        }
        let _ = writeln!(w);
    }

    if subscriber.props.is_some() {
        let _ = writeln!(w, "[subscriber]");
        if let Some(v) = subscriber.get("zmqpublisherurl") {
            let _ = writeln!(w, "publisher = {}", quote(v));
        }
        let _ = writeln!(w, "# Follow an old publisher (one-frame `host|jail|Ban|ip` messages). Remove once the hub");
        let _ = writeln!(
            w,
            "# runs f2b-publisher, and point `publisher` at its broadcast_bind."
        );
        let _ = writeln!(w, "legacy = true");
        if let Some(v) = subscriber.get("zmqprefixfilter") {
            let v = v.trim_matches('"');
            let _ = writeln!(w, "# zmqprefixfilter = {v:?}: the old subscriber never used it; `jails` filters by jail.");
        }
        match subscriber
            .get("subscriberaction")
            .map(|a| a.to_ascii_lowercase())
        {
            Some(a) if a == "log" => {
                let _ = writeln!(w, "# The old `log` action wrote to syslog (auth.log) for its fail2bancluster jail. This");
                let _ = writeln!(
                    w,
                    "# one writes log_path, which fail2ban/jail.d/fail2ban-cluster.conf's"
                );
                let _ = writeln!(w, "# [fail2ban-cluster-log] jail reads. Or apply bans directly: action = \"fail2ban-client\".");
                let _ = writeln!(w, "action = \"log\"");
                let _ = writeln!(w, "log_path = \"/var/log/fail2ban-cluster.log\"");
            }
            Some(a) => {
                let _ = writeln!(w, "# subscriberaction = {a:?} was never implemented by the old tool; applying through");
                let _ = writeln!(w, "# fail2ban-client instead.");
                let _ = writeln!(w, "action = \"fail2ban-client\"");
                let _ = writeln!(w, "ban_jail = \"cluster\"");
            }
            None => {}
        }
        pidfile_note(&subscriber, w);
        for k in subscriber.unknown_keys(&[
            "pidfile",
            "zmqpublisherurl",
            "zmqprefixfilter",
            "subscriberaction",
        ]) {
            let _ = writeln!(w, "# no equivalent, not carried over: {k}");
        }
        let _ = writeln!(w);
    }

    for (name, props) in ini.iter() {
        let Some(name) = name else { continue };
        if !["monitor", "publisher", "subscriber"]
            .iter()
            .any(|s| s.eq_ignore_ascii_case(name))
        {
            let keys = props.iter().map(|(k, _)| k).collect::<Vec<_>>().join(", ");
            notes.push(format!("section [{name}] has no equivalent ({keys})"));
        }
    }
    // fail2ban-zmq-tools had no credentials or signatures (at most a token in plain
    // text): a converted configuration runs as it did, which must be said explicitly.
    let _ = writeln!(w, "[trust]");
    let _ = writeln!(
        w,
        "# fail2ban-zmq-tools authenticated nothing (at most a plaintext token), so this"
    );
    let _ = writeln!(
        w,
        "# configuration runs without credentials and signatures, and the daemons warn about"
    );
    let _ = writeln!(
        w,
        "# it at start. Once every node runs fail2ban-cluster, give the hub a key and each"
    );
    let _ = writeln!(
        w,
        "# node a credential (`f2b-publisher keygen`, `f2b-publisher keygen --monitor NODE`)"
    );
    let _ = writeln!(
        w,
        "# and remove this line (see fail2ban-cluster.conf, [trust])."
    );
    let _ = writeln!(w, "allow_unauthenticated = true");
    let _ = writeln!(w);
    for n in notes {
        let _ = writeln!(w, "# NOTE: {n}");
    }

    // The output must be a valid configuration: check it as the daemons would.
    config::parse(&out)
        .and_then(|raw| {
            raw.validate(|| "converted".into())
                .map_err(|e| e.to_string())
        })
        .map_err(LegacyConfigError::Invalid)?;
    Ok(out)
}

/// `tcp://*:5680` -> `tcp://*:5681`: the native broadcast address beside a legacy one.
fn next_port(endpoint: &str) -> String {
    match endpoint.rsplit_once(':') {
        Some((head, port)) => match port.parse::<u16>() {
            Ok(p) if p < u16::MAX => format!("{head}:{}", p + 1),
            _ => format!("{head}:*"),
        },
        None => endpoint.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layout of fail2ban-zmq-tools' own example, inline comments included (which
    /// Python's configparser would have kept in the values).
    const OLD: &str = "\
# comment
[monitor]
pidfile = /var/run/fail2ban-monitor.pid
zmqreplyserver = tcp://hub.example.org:5678
fail2banlogpath = /var/log/fail2ban.log
auth = true
authtoken = s3cret

[subscriber]
pidfile = /var/run/fail2ban-subscriber.pid
zmqpublisherurl = tcp://hub.example.org:5680
zmqprefixfilter = \"\" #empty prefix filter by default
subscriberaction = log

[publisher]
pidfile = /var/run/fail2ban-publisher.pid
broadcasterbindurl = tcp://*:5680   # address to which subscribers will connect
replybindurl = tcp://*:5678      # address to which Monitors will send messages
auth = true
authtoken = s3cret
colour = blue
";

    #[test]
    fn converts_every_section() {
        let out = convert(OLD, "old.conf").unwrap();
        let cfg = config::parse(&out)
            .unwrap()
            .validate(|| "n".into())
            .unwrap();
        assert_eq!(cfg.monitor.publisher.as_str(), "tcp://hub.example.org:5678");
        assert_eq!(cfg.monitor.log_path.to_str(), Some("/var/log/fail2ban.log"));
        let legacy = cfg.monitor.legacy.unwrap();
        assert_eq!(legacy.token.unwrap().expose(), "s3cret");
        assert_eq!(cfg.publisher.reply_bind.as_str(), "tcp://*:5678");
        assert_eq!(cfg.publisher.broadcast_bind.as_str(), "tcp://*:5681");
        assert_eq!(
            cfg.publisher.legacy_broadcast_bind.unwrap().as_str(),
            "tcp://*:5680"
        );
        assert!(cfg.subscriber.legacy);
        assert_eq!(cfg.subscriber.action.name(), "log");
        assert_eq!(
            cfg.subscriber.publisher[0].as_str(),
            "tcp://hub.example.org:5680"
        );
        assert!(
            out.contains("# no equivalent, not carried over: colour = blue"),
            "{out}"
        );
        assert!(out.contains("zmqprefixfilter"), "{out}");
        // The old tool authenticated nothing: the converted file says so explicitly,
        // and every daemon can start with it.
        assert!(cfg.trust.allow_unauthenticated, "{out}");
        assert!(cfg.trust.require_publisher().is_ok());
        assert!(cfg.trust.require_monitor().is_ok());
        assert!(cfg.trust.require_subscriber().is_ok());
    }

    #[test]
    fn refuses_what_is_not_an_old_config() {
        assert!(matches!(
            convert("[other]\na = 1\n", "x"),
            Err(LegacyConfigError::Empty)
        ));
        assert!(convert("[monitor\n", "x").is_err());
    }
}
