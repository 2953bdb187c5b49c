//! The catalog's backup outside redb (see [`crate::backup`]), and the recovery of a lost
//! catalog from it.

use super::*;
use crate::backup::Change;

/// Journal lines the backup takes before its snapshot is rewritten, at least: the snapshot
/// is rewritten when the journal has as many lines as it has records, so a change costs O(1)
/// amortised.
const JOURNAL_MIN: usize = 64;

/// Where the backup stands: the last change's number, the journal's lines, and the records
/// the snapshot holds.
#[derive(Clone, Copy, Debug)]
pub(super) struct BackupPosition {
    seq: u64,
    lines: usize,
    snapshot_records: usize,
}

/// What [`Catalog::recover`] brought back.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Recovery {
    pub images: Vec<String>,
    /// Images that could not be captured again, with the reason.
    pub skipped: Vec<(String, String)>,
    pub devices: Vec<String>,
}

impl Catalog {
    /// Records `changes` in the backup (see [`crate::backup`]): one appended journal line
    /// each, or a new snapshot of every record when the journal has grown to the snapshot's
    /// size (and at the first change after start). A failure is logged, and the next change
    /// writes a snapshot: the change itself is committed.
    pub(super) fn write_backup(&self, changes: Vec<Change>) {
        let started = std::time::Instant::now();
        let Ok(mut position) = self.backup.lock() else {
            return;
        };
        let written = match *position {
            Some(at) if at.lines < at.snapshot_records.max(JOURNAL_MIN) => {
                crate::backup::append(&self.dir, at.seq + 1, &changes).map(|()| BackupPosition {
                    seq: at.seq + changes.len() as u64,
                    lines: at.lines + changes.len(),
                    snapshot_records: at.snapshot_records,
                })
            }
            _ => self.write_snapshot(position.map(|at| at.seq), changes.len()),
        };
        *position = match written {
            Ok(at) => Some(at),
            Err(e) => {
                tracing::warn!("cannot write the catalog backup: {e}");
                None
            }
        };
        tracing::debug!(took = ?started.elapsed(), "backup written");
    }

    fn write_snapshot(&self, seq: Option<u64>, changes: usize) -> Result<BackupPosition> {
        let seq = seq.unwrap_or_else(|| crate::backup::last_seq(&self.dir)) + changes as u64;
        let backup = crate::backup::Backup {
            images: self.images()?,
            devices: self.devices()?,
            names: self.name_bindings()?,
            seq,
        };
        crate::backup::write(&self.dir, &backup)?;
        Ok(BackupPosition {
            seq,
            lines: 0,
            snapshot_records: backup.images.len() + backup.devices.len() + backup.names.len(),
        })
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
            if matches!(
                device.state,
                DeviceState::Active | DeviceState::ImageChanged
            ) && recovery.images.contains(&device.image)
            {
                catalog.save_device(&device)?;
                recovery.devices.push(device.name);
            }
        }
        for binding in &backup.names {
            catalog.bind_name(binding)?;
        }
        Ok((catalog, recovery))
    }
}
