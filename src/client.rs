//! The client side of the protocol, used by vmarctl and the tests.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::protocol::{Call, Reply, Request};

/// How long vmarctl waits, by default, for vmard to accept a request or send anything.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// A connection factory for one vmard socket.
#[derive(Clone, Debug)]
pub struct Client {
    socket: PathBuf,
    /// Longest wait for vmard to accept, take the request or send a line (`None`: forever).
    /// vmard sends a line at least every [`crate::protocol::HEARTBEAT`] while it works, so
    /// this bounds a hung vmard, not a long request.
    timeout: Option<Duration>,
}

impl Client {
    /// A client without a timeout.
    pub fn new(socket: impl Into<PathBuf>) -> Client {
        Client {
            socket: socket.into(),
            timeout: None,
        }
    }

    /// The same client, giving up when vmard is silent for `timeout` (`None`: never).
    pub fn with_timeout(mut self, timeout: Option<Duration>) -> Client {
        self.timeout = timeout.filter(|t| !t.is_zero());
        self
    }

    fn timed_out(&self) -> Error {
        Error::DaemonTimeout {
            socket: self.socket.clone(),
            seconds: self.timeout.map_or(0, |t| t.as_secs()),
        }
    }

    /// Connects; with a timeout, a vmard whose backlog is full (stopped, or not accepting)
    /// is retried until the timeout instead of blocking in connect().
    fn connect(&self) -> Result<UnixStream> {
        let deadline = self.timeout.map(|t| Instant::now() + t);
        loop {
            let error = match connect_nonblocking(&self.socket) {
                Ok(stream) => return Ok(stream),
                Err(e) => e,
            };
            if error.kind() == std::io::ErrorKind::PermissionDenied {
                // A permission error is not a stopped daemon: say how to get access instead.
                return Err(Error::SocketDenied {
                    socket: self.socket.clone(),
                });
            }
            if error.kind() != std::io::ErrorKind::WouldBlock {
                return Err(Error::DaemonUnavailable {
                    socket: self.socket.clone(),
                    error,
                });
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(self.timed_out());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends `request` and returns its result as JSON, passing progress lines to `progress`
    /// (for a request whose result the caller does not decode; else [`Client::call`]).
    pub fn call_raw(
        &self,
        request: &Request,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<serde_json::Value> {
        let mut stream = self.connect()?;
        // Timeouts per read and per write: vmard sends a line at least every HEARTBEAT while
        // it works, so silence for the whole timeout means it does not answer.
        stream
            .set_read_timeout(self.timeout)
            .and_then(|()| stream.set_write_timeout(self.timeout))
            .map_err(|e| Error::io("cannot set a timeout on", &self.socket, e))?;
        let mut line = serde_json::to_vec(request)
            .map_err(|e| Error::internal(format!("cannot encode request: {e}")))?;
        line.push(b'\n');
        // vmard may refuse a request before reading all of it (too large): then the write
        // fails, and its reply, already sent, says why.
        let write_error = stream.write_all(&line).err();
        if write_error.as_ref().is_some_and(is_timeout) {
            return Err(self.timed_out());
        }
        let reader = BufReader::new(stream);
        for line in reader.lines() {
            let line = match (line, &write_error) {
                (Ok(line), _) => line,
                (Err(e), _) if is_timeout(&e) => return Err(self.timed_out()),
                (Err(_), Some(_)) => break,
                (Err(e), None) => return Err(Error::io("cannot read reply from", &self.socket, e)),
            };
            let value: serde_json::Value = serde_json::from_str(&line)
                .map_err(|e| Error::Protocol(format!("bad reply from vmard: {e}: {line}")))?;
            // A line of a type this client does not know (a newer vmard) is skipped.
            let known = ["progress", "ok", "error", "working"];
            if !value["type"].as_str().is_some_and(|t| known.contains(&t)) {
                continue;
            }
            let reply: Reply = serde_json::from_value(value)
                .map_err(|e| Error::Protocol(format!("bad reply from vmard: {e}: {line}")))?;
            match reply {
                Reply::Progress(p) => progress(p),
                Reply::Working => {}
                Reply::Ok { result } => return Ok(result),
                Reply::Error { kind, message } => return Err(Error::Remote { kind, message }),
            }
        }
        if let Some(e) = write_error {
            return Err(Error::io("cannot send request to", &self.socket, e));
        }
        Err(Error::Protocol(
            "vmard closed the connection without a reply (see its log)".into(),
        ))
    }

    /// Sends `request` and returns its result, decoded as the type vmard answers that
    /// request with ([`Call::Reply`]); progress lines go to `progress`.
    pub fn call<C: Call>(
        &self,
        request: C,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<C::Reply> {
        let value = self.call_raw(&request.into(), progress)?;
        serde_json::from_value(value)
            .map_err(|e| Error::Protocol(format!("unexpected reply from vmard: {e}")))
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// connect() that fails with `WouldBlock` instead of waiting when the listener's backlog is
/// full; the stream returned blocks again.
fn connect_nonblocking(socket: &Path) -> std::io::Result<UnixStream> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket as open};
    let fd = open(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    let addr = UnixAddr::new(socket)?;
    connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr)?;
    let stream = UnixStream::from(fd);
    stream.set_nonblocking(false)?;
    Ok(stream)
}
