//! Auto-capture: vmard watches its image roots with inotify and captures a raw image that
//! appears there once it is complete, so that directories filled by other tools (Nova's
//! `_base` cache, a libvirt storage pool) need no manual `capture`.
//!
//! "Complete" is judged by what can be observed, never by a single event: the file must have
//! a final-looking name (not hidden, not `.part`/`.tmp`...), must have stayed unchanged (size,
//! mtime, ctime) for the settle time, and no process may have it open for writing. A file
//! renamed into place arrives complete; one written slowly settles only after its writer
//! stops and closes it; one truncated or rewritten starts its wait again. The capture goes
//! through vmard's own socket, so it takes exactly the path and the checks of `vmarctl
//! capture` (image roots, format sniffing, change during capture). What happened is kept for
//! `vmarctl images` ([`report`]).

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use inotify::{Inotify, WatchMask};

use crate::client::Client;
use crate::error::{Error, Result};
use crate::protocol::{AutoCaptureReport, AutoCaptured, AutoSkipped, request};
use crate::records::CaptureStatus;

/// Entries of each list kept for the report.
const KEEP: usize = 100;
/// How often the watcher looks at its queue.
const TICK: Duration = Duration::from_millis(200);

/// What auto-capture did so far: written by the watcher's thread, read by whoever answers
/// `images`. Its owner makes one and hands a clone to [`start`] (vmard: the service's
/// `Context` holds it); it stays empty while no watcher runs.
#[derive(Clone, Debug, Default)]
pub struct Report(Arc<Mutex<Option<AutoCaptureReport>>>);

impl Report {
    /// What auto-capture did so far, or `None` when it is off.
    pub fn snapshot(&self) -> Option<AutoCaptureReport> {
        self.0.lock().ok().and_then(|r| r.clone())
    }

    /// Starts a new report (a watcher starting).
    fn set(&self, report: AutoCaptureReport) {
        if let Ok(mut guard) = self.0.lock() {
            *guard = Some(report);
        }
    }

    fn update(&self, f: impl FnOnce(&mut AutoCaptureReport)) {
        if let Ok(mut guard) = self.0.lock()
            && let Some(report) = guard.as_mut()
        {
            f(report);
        }
    }

    /// Whether `path` is among the skipped files (true when that cannot be told).
    fn lists_skipped(&self, path: &Path) -> bool {
        self.0
            .lock()
            .ok()
            .and_then(|r| r.as_ref().map(|r| r.skipped.iter().any(|s| s.path == path)))
            .unwrap_or(true)
    }
}

/// Names that say a file is not in place yet: hidden files and partial downloads or copies
/// (`.part`, `.partial`, `.tmp`, `.swp`, `~`), which their writer renames when complete.
pub fn temporary_name(name: &OsStr) -> bool {
    let name = name.to_string_lossy();
    name.starts_with('.')
        || name.ends_with('~')
        || [
            ".part",
            ".partial",
            ".tmp",
            ".swp",
            ".download",
            ".crdownload",
        ]
        .iter()
        .any(|suffix| name.ends_with(suffix))
}

/// What identifies one state of a file's content from outside.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    ino: u64,
}

/// Forgotten images (`vmarctl forget`) whose files auto-capture leaves alone while they stay
/// as they were, in the state directory so that it holds across restarts.
pub const FORGOTTEN_FILE: &str = "auto-capture-forgotten.json";

/// A forgotten file as it was when it was forgotten.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Forgotten {
    path: PathBuf,
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

fn forgotten_list(state_dir: &Path) -> Vec<Forgotten> {
    std::fs::read(state_dir.join(FORGOTTEN_FILE))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}

fn save_forgotten(state_dir: &Path, list: &[Forgotten]) -> Result<()> {
    let path = state_dir.join(FORGOTTEN_FILE);
    let tmp = state_dir.join(format!("{FORGOTTEN_FILE}.tmp"));
    let bytes = serde_json::to_vec(list)
        .map_err(|e| Error::internal(format!("cannot encode {FORGOTTEN_FILE}: {e}")))?;
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(state_dir)?.sync_all()
    };
    write().map_err(|e| Error::io("cannot write", &path, e))
}

fn forgotten_entry(path: &Path) -> Option<Forgotten> {
    let meta = std::fs::metadata(path).ok()?;
    meta.file_type().is_file().then(|| Forgotten {
        path: path.to_path_buf(),
        dev: meta.dev(),
        ino: meta.ino(),
        size: meta.size(),
        mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
    })
}

