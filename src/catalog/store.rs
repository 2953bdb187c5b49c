//! The catalog's redb plumbing: transactions (re-opened after an I/O error), commits
//! through a fault point, and the chunked digest, extent and record tables.

use std::path::Path;

use redb::{Database, ReadableTable, TableDefinition, WriteTransaction};

use super::*;
use crate::records::Fingerprint;
use crate::scan::Digest;

impl Catalog {
    /// The payload of a stored record, or a clear error if its checksum fails.
    pub(super) fn unseal<'a>(&self, value: &'a [u8], what: &str) -> Result<&'a [u8]> {
        unseal(value).map_err(|e| {
            self.corrupt(format!(
                "damaged {what} record ({e}); rebuild the catalog with `vmard --recover`"
            ))
        })
    }

    /// Seals every record of a schema 2 catalog (written before records had checksums).
    pub(super) fn seal_all(&self, txn: &WriteTransaction) -> Result<()> {
        let dir = &self.dir;
        {
            let mut table = txn.open_table(IMAGES).ctx(dir)?;
            let all: Vec<(u32, Vec<u8>)> = table
                .iter()
                .ctx(dir)?
                .map(|e| e.map(|(k, v)| (k.value(), v.value().to_vec())))
                .collect::<std::result::Result<_, _>>()
                .ctx(dir)?;
            for (k, v) in all {
                table.insert(k, seal(&v).as_slice()).ctx(dir)?;
            }
        }
        for def in [DIGESTS, EXTENTS] {
            let mut table = txn.open_table(def).ctx(dir)?;
            let all: Vec<((u32, u32), Vec<u8>)> = table
                .iter()
                .ctx(dir)?
                .map(|e| e.map(|(k, v)| (k.value(), v.value().to_vec())))
                .collect::<std::result::Result<_, _>>()
                .ctx(dir)?;
            for (k, v) in all {
                table.insert(k, seal(&v).as_slice()).ctx(dir)?;
            }
        }
        let mut table = txn.open_table(DEVICES).ctx(dir)?;
        let all: Vec<(String, Vec<u8>)> = table
            .iter()
            .ctx(dir)?
            .map(|e| e.map(|(k, v)| (k.value().to_string(), v.value().to_vec())))
            .collect::<std::result::Result<_, _>>()
            .ctx(dir)?;
        for (k, v) in all {
            table.insert(k.as_str(), seal(&v).as_slice()).ctx(dir)?;
        }
        Ok(())
    }

    /// Table `table` in `txn`, or `None` in a catalog that has not created it yet: tables
    /// added after a catalog was made (bindings, run stamps, working sets) appear with their
    /// first record.
    pub(super) fn table_if_made<K: redb::Key + 'static, V: redb::Value + 'static>(
        &self,
        txn: &redb::ReadTransaction,
        table: TableDefinition<K, V>,
    ) -> Result<Option<redb::ReadOnlyTable<K, V>>> {
        match txn.open_table(table) {
            Ok(table) => Ok(Some(table)),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
            Err(e) => Err(e).ctx(&self.dir),
        }
    }

    pub(super) fn read_txn(&self) -> Result<redb::ReadTransaction> {
        let db = self.db.read().unwrap_or_else(|p| p.into_inner());
        match &*db {
            Some(db) => db.begin_read().ctx(&self.dir),
            None if self.closed.load(Ordering::Acquire) => Err(Error::ShuttingDown),
            None => Err::<_, redb::Error>(redb::Error::PreviousIo).ctx(&self.dir),
        }
    }

    pub(super) fn write_txn(&self) -> Result<WriteTransaction> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        self.begin_write().map_err(|e| Error::Catalog {
            dir: self.dir.clone(),
            message: e.to_string(),
        })
    }

    /// Closes the database at a clean stop, whoever still holds the catalog: redb then saves
    /// its allocator state and marks the file clean, so the next open reads only what it
    /// needs. A catalog that is never closed (other threads of vmard keep it until the
    /// process exits) makes every open repair the file first: redb reads and checksums
    /// every page, ~0.2 s of CPU for a catalog of 2 M digests. Later calls on this catalog
    /// fail with [`Error::ShuttingDown`]; a change in flight is finished first (its write
    /// transaction holds the database).
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let closing = {
            let _change = self.runs.lock();
            let mut db = self.db.write().unwrap_or_else(|p| p.into_inner());
            db.take()
        };
        drop(closing);
    }

    pub(super) fn begin_write(&self) -> std::result::Result<WriteTransaction, Box<redb::Error>> {
        let begin = || {
            let db = self.db.read().unwrap_or_else(|p| p.into_inner());
            match &*db {
                Some(db) => db.begin_write().map_err(|e| Box::new(e.into())),
                None => Err(Box::new(redb::Error::PreviousIo)),
            }
        };
        match begin() {
            Err(e) if matches!(*e, redb::Error::PreviousIo) => {
                self.reopen();
                begin()
            }
            other => other,
        }
    }

    /// Re-opens the database after an I/O error (e.g. a full disk), which leaves redb refusing
    /// every transaction until it is closed: the last commit is what the file holds, so
    /// vmard carries on once the disk has room, without a restart.
    pub(super) fn reopen(&self) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        let mut db = self.db.write().unwrap_or_else(|p| p.into_inner());
        *db = None;
        for attempt in 0..50 {
            match Database::builder()
                .set_cache_size(CACHE_BYTES)
                .open(&self.file)
            {
                Ok(opened) => {
                    *db = Some(opened);
                    tracing::warn!("catalog re-opened after an I/O error");
                    return;
                }
                // A read transaction of the old handle may still be finishing.
                Err(redb::DatabaseError::DatabaseAlreadyOpen) if attempt < 49 => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => {
                    tracing::error!("cannot re-open the catalog after an I/O error: {e}");
                    return;
                }
            }
        }
    }

    /// Commits `txn` (fsync); a fault point for the crash tests. After a failed commit the
    /// database is re-opened, so that the next request can succeed.
    pub(super) fn commit(&self, txn: WriteTransaction) -> Result<()> {
        fault::point(fault::Step::CatalogCommit)?;
        let committed = txn.commit();
        if committed.is_err() {
            self.reopen();
        }
        committed.ctx(&self.dir)
    }

    pub(super) fn ids(&self, txn: &WriteTransaction) -> Result<Vec<ImageId>> {
        let table = txn.open_table(IMAGES).ctx(&self.dir)?;
        let mut ids = Vec::new();
        for entry in table.iter().ctx(&self.dir)? {
            ids.push(entry.ctx(&self.dir)?.0.value());
        }
        Ok(ids)
    }

    pub(super) fn record_in(&self, txn: &WriteTransaction, id: ImageId) -> Result<ImageRecord> {
        let table = txn.open_table(IMAGES).ctx(&self.dir)?;
        let value = table.get(id).ctx(&self.dir)?;
        let value =
            value.ok_or_else(|| self.corrupt(format!("image {id} is referenced but missing")))?;
        self.decode(value.value())
    }

    /// Decodes the chunks of image `id` in a chunked table (digests or extents), in order,
    /// handing each chunk's records to `each`.
    pub(super) fn read_chunks<T>(
        &self,
        table: &impl ReadableTable<(u32, u32), &'static [u8]>,
        id: ImageId,
        what: &str,
        decode: fn(&[u8]) -> std::result::Result<Vec<T>, String>,
        mut each: impl FnMut(Vec<T>) -> Result<()>,
    ) -> Result<()> {
        for entry in table.range((id, 0)..=(id, u32::MAX)).ctx(&self.dir)? {
            let (_, value) = entry.ctx(&self.dir)?;
            let bytes = self.unseal(value.value(), what)?;
            each(decode(bytes).map_err(|m| self.corrupt(m))?)?;
        }
        Ok(())
    }

    /// Feeds the stored digests of `record`, in block order, to `collector`, checked
    /// against the record's fingerprint once all are read.
    pub(super) fn read_digests(
        &self,
        record: &ImageRecord,
        collector: &mut DigestCollector,
    ) -> Result<()> {
        let mut chunk = Vec::with_capacity(CHUNK_RECORDS);
        self.each_digest(record, |block, digest| {
            chunk.push((block, digest));
            if chunk.len() == CHUNK_RECORDS {
                collector.extend(&chunk)?;
                chunk.clear();
            }
            Ok(())
        })?;
        collector.extend(&chunk)
    }

    /// The stored digests of `record`, in block order, in memory, checked against the
    /// record's fingerprint.
    pub(super) fn digest_list(&self, record: &ImageRecord) -> Result<Vec<(u64, Digest)>> {
        let mut digests = Vec::new();
        self.each_digest(record, |block, digest| {
            digests.push((block, digest));
            Ok(())
        })?;
        Ok(digests)
    }

    /// Hands every stored digest of `record` to `each`, in block order; then checks that
    /// they give the record's fingerprint (records from before fingerprints are trusted).
    fn each_digest(
        &self,
        record: &ImageRecord,
        mut each: impl FnMut(u64, Digest) -> Result<()>,
    ) -> Result<()> {
        let path = digests::list_path(&self.index_dir, record.id);
        let list = digests::StoredList::open(&path)?;
        let mut print = Fingerprint::new(record.size);
        for entry in list.iter()? {
            let (block, digest) = entry?;
            print.push(block, &digest);
            each(block, digest)?;
        }
        if list.image_size() != record.size
            || record
                .fingerprint
                .as_ref()
                .is_some_and(|want| *want != print.finish())
        {
            return Err(self.corrupt(format!(
                "digest list {} does not match image {}'s fingerprint; rebuild the catalog \
                 with `vmard --recover`",
                path.display(),
                record.name
            )));
        }
        Ok(())
    }

    /// Removes the digest list of image `id`, once no committed record needs it. A failure
    /// only leaves an orphan that the next open removes.
    pub(super) fn remove_list(&self, id: ImageId) {
        let path = digests::list_path(&self.index_dir, id);
        if let Err(e) = std::fs::remove_file(&path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!("cannot remove digest list {}: {e}", path.display());
        }
    }

    /// Moves the digests of every image out of redb's [`DIGESTS`] (schema 3 and before)
    /// into digest lists, in `txn`: each list is synced under its name before `txn`
    /// commits the emptied table, so a crash in between only repeats the move.
    pub(super) fn move_digests_out(&self, txn: &WriteTransaction) -> Result<usize> {
        let dir = &self.dir;
        let ids = self.ids(txn)?;
        let table = txn.open_table(DIGESTS).ctx(dir)?;
        for &id in &ids {
            let record = self.record_in(txn, id)?;
            let mut list = BlockDigests::create(&self.index_dir, record.size)?;
            self.read_chunks(&table, id, "digest", decode_digests, |chunk| {
                for (block, digest) in &chunk {
                    list.push(*block, digest)?;
                }
                Ok(())
            })?;
            list.finish()?
                .persist(&digests::list_path(&self.index_dir, id))?;
        }
        drop(table);
        txn.open_table(DIGESTS)
            .ctx(dir)?
            .retain(|_, _| false)
            .ctx(dir)?;
        Ok(ids.len())
    }

    /// The stored map of image `id` of `size` bytes.
    pub(super) fn map_in(
        &self,
        txn: &WriteTransaction,
        id: ImageId,
        size: u64,
    ) -> Result<BlockMap> {
        let table = txn.open_table(EXTENTS).ctx(&self.dir)?;
        self.map_from(&table, id, size)
    }

    /// The map of image `id` of `size` bytes, from an extents table of either kind of
    /// transaction.
    pub(super) fn map_from(
        &self,
        table: &impl ReadableTable<(u32, u32), &'static [u8]>,
        id: ImageId,
        size: u64,
    ) -> Result<BlockMap> {
        let mut extents = Vec::new();
        self.read_chunks(table, id, "extent", decode_extents, |chunk| {
            extents.extend(chunk);
            Ok(())
        })?;
        Ok(BlockMap {
            image: id,
            blocks: size.div_ceil(BLOCK_SIZE),
            extents,
        })
    }

    /// A counter in the meta table, as this transaction sees it.
    pub(super) fn meta_in(&self, txn: &WriteTransaction, key: &str) -> Result<u64> {
        let meta = txn.open_table(META).ctx(&self.dir)?;
        Ok(meta
            .get(key)
            .ctx(&self.dir)?
            .map(|v| v.value())
            .unwrap_or(0))
    }

    pub(super) fn chunk_number(&self, n: usize) -> Result<u32> {
        u32::try_from(n).map_err(|_| self.corrupt(format!("record chunk {n} out of range")))
    }

    pub(super) fn write_map(&self, txn: &WriteTransaction, map: &BlockMap) -> Result<()> {
        let mut table = txn.open_table(EXTENTS).ctx(&self.dir)?;
        for (n, chunk) in map.extents.chunks(CHUNK_RECORDS).enumerate() {
            let bytes = encode_extents(chunk);
            table
                .insert((map.image, self.chunk_number(n)?), seal(&bytes).as_slice())
                .ctx(&self.dir)?;
        }
        Ok(())
    }

    pub(super) fn write_record(&self, txn: &WriteTransaction, record: &ImageRecord) -> Result<()> {
        let dir = &self.dir;
        let bytes = serde_json::to_vec(record)
            .map_err(|e| self.corrupt(format!("cannot encode image record: {e}")))?;
        txn.open_table(IMAGES)
            .ctx(dir)?
            .insert(record.id, seal(&bytes).as_slice())
            .ctx(dir)?;
        txn.open_table(NAMES)
            .ctx(dir)?
            .insert(record.name.as_str(), record.id)
            .ctx(dir)?;
        txn.open_table(PATHS)
            .ctx(dir)?
            .insert(path_key(&record.path), record.id)
            .ctx(dir)?;
        Ok(())
    }
}

