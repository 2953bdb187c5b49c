//! `create`: a new device serving a captured image, recorded before the kernel is changed;
//! and what `create` names as its image.

use std::path::Path;

use super::plan::{change, plan};
use super::status::status_of;
use super::steps::activate;
use crate::catalog::{Catalog, DeviceRecord, DeviceState};
use crate::error::{Error, Result};
use crate::instance::InstanceId;
use crate::kernel::Kernel;
use crate::name::{DeviceName, ImageName};
use crate::protocol::DeviceChange;
use crate::time::now_secs;

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
