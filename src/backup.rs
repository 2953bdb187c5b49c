//! A copy of the catalog's records outside redb, as LVM keeps metadata backups: the images in
//! capture order (path, name, identity) and the saved devices, rewritten atomically after
//! every change. It is what `vmard --recover` rebuilds a lost catalog from: the images are
//! captured again in the same order, which gives the same maps, and the devices are saved
//! again.

use std::fs;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::records::{DeviceRecord, ImageRecord};

/// Where the backup lives inside the state directory.
pub const BACKUP_FILE: &str = "backup/catalog.json";

/// What the backup holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backup {
    pub images: Vec<ImageRecord>,
    pub devices: Vec<DeviceRecord>,
}

#[derive(Serialize, Deserialize)]
struct Sealed {
    /// blake3 of `backup` as JSON: a torn or edited file is refused.
    checksum: String,
    backup: serde_json::Value,
}

/// Writes the backup of `dir` (to a temporary file, synced, renamed, keeping the previous
/// one as `catalog.json.1`).
pub fn write(dir: &Path, backup: &Backup) -> Result<()> {
    let path = dir.join(BACKUP_FILE);
    let parent = path.parent().unwrap_or(dir);
    fs::create_dir_all(parent).map_err(|e| Error::io("cannot create", parent, e))?;
    let value = serde_json::to_value(backup)
        .map_err(|e| Error::Protocol(format!("cannot encode the catalog backup: {e}")))?;
    let text = serde_json::to_string(&value)
        .map_err(|e| Error::Protocol(format!("cannot encode the catalog backup: {e}")))?;
    let sealed = Sealed {
        checksum: blake3::hash(text.as_bytes()).to_hex().to_string(),
        backup: value,
    };
    let bytes = serde_json::to_vec_pretty(&sealed)
        .map_err(|e| Error::Protocol(format!("cannot encode the catalog backup: {e}")))?;
    let tmp = path.with_extension("json.tmp");
    let mut file = fs::File::create(&tmp).map_err(|e| Error::io("cannot create", &tmp, e))?;
    file.write_all(&bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::io("cannot write", &tmp, e))?;
    if path.exists() {
        let _ = fs::rename(&path, path.with_extension("json.1"));
    }
    fs::rename(&tmp, &path).map_err(|e| Error::io("cannot rename", &path, e))?;
    crate::index::sync_dir(parent)
}

/// Reads and checks the backup of `dir`.
pub fn read(dir: &Path) -> Result<Backup> {
    let path = dir.join(BACKUP_FILE);
    let bytes = fs::read(&path).map_err(|e| Error::io("cannot read", &path, e))?;
    let bad = |why: String| Error::Catalog {
        dir: dir.to_path_buf(),
        message: format!("backup {}: {why}", path.display()),
    };
    let sealed: Sealed = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    let text = serde_json::to_string(&sealed.backup).map_err(|e| bad(e.to_string()))?;
    if blake3::hash(text.as_bytes()).to_hex().as_str() != sealed.checksum {
        return Err(bad("checksum mismatch (damaged or edited)".into()));
    }
    serde_json::from_value(sealed.backup).map_err(|e| bad(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backups_round_trip_and_damage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let backup = Backup::default();
        write(dir.path(), &backup).unwrap();
        assert_eq!(read(dir.path()).unwrap(), backup);
        let path = dir.path().join(BACKUP_FILE);
        let text = fs::read_to_string(&path).unwrap();
        fs::write(&path, text.replace("\"devices\": []", "\"devices\": [1]")).unwrap();
        assert!(read(dir.path()).is_err());
    }
}
