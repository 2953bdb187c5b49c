//! `remove`: a device out of the kernel and the catalog (deferred while open); `prune`.

use super::steps::claim;
use crate::catalog::{Catalog, DeviceState};
use crate::error::{Error, Result};
use crate::instance::InstanceId;
use crate::kernel::{Kernel, Maker};
use crate::name::DeviceName;
use crate::protocol::Removed;

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
