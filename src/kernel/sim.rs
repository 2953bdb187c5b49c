//! An in-memory kernel for tests and `vmard --sim DIR`: device-mapper devices, loop
//! devices and dm-stats with the rules of the real kernel that vmar depends on, over the real
//! image files.
//!
//! Its state is one JSON file in `DIR`, changed under an exclusive `flock` and replaced
//! atomically, one system call at a time: like the real kernel, it survives a vmard killed
//! between two calls, and a test process can look at it (and "open" devices, read them,
//! plant leftovers) while vmard runs. Loop devices are held per process id; a holder whose
//! process is gone no longer counts, as the kernel closes a dead process's files. Rules
//! kept: devices are read-only (writes fail), an open device cannot be removed except
//! deferred, a suspended device does not serve reads (a real reader would hang), tables must
//! tile the device and point into attached loop devices within their size, autoclear loop
//! devices detach when no table and no holder uses them.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use super::{AreaReads, Kernel, LiveDevice, LoopHold, LoopInfo, NAME_PREFIX, Region, Residency};
use crate::error::{Error, Result};
use crate::image::{DeviceNumber, ImageFile, device_number};
use crate::table::{BlockDev, Target, TargetKind};
use crate::units::{Sectors, usize_of};

/// Major numbers the simulated devices get (those of Linux's dm and loop drivers).
pub const DM_MAJOR: u32 = 253;
pub const LOOP_MAJOR: u32 = 7;
const STATE_FILE: &str = "kernel.json";
const LOCK_FILE: &str = "kernel.lock";

/// A simulated device-mapper device.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimDevice {
    pub uuid: String,
    pub minor: u32,
    pub read_only: bool,
    pub suspended: bool,
    pub active: Option<Vec<Target>>,
    pub inactive: Option<Vec<Target>>,
    pub open_count: i32,
    pub deferred_remove: bool,
    pub regions: Vec<SimRegion>,
}

/// A simulated dm-stats region: sectors read per area.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimRegion {
    pub id: u64,
    pub step: u64,
    pub program: String,
    pub sectors_read: Vec<u64>,
}

/// A simulated loop device.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimLoop {
    pub backing: PathBuf,
    /// Device and inode of the backing file (of the node it was opened through, for a block
    /// device), as `LOOP_GET_STATUS64` reports them.
    #[serde(default)]
    pub file_id: Option<(u64, u64)>,
    /// (major, minor) of the backing block device; `None` for a regular file.
    #[serde(default)]
    pub rdev: Option<DeviceNumber>,
    pub size: u64,
    pub read_only: bool,
    pub autoclear: bool,
    /// Process ids holding it open, once per hold.
    pub holders: Vec<u32>,
}

/// Everything the simulated kernel knows.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimState {
    pub next_minor: u32,
    /// Directories that may hold other links of backing files (vmard registers its holds
    /// directory). The real loop driver keeps reading the inode it was given after its name
    /// is deleted; the simulation, which opens backing files by name, finds such an inode
    /// through another of its links here.
    #[serde(default)]
    pub link_dirs: Vec<PathBuf>,
    pub devices: BTreeMap<String, SimDevice>,
    pub loops: BTreeMap<u32, SimLoop>,
}

/// Handle on a simulated kernel in a directory.
#[derive(Clone, Debug)]
pub struct SimKernel {
    dir: PathBuf,
}

fn sim_error(op: &'static str, device: impl std::fmt::Display, errno: nix::errno::Errno) -> Error {
    Error::DeviceMapper {
        op,
        device: device.to_string(),
        message: format!("{errno}: {}", errno.desc()),
    }
}

fn process_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses; Z is a zombie.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z"),
        Err(_) => false,
    }
}

impl SimDevice {
    /// Length of its active table (0 without one).
    fn sectors(&self) -> u64 {
        self.active
            .as_ref()
            .and_then(|t| t.last())
            .map_or(0, |t| t.end().0)
    }
}

impl SimState {
    /// Device `name`, for a dm-stats message.
    fn get(&self, name: &str) -> Result<&SimDevice> {
        self.devices
            .get(name)
            .ok_or_else(|| sim_error("send dm-stats message to", name, nix::errno::Errno::ENXIO))
    }

