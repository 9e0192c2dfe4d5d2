//! Log lines as fail2ban 1.0.2 and sshd write them, stamped with the current local
//! time (fail2ban logs local time without a zone).

use chrono::Local;

/// The PID the fake fail2ban lines carry.
pub const FAKE_PID: u32 = 4994;

/// One fail2ban.log line: `%(asctime)s %(name)-24s[%(process)d]: %(levelname)-7s
/// %(message)s`, for instance `fail2ban_line("fail2ban.actions", "NOTICE", "[sshd] Ban
/// 203.0.113.5")`.
pub fn fail2ban_line(logger: &str, level: &str, message: &str) -> String {
    format!(
        "{} {logger:<24}[{FAKE_PID}]: {level:<7} {message}",
        Local::now().format("%Y-%m-%d %H:%M:%S,%3f")
    )
}

/// `[jail] Ban ip`, as fail2ban.actions logs a ban.
pub fn ban(jail: &str, ip: &str) -> String {
    fail2ban_line("fail2ban.actions", "NOTICE", &format!("[{jail}] Ban {ip}"))
}

/// `[jail] Unban ip`.
pub fn unban(jail: &str, ip: &str) -> String {
    fail2ban_line(
        "fail2ban.actions",
        "NOTICE",
        &format!("[{jail}] Unban {ip}"),
    )
}

/// `[jail] Restore Ban ip` (a ban restored from the database at start).
pub fn restore_ban(jail: &str, ip: &str) -> String {
    fail2ban_line(
        "fail2ban.actions",
        "NOTICE",
        &format!("[{jail}] Restore Ban {ip}"),
    )
}

/// What fail2ban 1.0.2 writes when it stops a jail whose action can flush (every
/// firewall action): `Flush ticket(s) with <action>`, one Unban per active ban, then
/// `Jail 'x' stopped`.
pub fn stop_sequence(jail: &str, action: &str, banned: &[&str]) -> Vec<String> {
    let mut lines = vec![fail2ban_line(
        "fail2ban.actions",
        "NOTICE",
        &format!("[{jail}] Flush ticket(s) with {action}"),
    )];
    lines.extend(banned.iter().map(|ip| unban(jail, ip)));
    lines.push(fail2ban_line(
        "fail2ban.jail",
        "INFO",
        &format!("Jail '{jail}' stopped"),
    ));
    lines
}

/// `Jail 'x' started`.
pub fn jail_started(jail: &str) -> String {
    fail2ban_line("fail2ban.jail", "INFO", &format!("Jail '{jail}' started"))
}

/// One failed ssh password, as sshd logs it to auth.log (syslog format).
pub fn sshd_failed_password(ip: &str) -> String {
    format!(
        "{} host sshd[123]: Failed password for root from {ip} port 22 ssh2",
        Local::now().format("%b %e %H:%M:%S")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_have_fail2bans_layout() {
        let l = ban("sshd", "203.0.113.5");
        let re = regex::Regex::new(
            r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} fail2ban\.actions        \[4994\]: NOTICE  \[sshd\] Ban 203\.0\.113\.5$",
        )
        .unwrap();
        assert!(re.is_match(&l), "{l:?}");
        let stop = stop_sequence("sshd", "iptables-multiport", &["192.0.2.1"]);
        assert_eq!(stop.len(), 3);
        assert!(stop[0].ends_with("NOTICE  [sshd] Flush ticket(s) with iptables-multiport"));
        assert!(stop[2].ends_with("fail2ban.jail           [4994]: INFO    Jail 'sshd' stopped"));
        assert!(sshd_failed_password("192.0.2.9")
            .ends_with(" host sshd[123]: Failed password for root from 192.0.2.9 port 22 ssh2"));
    }
}
