//! vmar devices: what `create`, `refresh`, `remove`, `list`, `status`, `stats` and the
//! start-up `restore` do. A device serves one captured image through a read-only dm table
//! over read-only, buffered loop devices of that image and of the images holding its
//! canonical blocks. All kernel work goes through [`Kernel`]; this module plans it and keeps
//! the catalog's record and the kernel in step.
//!
//! Crash safety: the catalog record is written before the kernel is changed (`creating`,
//! `removing`), and marked done after. Whatever step a crash interrupts, [`restore`] at the
//! next start finishes or undoes it before anyone is served: a `creating` device is rolled
//! back, a `removing` one removed, a suspended one resumed, a table that is not the image's
//! current map replaced. The caller serialises all device changes (one at a time).

use std::collections::BTreeMap;
use std::path::Path;

use crate::budget::{self, BudgetCost};
use crate::catalog::{Catalog, DeviceRecord, DeviceState, ImageRecord};
use crate::error::{Error, Result};
use crate::image::ImageIdentity;
use crate::instance::InstanceId;
use crate::kernel::{Kernel, LiveDevice, LoopHold, LoopInfo, Maker, device_uuid, node_path};
use crate::map::{BlockMap, ImageId};
use crate::name::{DeviceName, ImageName};
use crate::protocol::{
    DeviceChange, DeviceStats, DeviceStatus, ImageCache, Removed, RestoreReport, StatsReport,
};
use crate::stats::{self, ClassBytes, ReadBytes, STATS_PROGRAM, TargetCounts};
use crate::table::{self, BlockDev, Target};
use crate::time::now_secs;
use crate::units::Sectors;

/// Default most targets of one table: far below the kernel's 1,048,576, and still enough for
/// the maps of real multi-GiB images we measured (tens of thousands of extents).
pub const DEFAULT_MAX_TARGETS: u64 = 100_000;

/// A table ready to load, with the loop devices it needs held open.
pub struct Plan {
    pub image: ImageRecord,
    pub targets: Vec<Target>,
    pub cost: BudgetCost,
    pub loops: BTreeMap<String, LoopHold>,
}

/// The loop device that serves the image at `path`, if one is attached as vmar needs it.
fn existing_loop(loops: &[LoopInfo], path: &Path, identity: &ImageIdentity) -> Option<LoopInfo> {
    loops.iter().find(|l| l.serves(path, identity)).cloned()
}

/// Plans the table of `image`: refuses it if the image or any image it reads from changed
/// since capture, fits the map into `max_targets`, attaches (or reuses) the loop devices.
pub fn plan(catalog: &Catalog, kernel: &dyn Kernel, image: &str, max_targets: u64) -> Result<Plan> {
    plan_with(catalog, kernel, image, max_targets, None).map(|(plan, _)| plan)
}

/// [`plan`] for a device vmar already serves, failing closed: with `tolerate`, images named
/// in it (found changed before) and images found changed now (written in place: the file
/// is still there) get no loop device, so their extents become `error` targets. Returns the
/// names of those images too.
fn plan_with(
    catalog: &Catalog,
    kernel: &dyn Kernel,
    image: &str,
    max_targets: u64,
    tolerate: Option<&[String]>,
) -> Result<(Plan, Vec<String>)> {
    let (record, map) = catalog.map(image)?;
    let (map, cost) = budget::fit(&map, max_targets);
    let mut by_id = BTreeMap::new();
    let mut loops = BTreeMap::new();
    let attached = kernel.loops()?;
    let mut changed = Vec::new();
    for (id, other) in catalog.sources_of(&record, &map)? {
        if tolerate.is_some_and(|known| known.contains(&other.name)) {
            changed.push(other.name);
            continue;
        }
        // The captured file, or vmar's hold on it once its name is gone.
        let file = match crate::holds::open_captured(catalog, &other)
            .and_then(|file| crate::sample::check_block_image(catalog, &other).map(|()| file))
        {
            Ok(file) => file,
            Err(Error::ImageChanged { .. }) if tolerate.is_some() && other.path.exists() => {
                changed.push(other.name);
                continue;
            }
            Err(e) => return Err(e),
        };
        // Checked unchanged above, but read by no extent: no loop device (an autoclear one
        // would go as soon as this plan lets go of it).
        if id == record.id && !map.reads_own() {
            continue;
        }
        let mut hold = None;
        // An existing one may go away between the scan and the open (autoclear).
        if let Some(info) = existing_loop(&attached, &file.path, &file.identity) {
            hold = kernel.loop_hold(&info).ok();
        }
        let hold = match hold {
            Some(hold) => hold,
            None => kernel.loop_attach(&file)?,
        };
        by_id.insert(id, hold.info.block_dev());
        loops.insert(other.name, hold);
    }
    let targets = table::build_guarded(&map, record.size, |id| by_id.get(&id).cloned());
    let plan = Plan {
        image: record,
        targets,
        cost,
        loops,
    };
    Ok((plan, changed))
}