    fn referenced(&self, minor: u32) -> bool {
        let dev = BlockDev::number(LOOP_MAJOR, minor);
        self.devices.values().any(|d| {
            [&d.active, &d.inactive].iter().any(|t| {
                t.iter()
                    .flatten()
                    .any(|t| t.linear_source().is_some_and(|(d, _)| *d == dev))
            })
        })
    }

    /// Forgets dead holders and detaches autoclear loop devices nothing uses.
    fn sweep(&mut self) {
        for l in self.loops.values_mut() {
            l.holders.retain(|pid| process_alive(*pid));
        }
        let unused: Vec<u32> = self
            .loops
            .iter()
            .filter(|(minor, l)| l.autoclear && l.holders.is_empty() && !self.referenced(**minor))
            .map(|(minor, _)| *minor)
            .collect();
        for minor in unused {
            self.loops.remove(&minor);
        }
    }

    fn device(&mut self, name: &str, op: &'static str) -> Result<&mut SimDevice> {
        self.devices
            .get_mut(name)
            .ok_or_else(|| sim_error(op, format!("{NAME_PREFIX}{name}"), nix::errno::Errno::ENXIO))
    }

    fn check_table(&self, name: &str, table: &[Target]) -> Result<()> {
        let bad = |why: String| Error::DeviceMapper {
            op: "load table of",
            device: format!("{NAME_PREFIX}{name}"),
            message: format!("EINVAL: {why}"),
        };
        if table.is_empty() {
            return Err(bad("empty table".into()));
        }
        let mut next = Sectors(0);
        for t in table {
            if t.start != next || t.len == Sectors(0) {
                return Err(bad(format!(
                    "target {t} does not continue at sector {next}"
                )));
            }
            next = t.end();
            match &t.kind {
                TargetKind::Zero | TargetKind::Error => {}
                TargetKind::Linear { device, offset } => {
                    let loop_dev = match device {
                        BlockDev::Number { major, minor } if *major == LOOP_MAJOR => {
                            self.loops.get(minor)
                        }
                        _ => None,
                    };
                    let Some(loop_dev) = loop_dev else {
                        return Err(bad(format!("{device}: no such device")));
                    };
                    if (*offset + t.len).bytes() > loop_dev.size {
                        return Err(bad(format!("{device} too small for target {t}")));
                    }
                }
                TargetKind::Other { target_type, .. } => {
                    return Err(bad(format!("unknown target type {target_type}")));
                }
            }
        }
        Ok(())
    }
}

/// Device and inode of a loop device's backing file, and its number if it is a block device.
type BackingIds = (Option<(u64, u64)>, Option<DeviceNumber>);

/// What the real kernel's `LOOP_GET_STATUS64` reports of backing file `file`: the device and
/// inode it was opened through, and its device number if it is a block device.
fn backing_ids(file: &File, path: &Path) -> Result<BackingIds> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = file
        .metadata()
        .map_err(|e| Error::io("cannot stat", path, e))?;
    let rdev = if meta.file_type().is_block_device() {
        device_number(meta.rdev())
    } else {
        None
    };
    Ok((Some((meta.dev(), meta.ino())), rdev))
}

/// Opens the backing file of loop device `l`: by its name, or, when that name is gone or
/// names another file now, through another link of the same inode in `link_dirs` (see
/// [`SimState::link_dirs`]).
fn open_backing(l: &SimLoop, link_dirs: &[PathBuf]) -> std::io::Result<File> {
    use std::os::unix::fs::MetadataExt;
    let same = |f: &File| {
        l.file_id.is_none()
            || l.rdev.is_some()
            || f.metadata()
                .is_ok_and(|m| Some((m.dev(), m.ino())) == l.file_id)
    };
    if let Ok(file) = File::open(&l.backing)
        && same(&file)
    {
        return Ok(file);
    }
    for dir in link_dirs {
        for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
            if let Ok(file) = File::open(entry.path())
                && same(&file)
            {
                return Ok(file);
            }
        }
    }
    Err(std::io::Error::from(std::io::ErrorKind::NotFound))
}

