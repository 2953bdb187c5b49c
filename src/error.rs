//! Typed errors of the library: each says what failed, on which image or path, and what to do.

use std::path::PathBuf;

/// Result alias of the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every failure the library reports. The `kind()` string is stable and sent over the socket so
/// that clients and tests can tell failures apart without parsing messages.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op} {path}: {error}")]
    Io {
        op: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },

    #[error("{path} is not a regular file or block device; capture takes raw disk images")]
    NotAnImage { path: PathBuf },

    #[error("{path} is empty; there is nothing to capture")]
    EmptyImage { path: PathBuf },

    #[error(
        "{path} is {size} bytes, not a multiple of 512; raw images are whole sectors (convert it with qemu-img first)"
    )]
    UnalignedSize { path: PathBuf, size: u64 },

    #[error(
        "invalid name {name:?}: use 1-64 characters of A-Z a-z 0-9 . _ - not starting with . or -"
    )]
    InvalidName { name: String },

    #[error(
        "{path} is outside the image roots {roots:?}; add its directory to image_roots in /etc/vmar/vmar.toml (or vmard --image-root)"
    )]
    OutsideImageRoots { path: PathBuf, roots: Vec<PathBuf> },

    #[error("no image named {name:?} in the catalog (see `vmarctl images`)")]
    UnknownImage { name: String },

    #[error("the name {name:?} is already used by {path}; choose another with --name")]
    NameTaken { name: String, path: PathBuf },

    #[error("{path} is already captured as {name:?}")]
    AlreadyCaptured { name: String, path: PathBuf },

    #[error(
        "image {name:?} ({path}) changed since it was captured ({what}); re-capture it with `vmarctl capture --recapture {path}`"
    )]
    ImageChanged {
        name: String,
        path: PathBuf,
        what: String,
    },

    #[error(
        "{path} changed while it was being captured ({what}); stop whatever writes it and capture again"
    )]
    ChangedDuringCapture { path: PathBuf, what: String },

    #[error("configuration {path}: {message}")]
    Config { path: PathBuf, message: String },

    #[error("catalog in {dir}: {message}")]
    Catalog { dir: PathBuf, message: String },

    /// A request or reply that breaks the protocol: not JSON, an unknown op, a bad argument.
    #[error("{0}")]
    Protocol(String),

    /// vmar's own failure, not the request's or the system's: a broken invariant, a
    /// panicked thread, a value that cannot be encoded.
    #[error("internal error: {what} (a bug in vmar: please report it with vmard's log)")]
    Internal { what: String },

    #[error("cannot reach vmard at {socket}: {error}; {}", unreachable_hint(.error))]
    DaemonUnavailable {
        socket: PathBuf,
        error: std::io::Error,
    },

    /// An error vmard reported; `kind` is the daemon-side [`Error::kind`].
    #[error("{message}")]
    Remote { kind: String, message: String },

    #[error("permission denied: {0}")]
    PermissionDenied(String),

    /// The socket exists but this user may not connect to it.
    #[error(
        "permission denied on vmard's socket {socket}: run vmarctl as root, or add the user to the group named by socket_group in /etc/vmar/vmar.toml (then log in again)"
    )]
    SocketDenied { socket: PathBuf },

    #[error("device-mapper {op} {device}: {message}")]
    DeviceMapper {
        op: &'static str,
        device: String,
        message: String,
    },

    #[error(
        "image {name:?} is read by device{} {}; remove {} first (`vmarctl dependents {name}` lists what reads it)",
        if devices.len() == 1 { "" } else { "s" },
        devices.join(", "),
        if devices.len() == 1 { "it" } else { "them" }
    )]
    ImageInUse { name: String, devices: Vec<String> },

    #[error("no vmar device named {name:?} (see `vmarctl list`)")]
    UnknownDevice { name: String },

    #[error("a vmar device named {name:?} already exists (remove it first, or refresh it)")]
    DeviceExists { name: String },

    #[error(
        "device name {name:?} served image {bound_image:?} ({}); {image:?} ({}) is other content, and whatever names /dev/vmar/{name} (a qcow2 overlay's backing file, a domain's disk) would read other bytes. Use another name, or `--rebind` once nothing backs onto /dev/vmar/{name}",
        .bound_fingerprint.as_deref().unwrap_or("no fingerprint"),
        .fingerprint.as_deref().unwrap_or("no fingerprint")
    )]
    NameBound {
        name: String,
        bound_image: String,
        bound_fingerprint: Option<String>,
        image: String,
        fingerprint: Option<String>,
    },

    #[error("overlay {path}: {message}")]
    OverlayMismatch { path: PathBuf, message: String },

    #[error("qemu-img on {path}: {message}")]
    QemuImg { path: PathBuf, message: String },

    #[error(
        "device {name:?} belongs to another vmar state dir or tool (dm UUID {uuid:?}); this vmard changes only devices of its own state dir: change it with the vmard that made it, or pick another name"
    )]
    ForeignDevice { name: String, uuid: String },

    #[error(
        "device {name:?} is open ({open_count} users); close it (stop the VM) and retry, or use --deferred to remove it when the last user closes it"
    )]
    DeviceBusy { name: String, open_count: i32 },

    #[error(
        "{path} is a {format} image, not a raw one; vmar serves raw images only. Convert it: `qemu-img convert -O raw {path} IMAGE.raw` (or, if it really is raw and only starts like {format}, capture it with --force-raw)"
    )]
    ImageFormat { path: PathBuf, format: String },

    #[error(
        "{path} has {links} hard links: another name, possibly outside the image roots, reaches the same file; copy the image into an image root and capture the copy"
    )]
    HardLinked { path: PathBuf, links: u64 },

    #[error("injected fault at step {step} (VMAR_FAULTS)")]
    Injected { step: &'static str },

    #[error("vmard is shutting down; the request was cancelled, retry once it is back")]
    ShuttingDown,

    #[error("the capture was cancelled: its client went away (Ctrl-C); nothing was kept")]
    Cancelled,

    #[error("vmard is busy: {0}; retry shortly")]
    Busy(String),

    /// vmard accepted no request, or sent nothing (no reply, progress or heartbeat), for the
    /// client's timeout: it is stopped, hung, or still restoring devices at start.
    #[error(
        "vmard at {socket} did not answer within {seconds} s: it may be stopped (SIGSTOP), hung, or still restoring devices at start; see `systemctl status vmard` and `journalctl -u vmard`, or wait longer with --timeout SECONDS (0: no limit)"
    )]
    DaemonTimeout { socket: PathBuf, seconds: u64 },
}