/// The table `image` would get now from the loop devices already attached, without
/// attaching any: `None` if one is missing. What `status` compares live tables with.
fn expected(
    catalog: &Catalog,
    kernel: &dyn Kernel,
    image: &str,
    max_targets: u64,
) -> Result<Option<Vec<Target>>> {
    let (record, map) = catalog.map(image)?;
    let (map, _) = budget::fit(&map, max_targets);
    let loops = kernel.loops()?;
    let mut by_id: BTreeMap<ImageId, BlockDev> = BTreeMap::new();
    for (id, other) in catalog.sources_of(&record, &map)? {
        if id == record.id && !map.reads_own() {
            continue;
        }
        match existing_loop(&loops, &other.path, &other.identity) {
            Some(l) => by_id.insert(id, l.block_dev()),
            None => return Ok(None),
        };
    }
    Ok(Some(build_table(&map, record.size, &by_id)))
}

/// The table of `map` reading each image through the device `by_id` names for it.
fn build_table(map: &BlockMap, size: u64, by_id: &BTreeMap<ImageId, BlockDev>) -> Vec<Target> {
    table::build(map, size, |id| {
        by_id
            .get(&id)
            .cloned()
            .unwrap_or_else(|| BlockDev::Named(format!("missing-image-{id}")))
    })
}

fn change(plan: &Plan, device: DeviceStatus, started: std::time::Instant) -> DeviceChange {
    DeviceChange {
        device,
        targets: plan.targets.len() as u64,
        budget: plan.cost,
        loops: plan
            .loops
            .iter()
            .map(|(name, l)| {
                (
                    name.clone(),
                    (l.info.node.display().to_string(), l.attached),
                )
            })
            .collect(),
        seconds: started.elapsed().as_secs_f64(),
    }
}

/// Whether this state dir's vmard may change live device `live`: one it made, or one an
/// older vmar made (`VMAR-NAME`) that its catalog records. Another state dir's device, or
/// one vmar did not make, is refused whatever its name.
fn claim(live: &LiveDevice, instance: &InstanceId, recorded: bool) -> Result<()> {
    match live.maker() {
        Maker::Instance(id) if id == *instance => Ok(()),
        Maker::OldVmar if recorded => Ok(()),
        _ => Err(Error::ForeignDevice {
            name: live.name.clone(),
            uuid: live.uuid.clone().unwrap_or_default(),
        }),
    }
}

/// Creates `name` with `targets`, resumes it and gives it a dm-stats region. On failure the
/// device is removed again.
fn activate(
    kernel: &dyn Kernel,
    instance: &InstanceId,
    name: &str,
    targets: &[Target],
) -> Result<()> {
    kernel.dm_create(name, &device_uuid(instance, name))?;
    let done = kernel
        .dm_load(name, targets)
        .and_then(|()| kernel.dm_resume(name));
    if let Err(e) = done {
        if let Err(undo) = kernel.dm_remove(name, false) {
            tracing::warn!("{name}: cannot remove the half-created device: {undo}");
        }
        return Err(e);
    }
    ensure_stats(kernel, name, targets);
    Ok(())
}

/// Read accounting for `vmarctl stats`; a device without it still serves.
fn ensure_stats(kernel: &dyn Kernel, name: &str, targets: &[Target]) {
    let sectors = targets.last().map_or(Sectors(0), Target::end);
    if let Err(e) = stats_region(kernel, name, sectors) {
        tracing::warn!("{name}: no read statistics: {e}");
    }
}

