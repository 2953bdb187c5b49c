//! The running kernel: device-mapper through the devicemapper crate's raw ioctls (its
//! `LinearDev` has no `zero` target and makes writable devices), loop devices through
//! `/dev/loop-control`, `LOOP_CONFIGURE` and sysfs, page-cache residency through `mincore`.
//!
//! The crate synchronises every change with udev (cookies on a SysV semaphore, completed by
//! the `95-dm-notify.rules` of dmsetup) and refuses to work at all when udev is not running
//! (checked through `/run/udev/control`, in every version up to 0.34.7). So vmard needs udev;
//! udev's dm rules then make `/dev/mapper/NAME` and vmar's rules `/dev/vmar/NAME`.
//!
//! Every vmar device carries the udev flags LVM gives its internal devices: no blkid, no
//! `/dev/disk/by-*` links, no LVM/md/multipath scanning. A guest's disk holds someone else's
//! data: the host must not activate its volume groups or mount its labels.

use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use devicemapper::{DM, DevId, DmError, DmFlags, DmNameBuf, DmOptions, DmUdevFlags, DmUuidBuf};

use super::dmstats::{parse_stats_list, parse_stats_print};
use super::{AreaReads, Kernel, LiveDevice, LoopHold, LoopInfo, NAME_PREFIX, Region, Residency};
use crate::error::{Error, Result};
use crate::image::ImageFile;
use crate::sys::{LoopInfo64, LoopStatus, loop_status, residency};
use crate::table::Target;
use crate::units::Sectors;

/// The kernel vmard runs on. All device-mapper calls go through one lock: the crate's udev
/// cookies and the kernel's per-device state are not meant for concurrent changes of one
/// device, and vmar's changes take milliseconds.
pub struct RealKernel {
    dm: Mutex<DM>,
}

fn dm_error(op: &'static str, device: impl std::fmt::Display, e: impl std::fmt::Display) -> Error {
    Error::DeviceMapper {
        op,
        device: device.to_string(),
        message: e.to_string(),
    }
}

/// The errno of a failed ioctl, if that is what `e` is.
fn errno_of(e: &DmError) -> Option<nix::errno::Errno> {
    match e {
        DmError::Core(devicemapper::errors::Error::Ioctl(_, _, _, errno)) => {
            Some(nix::errno::Errno::from_raw(**errno as i32))
        }
        _ => None,
    }
}

/// Like [`dm_error`], but says only the errno of failed ioctls: the crate's message dumps
/// whole ioctl headers, which help nobody reading a vmarctl error.
fn ioctl_error(op: &'static str, device: impl std::fmt::Display, e: DmError) -> Error {
    match errno_of(&e) {
        Some(errno) => dm_error(op, device, format!("{errno}: {}", errno.desc())),
        None => dm_error(op, device, e),
    }
}

/// Options of every change to a vmar device: hidden from the host's disk scanners (see the
/// module doc), with `flags`.
fn options(flags: DmFlags) -> DmOptions {
    DmOptions::default().set_flags(flags).set_udev_flags(
        DmUdevFlags::DM_UDEV_DISABLE_DISK_RULES_FLAG
            | DmUdevFlags::DM_UDEV_DISABLE_OTHER_RULES_FLAG,
    )
}

fn dm_name(name: &str) -> Result<DmNameBuf> {
    let dm_name = format!("{NAME_PREFIX}{name}");
    DmNameBuf::new(dm_name.clone()).map_err(|e| dm_error("name", &*dm_name, e))
}

impl RealKernel {
    /// Opens `/dev/mapper/control`.
    pub fn open() -> Result<RealKernel> {
        if !Path::new("/run/udev/control").exists() {
            return Err(dm_error(
                "open",
                "/dev/mapper/control",
                "udev is not running (no /run/udev/control); the devicemapper crate synchronises \
                 every device change with udev and refuses without it: start systemd-udevd",
            ));
        }
        let dm = DM::new().map_err(|e| {
            dm_error(
                "open",
                "/dev/mapper/control",
                format!("{e} (is the dm-mod kernel module loaded, and is vmard root?)"),
            )
        })?;
        Ok(RealKernel { dm: Mutex::new(dm) })
    }

