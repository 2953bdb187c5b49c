//! `list` and `status`: each device's state, from its record and the kernel.

use std::collections::BTreeMap;

use super::plan::{Plan, expected};
use super::steps::claim;
use crate::budget;
use crate::catalog::{Catalog, DeviceState};
use crate::error::{Error, Result};
use crate::instance::InstanceId;
use crate::kernel::{Kernel, LiveDevice, node_path};
use crate::name::DeviceName;
use crate::protocol::{DeviceStatus, LiveInfo};

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
        live: live.map(live_info),
        target_types,
        reads_from,
        budget,
        table: None,
    })
}

/// The kernel seam's view of a device as `status` reports it on the wire.
fn live_info(live: LiveDevice) -> LiveInfo {
    let LiveDevice {
        name,
        dm_name,
        uuid,
        major,
        minor,
        open_count,
        read_only,
        suspended,
        active_table,
        inactive_table,
        deferred_remove,
        targets,
    } = live;
    LiveInfo {
        name,
        dm_name,
        uuid,
        major,
        minor,
        open_count,
        read_only,
        suspended,
        active_table,
        inactive_table,
        deferred_remove,
        targets,
    }
}