/// vmar's dm-stats region of `name` (created if missing), over `sectors`.
fn stats_region(
    kernel: &dyn Kernel,
    name: &str,
    sectors: Sectors,
) -> Result<crate::kernel::Region> {
    let find = || -> Result<Option<crate::kernel::Region>> {
        Ok(kernel
            .stats_regions(name)?
            .into_iter()
            .find(|r| r.program == STATS_PROGRAM))
    };
    if let Some(region) = find()? {
        return Ok(region);
    }
    kernel.stats_create(name, Sectors(stats::area_sectors(sectors.0)), STATS_PROGRAM)?;
    find()?.ok_or_else(|| Error::DeviceMapper {
        op: "create dm-stats region of",
        device: name.to_string(),
        message: "region not listed after creation".into(),
    })
}

/// Swaps `targets` into live device `name` atomically: load into the inactive slot, suspend,
/// resume. Whatever fails, the device is left resumed: a suspended device hangs its VM.
pub(crate) fn swap(kernel: &dyn Kernel, name: &str, targets: &[Target]) -> Result<()> {
    kernel.dm_load(name, targets)?;
    let swapped = kernel
        .dm_suspend(name)
        .and_then(|()| kernel.dm_resume(name));
    if let Err(e) = swapped {
        let _ = kernel.dm_clear(name);
        if let Err(resume) = kernel.dm_resume(name) {
            tracing::error!("{name}: cannot resume after a failed table swap: {resume}");
        }
        return Err(e);
    }
    Ok(())
}

/// Creates device `name` serving captured image `image`, and saves it.
pub fn create(
    catalog: &Catalog,
    kernel: &dyn Kernel,
    instance: &InstanceId,
    name: &DeviceName,
    image: &str,
    max_targets: u64,
) -> Result<DeviceChange> {
    let started = std::time::Instant::now();
    let exists = || Error::DeviceExists {
        name: name.to_string(),
    };
    // A record left by a deferred removal does not hold the name once the device is gone.
    let record = catalog.device(name)?;
    if record.is_some_and(|r| r.state != DeviceState::RemovingDeferred) {
        return Err(exists());
    }
    if kernel.dm_info(name)?.is_some() {
        return Err(exists());
    }
    let plan = plan(catalog, kernel, image, max_targets)?;
    let mut record = DeviceRecord {
        name: name.to_string(),
        image: plan.image.name.clone(),
        created_at: now_secs(),
        state: DeviceState::Creating,
        changed: Vec::new(),
    };
    catalog.save_device(&record)?;
    if let Err(e) = activate(kernel, instance, name, &plan.targets) {
        if let Err(undo) = catalog.forget_device(name) {
            tracing::error!("{name}: cannot drop the record of a failed create: {undo}");
        }
        return Err(e);
    }
    record.state = DeviceState::Active;
    catalog.save_device(&record)?;
    let status = status_of(catalog, kernel, instance, name, max_targets, Some(&plan))?;
    Ok(change(&plan, status, started))
}

/// Brings the kernel in line with the saved devices, as at boot: finishes or undoes what a
/// crash interrupted, creates missing devices, resumes suspended ones, swaps in the current
/// map where the live table differs, removes unsaved leftovers of this state dir nobody has
/// open and loop devices a crash left without autoclear. Devices of other state dirs (another
/// instance id in the UUID), and unsaved ones of vmar before instance ids, are left alone.
/// One failing device does not stop the rest.
pub fn restore(
    catalog: &Catalog,
    kernel: &dyn Kernel,
    instance: &InstanceId,
    max_targets: u64,
) -> Result<RestoreReport> {
    let mut report = RestoreReport::default();
    match kernel.release_stale_udev_cookies() {
        Ok(released) => report.released = released,
        Err(e) => report.failed.push(("(udev cookies)".into(), e.to_string())),
    }
    let saved = catalog.devices()?;
    for name in kernel.dm_list()? {
        if saved.iter().any(|d| d.name == name) {
            continue;
        }
        let Some(live) = kernel.dm_info(&name)? else {
            continue;
        };
        let ours = matches!(live.maker(), Maker::Instance(id) if id == *instance);
        if ours && live.open_count == 0 {
            match kernel.dm_remove(&name, false) {
                Ok(()) => report.cleaned.push(name),
                Err(e) => report.failed.push((name, e.to_string())),
            }
        }
    }
    for record in saved {
        let name = record.name.clone();
        let outcome = restore_one(catalog, kernel, instance, &record, max_targets);
        tally(&mut report, name, outcome);
    }
    match detach_leaked_loops(catalog, kernel) {
        Ok(detached) => report.detached = detached,
        Err(e) => report.failed.push(("(loop devices)".into(), e.to_string())),
    }
    Ok(report)
}