/// Image `record` was forgotten: auto-capture will not take its file back unless the file
/// changes (kept in the state directory, so a restart does not undo the forget). Call after
/// vmar's hold is released (which changes the file's ctime).
pub fn forgotten(state_dir: &Path, record: &crate::records::ImageRecord) {
    let Some(entry) = forgotten_entry(&record.path) else {
        return;
    };
    let mut list = forgotten_list(state_dir);
    list.retain(|f| f.path != record.path);
    list.push(entry);
    if let Err(e) = save_forgotten(state_dir, &list) {
        tracing::warn!("auto-capture may take {} back: {e}", record.path.display());
    }
}

/// Image `record` was captured (by anyone): what auto-capture skipped of its path before is
/// stale (dropped from `report`), and a forget of it no longer applies.
pub fn captured(state_dir: &Path, record: &crate::records::ImageRecord, report: &Report) {
    report.update(|r| r.skipped.retain(|s| s.path != record.path));
    let mut list = forgotten_list(state_dir);
    let before = list.len();
    list.retain(|f| f.path != record.path);
    if list.len() != before
        && let Err(e) = save_forgotten(state_dir, &list)
    {
        tracing::warn!("{e}");
    }
}

/// Whether `path` was forgotten and is unchanged since.
fn forgotten_unchanged(state_dir: &Path, path: &Path) -> bool {
    let list = forgotten_list(state_dir);
    list.iter()
        .any(|f| f.path == path && forgotten_entry(path).as_ref() == Some(f))
}

fn stamp(path: &Path) -> std::io::Result<Option<Stamp>> {
    let meta = std::fs::metadata(path)?;
    if !meta.file_type().is_file() {
        return Ok(None);
    }
    Ok(Some(Stamp {
        size: meta.size(),
        mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        ino: meta.ino(),
    }))
}

/// A process that has `path` open for writing, if any (pid), found through /proc. An image
/// whose writer only pauses is not complete, however long the pause.
pub fn open_for_writing(path: &Path) -> Option<u32> {
    let target = std::fs::canonicalize(path).ok()?;
    let procs = std::fs::read_dir("/proc").ok()?;
    for proc_entry in procs.flatten() {
        let Some(pid) = proc_entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        // Processes come and go, and others' fds may be unreadable: skip what fails.
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).ok().as_deref() != Some(target.as_path()) {
                continue;
            }
            let info = proc_entry.path().join("fdinfo").join(fd.file_name());
            let Ok(info) = std::fs::read_to_string(info) else {
                continue;
            };
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|f| u32::from_str_radix(f.trim(), 8).ok());
            // O_ACCMODE: 1 is O_WRONLY, 2 is O_RDWR.
            if flags.is_some_and(|f| f & 3 != 0) {
                return Some(pid);
            }
        }
    }
    None
}

/// A file seen changing.
struct Waiting {
    stamp: Option<Stamp>,
    since: Instant,
}

/// The watcher's state, apart from inotify so that it can be driven in tests.
struct Watcher {
    client: Client,
    /// vmard's state directory: where forgotten images are remembered.
    state_dir: PathBuf,
    settle: Duration,
    waiting: BTreeMap<PathBuf, Waiting>,
    /// Last reason each path was skipped for, so a file is reported once per reason.
    skipped: HashMap<PathBuf, String>,
    /// What it reports (shared with its owner).
    report: Report,
}

impl Watcher {
    /// Something happened to `path`: (re)start its wait.
    fn touched(&mut self, path: PathBuf) {
        if path.file_name().is_some_and(temporary_name) {
            self.skip(
                &path,
                "temporary-name",
                "temporary name: waiting for it to be renamed into place".into(),
            );
            return;
        }
        if let Some(reason) = path.file_name().and_then(crate::nova::not_an_image) {
            self.skip(&path, "nova-file", reason.into());
            return;
        }
        self.waiting.insert(
            path,
            Waiting {
                stamp: None,
                since: Instant::now(),
            },
        );
    }

    /// `path` was deleted or renamed away: nothing to wait for, nothing to report of it.
    fn gone(&mut self, path: &Path) {
        self.waiting.remove(path);
        if self.skipped.remove(path).is_some() {
            self.report.update(|r| r.skipped.retain(|s| s.path != path));
        }
    }

    /// Considers every file of `roots` (at start, and when inotify lost events).
    fn rescan(&mut self, roots: &[PathBuf]) {
        for root in roots {
            if let Ok(entries) = std::fs::read_dir(root) {
                for entry in entries.flatten() {
                    if entry.file_type().is_ok_and(|t| t.is_file())
                        && !self.waiting.contains_key(&entry.path())
                    {
                        self.touched(entry.path());
                    }
                }
            }
        }
    }

