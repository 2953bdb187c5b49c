//! Changes that rebuild the content index: forgetting or re-capturing an image (the maps of
//! the images captured after it are rebuilt from stored digests), compaction of index runs,
//! and the rebuild of a damaged index at open.

use super::*;

/// A change to the catalog that needs the index rebuilt from image `from` on.
pub(super) struct Rebuild {
    pub(super) from: ImageId,
    /// New record and digests of a re-captured image.
    pub(super) replace: Option<(ImageRecord, Hashed)>,
    /// An image being removed.
    pub(super) remove: Option<ImageRecord>,
}

impl Catalog {
    /// Opens the committed index runs, checking each against the checksum the catalog holds
    /// for it. A missing or damaged run is derived data: the index is rebuilt from the
    /// stored digests (the damaged file is kept aside as `damaged-*.idx`), and no map
    /// changes.
    pub(super) fn open_runs(&self, ids: &[u64]) -> Result<Vec<Run>> {
        let sums = self.run_sums()?;
        let mut runs = Vec::new();
        let mut damaged = None;
        for &id in ids {
            let checked = Run::open(&self.index_dir, id).and_then(|run| {
                let sum = index::checksum(&run);
                match sums.get(&id) {
                    Some(want) if *want != sum => {
                        Err(self.corrupt(format!("index run {id} does not match its checksum")))
                    }
                    _ => Ok(run),
                }
            });
            match checked {
                Ok(run) => runs.push(run),
                Err(e) => {
                    damaged = Some(e);
                    let path = index::run_path(&self.index_dir, id);
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
            self.rebuild(
                &mut runs,
                &mut self.spill()?,
                Rebuild {
                    from: ImageId::MAX,
                    replace: None,
                    remove: None,
                },
            )?;
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

    /// Removes image `name` from the catalog. Images captured after it that redirected to it
    /// get new maps (their blocks' new canonical copies), rebuilt from stored digests.
    /// Refused while a saved device serves the image.
    pub fn forget(&self, name: &str) -> Result<ImageRecord> {
        if let Some(device) = self.images_in_use()?.remove(name) {
            return Err(Error::ImageInUse {
                name: name.to_string(),
                device,
            });
        }
        let mut runs = self.lock()?;
        let record = self.image(name)?;
        self.rebuild(
            &mut runs,
            &mut self.spill()?,
            Rebuild {
                from: record.id,
                replace: None,
                remove: Some(record.clone()),
            },
        )?;
        self.write_backup();
        Ok(record)
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
            let merged = index::merge_runs(&self.index_dir, id, older, newer)?;
            let txn = self.write_txn()?;
            {
                let mut table = txn.open_table(RUNS).ctx(dir)?;
                table.remove(older.id).ctx(dir)?;
                table.remove(newer.id).ctx(dir)?;
                table.insert(id, merged.len() as u64).ctx(dir)?;
                let mut sums = txn.open_table(RUN_SUMS).ctx(dir)?;
                sums.remove(older.id).ctx(dir)?;
                sums.remove(newer.id).ctx(dir)?;
                sums.insert(id, index::checksum(&merged).as_slice())
                    .ctx(dir)?;
                txn.open_table(META)
                    .ctx(dir)?
                    .insert(NEXT_RUN, id + 1)
                    .ctx(dir)?;
            }
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

    /// Rebuilds the index from scratch over all images in capture order, with one image
    /// replaced or removed, and rewrites the maps of images `from` and later. Maps of earlier
    /// images come out identical, so they are not rewritten.
    pub(super) fn rebuild(
        &self,
        runs: &mut Vec<Run>,
        spill: &mut Spill,
        change: Rebuild,
    ) -> Result<Option<ImageRecord>> {
        let dir = &self.dir;
        let mut next_run = self.meta(NEXT_RUN)?;
        let mut new_runs: Vec<Run> = Vec::new();
        let mut result = None;
        let txn = self.write_txn()?;
        let ids = self.ids(&txn)?;
        let outcome = (|| {
            let mut replace = change.replace;
            for id in ids {
                if change.remove.as_ref().is_some_and(|r| r.id == id) {
                    continue;
                }
                let (mut record, hashed, replaced) = match replace.take_if(|(r, _)| r.id == id) {
                    Some((record, hashed)) => (record, hashed, true),
                    None => {
                        let record = self.record_in(&txn, id)?;
                        let mut collector = spill.digests(record.size)?;
                        self.read_digests(&txn, id, &mut collector)?;
                        (record, collector.finish()?, false)
                    }
                };
                let Hashed { sorted, blocks, .. } = hashed;
                let (writer, map) =
                    self.resolve_image(spill, &record, sorted, &blocks, &new_runs, next_run)?;
                let run = writer.finish()?;
                next_run += 1;
                new_runs.push(run);
                while index::should_merge(&new_runs) {
                    let n = new_runs.len();
                    let merged = index::merge_runs(
                        &self.index_dir,
                        next_run,
                        &new_runs[n - 2],
                        &new_runs[n - 1],
                    )?;
                    next_run += 1;
                    let old: Vec<Run> = new_runs.drain(n - 2..).collect();
                    new_runs.push(merged);
                    self.remove_runs(old);
                }
                if id >= change.from {
                    record.summary = map.summary(record.size);
                    clear(&txn, EXTENTS, id, dir)?;
                    self.write_map(&txn, &map)?;
                    if replaced {
                        clear(&txn, DIGESTS, id, dir)?;
                        self.write_digests(&txn, id, &blocks)?;
                    }
                    self.write_record(&txn, &record)?;
                    if replaced {
                        result = Some(record);
                    }
                }
            }
            if let Some(removed) = &change.remove {
                clear(&txn, EXTENTS, removed.id, dir)?;
                clear(&txn, DIGESTS, removed.id, dir)?;
                txn.open_table(IMAGES)
                    .ctx(dir)?
                    .remove(removed.id)
                    .ctx(dir)?;
                txn.open_table(NAMES)
                    .ctx(dir)?
                    .remove(removed.name.as_str())
                    .ctx(dir)?;
                result = Some(removed.clone());
            }
            let mut table = txn.open_table(RUNS).ctx(dir)?;
            table.retain(|_, _| false).ctx(dir)?;
            for run in &new_runs {
                table.insert(run.id, run.len() as u64).ctx(dir)?;
            }
            let mut sums = txn.open_table(RUN_SUMS).ctx(dir)?;
            sums.retain(|_, _| false).ctx(dir)?;
            for run in &new_runs {
                sums.insert(run.id, index::checksum(run).as_slice())
                    .ctx(dir)?;
            }
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
        Ok(result)
    }
}