/// Restores again only the saved devices named in `names` (those a restore could not serve):
/// what [`restore`] does for each, without touching any other device.
pub fn retry(
    catalog: &Catalog,
    kernel: &dyn Kernel,
    instance: &InstanceId,
    names: &[String],
    max_targets: u64,
) -> Result<RestoreReport> {
    let mut report = RestoreReport::default();
    for record in catalog.devices()? {
        if !names.contains(&record.name) {
            continue;
        }
        let name = record.name.clone();
        let outcome = restore_one(catalog, kernel, instance, &record, max_targets);
        tally(&mut report, name, outcome);
    }
    Ok(report)
}

/// Adds the outcome of restoring device `name` to `report`.
fn tally(report: &mut RestoreReport, name: String, outcome: Result<Restored>) {
    match outcome {
        Ok(Restored::Created) => report.created.push(name),
        Ok(Restored::Unchanged) => report.unchanged.push(name),
        Ok(Restored::ImageChanged) => report.image_changed.push(name),
        Ok(Restored::Repaired) => report.repaired.push(name),
        Ok(Restored::RolledBack) => report.rolled_back.push(name),
        Ok(Restored::Removed) => report.removed.push(name),
        Ok(Restored::Pending) => {}
        Err(e) => report.failed.push((name, e.to_string())),
    }
}

enum Restored {
    Created,
    Unchanged,
    /// Served failed closed: an image it reads changed (see [`crate::guard`]).
    ImageChanged,
    Repaired,
    RolledBack,
    Removed,
    /// A deferred removal still waiting for the last close.
    Pending,
}

fn restore_one(
    catalog: &Catalog,
    kernel: &dyn Kernel,
    instance: &InstanceId,
    record: &DeviceRecord,
    max_targets: u64,
) -> Result<Restored> {
    let name = record.name.as_str();
    let mut live = kernel.dm_info(name)?;
    // A device of this name that is not ours is never touched: an unfinished create or
    // removal of ours is simply dropped (it never reached the kernel, or reached it before
    // the other one took the name), an active record reported.
    if let Some(other) = live.as_ref().filter(|l| claim(l, instance, true).is_err()) {
        if record.state == DeviceState::Active {
            return Err(Error::ForeignDevice {
                name: name.to_string(),
                uuid: other.uuid.clone().unwrap_or_default(),
            });
        }
        live = None;
    }
    match record.state {
        DeviceState::Creating => match live {
            Some(live) if live.open_count > 0 => {
                // Someone uses it already: finish the create instead.
                let mut done = record.clone();
                done.state = DeviceState::Active;
                catalog.save_device(&done)?;
                restore_one(catalog, kernel, instance, &done, max_targets)
            }
            live => {
                if live.is_some() {
                    kernel.dm_remove(name, false)?;
                }
                catalog.forget_device(name)?;
                Ok(Restored::RolledBack)
            }
        },
        DeviceState::Removing | DeviceState::RemovingDeferred => {
            if let Some(live) = live {
                let deferred = live.open_count > 0;
                if !live.deferred_remove {
                    if deferred {
                        // A removal interrupted before its ioctl: finish it as asked, or as
                        // deferred if the device is open (a plain removal refuses an open
                        // device, and would have when asked).
                        if record.state == DeviceState::Removing {
                            let mut back = record.clone();
                            back.state = DeviceState::Active;
                            catalog.save_device(&back)?;
                            return restore_one(catalog, kernel, instance, &back, max_targets);
                        }
                        kernel.dm_remove(name, true)?;
                    } else {
                        kernel.dm_remove(name, false)?;
                    }
                }
                if kernel.dm_info(name)?.is_some() {
                    return Ok(Restored::Pending);
                }
            }
            catalog.forget_device(name)?;
            Ok(Restored::Removed)
        }
        DeviceState::Active | DeviceState::ImageChanged => {
            let policy = crate::policy::settings().policy;
            let tolerate =
                (policy == crate::policy::Policy::FailClosed).then_some(&record.changed[..]);
            let (plan, changed) =
                match plan_with(catalog, kernel, &record.image, max_targets, tolerate) {
                    Ok(planned) => planned,
                    Err(e) => {
                        // Never leave a VM hanging, even on a device that cannot be checked.
                        if live.as_ref().is_some_and(|l| l.suspended) {
                            kernel.dm_resume(name)?;
                        }
                        if let Error::ImageChanged { name: image, .. } = &e
                            && live.is_some()
                        {
                            mark_changed(catalog, record, std::slice::from_ref(image))?;
                        }
                        return Err(e);
                    }
                };
            let failed_closed = !changed.is_empty();
            if failed_closed {
                mark_changed(catalog, record, &changed)?;
            }
            let done = |restored| {
                if failed_closed {
                    Restored::ImageChanged
                } else {
                    restored
                }
            };
            let Some(live) = live else {
                activate(kernel, instance, name, &plan.targets)?;
                return Ok(done(Restored::Created));
            };
            let table = kernel.dm_table(name)?;
            if live.active_table && !live.suspended && !live.inactive_table && table == plan.targets
            {
                ensure_stats(kernel, name, &plan.targets);
                return Ok(done(Restored::Unchanged));
            }
            if live.active_table && table == plan.targets {
                // Only an interrupted swap to the same table: drop it and resume.
                if live.inactive_table {
                    kernel.dm_clear(name)?;
                }
                kernel.dm_resume(name)?;
            } else {
                swap(kernel, name, &plan.targets)?;
            }
            ensure_stats(kernel, name, &plan.targets);
            Ok(done(Restored::Repaired))
        }
    }
}

