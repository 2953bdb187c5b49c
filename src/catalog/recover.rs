//! The catalog's backup outside redb (see [`crate::backup`]), and the recovery of a lost
//! catalog from it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::*;
use crate::backup::Change;

/// Written once a recovery has built its new catalog completely: names it and where the old
/// state goes. Its presence means "finish the swap" to every start.
pub const MARKER: &str = "recovery.json";
/// Prefix of the directory a recovery builds the new catalog in.
const STAGED_PREFIX: &str = "recovering-";
/// Prefix of the directory the old catalog, index and backup are moved to.
const ASIDE_PREFIX: &str = "broken-";
/// What a recovery swaps: the catalog, its index runs and its backup.
const SWAPPED: [&str; 3] = [CATALOG_FILE, INDEX_DIR, "backup"];

/// The content of [`MARKER`]: directory names inside the state dir.
#[derive(Debug, Serialize, Deserialize)]
struct Marker {
    staged: String,
    aside: String,
}

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

    /// Rebuilds a lost or damaged catalog in `dir` from its backup, as one transaction:
    ///
    /// 1. takes the state dir's lock (a running vmard makes it refuse, touching nothing);
    /// 2. builds the new catalog aside, in `recovering-*`: captures the backed-up images
    ///    again in their capture order (same maps), skipping any that changed or vanished,
    ///    saves their devices again, and writes its backup snapshot (all synced);
    /// 3. writes [`MARKER`], naming the new catalog and the `broken-*` directory for the old
    ///    state: from here on any start finishes the swap ([`finish_interrupted`]);
    /// 4. moves the old catalog, index and backup into `broken-*` and the new ones in (each a
    ///    rename, the directory synced), then removes the marker.
    ///
    /// A kill before step 3 leaves the state dir as it was (the next start refuses a lost
    /// catalog with what to do, as before); nothing is deleted but an unfinished
    /// `recovering-*` of an earlier attempt. Directory names are unique (created with
    /// O_EXCL semantics), so recoveries never overwrite what an earlier one set aside.
    pub fn recover(dir: &Path) -> Result<(Catalog, Recovery)> {
        let lock = StateLock::take(dir)?;
        finish_interrupted(dir)?;
        let backup = crate::backup::read(dir)?;
        remove_unfinished(dir)?;
        let staged = unique_dir(dir, STAGED_PREFIX)?;
        let staged_dir = dir.join(&staged);
        let recovery = {
            let catalog = Catalog::open_with(&staged_dir, true, StateLock::take(&staged_dir)?)?;
            let recovery = catalog.recapture_from(backup)?;
            // The new catalog's own backup, complete and synced before it replaces anything.
            let mut position = catalog.backup.lock().map_err(|_| {
                catalog.corrupt("an earlier change panicked; run the recovery again".into())
            })?;
            *position = Some(catalog.write_snapshot(None, 0)?);
            recovery
        };
        crate::index::sync_dir(&staged_dir)?;
        fault::point(fault::Step::RecoverStaged)?;
        let aside = unique_dir(dir, ASIDE_PREFIX)?;
        crate::index::sync_dir(dir)?;
        write_marker(dir, &Marker { staged, aside })?;
        fault::point(fault::Step::RecoverMarked)?;
        finish_interrupted(dir)?;
        let catalog = Catalog::open_with(dir, false, lock)?;
        Ok((catalog, recovery))
    }

    /// Captures the images of `backup` again, in their capture order, and saves the devices
    /// whose images came back.
    fn recapture_from(&self, backup: crate::backup::Backup) -> Result<Recovery> {
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
                self.capture(&file, Some(&image.name), false, &mut |_| {})
            });
            match outcome {
                Ok(_) => recovery.images.push(image.name),
                Err(e @ (Error::Injected { .. } | Error::ShuttingDown)) => return Err(e),
                Err(e) => recovery.skipped.push((image.name, e.to_string())),
            }
        }
        for device in backup.devices {
            if matches!(
                device.state,
                DeviceState::Active | DeviceState::ImageChanged
            ) && recovery.images.contains(&device.image)
            {
                self.save_device(&device)?;
                recovery.devices.push(device.name);
            }
        }
        for binding in &backup.names {
            self.bind_name(binding)?;
        }
        Ok(recovery)
    }
}

