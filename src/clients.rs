//! Bounds on vmard's clients, so that slow clients, or many clients of one user, cannot
//! refuse service to the others: each uid's share of the connection slots (checked at
//! accept, from SO_PEERCRED, before anything is read), one deadline for receiving the whole
//! request and one for sending the reply (not per read: a byte every few seconds does not
//! hold a slot), and the heartbeat that tells a waiting client vmard still works on its
//! request, so that the client's timeout catches a hung vmard and not a long capture.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use nix::sys::socket::{MsgFlags, send};

use crate::error::{Error, Result};
use crate::protocol::{HEARTBEAT, MAX_REQUEST_BYTES, Reply};

/// Most connections served at once; more are answered `busy` at once. Keeps vmard's threads
/// bounded (the unit's TasksMax is above this).
pub const MAX_CONNECTIONS: usize = 64;
/// Most connections one uid other than root and vmard's own may hold at once.
pub const UID_SHARE: usize = MAX_CONNECTIONS / 2;
/// Slots only root and vmard's own uid may take: an administrator, or monitoring run as
/// root, gets in whatever the other users hold.
pub const PRIVILEGED_RESERVE: usize = 8;
/// How long a client may take to send its whole request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to read the reply.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Connection slots in use, in total and per uid.
#[derive(Debug, Default)]
pub struct Slots {
    total: usize,
    unprivileged: usize,
    by_uid: HashMap<u32, usize>,
}

impl Slots {
    /// Takes a slot for a client of `uid` (`privileged`: root or vmard's own uid), or says
    /// why there is none.
    pub fn take(&mut self, uid: u32, privileged: bool) -> std::result::Result<(), String> {
        if self.total >= MAX_CONNECTIONS {
            return Err(format!("{MAX_CONNECTIONS} requests are in progress"));
        }
        if !privileged {
            let held = self.by_uid.get(&uid).copied().unwrap_or(0);
            if held >= UID_SHARE {
                return Err(format!(
                    "uid {uid} has {held} requests in progress, its share of vmard's \
                     {MAX_CONNECTIONS} connections"
                ));
            }
            if self.unprivileged >= MAX_CONNECTIONS - PRIVILEGED_RESERVE {
                return Err(format!(
                    "{} requests of other users are in progress (the rest are kept for root)",
                    self.unprivileged
                ));
            }
            self.unprivileged += 1;
        }
        *self.by_uid.entry(uid).or_insert(0) += 1;
        self.total += 1;
        Ok(())
    }

    /// Gives back a slot [`Slots::take`] gave.
    pub fn give_back(&mut self, uid: u32, privileged: bool) {
        if let Some(held) = self.by_uid.get_mut(&uid) {
            *held -= 1;
            if *held == 0 {
                self.by_uid.remove(&uid);
            }
        }
        if !privileged {
            self.unprivileged = self.unprivileged.saturating_sub(1);
        }
        self.total = self.total.saturating_sub(1);
    }

    pub fn total(&self) -> usize {
        self.total
    }
}

/// Reads one request line from `stream`, all of it within [`REQUEST_TIMEOUT`] of now.
pub fn read_request(stream: &UnixStream) -> Result<String> {
    read_request_within(stream, REQUEST_TIMEOUT)
}

fn read_request_within(mut stream: &UnixStream, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    let too_long = || {
        Error::Protocol(format!(
            "request must be one JSON line of at most {} KiB",
            MAX_REQUEST_BYTES >> 10
        ))
    };
    let mut line = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::Protocol(format!(
                "request not received within {} s (send it as one line at once)",
                timeout.as_secs()
            )));
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| Error::io("cannot set timeout on", "socket", e))?;
        let n = match stream.read(&mut chunk) {
            Ok(0) => return Err(too_long()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(e) => return Err(Error::Protocol(format!("cannot read request: {e}"))),
        };
        if let Some(end) = chunk[..n].iter().position(|&b| b == b'\n') {
            line.extend_from_slice(&chunk[..=end]);
            if line.len() as u64 > MAX_REQUEST_BYTES {
                return Err(too_long());
            }
            return String::from_utf8(line)
                .map_err(|_| Error::Protocol("request is not UTF-8 text".into()));
        }
        line.extend_from_slice(&chunk[..n]);
        if line.len() as u64 >= MAX_REQUEST_BYTES {
            return Err(too_long());
        }
    }
}

/// The sending side of one connection, shared by its request (progress and reply) and the
/// heartbeat.
pub struct Replies {
    stream: Mutex<UnixStream>,
    /// When the last line went out.
    last: Mutex<Instant>,
}

impl Replies {
    pub fn new(stream: UnixStream) -> Replies {
        Replies {
            stream: Mutex::new(stream),
            last: Mutex::new(Instant::now()),
        }
    }

    /// Sends a progress line if the client reads (lossy: a client that does not read its
    /// progress must not hold up the work). True when the client has gone away (its end is
    /// closed), which cancels a capture still hashing.
    pub fn progress(&self, reply: &Reply) -> bool {
        let stream = self.stream.lock().unwrap_or_else(|p| p.into_inner());
        self.send_now(&stream, reply)
    }

    /// Sends the final line, within [`REPLY_TIMEOUT`].
    pub fn finish(&self, reply: &Reply) -> std::io::Result<()> {
        let stream = self.stream.lock().unwrap_or_else(|p| p.into_inner());
        let line = encode(reply)?;
        write_within(&stream, &line, REPLY_TIMEOUT)?;
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        Ok(())
    }