/// Saves `record` as `image-changed` for `images` (added to those found before), logged at
/// ERROR the first time each is found.
fn mark_changed(catalog: &Catalog, record: &DeviceRecord, images: &[String]) -> Result<()> {
    let mut marked = record.clone();
    marked.state = DeviceState::ImageChanged;
    for image in images {
        if !marked.changed.contains(image) {
            tracing::error!(
                device = %record.name,
                %image,
                "image changed since capture under a saved device: {}",
                match crate::policy::settings().policy {
                    crate::policy::Policy::FailClosed => "its extents are served as EIO",
                    crate::policy::Policy::Report => "the device is not restored over it",
                }
            );
            marked.changed.push(image.clone());
        }
    }
    if marked != *record {
        catalog.save_device(&marked)?;
    }
    Ok(())
}

/// Detaches loop devices over captured images that have no autoclear and that no device
/// uses: left by a crash of an older vmard between attaching and configuring one.
fn detach_leaked_loops(catalog: &Catalog, kernel: &dyn Kernel) -> Result<Vec<String>> {
    // Only what vmar itself attaches (read-only, buffered, whole image) and left without
    // autoclear: a loop device someone made otherwise over a captured image, e.g. writable
    // over a block device for partition mappings, is theirs. Most starts find none, and then
    // read no image record.
    let candidates: Vec<_> = kernel
        .loops()?
        .into_iter()
        .filter(|l| {
            l.read_only && !l.direct_io && l.offset == 0 && l.size_limit == 0 && !l.autoclear
        })
        .collect();
    if candidates.is_empty() {
        return Ok(Vec::new());
    }
    let images = catalog.images()?;
    let mut used = Vec::new();
    for name in kernel.dm_list()? {
        for t in kernel.dm_table(&name).unwrap_or_default() {
            if let Some((device, _)) = t.linear_source() {
                used.push(device.clone());
            }
        }
    }
    let mut detached = Vec::new();
    for l in candidates {
        let ours = images.iter().any(|i| l.backs(&i.path, &i.identity));
        if ours && !used.contains(&l.block_dev()) {
            match kernel.loop_detach(&l) {
                Ok(()) => detached.push(l.node.display().to_string()),
                Err(e) => tracing::warn!("cannot detach leaked {}: {e}", l.node.display()),
            }
        }
    }
    Ok(detached)
}

