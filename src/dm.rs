//! Device-mapper devices: read-only `vmar-NAME` devices (UUID `VMAR-NAME`) whose tables are
//! `linear` and `zero` targets, through the devicemapper crate's raw ioctls (its `LinearDev`
//! has no `zero` target and makes writable devices).
//!
//! The crate synchronises every change with udev (cookies on a SysV semaphore, completed by
//! the `95-dm-notify.rules` of dmsetup) and refuses to work at all when udev is not running
//! (checked through `/run/udev/control`, in every version up to 0.34.7). So vmard needs udev;
//! udev's dm rules then make `/dev/mapper/NAME` and vmar's rules `/dev/vmar/NAME`.

use std::path::{Path, PathBuf};

use devicemapper::{DM, DevId, DmError, DmFlags, DmNameBuf, DmOptions, DmUuidBuf};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::stats::{
    AreaReads, Region, STATS_PROGRAM, area_sectors, parse_stats_list, parse_stats_print,
};
use crate::table::Target;

/// Prefix of vmar's dm device names; the rest is the device name.
pub const NAME_PREFIX: &str = "vmar-";
/// Prefix of vmar's dm UUIDs, which udev rules and the boot-time cleanup match.
pub const UUID_PREFIX: &str = "VMAR-";

/// A vmar device as the kernel has it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveDevice {
    /// Name without the `vmar-` prefix.
    pub name: String,
    pub dm_name: String,
    pub uuid: Option<String>,
    pub major: u32,
    pub minor: u32,
    pub open_count: i32,
    pub read_only: bool,
    pub suspended: bool,
    /// Targets of the active table.
    pub targets: u64,
}

/// One line of a live table, as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveTarget {
    pub start: u64,
    pub len: u64,
    pub target_type: String,
    pub params: String,
}

impl LiveTarget {
    /// For a `linear` target: the device (`MAJOR:MINOR`) and first sector it reads.
    pub fn linear_source(&self) -> Option<(&str, u64)> {
        if self.target_type != "linear" {
            return None;
        }
        let mut words = self.params.split_whitespace();
        Some((words.next()?, words.next()?.parse().ok()?))
    }
}

