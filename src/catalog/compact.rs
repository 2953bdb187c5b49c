//! Compaction of the content index: merging its newest runs, dropping the entries of
//! forgotten images ([`DEAD`]).

use super::*;

impl Catalog {
    /// Forgotten images whose entries may remain in the index runs.
    pub(super) fn dead(&self) -> Result<BTreeSet<ImageId>> {
        let dir = &self.dir;
        let txn = self.read_txn()?;
        let table = txn.open_table(DEAD).ctx(dir)?;
        let mut dead = BTreeSet::new();
        for entry in table.iter().ctx(dir)? {
            dead.insert(entry.ctx(dir)?.0.value());
        }
        Ok(dead)
    }

    /// Merges the newest runs of the content index while the newest is at least half the
    /// size of the one before, committing each merge; this keeps the number of runs, and so
    /// the cost of a lookup, logarithmic in the index size. Captures leave this to be done
    /// after they answer (vmard runs it after replying), as maintenance off the critical path.
    pub fn compact_index(&self) -> Result<()> {
        let mut runs = self.lock()?;
        let started = std::time::Instant::now();
        let before = runs.len();
        self.compact(&mut runs)?;
        if runs.len() != before {
            tracing::debug!(before, after = runs.len(), took = ?started.elapsed(), "index compacted");
        }
        Ok(())
    }

    pub(super) fn compact(&self, runs: &mut Vec<Run>) -> Result<()> {
        while index::should_merge(runs) {
            let (older, newer) = (&runs[runs.len() - 2], &runs[runs.len() - 1]);
            let dir = &self.dir;
            let id = self.meta(NEXT_RUN)?;
            let merged = index::merge_runs(&self.index_dir, id, older, newer, &self.dead()?)?;
            let txn = self.write_txn()?;
            for run in [older, newer] {
                txn.open_table(RUNS).ctx(dir)?.remove(run.id).ctx(dir)?;
                txn.open_table(RUN_SUMS).ctx(dir)?.remove(run.id).ctx(dir)?;
            }
            self.name_run(&txn, &merged)?;
            txn.open_table(META)
                .ctx(dir)?
                .insert(NEXT_RUN, id + 1)
                .ctx(dir)?;
            self.commit(txn)?;
            let old: Vec<Run> = runs.drain(runs.len() - 2..).collect();
            runs.push(merged);
            self.remove_runs(old);
        }
        Ok(())
    }
}
