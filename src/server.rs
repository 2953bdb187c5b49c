//! vmard's socket server: a local Unix socket, one thread per connection (at most
//! [`MAX_CONNECTIONS`] at once, a share of them per uid: [`crate::clients`]), one request
//! per connection, clients checked with SO_PEERCRED before anything is read and logged with
//! their uid and pid. A second, read-only socket (mode 0666, as libvirt's
//! `libvirt-sock-ro`) serves any local user the requests that only read
//! ([`Request::is_read_only`]): monitoring needs no access to device changes.
//! [`Server::run`] returns when [`Stopper::stop`] is called (SIGTERM), after the requests
//! in flight have finished or been cancelled.

use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{PermissionsExt, chown};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use nix::unistd::{Gid, Uid, User, getgrouplist};

pub use crate::clients::MAX_CONNECTIONS;
use crate::clients::{Heartbeat, Replies, Slots};
use crate::error::{Error, Result};
use crate::protocol::{Reply, Request};
use crate::service::{self, Context};

/// Where vmard keeps its catalog unless told otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/vmar";
/// Most connections of the read-only socket served at once (within [`MAX_CONNECTIONS`]).
pub const MAX_READ_ONLY_CONNECTIONS: usize = 8;
/// How long a stop waits for requests in flight before giving up on them.
const STOP_GRACE: Duration = Duration::from_secs(30);

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
        if let Some(group) = self.group
            && (Gid::from_raw(creds.gid()) == group || user_in_group(uid, group))
        {
            return Ok(());
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

/// Connections in flight, by uid, and a way to wait for them.
#[derive(Default)]
struct InFlight {
    count: Mutex<Slots>,
    done: Condvar,
    /// Of `count`, connections of the read-only socket: anyone may open those, so they get
    /// a share of their own and cannot take every slot from root.
    read_only: AtomicUsize,
}

impl InFlight {
    /// Takes a slot for a connection of `uid`; the reason to answer `busy` when there is
    /// none (all taken, the uid's share, or the read-only socket's share).
    fn enter(
        &self,
        uid: u32,
        privileged: bool,
        read_only: bool,
    ) -> std::result::Result<(), String> {
        if read_only && self.read_only.fetch_add(1, Ordering::SeqCst) >= MAX_READ_ONLY_CONNECTIONS {
            self.read_only.fetch_sub(1, Ordering::SeqCst);
            return Err(format!(
                "{MAX_READ_ONLY_CONNECTIONS} requests of the read-only socket are in progress"
            ));
        }
        let mut slots = self.count.lock().unwrap_or_else(|p| p.into_inner());
        let taken = slots.take(uid, privileged);
        if taken.is_err() && read_only {
            self.read_only.fetch_sub(1, Ordering::SeqCst);
        }
        taken
    }

    /// Gives back the slot of a finished connection.
    fn leave(&self, uid: u32, privileged: bool, read_only: bool) {
        if read_only {
            self.read_only.fetch_sub(1, Ordering::SeqCst);
        }
        let mut slots = self.count.lock().unwrap_or_else(|p| p.into_inner());
        slots.give_back(uid, privileged);
        self.done.notify_all();
    }
}

/// Stops a running [`Server`] from another thread (a signal handler thread).
#[derive(Clone)]
pub struct Stopper {
    listener_fds: Vec<i32>,
}

impl Stopper {
    /// Stops accepting, lets the requests in flight finish (captures stop at their next
    /// batch), then makes [`Server::run`] return.
    pub fn stop(&self) {
        crate::shutdown::request();
        // Wakes the accept() of run(); the listeners are closed when run() returns.
        for fd in &self.listener_fds {
            let _ = nix::sys::socket::shutdown(*fd, nix::sys::socket::Shutdown::Both);
        }
    }
}

/// A bound vmard socket with its catalog, ready to serve.
pub struct Server {
    listener: UnixListener,
    socket: PathBuf,
    /// The read-only socket and its path, when there is one.
    read_only: Option<(UnixListener, PathBuf)>,
    context: Arc<Context>,
    access: Access,
    in_flight: Arc<InFlight>,
    refused: AtomicUsize,
    heartbeat: Arc<Heartbeat>,
}

impl Server {
    /// Binds `socket` (replacing a stale one) for `context`. The socket is mode 0600, or
    /// 0660 owned by `access.group` when a group is configured.
    pub fn bind(context: Context, socket: &Path, access: Access) -> Result<Server> {
        let listener = listen(socket)?;
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
            read_only: None,
            context: Arc::new(context),
            access,
            in_flight: Arc::new(InFlight::default()),
            refused: AtomicUsize::new(0),
            heartbeat: Heartbeat::start()?,
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Also listens on `socket` (mode 0666) for read-only requests from anyone.
    pub fn bind_read_only(&mut self, socket: &Path) -> Result<()> {
        let listener = listen(socket)?;
        fs::set_permissions(socket, fs::Permissions::from_mode(0o666))
            .map_err(|e| Error::io("cannot set mode of", socket, e))?;
        self.read_only = Some((listener, socket.to_path_buf()));
        Ok(())
    }

    /// The read-only socket, if any.
    pub fn read_only_socket(&self) -> Option<&Path> {
        self.read_only.as_ref().map(|(_, path)| path.as_path())
    }

    pub fn context(&self) -> &Arc<Context> {
        &self.context
    }

    /// A handle that stops [`Server::run`].
    pub fn stopper(&self) -> Stopper {
        let mut listener_fds = vec![self.listener.as_raw_fd()];
        listener_fds.extend(self.read_only.as_ref().map(|(l, _)| l.as_raw_fd()));
        Stopper { listener_fds }
    }

    /// Serves clients until stopped; then waits for the requests in flight (at most 30 s),
    /// and removes the socket. The catalog closes when the server is dropped.
    pub fn run(&self) -> Result<()> {
        std::thread::scope(|scope| {
            if let Some((listener, _)) = &self.read_only {
                let spawned = std::thread::Builder::new()
                    .name("vmard-ro-accept".into())
                    .spawn_scoped(scope, || self.accept(listener, true));
                if let Err(e) = spawned {
                    tracing::error!("cannot serve the read-only socket: {e}");
                }
            }
            self.accept(&self.listener, false);
        });
        let _ = fs::remove_file(&self.socket);
        if let Some((_, path)) = &self.read_only {
            let _ = fs::remove_file(path);
        }
        let count = self
            .in_flight
            .count
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let (count, timeout) = self
            .in_flight
            .done
            .wait_timeout_while(count, STOP_GRACE, |n| n.total() > 0)
            .unwrap_or_else(|p| p.into_inner());
        if timeout.timed_out() {
            tracing::warn!(
                in_flight = count.total(),
                "stopping with requests still running"
            );
        }
        Ok(())
    }

    /// Accepts clients of `listener` until stopped.
    fn accept(&self, listener: &UnixListener, read_only: bool) {
        for stream in listener.incoming() {
            if crate::shutdown::requested() {
                break;
            }
            let stream = match stream {
                Ok(stream) => stream,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            self.dispatch(stream, read_only);
        }
    }

    /// Serves `stream` on a thread of its own, or answers `busy` when too many are open,
    /// its uid holds its share, or the read-only socket holds its own.
    fn dispatch(&self, mut stream: UnixStream, read_only: bool) {
        // Who connected is known at accept (SO_PEERCRED), before anything is read.
        let uid = match getsockopt(&stream, PeerCredentials) {
            Ok(creds) => creds.uid(),
            Err(e) => {
                tracing::warn!("cannot read a client's credentials: {e}");
                return;
            }
        };
        let privileged = uid == 0 || uid == Uid::effective().as_raw();
        if let Err(why) = self.in_flight.enter(uid, privileged, read_only) {
            refuse(&mut stream, &self.refused, uid, why);
            return;
        }
        let context = Arc::clone(&self.context);
        let in_flight = Arc::clone(&self.in_flight);
        let access = self.access;
        let heartbeat = Arc::clone(&self.heartbeat);
        let finished = Arc::clone(&in_flight);
        let spawned = std::thread::Builder::new()
            .name("vmard-conn".into())
            .spawn(move || {
                serve_connection(&context, access, read_only, &heartbeat, stream);
                in_flight.leave(uid, privileged, read_only);
            });
        if let Err(e) = spawned {
            // The stream moved into the closure that was not run; the client sees a closed
            // connection. Say why in the log.
            tracing::warn!("cannot start a thread for a client: {e}");
            finished.leave(uid, privileged, read_only);
        }
    }
}

fn refuse(stream: &mut UnixStream, refused: &AtomicUsize, uid: u32, why: String) {
    let n = refused.fetch_add(1, Ordering::Relaxed);
    if n.is_power_of_two() {
        tracing::warn!(refused = n + 1, uid, "{why}; answering busy");
    }
    let error = Error::Busy(why);
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let _ = send(
        stream,
        &Reply::Error {
            kind: error.kind().to_string(),
            message: error.to_string(),
        },
    );
}

fn send(stream: &mut UnixStream, reply: &Reply) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(reply).map_err(std::io::Error::other)?;
    line.push(b'\n');
    std::io::Write::write_all(stream, &line)
}

fn serve_connection(
    context: &Context,
    access: Access,
    read_only: bool,
    heartbeat: &Heartbeat,
    stream: UnixStream,
) {
    let mut captured = false;
    // Who asks, for the log: SO_PEERCRED, taken by the kernel at connect().
    let (uid, pid) = getsockopt(&stream, PeerCredentials)
        .map_or((-1, -1), |c| (i64::from(c.uid()), i64::from(c.pid())));
    let replies = match stream.try_clone() {
        Ok(writer) => Arc::new(Replies::new(writer)),
        Err(e) => {
            tracing::warn!("cannot clone a client's socket: {e}");
            return;
        }
    };
    // The peer is checked before anything is read: a refused client holds nothing. The
    // read-only socket is open to anyone: what it serves is checked per request.
    let allowed = if read_only {
        Ok(())
    } else {
        access.check(&stream)
    };
    let outcome = allowed.and_then(|()| {
        if crate::shutdown::requested() {
            return Err(Error::ShuttingDown);
        }
        let request = parse_request(&crate::clients::read_request(&stream)?)?;
        captured = matches!(request, Request::Capture { .. });
        // The watchdog's own pings would fill the journal: those at debug level only.
        if pid == i64::from(std::process::id()) && request == Request::Ping {
            tracing::debug!(uid, pid, read_only, ?request, "request");
        } else {
            tracing::info!(uid, pid, read_only, ?request, "request");
        }
        if read_only && !request.is_read_only() {
            return Err(Error::PermissionDenied(
                "the read-only socket serves only ping, images, map, table, list, status, stats, \
                 metrics, dependents and restore-status; use vmard's main socket (root or its \
                 socket group) for changes"
                    .into(),
            ));
        }
        heartbeat.watch(&replies);
        // A client that went away (Ctrl-C of vmarctl) cancels a capture still hashing; once
        // the catalog change has begun it completes. A client that only reads slowly does not.
        let mut progress = |p: crate::progress::Progress| {
            let gone = replies.progress(&Reply::Progress(p));
            if gone {
                crate::shutdown::cancel_current();
            }
        };
        service::handle(context, request, &mut progress)
    });
    let reply = match outcome {
        Ok(result) => Reply::Ok { result },
        Err(e) => {
            tracing::warn!(uid, pid, kind = e.kind(), "request failed: {e}");
            Reply::Error {
                kind: e.kind().to_string(),
                message: e.to_string(),
            }
        }
    };
    if let Err(e) = replies.finish(&reply) {
        tracing::debug!("client went away before the reply: {e}");
    }
    drop(replies);
    drop(stream);
    if captured
        && !crate::shutdown::requested()
        && let Err(e) = context.catalog.compact_index()
    {
        tracing::warn!("index compaction failed (retried after the next capture): {e}");
    }
}

/// Parses one request line. Its names are checked here, once: an invalid one is answered
/// as `invalid-name`, any other malformed request as `protocol`.
pub fn parse_request(line: &str) -> Result<Request> {
    let (parsed, refused) = crate::name::refused_during(|| serde_json::from_str(line));
    parsed.map_err(|e| refused.unwrap_or_else(|| Error::Protocol(format!("bad request: {e}"))))
}

/// Binds `socket`, replacing a stale one but never one another vmard listens on.
fn listen(socket: &Path) -> Result<UnixListener> {
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
        fs::remove_file(socket).map_err(|e| Error::io("cannot remove stale socket", socket, e))?;
    }
    UnixListener::bind(socket).map_err(|e| Error::io("cannot bind", socket, e))
}
