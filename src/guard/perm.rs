//! The kernel refuses writes to images that live devices read: a fanotify group with
//! `FAN_OPEN_PERM` marks on every such image (file inode, or block device node) holds each
//! open of them until vmard answers. vmard's own opens are allowed; an open by anyone else
//! is allowed when it is shown to be read-only and refused otherwise:
//!
//! - for a regular file, the kernel takes write access to the inode *before* it asks
//!   fanotify, so a read lease probe on the event's file (`F_SETLEASE F_RDLCK`, which fails
//!   with `EAGAIN` while the inode is open for writing) tells whether the opener (or anyone
//!   else) writes it; the lease is dropped at once;
//! - when a writer exists, or leases are not supported, the opener's own flags are read
//!   from `/proc/TID/syscall` (the thread waits inside `open`/`openat`); where they cannot
//!   be read the open is refused.
//!
//! fanotify reports opens of regular files and directories only, never of device nodes, so
//! block-device images are marked (harmlessly) but never refused: they are detected.
//!
//! `FAN_MODIFY` on the same marks wakes the checker at once ([`super::poke`]), so a writer
//! that opened before the mark is found within milliseconds on a local file system; a
//! `truncate(2)` by path, which opens nothing and has no path the permission group could
//! report, is reported by a second, file-handle group (`FAN_REPORT_FID`) marked the same. Every event is answered by this thread
//! without waiting for anything but `fstat`, `fcntl` and one small procfs read; if vmard
//! dies, the kernel allows the opens still pending, so detection stays necessary.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use nix::fcntl::OFlag;
use nix::sys::fanotify::{
    EventFFlags, Fanotify, FanotifyResponse, InitFlags, MarkFlags, MaskFlags, Response,
};

use crate::error::{Error, Result};

/// What identifies a guarded image in an event: a file by device and inode, a block device
/// by its number, whatever node it is opened through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum FileKey {
    File { dev: u64, ino: u64 },
    Block { rdev: u64 },
}

/// An image a live device reads, as the listener needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Guarded {
    pub image: String,
    pub path: PathBuf,
    pub key: FileKey,
    /// Devices that read it.
    pub devices: Vec<String>,
}

/// How an open asked for its file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    ReadOnly,
    Write,
    Unknown,
}

/// Whether an open is allowed: vmard's own are; another's only when shown read-only. Pure.
pub fn allow(own: bool, access: Access) -> bool {
    own || access == Access::ReadOnly
}

/// The access an open in progress asks for, from its thread's `/proc/TID/syscall` line
/// (`NR arg0 arg1 ...` in hex): `open`, `openat`, `open_by_handle_at` by their flags,
/// `creat` writes; anything else (e.g. `openat2`, whose flags are behind a pointer, or
/// io_uring) is unknown. Pure.
pub fn access_from_syscall(line: &str) -> Access {
    let words: Vec<&str> = line.split_whitespace().collect();
    let Some(nr) = words.first().and_then(|w| w.parse::<i64>().ok()) else {
        return Access::Unknown;
    };
    let arg = |i: usize| {
        words
            .get(i + 1)
            .and_then(|w| u64::from_str_radix(w.trim_start_matches("0x"), 16).ok())
    };
    #[cfg(target_arch = "x86_64")]
    let flags = match nr {
        2 => arg(1),                // open(path, flags, mode)
        257 | 304 => arg(2), // openat(dirfd, path, flags), open_by_handle_at(fd, handle, flags)
        85 => return Access::Write, // creat
        _ => None,
    };
    #[cfg(target_arch = "aarch64")]
    let flags = match nr {
        56 | 265 => arg(2), // openat, open_by_handle_at
        _ => None,
    };
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let flags: Option<u64> = {
        let _ = (nr, arg(0));
        None
    };
    let Some(flags) = flags else {
        return Access::Unknown;
    };
    // Open flags fit an int; anything else is taken as the worst case (all bits: a write).
    let flags = OFlag::from_bits_truncate(i32::try_from(flags).unwrap_or(-1));
    let mode = flags & OFlag::O_ACCMODE;
    if mode == OFlag::O_RDONLY && !flags.contains(OFlag::O_TRUNC) {
        Access::ReadOnly
    } else {
        Access::Write
    }
}

