//! The rebuild of a damaged content index at open, from the stored digests (maps do not
//! change).

use super::*;

impl Catalog {
    /// Rebuilds the index from scratch from the stored digests of all images, in capture
    /// order (a damaged run). Maps do not change: the canonical copies are the same.
    pub(super) fn rebuild_index(&self, runs: &mut Vec<Run>, spill: &mut Spill) -> Result<()> {
        let dir = &self.dir;
        let mut next_run = self.meta(NEXT_RUN)?;
        let mut new_runs: Vec<Run> = Vec::new();
        let txn = self.write_txn()?;
        let ids = self.ids(&txn)?;
        let outcome = (|| {
            for id in ids {
                let record = self.record_in(&txn, id)?;
                let mut collector = spill.digests(record.size, &self.index_dir)?;
                self.read_digests(&record, &mut collector)?;
                let Hashed {
                    sorted, nonzero, ..
                } = collector.finish()?;
                let (writer, map) = self.resolve_image(
                    spill,
                    &record,
                    (sorted, &nonzero),
                    (&new_runs, &BTreeSet::new()),
                    next_run,
                )?;
                if map != self.map_in(&txn, id, record.size)? {
                    // Kept as it is: live devices may serve it, and every block it names
                    // holds the content the digests say.
                    tracing::warn!(
                        image = %record.name,
                        "the stored map differs from a fresh resolution of its digests"
                    );
                }
                new_runs.push(writer.finish()?);
                next_run += 1;
                while index::should_merge(&new_runs) {
                    let n = new_runs.len();
                    let merged = index::merge_runs(
                        &self.index_dir,
                        next_run,
                        &new_runs[n - 2],
                        &new_runs[n - 1],
                        &BTreeSet::new(),
                    )?;
                    next_run += 1;
                    let old: Vec<Run> = new_runs.drain(n - 2..).collect();
                    new_runs.push(merged);
                    self.remove_runs(old);
                }
            }
            txn.open_table(RUNS)
                .ctx(dir)?
                .retain(|_, _| false)
                .ctx(dir)?;
            txn.open_table(RUN_SUMS)
                .ctx(dir)?
                .retain(|_, _| false)
                .ctx(dir)?;
            for run in &new_runs {
                self.name_run(&txn, run)?;
            }
            // The new runs hold no entry of a forgotten image.
            txn.open_table(DEAD)
                .ctx(dir)?
                .retain(|_, _| false)
                .ctx(dir)?;
            txn.open_table(META)
                .ctx(dir)?
                .insert(NEXT_RUN, next_run)
                .ctx(dir)?;
            Ok(())
        })();
        if let Err(e) = outcome {
            self.remove_runs(new_runs);
            return Err(e);
        }
        self.commit(txn)?;
        let old = std::mem::replace(runs, new_runs);
        self.remove_runs(old);
        Ok(())
    }
}
