//! The catalog's backup outside redb (see [`crate::backup`]), and the recovery of a lost
//! catalog from it.

use super::*;

/// What [`Catalog::recover`] brought back.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Recovery {
    pub images: Vec<String>,
    /// Images that could not be captured again, with the reason.
    pub skipped: Vec<(String, String)>,
    pub devices: Vec<String>,
}

impl Catalog {
    /// Rewrites the backup of the records (see [`crate::backup`]) after a change. A failure
    /// is logged: the change itself is committed.
    pub(super) fn write_backup(&self) {
        let started = std::time::Instant::now();
        let backup = self.images().and_then(|images| {
            Ok(crate::backup::Backup {
                images,
                devices: self.devices()?,
            })
        });
        if let Err(e) = backup.and_then(|b| crate::backup::write(&self.dir, &b)) {
            tracing::warn!("cannot write the catalog backup: {e}");
        }
        tracing::debug!(took = ?started.elapsed(), "backup written");
    }

    /// Rebuilds a lost or damaged catalog in `dir` from its backup: moves what is left aside
    /// (`*.broken-TIME`, nothing is deleted), captures the backed-up images again in their
    /// capture order (same maps), skipping any that changed or vanished, and saves their
    /// devices again. Returns the new catalog and what was recovered.
    pub fn recover(dir: &Path) -> Result<(Catalog, Recovery)> {
        let backup = crate::backup::read(dir)?;
        let stamp = crate::time::now_secs();
        for name in [CATALOG_FILE, INDEX_DIR] {
            let path = dir.join(name);
            if path.exists() {
                let aside = dir.join(format!("{name}.broken-{stamp}"));
                std::fs::rename(&path, &aside)
                    .map_err(|e| Error::io("cannot move aside", &path, e))?;
            }
        }
        let catalog = Catalog::open_with(dir, true)?;
        let mut recovery = Recovery::default();
        let mut images = backup.images;
        images.sort_by_key(|i| i.id);
        for image in images {
            let outcome = ImageFile::open(&image.path).and_then(|file| {
                if file.identity != image.identity {
                    return Err(Error::ImageChanged {
                        what: image.identity.describe_change(&file.identity),
                        name: image.name.clone(),
                        path: image.path.clone(),
                    });
                }
                catalog.capture(&file, Some(&image.name), false, &mut |_| {})
            });
            match outcome {
                Ok(_) => recovery.images.push(image.name),
                Err(e) => recovery.skipped.push((image.name, e.to_string())),
            }
        }
        for device in backup.devices {
            if device.state == DeviceState::Active && recovery.images.contains(&device.image) {
                catalog.save_device(&device)?;
                recovery.devices.push(device.name);
            }
        }
        Ok((catalog, recovery))
    }
}