/// `text` cut to at most 80 characters for an error message, so a client sending a huge
/// name does not get it echoed back.
pub fn shorten(text: &str) -> String {
    const MAX: usize = 80;
    if text.chars().count() <= MAX {
        return text.to_string();
    }
    let mut short: String = text.chars().take(MAX).collect();
    short.push_str("...");
    short
}

impl Error {
    /// Short stable identifier of the failure, for the wire protocol and `--json` output.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Io { .. } => "io",
            Error::NotAnImage { .. } => "not-an-image",
            Error::EmptyImage { .. } => "empty-image",
            Error::UnalignedSize { .. } => "unaligned-size",
            Error::InvalidName { .. } => "invalid-name",
            Error::UnknownImage { .. } => "unknown-image",
            Error::OutsideImageRoots { .. } => "outside-image-roots",
            Error::NameTaken { .. } => "name-taken",
            Error::AlreadyCaptured { .. } => "already-captured",
            Error::ImageChanged { .. } => "image-changed",
            Error::ChangedDuringCapture { .. } => "changed-during-capture",
            Error::Catalog { .. } => "catalog",
            Error::Config { .. } => "config",
            Error::Protocol(_) => "protocol",
            Error::Internal { .. } => "internal",
            Error::DaemonUnavailable { .. } => "daemon-unavailable",
            Error::Remote { .. } => "remote",
            Error::PermissionDenied(_) | Error::SocketDenied { .. } => "permission-denied",
            Error::DeviceMapper { .. } => "device-mapper",
            Error::UnknownDevice { .. } => "unknown-device",
            Error::ImageInUse { .. } => "image-in-use",
            Error::DeviceExists { .. } => "device-exists",
            Error::NameBound { .. } => "name-bound",
            Error::OverlayMismatch { .. } => "overlay-mismatch",
            Error::QemuImg { .. } => "qemu-img",
            Error::ForeignDevice { .. } => "foreign-device",
            Error::DeviceBusy { .. } => "device-busy",
            Error::ImageFormat { .. } => "image-format",
            Error::HardLinked { .. } => "hard-linked",
            Error::Injected { .. } => "injected",
            Error::ShuttingDown => "shutting-down",
            Error::Cancelled => "cancelled",
            Error::Busy(_) => "busy",
            Error::DaemonTimeout { .. } => "daemon-timeout",
        }
    }

    /// Which exit status class this failure ends vmarctl with.
    pub fn exit_class(&self) -> ExitClass {
        match self {
            Error::Remote { kind, .. } => ExitClass::of_kind(kind),
            other => ExitClass::of_kind(other.kind()),
        }
    }

    /// An [`Error::Internal`]: `what` went wrong that only a bug in vmar explains.
    pub fn internal(what: impl Into<String>) -> Self {
        Error::Internal { what: what.into() }
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            error,
        }
    }
}

