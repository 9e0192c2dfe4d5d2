//! The systemd units shipped in `systemd/`: each is read as an INI file and checked
//! for the settings the daemons rely on (always), and `systemd-analyze verify`
//! accepts them (the `systemd_*` test, which needs systemd-analyze).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use f2b_common::config::defaults;
use f2b_tests::bins;

/// The daemons, each with its unit's expectations: the state directory and the
/// pidfile of the configuration's defaults.
const DAEMONS: [(&str, &str, &str); 3] = [
    (
        "f2b-monitor",
        defaults::MONITOR_STATE_DIR,
        defaults::MONITOR_PIDFILE,
    ),
    (
        "f2b-publisher",
        defaults::PUBLISHER_STATE_DIR,
        defaults::PUBLISHER_PIDFILE,
    ),
    (
        "f2b-subscriber",
        defaults::SUBSCRIBER_STATE_DIR,
        defaults::SUBSCRIBER_PIDFILE,
    ),
];

fn units_dir() -> PathBuf {
    bins::workspace_root().join("systemd")
}

/// A unit file: section -> key -> every value given (systemd keys may repeat).
type Unit = BTreeMap<String, BTreeMap<String, Vec<String>>>;

/// Reads a unit file the way systemd does for these simple files: `[Section]`
/// headers, `Key=value` lines, `#` and `;` comments. Panics on anything else
/// (including line continuations, which the shipped units do not use).
fn parse_unit(path: &Path) -> Unit {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut unit = Unit::new();
    let mut section: Option<String> = None;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        assert!(
            !line.ends_with('\\'),
            "{}:{}: line continuations are not expected",
            path.display(),
            n + 1
        );
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = Some(name.to_owned());
            unit.entry(name.to_owned()).or_default();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("{}:{}: not Key=value: {line}", path.display(), n + 1));
        let section = section
            .as_ref()
            .unwrap_or_else(|| panic!("{}:{}: key outside a section", path.display(), n + 1));
        unit.get_mut(section)
            .expect("section inserted at its header")
            .entry(key.trim().to_owned())
            .or_default()
            .push(value.trim().to_owned());
    }
    unit
}

/// The last value of `key` in `section` (the one systemd uses for a scalar key).
fn value<'a>(unit: &'a Unit, name: &str, section: &str, key: &str) -> &'a str {
    unit.get(section)
        .and_then(|s| s.get(key))
        .and_then(|v| v.last())
        .unwrap_or_else(|| panic!("{name}: [{section}] {key}= is missing"))
}

/// Every word of every value of a list key (`After=a b` and `After=c` give a, b, c).
fn words<'a>(unit: &'a Unit, section: &str, key: &str) -> Vec<&'a str> {
    unit.get(section)
        .and_then(|s| s.get(key))
        .map(|vs| vs.iter().flat_map(|v| v.split_whitespace()).collect())
        .unwrap_or_default()
}

#[test]
fn units_are_the_three_daemons() {
    let mut found: Vec<String> = std::fs::read_dir(units_dir())
        .expect("systemd/ exists")
        .map(|e| e.expect("readable directory").file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".service"))
        .collect();
    found.sort();
    let expected: Vec<String> = DAEMONS
        .iter()
        .map(|(d, _, _)| format!("{d}.service"))
        .collect();
    assert_eq!(found, expected, "the units in systemd/");
}

