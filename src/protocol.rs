//! The vmard wire protocol: JSON lines over a local Unix stream socket.
//!
//! A client connects, writes one [`Request`] as a JSON object on one line, and reads
//! [`Reply`] lines until the final `ok` or `error` one; then the connection closes. Long
//! operations (capture, verify) send `progress` lines first. Example:
//!
//! ```text
//! > {"op":"capture","path":"/images/web.raw","name":null,"recapture":false}
//! < {"type":"progress","done":0,"total":1073741824}
//! < {"type":"ok","result":{"status":"captured","image":{...},"seconds":0.8}}
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::budget::BudgetCost;
use crate::kernel::LiveDevice;
use crate::map::{Extent, MapSummary, Source};
use crate::records::{CaptureStatus, ImageRecord};
use crate::stats::{ClassBytes, ReadBytes, TargetCounts};
use crate::table::Target;

/// Version of this protocol, answered by `ping`. 2: `remove` takes `deferred`, `capture` and
/// `create` take `force_raw`, device states `suspended`, `differs`, `creating`, `removing`.
/// 3: `check`; `ping` answers the instance id, the image roots and the devices waiting for
/// their images; device state `foreign`.
pub const PROTOCOL_VERSION: u32 = 3;
/// Where vmard listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/vmar/vmard.sock";
/// Longest request line vmard reads.
pub const MAX_REQUEST_BYTES: u64 = 1 << 20;

/// What a client asks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Liveness and version check. Result: [`PingResult`].
    Ping,
    /// Capture the image at `path` (absolute) under `name` (default: from the file name).
    /// Result: [`CaptureResult`].
    Capture {
        path: PathBuf,
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        recapture: bool,
        /// Capture even if the first bytes look like a container format (qcow2, vmdk, ...).
        #[serde(default)]
        force_raw: bool,
    },
    /// All captured images, in capture order. Result: [`ImagesResult`].
    Images,
    /// The map of an image: its figures, and its extents if `extents`. Result: [`MapResult`].
    Map {
        name: String,
        #[serde(default)]
        extents: bool,
    },
    /// The device-mapper table of an image. `devices` names the block device of each image
    /// (by image name); images not named get a `loop:NAME` placeholder. Result:
    /// [`TableResult`].
    Table {
        name: String,
        #[serde(default)]
        devices: BTreeMap<String, String>,
    },
    /// Read the image through its map and compare. Result: [`VerifyReport`].
    Verify { name: String },
    /// Remove an image from the catalog. Result: the removed [`ImageRecord`].
    Forget { name: String },
    /// Create device `name` serving `image` (a captured image's name, or an absolute path;
    /// with `capture`, a path not captured yet is captured first). Result: [`DeviceChange`].
    Create {
        name: String,
        image: String,
        #[serde(default)]
        capture: bool,
        #[serde(default)]
        force_raw: bool,
    },
    /// Remove a device; `deferred` removes an open device at its last close (as dmsetup's
    /// `remove --deferred`). `force` is its old name. Result: [`Removed`].
    Remove {
        name: String,
        #[serde(default, alias = "force")]
        deferred: bool,
    },
    /// Saved and live devices. Result: a list of [`DeviceStatus`].
    List,
    /// One device; with `table`, its live table. Result: [`DeviceStatus`].
    Status {
        name: String,
        #[serde(default)]
        table: bool,
    },
    /// Load the current map of a device's image into the live device, atomically. Result:
    /// [`DeviceChange`].
    Refresh { name: String },
    /// Bytes read by class of extent, target counts and page-cache sharing, of device
    /// `name` or of all live devices. Result: [`StatsReport`].
    Stats {
        #[serde(default)]
        name: Option<String>,
    },
    /// Whether every saved device is active and correct and every image root can be used.
    /// Result: [`CheckReport`].
    Check,
}

/// Progress of a long operation, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub done: u64,
    pub total: u64,
}

/// One line vmard sends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Reply {
    Progress { done: u64, total: u64 },
    Ok { result: serde_json::Value },
    Error { kind: String, message: String },
}

