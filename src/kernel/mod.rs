//! The kernel seam: everything vmar asks of the kernel, behind one trait.
//!
//! [`Kernel`] covers device-mapper (create, load, suspend, resume, clear, remove, info,
//! table, list, dm-stats), loop devices (list, hold, attach, detach) and page-cache
//! residency. [`real::RealKernel`] talks to the running kernel (devicemapper crate, loop
//! ioctls, sysfs, `mincore`); [`sim::SimKernel`] is an in-memory kernel with the same rules
//! (read-only devices refuse writes, open devices refuse removal, suspended devices block
//! reads, autoclear loop devices detach when nothing uses them) whose state lives in a file,
//! so it survives a killed daemon like the real kernel does. `vmard --sim DIR` runs the whole
//! daemon on it, which is how the device lifecycle is tested without root or a guest.
//!
//! [`Checked`] wraps either one and passes every state-changing step through
//! [`crate::fault::point`], so tests can fail or kill vmard at any step on both kernels.

pub mod dmstats;
#[cfg(feature = "daemon")]
pub mod real;
pub mod sim;

use std::any::Any;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::fault::{self, Step};
use crate::image::{ImageFile, ImageIdentity};
use crate::instance::InstanceId;
use crate::table::{BlockDev, Target};
use crate::units::Sectors;

pub use crate::sys::Residency;
pub use dmstats::{AreaReads, Region};

/// Prefix of vmar's dm device names; the rest is the device name.
pub const NAME_PREFIX: &str = "vmar-";
/// Prefix of vmar's dm UUIDs, which udev rules match. The UUID is `VMAR-INSTANCE-NAME`:
/// the instance id of the state dir that made the device (see [`crate::instance`]), so that
/// a vmard touches only its own devices. vmar before instance ids wrote `VMAR-NAME`.
pub const UUID_PREFIX: &str = "VMAR-";

/// The dm UUID of device `name` made by state dir `instance`: at most 5 + 16 + 1 + 64 = 86
/// of the kernel's 128 bytes.
pub fn device_uuid(instance: &InstanceId, name: &str) -> String {
    format!("{UUID_PREFIX}{instance}-{name}")
}

/// Who made a live `vmar-` device, as its UUID says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Maker {
    /// A vmard of the state dir with this instance id.
    Instance(InstanceId),
    /// A vmard from before instance ids (`VMAR-NAME`): adopted by the state dir that records
    /// the device, left alone by the others.
    OldVmar,
    /// Not vmar (another UUID, or none): never touched by restore.
    Other,
}

/// The one path vmar prints for device `name`: `/dev/vmar/NAME`, made by vmar's udev rule
/// (what libvirt XML and qcow2 overlays name; `/dev/mapper/vmar-NAME` is the same device).
pub fn node_path(name: &str) -> PathBuf {
    Path::new("/dev/vmar").join(name)
}

/// The device name in a device argument: `NAME`, `/dev/vmar/NAME` or
/// `/dev/mapper/vmar-NAME` (what `ls /dev/vmar` and `dmsetup ls` show). Other paths are
/// returned as they are, for the name check to refuse.
pub fn device_name(argument: &str) -> &str {
    argument
        .strip_prefix("/dev/vmar/")
        .or_else(|| {
            argument
                .strip_prefix("/dev/mapper/")
                .and_then(|n| n.strip_prefix(NAME_PREFIX))
        })
        .unwrap_or(argument)
}

/// A vmar device as the kernel has it. Not a wire type: `status` reports it as
/// `protocol::LiveInfo` (`device/status.rs` copies it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveDevice {
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
    pub active_table: bool,
    /// Whether a table is loaded in the inactive slot, waiting for a resume.
    pub inactive_table: bool,
    /// Removal deferred to its last close.
    pub deferred_remove: bool,
    /// Targets of the active table.
    pub targets: u64,
}

impl LiveDevice {
    /// Who made it, from its UUID.
    pub fn maker(&self) -> Maker {
        let Some(rest) = self
            .uuid
            .as_deref()
            .and_then(|u| u.strip_prefix(UUID_PREFIX))
        else {
            return Maker::Other;
        };
        if rest == self.name {
            return Maker::OldVmar;
        }
        match rest.split_once('-') {
            Some((id, name)) if name == self.name => {
                InstanceId::parse(id).map_or(Maker::Other, Maker::Instance)
            }
            _ => Maker::Other,
        }
    }
}

