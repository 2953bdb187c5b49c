//! `refresh`: the current map of a live device's image swapped in, atomically.

use super::plan::{change, plan};
use super::status::status_of;
use super::steps::{claim, ensure_stats, swap};
use crate::catalog::{Catalog, DeviceState};
use crate::error::{Error, Result};
use crate::instance::InstanceId;
use crate::kernel::Kernel;
use crate::name::DeviceName;
use crate::protocol::DeviceChange;

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