/// The fanotify groups and the images they guard.
pub struct Marks {
    fan: Fanotify,
    /// A notification group reporting file handles: the only kind the kernel tells of
    /// changes made without a path (`truncate(2)`, which the permission group never sees).
    changes: Option<Fanotify>,
    guarded: Mutex<BTreeMap<FileKey, Guarded>>,
    marked: Mutex<BTreeMap<PathBuf, FileKey>>,
}

impl Marks {
    /// A permission-class fanotify group (needs CAP_SYS_ADMIN), reporting thread ids.
    pub fn new() -> Result<Marks> {
        let fan = Fanotify::init(
            InitFlags::FAN_CLASS_CONTENT | InitFlags::FAN_CLOEXEC | InitFlags::FAN_REPORT_TID,
            EventFFlags::O_RDONLY | EventFFlags::O_LARGEFILE | EventFFlags::O_CLOEXEC,
        )
        .map_err(|e| Error::io("cannot start fanotify", "fanotify", e.into()))?;
        // nix 0.29 has no name for FAN_REPORT_FID.
        let changes = Fanotify::init(
            InitFlags::FAN_CLASS_NOTIF
                | InitFlags::FAN_CLOEXEC
                | InitFlags::from_bits_retain(nix::libc::FAN_REPORT_FID),
            EventFFlags::O_RDONLY | EventFFlags::O_CLOEXEC,
        )
        .map_err(|e| {
            tracing::warn!("truncations by path are found only by the periodic check: {e}")
        })
        .ok();
        Ok(Marks {
            fan,
            changes,
            guarded: Mutex::new(BTreeMap::new()),
            marked: Mutex::new(BTreeMap::new()),
        })
    }

    /// Guards exactly `images` from now on: marks new ones, unmarks those no device reads.
    pub fn set(&self, images: Vec<Guarded>) {
        let mask = MaskFlags::FAN_OPEN_PERM | MaskFlags::FAN_MODIFY;
        let mut marked = self.marked.lock().unwrap_or_else(|p| p.into_inner());
        let want: BTreeMap<PathBuf, FileKey> =
            images.iter().map(|g| (g.path.clone(), g.key)).collect();
        // Publish what is guarded before marking, so no event finds its image unknown.
        *self.guarded.lock().unwrap_or_else(|p| p.into_inner()) =
            images.into_iter().map(|g| (g.key, g)).collect();
        for (path, key) in &want {
            if marked.get(path) == Some(key) {
                continue;
            }
            match self
                .fan
                .mark(MarkFlags::FAN_MARK_ADD, mask, None, Some(path.as_path()))
            {
                Ok(()) => {
                    marked.insert(path.clone(), *key);
                    if let Some(changes) = &self.changes
                        && let Err(e) = changes.mark(
                            MarkFlags::FAN_MARK_ADD,
                            MaskFlags::FAN_MODIFY,
                            None,
                            Some(path.as_path()),
                        )
                    {
                        tracing::warn!(path = %path.display(), "truncations by path are found only by the periodic check: {e}");
                    }
                }
                Err(e) => tracing::warn!(
                    path = %path.display(),
                    "writes to this image are not refused (fanotify mark: {e}); they are still detected"
                ),
            }
        }
        let gone: Vec<PathBuf> = marked
            .keys()
            .filter(|p| !want.contains_key(*p))
            .cloned()
            .collect();
        for path in gone {
            // The file may be gone or replaced: its inode's mark then goes with the inode,
            // and events for inodes no longer guarded are allowed.
            let _ = self
                .fan
                .mark(MarkFlags::FAN_MARK_REMOVE, mask, None, Some(path.as_path()));
            if let Some(changes) = &self.changes {
                let _ = changes.mark(
                    MarkFlags::FAN_MARK_REMOVE,
                    MaskFlags::FAN_MODIFY,
                    None,
                    Some(path.as_path()),
                );
            }
            marked.remove(&path);
        }
    }

    /// How many paths are marked (for tests and the log).
    pub fn marked(&self) -> usize {
        self.marked.lock().map_or(0, |m| m.len())
    }

