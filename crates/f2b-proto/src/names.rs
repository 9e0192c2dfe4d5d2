//! Validated names: nodes (RFC 1123 host names) and fail2ban jails.

use std::fmt;
use std::str::FromStr;

use crate::error::{ProtoError, Shown};
use crate::{MAX_JAIL_LEN, MAX_NODE_LEN};

/// A node's name: an RFC 1123 host name (labels of ASCII letters, digits and hyphens,
/// 1 to 63 long, not starting or ending with a hyphen, at most 253 in all), stored in
/// lower case since host names compare case-insensitively.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeName(String);

impl NodeName {
    /// Validates `value` as a node name.
    pub fn new(value: &str) -> Result<Self, ProtoError> {
        let bad = |reason| ProtoError::InvalidNode {
            value: Shown::new(value),
            reason,
        };
        if value.is_empty() {
            return Err(bad("empty"));
        }
        if value.len() > MAX_NODE_LEN {
            return Err(bad("longer than 253 bytes"));
        }
        for label in value.split('.') {
            if label.is_empty() {
                return Err(bad("empty label"));
            }
            if label.len() > 63 {
                return Err(bad("label longer than 63 bytes"));
            }
            if !label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            {
                return Err(bad("only letters, digits, hyphens and dots are allowed"));
            }
            if label.starts_with('-') || label.ends_with('-') {
                return Err(bad("a label starts or ends with a hyphen"));
            }
        }
        Ok(NodeName(value.to_ascii_lowercase()))
    }

    /// The name, in lower case.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for NodeName {
    type Err = ProtoError;
    fn from_str(s: &str) -> Result<Self, ProtoError> {
        NodeName::new(s)
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A fail2ban jail name: 1 to 64 characters, ASCII letters, digits and `_ - . @ + :`,
/// starting with a letter or a digit.
///
/// fail2ban itself takes any section name, but real jails are named like `sshd`,
/// `nginx-http-auth` or `postfix-sasl`. The daemons pass jail names to programs as
/// one argv element, never through a shell; the names are restricted anyway, because
/// they also reach an exec action's argv and the administrators' scripts behind it:
/// a name from the network can hold no shell metacharacter, quote, slash, white
/// space or control character, and cannot pass for an option (`-h`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JailName(String);

impl JailName {
    /// Validates `value` as a jail name.
    pub fn new(value: &str) -> Result<Self, ProtoError> {
        let bad = |reason| ProtoError::InvalidJail {
            value: Shown::new(value),
            reason,
        };
        if value.is_empty() {
            return Err(bad("empty"));
        }
        if value.len() > MAX_JAIL_LEN {
            return Err(bad("longer than 64 bytes"));
        }
        if value.chars().any(|c| c.is_whitespace()) {
            return Err(bad("contains whitespace"));
        }
        if value.chars().any(|c| c.is_control()) {
            return Err(bad("contains a control character"));
        }
        if !value.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad("only printable ASCII is allowed"));
        }
        if value.contains(['[', ']']) {
            return Err(bad("contains '[' or ']'"));
        }
        // Jail names reach command lines (fail2ban-client's argv, an exec action's
        // argv, administrators' scripts): no shell metacharacters, quotes or
        // slashes, and no leading '-' that a program could take for an option.
        if !value.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'@' | b'+' | b':')
        }) {
            return Err(bad(
                "only letters, digits and _ - . @ + : are allowed (no shell metacharacters)",
            ));
        }
        if !value.as_bytes()[0].is_ascii_alphanumeric() {
            return Err(bad("must start with a letter or a digit"));
        }
        Ok(JailName(value.to_owned()))
    }

    /// The name as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for JailName {
    type Err = ProtoError;
    fn from_str(s: &str) -> Result<Self, ProtoError> {
        JailName::new(s)
    }
}

impl fmt::Display for JailName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names() {
        for ok in ["web1", "WEB-1.example.org", "a", "x1.y2", &"a".repeat(63)] {
            assert!(NodeName::new(ok).is_ok(), "{ok}");
        }
        assert_eq!(NodeName::new("Web1").unwrap().as_str(), "web1");
        let long = [
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(63),
        ]
        .join(".");
        for bad in [
            "",
            "-web",
            "web-",
            "we b",
            "web_1",
            "a..b",
            ".a",
            "a.",
            "wéb",
            "a;rm -rf /",
            "web\n1",
            &"a".repeat(64),
            &long,
        ] {
            let err = NodeName::new(bad).unwrap_err();
            assert!(matches!(err, ProtoError::InvalidNode { .. }), "{bad:?}");
        }
    }

    #[test]
    fn jail_names() {
        for ok in [
            "sshd",
            "nginx-http-auth",
            "recidive",
            "a.b_c:d@e+f",
            "manual",
            "2fa",
            "sshd-ddos",
        ] {
            assert!(JailName::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "ss hd",
            "sshd\n",
            "tab\there",
            "nul\0",
            "esc\x1b[31m",
            "a]",
            "[a",
            "ünï",
            &"j".repeat(65),
            "a/b",
            "../etc",
            "-h",
            ".hidden",
            "$(reboot)",
            "`id`",
            "a;b",
            "a|b",
            "a&b",
            "a'b",
            "a\"b",
            "a>b",
            "a*",
            "a\\b",
        ] {
            let err = JailName::new(bad).unwrap_err();
            assert!(matches!(err, ProtoError::InvalidJail { .. }), "{bad:?}");
        }
    }

    #[test]
    fn error_names_value_escaped_and_truncated() {
        let err = NodeName::new("evil\nline").unwrap_err().to_string();
        assert!(err.contains(r#""evil\nline""#), "{err}");
        let err = JailName::new(&"x ".repeat(100)).unwrap_err().to_string();
        assert!(err.contains('…') && err.len() < 200, "{err}");
    }
}
