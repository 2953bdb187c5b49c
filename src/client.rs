//! The client side of the protocol, used by vmarctl and the tests.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use crate::protocol::Progress;
use crate::protocol::{Reply, Request};

/// A connection factory for one vmard socket.
#[derive(Clone, Debug)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Client {
        Client {
            socket: socket.into(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends `request` and returns its result, passing progress lines to `progress`.
    pub fn call_raw(
        &self,
        request: &Request,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<serde_json::Value> {
        let mut stream = UnixStream::connect(&self.socket).map_err(|error| {
            // A permission error is not a stopped daemon: say how to get access instead.
            if error.kind() == std::io::ErrorKind::PermissionDenied {
                Error::SocketDenied {
                    socket: self.socket.clone(),
                }
            } else {
                Error::DaemonUnavailable {
                    socket: self.socket.clone(),
                    error,
                }
            }
        })?;
        let mut line = serde_json::to_vec(request)
            .map_err(|e| Error::Protocol(format!("cannot encode request: {e}")))?;
        line.push(b'\n');
        // vmard may refuse a request before reading all of it (too large): then the write
        // fails, and its reply, already sent, says why.
        let write_error = stream.write_all(&line).err();
        let reader = BufReader::new(stream);
        for line in reader.lines() {
            let line = match (line, &write_error) {
                (Ok(line), _) => line,
                (Err(_), Some(_)) => break,
                (Err(e), None) => return Err(Error::io("cannot read reply from", &self.socket, e)),
            };
            let reply: Reply = serde_json::from_str(&line)
                .map_err(|e| Error::Protocol(format!("bad reply from vmard: {e}: {line}")))?;
            match reply {
                Reply::Progress { done, total } => progress(Progress { done, total }),
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

    /// Like [`Client::call_raw`], decoding the result as `T`.
    pub fn call<T: DeserializeOwned>(
        &self,
        request: &Request,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<T> {
        let value = self.call_raw(request, progress)?;
        serde_json::from_value(value)
            .map_err(|e| Error::Protocol(format!("unexpected reply from vmard: {e}")))
    }
}
