//! Device names bound to content. A qcow2 overlay or a libvirt domain names its backing disk
//! by path, `/dev/vmar/NAME`, and keeps reading whatever is there: if NAME came back serving
//! another image, every overlay over it would silently read other bytes. So a name remembers
//! the content (fingerprint) it served, also after the device is removed, and `create` and
//! `ensure` refuse to serve other content under it unless asked to re-bind.
//!
//! `ensure` is the idempotent create hooks and scripts need (as `lvchange -ay`): it succeeds
//! when NAME already serves that content, creates it when it is missing, and refuses when it
//! serves other content. The caller serialises device changes, as for [`device::create`].

use crate::catalog::{Catalog, DeviceState, ImageRecord, NameBinding};
use crate::device;
use crate::error::{Error, Result};
use crate::instance::InstanceId;
use crate::kernel::Kernel;
use crate::name::DeviceName;
use crate::protocol::{Binding, Bindings, DeviceChange, EnsureResult};
use crate::time::now_secs;

/// Whether `image` has the content `binding` remembers: the same fingerprint, or, for
/// images captured before fingerprints, the same image.
pub fn same_content(binding: &NameBinding, image: &ImageRecord) -> bool {
    match (&binding.fingerprint, &image.fingerprint) {
        (Some(bound), Some(now)) => bound == now,
        _ => binding.image == image.name,
    }
}

