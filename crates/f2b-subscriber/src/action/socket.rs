//! `action = "fail2ban-socket"`: the fail2ban-client commands sent straight to
//! fail2ban-server's Unix socket, without starting a fail2ban-client process (a
//! Python interpreter, tens of milliseconds) per call.
//!
//! The protocol, as fail2ban 1.0.2 speaks it (`client/csocket.py`,
//! `server/asyncserver.py`, `server/transmitter.py`): a request is a pickled list
//! of strings followed by [`END`]; the server answers each request with a pickled
//! tuple `(code, result)` followed by [`END`], and keeps the connection open for
//! more requests. Code 0: `result` is the command's value (`banip`/`unbanip`: a
//! count; `get J ignoreip`: a list of IPAddr objects, each pickled as
//! `builtins.str("...")`, read here as strings). Code 1: `result` is the exception
//! (`UnknownJailException('J')` for an unknown jail). A request the server cannot
//! unpickle is answered with the string `"ERROR: ..."`.
//!
//! One connection is kept and reused; after any failure it is dropped, and the
//! next call connects again. A call over a kept connection that fails before any
//! reply byte (the server restarted meanwhile) is sent once more over a fresh
//! connection (`banip`/`unbanip` are idempotent). Replies are bounded to
//! [`MAX_REPLY`] bytes and each exchange to the timeout.
//!
//! Failure scopes are those of `fail2ban-client` ([`super::fail2ban`]): no socket,
//! nobody listening, permission denied, timeout, an undecodable reply: the whole
//! call ([`FailureScope::Call`]); unknown jail: [`FailureScope::UnknownJail`], with
//! fail2ban-client's message `Sorry but the jail 'J' does not exist`; any other
//! exception: [`FailureScope::Undetermined`]. The jail's `ignoreip` is read with
//! `get J ignoreip` over the same socket (the reply list decoded here) and cached
//! for [`super::fail2ban::IGNOREIP_REFRESH`].

