//! The state dir's instance id: 16 random hex digits, generated once and kept in
//! `STATE/instance-id`. It goes into the dm UUID of every device the state dir's vmard makes
//! (see [`crate::kernel::device_uuid`]), so that a vmard restores, cleans up and changes only
//! its own devices: a second vmard on another state dir, or a tool that makes `vmar-`
//! devices, shares the kernel's device names but not the UUIDs.
//!
//! The file is written once, atomically, after the catalog's lock is taken, and never
//! rewritten: a lost or unreadable file is refused rather than replaced, because a new id
//! would disown every live device of this state dir.

use std::fmt;
use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};

/// Name of the file in the state dir.
pub const INSTANCE_FILE: &str = "instance-id";
/// Hex digits of an id.
const DIGITS: usize = 16;

/// A state dir's instance id.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InstanceId(String);

impl InstanceId {
    /// An id as the UUID or the file spells it: exactly 16 lowercase hex digits.
    pub fn parse(text: &str) -> Option<InstanceId> {
        (text.len() == DIGITS && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            .then(|| InstanceId(text.to_string()))
    }

    /// A new random id.
    pub fn generate() -> Result<InstanceId> {
        let mut bytes = [0u8; DIGITS / 2];
        getrandom::fill(&mut bytes).map_err(|e| {
            Error::io(
                "cannot make an instance id from",
                "getrandom(2)",
                std::io::Error::other(e.to_string()),
            )
        })?;
        Ok(InstanceId(
            bytes.iter().map(|b| format!("{b:02x}")).collect(),
        ))
    }

    /// The id of state dir `dir`, made on first use. Call it with the catalog open, so that
    /// no other vmard makes one meanwhile.
    pub fn load_or_create(dir: &Path) -> Result<InstanceId> {
        let path = dir.join(INSTANCE_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => InstanceId::parse(text.trim()).ok_or_else(|| Error::Catalog {
                dir: dir.to_path_buf(),
                message: format!(
                    "{} does not hold an instance id (16 hex digits); it names the devices of \
                     this state dir, so vmard will not replace it: restore it from a backup, or \
                     read the id from the UUID of a live device (`dmsetup info -c -o name,uuid`: \
                     VMAR-ID-NAME) and write it there",
                    path.display()
                ),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let id = InstanceId::generate()?;
                write_atomically(dir, &path, &id)?;
                tracing::info!(instance = %id, "new instance id for this state dir");
                Ok(id)
            }
            Err(e) => Err(Error::io("cannot read", &path, e)),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Writes the id to a temporary file, syncs it and renames it into place, then syncs the
/// directory: a crash leaves either no file or the whole id.
fn write_atomically(dir: &Path, path: &Path, id: &InstanceId) -> Result<()> {
    let mut file = tempfile::NamedTempFile::new_in(dir)
        .map_err(|e| Error::io("cannot create a file in", dir, e))?;
    writeln!(file, "{id}")
        .and_then(|()| file.as_file().sync_all())
        .map_err(|e| Error::io("cannot write", file.path().to_path_buf(), e))?;
    file.persist(path)
        .map_err(|e| Error::io("cannot rename into", path, e.error))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("cannot sync", dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instance_id_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = InstanceId::load_or_create(dir.path()).unwrap();
        assert_eq!(first.as_str().len(), 16);
        assert_eq!(InstanceId::parse(first.as_str()), Some(first.clone()));
        assert_eq!(InstanceId::load_or_create(dir.path()).unwrap(), first);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(InstanceId::load_or_create(other.path()).unwrap(), first);
        // A damaged file is refused, not replaced: a new id would disown the devices.
        std::fs::write(dir.path().join(INSTANCE_FILE), "garbage\n").unwrap();
        let err = InstanceId::load_or_create(dir.path()).unwrap_err();
        assert!(err.to_string().contains("will not replace"), "{err}");
        for bad in [
            "",
            "0123456789abcde",
            "0123456789ABCDEF",
            "0123456789abcdef0",
        ] {
            assert_eq!(InstanceId::parse(bad), None, "{bad}");
        }
    }
}
