//! Forgetting an image: the maps that read from it change, found through the reference table
//! (`refs.rs`), and its contents' new canonical copies go into one small new index run.

use std::collections::HashMap;

use super::*;

impl Catalog {
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
}

/// What forgetting an image staged: the run of its contents' new canonical copies, and the
/// images whose maps changed.
#[derive(Default)]
pub(super) struct Removal {
    pub(super) run: Option<Run>,
    pub(super) changed: Vec<String>,
}
