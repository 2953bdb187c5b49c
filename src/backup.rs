//! A copy of the catalog's records outside redb, as LVM keeps metadata backups: the images in
//! capture order (path, name, identity) and the saved devices. It is what `vmard --recover`
//! rebuilds a lost catalog from: the images are captured again in the same order, which gives
//! the same maps, and the devices are saved again.
//!
//! Two files: a snapshot of every record (`catalog.json`, rewritten atomically) and a journal
//! of the changes since (`journal.jsonl`, one checksummed line appended and synced per
//! change). A change costs one short append whatever the number of images; the snapshot is
//! rewritten, and the journal emptied, when the journal has grown to the snapshot's size.
//! Every change carries a sequence number, and the snapshot the number of the last change it
//! holds, so a crash between the two steps of a rewrite replays nothing twice; a torn last
//! line (a crash during an append) ends the journal.

use std::fs;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::map::ImageId;
use crate::records::{DeviceRecord, ImageRecord, NameBinding};

/// Where the backup's snapshot lives inside the state directory.
pub const BACKUP_FILE: &str = "backup/catalog.json";
/// Where the journal of changes since the snapshot lives inside the state directory.
pub const JOURNAL_FILE: &str = "backup/journal.jsonl";

/// What the backup holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backup {
    pub images: Vec<ImageRecord>,
    pub devices: Vec<DeviceRecord>,
    /// The content each device name served (see [`crate::binding`]), by name.
    #[serde(default)]
    pub names: Vec<NameBinding>,
    /// Sequence number of the last change this holds (0 in backups from before the journal).
    #[serde(default)]
    pub seq: u64,
}

/// One change to the records, as the journal keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Change {
    /// An image captured, or its record replaced.
    Image {
        record: Box<ImageRecord>,
    },
    ForgetImage {
        id: ImageId,
    },
    /// A device saved, or its record replaced.
    Device {
        record: DeviceRecord,
    },
    ForgetDevice {
        name: String,
    },
    /// A device name bound to content (never forgotten).
    BindName {
        binding: NameBinding,
    },
}

impl Backup {
    /// Applies one change.
    pub fn apply(&mut self, change: Change) {
        match change {
            Change::Image { record } => {
                self.images.retain(|i| i.id != record.id);
                let at = self.images.partition_point(|i| i.id < record.id);
                self.images.insert(at, *record);
            }
            Change::ForgetImage { id } => self.images.retain(|i| i.id != id),
            Change::Device { record } => {
                self.devices.retain(|d| d.name != record.name);
                let at = self.devices.partition_point(|d| d.name < record.name);
                self.devices.insert(at, record);
            }
            Change::ForgetDevice { name } => self.devices.retain(|d| d.name != name),
            Change::BindName { binding } => {
                self.names.retain(|b| b.name != binding.name);
                let at = self.names.partition_point(|b| b.name < binding.name);
                self.names.insert(at, binding);
            }
        }
    }
}

/// A journal line: a change, its sequence number and a checksum of both.
#[derive(Serialize, Deserialize)]
struct Entry {
    seq: u64,
    change: Change,
    checksum: String,
}

fn entry_checksum(seq: u64, change: &Change) -> Result<String> {
    let text = serde_json::to_string(change)
        .map_err(|e| Error::internal(format!("cannot encode a backup change: {e}")))?;
    let mut hasher = blake3::Hasher::new();
    hasher.update(&seq.to_le_bytes());
    hasher.update(text.as_bytes());
    Ok(hasher.finalize().to_hex().to_string())
}

/// Appends `changes`, numbered from `first_seq` on, to the journal of `dir`, and syncs it.
pub fn append(dir: &Path, first_seq: u64, changes: &[Change]) -> Result<()> {
    let path = dir.join(JOURNAL_FILE);
    let parent = path.parent().unwrap_or(dir);
    fs::create_dir_all(parent).map_err(|e| Error::io("cannot create", parent, e))?;
    let mut text = Vec::new();
    for (seq, change) in (first_seq..).zip(changes) {
        let entry = Entry {
            seq,
            checksum: entry_checksum(seq, change)?,
            change: change.clone(),
        };
        serde_json::to_writer(&mut text, &entry)
            .map_err(|e| Error::internal(format!("cannot encode a backup change: {e}")))?;
        text.push(b'\n');
    }
    let mut file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| Error::io("cannot open", &path, e))?;
    file.write_all(&text)
        .and_then(|()| file.sync_data())
        .map_err(|e| Error::io("cannot write", &path, e))
}

/// The journal's changes in order, up to the first line that is torn or damaged.
fn journal(dir: &Path) -> Result<Vec<(u64, Change)>> {
    let path = dir.join(JOURNAL_FILE);
    let text = match fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("cannot read", &path, e)),
    };
    let mut changes = Vec::new();
    for line in text.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let entry: Entry = match serde_json::from_slice(line) {
            Ok(entry) => entry,
            Err(_) => break,
        };
        if entry_checksum(entry.seq, &entry.change)? != entry.checksum {
            break;
        }
        changes.push((entry.seq, entry.change));
    }
    Ok(changes)
}

