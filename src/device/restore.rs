//! `restore` at vmard's start (and `retry` of the devices it could not serve): the kernel
//! brought in line with the saved devices, finishing or undoing what a crash interrupted.

use super::plan::plan_with;
use super::steps::{activate, claim, ensure_stats, swap};
use crate::catalog::{Catalog, DeviceRecord, DeviceState};
use crate::error::{Error, Result};
use crate::instance::InstanceId;
use crate::kernel::{Kernel, Maker};
use crate::protocol::RestoreReport;

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

/// Restore on the in-memory kernel, after what a killed (or rebooted) vmard leaves: each
/// test builds the kernel and catalog state directly, runs [`restore`] as the next start
/// does, and checks its report and what every device serves.
#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::image::ImageFile;
    use crate::kernel::sim::SimKernel;
    use crate::name::DeviceName;

    const BLOCK: usize = 4096;

    /// A state dir with images base and web (web shares base's first two blocks), captured,
    /// and a device of each, named as its image.
    struct Host {
        dir: tempfile::TempDir,
        catalog: Catalog,
        kernel: SimKernel,
        instance: InstanceId,
    }

    fn block(seed: u8) -> Vec<u8> {
        (0..=250u8)
            .cycle()
            .take(BLOCK)
            .map(|b| seed.wrapping_add(b))
            .collect()
    }

    fn host() -> Host {
        let dir = tempfile::tempdir().unwrap();
        let base = [block(1), block(2), vec![0; BLOCK], block(3)].concat();
        let web = [block(1), block(2), block(9), vec![0; BLOCK]].concat();
        let catalog = Catalog::open(&dir.path().join("state")).unwrap();
        for (name, bytes) in [("base", &base), ("web", &web)] {
            let path = dir.path().join(format!("{name}.raw"));
            std::fs::write(&path, bytes).unwrap();
            let file = ImageFile::open(&path).unwrap();
            catalog.capture(&file, None, false, &mut |_| {}).unwrap();
        }
        let kernel = SimKernel::open(&dir.path().join("kernel")).unwrap();
        let instance = InstanceId::parse("0123456789abcdef").unwrap();
        for name in ["base", "web"] {
            let device = DeviceName::new(name).unwrap();
            crate::device::create(&catalog, &kernel, &instance, &device, name, 1000).unwrap();
        }
        Host {
            dir,
            catalog,
            kernel,
            instance,
        }
    }

    impl Host {
        fn image(&self, name: &str) -> PathBuf {
            self.dir.path().join(format!("{name}.raw"))
        }

        fn restore(&self) -> RestoreReport {
            restore(&self.catalog, &self.kernel, &self.instance, 1000).unwrap()
        }

        /// Every live device serves its image byte for byte, and none is suspended.
        fn serves(&self, names: &[&str]) {
            let state = self.kernel.state().unwrap();
            let live: Vec<&str> = state.devices.keys().map(String::as_str).collect();
            assert_eq!(live, names, "live devices");
            for name in names {
                assert!(!state.devices[*name].suspended, "{name} left suspended");
                assert!(
                    state.devices[*name].inactive.is_none(),
                    "{name}: inactive table"
                );
                let want = std::fs::read(self.image(name)).unwrap();
                assert!(
                    self.kernel.read_device(name).unwrap() == want,
                    "{name} does not serve its image"
                );
            }
        }

        fn record(&self, name: &str) -> Option<DeviceRecord> {
            self.catalog.device(name).unwrap()
        }
    }

    fn names(list: &[String]) -> Vec<&str> {
        list.iter().map(String::as_str).collect()
    }

    #[test]
    fn devices_present_and_correct_are_left_alone() {
        let host = host();
        let report = host.restore();
        assert_eq!(names(&report.unchanged), ["base", "web"], "{report:?}");
        assert!(
            report.created.is_empty() && report.repaired.is_empty(),
            "{report:?}"
        );
        assert!(report.failed.is_empty(), "{report:?}");
        host.serves(&["base", "web"]);
    }

    #[test]
    fn missing_devices_are_created_as_after_a_reboot() {
        let host = host();
        host.kernel.dm_remove("web", false).unwrap();
        host.kernel.dm_remove("base", false).unwrap();
        let report = host.restore();
        assert_eq!(names(&report.created), ["base", "web"], "{report:?}");
        host.serves(&["base", "web"]);
        // And a second restore finds nothing to do.
        let again = host.restore();
        assert_eq!(names(&again.unchanged), ["base", "web"], "{again:?}");
    }

    #[test]
    fn a_stale_table_is_replaced_and_an_interrupted_swap_resumed() {
        let host = host();
        // web serves a table that is not its image's map (killed between a swap's steps of
        // another vmard version, or an older map): one target short.
        let mut stale = host.kernel.dm_table("web").unwrap();
        stale.pop();
        host.kernel.dm_load("web", &stale).unwrap();
        host.kernel.dm_suspend("web").unwrap();
        host.kernel.dm_resume("web").unwrap();
        assert_eq!(host.kernel.dm_table("web").unwrap(), stale);
        // base was killed mid-swap: suspended with its own table waiting.
        let table = host.kernel.dm_table("base").unwrap();
        host.kernel.dm_load("base", &table).unwrap();
        host.kernel.dm_suspend("base").unwrap();
        let report = host.restore();
        assert_eq!(names(&report.repaired), ["base", "web"], "{report:?}");
        host.serves(&["base", "web"]);
    }

    #[test]
    fn interrupted_creates_and_removals_are_undone_or_finished() {
        let host = host();
        // A create killed after its device was made, before it was marked done.
        let mut creating = host.record("web").unwrap();
        creating.state = DeviceState::Creating;
        host.catalog.save_device(&creating).unwrap();
        // A removal killed after it was recorded, before the kernel removed the device.
        let mut removing = host.record("base").unwrap();
        removing.state = DeviceState::Removing;
        host.catalog.save_device(&removing).unwrap();
        // Leftovers without a record: this state dir's (removed), another's (left alone).
        let ours = crate::kernel::device_uuid(&host.instance, "stray");
        host.kernel.dm_create("stray", &ours).unwrap();
        let other = InstanceId::parse("fedcba9876543210").unwrap();
        let theirs = crate::kernel::device_uuid(&other, "theirs");
        host.kernel.dm_create("theirs", &theirs).unwrap();
        let report = host.restore();
        assert_eq!(names(&report.rolled_back), ["web"], "{report:?}");
        assert_eq!(names(&report.removed), ["base"], "{report:?}");
        assert_eq!(names(&report.cleaned), ["stray"], "{report:?}");
        assert!(host.record("web").is_none() && host.record("base").is_none());
        let live: Vec<String> = host.kernel.state().unwrap().devices.into_keys().collect();
        assert_eq!(live, ["theirs"]);
        // The loop devices went with the devices that used them.
        assert!(host.kernel.state().unwrap().loops.is_empty());
    }

    #[test]
    fn a_create_killed_while_the_device_was_already_open_is_finished() {
        let host = host();
        let mut creating = host.record("web").unwrap();
        creating.state = DeviceState::Creating;
        host.catalog.save_device(&creating).unwrap();
        host.kernel.open_device("web").unwrap();
        let report = host.restore();
        assert_eq!(names(&report.unchanged), ["base", "web"], "{report:?}");
        assert_eq!(host.record("web").unwrap().state, DeviceState::Active);
        host.kernel.close_device("web").unwrap();
        host.serves(&["base", "web"]);
    }

    /// The image file deleted while vmard was down, and no hold kept it: the device cannot
    /// be served, which restore says, keeping its record and never leaving it suspended; the
    /// other devices are restored.
    fn image_gone(device_present: bool) {
        let host = host();
        if device_present {
            host.kernel.dm_suspend("web").unwrap();
        } else {
            host.kernel.dm_remove("web", false).unwrap();
        }
        host.kernel.dm_remove("base", false).unwrap();
        std::fs::remove_file(host.image("web")).unwrap();
        let report = host.restore();
        assert_eq!(report.failed.len(), 1, "{report:?}");
        let (name, why) = &report.failed[0];
        assert_eq!(name, "web", "{report:?}");
        assert!(why.contains("web"), "the reason names the image: {why}");
        assert_eq!(names(&report.created), ["base"], "{report:?}");
        assert!(host.record("web").is_some(), "web's record went");
        let state = host.kernel.state().unwrap();
        assert_eq!(state.devices.contains_key("web"), device_present);
        if device_present {
            assert!(!state.devices["web"].suspended, "web left suspended");
        }
        assert!(
            host.kernel.read_device("base").unwrap() == std::fs::read(host.image("base")).unwrap()
        );
    }

    #[test]
    fn with_the_image_gone_a_present_device_is_resumed_and_reported() {
        image_gone(true);
    }

    #[test]
    fn with_the_image_gone_a_missing_device_is_reported_not_created() {
        image_gone(false);
    }

    #[test]
    fn a_leaked_loop_device_is_detached_and_one_in_use_kept() {
        let host = host();
        let leaked = host.kernel.plant_loop(&host.image("web"), false).unwrap();
        let report = host.restore();
        assert_eq!(report.detached.len(), 1, "{report:?}");
        let loops = host.kernel.state().unwrap().loops;
        assert!(!loops.contains_key(&leaked), "{loops:?}");
        assert!(
            !loops.is_empty(),
            "the devices' own loop devices were detached"
        );
        host.serves(&["base", "web"]);
    }

    #[test]
    fn retry_touches_only_the_devices_it_is_given() {
        let host = host();
        host.kernel.dm_remove("web", false).unwrap();
        host.kernel.dm_remove("base", false).unwrap();
        let report = retry(
            &host.catalog,
            &host.kernel,
            &host.instance,
            &["web".to_string()],
            1000,
        )
        .unwrap();
        assert_eq!(names(&report.created), ["web"], "{report:?}");
        let live: Vec<String> = host.kernel.state().unwrap().devices.into_keys().collect();
        assert_eq!(live, ["web"]);
    }
}
