//! vmard's socket server: a local Unix socket, one thread per connection, one request per
//! connection, clients checked with SO_PEERCRED.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{PermissionsExt, chown};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use nix::unistd::{Gid, Uid, User, getgrouplist};

use crate::catalog::Catalog;
use crate::error::{Error, Result};
use crate::protocol::{MAX_REQUEST_BYTES, Reply, Request};
use crate::roots::ImageRoots;
use crate::service::{self, Context};

/// Where vmard keeps its catalog unless told otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/vmar";
/// Where vmard listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/vmar/vmard.sock";

/// Who may use the socket besides root and the user vmard runs as.
#[derive(Clone, Copy, Debug, Default)]
pub struct Access {
    pub group: Option<Gid>,
}

impl Access {
    /// Checks the peer of `stream` with SO_PEERCRED.
    fn check(&self, stream: &UnixStream) -> Result<()> {
        let creds = getsockopt(stream, PeerCredentials)
            .map_err(|e| Error::PermissionDenied(format!("cannot read peer credentials: {e}")))?;
        let uid = Uid::from_raw(creds.uid());
        if uid.is_root() || uid == Uid::effective() {
            return Ok(());
        }
        if let Some(group) = self.group {
            if Gid::from_raw(creds.gid()) == group || user_in_group(uid, group) {
                return Ok(());
            }
        }
        Err(Error::PermissionDenied(format!(
            "uid {uid} may not use vmard (only root{})",
            match self.group {
                Some(g) => format!(" and members of group {g}"),
                None => String::new(),
            }
        )))
    }
}

fn user_in_group(uid: Uid, group: Gid) -> bool {
    let Ok(Some(user)) = User::from_uid(uid) else {
        return false;
    };
    let Ok(name) = std::ffi::CString::new(user.name) else {
        return false;
    };
    getgrouplist(&name, user.gid)
        .map(|groups| groups.contains(&group))
        .unwrap_or(false)
}

/// A bound vmard socket with its catalog, ready to serve.
pub struct Server {
    listener: UnixListener,
    socket: PathBuf,
    context: Arc<Context>,
    access: Access,
}

impl Server {
    /// Opens the catalog in `state_dir` and binds `socket` (replacing a stale one). The socket
    /// is mode 0600, or 0660 owned by `access.group` when a group is configured.
    pub fn bind(
        state_dir: &Path,
        socket: &Path,
        access: Access,
        max_targets: u64,
        roots: ImageRoots,
    ) -> Result<Server> {
        let context = Arc::new(Context {
            catalog: Catalog::open(state_dir)?,
            max_targets,
            roots,
        });
        if let Some(dir) = socket.parent() {
            fs::create_dir_all(dir).map_err(|e| Error::io("cannot create socket dir", dir, e))?;
        }
        if socket.exists() {
            if UnixStream::connect(socket).is_ok() {
                return Err(Error::io(
                    "another vmard already listens on",
                    socket,
                    std::io::Error::from(std::io::ErrorKind::AddrInUse),
                ));
            }
            fs::remove_file(socket)
                .map_err(|e| Error::io("cannot remove stale socket", socket, e))?;
        }
        let listener =
            UnixListener::bind(socket).map_err(|e| Error::io("cannot bind", socket, e))?;
        let mode = if access.group.is_some() { 0o660 } else { 0o600 };
        fs::set_permissions(socket, fs::Permissions::from_mode(mode))
            .map_err(|e| Error::io("cannot set mode of", socket, e))?;
        if let Some(group) = access.group {
            chown(socket, None, Some(group.as_raw()))
                .map_err(|e| Error::io("cannot set group of", socket, e))?;
        }
        Ok(Server {
            listener,
            socket: socket.to_path_buf(),
            context,
            access,
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn catalog(&self) -> &Catalog {
        &self.context.catalog
    }

    /// Serves clients until the process ends.
    pub fn run(self) -> Result<()> {
        for stream in self.listener.incoming() {
            let stream = match stream {
                Ok(stream) => stream,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    continue;
                }
            };
            let context = Arc::clone(&self.context);
            let access = self.access;
            std::thread::spawn(move || serve_connection(&context, access, stream));
        }
        Ok(())
    }
}

fn send(stream: &mut UnixStream, reply: &Reply) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(reply).map_err(std::io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)
}

fn serve_connection(context: &Context, access: Access, mut stream: UnixStream) {
    let mut captured = false;
    // The request line is read before the check, so that the client finishes writing and
    // sees the refusal instead of a broken pipe; it is parsed only once the peer is allowed.
    let line = read_line(&stream);
    let outcome = access.check(&stream).and_then(|()| {
        let request = parse_request(&line?)?;
        captured = matches!(request, Request::Capture { .. });
        tracing::info!(?request, "request");
        let mut writer = stream
            .try_clone()
            .map_err(|e| Error::io("cannot clone", "socket", e))?;
        // A client that went away does not stop the work: the catalog change still completes.
        let mut progress = |p: crate::catalog::Progress| {
            let _ = send(
                &mut writer,
                &Reply::Progress {
                    done: p.done,
                    total: p.total,
                },
            );
        };
        service::handle(context, request, &mut progress)
    });
    let reply = match outcome {
        Ok(result) => Reply::Ok { result },
        Err(e) => {
            tracing::warn!(kind = e.kind(), "request failed: {e}");
            Reply::Error {
                kind: e.kind().to_string(),
                message: e.to_string(),
            }
        }
    };
    if let Err(e) = send(&mut stream, &reply) {
        tracing::debug!("client went away before the reply: {e}");
    }
    drop(stream);
    if captured && let Err(e) = context.catalog.compact_index() {
        tracing::warn!("index compaction failed (retried after the next capture): {e}");
    }
}

fn read_line(stream: &UnixStream) -> Result<String> {
    // A client that connects and never sends a request must not hold a thread forever.
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .map_err(|e| Error::io("cannot set timeout on", "socket", e))?;
    let mut line = String::new();
    let mut reader = BufReader::new(stream.take(MAX_REQUEST_BYTES));
    reader
        .read_line(&mut line)
        .map_err(|e| Error::Protocol(format!("cannot read request: {e}")))?;
    if !line.ends_with('\n') {
        return Err(Error::Protocol(
            "request must be one JSON line of at most 1 MiB".into(),
        ));
    }
    Ok(line)
}

fn parse_request(line: &str) -> Result<Request> {
    serde_json::from_str(line).map_err(|e| Error::Protocol(format!("bad request: {e}")))
}