/// Finishes a recovery that was killed after it wrote [`MARKER`]: moves what is left of the
/// old state into the aside directory and the new catalog in, one rename at a time (each
/// step is redone or skipped on the next try), then removes the marker. Without a marker,
/// does nothing. Called with the state dir's lock held.
pub(super) fn finish_interrupted(dir: &Path) -> Result<()> {
    let marker_path = dir.join(MARKER);
    let text = match std::fs::read(&marker_path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            warn_unfinished(dir);
            return Ok(());
        }
        Err(e) => return Err(Error::io("cannot read", &marker_path, e)),
    };
    let refuse = |why: String| Error::Catalog {
        dir: dir.to_path_buf(),
        message: format!(
            "an interrupted `vmard --recover` cannot be finished: {why}. The old catalog, index \
             and backup are in the broken-* directory {} names, the new ones in its \
             recovering-* directory; move them back by hand, remove {}, and run \
             `vmard --recover` again",
            marker_path.display(),
            marker_path.display()
        ),
    };
    let marker: Marker = serde_json::from_slice(&text)
        .map_err(|e| refuse(format!("{} is damaged ({e})", marker_path.display())))?;
    let simple =
        |name: &str| !name.is_empty() && !name.contains('/') && name != "." && name != "..";
    if !simple(&marker.staged) || !simple(&marker.aside) {
        return Err(refuse(format!(
            "{} names no directory of it",
            marker_path.display()
        )));
    }
    let staged = dir.join(&marker.staged);
    let aside = dir.join(&marker.aside);
    tracing::warn!(
        staged = %staged.display(),
        aside = %aside.display(),
        "finishing an interrupted catalog recovery"
    );
    std::fs::create_dir_all(&aside).map_err(|e| Error::io("cannot create", &aside, e))?;
    for name in SWAPPED {
        let new = staged.join(name);
        if !exists(&new)? {
            continue;
        }
        let live = dir.join(name);
        if exists(&live)? {
            let old = aside.join(name);
            if exists(&old)? {
                return Err(refuse(format!(
                    "both {} and {} exist",
                    live.display(),
                    old.display()
                )));
            }
            fault::point(fault::Step::RecoverAside)?;
            std::fs::rename(&live, &old).map_err(|e| Error::io("cannot move aside", &live, e))?;
            crate::index::sync_dir(&aside)?;
        }
        fault::point(fault::Step::RecoverSwap)?;
        std::fs::rename(&new, &live).map_err(|e| Error::io("cannot move in", &new, e))?;
        crate::index::sync_dir(dir)?;
    }
    fault::point(fault::Step::RecoverSwapped)?;
    std::fs::remove_file(&marker_path).map_err(|e| Error::io("cannot remove", &marker_path, e))?;
    crate::index::sync_dir(dir)?;
    // What is left of the staging directory is its lock and scratch space.
    if let Err(e) = std::fs::remove_dir_all(&staged) {
        tracing::warn!("cannot remove {}: {e}", staged.display());
    }
    tracing::info!(
        aside = %aside.display(),
        "catalog recovered; the old catalog, index and backup are kept aside"
    );
    Ok(())
}

fn exists(path: &Path) -> Result<bool> {
    match std::fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::io("cannot stat", path, e)),
    }
}

/// Writes `marker` durably: a synced temporary file renamed over, the directory synced.
fn write_marker(dir: &Path, marker: &Marker) -> Result<()> {
    use std::io::Write;
    let path = dir.join(MARKER);
    let tmp = dir.join(format!("{MARKER}.tmp"));
    let bytes = serde_json::to_vec(marker)
        .map_err(|e| Error::internal(format!("cannot encode the recovery marker: {e}")))?;
    let mut file = std::fs::File::create(&tmp).map_err(|e| Error::io("cannot create", &tmp, e))?;
    file.write_all(&bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::io("cannot write", &tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| Error::io("cannot rename", &tmp, e))?;
    crate::index::sync_dir(dir)
}

/// Creates a directory `PREFIX<seconds>-<pid>[-N]` in `dir` that did not exist (mkdir fails
/// on an existing name, so two recoveries never share one) and returns its name.
fn unique_dir(dir: &Path, prefix: &str) -> Result<String> {
    use std::os::unix::fs::DirBuilderExt;
    let base = format!("{prefix}{}-{}", crate::time::now_secs(), std::process::id());
    for n in 0u32.. {
        let name = if n == 0 {
            base.clone()
        } else {
            format!("{base}-{n}")
        };
        let path: PathBuf = dir.join(&name);
        match std::fs::DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => return Ok(name),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::io("cannot create", &path, e)),
        }
    }
    unreachable!("u32 names run out")
}

/// Says so when a recovery was killed before its catalog was complete: the state dir is as
/// it was before it, and its `recovering-*` directory is only scratch.
fn warn_unfinished(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(STAGED_PREFIX)
        {
            tracing::warn!(
                "{} is left by a `vmard --recover` killed before its catalog was complete: \
                 nothing was changed; the next `vmard --recover` removes it (or remove it)",
                entry.path().display()
            );
        }
    }
}

/// Removes the `recovering-*` directories of recoveries killed before they were complete
/// (no marker names them; they hold only what a recovery derives from the backup again).
fn remove_unfinished(dir: &Path) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io("cannot list", dir, e))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        if name.to_string_lossy().starts_with(STAGED_PREFIX) {
            let path = entry.path();
            tracing::info!("removing {} of an unfinished recovery", path.display());
            std::fs::remove_dir_all(&path).map_err(|e| Error::io("cannot remove", &path, e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What recoveries set aside: catalogs kept in the state dir under any name but the live one.
    fn aside_catalogs(dir: &Path) -> usize {
        let mut found = 0;
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("catalog.redb.") || entry.path().join(CATALOG_FILE).exists() {
                found += 1;
            }
        }
        found
    }

    #[test]
    fn two_recoveries_never_share_an_aside_name() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        drop(crate::catalog::captured_for_test(dir.path()));
        // Two recoveries in one second (retried if a second boundary falls between them).
        for _ in 0..3 {
            let second = crate::time::now_secs();
            let (first, _) = Catalog::recover(&state).unwrap();
            drop(first);
            let (again, recovery) = Catalog::recover(&state).unwrap();
            assert_eq!(recovery.images, ["img"]);
            assert_eq!(again.images().unwrap().len(), 1);
            drop(again);
            if crate::time::now_secs() == second {
                break;
            }
        }
        let kept = aside_catalogs(&state);
        assert!(
            kept >= 2,
            "a recovery overwrote what the one before set aside: {kept}"
        );
        // A recovery while the catalog is open is refused, touching nothing.
        let open = Catalog::open(&state).unwrap();
        let before = std::fs::read_dir(&state).unwrap().count();
        let error = Catalog::recover(&state).err().unwrap().to_string();
        assert!(error.contains("another vmard"), "{error}");
        assert_eq!(std::fs::read_dir(&state).unwrap().count(), before);
        drop(open);
    }
}