    fn with<T>(
        &self,
        name: &str,
        f: impl FnOnce(&DM, &DevId<'_>, &DmNameBuf) -> Result<T>,
    ) -> Result<T> {
        let dm_name = dm_name(name)?;
        let dm = self.dm.lock().unwrap_or_else(|p| p.into_inner());
        f(&dm, &DevId::Name(&dm_name), &dm_name)
    }

    fn message(&self, name: &str, message: &str) -> Result<String> {
        self.with(name, |dm, id, dm_name| {
            let (_, output) = dm
                .target_msg(id, None, message)
                .map_err(|e| ioctl_error("send dm-stats message to", &**dm_name, e))?;
            Ok(output.unwrap_or_default())
        })
    }
}

impl Kernel for RealKernel {
    fn dm_create(&self, name: &str, uuid: &str) -> Result<()> {
        let dm_name = dm_name(name)?;
        let uuid = DmUuidBuf::new(uuid.to_string()).map_err(|e| dm_error("uuid", uuid, e))?;
        let dm = self.dm.lock().unwrap_or_else(|p| p.into_inner());
        match dm.device_create(&dm_name, Some(&uuid), options(DmFlags::DM_READONLY)) {
            Ok(_) => Ok(()),
            Err(e) if errno_of(&e) == Some(nix::errno::Errno::EBUSY) => Err(Error::DeviceExists {
                name: name.to_string(),
            }),
            Err(e) => Err(ioctl_error("create", &*dm_name, e)),
        }
    }

    fn dm_load(&self, name: &str, table: &[Target]) -> Result<()> {
        let lines: Vec<(u64, u64, String, String)> = table
            .iter()
            .map(|t| (t.start.0, t.len.0, t.target_type().to_string(), t.params()))
            .collect();
        self.with(name, |dm, id, dm_name| {
            dm.table_load(id, &lines, options(DmFlags::DM_READONLY))
                .map_err(|e| ioctl_error("load table of", &**dm_name, e))?;
            Ok(())
        })
    }

    fn dm_suspend(&self, name: &str) -> Result<()> {
        self.with(name, |dm, id, dm_name| {
            dm.device_suspend(id, options(DmFlags::DM_SUSPEND))
                .map_err(|e| ioctl_error("suspend", &**dm_name, e))?;
            Ok(())
        })
    }

    fn dm_resume(&self, name: &str) -> Result<()> {
        self.with(name, |dm, id, dm_name| {
            dm.device_suspend(id, options(DmFlags::empty()))
                .map_err(|e| ioctl_error("resume", &**dm_name, e))?;
            Ok(())
        })
    }

    fn dm_clear(&self, name: &str) -> Result<()> {
        self.with(name, |dm, id, dm_name| {
            dm.table_clear(id)
                .map_err(|e| ioctl_error("clear inactive table of", &**dm_name, e))?;
            Ok(())
        })
    }

    fn dm_remove(&self, name: &str, deferred: bool) -> Result<()> {
        self.with(name, |dm, id, dm_name| {
            let options = options(if deferred {
                DmFlags::DM_DEFERRED_REMOVE
            } else {
                DmFlags::empty()
            });
            match dm.device_remove(id, options) {
                Ok(_) => Ok(()),
                Err(e) if errno_of(&e) == Some(nix::errno::Errno::EBUSY) => {
                    Err(Error::DeviceBusy {
                        name: name.to_string(),
                        open_count: dm.device_info(id).map(|i| i.open_count()).unwrap_or(1),
                    })
                }
                Err(e) if errno_of(&e) == Some(nix::errno::Errno::ENXIO) => {
                    Err(Error::UnknownDevice {
                        name: name.to_string(),
                    })
                }
                Err(e) => Err(ioctl_error("remove", &**dm_name, e)),
            }
        })
    }

