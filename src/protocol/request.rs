//! What a client asks, each request paired with the result vmard answers it with.
//!
//! Every request is a type of its own (a struct, or a unit struct for those without
//! arguments) that implements [`Call`]: `Call::Reply` is the type of the `result` of the `ok`
//! line that answers it. [`crate::client::Client::call`] decodes a reply as the request's
//! `Reply`, and vmard's handler for a request must return that type, so the two sides cannot
//! disagree about what a request returns without the compiler saying so. [`Request`], the
//! enum of all of them, is what travels on the wire (`{"op":"map","name":"web",...}`).
//!
//! Names are [`ImageName`], [`DeviceName`] or [`Name`] (either): checked as the request is
//! read, so handlers never see an invalid one.
//!
//! A new request: its struct here, a variant in [`Request`], a line in the `pairs!` table,
//! and its handler in [`crate::service`] (see docs/architecture.md).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::name::{DeviceName, ImageName, Name};

use super::{
    CaptureResult, CheckReport, DeviceChange, DeviceStatus, EnsureResult, ForgetResult,
    ForgetWorkingSetResult, ImagesResult, MapResult, MetricsResult, PingResult, RecordResult,
    Removed, StatsReport, TableResult, VerifyReport, WarmReport, WorkingSetResult,
};

/// A request and the type of the result vmard answers it with.
pub trait Call: Into<Request> {
    /// The `result` of the `ok` line that answers this request.
    type Reply: Serialize + DeserializeOwned;
}

/// Every request, as it travels on the wire: a JSON object whose `op` names the request
/// (kebab-case of the variant) beside the fields of its struct.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    Ping,
    Capture(Capture),
    Images,
    Map(Map),
    Table(Table),
    Verify(Verify),
    Forget(Forget),
    Create(Create),
    Ensure(Ensure),
    Remove(Remove),
    List,
    Status(Status),
    Refresh(Refresh),
    Stats(Stats),
    Check,
    Metrics,
    Dependents(Dependents),
    RestoreStatus,
    Bindings,
    Record(Record),
    WorkingSet(WorkingSet),
    ForgetWorkingSet(ForgetWorkingSet),
    Warm(Warm),
}

/// Each request type with its result type; `unit` for the requests without arguments (a
/// unit variant of [`Request`]), `fields` for the others (a variant holding the struct).
macro_rules! pairs {
    ($($kind:ident $request:ident => $reply:ty;)*) => {
        $(
            impl Call for $request {
                type Reply = $reply;
            }
            pairs!(@from $kind $request);
        )*
    };
    (@from unit $request:ident) => {
        impl From<$request> for Request {
            fn from(_: $request) -> Request {
                Request::$request
            }
        }
    };
    (@from fields $request:ident) => {
        impl From<$request> for Request {
            fn from(request: $request) -> Request {
                Request::$request(request)
            }
        }
    };
}

pairs! {
    unit Ping => PingResult;
    fields Capture => CaptureResult;
    unit Images => ImagesResult;
    fields Map => MapResult;
    fields Table => TableResult;
    fields Verify => VerifyReport;
    fields Forget => ForgetResult;
    fields Create => DeviceChange;
    fields Ensure => EnsureResult;
    fields Remove => Removed;
    unit List => Vec<DeviceStatus>;
    fields Status => DeviceStatus;
    fields Refresh => DeviceChange;
    fields Stats => StatsReport;
    unit Check => CheckReport;
    unit Metrics => MetricsResult;
    fields Dependents => super::Dependents;
    unit RestoreStatus => super::RestoreStatus;
    unit Bindings => super::Bindings;
    fields Record => RecordResult;
    fields WorkingSet => WorkingSetResult;
    fields ForgetWorkingSet => ForgetWorkingSetResult;
    fields Warm => WarmReport;
}