#[test]
fn units_declare_what_the_daemons_need() {
    for (daemon, state_dir, pidfile) in DAEMONS {
        let name = format!("{daemon}.service");
        let unit = parse_unit(&units_dir().join(&name));
        let name = name.as_str();

        // Foreground, with the default configuration file, restarted on failure.
        let exec: Vec<&str> = value(&unit, name, "Service", "ExecStart")
            .split_whitespace()
            .collect();
        assert_eq!(
            exec,
            [
                &format!("/usr/local/bin/{daemon}"),
                "--config",
                defaults::CONFIG_PATH
            ],
            "{name}: ExecStart"
        );
        // The daemons send READY=1 and STOPPING=1 (f2b_common::daemon::notify_ready).
        assert_eq!(value(&unit, name, "Service", "Type"), "notify", "{name}");
        assert_eq!(
            value(&unit, name, "Service", "Restart"),
            "on-failure",
            "{name}"
        );
        // f2b-publisher reloads its configuration on SIGHUP; the others do not.
        if daemon == "f2b-publisher" {
            assert_eq!(
                value(&unit, name, "Service", "ExecReload"),
                "/bin/kill -HUP $MAINPID",
                "{name}: ExecReload"
            );
        } else {
            assert!(
                !unit["Service"].contains_key("ExecReload"),
                "{name}: ExecReload= declared but SIGHUP reload is not implemented"
            );
        }

        // The directories of the configuration's defaults.
        let state = format!(
            "/var/lib/{}",
            value(&unit, name, "Service", "StateDirectory")
        );
        assert_eq!(state, state_dir, "{name}: StateDirectory= vs state_dir");
        let run_dir = Path::new(pidfile)
            .parent()
            .expect("pidfile has a directory");
        let runtime = format!("/run/{}", value(&unit, name, "Service", "RuntimeDirectory"));
        assert_eq!(Path::new(&runtime), run_dir, "{name}: RuntimeDirectory=");
        // Shared by the three units: one stopping must not remove it under the others.
        assert_eq!(
            value(&unit, name, "Service", "RuntimeDirectoryPreserve"),
            "yes",
            "{name}"
        );

        // Hardening.
        for (key, expected) in [
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("ProtectHome", "yes"),
            ("PrivateTmp", "yes"),
            ("ProtectKernelTunables", "yes"),
            ("ProtectKernelModules", "yes"),
            ("ProtectKernelLogs", "yes"),
            ("ProtectControlGroups", "yes"),
            ("LockPersonality", "yes"),
            ("MemoryDenyWriteExecute", "yes"),
            ("RestrictSUIDSGID", "yes"),
            ("CapabilityBoundingSet", ""),
        ] {
            assert_eq!(
                value(&unit, name, "Service", key),
                expected,
                "{name}: {key}="
            );
        }
        let families = words(&unit, "Service", "RestrictAddressFamilies");
        for family in ["AF_INET", "AF_INET6", "AF_UNIX"] {
            assert!(
                families.contains(&family),
                "{name}: RestrictAddressFamilies= lacks {family}"
            );
        }
        assert!(
            words(&unit, "Service", "SystemCallFilter").contains(&"@system-service"),
            "{name}: SystemCallFilter=@system-service"
        );

        // Ordering and installation.
        let after = words(&unit, "Unit", "After");
        assert!(after.contains(&"network-online.target"), "{name}: After=");
        assert!(
            words(&unit, "Unit", "Wants").contains(&"network-online.target"),
            "{name}: Wants=network-online.target"
        );
        if daemon != "f2b-publisher" {
            assert!(
                after.contains(&"fail2ban.service"),
                "{name}: After=fail2ban.service"
            );
        }
        assert_eq!(
            value(&unit, name, "Install", "WantedBy"),
            "multi-user.target",
            "{name}"
        );
    }

    // Who each one runs as.
    let unit = |d: &str| parse_unit(&units_dir().join(format!("{d}.service")));
    let publisher = unit("f2b-publisher");
    assert_eq!(
        value(&publisher, "publisher", "Service", "DynamicUser"),
        "yes"
    );
    let monitor = unit("f2b-monitor");
    assert_eq!(value(&monitor, "monitor", "Service", "DynamicUser"), "yes");
    assert!(
        words(&monitor, "Service", "SupplementaryGroups").contains(&"adm"),
        "the monitor reads /var/log/fail2ban.log, root:adm 0640 on Debian"
    );
    let subscriber = unit("f2b-subscriber");
    assert_eq!(value(&subscriber, "subscriber", "Service", "User"), "root");
    assert!(
        words(&subscriber, "Unit", "Wants").contains(&"fail2ban.service"),
        "the subscriber applies bans through fail2ban-server"
    );
    assert!(
        words(&subscriber, "Service", "RestrictAddressFamilies").contains(&"AF_NETLINK"),
        "the subscriber lists the host's addresses (getifaddrs uses netlink)"
    );
}

/// `systemd-analyze` in PATH.
fn systemd_analyze() -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join("systemd-analyze"))
        .find(|p| p.is_file())
}

/// `systemd-analyze verify` on copies of the units whose ExecStart= names the built
/// binaries (verify requires the program to exist). Fails, never passes, without
/// systemd-analyze: scripts/test skips `systemd_*` tests when it is missing.
#[test]
fn systemd_analyze_verify_accepts_the_units() {
    let Some(analyze) = systemd_analyze() else {
        if std::env::var("F2B_REQUIRE_SYSTEMD").as_deref() == Ok("1") {
            panic!("F2B_REQUIRE_SYSTEMD=1 but systemd-analyze is not in PATH");
        }
        eprintln!(
            "\n********** SKIPPED: this test needs systemd-analyze (package systemd) **********\n"
        );
        panic!("systemd-analyze not found: run scripts/test, which skips the systemd_* tests");
    };
    let dir = tempfile::tempdir().expect("temporary directory");
    let mut files = Vec::new();
    for (daemon, _, _) in DAEMONS {
        let text = std::fs::read_to_string(units_dir().join(format!("{daemon}.service")))
            .expect("unit readable");
        let installed = format!("ExecStart=/usr/local/bin/{daemon} ");
        assert!(text.contains(&installed), "{daemon}: {installed}");
        let built = format!("ExecStart={} ", bins::bin_path(daemon).display());
        let path = dir.path().join(format!("{daemon}.service"));
        std::fs::write(&path, text.replace(&installed, &built)).expect("write unit copy");
        files.push(path);
    }
    let out = Command::new(&analyze)
        .arg("verify")
        .arg("--man=no")
        .args(&files)
        .output()
        .expect("run systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed ({}):\n{stderr}",
        out.status
    );
    // Unknown or unparsable settings are only warnings ("..., ignoring"): none
    // may concern our units.
    let ours: Vec<&str> = stderr.lines().filter(|l| l.contains("f2b-")).collect();
    assert!(
        ours.is_empty(),
        "systemd-analyze verify warned about the units:\n{}",
        ours.join("\n")
    );
}