/// Swaps the current map of a live device's image in, atomically.
pub fn refresh(
    catalog: &Catalog,
    kernel: &dyn Kernel,
    instance: &InstanceId,
    name: &DeviceName,
    max_targets: u64,
) -> Result<DeviceChange> {
    let started = std::time::Instant::now();
    let record = catalog
        .device(name)?
        .filter(|r| matches!(r.state, DeviceState::Active | DeviceState::ImageChanged))
        .ok_or_else(|| Error::UnknownDevice {
            name: name.to_string(),
        })?;
    let Some(live) = kernel.dm_info(name)? else {
        return Err(Error::UnknownDevice {
            name: name.to_string(),
        });
    };
    claim(&live, instance, true)?;
    // An image-changed device is served again only when every image it reads is as captured.
    let plan = plan(catalog, kernel, &record.image, max_targets)?;
    swap(kernel, name, &plan.targets)?;
    if record.state == DeviceState::ImageChanged {
        let mut active = record.clone();
        active.state = DeviceState::Active;
        active.changed.clear();
        catalog.save_device(&active)?;
    }
    ensure_stats(kernel, name, &plan.targets);
    let status = status_of(catalog, kernel, instance, name, max_targets, Some(&plan))?;
    Ok(change(&plan, status, started))
}

/// Removes device `name` from the kernel and the catalog. An open device is refused unless
/// `deferred`, which removes it at its last close.
pub fn remove(
    catalog: &Catalog,
    kernel: &dyn Kernel,
    instance: &InstanceId,
    name: &DeviceName,
    deferred: bool,
) -> Result<Removed> {
    let mut live = kernel.dm_info(name)?;
    let record = catalog.device(name)?;
    if live.is_none() && record.is_none() {
        return Err(Error::UnknownDevice {
            name: name.to_string(),
        });
    }
    // Another state dir's device is its vmard's to remove: only this one's record of the
    // name goes. An unsaved one of an older vmar may be removed by anyone (cleaning up after
    // an upgrade).
    if let Some(l) = &live
        && !matches!(l.maker(), Maker::OldVmar)
        && let Err(e) = claim(l, instance, true)
    {
        if record.is_none() {
            return Err(e);
        }
        live = None;
    }
    let open = live.as_ref().map_or(0, |l| l.open_count);
    if open > 0 && !deferred {
        return Err(Error::DeviceBusy {
            name: name.to_string(),
            open_count: open,
        });
    }
    let defer = open > 0;
    if let Some(record) = &record {
        let mut marked = record.clone();
        marked.state = if defer {
            DeviceState::RemovingDeferred
        } else {
            DeviceState::Removing
        };
        catalog.save_device(&marked)?;
    }
    if live.is_some() {
        match kernel.dm_remove(name, defer) {
            Ok(()) => {}
            Err(e) => {
                // Opened meanwhile (or another failure): it stays, and so does its record.
                if let Some(record) = &record {
                    catalog.save_device(record)?;
                }
                return Err(e);
            }
        }
    }
    let gone = live.is_none() || kernel.dm_info(name)?.is_none();
    if gone {
        catalog.forget_device(name)?;
    }
    Ok(Removed {
        name: name.to_string(),
        deferred: !gone,
        was_live: live.is_some(),
    })
}

/// Drops the records of deferred removals whose device has gone since.
pub fn prune(catalog: &Catalog, kernel: &dyn Kernel) -> Result<()> {
    for record in catalog.devices()? {
        if record.state == DeviceState::RemovingDeferred && kernel.dm_info(&record.name)?.is_none()
        {
            catalog.forget_device(&record.name)?;
        }
    }
    Ok(())
}

/// Saved and live devices, by name.
pub fn list(
    catalog: &Catalog,
    kernel: &dyn Kernel,
    instance: &InstanceId,
    max_targets: u64,
) -> Result<Vec<DeviceStatus>> {
    let mut names: Vec<String> = catalog.devices()?.into_iter().map(|d| d.name).collect();
    names.extend(kernel.dm_list()?);
    names.sort();
    names.dedup();
    let mut out = Vec::new();
    for name in names {
        let status = status_of(catalog, kernel, instance, &name, max_targets, None)?;
        if status.state != "gone" {
            out.push(status);
        }
    }
    Ok(out)
}

/// Status of one device; with `table`, its live table too.
pub fn status(
    catalog: &Catalog,
    kernel: &dyn Kernel,
    instance: &InstanceId,
    name: &DeviceName,
    max_targets: u64,
    table: bool,
) -> Result<DeviceStatus> {
    let mut status = status_of(catalog, kernel, instance, name, max_targets, None)?;
    if status.state == "gone" || (status.image.is_none() && status.live.is_none()) {
        return Err(Error::UnknownDevice {
            name: name.to_string(),
        });
    }
    if table && status.live.is_some() {
        status.table = Some(kernel.dm_table(name)?);
    }
    Ok(status)
}