impl Request {
    /// Whether the request only reads: the only kind the read-only socket serves. Verify is
    /// left out (it reads whole images: not a monitoring probe).
    pub fn is_read_only(&self) -> bool {
        matches!(
            self,
            Request::Ping
                | Request::Images
                | Request::Map(_)
                | Request::Table(_)
                | Request::List
                | Request::Status(_)
                | Request::Stats(_)
                | Request::Metrics
                | Request::Dependents(_)
                | Request::RestoreStatus
                | Request::Bindings
                | Request::Check
                | Request::WorkingSet(_)
        )
    }
}

/// Liveness and version check.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ping;

/// Capture the image at `path` (absolute) under `name` (default: from the file name).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capture {
    pub path: PathBuf,
    #[serde(default)]
    pub name: Option<ImageName>,
    #[serde(default)]
    pub recapture: bool,
    /// Capture even if the first bytes look like a container format (qcow2, vmdk, ...).
    #[serde(default)]
    pub force_raw: bool,
}

/// All captured images, in capture order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Images;

/// The map of an image: its figures, and its extents if `extents`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Map {
    pub name: ImageName,
    #[serde(default)]
    pub extents: bool,
}

/// The device-mapper table of an image. `devices` names the block device of each image (by
/// image name); images not named get a `loop:NAME` placeholder.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Table {
    pub name: ImageName,
    #[serde(default)]
    pub devices: BTreeMap<String, String>,
}

/// Read the image through its map and compare.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verify {
    pub name: ImageName,
}

/// Remove an image from the catalog; the result names the images whose maps changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forget {
    pub name: ImageName,
}

/// Create device `name` serving `image` (a captured image's name, or an absolute path; with
/// `capture`, a path not captured yet is captured first).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Create {
    pub name: DeviceName,
    pub image: String,
    #[serde(flatten)]
    pub options: DeviceOptions,
}

/// What `create` and `ensure` may do to serve their image (on the wire, fields of the
/// request itself).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceOptions {
    /// Capture an image path that is not captured yet first.
    #[serde(default)]
    pub capture: bool,
    /// With `capture`: even if the first bytes look like a container format.
    #[serde(default)]
    pub force_raw: bool,
    /// Serve other content than the name served before (see [`crate::binding`]).
    #[serde(default)]
    pub rebind: bool,
}

/// Make sure device `name` serves `image` (default: the image the name is bound to, else the
/// image called `name`): succeeds when it does, creates it when missing, refuses other
/// content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ensure {
    pub name: DeviceName,
    #[serde(default)]
    pub image: Option<String>,
    #[serde(flatten)]
    pub options: DeviceOptions,
}

impl Ensure {
    /// Device `name` serving the content its name is bound to (what the libvirt hook asks).
    pub fn bound(name: DeviceName) -> Ensure {
        Ensure {
            name,
            image: None,
            options: DeviceOptions::default(),
        }
    }
}

/// Remove a device; `deferred` removes an open device at its last close (as dmsetup's
/// `remove --deferred`). `force` is its old name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remove {
    pub name: DeviceName,
    #[serde(default, alias = "force")]
    pub deferred: bool,
}

/// Saved and live devices.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct List;

/// One device; with `table`, its live table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub name: DeviceName,
    #[serde(default)]
    pub table: bool,
}

/// Load the current map of a device's image into the live device, atomically.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refresh {
    pub name: DeviceName,
}

/// Bytes read by class of extent, target counts and page-cache sharing, of device `name` or
/// of all live devices.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    #[serde(default)]
    pub name: Option<DeviceName>,
}

/// Whether every saved device is active and correct and every image root can be used.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Check;

/// Everything a monitoring system scrapes, in the Prometheus text format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Metrics;

/// The devices and maps that read image `name`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dependents {
    pub name: ImageName,
}

/// What the restore at vmard's start did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RestoreStatus;

/// The content each device name is bound to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bindings;

/// Record what live device `name` read (dm-stats areas with reads, cached now) into its
/// image's working set of `phase` (default `boot`), merged with earlier recordings unless
/// `replace` (see [`crate::prefetch`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub name: DeviceName,
    #[serde(default)]
    pub phase: Option<String>,
    #[serde(default)]
    pub replace: bool,
}

