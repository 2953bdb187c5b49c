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

use crate::catalog::{CaptureStatus, ImageRecord};
use crate::map::{Extent, MapSummary};
use crate::table::Target;

/// Version of this protocol, answered by `ping`.
pub const PROTOCOL_VERSION: u32 = 1;
/// Longest request line vmard reads.
pub const MAX_REQUEST_BYTES: u64 = 1 << 20;

/// What a client asks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Liveness and version check.
    Ping,
    /// Capture the image at `path` (absolute) under `name` (default: from the file name).
    Capture {
        path: PathBuf,
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        recapture: bool,
    },
    /// All captured images, in capture order.
    Images,
    /// The map of an image: its figures, and its extents if `extents`.
    Map {
        name: String,
        #[serde(default)]
        extents: bool,
    },
    /// The device-mapper table of an image. `devices` names the block device of each image
    /// (by image name); images not named get a `loop:NAME` placeholder.
    Table {
        name: String,
        #[serde(default)]
        devices: BTreeMap<String, String>,
    },
    /// Read the image through its map and compare.
    Verify { name: String },
    /// Remove an image from the catalog.
    Forget { name: String },
    /// Create device `name` serving `image` (a captured image's name, or an absolute path;
    /// with `capture`, a path not captured yet is captured first).
    Create {
        name: String,
        image: String,
        #[serde(default)]
        capture: bool,
    },
    /// Remove a device; `force` defers the removal of an open device to its last close.
    Remove {
        name: String,
        #[serde(default)]
        force: bool,
    },
    /// Saved and live devices.
    List,
    /// One device; with `table`, its live table.
    Status {
        name: String,
        #[serde(default)]
        table: bool,
    },
    /// Load the current map of a device's image into the live device, atomically.
    Refresh { name: String },
    /// Bytes read by class of extent, target counts and page-cache sharing, of device
    /// `name` or of all live devices.
    Stats {
        #[serde(default)]
        name: Option<String>,
    },
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
}

/// Result of `capture`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CaptureResult {
    pub status: CaptureStatus,
    pub image: ImageRecord,
    /// Wall time of this request.
    pub seconds: f64,
}

/// Result of `images`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImagesResult {
    pub images: Vec<ImageRecord>,
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