/// Every name binding, with whether its device is saved and its content still captured.
pub fn list(catalog: &Catalog) -> Result<Bindings> {
    let images = catalog.images()?;
    let bindings = catalog
        .name_bindings()?
        .into_iter()
        .map(|b| {
            Ok(Binding {
                node: crate::kernel::node_path(&b.name).display().to_string(),
                device: catalog.device(&b.name)?.is_some(),
                servable: images.iter().any(|image| same_content(&b, image)),
                name: b.name,
                image: b.image,
                fingerprint: b.fingerprint,
                bound_at: b.bound_at,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Bindings { bindings })
}

/// Refuses `image` under a name bound to other content.
pub fn check(binding: Option<&NameBinding>, image: &ImageRecord) -> Result<()> {
    match binding {
        Some(b) if !same_content(b, image) => Err(Error::NameBound {
            name: b.name.clone(),
            bound_image: b.image.clone(),
            bound_fingerprint: b.fingerprint.clone(),
            image: image.name.clone(),
            fingerprint: image.fingerprint.clone(),
        }),
        _ => Ok(()),
    }
}

fn binding_of(name: &str, image: &ImageRecord) -> NameBinding {
    NameBinding {
        name: name.to_string(),
        image: image.name.clone(),
        fingerprint: image.fingerprint.clone(),
        bound_at: now_secs(),
    }
}

/// What `name` is bound to: its saved binding, else (a device saved before bindings
/// existed) the image its device record serves.
pub fn binding(catalog: &Catalog, name: &str) -> Result<Option<NameBinding>> {
    if let Some(b) = catalog.name_binding(name)? {
        return Ok(Some(b));
    }
    let Some(device) = catalog.device(name)? else {
        return Ok(None);
    };
    Ok(catalog
        .image(&device.image)
        .ok()
        .map(|image| binding_of(name, &image)))
}

/// Saves `name`'s binding to `image` unless it is already that.
fn bind(catalog: &Catalog, name: &str, image: &ImageRecord) -> Result<()> {
    let current = catalog.name_binding(name)?;
    if current.is_some_and(|b| b.image == image.name && b.fingerprint == image.fingerprint) {
        return Ok(());
    }
    catalog.bind_name(&binding_of(name, image))
}

/// The image `ensure NAME` serves when none is named: the image the name is bound to (by
/// name, or any image with its fingerprint if that one was forgotten and captured again
/// under another name), else the image called NAME (as Nova's `_base/HASH` is captured).
pub fn default_image(catalog: &Catalog, name: &str) -> Result<String> {
    let Some(bound) = binding(catalog, name)? else {
        return Ok(name.to_string());
    };
    if let Ok(image) = catalog.image(&bound.image)
        && same_content(&bound, &image)
    {
        return Ok(image.name);
    }
    if bound.fingerprint.is_some()
        && let Some(image) = catalog
            .images()?
            .into_iter()
            .find(|i| i.fingerprint == bound.fingerprint)
    {
        return Ok(image.name);
    }
    // Nothing has that content now: name the bound image, which `check` refuses with both
    // fingerprints, or which is unknown.
    Ok(bound.image)
}

/// Creates device `name` serving captured image `image`, refusing other content than the
/// name served before unless `rebind`; then remembers the content.
pub fn create(
    catalog: &Catalog,
    kernel: &dyn Kernel,
    instance: &InstanceId,
    name: &DeviceName,
    image: &str,
    max_targets: u64,
    rebind: bool,
) -> Result<DeviceChange> {
    let record = catalog.image(image)?;
    if !rebind {
        check(binding(catalog, name)?.as_ref(), &record)?;
    }
    let change = device::create(catalog, kernel, instance, name, &record.name, max_targets)?;
    bind(catalog, name, &record)?;
    Ok(change)
}

/// Makes sure device `name` serves `image` (default: [`default_image`]): nothing to do when
/// it already serves that content, created when missing, refused when it serves, or the
/// name was bound to, other content (unless `rebind`, which never replaces a live device).
pub fn ensure(
    catalog: &Catalog,
    kernel: &dyn Kernel,
    instance: &InstanceId,
    name: &DeviceName,
    image: Option<&str>,
    max_targets: u64,
    rebind: bool,
) -> Result<EnsureResult> {
    let image = match image {
        Some(image) => image.to_string(),
        None => default_image(catalog, name)?,
    };
    let wanted = catalog.image(&image)?;
    let result = |created: bool, device| EnsureResult {
        created,
        image: wanted.name.clone(),
        fingerprint: wanted.fingerprint.clone(),
        device,
    };
    if let Some(saved) = catalog.device(name)? {
        let live = kernel.dm_info(name)?;
        match (saved.state, live) {
            (DeviceState::Active, Some(_)) => {
                // It serves a captured image (forget refuses one a device reads).
                let served = catalog.image(&saved.image)?;
                check(Some(&binding_of(name, &served)), &wanted)?;
                bind(catalog, name, &served)?;
                let status = device::status(catalog, kernel, instance, name, max_targets, false)?;
                return Ok(result(false, status));
            }
            (DeviceState::ImageChanged, Some(_)) => {
                // It fails closed: an image it reads was written after capture. Never report
                // it as ready; name the image to re-capture.
                let served = catalog.image(&saved.image)?;
                check(Some(&binding_of(name, &served)), &wanted)?;
                let changed = saved.changed.first().cloned().unwrap_or(served.name);
                let changed = catalog.image(&changed)?;
                return Err(Error::ImageChanged {
                    name: changed.name,
                    path: changed.path,
                    what: format!("device {name:?} reads it and fails closed"),
                });
            }
            (DeviceState::RemovingDeferred | DeviceState::Removing, Some(_)) => {
                return Err(Error::Busy(format!(
                    "device {name:?} is being removed (deferred to its last close): a VM still \
                     has it open"
                )));
            }
            (DeviceState::Creating, Some(_)) => {
                return Err(Error::DeviceExists {
                    name: name.to_string(),
                });
            }
            (_, None) => {
                // Saved but not in the kernel (a restore that failed, an interrupted step):
                // what start-up would do is create it again, so drop the stale record.
                catalog.forget_device(name)?;
            }
        }
    }
    let change = create(
        catalog,
        kernel,
        instance,
        name,
        &wanted.name,
        max_targets,
        rebind,
    )?;
    Ok(result(true, change.device))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::ImageFile;

    fn captured(catalog: &Catalog, path: &std::path::Path, fill: u8) -> ImageRecord {
        std::fs::write(path, vec![fill; 8192]).unwrap();
        let file = ImageFile::open(path).unwrap();
        catalog.capture(&file, None, false, &mut |_| {}).unwrap().0
    }

    #[test]
    fn content_decides_not_the_image_name() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::open(&dir.path().join("state")).unwrap();
        let a = captured(&catalog, &dir.path().join("a.raw"), 1);
        let same = captured(&catalog, &dir.path().join("same.raw"), 1);
        let other = captured(&catalog, &dir.path().join("other.raw"), 2);
        let bound = binding_of("vm", &a);
        assert!(check(Some(&bound), &a).is_ok());
        assert!(check(Some(&bound), &same).is_ok());
        assert_eq!(
            check(Some(&bound), &other).unwrap_err().kind(),
            "name-bound"
        );
        assert!(check(None, &other).is_ok());
        // Without fingerprints (old records) only the same image is the same content.
        let old = NameBinding {
            fingerprint: None,
            ..bound.clone()
        };
        let mut same_old = same.clone();
        same_old.fingerprint = None;
        assert!(check(Some(&old), &same_old).is_err());
        assert!(check(Some(&old), &a).is_ok());
    }

    #[test]
    fn bindings_survive_in_the_backup_and_a_recovery() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let catalog = Catalog::open(&state).unwrap();
        let a = captured(&catalog, &dir.path().join("a.raw"), 1);
        bind(&catalog, "vm", &a).unwrap();
        assert_eq!(crate::backup::read(&state).unwrap().names.len(), 1);
        drop(catalog);
        let (catalog, _) = Catalog::recover(&state).unwrap();
        let b = catalog.name_binding("vm").unwrap().unwrap();
        assert_eq!((b.image.as_str(), &b.fingerprint), ("a", &a.fingerprint));
        assert_eq!(catalog.name_bindings().unwrap(), [b]);
    }
}