/// Removes `name` from `state` once it is closed, if its removal was deferred.
fn finish_deferred(state: &mut SimState, name: &str) {
    if state
        .devices
        .get(name)
        .is_some_and(|d| d.deferred_remove && d.open_count == 0)
    {
        state.devices.remove(name);
    }
}

/// Keeps a simulated loop device held by this process until dropped.
struct SimHold {
    kernel: SimKernel,
    minor: u32,
}

impl Drop for SimHold {
    fn drop(&mut self) {
        let pid = std::process::id();
        let minor = self.minor;
        let _ = self.kernel.change(|state| {
            if let Some(l) = state.loops.get_mut(&minor)
                && let Some(i) = l.holders.iter().position(|p| *p == pid)
            {
                l.holders.remove(i);
            }
            Ok(())
        });
    }
}

impl SimKernel {
    /// The simulated kernel in `dir` (created empty if new), as an observer sees it.
    pub fn open(dir: &Path) -> Result<SimKernel> {
        fs::create_dir_all(dir).map_err(|e| Error::io("cannot create", dir, e))?;
        Ok(SimKernel {
            dir: dir.to_path_buf(),
        })
    }

    fn lock(&self) -> Result<Flock<File>> {
        let path = self.dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io("cannot open", &path, e))?;
        Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, e)| Error::io("cannot lock", &path, e.into()))
    }

    fn load(&self) -> Result<SimState> {
        let path = self.dir.join(STATE_FILE);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                let corrupt = std::io::Error::new(std::io::ErrorKind::InvalidData, e);
                Error::io("corrupt simulated kernel state", &path, corrupt)
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(SimState::default()),
            Err(e) => Err(Error::io("cannot read", &path, e)),
        }
    }

    /// The whole state, for tests to look at.
    pub fn state(&self) -> Result<SimState> {
        let _lock = self.lock()?;
        self.load()
    }

    /// One atomic "system call": `f` changes the state, which is saved only if it succeeds.
    fn change<T>(&self, f: impl FnOnce(&mut SimState) -> Result<T>) -> Result<T> {
        let _lock = self.lock()?;
        let mut state = self.load()?;
        let out = f(&mut state)?;
        state.sweep();
        let path = self.dir.join(STATE_FILE);
        let tmp = self.dir.join(format!("{STATE_FILE}.tmp"));
        let bytes = serde_json::to_vec(&state)
            .map_err(|e| Error::internal(format!("cannot encode simulated state: {e}")))?;
        fs::write(&tmp, bytes).map_err(|e| Error::io("cannot write", &tmp, e))?;
        fs::rename(&tmp, &path).map_err(|e| Error::io("cannot rename", &path, e))?;
        Ok(out)
    }

    /// Registers `dir` as a place where other links of backing files may be found (see
    /// [`SimState::link_dirs`]).
    pub fn add_link_dir(&self, dir: &Path) -> Result<()> {
        self.change(|s| {
            if !s.link_dirs.iter().any(|d| d == dir) {
                s.link_dirs.push(dir.to_path_buf());
            }
            Ok(())
        })
    }

    /// Opens device `name` as a VM would (raises its open count).
    pub fn open_device(&self, name: &str) -> Result<()> {
        self.change(|s| {
            s.device(name, "open")?.open_count += 1;
            Ok(())
        })
    }

    /// Closes device `name`; the last close carries out a deferred removal.
    pub fn close_device(&self, name: &str) -> Result<()> {
        self.change(|s| {
            let d = s.device(name, "close")?;
            d.open_count = (d.open_count - 1).max(0);
            finish_deferred(s, name);
            Ok(())
        })
    }

    /// Reads `len` bytes of device `name` at byte `offset`, through its active table and the
    /// loop devices' backing files, counting the read in its dm-stats regions. A suspended
    /// device fails instead of hanging.
    pub fn read(&self, name: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        self.change(|s| {
            let d = s.device(name, "read")?;
            let dm_name = format!("{NAME_PREFIX}{name}");
            if d.suspended {
                return Err(sim_error(
                    "read (suspended: a reader would hang)",
                    &dm_name,
                    nix::errno::Errno::EAGAIN,
                ));
            }
            let table = d
                .active
                .clone()
                .ok_or_else(|| sim_error("read", &dm_name, nix::errno::Errno::ENXIO))?;
            let size = table.last().map_or(0, |t| t.end().bytes());
            let end = (offset + len).min(size);
            let mut out = vec![0u8; usize_of(end.saturating_sub(offset))];
            for t in &table {
                let (lo, hi) = (t.start.bytes().max(offset), t.end().bytes().min(end));
                if lo >= hi {
                    continue;
                }
                if t.kind == TargetKind::Error {
                    // dm's error target fails every bio that touches it.
                    return Err(sim_error("read", &dm_name, nix::errno::Errno::EIO));
                }
                if let TargetKind::Linear {
                    device: BlockDev::Number { minor, .. },
                    offset: from,
                } = &t.kind
                {
                    let l = s
                        .loops
                        .get(minor)
                        .ok_or_else(|| sim_error("read", &dm_name, nix::errno::Errno::EIO))?;
                    let backing = l.backing.clone();
                    let file = open_backing(l, &s.link_dirs)
                        .map_err(|e| Error::io("cannot open", &backing, e))?;
                    let at = from.bytes() + (lo - t.start.bytes());
                    let buf = &mut out[usize_of(lo - offset)..usize_of(hi - offset)];
                    let n = file
                        .read_at(buf, at)
                        .map_err(|e| Error::io("cannot read", &backing, e))?;
                    // Past the end of the file a loop device reads zeros (a partial block).
                    buf[n..].fill(0);
                }
            }
            let d = s.device(name, "read")?;
            let (first, last) = (offset / 512, end.div_ceil(512));
            for region in &mut d.regions {
                for sector in first..last {
                    if let Some(area) = region.sectors_read.get_mut(usize_of(sector / region.step))
                    {
                        *area += 1;
                    }
                }
            }
            Ok(out)
        })
    }

    /// All bytes of device `name`.
    pub fn read_device(&self, name: &str) -> Result<Vec<u8>> {
        self.read(name, 0, u64::MAX / 2)
    }

    /// Writing to a vmar device: refused, as the kernel refuses writes to read-only devices.
    pub fn write(&self, name: &str, _offset: u64, _data: &[u8]) -> Result<()> {
        self.change(|s| {
            let d = s.device(name, "write")?;
            if d.read_only {
                return Err(sim_error(
                    "write",
                    format!("{NAME_PREFIX}{name}"),
                    nix::errno::Errno::EROFS,
                ));
            }
            Ok(())
        })
    }

    /// Attaches `path` to a loop device as another program would, e.g. without autoclear
    /// (what a crash between `LOOP_SET_FD` and `LOOP_SET_STATUS64` leaves). Returns its minor.
    /// `path` may be a block device, named by any of its nodes.
    pub fn plant_loop(&self, path: &Path, autoclear: bool) -> Result<u32> {
        self.plant_loop_as(path, autoclear, true)
    }

    /// [`SimKernel::plant_loop`], read-only or writable.
    pub fn plant_loop_as(&self, path: &Path, autoclear: bool, read_only: bool) -> Result<u32> {
        let file = File::open(path).map_err(|e| Error::io("cannot open", path, e))?;
        let (file_id, rdev) = backing_ids(&file, path)?;
        let size = {
            use std::io::{Seek, SeekFrom};
            (&file)
                .seek(SeekFrom::End(0))
                .map_err(|e| Error::io("cannot size", path, e))?
        };
        self.change(|s| {
            let minor = (0..).find(|m| !s.loops.contains_key(m)).unwrap_or(0);
            s.loops.insert(
                minor,
                SimLoop {
                    backing: path.to_path_buf(),
                    file_id,
                    rdev,
                    size,
                    read_only,
                    autoclear,
                    holders: if autoclear {
                        vec![std::process::id()]
                    } else {
                        Vec::new()
                    },
                },
            );
            Ok(minor)
        })
    }

    fn info_of(name: &str, d: &SimDevice) -> LiveDevice {
        LiveDevice {
            name: name.to_string(),
            dm_name: format!("{NAME_PREFIX}{name}"),
            uuid: Some(d.uuid.clone()),
            major: DM_MAJOR,
            minor: d.minor,
            open_count: d.open_count,
            read_only: d.read_only,
            suspended: d.suspended,
            active_table: d.active.is_some(),
            inactive_table: d.inactive.is_some(),
            deferred_remove: d.deferred_remove,
            targets: d.active.as_ref().map_or(0, |t| t.len() as u64),
        }
    }

    fn loop_info(minor: u32, l: &SimLoop) -> LoopInfo {
        LoopInfo {
            node: PathBuf::from(format!("/dev/loop{minor}")),
            major: LOOP_MAJOR,
            minor,
            backing: Some(l.backing.clone()),
            backing_file_id: l.file_id,
            backing_rdev: l.rdev,
            read_only: l.read_only,
            direct_io: false,
            autoclear: l.autoclear,
            offset: 0,
            size_limit: 0,
        }
    }

    fn hold(&self, minor: u32) -> Box<SimHold> {
        Box::new(SimHold {
            kernel: self.clone(),
            minor,
        })
    }
}