/// Handle on the kernel's device-mapper.
pub struct DeviceMapper {
    dm: DM,
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

fn udev_running() -> bool {
    Path::new("/run/udev/control").exists()
}

/// Path of the device node of `vmar-NAME`.
pub fn node_path(name: &str) -> PathBuf {
    Path::new("/dev/mapper").join(format!("{NAME_PREFIX}{name}"))
}

fn read_only() -> DmOptions {
    DmOptions::default().set_flags(DmFlags::DM_READONLY)
}

impl DeviceMapper {
    /// Opens `/dev/mapper/control`.
    pub fn open() -> Result<DeviceMapper> {
        if !udev_running() {
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
        Ok(DeviceMapper { dm })
    }

    /// The dm name `vmar-NAME` and UUID `VMAR-NAME` of device `name`, as the crate takes them.
    fn ids(name: &str) -> Result<(DmNameBuf, DmUuidBuf)> {
        let dm_name = format!("{NAME_PREFIX}{name}");
        let uuid = format!("{UUID_PREFIX}{name}");
        let dm_name =
            DmNameBuf::new(dm_name.clone()).map_err(|e| dm_error("name", &*dm_name, e))?;
        let uuid = DmUuidBuf::new(uuid.clone()).map_err(|e| dm_error("uuid", &uuid, e))?;
        Ok((dm_name, uuid))
    }

    /// Creates read-only device `vmar-NAME` with `targets` and activates it. On failure
    /// nothing is left behind.
    pub fn create(&self, name: &str, targets: &[Target]) -> Result<LiveDevice> {
        let (dm_name, uuid) = Self::ids(name)?;
        if self.info(name)?.is_some() {
            return Err(Error::DeviceExists {
                name: name.to_string(),
            });
        }
        self.dm
            .device_create(&dm_name, Some(&uuid), read_only())
            .map_err(|e| ioctl_error("create", &*dm_name, e))?;
        let id = DevId::Name(&dm_name);
        let activated = self
            .dm
            .table_load(&id, &lines(targets), read_only())
            .map_err(|e| ioctl_error("load table of", &*dm_name, e))
            .and_then(|_| {
                self.dm
                    .device_suspend(&id, DmOptions::default())
                    .map_err(|e| ioctl_error("resume", &*dm_name, e))
            });
        match activated {
            Ok(_) => {
                // Read accounting for `vmarctl stats`; a device without it still serves.
                let sectors = targets.last().map_or(0, |t| t.start + t.len);
                if let Err(e) = self.ensure_stats_region(name, area_sectors(sectors)) {
                    tracing::warn!("{}: no read statistics: {e}", &*dm_name);
                }
                self.info(name)?
                    .ok_or_else(|| dm_error("find", &*dm_name, "device vanished after creation"))
            }
            Err(e) => {
                let _ = self.dm.device_remove(&id, DmOptions::default());
                Err(e)
            }
        }
    }

    /// Replaces the table of a live device atomically: the new table is loaded into the
    /// inactive slot, then the device is suspended and resumed, which swaps it in.
    pub fn reload(&self, name: &str, targets: &[Target]) -> Result<LiveDevice> {
        let (dm_name, _) = Self::ids(name)?;
        let id = DevId::Name(&dm_name);
        if self.info(name)?.is_none() {
            return Err(Error::UnknownDevice {
                name: name.to_string(),
            });
        }
        self.dm
            .table_load(&id, &lines(targets), read_only())
            .map_err(|e| ioctl_error("load table of", &*dm_name, e))?;
        let swapped = self
            .dm
            .device_suspend(&id, DmOptions::default().set_flags(DmFlags::DM_SUSPEND))
            .map_err(|e| ioctl_error("suspend", &*dm_name, e))
            .and_then(|_| {
                self.dm
                    .device_suspend(&id, DmOptions::default())
                    .map_err(|e| ioctl_error("resume", &*dm_name, e))
            });
        if let Err(e) = swapped {
            let _ = self.dm.table_clear(&id);
            let _ = self.dm.device_suspend(&id, DmOptions::default());
            return Err(e);
        }
        self.info(name)?
            .ok_or_else(|| dm_error("find", &*dm_name, "device vanished during reload"))
    }

    /// Removes `vmar-NAME`. An open device is refused unless `force`, which defers the
    /// removal to its last close. Returns true when the removal was deferred.
    pub fn remove(&self, name: &str, force: bool) -> Result<bool> {
        let (dm_name, _) = Self::ids(name)?;
        let Some(live) = self.info(name)? else {
            return Err(Error::UnknownDevice {
                name: name.to_string(),
            });
        };
        let id = DevId::Name(&dm_name);
        if live.open_count > 0 {
            if !force {
                return Err(Error::DeviceBusy {
                    name: name.to_string(),
                    open_count: live.open_count,
                });
            }
            self.dm
                .device_remove(
                    &id,
                    DmOptions::default().set_flags(DmFlags::DM_DEFERRED_REMOVE),
                )
                .map_err(|e| ioctl_error("defer removal of", &*dm_name, e))?;
            return Ok(true);
        }
        self.dm
            .device_remove(&id, DmOptions::default())
            .map_err(|e| ioctl_error("remove", &*dm_name, e))?;
        Ok(false)
    }

    /// The device `vmar-NAME`, if the kernel has it.
    pub fn info(&self, name: &str) -> Result<Option<LiveDevice>> {
        let (dm_name, _) = Self::ids(name)?;
        let id = DevId::Name(&dm_name);
        let info = match self.dm.device_info(&id) {
            Ok(info) => info,
            Err(e) if errno_of(&e) == Some(nix::errno::Errno::ENXIO) => return Ok(None),
            Err(e) => return Err(ioctl_error("query", &*dm_name, e)),
        };
        // A device created without a table (left by a crash) has none to read.
        let targets = self.table(name).map(|t| t.len() as u64).unwrap_or(0);
        let device = info.device();
        let flags = info.flags();
        Ok(Some(LiveDevice {
            name: name.to_string(),
            dm_name: dm_name.to_string(),
            uuid: info.uuid().map(|u| u.to_string()),
            major: device.major,
            minor: device.minor,
            open_count: info.open_count(),
            read_only: flags.contains(DmFlags::DM_READONLY),
            suspended: flags.contains(DmFlags::DM_SUSPEND),
            targets,
        }))
    }

    /// The active table of `vmar-NAME`.
    pub fn table(&self, name: &str) -> Result<Vec<LiveTarget>> {
        let (dm_name, _) = Self::ids(name)?;
        let (_, lines) = self
            .dm
            .table_status(
                &DevId::Name(&dm_name),
                DmOptions::default().set_flags(DmFlags::DM_STATUS_TABLE),
            )
            .map_err(|e| ioctl_error("read table of", &*dm_name, e))?;
        Ok(lines
            .into_iter()
            .map(|(start, len, target_type, params)| LiveTarget {
                start,
                len,
                target_type,
                params,
            })
            .collect())
    }

    /// All devices whose name starts with `vmar-`, by name.
    pub fn list(&self) -> Result<Vec<LiveDevice>> {
        let devices = self
            .dm
            .list_devices()
            .map_err(|e| ioctl_error("list", "devices", e))?;
        let mut live = Vec::new();
        for (dm_name, _, _) in devices {
            if let Some(name) = dm_name.to_string().strip_prefix(NAME_PREFIX)
                && let Some(device) = self.info(name)?
            {
                live.push(device);
            }
        }
        live.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(live)
    }
}

fn lines(targets: &[Target]) -> Vec<(u64, u64, String, String)> {
    targets
        .iter()
        .map(|t| (t.start, t.len, t.target_type().to_string(), t.params()))
        .collect()
}

impl DeviceMapper {
    /// Sends a dm-stats message (`@stats_...`) to `vmar-NAME` and returns its output.
    fn stats_message(&self, name: &str, message: &str) -> Result<String> {
        let (dm_name, _) = Self::ids(name)?;
        let (_, output) = self
            .dm
            .target_msg(&DevId::Name(&dm_name), None, message)
            .map_err(|e| ioctl_error("send dm-stats message to", &*dm_name, e))?;
        Ok(output.unwrap_or_default())
    }

