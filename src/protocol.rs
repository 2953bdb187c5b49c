//! The vmard wire protocol: JSON lines over a local Unix stream socket.
//!
//! A client connects, writes one [`Request`] as a JSON object on one line, and reads
//! [`Reply`] lines until the final `ok` or `error` one; then the connection closes. Long
//! operations (capture, verify) send `progress` lines first, and any request that runs
//! [`HEARTBEAT`] without sending anything sends a `working` line, so that a client's timeout
//! tells a hung vmard from a long request. Clients skip line types they do not know. Example:
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
/// 3: `ensure`, `create` takes `rebind`; `working` lines while a request runs without other
/// output; `metrics`, `dependents`, `restore-status`, device `reason`; `check`; `ping`
/// answers the instance id, the image roots and the devices waiting for their images; device
/// state `foreign`.
pub const PROTOCOL_VERSION: u32 = 3;
/// Where vmard listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/vmar/vmard.sock";
/// Where vmard serves read-only requests to anyone (monitoring), unless told otherwise.
pub const DEFAULT_RO_SOCKET: &str = "/run/vmar/vmard.ro.sock";
/// Longest silence of vmard while it works on a request: then it sends a `working` line.
pub const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(1);
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
        /// Serve other content than the name served before (see [`crate::binding`]).
        #[serde(default)]
        rebind: bool,
    },
    /// Make sure device `name` serves `image` (default: the image the name is bound to, else
    /// the image called `name`): succeeds when it does, creates it when missing, refuses
    /// other content. Result: [`EnsureResult`].
    Ensure {
        name: String,
        #[serde(default)]
        image: Option<String>,
        #[serde(default)]
        capture: bool,
        #[serde(default)]
        force_raw: bool,
        #[serde(default)]
        rebind: bool,
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
    /// Everything a monitoring system scrapes, in the Prometheus text format. Result:
    /// [`MetricsResult`].
    Metrics,
    /// The devices and maps that read image `name`. Result: [`Dependents`].
    Dependents { name: String },
    /// What the restore at vmard's start did. Result: [`RestoreStatus`].
    RestoreStatus,
    /// Record what live device `name` read (dm-stats areas with reads, cached now) into its
    /// image's working set of `phase` (default `boot`), merged with earlier recordings
    /// unless `replace`. Result: `prefetch::RecordResult`.
    Record {
        name: String,
        #[serde(default)]
        phase: Option<String>,
        #[serde(default)]
        replace: bool,
    },
    /// The working sets of a device's (or an image's) image; with `extents`, their runs.
    /// Result: `prefetch::WorkingSetResult`.
    WorkingSet {
        name: String,
        #[serde(default)]
        extents: bool,
    },
    /// Drop the working sets of a device's (or an image's) image, of `phase` or all.
    /// Result: `{"forgotten": N}`.
    ForgetWorkingSet {
        name: String,
        #[serde(default)]
        phase: Option<String>,
    },
    /// Read the union of the working sets (of `phase`, or all) of devices or images `names`
    /// into the page cache, each canonical block once, at a low I/O priority; with
    /// `cancel`, stop the running warms instead. Result: `prefetch::WarmReport`.
    Warm {
        #[serde(default)]
        names: Vec<String>,
        #[serde(default)]
        phase: Option<String>,
        #[serde(default)]
        cancel: bool,
    },
}

impl Request {
    /// Whether the request only reads: the only kind the read-only socket serves. Verify is
    /// left out (it reads whole images: not a monitoring probe).
    pub fn is_read_only(&self) -> bool {
        matches!(
            self,
            Request::Ping
                | Request::Images
                | Request::Map { .. }
                | Request::Table { .. }
                | Request::List
                | Request::Status { .. }
                | Request::Stats { .. }
                | Request::Metrics
                | Request::Dependents { .. }
                | Request::RestoreStatus
                | Request::Check
                | Request::WorkingSet { .. }
        )
    }
}

/// Result of `metrics`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricsResult {
    /// Prometheus text exposition format (0.0.4), as node_exporter's textfile collector reads.
    pub text: String,
}

/// Result of `dependents`: who reads an image.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dependents {
    pub image: String,
    /// Saved devices that read it: serving it, or serving an image whose map redirects to it.
    pub devices: Vec<Dependent>,
    /// Images whose maps redirect blocks to it (they change when it is forgotten or
    /// re-captured).
    pub images: Vec<Redirecting>,
}

/// A device that reads an image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dependent {
    pub name: String,
    pub node: String,
    /// The image the device serves (the image itself, or one that redirects to it).
    pub serves: String,
}