/// The working sets of a device's (or an image's) image; with `extents`, their runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkingSet {
    pub name: Name,
    #[serde(default)]
    pub extents: bool,
}

/// Drop the working sets of a device's (or an image's) image, of `phase` or all.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForgetWorkingSet {
    pub name: Name,
    #[serde(default)]
    pub phase: Option<String>,
}

/// Read the union of the working sets (of `phase`, or all) of devices or images `names` into
/// the page cache, each canonical block once, at a low I/O priority; with `cancel`, stop the
/// running warms instead.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Warm {
    #[serde(default)]
    pub names: Vec<Name>,
    #[serde(default)]
    pub phase: Option<String>,
    #[serde(default)]
    pub cancel: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(name: &str) -> DeviceName {
        DeviceName::new(name).unwrap()
    }

    fn img(name: &str) -> ImageName {
        ImageName::new(name).unwrap()
    }

    fn either(name: &str) -> Name {
        Name::new(name).unwrap()
    }

    /// The request lines vmarctl sent before requests were types of their own, recorded
    /// from its socket: each must parse and travel again byte for byte.
    const RECORDED: &[&str] = &[
        r#"{"op":"ping"}"#,
        r#"{"op":"capture","path":"/tmp/arch-wire-img.raw","name":"n","recapture":true,"force_raw":true}"#,
        r#"{"op":"capture","path":"/tmp/arch-wire-img.raw","name":null,"recapture":false,"force_raw":false}"#,
        r#"{"op":"images"}"#,
        r#"{"op":"map","name":"n","extents":true}"#,
        r#"{"op":"table","name":"n","devices":{}}"#,
        r#"{"op":"table","name":"web","devices":{"base":"7:0","web":"/dev/loop1"}}"#,
        r#"{"op":"verify","name":"n"}"#,
        r#"{"op":"forget","name":"n"}"#,
        r#"{"op":"create","name":"d","image":"img","capture":true,"force_raw":true,"rebind":true}"#,
        r#"{"op":"ensure","name":"d","image":null,"capture":false,"force_raw":false,"rebind":false}"#,
        r#"{"op":"ensure","name":"d","image":"/tmp/arch-wire-img.raw","capture":true,"force_raw":true,"rebind":true}"#,
        r#"{"op":"remove","name":"d","deferred":true}"#,
        r#"{"op":"list"}"#,
        r#"{"op":"status","name":"d","table":true}"#,
        r#"{"op":"refresh","name":"d"}"#,
        r#"{"op":"stats","name":null}"#,
        r#"{"op":"stats","name":"d"}"#,
        r#"{"op":"metrics"}"#,
        r#"{"op":"dependents","name":"n"}"#,
        r#"{"op":"restore-status"}"#,
        r#"{"op":"check"}"#,
    ];

    /// The prefetch branch's request lines, recorded from its vmarctl's socket (`record d`,
    /// `record d --phase app --replace`, `working-set n [--extents | --forget [--phase
    /// boot]]`, `warm a b`, `warm a --phase boot`, `warm --cancel`) before its requests were
    /// types of their own.
    const RECORDED_PREFETCH: &[&str] = &[
        r#"{"op":"record","name":"d","phase":"boot","replace":false}"#,
        r#"{"op":"record","name":"d","phase":"app","replace":true}"#,
        r#"{"op":"working-set","name":"n","extents":false}"#,
        r#"{"op":"working-set","name":"n","extents":true}"#,
        r#"{"op":"forget-working-set","name":"n","phase":null}"#,
        r#"{"op":"forget-working-set","name":"n","phase":"boot"}"#,
        r#"{"op":"warm","names":["a","b"],"phase":null,"cancel":false}"#,
        r#"{"op":"warm","names":["a"],"phase":"boot","cancel":false}"#,
        r#"{"op":"warm","names":[],"phase":null,"cancel":true}"#,
    ];

    #[test]
    fn requests_travel_as_before() {
        for line in RECORDED {
            let request: Request = serde_json::from_str(line).unwrap();
            assert_eq!(&serde_json::to_string(&request).unwrap(), line);
        }
        // The request types become the variants whose lines were recorded.
        let typed: [(Request, usize); 4] = [
            (Ping.into(), 0),
            (Ensure::bound(dev("d")).into(), 10),
            (RestoreStatus.into(), 20),
            (
                Capture {
                    path: "/tmp/arch-wire-img.raw".into(),
                    name: None,
                    recapture: false,
                    force_raw: false,
                }
                .into(),
                2,
            ),
        ];
        for (request, line) in typed {
            assert_eq!(serde_json::to_string(&request).unwrap(), RECORDED[line]);
        }
    }

    #[test]
    fn prefetch_requests_travel_as_before() {
        for line in RECORDED_PREFETCH {
            let request: Request = serde_json::from_str(line).unwrap();
            assert_eq!(&serde_json::to_string(&request).unwrap(), line);
        }
        let typed: [(Request, usize); 4] = [
            (
                Record {
                    name: dev("d"),
                    phase: Some("app".into()),
                    replace: true,
                }
                .into(),
                1,
            ),
            (
                WorkingSet {
                    name: either("n"),
                    extents: true,
                }
                .into(),
                3,
            ),
            (
                ForgetWorkingSet {
                    name: either("n"),
                    phase: None,
                }
                .into(),
                4,
            ),
            (
                Warm {
                    names: vec![either("a"), either("b")],
                    phase: None,
                    cancel: false,
                }
                .into(),
                6,
            ),
        ];
        for (request, line) in typed {
            assert_eq!(
                serde_json::to_string(&request).unwrap(),
                RECORDED_PREFETCH[line]
            );
        }
        // Fields a client may leave out.
        let parsed: Request = serde_json::from_str(r#"{"op":"warm","cancel":true}"#).unwrap();
        assert_eq!(
            serde_json::to_string(&parsed).unwrap(),
            RECORDED_PREFETCH[8]
        );
        let parsed: Request = serde_json::from_str(r#"{"op":"record","name":"d"}"#).unwrap();
        assert_eq!(
            parsed,
            Record {
                name: dev("d"),
                phase: None,
                replace: false
            }
            .into()
        );
    }

    /// Fields a client may leave out take their defaults; old names still parse.
    #[test]
    fn omitted_fields_default_and_force_means_deferred() {
        let parsed: Request =
            serde_json::from_str(r#"{"op":"remove","name":"d","force":true}"#).unwrap();
        assert_eq!(
            parsed,
            Request::Remove(Remove {
                name: dev("d"),
                deferred: true
            })
        );
        let parsed: Request = serde_json::from_str(r#"{"op":"ensure","name":"d"}"#).unwrap();
        assert_eq!(parsed, Ensure::bound(dev("d")).into());
        let parsed: Request = serde_json::from_str(r#"{"op":"stats"}"#).unwrap();
        assert_eq!(parsed, Stats { name: None }.into());
        assert!(serde_json::from_str::<Request>(r#"{"op":"map"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"reboot"}"#).is_err());
    }

    #[test]
    fn the_read_only_socket_serves_what_only_reads() {
        assert!(
            Request::from(Map {
                name: img("n"),
                extents: false
            })
            .is_read_only()
        );
        assert!(Request::from(Check).is_read_only());
        assert!(
            Request::from(WorkingSet {
                name: either("n"),
                extents: true
            })
            .is_read_only()
        );
        for writes in [
            Request::from(Record {
                name: dev("d"),
                phase: None,
                replace: false,
            }),
            Request::from(ForgetWorkingSet {
                name: either("n"),
                phase: None,
            }),
            Request::from(Warm {
                names: vec![either("n")],
                phase: None,
                cancel: false,
            }),
        ] {
            assert!(!writes.is_read_only(), "{writes:?}");
        }
        assert!(!Request::from(Verify { name: img("n") }).is_read_only());
        assert!(!Request::from(Forget { name: img("n") }).is_read_only());
        assert!(
            !Request::from(Remove {
                name: dev("d"),
                deferred: false
            })
            .is_read_only()
        );
    }
}