impl Kernel for SimKernel {
    fn dm_create(&self, name: &str, uuid: &str) -> Result<()> {
        self.change(|s| {
            if s.devices.contains_key(name) {
                return Err(Error::DeviceExists {
                    name: name.to_string(),
                });
            }
            let minor = s.next_minor;
            s.next_minor += 1;
            s.devices.insert(
                name.to_string(),
                SimDevice {
                    uuid: uuid.to_string(),
                    minor,
                    read_only: true,
                    ..SimDevice::default()
                },
            );
            Ok(())
        })
    }

    fn dm_load(&self, name: &str, table: &[Target]) -> Result<()> {
        self.change(|s| {
            s.device(name, "load table of")?;
            s.check_table(name, table)?;
            s.device(name, "load table of")?.inactive = Some(table.to_vec());
            Ok(())
        })
    }

    fn dm_suspend(&self, name: &str) -> Result<()> {
        self.change(|s| {
            s.device(name, "suspend")?.suspended = true;
            Ok(())
        })
    }

    fn dm_resume(&self, name: &str) -> Result<()> {
        self.change(|s| {
            let d = s.device(name, "resume")?;
            if let Some(table) = d.inactive.take() {
                let len = table.last().map_or(0, |t| t.end().0);
                d.active = Some(table);
                for region in &mut d.regions {
                    region
                        .sectors_read
                        .resize(usize_of(len.div_ceil(region.step)), 0);
                }
            }
            d.suspended = false;
            Ok(())
        })
    }