/// An image whose map reads blocks of another.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Redirecting {
    pub name: String,
    /// Blocks its map redirects to the image.
    pub blocks: u64,
}

/// Result of `restore-status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreStatus {
    /// Whether a restore ran (not with `--no-restore`).
    pub ran: bool,
    /// When it finished, seconds since the epoch.
    pub at: Option<u64>,
    /// What it did, when it ran through.
    pub report: Option<RestoreReport>,
    /// Why it did not run through (e.g. no device-mapper), when it did not.
    pub error: Option<String>,
}

impl RestoreStatus {
    /// Whether every saved device was restored.
    pub fn ok(&self) -> bool {
        self.error.is_none() && self.report.as_ref().is_none_or(|r| r.failed.is_empty())
    }
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
    Progress {
        done: u64,
        total: u64,
    },
    Ok {
        result: serde_json::Value,
    },
    Error {
        kind: String,
        message: String,
    },
    /// Still working on the request (sent after [`HEARTBEAT`] without other lines).
    Working,
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
    /// What was done with the image's digest sidecar (when `sidecars` is on in vmar.toml).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecar: Option<crate::sidecar::SidecarReport>,
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
    pub images: Vec<ImageEntry>,
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
    /// Error kind (as in errors) or `temporary-name`, `not-a-file`, `nova-file` (Nova's swap,
    /// ephemeral and resized files, see [`crate::nova`]).
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
    /// deferred to its last close; `unmanaged`: a `vmar-` device the catalog does not know;
    /// `image-changed`: an image it reads changed since capture (see `changed_images`), and
    /// by default reads of that image's extents fail with EIO.
    pub state: String,
    /// Images found changed under it (state `image-changed`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changed_images: Vec<String>,
    /// Why a device is not `active`, when vmard knows (e.g. the restore at start failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Its path, `/dev/vmar/NAME` (the udev rule makes it; `/dev/mapper/vmar-NAME` is
    /// dmsetup's name of the same device).
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

/// Result of `ensure`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnsureResult {
    /// The device was missing and was created (false: it already served the image).
    pub created: bool,
    /// The image it serves, and that image's content fingerprint.
    pub image: String,
    pub fingerprint: Option<String>,
    pub device: DeviceStatus,
}

/// What `restore` did at start-up.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreReport {
    /// Saved devices that were missing and were created.
    pub created: Vec<String>,
    /// Saved devices already live with the expected table: left alone.
    pub unchanged: Vec<String>,
    /// Saved devices served failed closed because an image they read changed since capture
    /// (state `image-changed`: those extents read as EIO).
    #[serde(default)]
    pub image_changed: Vec<String>,
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

/// One image of `images`: its record's fields and `file`, where its file stands. (Written
/// out by hand: serde's `flatten` cannot carry the record's 128-bit times.)
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageEntry {
    pub record: ImageRecord,
    /// Absent from vmards that did not report it.
    pub file: Option<ImageFileState>,
}

impl Serialize for ImageEntry {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::Error;
        let mut value = serde_json::to_value(&self.record).map_err(S::Error::custom)?;
        if let (Some(object), Some(file)) = (value.as_object_mut(), &self.file) {
            object.insert(
                "file".into(),
                serde_json::to_value(file).map_err(S::Error::custom)?,
            );
        }
        value.serialize(s)
    }
}

impl<'de> Deserialize<'de> for ImageEntry {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut value = serde_json::Value::deserialize(d)?;
        let file = match value.as_object_mut().and_then(|o| o.remove("file")) {
            Some(file) => Some(serde_json::from_value(file).map_err(D::Error::custom)?),
            None => None,
        };
        let record = serde_json::from_value(value).map_err(D::Error::custom)?;
        Ok(ImageEntry { record, file })
    }
}

impl std::ops::Deref for ImageEntry {
    type Target = ImageRecord;
    fn deref(&self) -> &ImageRecord {
        &self.record
    }
}

/// Where a captured image's file stands, and what keeps it (see [`crate::holds`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageFileState {
    /// `present`: its path names the captured file; `gone`: deleted, renamed, or the path
    /// names another file now.
    pub state: String,
    /// vmar's hold on the captured file (a hard link in the state directory), if any.
    pub hold: Option<PathBuf>,
    /// Why there is no hold.
    pub not_held: Option<String>,
    pub kept_by: KeptBy,
}

/// What needs an image: saved devices that read it, images whose maps redirect into it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptBy {
    pub devices: Vec<String>,
    pub images: Vec<String>,
}