/// Result of `ping`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PingResult {
    pub version: String,
    pub protocol: u32,
    pub state_dir: PathBuf,
    /// The state dir's instance id (in the dm UUID of its devices); `None` from vmard before
    /// protocol 3.
    #[serde(default)]
    pub instance: Option<String>,
    /// Each configured image root and whether it can be used.
    #[serde(default)]
    pub roots: Vec<RootHealth>,
    /// Saved devices not restored yet (their image root or file is missing), with the
    /// reason; tried again when a root appears, every few seconds, and on SIGHUP.
    #[serde(default)]
    pub waiting: BTreeMap<String, String>,
}

/// One configured image root.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootHealth {
    pub path: PathBuf,
    /// Why it cannot be used (missing, unreadable); `None` when it can.
    pub error: Option<String>,
}

/// How bad a problem `check` found is; also its Nagios exit status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Ok = 0,
    Warning = 1,
    Critical = 2,
    /// vmard could not be asked (vmarctl's own verdict).
    Unknown = 3,
}

impl Severity {
    pub fn label(self) -> &'static str {
        match self {
            Severity::Ok => "OK",
            Severity::Warning => "WARNING",
            Severity::Critical => "CRITICAL",
            Severity::Unknown => "UNKNOWN",
        }
    }
}

/// One thing `check` found wrong.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    pub severity: Severity,
    /// What it is about: `device NAME` or `image root PATH`.
    pub subject: String,
    pub message: String,
}

/// Result of `check`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckReport {
    /// The worst severity of the problems (`ok` with none).
    pub status: Severity,
    pub problems: Vec<Problem>,
    /// Saved devices checked, and of them active and correct.
    pub devices: u64,
    pub devices_ok: u64,
    /// Configured image roots, and of them usable.
    pub roots: u64,
    pub roots_ok: u64,
}

/// Result of `capture`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CaptureResult {
    pub status: CaptureStatus,
    pub image: ImageRecord,
    /// Wall time of this request.
    pub seconds: f64,
    /// Other images whose maps a re-capture changed (they read from the old version).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changed: Vec<String>,
}

/// Result of `forget`: the record forgotten and the images whose maps changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForgetResult {
    pub image: ImageRecord,
    #[serde(default)]
    pub changed: Vec<String>,
}

/// Result of `images`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImagesResult {
    pub images: Vec<ImageRecord>,
    /// What auto-capture did, when it is on (`auto_capture` in vmar.toml).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_capture: Option<AutoCaptureReport>,
}

/// What vmard's watch of the image roots captured, skipped and waits for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutoCaptureReport {
    /// Directories watched (the image roots).
    pub roots: Vec<PathBuf>,
    /// Milliseconds a file must stay unchanged and closed for writing before it is captured.
    pub settle_ms: u64,
    /// Images captured, oldest first (the last 100).
    pub captured: Vec<AutoCaptured>,
    /// Files not captured, with the reason (the last 100; a file appears once per reason).
    pub skipped: Vec<AutoSkipped>,
    /// Files seen changing, waiting to settle.
    pub waiting: Vec<PathBuf>,
}

/// An image auto-capture captured.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutoCaptured {
    pub path: PathBuf,
    pub name: String,
    /// Seconds since the epoch.
    pub at: u64,
}

/// A file auto-capture left alone, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutoSkipped {
    pub path: PathBuf,
    /// Error kind (as in errors) or `temporary-name`, `not-a-file`.
    pub kind: String,
    pub reason: String,
    /// Seconds since the epoch.
    pub at: u64,
}

/// Result of `map`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapResult {
    pub name: String,
    pub size: u64,
    pub summary: MapSummary,
    /// Other images this one redirects to.
    pub references: Vec<ImageRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extents: Option<Vec<Extent>>,
}

/// An image named in another's map.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRef {
    pub id: crate::map::ImageId,
    pub name: String,
}

/// Result of `table`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableResult {
    pub name: String,
    pub targets: Vec<Target>,
    /// The table in `dmsetup` syntax.
    pub text: String,
}