    fn skip(&mut self, path: &Path, kind: &str, reason: String) {
        // Reported already, unless a capture cleared it from the report since.
        let reported = self.report.lists_skipped(path);
        if self.skipped.get(path) == Some(&reason) && reported {
            return;
        }
        tracing::info!(path = %path.display(), "auto-capture skipped it: {reason}");
        self.skipped.insert(path.to_path_buf(), reason.clone());
        let entry = AutoSkipped {
            path: path.to_path_buf(),
            kind: kind.to_string(),
            reason,
            at: crate::time::now_secs(),
        };
        self.report.update(|r| {
            r.skipped.retain(|s| s.path != entry.path);
            r.skipped.push(entry);
            let excess = r.skipped.len().saturating_sub(KEEP);
            r.skipped.drain(..excess);
        });
    }

    /// Captures what has settled; keeps waiting for the rest.
    fn tick(&mut self) {
        let now = Instant::now();
        let mut due = Vec::new();
        for (path, waiting) in &mut self.waiting {
            let current = stamp(path).unwrap_or_default();
            if current != waiting.stamp {
                waiting.stamp = current;
                waiting.since = now;
            } else if now.duration_since(waiting.since) >= self.settle {
                due.push(path.clone());
            }
        }
        for path in due {
            let Some(waiting) = self.waiting.get_mut(&path) else {
                continue;
            };
            if waiting.stamp.is_none() {
                // Gone, or a directory, socket or fifo: nothing to capture.
                self.waiting.remove(&path);
                continue;
            }
            if let Some(pid) = open_for_writing(&path) {
                tracing::debug!(path = %path.display(), pid, "still open for writing");
                waiting.since = now;
                continue;
            }
            self.capture(&path);
        }
        let waiting: Vec<PathBuf> = self.waiting.keys().cloned().collect();
        self.report.update(|r| r.waiting = waiting);
    }

    fn capture(&mut self, path: &Path) {
        if forgotten_unchanged(&self.state_dir, path) {
            self.waiting.remove(path);
            self.skip(
                path,
                "forgotten",
                "forgotten (vmarctl forget) and unchanged since; `vmarctl capture` takes it back"
                    .into(),
            );
            return;
        }
        let request = request::Capture {
            path: path.to_path_buf(),
            name: None,
            recapture: false,
            force_raw: false,
        };
        match self.client.call(request, &mut |_| {}) {
            Ok(result) => {
                self.waiting.remove(path);
                self.skipped.remove(path);
                if result.status != CaptureStatus::Unchanged {
                    tracing::info!(path = %path.display(), name = %result.image.name, "auto-captured");
                    let entry = AutoCaptured {
                        path: path.to_path_buf(),
                        name: result.image.name,
                        at: crate::time::now_secs(),
                    };
                    self.report.update(|r| {
                        r.skipped.retain(|s| s.path != entry.path);
                        r.captured.push(entry);
                        let excess = r.captured.len().saturating_sub(KEEP);
                        r.captured.drain(..excess);
                    });
                }
            }
            // Written to while it was read: not complete after all, wait again.
            Err(Error::Remote { kind, .. })
                if matches!(
                    kind.as_str(),
                    "changed-during-capture" | "busy" | "shutting-down"
                ) =>
            {
                if let Some(waiting) = self.waiting.get_mut(path) {
                    waiting.since = Instant::now();
                }
            }
            Err(e @ (Error::DaemonUnavailable { .. } | Error::SocketDenied { .. })) => {
                tracing::warn!("auto-capture cannot reach vmard: {e}");
                if let Some(waiting) = self.waiting.get_mut(path) {
                    waiting.since = Instant::now();
                }
            }
            Err(e) => {
                self.waiting.remove(path);
                let kind = match &e {
                    Error::Remote { kind, .. } => kind.clone(),
                    other => other.kind().to_string(),
                };
                self.skip(path, &kind, e.to_string());
            }
        }
    }
}

