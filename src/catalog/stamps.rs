//! Stamps of verified index runs: a run file whose checksum was verified once is recorded
//! with its identity and times, so that start-up trusts it again while the file is
//! unchanged instead of hashing the whole index.

use std::collections::BTreeMap;
use std::path::Path;

use redb::{ReadableTable, TableDefinition};

use super::*;

/// Run id -> [`RunStamp`] of a run file whose checksum was verified: the file as it was then.
const RUN_STAMPS: TableDefinition<u64, &[u8]> = TableDefinition::new("index_run_stamps");

/// How long a run file must have been left alone before its stamp is recorded. File times
/// come from a coarse clock (one scheduler tick): a write in the same tick as the stamp
/// would leave the times unchanged, so only files changed well before are stamped (git's
/// "racily clean" entries).
const STAMP_SETTLE: std::time::Duration = std::time::Duration::from_secs(1);

/// The state of a verified index run file: its checksum and the file's device, inode, size,
/// modification and change times. Runs are written once and never modified, so a run whose
/// file still has this stamp is the file that was verified, and is not hashed again at
/// open: start-up reads a few stamps instead of hashing the whole index.
///
/// What still finds damage: any write, truncation, replacement or restore of the file changes
/// its change time (ctime), which user space cannot set back, or its inode; a crash cannot
/// leave a stamped run half written (stamps are recorded only for runs already verified, and
/// runs are synced before the commit that names them). What it gives up: a bit flipped by
/// the disk under an unchanged file is no longer found at every start. The start-up check
/// never guarded against that while vmard ran (runs are mapped and trusted for as long as
/// it runs), and `vmarctl verify` proves an image's data path end to end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct RunStamp {
    sum: [u8; 32],
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl RunStamp {
    const LEN: usize = 32 + 3 * 8 + 2 * 16;

    /// The stamp of the run file at `path` whose checksum is `sum`.
    pub(super) fn of(path: &Path, sum: [u8; 32]) -> std::io::Result<RunStamp> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path)?;
        let ns = |secs: i64, nsec: i64| i128::from(secs) * 1_000_000_000 + i128::from(nsec);
        Ok(RunStamp {
            sum,
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
        })
    }

    /// True if the file was last changed long enough ago for its stamp to be trusted.
    pub(super) fn settled(&self) -> bool {
        let ns = |d: std::time::Duration| i128::try_from(d.as_nanos()).unwrap_or(i128::MAX);
        // A clock before 1970 makes nothing settled: the file is hashed at the next start.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, ns);
        self.ctime_ns
            .max(self.mtime_ns)
            .saturating_add(ns(STAMP_SETTLE))
            <= now
    }

    fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(Self::LEN);
        bytes.extend_from_slice(&self.sum);
        for n in [self.dev, self.ino, self.size] {
            bytes.extend_from_slice(&n.to_le_bytes());
        }
        for t in [self.mtime_ns, self.ctime_ns] {
            bytes.extend_from_slice(&t.to_le_bytes());
        }
        bytes
    }

    /// `None` for a record of another length (a damaged stamp only costs a re-check).
    fn decode(bytes: &[u8]) -> Option<RunStamp> {
        if bytes.len() != Self::LEN {
            return None;
        }
        let (sum, rest) = bytes.split_first_chunk::<32>()?;
        let (dev, rest) = rest.split_first_chunk::<8>()?;
        let (ino, rest) = rest.split_first_chunk::<8>()?;
        let (size, rest) = rest.split_first_chunk::<8>()?;
        let (mtime, rest) = rest.split_first_chunk::<16>()?;
        let (ctime, _) = rest.split_first_chunk::<16>()?;
        Some(RunStamp {
            sum: *sum,
            dev: u64::from_le_bytes(*dev),
            ino: u64::from_le_bytes(*ino),
            size: u64::from_le_bytes(*size),
            mtime_ns: i128::from_le_bytes(*mtime),
            ctime_ns: i128::from_le_bytes(*ctime),
        })
    }
}

impl Catalog {
    /// The recorded stamps of verified runs, by run id (none in a catalog that has not
    /// recorded any yet).
    pub(super) fn run_stamps(&self) -> Result<BTreeMap<u64, RunStamp>> {
        let dir = &self.dir;
        let txn = self.read_txn()?;
        let Some(table) = self.table_if_made(&txn, RUN_STAMPS)? else {
            return Ok(BTreeMap::new());
        };
        let mut stamps = BTreeMap::new();
        for entry in table.iter().ctx(dir)? {
            let (id, value) = entry.ctx(dir)?;
            if let Some(stamp) = RunStamp::decode(value.value()) {
                stamps.insert(id.value(), stamp);
            }
        }
        Ok(stamps)
    }

    /// Records `stamps` of freshly verified runs, and drops the stamps of runs no longer in
    /// `runs` (run ids are never reused; this only keeps the table small).
    pub(super) fn record_run_stamps(&self, stamps: &[(u64, RunStamp)], runs: &[u64]) -> Result<()> {
        let dir = &self.dir;
        let txn = self.write_txn()?;
        {
            let mut table = txn.open_table(RUN_STAMPS).ctx(dir)?;
            table.retain(|id, _| runs.contains(&id)).ctx(dir)?;
            for (id, stamp) in stamps {
                table.insert(*id, stamp.encode().as_slice()).ctx(dir)?;
            }
        }
        self.commit(txn)
    }