/// A loop device as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoopInfo {
    /// Its node, e.g. `/dev/loop3`.
    pub node: PathBuf,
    pub major: u32,
    pub minor: u32,
    /// Its backing file, as the kernel names it; `None` when the file was deleted or
    /// replaced since. The name is the one seen in the mount namespace that attached it
    /// (under systemd's ProtectSystem, not the host's), so files are matched by
    /// `backing_file_id` first.
    pub backing: Option<PathBuf>,
    /// Device and inode of the backing file (`LOOP_GET_STATUS64`), when known.
    #[serde(default)]
    pub backing_file_id: Option<(u64, u64)>,
    /// (major, minor) of the backing file when it is a block device (`LOOP_GET_STATUS64`'s
    /// `lo_rdevice`): one device has one number whichever node it was opened through.
    #[serde(default)]
    pub backing_rdev: Option<crate::image::DeviceNumber>,
    pub read_only: bool,
    pub direct_io: bool,
    pub autoclear: bool,
    pub offset: u64,
    pub size_limit: u64,
}

impl LoopInfo {
    /// How dm tables name it.
    pub fn block_dev(&self) -> BlockDev {
        BlockDev::number(self.major, self.minor)
    }

    /// Whether vmar can serve `image` through it: read-only, buffered (so the image file's
    /// page cache is what is shared), the whole file, and autoclear (so it goes away with
    /// the last table; one left without autoclear by a crash is never reused).
    pub fn serves(&self, image: &Path, identity: &ImageIdentity) -> bool {
        self.backs(image, identity)
            && self.read_only
            && !self.direct_io
            && self.autoclear
            && self.offset == 0
            && self.size_limit == 0
    }
}

impl LoopInfo {
    /// Whether its backing file is the image at `image` with `identity`: a block device by
    /// its number (the same device through `/dev/vg/lv`, `/dev/dm-3` or a node elsewhere), a
    /// regular file by device and inode, when the kernel told them; else by name.
    pub fn backs(&self, image: &Path, identity: &ImageIdentity) -> bool {
        if let Some(device) = identity.block_device() {
            return match (self.backing_rdev, self.backing_file_id) {
                (Some(rdev), _) => rdev == device,
                // Backed by a regular file: not this device.
                (None, Some(_)) => false,
                (None, None) => self.backing.as_deref() == Some(image),
            };
        }
        match (self.backing_file_id, self.backing_rdev) {
            // A block device's node has a device and inode too; a file is never one.
            (_, Some(_)) => false,
            (Some(id), None) => id == (identity.dev, identity.ino),
            (None, None) => self.backing.as_deref() == Some(image),
        }
    }
}

/// A loop device held open until the table that uses it is loaded.
pub struct LoopHold {
    pub info: LoopInfo,
    /// Whether this call attached it (false: an existing one was reused).
    pub attached: bool,
    _hold: Box<dyn Any + Send>,
}

impl LoopHold {
    pub fn new(info: LoopInfo, attached: bool, hold: Box<dyn Any + Send>) -> LoopHold {
        LoopHold {
            info,
            attached,
            _hold: hold,
        }
    }
}

impl std::fmt::Debug for LoopHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoopHold")
            .field("info", &self.info)
            .field("attached", &self.attached)
            .finish()
    }
}