    fn dm_info(&self, name: &str) -> Result<Option<LiveDevice>> {
        let info = self.with(name, |dm, id, dm_name| match dm.device_info(id) {
            Ok(info) => Ok(Some((info, dm_name.to_string()))),
            Err(e) if errno_of(&e) == Some(nix::errno::Errno::ENXIO) => Ok(None),
            Err(e) => Err(ioctl_error("query", &**dm_name, e)),
        })?;
        let Some((info, dm_name)) = info else {
            return Ok(None);
        };
        let flags = info.flags();
        let active_table = flags.contains(DmFlags::DM_ACTIVE_PRESENT);
        let targets = if active_table {
            self.dm_table(name).map(|t| t.len() as u64).unwrap_or(0)
        } else {
            0
        };
        let device = info.device();
        Ok(Some(LiveDevice {
            name: name.to_string(),
            dm_name,
            uuid: info.uuid().map(|u| u.to_string()),
            major: device.major,
            minor: device.minor,
            open_count: info.open_count(),
            read_only: flags.contains(DmFlags::DM_READONLY),
            suspended: flags.contains(DmFlags::DM_SUSPEND),
            active_table,
            inactive_table: flags.contains(DmFlags::DM_INACTIVE_PRESENT),
            deferred_remove: flags.contains(DmFlags::DM_DEFERRED_REMOVE),
            targets,
        }))
    }

    fn dm_table(&self, name: &str) -> Result<Vec<Target>> {
        self.with(name, |dm, id, dm_name| {
            let (_, lines) = dm
                .table_status(id, DmOptions::default().set_flags(DmFlags::DM_STATUS_TABLE))
                .map_err(|e| ioctl_error("read table of", &**dm_name, e))?;
            lines
                .into_iter()
                .map(|(start, len, target_type, params)| {
                    Target::parse(Sectors(start), Sectors(len), &target_type, &params)
                        .map_err(|e| dm_error("parse table of", &**dm_name, e))
                })
                .collect()
        })
    }

    fn dm_list(&self) -> Result<Vec<String>> {
        let devices = {
            let dm = self.dm.lock().unwrap_or_else(|p| p.into_inner());
            dm.list_devices()
                .map_err(|e| ioctl_error("list", "devices", e))?
        };
        let mut names: Vec<String> = devices
            .into_iter()
            .filter_map(|(n, _, _)| n.to_string().strip_prefix(NAME_PREFIX).map(String::from))
            .collect();
        names.sort();
        Ok(names)
    }

    fn stats_regions(&self, name: &str) -> Result<Vec<Region>> {
        let text = self.message(name, "@stats_list")?;
        parse_stats_list(&text).map_err(|e| dm_error("read dm-stats regions of", name, e))
    }

    fn stats_create(&self, name: &str, step: Sectors, program: &str) -> Result<()> {
        self.message(name, &format!("@stats_create - {step} {program}"))?;
        Ok(())
    }

    fn stats_areas(&self, name: &str, id: u64) -> Result<Vec<AreaReads>> {
        let text = self.message(name, &format!("@stats_print {id}"))?;
        parse_stats_print(&text).map_err(|e| dm_error("read dm-stats counters of", name, e))
    }

    fn loops(&self) -> Result<Vec<LoopInfo>> {
        let Ok(entries) = fs::read_dir("/sys/block") else {
            return Ok(Vec::new());
        };
        let mut found = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with("loop") {
                continue;
            }
            let sys = entry.path();
            // Unattached loop devices have no backing_file.
            let Some(backing) = read_sys(&sys.join("loop/backing_file")) else {
                continue;
            };
            let Some((major, minor)) = read_sys(&sys.join("dev"))
                .and_then(|d| d.split_once(':').map(|(a, b)| (a.parse(), b.parse())))
                .and_then(|(a, b)| Some((a.ok()?, b.ok()?)))
            else {
                continue;
            };
            let status = loop_status_of(&PathBuf::from("/dev").join(&name));
            let flag = |f: &str| read_sys(&sys.join(f)).as_deref() == Some("1");
            let number = |f: &str| {
                read_sys(&sys.join(f))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            };
            found.push(LoopInfo {
                node: PathBuf::from("/dev").join(&name),
                major,
                minor,
                // A backing file that was replaced shows as "PATH (deleted)".
                backing: (!backing.ends_with(" (deleted)")).then(|| PathBuf::from(backing)),
                read_only: flag("ro"),
                direct_io: flag("loop/dio"),
                autoclear: flag("loop/autoclear"),
                offset: number("loop/offset"),
                size_limit: number("loop/sizelimit"),
                backing_file_id: status.map(|s| (s.device, s.inode)),
                backing_rdev: status.and_then(|s| s.rdev),
            });
        }
        found.sort_by_key(|l| l.minor);
        Ok(found)
    }