/// How a device stands, from its record and the kernel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStatus {
    pub name: String,
    /// Image it serves, when saved.
    pub image: Option<String>,
    /// `active`: serving its image's current map; `suspended`: reads wait (a resume, or a
    /// restart of vmard, releases them); `differs`: live, but its table is not the image's
    /// current map (`refresh` swaps it in); `no-table`: live without a table; `missing`:
    /// saved, not in the kernel (a restart creates it); `creating`; `removing`: removal
    /// deferred to its last close; `unmanaged`: a `vmar-` device the catalog does not know.
    pub state: String,
    pub node: String,
    pub live: Option<LiveDevice>,
    /// Target counts of the live table by type.
    #[serde(default)]
    pub target_types: BTreeMap<String, u64>,
    /// Devices (`MAJOR:MINOR`) the live table reads from.
    #[serde(default)]
    pub reads_from: Vec<String>,
    /// What the target budget costs the image's current map.
    pub budget: Option<BudgetCost>,
    /// The live table, when asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<Vec<Target>>,
}

/// Result of `create` and `refresh`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceChange {
    pub device: DeviceStatus,
    pub targets: u64,
    pub budget: BudgetCost,
    /// Loop devices by image, and whether this change attached them.
    pub loops: BTreeMap<String, (String, bool)>,
    pub seconds: f64,
}

/// What `restore` did at start-up.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreReport {
    /// Saved devices that were missing and were created.
    pub created: Vec<String>,
    /// Saved devices already live with the expected table: left alone.
    pub unchanged: Vec<String>,
    /// Live devices brought back in line: resumed (left suspended by a crash), or given the
    /// image's current map (atomically, while in use).
    pub repaired: Vec<String>,
    /// Creates a crash interrupted, undone.
    pub rolled_back: Vec<String>,
    /// Removals a crash interrupted (or deferred ones that completed), finished.
    pub removed: Vec<String>,
    /// Saved devices that could not be served, with the reason; the others were restored.
    pub failed: Vec<(String, String)>,
    /// `VMAR-` devices the catalog does not know, nobody has open, removed.
    pub cleaned: Vec<String>,
    /// Loop devices over captured images left without autoclear, detached.
    pub detached: Vec<String>,
    /// Udev synchronisation left by killed processes, released.
    pub released: Vec<String>,
}

/// Result of `remove`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removed {
    pub name: String,
    /// The device was open: it goes away when its last user closes it.
    pub deferred: bool,
    /// It was in the kernel (not only saved).
    pub was_live: bool,
}

/// What `vmarctl stats` reports of one device.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceStats {
    pub name: String,
    pub image: Option<String>,
    pub targets: TargetCounts,
    /// Bytes of the device each class of extent maps.
    pub mapped: ClassBytes,
    /// Bytes read since the device was created (or since its statistics region was).
    pub read: ReadBytes,
    /// Bytes of the device whose backing pages are in the host page cache.
    pub cached: u64,
}

/// Page cache of one image file that devices read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageCache {
    pub path: String,
    /// Loop device (`MAJOR:MINOR`) the tables read it through.
    pub loop_device: String,
    pub size: u64,
    pub cached: u64,
}

/// Result of `stats`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatsReport {
    pub devices: Vec<DeviceStats>,
    pub images: Vec<ImageCache>,
    /// Sums over `devices`.
    pub targets: TargetCounts,
    pub mapped: ClassBytes,
    pub read: ReadBytes,
    /// Cached bytes all devices can read, over cached bytes of the image files: how many
    /// devices' worth of data each cached byte serves (1.0: no sharing).
    pub sharing_factor: Option<f64>,
}

/// The first block whose mapped content differs from the image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mismatch {
    pub block: u64,
    /// Byte offset of the first differing byte in the image.
    pub offset: u64,
    pub source: Source,
    /// Name of the image the block was read from (for redirects).
    pub source_image: Option<String>,
}

/// Outcome of a verification.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    pub name: String,
    pub blocks: u64,
    pub bytes_compared: u64,
    pub ok: bool,
    pub mismatch: Option<Mismatch>,
    /// Bytes read from the image and the images it redirects to (holes and own blocks are
    /// not read).
    #[serde(default)]
    pub bytes_read: u64,
    /// Of those, bytes that were not in the page cache before and were dropped after.
    #[serde(default)]
    pub bytes_dropped: u64,
    /// Wall time of the verification, in microseconds.
    #[serde(default)]
    pub micros: u64,
}
