//! The kernel steps every device change is made of: whose device this vmard may change,
//! activating a new device, swapping a table into a live one (never leaving it suspended),
//! and its dm-stats region.

use crate::error::{Error, Result};
use crate::instance::InstanceId;
use crate::kernel::{Kernel, LiveDevice, Maker, device_uuid};
use crate::stats::{self, STATS_PROGRAM};
use crate::table::Target;
use crate::units::Sectors;

/// Whether this state dir's vmard may change live device `live`: one it made, or one an
/// older vmar made (`VMAR-NAME`) that its catalog records. Another state dir's device, or
/// one vmar did not make, is refused whatever its name.
pub(super) fn claim(live: &LiveDevice, instance: &InstanceId, recorded: bool) -> Result<()> {
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
pub(super) fn activate(
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
pub(super) fn ensure_stats(kernel: &dyn Kernel, name: &str, targets: &[Target]) {
    let sectors = targets.last().map_or(Sectors(0), Target::end);
    if let Err(e) = stats_region(kernel, name, sectors) {
        tracing::warn!("{name}: no read statistics: {e}");
    }
}

/// vmar's dm-stats region of `name` (created if missing), over `sectors`.
pub(super) fn stats_region(
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
