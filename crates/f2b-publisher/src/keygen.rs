//! `f2b-publisher keygen`: the publisher's Ed25519 signing key, or a monitor's
//! credential, drawn from the operating system's random source and written with
//! safe permissions.
//!
//! A file is created with mode 0600 and never through an existing path: without
//! `force` an existing file (or symbolic link) is refused; with `force` the new
//! file is written beside it under a temporary name and renamed over it, which
//! replaces a symbolic link rather than following it. A missing directory is
//! created with mode 0700.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use f2b_proto::auth::{MonitorSecret, SigningKey};
use f2b_proto::NodeName;

/// Where `keygen` writes the signing key by default.
pub const DEFAULT_KEY_PATH: &str = "/etc/fail2ban-cluster/publisher.key";

/// Why `keygen` failed. No variant carries a secret.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeygenError {
    #[error("cannot draw random bytes: {0}")]
    Random(String),
    #[error("--monitor {name:?}: not a node name: {source}")]
    Node {
        name: String,
        #[source]
        source: f2b_proto::ProtoError,
    },
    #[error("{path} exists; remove it or pass --force to replace it (what was made with it stops working)")]
    Exists { path: PathBuf },
    #[error("cannot create the directory {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn random<const N: usize>() -> Result<[u8; N], KeygenError> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| KeygenError::Random(e.to_string()))?;
    Ok(b)
}

/// Writes `text` to `path` with mode 0600 (see the module's documentation).
pub fn write_private(path: &Path, text: &str, force: bool) -> Result<(), KeygenError> {
    let write_err = |source| KeygenError::Write {
        path: path.to_owned(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|source| KeygenError::Dir {
                path: dir.clone(),
                source,
            })?;
    }
    let create = |p: &Path| -> std::io::Result<()> {
        // create_new is O_CREAT | O_EXCL: it fails on any existing name, a
        // symbolic link included, and so never follows one.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(p)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()
    };
    if !force {
        return create(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => KeygenError::Exists {
                path: path.to_owned(),
            },
            _ => write_err(e),
        });
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "key".to_owned());
    let tmp = dir.join(format!(".{name}.tmp-{}", hex::encode(random::<8>()?)));
    let written = create(&tmp).and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(write_err)
}

/// A TOML basic string holding `s`.
fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `keygen [--out PATH] [--force]`: draws a signing key, writes its file to `out`
/// and returns what to print: the line each subscriber's `[trust]` needs.
pub fn signing_key(out: &Path, force: bool) -> Result<String, KeygenError> {
    let key = SigningKey::from_seed(random::<32>()?);
    write_private(out, &key.to_file_text(), force)?;
    Ok(format!(
        "# {}: the publisher's signing key (keep it private; in the publisher's [trust]:\n\
         # signing_key_file = {})\n\
         # In each subscriber's [trust]:\n\
         publisher_key = {}\n",
        out.display(),
        toml_str(&out.display().to_string()),
        toml_str(&key.public().to_string()),
    ))
}

/// `keygen --monitor NODE [--out FILE] [--force]`: draws a credential for `node`,
/// writes it to `out` if given, and returns what to print: the line for the
/// publisher's `[trust.monitors]` and the one for the node's `[trust]` (with the
/// secret itself when there is no file).
pub fn monitor(node: &str, out: Option<&Path>, force: bool) -> Result<String, KeygenError> {
    let name = NodeName::new(node).map_err(|source| KeygenError::Node {
        name: node.to_owned(),
        source,
    })?;
    let secret = MonitorSecret::from_random(random::<32>()?);
    Ok(match out {
        Some(path) => {
            write_private(path, &format!("{}\n", secret.expose()), force)?;
            let file = toml_str(&path.display().to_string());
            format!(
                "# On the publisher, in [trust.monitors]:\n\
                 {name} = {{ secret_file = {file} }}\n\
                 # On {name}, in [trust] (copy the file there, mode 0600):\n\
                 secret_file = {file}\n"
            )
        }
        None => {
            let s = toml_str(secret.expose());
            format!(
                "# On the publisher, in [trust.monitors]:\n\
                 {name} = {s}\n\
                 # On {name}, in [trust]:\n\
                 secret = {s}\n"
            )
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn files_are_private_and_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/publisher.key");
        write_private(&path, "one\n", false).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let err = write_private(&path, "two\n", false).unwrap_err();
        assert!(matches!(err, KeygenError::Exists { .. }), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "one\n");
        write_private(&path, "two\n", true).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "two\n");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );

        // A symbolic link is refused, and with --force replaced, never followed.
        let target = dir.path().join("target");
        std::fs::write(&target, "untouched").unwrap();
        let link = dir.path().join("link.key");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(matches!(
            write_private(&link, "x\n", false),
            Err(KeygenError::Exists { .. })
        ));
        write_private(&link, "x\n", true).unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "untouched");
        assert!(!std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.contains(".tmp-")), "{names:?}");
    }

    #[test]
    fn toml_strings_are_escaped() {
        assert_eq!(toml_str("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000A\"");
        let v: toml::Value = toml::from_str(&format!("k = {}", toml_str("x\"\\\u{1}y"))).unwrap();
        assert_eq!(v["k"].as_str(), Some("x\"\\\u{1}y"));
    }
}