/// Everything vmar asks of the kernel. Device names are vmar names (`web`); the kernel
/// side calls the device `vmar-web` (UUID: see [`device_uuid`]).
pub trait Kernel: Send + Sync {
    /// Creates read-only device `name` with `uuid` and without a table. Fails with
    /// `device-exists`.
    fn dm_create(&self, name: &str, uuid: &str) -> Result<()>;
    /// Loads `table` into the inactive slot of `name`.
    fn dm_load(&self, name: &str, table: &[Target]) -> Result<()>;
    /// Suspends `name`: I/O waits until it is resumed.
    fn dm_suspend(&self, name: &str) -> Result<()>;
    /// Resumes `name`, swapping in the inactive table if one is loaded.
    fn dm_resume(&self, name: &str) -> Result<()>;
    /// Drops the inactive table of `name`.
    fn dm_clear(&self, name: &str) -> Result<()>;
    /// Removes `name`; an open device fails with `device-busy` unless `deferred`, which
    /// removes it at its last close.
    fn dm_remove(&self, name: &str, deferred: bool) -> Result<()>;
    /// The device, if the kernel has it.
    fn dm_info(&self, name: &str) -> Result<Option<LiveDevice>>;
    /// The active table of `name` (empty when it has none).
    fn dm_table(&self, name: &str) -> Result<Vec<Target>>;
    /// Names of all `vmar-` devices, sorted.
    fn dm_list(&self) -> Result<Vec<String>>;
    /// dm-stats regions of `name`.
    fn stats_regions(&self, name: &str) -> Result<Vec<Region>>;
    /// Creates a dm-stats region over all of `name` in areas of `step`, tagged `program`.
    fn stats_create(&self, name: &str, step: Sectors, program: &str) -> Result<()>;
    /// Read counters of each area of region `id` of `name`.
    fn stats_areas(&self, name: &str, id: u64) -> Result<Vec<AreaReads>>;
    /// All attached loop devices.
    fn loops(&self) -> Result<Vec<LoopInfo>>;
    /// Holds an existing loop device open (fails if it went away meanwhile).
    fn loop_hold(&self, info: &LoopInfo) -> Result<LoopHold>;
    /// Attaches `image` to a new read-only, buffered, autoclear loop device, atomically.
    fn loop_attach(&self, image: &ImageFile) -> Result<LoopHold>;
    /// Detaches a loop device nothing uses.
    fn loop_detach(&self, info: &LoopInfo) -> Result<()>;
    /// Which pages of the first `size` bytes of `path` the page cache holds.
    fn residency(&self, path: &Path, size: u64) -> Result<Residency>;
    /// Releases udev synchronisation left behind by killed processes; returns what it
    /// released, for the log.
    fn release_stale_udev_cookies(&self) -> Result<Vec<String>>;
}

/// A kernel whose state-changing steps are fault points (see [`crate::fault`]).
pub struct Checked<K>(pub K);