    fn dm_clear(&self, name: &str) -> Result<()> {
        self.change(|s| {
            s.device(name, "clear inactive table of")?.inactive = None;
            Ok(())
        })
    }

    fn dm_remove(&self, name: &str, deferred: bool) -> Result<()> {
        self.change(|s| {
            let d = s
                .devices
                .get_mut(name)
                .ok_or_else(|| Error::UnknownDevice {
                    name: name.to_string(),
                })?;
            if d.open_count > 0 {
                if !deferred {
                    return Err(Error::DeviceBusy {
                        name: name.to_string(),
                        open_count: d.open_count,
                    });
                }
                d.deferred_remove = true;
                return Ok(());
            }
            s.devices.remove(name);
            Ok(())
        })
    }

    fn dm_info(&self, name: &str) -> Result<Option<LiveDevice>> {
        let state = self.state()?;
        Ok(state.devices.get(name).map(|d| Self::info_of(name, d)))
    }

    fn dm_table(&self, name: &str) -> Result<Vec<Target>> {
        let state = self.state()?;
        let d = state.devices.get(name).ok_or_else(|| {
            sim_error(
                "read table of",
                format!("{NAME_PREFIX}{name}"),
                nix::errno::Errno::ENXIO,
            )
        })?;
        Ok(d.active.clone().unwrap_or_default())
    }

    fn dm_list(&self) -> Result<Vec<String>> {
        Ok(self.state()?.devices.keys().cloned().collect())
    }

