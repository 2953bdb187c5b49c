//! The catalog's redb plumbing: transactions (re-opened after an I/O error), commits
//! through a fault point, and the chunked digest, extent and record tables.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableTable, TableDefinition, WriteTransaction};

use super::*;

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

    pub(super) fn read_txn(&self) -> Result<redb::ReadTransaction> {
        let db = self.db.read().unwrap_or_else(|p| p.into_inner());
        match &*db {
            Some(db) => db.begin_read().ctx(&self.dir),
            None => Err::<_, redb::Error>(redb::Error::PreviousIo).ctx(&self.dir),
        }
    }

    pub(super) fn write_txn(&self) -> Result<WriteTransaction> {
        self.begin_write().map_err(|e| Error::Catalog {
            dir: self.dir.clone(),
            message: e.to_string(),
        })
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
        fault::point("catalog.commit")?;
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

    /// Feeds the stored digests of image `id`, in block order, to `collector`, a chunk at
    /// a time.
    pub(super) fn read_digests(
        &self,
        txn: &WriteTransaction,
        id: ImageId,
        collector: &mut DigestCollector,
    ) -> Result<()> {
        let table = txn.open_table(DIGESTS).ctx(&self.dir)?;
        for entry in table.range((id, 0)..=(id, u32::MAX)).ctx(&self.dir)? {
            let (_, value) = entry.ctx(&self.dir)?;
            let bytes = self.unseal(value.value(), "digest")?;
            collector.extend(&decode_digests(bytes).map_err(|m| self.corrupt(m))?)?;
        }
        Ok(())
    }

    /// The stored digests of image `id`, in block order, in memory.
    pub(super) fn digest_list_in(
        &self,
        txn: &WriteTransaction,
        id: ImageId,
    ) -> Result<Vec<(u64, crate::scan::Digest)>> {
        let table = txn.open_table(DIGESTS).ctx(&self.dir)?;
        let mut digests = Vec::new();
        for entry in table.range((id, 0)..=(id, u32::MAX)).ctx(&self.dir)? {
            let (_, value) = entry.ctx(&self.dir)?;
            let bytes = self.unseal(value.value(), "digest")?;
            digests.extend(decode_digests(bytes).map_err(|m| self.corrupt(m))?);
        }
        Ok(digests)
    }

    /// The stored map of image `id` of `size` bytes.
    pub(super) fn map_in(
        &self,
        txn: &WriteTransaction,
        id: ImageId,
        size: u64,
    ) -> Result<BlockMap> {
        let table = txn.open_table(EXTENTS).ctx(&self.dir)?;
        let mut extents = Vec::new();
        for entry in table.range((id, 0)..=(id, u32::MAX)).ctx(&self.dir)? {
            let (_, value) = entry.ctx(&self.dir)?;
            let bytes = self.unseal(value.value(), "extent")?;
            extents.extend(decode_extents(bytes).map_err(|m| self.corrupt(m))?);
        }
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

    /// Stores the digests of image `id` (block order), a chunk at a time.
    pub(super) fn write_digests(
        &self,
        txn: &WriteTransaction,
        id: ImageId,
        digests: &BlockDigests,
    ) -> Result<()> {
        let mut table = txn.open_table(DIGESTS).ctx(&self.dir)?;
        let mut chunk = Vec::with_capacity(CHUNK_RECORDS);
        let mut n = 0;
        let mut records = digests.iter()?;
        loop {
            let record = records.next().transpose()?;
            if let Some(record) = record {
                chunk.push(record);
            }
            if chunk.len() == CHUNK_RECORDS || (record.is_none() && !chunk.is_empty()) {
                table
                    .insert(
                        (id, self.chunk_number(n)?),
                        seal(&encode_digests(&chunk)).as_slice(),
                    )
                    .ctx(&self.dir)?;
                chunk.clear();
                n += 1;
            }
            if record.is_none() {
                return Ok(());
            }
        }
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

/// Something in `dir` that only an existing catalog leaves: index runs or a backup.
pub(super) fn existing_state(dir: &Path) -> Option<PathBuf> {
    let backup = dir.join(crate::backup::BACKUP_FILE);
    if backup.exists() {
        return Some(backup);
    }
    let index = dir.join(INDEX_DIR);
    std::fs::read_dir(&index).ok()?.flatten().find_map(|e| {
        let name = e.file_name();
        let name = name.to_string_lossy();
        (name.starts_with("run-") && name.ends_with(".idx")).then(|| e.path())
    })
}

/// Creates `dir` readable by its owner only (vmard's state names host files and devices).
pub(super) fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io("cannot create state dir", dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn captured(dir: &Path) -> Catalog {
        let image = dir.join("img.raw");
        std::fs::write(&image, [7u8; 3 * 4096]).unwrap();
        let catalog = Catalog::open(&dir.join("state")).unwrap();
        let file = ImageFile::open(&image).unwrap();
        catalog.capture(&file, None, false, &mut |_| {}).unwrap();
        catalog
    }

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
    fn schema_2_catalogs_are_sealed_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = captured(dir.path());
        let before = catalog.map("img").unwrap();
        // Turn it into what vmar wrote before records had checksums.
        let txn = catalog.write_txn().unwrap();
        {
            let mut images = txn.open_table(IMAGES).unwrap();
            let v = unseal(images.get(0).unwrap().unwrap().value())
                .unwrap()
                .to_vec();
            images.insert(0, v.as_slice()).unwrap();
            for def in [DIGESTS, EXTENTS] {
                let mut table = txn.open_table(def).unwrap();
                let v = unseal(table.get((0, 0)).unwrap().unwrap().value())
                    .unwrap()
                    .to_vec();
                table.insert((0, 0), v.as_slice()).unwrap();
            }
            txn.open_table(META)
                .unwrap()
                .insert("schema_version", 2)
                .unwrap();
        }
        txn.commit().unwrap();
        drop(catalog);
        let catalog = Catalog::open(&dir.path().join("state")).unwrap();
        assert_eq!(catalog.map("img").unwrap(), before);
        assert_eq!(catalog.meta("schema_version").unwrap(), SCHEMA_VERSION);
    }

    #[test]
    fn references_are_rebuilt_for_catalogs_without_them_and_forget_uses_them() {
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
        txn.commit().unwrap();
        drop(catalog);
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
}