    /// vmar's dm-stats region of `vmar-NAME`, if it has one.
    pub fn stats_region(&self, name: &str) -> Result<Option<Region>> {
        let text = self.stats_message(name, &format!("@stats_list {STATS_PROGRAM}"))?;
        let regions =
            parse_stats_list(&text).map_err(|e| dm_error("read dm-stats regions of", name, e))?;
        Ok(regions.into_iter().find(|r| r.program == STATS_PROGRAM))
    }

    /// Makes sure `vmar-NAME` has vmar's dm-stats region over the whole device, in areas of
    /// `step` sectors, and returns it. Counting starts when the region is created.
    pub fn ensure_stats_region(&self, name: &str, step: u64) -> Result<Region> {
        if let Some(region) = self.stats_region(name)? {
            return Ok(region);
        }
        self.stats_message(name, &format!("@stats_create - {step} {STATS_PROGRAM}"))?;
        self.stats_region(name)?
            .ok_or_else(|| dm_error("create dm-stats region of", name, "region not listed"))
    }

    /// The read counters of each area of region `id` of `vmar-NAME`.
    pub fn stats_areas(&self, name: &str, id: u64) -> Result<Vec<AreaReads>> {
        let text = self.stats_message(name, &format!("@stats_print {id}"))?;
        parse_stats_print(&text).map_err(|e| dm_error("read dm-stats counters of", name, e))
    }
}