    /// Answers events until the group fails; `modified` is called for writes seen.
    pub fn listen(self: Arc<Self>, modified: impl Fn()) {
        loop {
            let events = match self.fan.read_events() {
                Ok(events) => events,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    tracing::error!(
                        "fanotify stopped ({e}): writes to images are no longer refused, only detected"
                    );
                    return;
                }
            };
            let mut wake = false;
            for event in events {
                tracing::debug!(mask = ?event.mask(), pid = event.pid(), "fanotify event");
                let Some(fd) = event.fd() else {
                    // Queue overflow: events were lost, so look at everything.
                    wake = true;
                    continue;
                };
                let mask = event.mask();
                if mask.contains(MaskFlags::FAN_OPEN_PERM) {
                    let decision = self.decide(fd, event.pid());
                    let response = if decision.allowed {
                        Response::FAN_ALLOW
                    } else {
                        Response::FAN_DENY
                    };
                    if let Err(e) = self.fan.write_response(FanotifyResponse::new(fd, response)) {
                        tracing::error!("cannot answer a fanotify permission event: {e}");
                    }
                    // Logged after answering, so that no open waits for the log.
                    if let Some(refused) = decision.refused {
                        tracing::warn!("{refused}");
                        wake = true;
                    }
                }
                if mask.contains(MaskFlags::FAN_MODIFY) {
                    wake = true;
                }
            }
            if wake {
                modified();
            }
        }
    }

    /// Calls `modified` for every batch of changes the file-handle group reports (writes
    /// and truncations of guarded images, with or without a path); returns at once if there
    /// is no such group.
    pub fn listen_changes(self: Arc<Self>, modified: impl Fn()) {
        let Some(changes) = &self.changes else {
            return;
        };
        loop {
            match changes.read_events() {
                Ok(events) if events.is_empty() => {}
                Ok(_) => modified(),
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    tracing::error!(
                        "fanotify change events stopped ({e}): truncations by path are found only by the periodic check"
                    );
                    return;
                }
            }
        }
    }

    fn decide(&self, fd: BorrowedFd<'_>, tid: i32) -> Decision {
        let allowed = Decision {
            allowed: true,
            refused: None,
        };
        if own_thread(tid) {
            return allowed;
        }
        let Ok(meta) = nix::sys::stat::fstat(fd.as_raw_fd()) else {
            return allowed;
        };
        let key = if meta.st_mode & nix::libc::S_IFMT == nix::libc::S_IFBLK {
            FileKey::Block { rdev: meta.st_rdev }
        } else {
            FileKey::File {
                dev: meta.st_dev,
                ino: meta.st_ino,
            }
        };
        tracing::debug!(?key, tid, "fanotify open permission event");
        let guarded = self.guarded.lock().ok().and_then(|g| g.get(&key).cloned());
        let Some(guarded) = guarded else {
            return allowed;
        };
        // No writer at all: a read-only open. Otherwise (or without a probe) the opener's
        // own flags decide: a reader is not refused because someone else writes (that
        // writer is the checker's, which this wakes).
        let writer = match key {
            FileKey::File { .. } => writer_probe(fd),
            FileKey::Block { .. } => None,
        };
        let access = match writer {
            Some(false) => Access::ReadOnly,
            _ => syscall_access(tid),
        };
        tracing::debug!(?key, tid, ?writer, ?access, "open permission decision");
        if allow(false, access) {
            return allowed;
        }
        let why = match (access, writer) {
            (Access::Write, _) => "an open for writing",
            (_, Some(true)) => {
                "an open (mode not visible to vmard) while the inode is open for writing"
            }
            _ => "an open whose mode is not visible to vmard",
        };
        Decision {
            allowed: false,
            refused: Some(format!(
                "refused {why} of image {} ({}), which live devices read ({}), by {}",
                guarded.image,
                guarded.path.display(),
                guarded.devices.join(", "),
                describe_process(tid)
            )),
        }
    }
}

struct Decision {
    allowed: bool,
    refused: Option<String>,
}

/// Whether thread `tid` is one of vmard's own.
fn own_thread(tid: i32) -> bool {
    tid > 0
        && (u32::try_from(tid).ok() == Some(std::process::id())
            || std::path::Path::new(&format!("/proc/self/task/{tid}")).exists())
}

/// Whether the inode of `fd` is open for writing by anyone: `None` when the file system
/// (or missing `CAP_LEASE` on someone else's file) does not allow the probe.
fn writer_probe(fd: BorrowedFd<'_>) -> Option<bool> {
    let set = |lease: nix::libc::c_int| {
        // SAFETY: F_SETLEASE takes an int argument and touches no memory; `fd` is a valid
        // descriptor borrowed for the call. (nix 0.29 has no wrapper for leases.)
        let ret = unsafe { nix::libc::fcntl(fd.as_raw_fd(), nix::libc::F_SETLEASE, lease) };
        nix::errno::Errno::result(ret).map(drop)
    };
    match set(nix::libc::F_RDLCK) {
        Ok(()) => {
            let _ = set(nix::libc::F_UNLCK);
            Some(false)
        }
        Err(nix::errno::Errno::EAGAIN) => Some(true),
        Err(_) => None,
    }
}