/// Deletes the chunks of image `id` from a chunked table.
pub(super) fn clear(
    txn: &WriteTransaction,
    table: TableDefinition<(u32, u32), &[u8]>,
    id: ImageId,
    dir: &Path,
) -> Result<()> {
    txn.open_table(table)
        .ctx(dir)?
        .retain_in((id, 0)..=(id, u32::MAX), |_, _| false)
        .ctx(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::captured_for_test as captured;

    #[test]
    fn a_damaged_record_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = captured(dir.path());
        let txn = catalog.write_txn().unwrap();
        {
            let mut table = txn.open_table(IMAGES).unwrap();
            let mut value = table.get(0).unwrap().unwrap().value().to_vec();
            value[5] ^= 0x01;
            table.insert(0, value.as_slice()).unwrap();
        }
        txn.commit().unwrap();
        let err = catalog.images().unwrap_err();
        assert!(err.to_string().contains("damaged image record"), "{err}");
    }

    #[test]
    fn schema_2_and_3_catalogs_are_sealed_and_their_digests_moved_out_on_open() {
        for schema in [2u64, 3] {
            let dir = tempfile::tempdir().unwrap();
            let state = dir.path().join("state");
            let catalog = captured(dir.path());
            let before = catalog.map("img").unwrap();
            let record = catalog.image("img").unwrap();
            let digests = catalog.digest_list(&record).unwrap();
            assert_eq!(digests.len(), 3);
            let list = digests::list_path(&catalog.index_dir, record.id);
            // Turn it into what vmar wrote before: digests in redb (unsealed before schema
            // 3), no digest list.
            let txn = catalog.write_txn().unwrap();
            {
                let bytes = crate::records::encode_digests(&digests);
                let stored = if schema == 2 { bytes } else { seal(&bytes) };
                txn.open_table(DIGESTS)
                    .unwrap()
                    .insert((0, 0), stored.as_slice())
                    .unwrap();
                if schema == 2 {
                    let mut images = txn.open_table(IMAGES).unwrap();
                    let v = unseal(images.get(0).unwrap().unwrap().value())
                        .unwrap()
                        .to_vec();
                    images.insert(0, v.as_slice()).unwrap();
                    let mut extents = txn.open_table(EXTENTS).unwrap();
                    let v = unseal(extents.get((0, 0)).unwrap().unwrap().value())
                        .unwrap()
                        .to_vec();
                    extents.insert((0, 0), v.as_slice()).unwrap();
                }
                txn.open_table(META)
                    .unwrap()
                    .insert("schema_version", schema)
                    .unwrap();
            }
            txn.commit().unwrap();
            std::fs::remove_file(&list).unwrap();
            drop(catalog);
            let catalog = Catalog::open(&state).unwrap();
            assert_eq!(catalog.map("img").unwrap(), before, "schema {schema}");
            assert_eq!(catalog.meta("schema_version").unwrap(), SCHEMA_VERSION);
            assert!(list.exists(), "schema {schema}: no digest list");
            assert_eq!(catalog.digest_list(&record).unwrap(), digests);
            let txn = catalog.read_txn().unwrap();
            assert_eq!(txn.open_table(DIGESTS).unwrap().iter().unwrap().count(), 0);
        }
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = captured(dir.path());
        let txn = catalog.write_txn().unwrap();
        txn.open_table(META)
            .unwrap()
            .insert("schema_version", SCHEMA_VERSION + 1)
            .unwrap();
        txn.commit().unwrap();
        drop(catalog);
        let err = Catalog::open(&dir.path().join("state")).err().unwrap();
        assert!(err.to_string().contains("not supported"), "{err}");
    }

    #[test]
    fn digest_lists_are_checked_kept_once_and_removed_with_their_image() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let catalog = captured(dir.path());
        let record = catalog.image("img").unwrap();
        let list = digests::list_path(&catalog.index_dir, record.id);
        assert!(list.exists());
        // Nothing of the digests is left in redb.
        let txn = catalog.read_txn().unwrap();
        assert_eq!(txn.open_table(DIGESTS).unwrap().iter().unwrap().count(), 0);
        drop(txn);
        let sampled = catalog.sample_digests(record.id, &[0, 2, 5]).unwrap();
        assert_eq!(
            sampled,
            vec![
                Some(*blake3::hash(&[7u8; 4096]).as_bytes()),
                Some(*blake3::hash(&[7u8; 4096]).as_bytes()),
                None
            ]
        );
        // A damaged list is refused where it is read whole.
        let mut bytes = std::fs::read(&list).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&list, &bytes).unwrap();
        let err = catalog.digest_list(&record).unwrap_err();
        assert!(err.to_string().contains("fingerprint"), "{err}");
        bytes[last] ^= 1;
        std::fs::write(&list, &bytes).unwrap();
        // An orphan (a crash between a list's rename and its commit) goes at open.
        let orphan = digests::list_path(&catalog.index_dir, 99);
        std::fs::copy(&list, &orphan).unwrap();
        drop(catalog);
        let catalog = Catalog::open(&state).unwrap();
        assert!(!orphan.exists() && list.exists());
        catalog.forget("img").unwrap();
        assert!(!list.exists(), "the list outlived its image");
    }

    #[test]
    fn references_and_paths_are_rebuilt_for_catalogs_without_them_and_forget_uses_them() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let catalog = Catalog::open(&state).unwrap();
        // a holds A; b and c copy it; c also holds its own B, which d copies.
        let blocks = |fill: &[u8]| fill.iter().flat_map(|&f| [f; 4096]).collect::<Vec<u8>>();
        for (name, fill) in [
            ("a", &[1u8][..]),
            ("b", &[9, 1]),
            ("c", &[1, 2]),
            ("d", &[2]),
        ] {
            let path = dir.path().join(format!("{name}.raw"));
            std::fs::write(&path, blocks(fill)).unwrap();
            let file = ImageFile::open(&path).unwrap();
            catalog.capture(&file, None, false, &mut |_| {}).unwrap();
        }
        let refs = |catalog: &Catalog| {
            let txn = catalog.write_txn().unwrap();
            let table = txn.open_table(REFS).unwrap();
            let refs: Vec<((u32, u32), u64)> = table
                .iter()
                .unwrap()
                .map(|e| {
                    let (k, v) = e.unwrap();
                    (k.value(), v.value())
                })
                .collect();
            refs
        };
        let want = vec![((0, 1), 1), ((0, 2), 1), ((2, 3), 1)];
        assert_eq!(refs(&catalog), want);
        // What vmar wrote before references were kept.
        let txn = catalog.write_txn().unwrap();
        txn.open_table(REFS).unwrap().retain(|_, _| false).unwrap();
        txn.open_table(META).unwrap().remove(REFS_BUILT).unwrap();
        txn.open_table(PATHS).unwrap().retain(|_, _| false).unwrap();
        txn.open_table(META).unwrap().remove(PATHS_BUILT).unwrap();
        txn.commit().unwrap();
        drop(catalog);
        assert!(
            Catalog::open(&state)
                .unwrap()
                .image_at(&dir.path().join("c.raw"))
                .unwrap()
                .is_some_and(|r| r.name == "c")
        );
        let catalog = Catalog::open(&state).unwrap();
        assert_eq!(refs(&catalog), want);
        // Forgetting a moves A to b (the earliest copy); c now reads it from b.
        let (_, changed) = catalog.forget("a").unwrap();
        assert_eq!(changed, ["b", "c"]);
        assert_eq!(refs(&catalog), vec![((1, 2), 1), ((2, 3), 1)]);
        assert_eq!(catalog.dead().unwrap(), BTreeSet::from([0]));
        let (_, c) = catalog.map("c").unwrap();
        assert_eq!(
            c.source_of(0),
            Some(Source::Redirect { image: 1, block: 1 })
        );
        assert_eq!(catalog.map("b").unwrap().1.source_of(1), Some(Source::Own));
    }

    #[test]
    fn the_backup_follows_every_change_through_journal_and_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = captured(dir.path());
        let state = dir.path().join("state");
        let device = |n: usize| DeviceRecord {
            name: format!("vm{}", n % 7),
            image: "img".into(),
            created_at: n as u64,
            state: Default::default(),
            changed: Vec::new(),
        };
        // Far more changes than the journal takes before a snapshot is rewritten.
        for n in 0..150 {
            catalog.save_device(&device(n)).unwrap();
            if n % 3 == 0 {
                catalog.forget_device(&device(n + 1).name).unwrap();
            }
            let backup = crate::backup::read(&state).unwrap();
            assert_eq!(backup.images, catalog.images().unwrap(), "after change {n}");
            assert_eq!(
                backup.devices,
                catalog.devices().unwrap(),
                "after change {n}"
            );
        }
        let journal = std::fs::read_to_string(state.join(crate::backup::JOURNAL_FILE)).unwrap();
        assert!(
            journal.lines().count() <= 64,
            "the journal is emptied by snapshots"
        );
        // A vmard started later goes on numbering above what the backup holds.
        let last = crate::backup::last_seq(&state);
        drop(catalog);
        let catalog = Catalog::open(&state).unwrap();
        catalog.forget_device("vm1").unwrap();
        assert!(crate::backup::last_seq(&state) > last);
        assert_eq!(
            crate::backup::read(&state).unwrap().devices,
            catalog.devices().unwrap()
        );
    }
}