/// What to try when vmard's socket cannot be reached, by the cause.
fn unreachable_hint(error: &std::io::Error) -> &'static str {
    match error.kind() {
        std::io::ErrorKind::NotFound => {
            "is vmard running? There is no socket there: start it with `systemctl start vmard`, or name its socket with --socket or VMAR_SOCKET"
        }
        std::io::ErrorKind::ConnectionRefused => {
            "is vmard running? Nothing listens on the socket (it stopped or crashed): `systemctl start vmard`, and see `journalctl -u vmard`"
        }
        _ => "check that vmard runs (`systemctl status vmard`) and that --socket names its socket",
    }
}

/// Classes of failure, as vmarctl's exit status: scripts branch on the class, and the
/// `kind` of the JSON error tells the exact cause. Documented in vmarctl(1) EXIT STATUS.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ExitClass {
    /// Success (also when stdout was closed early, e.g. by `head`).
    Success = 0,
    /// Any other failure: I/O, device-mapper, the catalog, the protocol, vmar's own bugs.
    Failed = 1,
    /// Bad command line or arguments.
    Usage = 2,
    /// A check ran and failed: `verify` found a mismatch.
    CheckFailed = 3,
    /// No such image or device.
    NotFound = 4,
    /// Refused: busy, in use, changed image, outside the image roots, not a raw image, name taken
    /// or bound to other content.
    Refused = 5,
    /// vmard cannot be reached, or this user may not use it.
    Unreachable = 6,
}

impl ExitClass {
    /// Every class with a one-line description, for the manual and README.
    pub const ALL: [(ExitClass, &'static str); 7] = [
        (
            ExitClass::Success,
            "success (also when stdout closed early, as with `| head`)",
        ),
        (
            ExitClass::Failed,
            "failure of another class: I/O, device-mapper, catalog, protocol, internal",
        ),
        (ExitClass::Usage, "bad command line or arguments"),
        (
            ExitClass::CheckFailed,
            "check failed: verify found a mismatch",
        ),
        (ExitClass::NotFound, "no such image or device"),
        (
            ExitClass::Refused,
            "refused: busy, in use, image changed, outside the image roots, not raw, name taken, name bound to other content, overlay not over the device",
        ),
        (
            ExitClass::Unreachable,
            "vmard unreachable or not answering (--timeout), or permission denied on its socket",
        ),
    ];

    /// The class of an error `kind` (see [`Error::kind`]); unknown kinds are `Failed`.
    pub fn of_kind(kind: &str) -> ExitClass {
        match kind {
            "usage" | "invalid-name" => ExitClass::Usage,
            "check-failed" => ExitClass::CheckFailed,
            "unknown-image" | "unknown-device" | "not-found" => ExitClass::NotFound,
            "outside-image-roots"
            | "name-taken"
            | "already-captured"
            | "image-changed"
            | "changed-during-capture"
            | "image-in-use"
            | "device-exists"
            | "name-bound"
            | "overlay-mismatch"
            | "foreign-device"
            | "device-busy"
            | "image-format"
            | "hard-linked"
            | "busy"
            | "shutting-down"
            | "not-an-image"
            | "empty-image"
            | "unaligned-size" => ExitClass::Refused,
            "daemon-unavailable" | "daemon-timeout" | "permission-denied" => ExitClass::Unreachable,
            _ => ExitClass::Failed,
        }
    }

    pub fn code(self) -> u8 {
        self as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_the_class_its_meaning_says() {
        let missing = Error::DaemonUnavailable {
            socket: "/nonexistent".into(),
            error: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        assert_eq!(missing.exit_class(), ExitClass::Unreachable);
        assert!(missing.to_string().contains("systemctl start"), "{missing}");
        let denied = Error::SocketDenied {
            socket: "/run/vmar/vmard.sock".into(),
        };
        assert_eq!(denied.kind(), "permission-denied");
        assert!(!denied.to_string().contains("systemctl start"), "{denied}");
        assert_eq!(
            Error::UnknownImage { name: "x".into() }.exit_class(),
            ExitClass::NotFound
        );
        let remote = Error::Remote {
            kind: "device-busy".into(),
            message: String::new(),
        };
        assert_eq!(remote.exit_class(), ExitClass::Refused);
        assert_eq!(ExitClass::of_kind("io"), ExitClass::Failed);
        let bug = Error::Internal {
            what: "hashing thread panicked".into(),
        };
        assert_eq!(
            (bug.kind(), bug.exit_class()),
            ("internal", ExitClass::Failed)
        );
        assert!(bug.to_string().contains("a bug in vmar"), "{bug}");
        let codes: std::collections::BTreeSet<u8> =
            ExitClass::ALL.iter().map(|(c, _)| c.code()).collect();
        assert_eq!(codes.len(), ExitClass::ALL.len());
    }
}