/// The opener's access from its waiting syscall. The opener queues the event before it goes
/// to sleep waiting for the answer, so its line may still say `running`: asked again, a
/// bounded number of times (at most ~20 ms, so no open waits long).
fn syscall_access(tid: i32) -> Access {
    for attempt in 0..20 {
        let Ok(line) = std::fs::read_to_string(format!("/proc/{tid}/syscall")) else {
            return Access::Unknown;
        };
        if !line.starts_with("running") {
            return access_from_syscall(&line);
        }
        if attempt < 19 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
    Access::Unknown
}

/// `pid N (comm, exe)`, with what procfs lets vmard see (under the unit's
/// `ProtectProc=invisible` only processes vmard could ptrace are visible).
pub fn describe_process(tid: i32) -> String {
    let read = |what: &str| {
        std::fs::read_to_string(format!("/proc/{tid}/{what}"))
            .ok()
            .map(|s| s.trim().to_string())
    };
    let tgid = read("status").and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Tgid:").map(|v| v.trim().to_string()))
    });
    let comm = read("comm");
    let exe = std::fs::read_link(format!("/proc/{tid}/exe"))
        .ok()
        .map(|p| p.display().to_string());
    let pid = tgid.unwrap_or_else(|| tid.to_string());
    match (comm, exe) {
        (Some(comm), Some(exe)) => format!("pid {pid} ({comm}, {exe})"),
        (Some(comm), None) => format!("pid {pid} ({comm})"),
        _ => format!("pid {pid} (not visible to vmard)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_flags_are_read_from_the_waiting_syscall() {
        #[cfg(target_arch = "x86_64")]
        {
            // openat(AT_FDCWD, path, O_RDONLY|O_CLOEXEC)
            let ro = "257 0xffffff9c 0x7ffd1 0x80000 0x0 0x0 0x0 0x7ffd0 0x7f1";
            assert_eq!(access_from_syscall(ro), Access::ReadOnly);
            // openat(..., O_WRONLY|O_CREAT) as dd of= does
            let wo = "257 0xffffff9c 0x7ffd1 0x41 0x1b6 0x0 0x0 0x7ffd0 0x7f1";
            assert_eq!(access_from_syscall(wo), Access::Write);
            // O_RDWR through open(2)
            assert_eq!(
                access_from_syscall("2 0x7ffd1 0x2 0x0 0 0 0 0 0"),
                Access::Write
            );
            // O_RDONLY|O_TRUNC truncates on Linux.
            assert_eq!(
                access_from_syscall("2 0x7ffd1 0x200 0x0 0 0 0 0 0"),
                Access::Write
            );
            assert_eq!(
                access_from_syscall("85 0x7ffd1 0x1b6 0 0 0 0 0 0"),
                Access::Write
            );
            // openat2: flags behind a pointer.
            assert_eq!(
                access_from_syscall("437 0xffffff9c 0x1 0x2 0x18 0 0 0 0"),
                Access::Unknown
            );
        }
        assert_eq!(access_from_syscall("running"), Access::Unknown);
        assert_eq!(access_from_syscall(""), Access::Unknown);
        assert!(allow(true, Access::Write));
        assert!(allow(false, Access::ReadOnly));
        assert!(!allow(false, Access::Write));
        assert!(!allow(false, Access::Unknown));
    }

    #[test]
    fn a_lease_probe_tells_a_writer_from_readers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, b"x").unwrap();
        let reader = std::fs::File::open(&path).unwrap();
        use std::os::fd::AsFd;
        // Leases need the owner or CAP_LEASE; tests run as the file's owner.
        let Some(alone) = writer_probe(reader.as_fd()) else {
            return;
        };
        assert!(!alone);
        let _other_reader = std::fs::File::open(&path).unwrap();
        assert_eq!(writer_probe(reader.as_fd()), Some(false));
        let writer = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        assert_eq!(writer_probe(reader.as_fd()), Some(true));
        drop(writer);
        assert_eq!(writer_probe(reader.as_fd()), Some(false));
    }
}