    fn loop_hold(&self, info: &LoopInfo) -> Result<LoopHold> {
        let file = File::open(&info.node).map_err(|e| Error::io("cannot open", &info.node, e))?;
        // It may have been detached and reused between the scan and the open.
        let now = self.loops()?.into_iter().find(|l| l.minor == info.minor);
        if now.as_ref() != Some(info) {
            return Err(Error::io(
                "loop device changed while opening",
                &info.node,
                std::io::Error::other("detached or reattached"),
            ));
        }
        Ok(LoopHold::new(info.clone(), false, Box::new(file)))
    }

    fn loop_attach(&self, image: &ImageFile) -> Result<LoopHold> {
        let control = loopdev::LoopControl::open()
            .map_err(|e| Error::io("cannot open", "/dev/loop-control", e))?;
        let mut last = None;
        // Another process may take the free device between the query and the attach.
        for _ in 0..8 {
            let device = control.next_free().map_err(|e| {
                Error::io("cannot find a free loop device via", "/dev/loop-control", e)
            })?;
            let path = device
                .path()
                .ok_or_else(|| Error::internal("loop device without a path"))?;
            drop(device);
            let node = fs::OpenOptions::new()
                .read(true)
                .open(&path)
                .map_err(|e| Error::io("cannot open", &path, e))?;
            match configure(&node, &image.file) {
                Ok(()) => {
                    let (major, minor) = device_numbers(&path)?;
                    let info = self
                        .loops()?
                        .into_iter()
                        .find(|l| l.major == major && l.minor == minor)
                        .ok_or_else(|| {
                            Error::io(
                                "attached loop device vanished:",
                                &path,
                                std::io::Error::other("not in /sys/block"),
                            )
                        })?;
                    return Ok(LoopHold::new(info, true, Box::new(node)));
                }
                Err(nix::errno::Errno::EBUSY) => last = Some(nix::errno::Errno::EBUSY),
                Err(e) => {
                    return Err(Error::io(
                        "cannot attach loop device for",
                        &image.path,
                        e.into(),
                    ));
                }
            }
        }
        Err(Error::io(
            "no loop device could be attached for",
            &image.path,
            last.unwrap_or(nix::errno::Errno::EBUSY).into(),
        ))
    }

    fn loop_detach(&self, info: &LoopInfo) -> Result<()> {
        loopdev::LoopDevice::open(&info.node)
            .and_then(|d| d.detach())
            .map_err(|e| Error::io("cannot detach", &info.node, e))
    }

    fn residency(&self, path: &Path, size: u64) -> Result<Residency> {
        residency(path, size)
    }

    fn release_stale_udev_cookies(&self) -> Result<Vec<String>> {
        release_stale_cookies()
    }
}

fn read_sys(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

fn device_numbers(device: &Path) -> Result<(u32, u32)> {
    let meta = fs::metadata(device).map_err(|e| Error::io("cannot stat", device, e))?;
    let rdev = meta.rdev();
    let number = |n: u64| {
        u32::try_from(n).map_err(|_| {
            Error::io(
                "device number out of range:",
                device,
                std::io::Error::other(format!("{n}")),
            )
        })
    };
    Ok((
        number(nix::sys::stat::major(rdev))?,
        number(nix::sys::stat::minor(rdev))?,
    ))
}

/// `struct loop_config` of `<linux/loop.h>`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
nix::ioctl_write_ptr_bad!(loop_configure, 0x4C0A, LoopConfig);

/// [`loop_status`] of loop device `node`.
fn loop_status_of(node: &Path) -> Option<LoopStatus> {
    loop_status(&File::open(node).ok()?)
}

/// Attaches `file` to the loop device `node` read-only, buffered and autoclear in one ioctl
/// (`LOOP_CONFIGURE`, Linux 5.8): unlike `LOOP_SET_FD` followed by `LOOP_SET_STATUS64`, a
/// crash cannot leave a device attached without autoclear.
fn configure(node: &File, file: &File) -> std::result::Result<(), nix::errno::Errno> {
    let config = LoopConfig {
        fd: file.as_raw_fd() as u32,
        block_size: 0,
        info: LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR,
            lo_file_name: [0; 64],
            lo_crypt_name: [0; 64],
            lo_encrypt_key: [0; 32],
            lo_init: [0; 2],
        },
        reserved: [0; 8],
    };
    // SAFETY: `config` is a fully initialised `struct loop_config` that outlives the call,
    // and `node` is an open loop device.
    unsafe { loop_configure(node.as_raw_fd(), &config) }.map(|_| ())
}

