//! The wire format of fail2ban-zmq-tools, the Python tool this project replaces, so
//! that sites can migrate one machine at a time.
//!
//! A legacy message is one frame of text, `hostname|jail|action|ip`, or
//! `token|hostname|jail|action|ip` when the publisher demands a token. The rules
//! below are those of fail2ban-zmq-tools' own validation:
//!
//! - 4 or 5 `|`-separated fields;
//! - hostname per RFC 1123: labels of letters, digits and hyphens, 1 to 63 long, not
//!   starting or ending with a hyphen, at most 255 in all (one trailing dot allowed);
//! - action `ban` or `unban`, any case (`Ban`, `Unban`, `UnBan`...);
//! - ip accepted by the C library's `inet_aton`: IPv4 only, including its short and
//!   numeric forms (`10.1` is 10.0.0.1, `0x7f.1` is 127.0.0.1), anything after white
//!   space ignored;
//! - jail matching `^[a-zA-Z0-9_-]*$`.
//!
//! A native message is a JSON object and starts with `{`, which no legacy message
//! can (a host name has no `{`), so the two are told apart by their first byte.

use std::net::Ipv4Addr;

use crate::event::Action;

/// The largest legacy request the old publisher accepted (its `ZMQ_MAXMSGSIZE`).
pub const MAX_LEGACY_MESSAGE: usize = 64;

/// Whether `bytes` is a legacy message rather than a native (JSON) one.
pub fn is_legacy(bytes: &[u8]) -> bool {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    first != Some(&b'{')
}

/// Why a legacy message was refused. The old publisher answered every one of these
/// with the bare string `NAK`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LegacyError {
    #[error("not UTF-8 text")]
    NotText,
    #[error("{0} fields (expected 4, or 5 with a token)")]
    FieldCount(usize),
    #[error("wrong or missing token")]
    BadToken,
    #[error("invalid host name {0:?}")]
    Host(String),
    #[error("invalid jail {0:?}")]
    Jail(String),
    #[error("invalid action {0:?}")]
    Action(String),
    #[error("invalid IPv4 address {0:?}")]
    Ip(String),
}

/// A valid legacy message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacyMessage {
    pub host: String,
    pub jail: String,
    /// The action word as sent (`Ban`, `UnBan`...).
    pub action_word: String,
    pub action: Action,
    /// The address text as sent (`10.1`).
    pub ip_text: String,
    /// What `inet_aton` makes of it (10.0.0.1).
    pub ip: Ipv4Addr,
    /// The message without its token, exactly as the old publisher echoed it to the
    /// monitor and broadcast it.
    pub wire: String,
}

/// The legacy text of an event: `host|jail|Ban|ip` or `host|jail|Unban|ip`, as an old
/// monitor would have sent it.
pub fn format(host: &str, jail: &str, action: Action, ip: Ipv4Addr) -> String {
    let word = match action {
        Action::Ban => "Ban",
        Action::Unban => "Unban",
    };
    format!("{host}|{jail}|{word}|{ip}")
}

/// Parses and validates a legacy message as the old publisher did. With `token` set,
/// the message must have 5 fields, the first being the token (compared in constant
/// time), and the other four are validated and echoed. Without a token, the first
/// four fields are validated and the whole message is echoed, a fifth field included
/// (the old publisher ignored it too).
pub fn parse(bytes: &[u8], token: Option<&str>) -> Result<LegacyMessage, LegacyError> {
    let text = std::str::from_utf8(bytes).map_err(|_| LegacyError::NotText)?;
    let fields: Vec<&str> = text.split('|').collect();
    let (rest, wire) = match (fields.len(), token) {
        (5, Some(t)) if constant_time_eq(fields[0].as_bytes(), t.as_bytes()) => {
            (&fields[1..], fields[1..].join("|"))
        }
        (4, Some(_)) | (5, Some(_)) => return Err(LegacyError::BadToken),
        (4, None) | (5, None) => (&fields[..4], text.to_owned()),
        (n, _) => return Err(LegacyError::FieldCount(n)),
    };
    let [host, jail, action_word, ip_text] = [rest[0], rest[1], rest[2], rest[3]];
    if !valid_hostname(host) {
        return Err(LegacyError::Host(host.into()));
    }
    if !jail
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(LegacyError::Jail(jail.into()));
    }
    let action = match action_word.to_ascii_lowercase().as_str() {
        "ban" => Action::Ban,
        "unban" => Action::Unban,
        _ => return Err(LegacyError::Action(action_word.into())),
    };
    let ip = inet_aton(ip_text).ok_or_else(|| LegacyError::Ip(ip_text.into()))?;
    Ok(LegacyMessage {
        host: host.into(),
        jail: jail.into(),
        action_word: action_word.into(),
        action,
        ip_text: ip_text.into(),
        ip,
        wire,
    })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// RFC 1123 host name as fail2ban-zmq-tools checks it.
pub fn valid_hostname(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() || host.len() > 255 {
        return false;
    }
    host.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    })
}

