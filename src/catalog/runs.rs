//! The index runs the catalog names: opening them against the checksums it holds (a damaged
//! one starts a rebuild, see `rebuild.rs`), naming a new run with its checksum, deleting the
//! files of runs no longer named.

use super::stamps::RunStamp;
use super::*;

impl Catalog {
    /// Opens the committed index runs, checking each against the checksum the catalog holds
    /// for it. A missing or damaged run is derived data: the index is rebuilt from the
    /// stored digests (the damaged file is kept aside as `damaged-*.idx`), and no map
    /// changes.
    ///
    /// A run whose file still has the [`RunStamp`] recorded when it was last verified is not
    /// hashed again (see there for what that check still finds): start-up costs a few
    /// `stat`s whatever the size of the index. Runs verified here get their stamp recorded.
    pub(super) fn open_runs(&self, ids: &[u64]) -> Result<Vec<Run>> {
        let sums = self.run_sums()?;
        let stamps = self.run_stamps()?;
        let mut fresh = Vec::new();
        let mut runs = Vec::new();
        let mut damaged = None;
        for &id in ids {
            let path = index::run_path(&self.index_dir, id);
            let checked = Run::open(&self.index_dir, id).and_then(|run| {
                let Some(&want) = sums.get(&id) else {
                    return Ok(run);
                };
                // Taken before hashing: a change during the hash makes the stamp stale.
                let stamp = RunStamp::of(&path, want).ok();
                if stamp.is_some() && stamp.as_ref() == stamps.get(&id) {
                    return Ok(run);
                }
                if index::checksum(&run) != want {
                    return Err(self.corrupt(format!("index run {id} does not match its checksum")));
                }
                fresh.extend(stamp.filter(RunStamp::settled).map(|s| (id, s)));
                Ok(run)
            });
            match checked {
                Ok(run) => runs.push(run),
                Err(e) => {
                    damaged = Some(e);
                    let aside = self.index_dir.join(format!("damaged-{id:016x}.idx"));
                    let _ = std::fs::rename(&path, &aside);
                    break;
                }
            }
        }
        if let Some(e) = damaged {
            tracing::error!("{e}: rebuilding the content index from the stored digests");
            drop(runs);
            let mut runs = Vec::new();
            self.rebuild_index(&mut runs, &mut self.spill()?)?;
            return Ok(runs);
        }
        // Runs written before checksums were kept get one now (trusted as they are).
        let missing: Vec<&Run> = runs.iter().filter(|r| !sums.contains_key(&r.id)).collect();
        if !missing.is_empty() {
            let txn = self.write_txn()?;
            {
                let mut table = txn.open_table(RUN_SUMS).ctx(&self.dir)?;
                for run in missing {
                    table
                        .insert(run.id, index::checksum(run).as_slice())
                        .ctx(&self.dir)?;
                }
            }
            self.commit(txn)?;
        }
        if !fresh.is_empty() {
            self.record_run_stamps(&fresh, ids)?;
        }
        Ok(runs)
    }

    /// Checksums of the committed index runs, by run id.
    pub(super) fn run_sums(&self) -> Result<BTreeMap<u64, [u8; 32]>> {
        let dir = &self.dir;
        let txn = self.read_txn()?;
        let table = txn.open_table(RUN_SUMS).ctx(dir)?;
        let mut sums = BTreeMap::new();
        for entry in table.iter().ctx(dir)? {
            let (id, sum) = entry.ctx(dir)?;
            if let Ok(sum) = <[u8; 32]>::try_from(sum.value()) {
                sums.insert(id.value(), sum);
            }
        }
        Ok(sums)
    }

    /// Names `run` in the catalog's list of runs, with its checksum.
    pub(super) fn name_run(&self, txn: &WriteTransaction, run: &Run) -> Result<()> {
        let dir = &self.dir;
        txn.open_table(RUNS)
            .ctx(dir)?
            .insert(run.id, run.len() as u64)
            .ctx(dir)?;
        txn.open_table(RUN_SUMS)
            .ctx(dir)?
            .insert(
                run.id,
                run.written_checksum()
                    .unwrap_or_else(|| index::checksum(run))
                    .as_slice(),
            )
            .ctx(dir)?;
        Ok(())
    }

    /// Deletes run files no longer named by the catalog. A failure only leaves an orphan that
    /// the next open removes.
    pub(super) fn remove_runs(&self, old: Vec<Run>) {
        for run in old {
            let path = index::run_path(&self.index_dir, run.id);
            drop(run);
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!("cannot remove old index run {}: {e}", path.display());
            }
        }
    }
}