impl<K: Kernel> Kernel for Checked<K> {
    fn dm_create(&self, name: &str, uuid: &str) -> Result<()> {
        fault::point(Step::DmCreate)?;
        self.0.dm_create(name, uuid)
    }
    fn dm_load(&self, name: &str, table: &[Target]) -> Result<()> {
        fault::point(Step::DmLoad)?;
        self.0.dm_load(name, table)
    }
    fn dm_suspend(&self, name: &str) -> Result<()> {
        fault::point(Step::DmSuspend)?;
        self.0.dm_suspend(name)
    }
    fn dm_resume(&self, name: &str) -> Result<()> {
        fault::point(Step::DmResume)?;
        self.0.dm_resume(name)
    }
    fn dm_clear(&self, name: &str) -> Result<()> {
        fault::point(Step::DmClear)?;
        self.0.dm_clear(name)
    }
    fn dm_remove(&self, name: &str, deferred: bool) -> Result<()> {
        fault::point(Step::DmRemove)?;
        self.0.dm_remove(name, deferred)
    }
    fn dm_info(&self, name: &str) -> Result<Option<LiveDevice>> {
        self.0.dm_info(name)
    }
    fn dm_table(&self, name: &str) -> Result<Vec<Target>> {
        self.0.dm_table(name)
    }
    fn dm_list(&self) -> Result<Vec<String>> {
        self.0.dm_list()
    }
    fn stats_regions(&self, name: &str) -> Result<Vec<Region>> {
        self.0.stats_regions(name)
    }
    fn stats_create(&self, name: &str, step: Sectors, program: &str) -> Result<()> {
        fault::point(Step::DmStats)?;
        self.0.stats_create(name, step, program)
    }
    fn stats_areas(&self, name: &str, id: u64) -> Result<Vec<AreaReads>> {
        self.0.stats_areas(name, id)
    }
    fn loops(&self) -> Result<Vec<LoopInfo>> {
        self.0.loops()
    }
    fn loop_hold(&self, info: &LoopInfo) -> Result<LoopHold> {
        self.0.loop_hold(info)
    }
    fn loop_attach(&self, image: &ImageFile) -> Result<LoopHold> {
        fault::point(Step::LoopAttach)?;
        self.0.loop_attach(image)
    }
    fn loop_detach(&self, info: &LoopInfo) -> Result<()> {
        fault::point(Step::LoopDetach)?;
        self.0.loop_detach(info)
    }
    fn residency(&self, path: &Path, size: u64) -> Result<Residency> {
        self.0.residency(path, size)
    }
    fn release_stale_udev_cookies(&self) -> Result<Vec<String>> {
        self.0.release_stale_udev_cookies()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(dev: u64, ino: u64) -> ImageIdentity {
        ImageIdentity {
            dev,
            ino,
            size: 4096,
            mtime_ns: 0,
            ctime_ns: None,
            block_id: None,
        }
    }

    #[test]
    fn device_arguments_may_be_paths_of_the_device() {
        assert_eq!(device_name("web"), "web");
        assert_eq!(device_name("/dev/vmar/web"), "web");
        assert_eq!(device_name("/dev/mapper/vmar-web"), "web");
        // Not a vmar device: left for the name check to refuse.
        assert_eq!(device_name("/dev/mapper/other"), "/dev/mapper/other");
        assert_eq!(device_name("/dev/sda"), "/dev/sda");
        assert_eq!(node_path("web"), Path::new("/dev/vmar/web"));
    }

    #[test]
    fn loop_devices_are_matched_by_file_not_by_name() {
        let l = LoopInfo {
            node: PathBuf::from("/dev/loop0"),
            major: 7,
            minor: 0,
            // As a loop device attached in vmard's mount namespace under systemd names it.
            backing: Some(PathBuf::from("/images/web.raw")),
            backing_file_id: Some((64, 12)),
            backing_rdev: None,
            read_only: true,
            direct_io: false,
            autoclear: true,
            offset: 0,
            size_limit: 0,
        };
        let path = Path::new("/var/lib/vmar/images/web.raw");
        assert!(l.serves(path, &identity(64, 12)));
        assert!(!l.serves(path, &identity(64, 13)));
        let unknown = LoopInfo {
            backing_file_id: None,
            ..l.clone()
        };
        assert!(!unknown.serves(path, &identity(64, 12)));
        assert!(unknown.serves(Path::new("/images/web.raw"), &identity(64, 12)));
        let no_autoclear = LoopInfo {
            autoclear: false,
            ..l.clone()
        };
        assert!(!no_autoclear.serves(path, &identity(64, 12)));
    }

    #[test]
    fn loop_devices_over_block_devices_are_matched_by_device_number() {
        // /dev/dm-3 (253:3) as captured; the loop device was attached through the node
        // /dev/vg/lv resolves to, or through another node of the same device elsewhere.
        let device = identity(nix::sys::stat::makedev(253, 3), 0);
        let over = |rdev: Option<(u32, u32)>, node: &str| LoopInfo {
            node: PathBuf::from("/dev/loop1"),
            major: 7,
            minor: 1,
            backing: Some(PathBuf::from(node)),
            // The node's own device (devtmpfs) and inode.
            backing_file_id: Some((6, 700)),
            backing_rdev: rdev,
            read_only: true,
            direct_io: false,
            autoclear: true,
            offset: 0,
            size_limit: 0,
        };
        let path = Path::new("/dev/dm-3");
        assert!(over(Some((253, 3)), "/dev/dm-3").serves(path, &device));
        assert!(over(Some((253, 3)), "/srv/images/lv-node").serves(path, &device));
        assert!(!over(Some((253, 4)), "/dev/dm-3").serves(path, &device));
        // A loop device over a regular file is never a block device's, whatever its name.
        assert!(!over(None, "/dev/dm-3").serves(path, &device));
        // And a block device's node is never a regular file's, even with equal numbers.
        assert!(!over(Some((253, 3)), "/img").serves(Path::new("/img"), &identity(6, 700)));
        // Without numbers from the kernel, by name.
        let unknown = LoopInfo {
            backing_file_id: None,
            ..over(None, "/dev/dm-3")
        };
        assert!(unknown.serves(path, &device));
        assert!(!unknown.serves(Path::new("/dev/dm-4"), &device));
    }
}
