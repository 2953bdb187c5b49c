//! `/dev/vmar/NAME` device nodes that name no live vmar device of their name. udev's
//! `vmar-devnode` makes each node with its device and removes it with the device; a device
//! removed while vmar's udev rules were not installed (after `dpkg -r vmar`) leaves its node
//! behind, and that node would open whatever device gets the number next: another vmar
//! device, or an LVM volume. vmard removes such nodes when it starts, before it restores
//! (so no device it creates is being given its node meanwhile).

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use crate::error::Result;

/// Where udev's rule makes vmar's device nodes.
pub const NODE_DIR: &str = "/dev/vmar";

/// Removes the block device nodes in `dir` whose device number is not the one `live(NAME)`
/// gives (the number of live vmar device NAME, `None` when there is none), and returns their
/// names. Symlinks and other files are left alone; a node whose device cannot be looked up
/// (`live` fails) is kept, and what cannot be removed is logged and left.
pub fn remove_stale(dir: &Path, live: impl Fn(&str) -> Result<Option<u64>>) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let Ok(meta) = entry.metadata() else {
            continue;
        };
        if !meta.file_type().is_block_device() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        match live(&name) {
            Ok(Some(number)) if number == meta.rdev() => continue,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(node = %entry.path().display(), "kept: {e}");
                continue;
            }
        }
        match std::fs::remove_file(entry.path()) {
            Ok(()) => removed.push(name),
            Err(e) => tracing::warn!(
                node = %entry.path().display(),
                "cannot remove a device node that names no live vmar device of its name: {e}"
            ),
        }
    }
    removed.sort();
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use nix::sys::stat::{Mode, SFlag, makedev, mknod};

    #[test]
    fn nodes_of_live_devices_stay_and_the_others_go() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: mknod of block device nodes needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let node = |name: &str, minor: u64| {
            mknod(
                &dir.path().join(name),
                SFlag::S_IFBLK,
                Mode::from_bits_truncate(0o640),
                makedev(253, minor),
            )
            .unwrap();
        };
        node("web", 1); // live, same number
        node("db", 2); // device db now has another number
        node("gone", 3); // no device db of that name
        std::os::unix::fs::symlink("../dm-9", dir.path().join("old-link")).unwrap();
        std::fs::write(dir.path().join("note"), "x").unwrap();
        node("unknown", 4); // its device cannot be looked up now: kept
        let live = |name: &str| match name {
            "web" => Ok(Some(makedev(253, 1))),
            "db" => Ok(Some(makedev(253, 7))),
            "unknown" => Err(Error::Internal {
                what: "no answer".into(),
            }),
            _ => Ok(None),
        };
        assert_eq!(remove_stale(dir.path(), live), ["db", "gone"]);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["note", "old-link", "unknown", "web"]);
        assert!(remove_stale(&dir.path().join("none"), live).is_empty());
    }
}