/// The C library's `inet_aton`: one to four parts separated by dots, each decimal,
/// octal (leading `0`) or hexadecimal (`0x`); the last part fills the remaining bytes.
/// Parsing stops at white space; anything else after the address is an error.
pub fn inet_aton(s: &str) -> Option<Ipv4Addr> {
    let end = s.find(|c: char| c.is_ascii_whitespace()).unwrap_or(s.len());
    let addr = &s[..end];
    if addr.is_empty() {
        return None;
    }
    let parts: Vec<&str> = addr.split('.').collect();
    if parts.len() > 4 {
        return None;
    }
    let mut values = Vec::with_capacity(4);
    for p in &parts {
        values.push(parse_part(p)?);
    }
    let (last, init) = values.split_last()?;
    let mut n: u32 = 0;
    for (i, v) in init.iter().enumerate() {
        if *v > 0xff {
            return None;
        }
        n |= v << (24 - 8 * i);
    }
    let room_bits = 32 - 8 * init.len() as u32;
    if room_bits < 32 && *last >= (1u32 << room_bits) {
        return None;
    }
    Some(Ipv4Addr::from(n | last))
}

fn parse_part(p: &str) -> Option<u32> {
    if p.is_empty() {
        return None;
    }
    let (digits, radix) = if let Some(h) = p.strip_prefix("0x").or_else(|| p.strip_prefix("0X")) {
        (h, 16)
    } else if p.len() > 1 && p.starts_with('0') {
        (&p[1..], 8)
    } else {
        (p, 10)
    };
    if !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        // from_str_radix would take a leading '+'; inet_aton does not.
        return None;
    }
    if digits.is_empty() {
        // "0x" alone is 0 for glibc.
        return (radix == 16).then_some(0);
    }
    u32::from_str_radix(digits, radix).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inet_aton_forms() {
        let cases = [
            ("1.2.3.4", Some("1.2.3.4")),
            ("10.1", Some("10.0.0.1")),
            ("10.1.2", Some("10.1.0.2")),
            ("167772161", Some("10.0.0.1")),
            ("0x7f.1", Some("127.0.0.1")),
            ("010.0.0.1", Some("8.0.0.1")),
            ("1.2.3.4 trailing", Some("1.2.3.4")),
            ("255.255.255.255", Some("255.255.255.255")),
            ("256.1.1.1", None),
            ("1.2.3.256", None),
            ("1.2.65536", None),
            ("1.2.3.4.5", None),
            ("1..2", None),
            ("", None),
            ("1.2.3.4x", None),
            ("08.1.1.1", None),
            ("+1.2.3.4", None),
            ("1.+2.3.4", None),
            ("2001:db8::1", None),
            ("example.org", None),
        ];
        for (input, want) in cases {
            assert_eq!(
                inet_aton(input).map(|a| a.to_string()),
                want.map(String::from),
                "{input:?}"
            );
        }
    }

    #[test]
    fn parses_like_the_old_publisher() {
        let m = parse(b"web1|sshd|UnBan|10.1", None).unwrap();
        assert_eq!(m.action, Action::Unban);
        assert_eq!(m.ip, Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(m.wire, "web1|sshd|UnBan|10.1");
        let m = parse(b"s3cret|web1|sshd|Ban|192.0.2.1", Some("s3cret")).unwrap();
        assert_eq!(m.wire, "web1|sshd|Ban|192.0.2.1");
        let m = parse(b"web1|sshd|Ban|192.0.2.1|extra", None).unwrap();
        assert_eq!(
            (m.host.as_str(), m.wire.as_str()),
            ("web1", "web1|sshd|Ban|192.0.2.1|extra")
        );
        assert_eq!(
            parse(b"web1|sshd|Ban|192.0.2.1", Some("s3cret")),
            Err(LegacyError::BadToken)
        );
        assert_eq!(
            parse(b"wrong|web1|sshd|Ban|192.0.2.1", Some("s3cret")),
            Err(LegacyError::BadToken)
        );
        for bad in [
            &b"web1|sshd|Ban"[..],
            b"a|b|c|d|e|f",
            b"|sshd|Ban|1.2.3.4",
            b"-web|sshd|Ban|1.2.3.4",
            b"web_1|sshd|Ban|1.2.3.4",
            b"web1|ss hd|Ban|1.2.3.4",
            b"web1|sshd;rm|Ban|1.2.3.4",
            b"web1|sshd|Drop|1.2.3.4",
            b"web1|sshd|Ban|2001:db8::1",
            b"web1|sshd|Ban|\xff",
        ] {
            assert!(
                parse(bad, None).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(
            parse(b"web1||Ban|1.2.3.4", None).is_ok(),
            "empty jail matches ^[..]*$"
        );
    }

    #[test]
    fn tells_legacy_from_native() {
        assert!(is_legacy(b"web1|sshd|Ban|1.2.3.4"));
        assert!(!is_legacy(br#"{"v":1}"#));
        assert!(!is_legacy(b"  {"));
        assert!(is_legacy(b""));
    }

    #[test]
    fn formats_events() {
        assert_eq!(
            format("web1", "sshd", Action::Ban, Ipv4Addr::new(192, 0, 2, 1)),
            "web1|sshd|Ban|192.0.2.1"
        );
    }
}