use std::io;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use f2b_proto::{Action, JailName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::time::Instant;

use super::fail2ban::{parse_ignore_entry, IgnoreCache, IgnoreList};
use super::pickle::{self, Value};
use super::{clip, Applier, BoxFuture, CallError, FailureScope, JailIgnores};
use crate::pending::Item;

/// The end of every request and reply.
pub const END: &[u8] = b"<F2B_END_COMMAND>";
/// The largest reply accepted.
pub const MAX_REPLY: usize = 1 << 20;
/// How long one exchange (connect, send, receive) may take.
pub const SOCKET_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest message kept in a log line.
const MAX_MESSAGE: usize = 512;

/// The fail2ban-socket action.
#[derive(Debug)]
pub struct Fail2banSocket {
    socket: PathBuf,
    timeout: Duration,
    conn: Option<UnixStream>,
    ignores: IgnoreCache,
}

/// How one exchange failed.
enum Failure {
    /// Before any reply byte over a reused connection: worth one fresh attempt.
    Stale(CallError),
    Final(CallError),
}

impl Fail2banSocket {
    /// Talks to fail2ban-server at `socket`.
    pub fn new(socket: PathBuf) -> Self {
        Fail2banSocket {
            socket,
            timeout: SOCKET_TIMEOUT,
            conn: None,
            ignores: IgnoreCache::default(),
        }
    }

    /// Sets the time limit of one exchange.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The command of a ban or unban call.
    pub fn set_command(jail: &JailName, action: Action, ips: &[IpAddr]) -> Vec<String> {
        let mut cmd = vec![
            "set".to_owned(),
            jail.as_str().to_owned(),
            match action {
                Action::Ban => "banip",
                Action::Unban => "unbanip",
            }
            .to_owned(),
        ];
        cmd.extend(ips.iter().map(ToString::to_string));
        cmd
    }

    /// Sends `cmd` and returns the result of a code-0 reply.
    pub async fn command(&mut self, cmd: &[String]) -> Result<Value, CallError> {
        let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
        let mut request = pickle::encode_str_list(&args);
        request.extend_from_slice(END);
        let reused = self.conn.is_some();
        let reply = match self.exchange(&request, reused).await {
            Ok(r) => r,
            Err(Failure::Stale(e)) => {
                tracing::debug!(error = %e, "fail2ban socket connection lost, connecting again");
                self.exchange(&request, false).await.map_err(|f| match f {
                    Failure::Stale(e) | Failure::Final(e) => e,
                })?
            }
            Err(Failure::Final(e)) => return Err(e),
        };
        let value = match pickle::decode(&reply) {
            Ok(v) => v,
            Err(e) => {
                self.conn = None;
                return Err(CallError::new(
                    FailureScope::Call,
                    format!("undecodable reply from fail2ban-server: {e}"),
                ));
            }
        };
        interpret(value)
    }

    /// Connects if needed, sends `request`, reads one reply (without [`END`]).
    async fn exchange(&mut self, request: &[u8], reused: bool) -> Result<Vec<u8>, Failure> {
        let timeout = self.timeout;
        let socket = self.socket.clone();
        let conn = self.conn.take();
        let result = tokio::time::timeout(timeout, async move {
            let mut stream = match conn {
                Some(s) => s,
                None => UnixStream::connect(&socket)
                    .await
                    .map_err(|e| (connect_error(&socket, &e), false))?,
            };
            let io_err = |e: io::Error, read_any: bool| {
                (
                    format!("fail2ban-server socket {}: {e}", socket.display()),
                    read_any,
                )
            };
            stream
                .write_all(request)
                .await
                .map_err(|e| io_err(e, false))?;
            let mut reply = Vec::new();
            let mut buf = [0u8; 16 * 1024];
            loop {
                let n = stream
                    .read(&mut buf)
                    .await
                    .map_err(|e| io_err(e, !reply.is_empty()))?;
                if n == 0 {
                    return Err((
                        format!(
                            "fail2ban-server closed the connection ({})",
                            socket.display()
                        ),
                        !reply.is_empty(),
                    ));
                }
                reply.extend_from_slice(&buf[..n]);
                if reply.ends_with(END) {
                    reply.truncate(reply.len() - END.len());
                    return Ok((stream, reply));
                }
                if reply.len() > MAX_REPLY {
                    return Err((
                        format!("fail2ban-server reply longer than {MAX_REPLY} bytes"),
                        true,
                    ));
                }
            }
        })
        .await;
        match result {
            Ok(Ok((stream, reply))) => {
                self.conn = Some(stream);
                Ok(reply)
            }
            Ok(Err((message, read_any))) => {
                let e = CallError::new(FailureScope::Call, clip(message, MAX_MESSAGE));
                if reused && !read_any {
                    Err(Failure::Stale(e))
                } else {
                    Err(Failure::Final(e))
                }
            }
            Err(_) => Err(Failure::Final(CallError::new(
                FailureScope::Call,
                format!(
                    "fail2ban-server ({}) did not answer within {timeout:?}",
                    self.socket.display()
                ),
            ))),
        }
    }

    async fn fetch_ignores(&mut self, jail: &JailName) -> Result<IgnoreList, CallError> {
        let cmd = ["get", jail.as_str(), "ignoreip"].map(str::to_owned);
        let value = self.command(&cmd).await?;
        let items = value.as_seq().ok_or_else(|| {
            CallError::new(
                FailureScope::Call,
                format!(
                    "unexpected ignoreip reply from fail2ban-server: {}",
                    value.describe(MAX_MESSAGE)
                ),
            )
        })?;
        let mut list = IgnoreList::default();
        for item in items {
            let entry = match item {
                Value::Str(s) => s.trim().to_owned(),
                other => other.describe(100),
            };
            if entry.is_empty() {
                continue;
            }
            match parse_ignore_entry(&entry) {
                Some(net) => list.nets.push(net),
                None => list.names.push(entry),
            }
        }
        Ok(list)
    }
}

/// The message fail2ban-client gives for a connect failure, so that logs read alike.
fn connect_error(socket: &std::path::Path, e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::NotFound => format!(
            "Failed to access socket path: {}. Is fail2ban running?",
            socket.display()
        ),
        _ => format!(
            "[{e}] Unable to contact server at {}. Is it running?",
            socket.display()
        ),
    }
}

/// A decoded reply: the result, or the error with its scope.
pub fn interpret(value: Value) -> Result<Value, CallError> {
    if let Value::Str(s) = &value {
        // The server could not read the request.
        return Err(CallError::new(
            FailureScope::Call,
            clip(format!("fail2ban-server: {s}"), MAX_MESSAGE),
        ));
    }
    let pair = match value.as_seq() {
        Some([code, result]) => Some((code, result)),
        _ => None,
    };
    match pair {
        Some((Value::Int(0), result)) => Ok(result.clone()),
        Some((Value::Int(1), err)) => Err(error_of(err)),
        _ => Err(CallError::new(
            FailureScope::Call,
            format!(
                "unexpected reply from fail2ban-server: {}",
                value.describe(MAX_MESSAGE)
            ),
        )),
    }
}