/// Upper 16 bits of the SysV key of a device-mapper udev cookie (`DM_COOKIE_MAGIC`).
const DM_COOKIE_MAGIC: u32 = 0x0D4D;
/// A cookie udev has not completed for this long belongs to a process that died waiting.
const STALE_COOKIE_SECS: i64 = 300;

/// What `semctl` tells of one dm udev cookie (a SysV semaphore of one member).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cookie {
    /// 0 once udev completed it and its waiter took its own count off.
    value: i32,
    /// Processes blocked waiting for it to reach 0 (`GETZCNT`).
    waiters: i32,
    /// The process of the last operation on it (`GETPID`): its maker, or udev's `dmsetup
    /// udevcomplete`, or the waiter taking its count off.
    last_pid: i32,
    /// Seconds since it was made.
    age: i64,
}

/// Whether nobody will complete `cookie` or wait for it. The devicemapper crate makes a
/// cookie with value 2 (its own count and udev's), runs the ioctl, takes its count off and
/// waits for udev to take the other; then removes it. A process killed anywhere in that
/// leaves it behind: at 0 if udev completed and it had taken its count off, else at 1 or 2
/// for good (udev takes off only one). Those are orphans: no process waits for it and the
/// process that last touched it is gone. A live maker looks the same only between udev's
/// completion and its own next step, so [`release_stale_cookies`] releases an orphan only if
/// it is still one, unchanged, a second later. As `dmsetup udevcomplete_all` does, a cookie
/// older than five minutes is released in any case.
fn judge(cookie: &Cookie, alive: impl Fn(i32) -> bool) -> Verdict {
    if cookie.value == 0 || cookie.age > STALE_COOKIE_SECS {
        Verdict::Stale
    } else if cookie.waiters == 0 && cookie.last_pid > 0 && !alive(cookie.last_pid) {
        Verdict::Orphan
    } else {
        Verdict::Live
    }
}

/// What [`judge`] says of a cookie.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Stale,
    /// Stale if it stays so a moment.
    Orphan,
    Live,
}

/// The state of semaphore `semid`, or `None` when it is gone.
fn read_cookie(semid: i32, age: i64) -> Option<Cookie> {
    // SAFETY: GETVAL, GETZCNT and GETPID take no pointers.
    let cookie = unsafe {
        Cookie {
            value: nix::libc::semctl(semid, 0, nix::libc::GETVAL),
            waiters: nix::libc::semctl(semid, 0, nix::libc::GETZCNT),
            last_pid: nix::libc::semctl(semid, 0, nix::libc::GETPID),
            age,
        }
    };
    (cookie.value >= 0 && cookie.waiters >= 0).then_some(cookie)
}

/// Whether process `pid` exists (a zombie counts: it cannot touch a semaphore, but is gone
/// in a moment anyway).
fn process_alive(pid: i32) -> bool {
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) | Err(nix::errno::Errno::EPERM) => true,
        Err(_) => false,
    }
}