pub(crate) fn status_of(
    catalog: &Catalog,
    kernel: &dyn Kernel,
    instance: &InstanceId,
    name: &str,
    max_targets: u64,
    planned: Option<&Plan>,
) -> Result<DeviceStatus> {
    let saved = catalog.device(name)?;
    let live = kernel.dm_info(name)?;
    let table = match &live {
        Some(l) if l.active_table => kernel.dm_table(name)?,
        _ => Vec::new(),
    };
    let state = match (&saved, &live) {
        (None, Some(l)) if l.deferred_remove => "removing",
        (None, Some(_)) => "unmanaged",
        // Saved here, but the live device of that name is another state dir's (or not vmar's).
        (Some(_), Some(l)) if claim(l, instance, true).is_err() => "foreign",
        (None, None) => "gone",
        (Some(r), _) if r.state == DeviceState::Creating => "creating",
        (Some(_), Some(l)) if l.deferred_remove => "removing",
        (Some(r), Some(_))
            if matches!(
                r.state,
                DeviceState::Removing | DeviceState::RemovingDeferred
            ) =>
        {
            "removing"
        }
        (Some(r), None) if r.state != DeviceState::Active => "gone",
        (Some(r), None) if r.state == DeviceState::ImageChanged => "image-changed",
        (Some(_), None) => "missing",
        (Some(_), Some(l)) if l.suspended => "suspended",
        (Some(_), Some(l)) if !l.active_table => "no-table",
        (Some(r), _) if r.state == DeviceState::ImageChanged => "image-changed",
        (Some(r), Some(_)) => {
            let want = match planned {
                Some(plan) => Some(plan.targets.clone()),
                None => expected(catalog, kernel, &r.image, max_targets).unwrap_or(None),
            };
            if want.as_deref() == Some(table.as_slice()) {
                "active"
            } else {
                "differs"
            }
        }
    };
    let mut target_types = BTreeMap::new();
    let mut reads_from = Vec::new();
    for target in &table {
        *target_types
            .entry(target.target_type().to_string())
            .or_insert(0) += 1;
        if let Some((device, _)) = target.linear_source() {
            let device = device.to_string();
            if !reads_from.contains(&device) {
                reads_from.push(device);
            }
        }
    }
    reads_from.sort();
    // A change just planned knows its cost; only a status query works it out again.
    let budget = match (&saved, planned) {
        (_, Some(plan)) => Some(plan.cost),
        (Some(record), None) => match catalog.map(&record.image) {
            Ok((_, map)) => Some(budget::fit(&map, max_targets).1),
            Err(_) => None,
        },
        (None, None) => None,
    };
    let changed_images = saved
        .as_ref()
        .map(|s| s.changed.clone())
        .unwrap_or_default();
    Ok(DeviceStatus {
        name: name.to_string(),
        changed_images,
        image: saved.map(|s| s.image),
        state: state.to_string(),
        reason: None,
        node: node_path(name).display().to_string(),
        live,
        target_types,
        reads_from,
        budget,
        table: None,
    })
}

/// Resolves what `vmarctl create` names as the image: a captured image's name, or the path
/// of a captured image file. A path is matched against the catalog as given and, only if it
/// lies inside an image root, as resolved: a client learns nothing about paths elsewhere.
pub fn image_name(
    catalog: &Catalog,
    roots: &crate::roots::ImageRoots,
    reference: &str,
) -> Result<String> {
    let unknown = || Error::UnknownImage {
        name: crate::error::shorten(reference),
    };
    if reference.starts_with('/') {
        let path = Path::new(reference);
        if let Some(image) = catalog.image_at(path)? {
            return Ok(image.name);
        }
        if !roots.contains_lexically(path) {
            return Err(unknown());
        }
        let resolved = path.canonicalize().map_err(|_| unknown())?;
        return catalog
            .image_at(&resolved)?
            .map(|i| i.name)
            .ok_or_else(unknown);
    }
    catalog.image(&ImageName::new(reference)?).map(|i| i.name)
}