    /// Sends `working` if nothing went out for [`HEARTBEAT`] (skipped while the request
    /// thread writes).
    fn beat(&self) {
        let last = *self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.elapsed() < HEARTBEAT {
            return;
        }
        if let Ok(stream) = self.stream.try_lock() {
            let _gone = self.send_now(&stream, &Reply::Working);
        }
    }

    /// Sends `reply` without waiting for a client that does not read. A short line goes into
    /// a Unix socket whole or not at all; if part of one went, the rest is sent within the
    /// reply deadline so that lines stay whole.
    /// True when the client has gone away (the line cannot be sent, and never will).
    fn send_now(&self, stream: &UnixStream, reply: &Reply) -> bool {
        let Ok(line) = encode(reply) else {
            return false;
        };
        let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
        match send(stream.as_raw_fd(), &line, flags) {
            Ok(n) if n == line.len() => {}
            Ok(n) => {
                if write_within(stream, &line[n..], REPLY_TIMEOUT).is_err() {
                    let _ = stream.shutdown(std::net::Shutdown::Both);
                    return true;
                }
            }
            // Full buffer: a client that reads slowly; it may still read the reply.
            Err(nix::errno::Errno::EAGAIN) => return false,
            Err(_) => return true,
        }
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        false
    }
}

fn encode(reply: &Reply) -> std::io::Result<Vec<u8>> {
    let mut line = serde_json::to_vec(reply).map_err(std::io::Error::other)?;
    line.push(b'\n');
    Ok(line)
}

/// Writes all of `bytes` within `timeout` of now, however slowly the client reads.
fn write_within(mut stream: &UnixStream, bytes: &[u8], timeout: Duration) -> std::io::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut sent = 0;
    while sent < bytes.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        stream.set_write_timeout(Some(left))?;
        match stream.write(&bytes[sent..]) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Sends `working` lines to every connection whose request runs silently, from one thread
/// for all of them; it sleeps while no request runs.
#[derive(Default)]
pub struct Heartbeat {
    watched: Mutex<Vec<Weak<Replies>>>,
    work: Condvar,
}

impl Heartbeat {
    /// Starts the heartbeat thread; it ends when the returned value is dropped.
    pub fn start() -> Result<Arc<Heartbeat>> {
        let heartbeat = Arc::new(Heartbeat::default());
        let weak = Arc::downgrade(&heartbeat);
        std::thread::Builder::new()
            .name("vmard-heartbeat".into())
            .spawn(move || {
                while let Some(heartbeat) = weak.upgrade() {
                    heartbeat.beat_all();
                    drop(heartbeat);
                    std::thread::sleep(HEARTBEAT / 4);
                }
            })
            .map_err(|e| Error::io("cannot start the heartbeat thread", "vmard", e))?;
        Ok(heartbeat)
    }

    /// Watches `replies` until it is dropped.
    pub fn watch(&self, replies: &Arc<Replies>) {
        self.watched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::downgrade(replies));
        self.work.notify_one();
    }

    /// Beats every live connection; with none, waits (up to a second) for one.
    fn beat_all(&self) {
        let live: Vec<Arc<Replies>> = {
            let mut watched = self.watched.lock().unwrap_or_else(|p| p.into_inner());
            watched.retain(|w| w.strong_count() > 0);
            if watched.is_empty() {
                let _ = self.work.wait_timeout(watched, Duration::from_secs(1));
                return;
            }
            watched.iter().filter_map(Weak::upgrade).collect()
        };
        for replies in live {
            replies.beat();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_uid_gets_its_share_and_root_its_reserve() {
        let mut slots = Slots::default();
        for _ in 0..UID_SHARE {
            slots.take(1000, false).unwrap();
        }
        let over = slots.take(1000, false).unwrap_err();
        assert!(over.contains("uid 1000"), "{over}");
        // Other users share what is left but the reserve.
        let others = MAX_CONNECTIONS - PRIVILEGED_RESERVE - UID_SHARE;
        for uid in (2000..2003).cycle().take(others) {
            slots.take(uid, false).unwrap();
        }
        assert!(slots.take(3000, false).is_err());
        // root still gets in, up to the total.
        for _ in 0..PRIVILEGED_RESERVE {
            slots.take(0, true).unwrap();
        }
        assert_eq!(slots.total(), MAX_CONNECTIONS);
        assert!(slots.take(0, true).is_err());
        // Slots given back are taken again.
        slots.give_back(1000, false);
        assert!(slots.take(0, true).is_ok());
        slots.give_back(0, true);
        assert!(slots.take(3000, false).is_ok());
    }

    #[test]
    fn a_request_sent_a_byte_at_a_time_is_cut_at_the_deadline() {
        let (client, server) = UnixStream::pair().unwrap();
        let writer = std::thread::spawn(move || {
            let mut client = client;
            for _ in 0..40 {
                if client.write_all(b" ").is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        // Each byte comes well within the timeout: only a whole-request deadline ends it
        // before the writer stops (a per-read one would end at end of file, "one JSON line").
        let error = read_request_within(&server, Duration::from_millis(300)).unwrap_err();
        assert!(error.to_string().contains("not received within"), "{error}");
        drop(server);
        writer.join().unwrap();

        let (mut client, server) = UnixStream::pair().unwrap();
        client.write_all(b"{\"op\":\"ping\"}\n").unwrap();
        assert_eq!(
            read_request_within(&server, Duration::from_secs(5)).unwrap(),
            "{\"op\":\"ping\"}\n"
        );
    }
}
