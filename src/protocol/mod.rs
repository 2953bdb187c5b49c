//! The vmard wire protocol: JSON lines over a local Unix stream socket.
//!
//! A client connects, writes one [`Request`] as a JSON object on one line, and reads
//! [`Reply`] lines until the final `ok` or `error` one; then the connection closes. Long
//! operations (capture, verify) send `progress` lines first, and any request that runs
//! [`HEARTBEAT`] without sending anything sends a `working` line, so that a client's timeout
//! tells a hung vmard from a long request. Clients skip line types they do not know.
//! [`request`] has every request, each paired with the type of its result ([`Call`]); this
//! module has the results and the reply lines. Example:
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
use crate::map::{Extent, MapSummary};
pub use crate::progress::Progress;
use crate::records::{CaptureStatus, ImageRecord};
pub use crate::records::{ImageFileState, KeptBy};
use crate::stats::{ClassBytes, ReadBytes, TargetCounts};
use crate::table::Target;
pub use crate::verify::{Mismatch, VerifyReport};

pub mod request;
pub use request::{Call, Request};

/// Version of this protocol, answered by `ping`. 2: `remove` takes `deferred`, `capture` and
/// `create` take `force_raw`, device states `suspended`, `differs`, `creating`, `removing`.
/// 3: `ensure`, `create` takes `rebind`; `working` lines while a request runs without other
/// output; `metrics`, `dependents`, `restore-status`, device `reason`; `check`; `ping`
/// answers the instance id, the image roots and the devices waiting for their images; device
/// state `foreign`. 4: `record`, `working-set`, `forget-working-set`, `warm`, `bindings`.
pub const PROTOCOL_VERSION: u32 = 4;
/// Where vmard listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/vmar/vmard.sock";
/// Where vmard serves read-only requests to anyone (monitoring), unless told otherwise.
pub const DEFAULT_RO_SOCKET: &str = "/run/vmar/vmard.ro.sock";
/// Longest silence of vmard while it works on a request: then it sends a `working` line.
pub const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(1);
/// Longest request line vmard reads.
pub const MAX_REQUEST_BYTES: u64 = 1 << 20;

/// Result of `metrics`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricsResult {
    /// Prometheus text exposition format (0.0.4), as node_exporter's textfile collector reads.
    pub text: String,
}

/// Result of `bindings`: the content each device name is bound to (see
/// [`crate::binding`]), also after its device was removed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bindings {
    pub bindings: Vec<Binding>,
}

/// One device name and the content it is bound to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    pub name: String,
    /// `/dev/vmar/NAME`, what overlays and domains name.
    pub node: String,
    /// The image it served when it was bound.
    pub image: String,
    /// That content's fingerprint (none for images captured before fingerprints).
    pub fingerprint: Option<String>,
    /// Seconds since the epoch.
    pub bound_at: u64,
    /// Whether a device of that name is saved now (else it was removed; the name still
    /// refuses other content).
    pub device: bool,
    /// Whether an image of that content is in the catalog now, so `ensure NAME` can serve it.
    pub servable: bool,
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

/// One line vmard sends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Reply {
    Progress(Progress),
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
    /// What the kernel has under its dm name (none: no such device).
    pub live: Option<LiveInfo>,
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

/// A device as the kernel has it, as `status` reports it: the fields of the kernel seam's
/// `LiveDevice` (`src/kernel/`), copied so that the wire does not change with the seam.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveInfo {
    /// Name without the `vmar-` prefix.
    pub name: String,
    pub dm_name: String,
    pub uuid: Option<String>,
    pub major: u32,
    pub minor: u32,
    pub open_count: i32,
    pub read_only: bool,
    /// Suspended: reads wait until it is resumed.
    pub suspended: bool,
    /// Whether it has an active table (one created by a crashed create may not).
    #[serde(default)]
    pub active_table: bool,
    /// Whether a table is loaded in the inactive slot, waiting for a resume.
    #[serde(default)]
    pub inactive_table: bool,
    /// Removal deferred to its last close.
    #[serde(default)]
    pub deferred_remove: bool,
    /// Targets of the active table.
    pub targets: u64,
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

/// A working set in figures.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetSummary {
    pub phase: String,
    pub blocks: u64,
    pub bytes: u64,
    pub runs: u64,
    pub recordings: u32,
    /// Unix time of the last recording.
    pub updated: u64,
    /// Its runs as `[first block, blocks]`, when asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extents: Option<Vec<[u64; 2]>>,
}

/// Result of `record`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordResult {
    pub device: String,
    pub image: String,
    /// Bytes the device's read areas cover (where reads were counted).
    pub read_area_bytes: u64,
    /// Bytes of those areas left out: not cached (never read, or evicted since).
    pub uncached_bytes: u64,
    /// Bytes this recording found.
    pub recorded_bytes: u64,
    /// The stored set after merging.
    pub set: SetSummary,
}

/// Result of `working-set`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkingSetResult {
    pub image: String,
    pub sets: Vec<SetSummary>,
}

/// One image of a warm.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WarmImage {
    /// As asked (a device or an image name).
    pub name: String,
    pub image: String,
    /// Phases whose sets were used; empty when it has none.
    pub phases: Vec<String>,
    /// Bytes of its working set (image space).
    pub bytes: u64,
    /// Bytes of it that need reading (not zero extents).
    pub canonical_bytes: u64,
}

/// Result of `warm`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WarmReport {
    pub images: Vec<WarmImage>,
    /// Bytes of the union of canonical extents (each block once).
    pub union_bytes: u64,
    /// Bytes the union saves over warming each image alone.
    pub shared_bytes: u64,
    /// Bytes of the union already cached: not read.
    pub cached_bytes: u64,
    /// Requests after merging, and the bytes they read (wanted and gaps).
    pub requests: u64,
    pub request_bytes: u64,
    pub gap_bytes: u64,
    /// What reading did.
    pub read_bytes: u64,
    pub reads: u64,
    pub seconds: f64,
    pub cancelled: bool,
    /// Requests skipped: cached whole by the time they were read (another warm read them).
    #[serde(default)]
    pub skipped_requests: u64,
    /// Runs in the background (`prefetch = "create"`): the read figures are not known yet.
    #[serde(default)]
    pub background: bool,
    #[serde(default)]
    pub errors: Vec<String>,
    /// Warms stopped (`--cancel`).
    #[serde(default)]
    pub stopped: u64,
}

/// Result of `forget-working-set`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForgetWorkingSetResult {
    /// Working sets dropped.
    pub forgotten: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reply lines as vmard has always sent them.
    #[test]
    fn reply_lines_travel_as_before() {
        let cases = [
            (
                Reply::Progress(Progress { done: 1, total: 2 }),
                r#"{"type":"progress","done":1,"total":2}"#,
            ),
            (Reply::Working, r#"{"type":"working"}"#),
            (
                Reply::Ok {
                    result: serde_json::json!({"text": "x"}),
                },
                r#"{"type":"ok","result":{"text":"x"}}"#,
            ),
            (
                Reply::Error {
                    kind: "not-found".into(),
                    message: "no image x".into(),
                },
                r#"{"type":"error","kind":"not-found","message":"no image x"}"#,
            ),
        ];
        for (reply, line) in cases {
            assert_eq!(serde_json::to_string(&reply).unwrap(), line);
            assert_eq!(serde_json::from_str::<Reply>(line).unwrap(), reply);
        }
    }
}