    fn stats_regions(&self, name: &str) -> Result<Vec<Region>> {
        let state = self.state()?;
        let d = state.get(name)?;
        let len = d.sectors();
        Ok(d.regions
            .iter()
            .map(|r| Region {
                id: r.id,
                start: 0,
                len,
                step: r.step,
                program: r.program.clone(),
            })
            .collect())
    }

    fn stats_create(&self, name: &str, step: Sectors, program: &str) -> Result<()> {
        self.change(|s| {
            let d = s.device(name, "send dm-stats message to")?;
            let len = d.sectors();
            if step.0 == 0 || len == 0 {
                return Err(sim_error(
                    "create dm-stats region of",
                    name,
                    nix::errno::Errno::EINVAL,
                ));
            }
            let id = d.regions.iter().map(|r| r.id + 1).max().unwrap_or(0);
            d.regions.push(SimRegion {
                id,
                step: step.0,
                program: program.to_string(),
                sectors_read: vec![0; usize_of(len.div_ceil(step.0))],
            });
            Ok(())
        })
    }

    fn stats_areas(&self, name: &str, id: u64) -> Result<Vec<AreaReads>> {
        let state = self.state()?;
        let d = state.get(name)?;
        let len = d.sectors();
        let region = d.regions.iter().find(|r| r.id == id).ok_or_else(|| {
            sim_error("read dm-stats counters of", name, nix::errno::Errno::EINVAL)
        })?;
        Ok(region
            .sectors_read
            .iter()
            .enumerate()
            .map(|(i, read)| {
                let start = i as u64 * region.step;
                AreaReads {
                    start,
                    len: region.step.min(len - start.min(len)),
                    sectors_read: *read,
                }
            })
            .collect())
    }

    fn loops(&self) -> Result<Vec<LoopInfo>> {
        Ok(self
            .state()?
            .loops
            .iter()
            .map(|(m, l)| Self::loop_info(*m, l))
            .collect())
    }

    fn loop_hold(&self, info: &LoopInfo) -> Result<LoopHold> {
        let minor = info.minor;
        let now = self.change(|s| {
            let l = s.loops.get_mut(&minor).ok_or_else(|| {
                Error::io(
                    "cannot open",
                    &info.node,
                    std::io::Error::from(std::io::ErrorKind::NotFound),
                )
            })?;
            l.holders.push(std::process::id());
            Ok(Self::loop_info(minor, l))
        })?;
        let hold = self.hold(minor);
        if now != *info {
            return Err(Error::io(
                "loop device changed while opening",
                &info.node,
                std::io::Error::other("detached or reattached"),
            ));
        }
        Ok(LoopHold::new(now, false, hold))
    }

    fn loop_attach(&self, image: &ImageFile) -> Result<LoopHold> {
        let (file_id, rdev) = backing_ids(&image.file, &image.path)?;
        let (minor, info) = self.change(|s| {
            let minor = (0..).find(|m| !s.loops.contains_key(m)).unwrap_or(0);
            let l = SimLoop {
                backing: image.path.clone(),
                file_id,
                rdev,
                size: image.size,
                read_only: true,
                autoclear: true,
                holders: vec![std::process::id()],
            };
            let info = Self::loop_info(minor, &l);
            s.loops.insert(minor, l);
            Ok((minor, info))
        })?;
        Ok(LoopHold::new(info, true, self.hold(minor)))
    }

    fn loop_detach(&self, info: &LoopInfo) -> Result<()> {
        self.change(|s| {
            let busy = s.referenced(info.minor)
                || s.loops
                    .get(&info.minor)
                    .is_some_and(|l| !l.holders.is_empty());
            if busy {
                return Err(Error::io(
                    "cannot detach",
                    &info.node,
                    nix::errno::Errno::EBUSY.into(),
                ));
            }
            s.loops.remove(&info.minor);
            Ok(())
        })
    }

    fn residency(&self, path: &Path, size: u64) -> Result<Residency> {
        crate::sys::residency(path, size)
    }

    fn release_stale_udev_cookies(&self) -> Result<Vec<String>> {
        Ok(Vec::new())
    }
}