/// Starts watching `roots` (not their subdirectories) and capturing through vmard's
/// `socket`; files already in the roots are considered too (they may have arrived while
/// vmard was down; captured, unchanged ones cost nothing). Runs until shutdown; what it does
/// goes into `report`.
pub fn start(
    roots: Vec<PathBuf>,
    socket: PathBuf,
    state_dir: PathBuf,
    settle: Duration,
    report: Report,
) -> Result<()> {
    let mut inotify =
        Inotify::init().map_err(|e| Error::io("cannot start inotify for", "auto-capture", e))?;
    let mask = WatchMask::CLOSE_WRITE
        | WatchMask::MOVED_TO
        | WatchMask::CREATE
        | WatchMask::MODIFY
        | WatchMask::ATTRIB
        | WatchMask::DELETE
        | WatchMask::MOVED_FROM;
    let mut watched = HashMap::new();
    for root in &roots {
        let wd = inotify
            .watches()
            .add(root, mask)
            .map_err(|e| Error::io("cannot watch image root", root, e))?;
        watched.insert(wd, root.clone());
    }
    report.set(AutoCaptureReport {
        roots: roots.clone(),
        settle_ms: u64::try_from(settle.as_millis()).unwrap_or(u64::MAX),
        ..AutoCaptureReport::default()
    });
    let mut watcher = Watcher {
        client: Client::new(socket),
        state_dir,
        settle,
        waiting: BTreeMap::new(),
        skipped: HashMap::new(),
        report,
    };
    watcher.rescan(&roots);
    tracing::info!(roots = ?roots, settle = ?settle, "auto-capture watches the image roots");
    std::thread::Builder::new()
        .name("vmard-watch".into())
        .spawn(move || {
            let mut buffer = vec![0u8; 64 * 1024];
            while !crate::shutdown::requested() {
                match inotify.read_events(&mut buffer) {
                    Ok(events) => {
                        let mut overflowed = false;
                        for event in events {
                            // The queue overflowed (a long capture kept us away): events
                            // were lost, so look at every file again.
                            if event.mask.contains(inotify::EventMask::Q_OVERFLOW) {
                                overflowed = true;
                                continue;
                            }
                            let (Some(root), Some(name)) = (watched.get(&event.wd), event.name)
                            else {
                                continue;
                            };
                            let path = root.join(name);
                            if event.mask.intersects(
                                inotify::EventMask::DELETE | inotify::EventMask::MOVED_FROM,
                            ) {
                                watcher.gone(&path);
                            } else if !event.mask.contains(inotify::EventMask::ISDIR) {
                                watcher.touched(path);
                            }
                        }
                        if overflowed {
                            tracing::warn!("auto-capture lost inotify events; rescanning");
                            watcher.rescan(&roots);
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => {
                        tracing::error!("auto-capture stopped: cannot read inotify events: {e}");
                        return;
                    }
                }
                watcher.tick();
                std::thread::sleep(TICK);
            }
        })
        .map_err(|e| Error::io("cannot start the thread of", "auto-capture", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn temporary_names_wait_for_their_rename() {
        for name in [
            ".web.raw",
            "web.raw.part",
            "web.raw.tmp",
            "web.raw~",
            "x.partial",
        ] {
            assert!(temporary_name(OsStr::new(name)), "{name}");
        }
        for name in [
            "web.raw",
            "0123456789abcdef0123456789abcdef01234567",
            "base.img",
        ] {
            assert!(!temporary_name(OsStr::new(name)), "{name}");
        }
    }

    fn watcher(dir: &Path, report: &Report) -> Watcher {
        report.set(AutoCaptureReport {
            roots: vec![dir.to_path_buf()],
            ..AutoCaptureReport::default()
        });
        Watcher {
            client: Client::new(dir.join("no-socket")),
            state_dir: dir.to_path_buf(),
            settle: Duration::from_secs(3600),
            waiting: BTreeMap::new(),
            skipped: HashMap::new(),
            report: report.clone(),
        }
    }

    #[test]
    fn each_watcher_reports_to_the_report_its_owner_gave_it() {
        let dir = tempfile::tempdir().unwrap();
        let (mine, other) = (Report::default(), Report::default());
        assert_eq!(mine.snapshot(), None, "empty until a watcher starts");
        let mut watcher_a = watcher(dir.path(), &mine);
        let _watcher_b = watcher(dir.path(), &other);
        let partial = dir.path().join("web.raw.part");
        let image = dir.path().join("web.raw");
        watcher_a.touched(partial.clone());
        watcher_a.touched(image.clone());
        watcher_a.tick();

        let seen = mine.snapshot().unwrap();
        let skipped: Vec<(&Path, &str)> = seen
            .skipped
            .iter()
            .map(|s| (s.path.as_path(), s.kind.as_str()))
            .collect();
        assert_eq!(skipped, [(partial.as_path(), "temporary-name")]);
        assert_eq!(seen.waiting, std::slice::from_ref(&image));
        assert_eq!(seen.roots, [dir.path().to_path_buf()]);
        let untouched = other.snapshot().unwrap();
        assert!(untouched.skipped.is_empty() && untouched.waiting.is_empty());

        // A file renamed away leaves the report; the other report never saw it.
        watcher_a.gone(&partial);
        watcher_a.tick();
        let seen = mine.snapshot().unwrap();
        assert!(seen.skipped.is_empty());
        assert_eq!(seen.waiting, [image]);
    }

    #[test]
    fn a_file_open_for_writing_is_seen_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image.raw");
        let mut file = std::fs::File::create(&path).unwrap();
        file.write_all(&[1; 512]).unwrap();
        assert_eq!(open_for_writing(&path), Some(std::process::id()));
        drop(file);
        assert_eq!(open_for_writing(&path), None);
        let _reader = std::fs::File::open(&path).unwrap();
        assert_eq!(open_for_writing(&path), None);
    }
}
