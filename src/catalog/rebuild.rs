//! Changes to the content index beyond adding a capture's run: forgetting an image (the maps
//! that read from it change, through the reference table), compaction of index runs, and the
//! rebuild of a damaged index at open from the stored digests.

use std::collections::HashMap;

use super::store::RunStamp;
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

    /// Removes image `name` from the catalog and returns its record and the names of the
    /// images whose maps changed. Images captured after it that redirected to it
    /// get new maps: each content the image held canonically moves to its first copy in the
    /// earliest of them, and the others redirect there. Refused while a saved device serves
    /// the image.
    ///
    /// The cost follows the change, not the catalog: the images to change are found in
    /// [`REFS`], only their maps and the forgotten image's digests are read, and the moved
    /// contents go into one small new index run; the forgotten image's old entries stay in
    /// their runs, skipped by lookups ([`DEAD`]) until a merge drops them.
    pub fn forget(&self, name: &str) -> Result<(ImageRecord, Vec<String>)> {
        if let Some(devices) = self.images_in_use()?.remove(name) {
            return Err(Error::ImageInUse {
                name: name.to_string(),
                devices,
            });
        }
        let mut runs = self.lock()?;
        let record = self.image(name)?;
        let started = std::time::Instant::now();
        let txn = self.write_txn()?;
        let removal = self.forget_in(&txn, &record)?;
        if let Err(e) = self.commit(txn) {
            self.remove_runs(removal.run.into_iter().collect());
            return Err(e);
        }
        runs.extend(removal.run);
        self.remove_list(record.id);
        self.write_backup(vec![crate::backup::Change::ForgetImage { id: record.id }]);
        tracing::debug!(image = %record.name, changed = removal.changed.len(), took = ?started.elapsed(), "forgotten");
        Ok((record, removal.changed))
    }

    /// Removes `record` from the catalog in `txn` (see [`Catalog::forget`]); the caller
    /// commits, or removes the returned run if it does not.
    pub(super) fn forget_in(
        &self,
        txn: &WriteTransaction,
        record: &ImageRecord,
    ) -> Result<Removal> {
        let dir = &self.dir;
        let k = record.id;
        let affected: Vec<ImageId> = {
            let refs = txn.open_table(REFS).ctx(dir)?;
            let mut ids = Vec::new();
            for entry in refs.range((k, 0)..=(k, u32::MAX)).ctx(dir)? {
                ids.push(entry.ctx(dir)?.0.value().1);
            }
            ids
        };
        let mut removal = Removal::default();
        if !affected.is_empty() {
            let (entries, changed) = self.move_canonical_copies(txn, record, &affected)?;
            removal.changed = changed;
            let run_id = self.meta_in(txn, NEXT_RUN)?;
            let run = index::write_run(&self.index_dir, run_id, entries.into_iter())?;
            let staged = (|| {
                self.name_run(txn, &run)?;
                txn.open_table(META)
                    .ctx(dir)?
                    .insert(NEXT_RUN, run_id + 1)
                    .ctx(dir)?;
                Ok(())
            })();
            if let Err(e) = staged {
                self.remove_runs(vec![run]);
                return Err(e);
            }
            removal.run = Some(run);
        }
        let removed = (|| {
            self.remove_refs(txn, &self.map_in(txn, k, record.size)?)?;
            {
                let mut refs = txn.open_table(REFS).ctx(dir)?;
                for j in &affected {
                    refs.remove((k, *j)).ctx(dir)?;
                }
            }
            clear(txn, EXTENTS, k, dir)?;
            txn.open_table(IMAGES).ctx(dir)?.remove(k).ctx(dir)?;
            txn.open_table(NAMES)
                .ctx(dir)?
                .remove(record.name.as_str())
                .ctx(dir)?;
            txn.open_table(PATHS)
                .ctx(dir)?
                .remove(path_key(&record.path))
                .ctx(dir)?;
            txn.open_table(DEAD).ctx(dir)?.insert(k, 0).ctx(dir)?;
            Ok(())
        })();
        if let Err(e) = removed {
            self.remove_runs(removal.run.into_iter().collect());
            return Err(e);
        }
        Ok(removal)
    }

    /// Rewrites the maps of `affected` (the images redirecting to `gone`, in capture order) so
    /// that nothing reads from `gone`, and returns the index entries of the contents' new
    /// canonical copies, in digest order.
    fn move_canonical_copies(
        &self,
        txn: &WriteTransaction,
        gone: &ImageRecord,
        affected: &[ImageId],
    ) -> Result<(Vec<index::Entry>, Vec<String>)> {
        let dir = &self.dir;
        // The content behind each redirect into `gone` is the digest of the block it names.
        let digests = self.digest_list(gone)?;
        let digest_of = |block: u64| {
            digests
                .binary_search_by_key(&block, |(b, _)| *b)
                .map(|i| digests[i].1)
                .map_err(|_| {
                    self.corrupt(format!(
                        "a map redirects to block {block} of image {}, which has no such content",
                        gone.name
                    ))
                })
        };
        // Block of `gone` -> its content's new canonical copy.
        let mut moved: HashMap<u64, (ImageId, u64)> = HashMap::new();
        let mut entries = Vec::new();
        let mut changed = Vec::new();
        for &j in affected {
            let mut record = self.record_in(txn, j)?;
            let old = self.map_in(txn, j, record.size)?;
            let mut builder = MapBuilder::new(j, old.blocks);
            for extent in &old.extents {
                let Source::Redirect {
                    image,
                    block: first,
                } = extent.source
                else {
                    builder.push(extent.start, extent.len, extent.source);
                    continue;
                };
                if image != gone.id {
                    builder.push(extent.start, extent.len, extent.source);
                    continue;
                }
                for i in 0..extent.len {
                    let (block, target) = (extent.start + i, first + i);
                    let source = match moved.get(&target) {
                        Some(&(image, block)) => Source::Redirect { image, block },
                        None => {
                            moved.insert(target, (j, block));
                            entries.push(index::Entry {
                                digest: digest_of(target)?,
                                image: j,
                                block,
                            });
                            Source::Own
                        }
                    };
                    builder.push(block, 1, source);
                }
            }
            let map = builder.finish();
            record.summary = map.summary(record.size);
            self.remove_refs(txn, &old)?;
            self.add_refs(txn, &map)?;
            clear(txn, EXTENTS, j, dir)?;
            self.write_map(txn, &map)?;
            self.write_record(txn, &record)?;
            changed.push(record.name);
        }
        entries.sort_unstable_by_key(|e| e.digest);
        Ok((entries, changed))
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

    /// Records which images `map` redirects to.
    pub(super) fn add_refs(&self, txn: &WriteTransaction, map: &BlockMap) -> Result<()> {
        let mut refs = txn.open_table(REFS).ctx(&self.dir)?;
        for (target, blocks) in map.redirects_by_image() {
            refs.insert((target, map.image), blocks).ctx(&self.dir)?;
        }
        Ok(())
    }

    /// Forgets which images `map` redirects to.
    fn remove_refs(&self, txn: &WriteTransaction, map: &BlockMap) -> Result<()> {
        let mut refs = txn.open_table(REFS).ctx(&self.dir)?;
        for target in map.redirects_by_image().keys() {
            refs.remove((*target, map.image)).ctx(&self.dir)?;
        }
        Ok(())
    }

    /// Fills [`REFS`] from every map (catalogs written before it existed).
    pub(super) fn build_refs(&self, txn: &WriteTransaction) -> Result<()> {
        txn.open_table(REFS)
            .ctx(&self.dir)?
            .retain(|_, _| false)
            .ctx(&self.dir)?;
        for id in self.ids(txn)? {
            let record = self.record_in(txn, id)?;
            self.add_refs(txn, &self.map_in(txn, id, record.size)?)?;
        }
        txn.open_table(META)
            .ctx(&self.dir)?
            .insert(REFS_BUILT, 1)
            .ctx(&self.dir)?;
        Ok(())
    }

    /// Fills [`PATHS`] from every record (catalogs written before it existed).
    pub(super) fn build_paths(&self, txn: &WriteTransaction) -> Result<()> {
        let dir = &self.dir;
        txn.open_table(PATHS)
            .ctx(dir)?
            .retain(|_, _| false)
            .ctx(dir)?;
        for id in self.ids(txn)? {
            let record = self.record_in(txn, id)?;
            txn.open_table(PATHS)
                .ctx(dir)?
                .insert(path_key(&record.path), id)
                .ctx(dir)?;
        }
        txn.open_table(META)
            .ctx(dir)?
            .insert(PATHS_BUILT, 1)
            .ctx(dir)?;
        Ok(())
    }

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

/// What forgetting an image staged: the run of its contents' new canonical copies, and the
/// images whose maps changed.
#[derive(Default)]
pub(super) struct Removal {
    pub(super) run: Option<Run>,
    pub(super) changed: Vec<String>,
}