/// Removes device-mapper udev cookies (SysV semaphores) that nobody will complete or wait
/// for (see [`cookie_is_stale`]). A killed vmard otherwise leaks one per interrupted change.
fn release_stale_cookies() -> Result<Vec<String>> {
    let Ok(text) = fs::read_to_string("/proc/sysvipc/sem") else {
        return Ok(Vec::new());
    };
    let now = i64::try_from(crate::time::now_secs()).unwrap_or(i64::MAX);
    let (mut stale, mut orphans) = (Vec::new(), Vec::new());
    for line in text.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // key semid perms nsems uid gid cuid cgid otime ctime
        let (Some(key), Some(semid), Some(ctime)) = (
            fields.first().and_then(|k| k.parse::<i64>().ok()),
            fields.get(1).and_then(|s| s.parse::<i32>().ok()),
            fields.get(9).and_then(|c| c.parse::<i64>().ok()),
        ) else {
            continue;
        };
        if (key >> 16) & 0xffff != i64::from(DM_COOKIE_MAGIC) {
            continue;
        }
        // None: removed meanwhile (by its waiter, or another vmard).
        let Some(cookie) = read_cookie(semid, now - ctime) else {
            continue;
        };
        match judge(&cookie, process_alive) {
            Verdict::Stale => stale.push((key, semid, cookie)),
            Verdict::Orphan => orphans.push((key, semid, cookie)),
            Verdict::Live => {}
        }
    }
    if !orphans.is_empty() {
        // A live maker between udev's completion and its own next step moves on meanwhile.
        std::thread::sleep(std::time::Duration::from_secs(1));
        for (key, semid, first) in orphans {
            if read_cookie(semid, first.age) == Some(first) {
                stale.push((key, semid, first));
            }
        }
    }
    let mut released = Vec::new();
    for (key, semid, cookie) in stale {
        // SAFETY: IPC_RMID on a semaphore id read from /proc takes no pointer.
        if unsafe { nix::libc::semctl(semid, 0, nix::libc::IPC_RMID) } == 0 {
            released.push(format!(
                "udev cookie {key:#x} (semaphore {semid}, value {}, last used by pid {})",
                cookie.value, cookie.last_pid
            ));
        }
    }
    Ok(released)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_cookies_nobody_completes_or_waits_for_are_stale() {
        let dead = |_| false;
        let alive = |_| true;
        let cookie = |value, waiters, age| Cookie {
            value,
            waiters,
            last_pid: 4242,
            age,
        };
        // Completed by udev, its waiter gone before removing it.
        assert_eq!(judge(&cookie(0, 0, 1), alive), Verdict::Stale);
        // Killed before or after the ioctl (2), or after udev completed it (1): the last
        // process to touch it is gone and nobody waits. On main these stayed for 5 minutes.
        assert_eq!(judge(&cookie(2, 0, 1), dead), Verdict::Orphan);
        assert_eq!(judge(&cookie(1, 0, 1), dead), Verdict::Orphan);
        // A live maker that has not waited yet, and one that waits: kept.
        assert_eq!(judge(&cookie(2, 0, 1), alive), Verdict::Live);
        assert_eq!(judge(&cookie(1, 1, 1), dead), Verdict::Live);
        assert_eq!(judge(&cookie(1, 1, 1), alive), Verdict::Live);
        // Five minutes: released whatever else.
        assert_eq!(
            judge(&cookie(1, 1, STALE_COOKIE_SECS + 1), alive),
            Verdict::Stale
        );
        assert!(process_alive(std::process::id() as i32));
    }

    #[test]
    fn loop_config_has_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
    }
}

#[cfg(test)]
mod loop_tests {
    use super::*;
    use crate::sys::device_number;

    #[test]
    fn loop_devices_report_their_backing_file_by_device_and_inode() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: needs root for a loop device");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("img.raw");
        std::fs::write(&image, [5u8; 8192]).unwrap();
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show", "--read-only"])
            .arg(&image)
            .output()
            .unwrap();
        if !out.status.success() {
            eprintln!("skipped: no loop device");
            return;
        }
        let node = String::from_utf8(out.stdout).unwrap().trim().to_string();
        let found = loop_status_of(Path::new(&node));
        // A loop device over that loop device: its backing file is a block device, which
        // the status names by number.
        let stacked = std::process::Command::new("losetup")
            .args(["--find", "--show", "--read-only", &node])
            .output()
            .unwrap();
        let stacked = String::from_utf8(stacked.stdout)
            .unwrap()
            .trim()
            .to_string();
        let over_device = loop_status_of(Path::new(&stacked));
        for device in [&stacked, &node] {
            let _ = std::process::Command::new("losetup")
                .args(["-d", device])
                .status();
        }
        let meta = std::fs::metadata(&image).unwrap();
        let found = found.unwrap();
        assert_eq!(
            (found.device, found.inode),
            (meta.dev(), meta.ino()),
            "{node}"
        );
        assert_eq!(found.rdev, None);
        let node_meta = std::fs::metadata(&node).unwrap();
        let over_device = over_device.unwrap_or_else(|| panic!("no status of {stacked}"));
        assert_eq!(
            over_device.rdev,
            device_number(node_meta.rdev()),
            "{stacked} over {node}"
        );
    }
}
