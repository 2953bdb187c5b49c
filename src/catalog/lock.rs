//! The state directory's lock: one vmard, or one `vmard --recover`, per state directory,
//! taken before anything in it is touched. redb's own lock is on the catalog file, which
//! recovery replaces: it cannot keep a second process out of the directory.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::error::{Error, Result};

/// The lock file inside the state directory; it holds the pid of its holder.
pub const LOCK_FILE: &str = "vmard.lock";

/// An exclusive lock (flock) on a state directory, held until dropped.
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

impl StateLock {
    /// Takes the lock of `dir` (creating the directory if needed), or says who holds it.
    pub fn take(dir: &Path) -> Result<StateLock> {
        super::state_dir::create_private_dir(dir)?;
        let path = dir.join(LOCK_FILE);
        // A read-only state dir can still be locked, if its lock file exists.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .or_else(|e| {
                if e.raw_os_error() == Some(nix::libc::EROFS) {
                    File::open(&path)
                } else {
                    Err(e)
                }
            })
            .map_err(|e| Error::io("cannot open the state dir's lock", &path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                let holder = holder.trim();
                return Err(Error::Catalog {
                    dir: dir.to_path_buf(),
                    message: format!(
                        "another vmard{} uses this state dir (it holds {}); stop it first \
                         (`systemctl stop vmard`), or use another --state-dir",
                        if holder.is_empty() {
                            String::new()
                        } else {
                            format!(" (pid {holder})")
                        },
                        path.display()
                    ),
                });
            }
            Err(TryLockError::Error(e)) => {
                return Err(Error::io("cannot lock", &path, e));
            }
        }
        // Who holds it, for the message above; a read-only lock file keeps the old text.
        if file.set_len(0).is_ok() {
            let _ = (&file).write_all(format!("{}\n", std::process::id()).as_bytes());
        }
        Ok(StateLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_dir_is_locked_once() {
        let dir = tempfile::tempdir().unwrap();
        let held = StateLock::take(dir.path()).unwrap();
        let error = StateLock::take(dir.path()).unwrap_err().to_string();
        assert!(error.contains("another vmard"), "{error}");
        assert!(error.contains(&std::process::id().to_string()), "{error}");
        drop(held);
        StateLock::take(dir.path()).unwrap();
    }
}