/// The highest sequence number the backup of `dir` holds, in its snapshot or its journal
/// (0 when it has none): the next change must be numbered above it, or a snapshot whose
/// journal could not be emptied would have older lines applied over it.
pub fn last_seq(dir: &Path) -> u64 {
    let snapshot = read_snapshot(dir).map(|b| b.seq).unwrap_or(0);
    let journal = journal(dir)
        .ok()
        .and_then(|j| j.last().map(|(seq, _)| *seq))
        .unwrap_or(0);
    snapshot.max(journal)
}

#[derive(Serialize, Deserialize)]
struct Sealed {
    /// blake3 of `backup` as JSON: a torn or edited file is refused.
    checksum: String,
    backup: serde_json::Value,
}

/// Writes the snapshot of `dir` (to a temporary file, synced, renamed, keeping the previous
/// one as `catalog.json.1`) and empties the journal, whose changes it holds.
pub fn write(dir: &Path, backup: &Backup) -> Result<()> {
    write_snapshot(dir, backup)?;
    let journal = dir.join(JOURNAL_FILE);
    match fs::remove_file(&journal) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io("cannot remove", &journal, e)),
    }
    let parent = journal.parent().unwrap_or(dir);
    crate::index::sync_dir(parent)
}

fn write_snapshot(dir: &Path, backup: &Backup) -> Result<()> {
    let path = dir.join(BACKUP_FILE);
    let parent = path.parent().unwrap_or(dir);
    fs::create_dir_all(parent).map_err(|e| Error::io("cannot create", parent, e))?;
    let value = serde_json::to_value(backup)
        .map_err(|e| Error::internal(format!("cannot encode the catalog backup: {e}")))?;
    let text = serde_json::to_string(&value)
        .map_err(|e| Error::internal(format!("cannot encode the catalog backup: {e}")))?;
    let sealed = Sealed {
        checksum: blake3::hash(text.as_bytes()).to_hex().to_string(),
        backup: value,
    };
    let bytes = serde_json::to_vec_pretty(&sealed)
        .map_err(|e| Error::internal(format!("cannot encode the catalog backup: {e}")))?;
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

/// Reads and checks the backup of `dir`: the snapshot, with the journal's later changes
/// applied.
pub fn read(dir: &Path) -> Result<Backup> {
    let mut backup = read_snapshot(dir)?;
    for (seq, change) in journal(dir)? {
        if seq > backup.seq {
            backup.apply(change);
            backup.seq = seq;
        }
    }
    Ok(backup)
}

fn read_snapshot(dir: &Path) -> Result<Backup> {
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

    fn image(id: ImageId, name: &str) -> ImageRecord {
        ImageRecord {
            id,
            name: name.to_string(),
            path: format!("/images/{name}.raw").into(),
            size: 4096,
            identity: crate::image::ImageIdentity {
                dev: 1,
                ino: u64::from(id),
                size: 4096,
                mtime_ns: 1_700_000_000_000_000_000,
                ctime_ns: Some(-5),
                block_id: None,
            },
            captured_at: 0,
            scan: Default::default(),
            summary: Default::default(),
            fingerprint: None,
        }
    }

    #[test]
    fn the_journal_replays_changes_after_the_snapshot_once_and_stops_at_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let mut want = Backup {
            images: vec![image(0, "base")],
            devices: Vec::new(),
            names: Vec::new(),
            seq: 1,
        };
        write(dir.path(), &want).unwrap();
        assert_eq!(last_seq(dir.path()), 1);
        let device = DeviceRecord {
            name: "vm1".into(),
            image: "web".into(),
            created_at: 0,
            state: Default::default(),
            changed: Vec::new(),
        };
        let changes = [
            Change::Image {
                record: Box::new(image(1, "web")),
            },
            Change::Device {
                record: device.clone(),
            },
            Change::ForgetImage { id: 0 },
        ];
        append(dir.path(), 2, &changes[..2]).unwrap();
        append(dir.path(), 4, &changes[2..]).unwrap();
        for change in changes.clone() {
            want.apply(change);
        }
        want.seq = 4;
        assert_eq!(read(dir.path()).unwrap(), want);
        assert_eq!(want.images, vec![image(1, "web")]);
        assert_eq!(want.devices, vec![device]);
        assert_eq!(last_seq(dir.path()), 4);

        // A crash between a snapshot and emptying the journal: its lines are older than the
        // snapshot and are not applied again (the image forgotten stays forgotten).
        let journal = fs::read(dir.path().join(JOURNAL_FILE)).unwrap();
        write(dir.path(), &want).unwrap();
        let mut stale = journal.clone();
        // and a torn line after them, as a crash during an append leaves.
        stale.extend_from_slice(br#"{"seq":5,"change":{"forget-device":{"na"#);
        fs::write(dir.path().join(JOURNAL_FILE), &stale).unwrap();
        want.images.push(image(7, "late"));
        write_snapshot(dir.path(), &want).unwrap();
        assert_eq!(read(dir.path()).unwrap(), want);

        // A damaged line ends the journal there.
        write(dir.path(), &want).unwrap();
        append(
            dir.path(),
            5,
            &[Change::ForgetDevice { name: "vm1".into() }],
        )
        .unwrap();
        let path = dir.path().join(JOURNAL_FILE);
        let text = fs::read_to_string(&path).unwrap().replace("vm1", "vm2");
        fs::write(&path, text).unwrap();
        assert_eq!(read(dir.path()).unwrap().devices.len(), 1);
    }
}