/// Read statistics, target counts and page-cache sharing of device `name`, or of all live
/// devices.
pub fn stats(
    catalog: &Catalog,
    kernel: &dyn Kernel,
    name: Option<&DeviceName>,
) -> Result<StatsReport> {
    let names: Vec<String> = match name {
        Some(name) => {
            if kernel.dm_info(name)?.is_none() {
                return Err(Error::UnknownDevice {
                    name: name.to_string(),
                });
            }
            vec![name.to_string()]
        }
        None => kernel.dm_list()?,
    };
    let loops = kernel.loops()?;
    let captured = catalog.images()?;
    let mut images: BTreeMap<BlockDev, (ImageCache, crate::kernel::Residency)> = BTreeMap::new();
    let mut report = StatsReport {
        devices: Vec::new(),
        images: Vec::new(),
        targets: TargetCounts::default(),
        mapped: ClassBytes::default(),
        read: ReadBytes::default(),
        sharing_factor: None,
    };
    let mut visible = 0;
    for name in names {
        let table = kernel.dm_table(&name)?;
        for (source, _) in table.iter().filter_map(Target::linear_source) {
            if images.contains_key(source) {
                continue;
            }
            // A device that is not a loop device has no image file whose cache could be
            // counted; its reads are still counted.
            let Some(l) = loops.iter().find(|l| l.block_dev() == *source) else {
                continue;
            };
            // The catalog's name of the file: the kernel's may be from another mount
            // namespace (vmard's under systemd).
            let known = captured
                .iter()
                .find(|i| l.backs(&i.path, &i.identity))
                .map(|i| crate::holds::current_path(catalog, i));
            let Some(path) = known.or_else(|| l.backing.clone()) else {
                continue;
            };
            let path = &path;
            match image_cache(kernel, source, path) {
                Ok(cache) => {
                    images.insert(source.clone(), cache);
                }
                Err(e) => tracing::warn!("{name}: no page-cache figures for {source}: {e}"),
            }
        }
        let image = catalog.device(&name)?.map(|d| d.image);
        // Its own image's loop device, found by file identity: whether the page-cache figures
        // could be had or not, own extents are told from redirected ones.
        let own = match &image {
            Some(image) => {
                let record = catalog.image(image)?;
                loops
                    .iter()
                    .find(|l| l.backs(&record.path, &record.identity))
                    .map(LoopInfo::block_dev)
            }
            None => None,
        };
        let mapped = stats::classify(&table, own.as_ref());
        let mut cached = 0;
        for m in &mapped {
            if let Some((device, offset)) = &m.source
                && let Some((_, residency)) = images.get(device)
            {
                cached += stats::resident_bytes(
                    &residency.pages,
                    residency.page_size,
                    offset.bytes(),
                    m.len.bytes(),
                );
            }
        }
        let sectors = table.last().map_or(Sectors(0), Target::end);
        let region = stats_region(kernel, &name, sectors)?;
        let read = stats::attribute(&mapped, &kernel.stats_areas(&name, region.id)?);
        let device = DeviceStats {
            name,
            image,
            targets: TargetCounts::of(&mapped),
            mapped: stats::layout(&mapped),
            read,
            cached,
        };
        report.targets.accumulate(&device.targets);
        report.mapped.accumulate(&device.mapped);
        report.read.accumulate(&device.read);
        visible += cached;
        report.devices.push(device);
    }
    report.images = images.into_values().map(|(cache, _)| cache).collect();
    let cached: u64 = report.images.iter().map(|i| i.cached).sum();
    report.sharing_factor = stats::sharing_factor(visible, cached);
    Ok(report)
}

/// Size of the image at `path`: a block device's is its device size (`st_size` is 0).
fn file_size(path: &Path) -> Result<u64> {
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::FileTypeExt;
    let meta = std::fs::metadata(path).map_err(|e| Error::io("cannot stat", path, e))?;
    if !meta.file_type().is_block_device() {
        return Ok(meta.len());
    }
    std::fs::File::open(path)
        .and_then(|mut f| f.seek(SeekFrom::End(0)))
        .map_err(|e| Error::io("cannot size", path, e))
}

/// The page-cache residency of image `path` (a file, or a block device whose own page cache
/// a buffered loop device reads through), read through loop device `device`.
fn image_cache(
    kernel: &dyn Kernel,
    device: &BlockDev,
    path: &Path,
) -> Result<(ImageCache, crate::kernel::Residency)> {
    let size = file_size(path)?;
    let residency = kernel.residency(path, size)?;
    Ok((
        ImageCache {
            cached: residency.cached_bytes(),
            path: path.display().to_string(),
            loop_device: device.to_string(),
            size,
        },
        residency,
    ))
}