    /// At a clean stop: verifies the index runs that have no valid stamp yet (those written
    /// since the start), and records their stamps, so that the next start hashes none of
    /// them. A run that no longer matches its checksum is reported and left unstamped: the
    /// next start finds it and rebuilds the index. Costs the hashing of what was written since
    /// the start, not of the whole index. Does nothing while a change still holds the index
    /// (a stop must not wait for it): those runs are then verified at the next start.
    pub fn stamp_index(&self) -> Result<()> {
        let Ok(runs) = self.runs.try_lock() else {
            tracing::debug!("index busy at stop: its runs are verified at the next start");
            return Ok(());
        };
        let sums = self.run_sums()?;
        let stamps = self.run_stamps()?;
        let mut fresh = Vec::new();
        for run in runs.iter() {
            let Some(&sum) = sums.get(&run.id) else {
                continue;
            };
            let path = index::run_path(&self.index_dir, run.id);
            let stamp = RunStamp::of(&path, sum)
                .map_err(|e| Error::io("cannot stat index run", &path, e))?;
            if stamps.get(&run.id) == Some(&stamp) || !stamp.settled() {
                continue;
            }
            if index::checksum(run) == sum {
                fresh.push((run.id, stamp));
            } else {
                tracing::error!(
                    "index run {} does not match its checksum; the next start rebuilds the index",
                    path.display()
                );
            }
        }
        if fresh.is_empty() {
            return Ok(());
        }
        let ids: Vec<u64> = runs.iter().map(|r| r.id).collect();
        self.record_run_stamps(&fresh, &ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::captured_for_test as captured;

    /// Flips one byte in the middle of every index run, in place.
    fn damage_runs(state: &Path) {
        use std::os::unix::fs::FileExt;
        for entry in std::fs::read_dir(state.join(INDEX_DIR)).unwrap().flatten() {
            if !entry.file_name().to_string_lossy().starts_with("run-") {
                continue;
            }
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(entry.path())
                .unwrap();
            let mid = file.metadata().unwrap().len() / 2;
            let mut byte = [0u8];
            file.read_exact_at(&mut byte, mid).unwrap();
            file.write_all_at(&[byte[0] ^ 0xff], mid).unwrap();
        }
    }

    fn damaged_runs(state: &Path) -> usize {
        std::fs::read_dir(state.join(INDEX_DIR))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("damaged-"))
            .count()
    }

    /// Lets the run files' times settle, so that their stamps may be recorded.
    fn settle() {
        std::thread::sleep(STAMP_SETTLE + std::time::Duration::from_millis(100));
    }

    #[test]
    fn verified_runs_are_stamped_and_not_hashed_again_while_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        drop(captured(dir.path()));
        settle();
        let catalog = Catalog::open(&state).unwrap();
        let sums = catalog.run_sums().unwrap();
        let stamps = catalog.run_stamps().unwrap();
        assert!(!sums.is_empty());
        assert_eq!(stamps.len(), sums.len(), "open stamps the runs it verified");
        for (id, sum) in &sums {
            let path = index::run_path(&catalog.index_dir, *id);
            assert_eq!(stamps[id], RunStamp::of(&path, *sum).unwrap());
        }
        // Damage the runs, then stamp them as they are now: an open that trusts stamps does
        // not hash them, so it does not notice (an open that hashed would rebuild).
        damage_runs(&state);
        let restamped: Vec<(u64, RunStamp)> = sums
            .iter()
            .map(|(id, sum)| {
                let path = index::run_path(&catalog.index_dir, *id);
                (*id, RunStamp::of(&path, *sum).unwrap())
            })
            .collect();
        let ids: Vec<u64> = sums.keys().copied().collect();
        catalog.record_run_stamps(&restamped, &ids).unwrap();
        drop(catalog);
        let catalog = Catalog::open(&state).unwrap();
        assert_eq!(
            damaged_runs(&state),
            0,
            "a stamped, unchanged run was hashed"
        );
        drop(catalog);
    }

    #[test]
    fn a_stamped_run_changed_since_is_found_and_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let before = captured(dir.path()).map("img").unwrap();
        settle();
        let catalog = Catalog::open(&state).unwrap();
        assert!(!catalog.run_stamps().unwrap().is_empty());
        drop(catalog);
        damage_runs(&state);
        let catalog = Catalog::open(&state).unwrap();
        assert_eq!(damaged_runs(&state), 1, "the changed run was trusted");
        assert_eq!(catalog.map("img").unwrap(), before);
    }

    #[test]
    fn stamping_at_stop_skips_a_run_damaged_while_open() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let catalog = captured(dir.path());
        damage_runs(&state);
        settle();
        catalog.stamp_index().unwrap();
        assert!(
            catalog.run_stamps().unwrap().is_empty(),
            "a damaged run was stamped"
        );
        drop(catalog);
        let _catalog = Catalog::open(&state).unwrap();
        assert_eq!(damaged_runs(&state), 1);
    }

    #[test]
    fn stamping_at_stop_stamps_settled_runs_only() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = captured(dir.path());
        catalog.stamp_index().unwrap();
        assert!(
            catalog.run_stamps().unwrap().is_empty(),
            "a run just written was stamped"
        );
        settle();
        catalog.stamp_index().unwrap();
        assert_eq!(
            catalog.run_stamps().unwrap().len(),
            catalog.run_sums().unwrap().len()
        );
    }
}
