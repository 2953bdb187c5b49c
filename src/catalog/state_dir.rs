//! The state dir itself: whether one holds an existing catalog, making it private, and
//! checking that vmard may write in it (with what to do when it may not).

use std::path::{Path, PathBuf};

use super::*;

/// Something in `dir` that only an existing catalog leaves: index runs or a backup.
pub(super) fn existing_state(dir: &Path) -> Option<PathBuf> {
    let backup = dir.join(crate::backup::BACKUP_FILE);
    if backup.exists() {
        return Some(backup);
    }
    let index = dir.join(INDEX_DIR);
    std::fs::read_dir(&index).ok()?.flatten().find_map(|e| {
        let name = e.file_name();
        let name = name.to_string_lossy();
        (name.starts_with("run-") && name.ends_with(".idx")).then(|| e.path())
    })
}

/// Creates `dir` readable by its owner only (vmard's state names host files and devices).
pub(super) fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io("cannot create state dir", dir, e))
}

/// Refuses a state dir (or catalog file) vmard cannot write with that reason: redb would
/// fail to open it with an I/O error that looks like a damaged catalog.
pub(super) fn check_writable(dir: &Path, file: &Path) -> Result<()> {
    use nix::unistd::{AccessFlags, access};
    for path in [dir, file] {
        let denied = match access(path, AccessFlags::W_OK) {
            Err(nix::errno::Errno::ENOENT) | Ok(()) => continue,
            Err(errno) => errno,
        };
        let what = if denied == nix::errno::Errno::EROFS {
            "is on a read-only file system: remount it read-write (or, under systemd, check \
             ReadWritePaths= of vmard.service)"
        } else {
            "is not writable by vmard: run vmard as its owner (root), or fix its permissions"
        };
        return Err(Error::Catalog {
            dir: dir.to_path_buf(),
            message: format!(
                "the state dir is read-only: {} {what} ({}); vmard writes its catalog there. \
                 Nothing is wrong with the catalog: do not run --recover",
                path.display(),
                denied.desc()
            ),
        });
    }
    Ok(())
}