/// The scope and message of an exception sent by the server.
fn error_of(err: &Value) -> CallError {
    if let Some((class, args)) = err.as_object() {
        if class == "UnknownJailException" {
            let jail = match args.as_seq() {
                Some([Value::Str(j), ..]) => j.clone(),
                _ => args.describe(100),
            };
            return CallError::new(
                FailureScope::UnknownJail,
                clip(
                    format!("Sorry but the jail '{jail}' does not exist"),
                    MAX_MESSAGE,
                ),
            );
        }
    }
    CallError::new(
        FailureScope::Undetermined,
        format!("NOK: {}", err.describe(MAX_MESSAGE)),
    )
}

impl Applier for Fail2banSocket {
    fn name(&self) -> &'static str {
        "fail2ban-socket"
    }

    fn max_batch(&self) -> usize {
        crate::pending::MAX_BATCH
    }

    fn apply<'a>(
        &'a mut self,
        jail: &'a JailName,
        action: Action,
        items: &'a [Item],
    ) -> BoxFuture<'a, Result<(), CallError>> {
        Box::pin(async move {
            let ips: Vec<IpAddr> = items.iter().map(Item::ip).collect();
            let cmd = Self::set_command(jail, action, &ips);
            self.command(&cmd).await.map(|_| ())
        })
    }

    fn jail_ignores<'a>(
        &'a mut self,
        jail: &'a JailName,
    ) -> BoxFuture<'a, Result<JailIgnores, CallError>> {
        Box::pin(async move {
            let now = Instant::now();
            if let Some(list) = self.ignores.fresh(jail, now) {
                return Ok(list);
            }
            let list = self.fetch_ignores(jail).await?;
            Ok(self.ignores.store(jail, now, list))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interprets_replies() {
        let ok = pickle::decode(b"\x80\x05\x95\x07\x00\x00\x00\x00\x00\x00\x00K\x00K\x03\x86\x94.")
            .unwrap();
        assert_eq!(interpret(ok).unwrap(), Value::Int(3));
        let unknown = pickle::decode(b"\x80\x05\x95A\x00\x00\x00\x00\x00\x00\x00K\x01\x8c\x13fail2ban.exceptions\x94\x8c\x14UnknownJailException\x94\x93\x94\x8c\x06nojail\x94\x85\x94R\x94\x86\x94.").unwrap();
        let e = interpret(unknown).unwrap_err();
        assert_eq!(e.scope, FailureScope::UnknownJail);
        assert_eq!(e.message, "Sorry but the jail 'nojail' does not exist");
        let other = pickle::decode(b"\x80\x05\x95<\x00\x00\x00\x00\x00\x00\x00K\x01\x8c\x08builtins\x94\x8c\tException\x94\x93\x94\x8c\x17not banned: ['1.2.3.4']\x94\x85\x94R\x94\x86\x94.").unwrap();
        let e = interpret(other).unwrap_err();
        assert_eq!(e.scope, FailureScope::Undetermined);
        assert_eq!(e.message, "NOK: Exception(\"not banned: ['1.2.3.4']\")");
        let load = Value::Str("ERROR: pickle data was truncated".into());
        assert_eq!(interpret(load).unwrap_err().scope, FailureScope::Call);
        assert_eq!(
            interpret(Value::None).unwrap_err().scope,
            FailureScope::Call
        );
    }

    #[tokio::test]
    async fn missing_socket_fails_the_whole_call() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("none.sock");
        let mut c = Fail2banSocket::new(path.clone());
        let err = c
            .jail_ignores(&JailName::new("sshd").unwrap())
            .await
            .unwrap_err();
        assert_eq!(err.scope, FailureScope::Call);
        assert!(
            err.message.contains("Failed to access socket path"),
            "{err}"
        );
        assert!(err.message.contains(&path.display().to_string()), "{err}");
    }

    /// A fake server that answers with garbage, then with an oversized reply: both
    /// are whole-call failures, never a panic.
    #[tokio::test]
    async fn bad_replies_are_call_failures() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fake.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let _ = s.read(&mut buf).await.unwrap();
            s.write_all(b"\x80\x05garbage<F2B_END_COMMAND>")
                .await
                .unwrap();
            let (mut s, _) = listener.accept().await.unwrap();
            let _ = s.read(&mut buf).await.unwrap();
            let big = vec![b'x'; MAX_REPLY + 10];
            let _ = s.write_all(&big).await;
        });
        let mut c = Fail2banSocket::new(path);
        let jail = JailName::new("sshd").unwrap();
        let e = c.jail_ignores(&jail).await.unwrap_err();
        assert_eq!(e.scope, FailureScope::Call);
        assert!(e.message.contains("undecodable"), "{e}");
        let e = c.jail_ignores(&jail).await.unwrap_err();
        assert_eq!(e.scope, FailureScope::Call);
        assert!(e.message.contains("longer than"), "{e}");
        server.await.unwrap();
    }
}
