//! The catalog: an embedded, transactional store (redb) of captured images, their block
//! digests, the content index digest -> canonical location, and each image's map.
//!
//! Crash safety comes from redb: every capture, re-capture and removal is one write
//! transaction, committed with fsync, so after a crash the catalog holds either the whole
//! change or none of it. The content index is a B-tree on disk; lookups read the pages they
//! need through a bounded cache, never the whole index.
//!
//! Invariant: the canonical location of a digest is its first occurrence in capture order
//! (image id, then block). Capturing a new image only adds entries, so the maps of images
//! captured before never change. Re-capturing or removing image K rebuilds the index and maps
//! of images K.. from their stored digests, without reading any image.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableTable, Table, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::image::{ImageFile, ImageIdentity, default_name, validate_name};
use crate::map::{BlockMap, Extent, ImageId, MapBuilder, MapSummary, Source};
use crate::scan::{Digest, Scan, ScanStats};

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// id -> JSON of [`ImageRecord`].
const IMAGES: TableDefinition<u32, &[u8]> = TableDefinition::new("images");
const NAMES: TableDefinition<&str, u32> = TableDefinition::new("image_names");
/// (image, block) -> digest, for non-zero blocks only.
const DIGESTS: TableDefinition<(u32, u64), Digest> = TableDefinition::new("digests");
/// digest -> (image, block) of the canonical copy.
const CONTENT: TableDefinition<Digest, (u32, u64)> = TableDefinition::new("content");
/// (image, start) -> (kind, len, source image, source block).
const EXTENTS: TableDefinition<(u32, u64), (u8, u64, u32, u64)> = TableDefinition::new("extents");

const SCHEMA_VERSION: u64 = 1;
const NEXT_ID: &str = "next_image_id";
/// File name of the catalog inside the state directory.
pub const CATALOG_FILE: &str = "catalog.redb";
/// Page cache of the catalog: bounds its memory whatever the number of images.
const CACHE_BYTES: usize = 64 << 20;

/// A captured image as the catalog knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub id: ImageId,
    pub name: String,
    pub path: PathBuf,
    pub size: u64,
    pub identity: ImageIdentity,
    /// Seconds since the epoch.
    pub captured_at: u64,
    pub scan: ScanStats,
    pub summary: MapSummary,
}

/// What a capture request did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CaptureStatus {
    Captured,
    /// Same identity as already captured: nothing was read.
    Unchanged,
    Recaptured,
}

/// Progress of a long operation, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub done: u64,
    pub total: u64,
}

/// The catalog in a state directory.
pub struct Catalog {
    db: Database,
    dir: PathBuf,
}

/// Turns any redb error into a catalog error naming the directory.
trait CatalogContext<T> {
    fn ctx(self, dir: &Path) -> Result<T>;
}

impl<T, E: Into<redb::Error>> CatalogContext<T> for std::result::Result<T, E> {
    fn ctx(self, dir: &Path) -> Result<T> {
        self.map_err(|e| Error::Catalog {
            dir: dir.to_path_buf(),
            message: e.into().to_string(),
        })
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Catalog {
    /// Opens (creating if needed) the catalog in `dir`. Only one process may hold it.
    pub fn open(dir: &Path) -> Result<Catalog> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io("cannot create state dir", dir, e))?;
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(dir.join(CATALOG_FILE))
            .ctx(dir)?;
        let catalog = Catalog {
            db,
            dir: dir.to_path_buf(),
        };
        catalog.init()?;
        Ok(catalog)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn init(&self) -> Result<()> {
        let dir = &self.dir;
        let txn = self.db.begin_write().ctx(dir)?;
        {
            let mut meta = txn.open_table(META).ctx(dir)?;
            let version = meta.get("schema_version").ctx(dir)?.map(|v| v.value());
            match version {
                None => {
                    meta.insert("schema_version", SCHEMA_VERSION).ctx(dir)?;
                }
                Some(SCHEMA_VERSION) => {}
                Some(other) => {
                    return Err(Error::Catalog {
                        dir: dir.clone(),
                        message: format!(
                            "schema version {other} is not supported by this vmar (it reads {SCHEMA_VERSION})"
                        ),
                    });
                }
            }
            txn.open_table(IMAGES).ctx(dir)?;
            txn.open_table(NAMES).ctx(dir)?;
            txn.open_table(DIGESTS).ctx(dir)?;
            txn.open_table(CONTENT).ctx(dir)?;
            txn.open_table(EXTENTS).ctx(dir)?;
        }
        txn.commit().ctx(dir)
    }

    fn decode(&self, bytes: &[u8]) -> Result<ImageRecord> {
        serde_json::from_slice(bytes).map_err(|e| Error::Catalog {
            dir: self.dir.clone(),
            message: format!("corrupt image record: {e}"),
        })
    }

    /// All images in capture order.
    pub fn images(&self) -> Result<Vec<ImageRecord>> {
        let dir = &self.dir;
        let txn = self.db.begin_read().ctx(dir)?;
        let table = txn.open_table(IMAGES).ctx(dir)?;
        let mut records = Vec::new();
        for entry in table.iter().ctx(dir)? {
            let (_, value) = entry.ctx(dir)?;
            records.push(self.decode(value.value())?);
        }
        Ok(records)
    }

    /// The image called `name`.
    pub fn image(&self, name: &str) -> Result<ImageRecord> {
        let dir = &self.dir;
        let txn = self.db.begin_read().ctx(dir)?;
        let names = txn.open_table(NAMES).ctx(dir)?;
        let id = names.get(name).ctx(dir)?.map(|v| v.value());
        let id = id.ok_or_else(|| Error::UnknownImage {
            name: name.to_string(),
        })?;
        let images = txn.open_table(IMAGES).ctx(dir)?;
        let record = images.get(id).ctx(dir)?.ok_or_else(|| Error::Catalog {
            dir: dir.clone(),
            message: format!("name {name:?} points to missing image {id}"),
        })?;
        self.decode(record.value())
    }

    /// The image with catalog id `id`.
    pub fn image_by_id(&self, id: ImageId) -> Result<ImageRecord> {
        let dir = &self.dir;
        let txn = self.db.begin_read().ctx(dir)?;
        let images = txn.open_table(IMAGES).ctx(dir)?;
        let record = images.get(id).ctx(dir)?.ok_or_else(|| Error::Catalog {
            dir: dir.clone(),
            message: format!("image {id} is referenced but missing"),
        })?;
        self.decode(record.value())
    }

    /// The map of image `name`.
    pub fn map(&self, name: &str) -> Result<(ImageRecord, BlockMap)> {
        let record = self.image(name)?;
        let dir = &self.dir;
        let txn = self.db.begin_read().ctx(dir)?;
        let table = txn.open_table(EXTENTS).ctx(dir)?;
        let mut extents = Vec::new();
        for entry in table
            .range((record.id, 0)..=(record.id, u64::MAX))
            .ctx(dir)?
        {
            let (key, value) = entry.ctx(dir)?;
            let ((_, start), (kind, len, image, block)) = (key.value(), value.value());
            let source = match kind {
                0 => Source::Zero,
                1 => Source::Own,
                2 => Source::Redirect { image, block },
                other => {
                    return Err(Error::Catalog {
                        dir: dir.clone(),
                        message: format!("corrupt extent kind {other} in image {name:?}"),
                    });
                }
            };
            extents.push(Extent { start, len, source });
        }
        let map = BlockMap {
            image: record.id,
            blocks: record.size.div_ceil(crate::image::BLOCK_SIZE),
            extents,
        };
        Ok((record, map))
    }

    /// Captures `image`: hashes it, records its digests and map. See [`CaptureStatus`] for
    /// what happens when the image is already in the catalog. `progress` is called as bytes
    /// are read.
    pub fn capture(
        &self,
        image: &ImageFile,
        name: Option<&str>,
        recapture: bool,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<(ImageRecord, CaptureStatus)> {
        let dir = &self.dir;
        if let Some(name) = name {
            validate_name(name)?;
        }
        // Write transactions are exclusive: what is checked here stays true until commit.
        let txn = self.db.begin_write().ctx(dir)?;
        let existing = self.find_by_path(&txn, &image.path)?;
        let (id, name, status) = match existing {
            Some(record) => {
                if let Some(wanted) = name
                    && wanted != record.name
                {
                    return Err(Error::AlreadyCaptured {
                        name: record.name,
                        path: record.path,
                    });
                }
                if record.identity == image.identity {
                    return Ok((record, CaptureStatus::Unchanged));
                }
                if !recapture {
                    return Err(Error::ImageChanged {
                        what: record.identity.describe_change(&image.identity),
                        name: record.name,
                        path: record.path,
                    });
                }
                (record.id, record.name, CaptureStatus::Recaptured)
            }
            None => {
                let name = match name {
                    Some(name) => name.to_string(),
                    None => default_name(&image.path),
                };
                validate_name(&name)?;
                let taken = txn
                    .open_table(NAMES)
                    .ctx(dir)?
                    .get(name.as_str())
                    .ctx(dir)?
                    .map(|v| v.value());
                if let Some(other) = taken {
                    let other = self.record_in(&txn, other)?;
                    return Err(Error::NameTaken {
                        name,
                        path: other.path,
                    });
                }
                let mut meta = txn.open_table(META).ctx(dir)?;
                let next = meta.get(NEXT_ID).ctx(dir)?.map(|v| v.value()).unwrap_or(0);
                let id = ImageId::try_from(next).map_err(|_| Error::Catalog {
                    dir: dir.clone(),
                    message: "too many images".into(),
                })?;
                meta.insert(NEXT_ID, next + 1).ctx(dir)?;
                (id, name, CaptureStatus::Captured)
            }
        };
        let later: Vec<ImageId> = if status == CaptureStatus::Recaptured {
            let later = self.ids_from(&txn, id + 1)?;
            self.unindex_from(&txn, id)?;
            self.clear_image(&txn, id)?;
            later
        } else {
            Vec::new()
        };

        let (map, scan) = self.index_image(&txn, image, id, progress)?;
        let now = image.current_identity()?;
        if now != image.identity {
            return Err(Error::ChangedDuringCapture {
                path: image.path.clone(),
                what: image.identity.describe_change(&now),
            });
        }
        let record = ImageRecord {
            id,
            name,
            path: image.path.clone(),
            size: image.size,
            identity: image.identity,
            captured_at: now_secs(),
            scan,
            summary: map.summary(image.size),
        };
        self.write_map(&txn, &map)?;
        self.write_record(&txn, &record)?;
        for later_id in later {
            self.remap(&txn, later_id)?;
        }
        txn.commit().ctx(dir)?;
        Ok((record, status))
    }

    /// Removes image `name` from the catalog. Images captured after it that redirected to it
    /// get new maps (their blocks' new canonical copies), rebuilt from stored digests.
    pub fn forget(&self, name: &str) -> Result<ImageRecord> {
        let dir = &self.dir;
        let txn = self.db.begin_write().ctx(dir)?;
        let id = txn
            .open_table(NAMES)
            .ctx(dir)?
            .get(name)
            .ctx(dir)?
            .map(|v| v.value())
            .ok_or_else(|| Error::UnknownImage {
                name: name.to_string(),
            })?;
        let record = self.record_in(&txn, id)?;
        let later = self.ids_from(&txn, id + 1)?;
        self.unindex_from(&txn, id)?;
        self.clear_image(&txn, id)?;
        txn.open_table(IMAGES).ctx(dir)?.remove(id).ctx(dir)?;
        txn.open_table(NAMES).ctx(dir)?.remove(name).ctx(dir)?;
        for later_id in later {
            self.remap(&txn, later_id)?;
        }
        txn.commit().ctx(dir)?;
        Ok(record)
    }

    fn record_in(&self, txn: &WriteTransaction, id: ImageId) -> Result<ImageRecord> {
        let table = txn.open_table(IMAGES).ctx(&self.dir)?;
        let value = table
            .get(id)
            .ctx(&self.dir)?
            .ok_or_else(|| Error::Catalog {
                dir: self.dir.clone(),
                message: format!("image {id} is referenced but missing"),
            })?;
        self.decode(value.value())
    }

    fn find_by_path(&self, txn: &WriteTransaction, path: &Path) -> Result<Option<ImageRecord>> {
        let table = txn.open_table(IMAGES).ctx(&self.dir)?;
        for entry in table.iter().ctx(&self.dir)? {
            let (_, value) = entry.ctx(&self.dir)?;
            let record = self.decode(value.value())?;
            if record.path == path {
                return Ok(Some(record));
            }
        }
        Ok(None)
    }

    fn ids_from(&self, txn: &WriteTransaction, first: ImageId) -> Result<Vec<ImageId>> {
        let table = txn.open_table(IMAGES).ctx(&self.dir)?;
        let mut ids = Vec::new();
        for entry in table.range(first..).ctx(&self.dir)? {
            ids.push(entry.ctx(&self.dir)?.0.value());
        }
        Ok(ids)
    }

    /// Removes from the content index every entry whose canonical copy is in image `first` or
    /// later; entries of earlier images stay, so their maps stay valid.
    fn unindex_from(&self, txn: &WriteTransaction, first: ImageId) -> Result<()> {
        let dir = &self.dir;
        let digests = txn.open_table(DIGESTS).ctx(dir)?;
        let mut content = txn.open_table(CONTENT).ctx(dir)?;
        for entry in digests.range((first, 0)..).ctx(dir)? {
            let (_, digest) = entry.ctx(dir)?;
            let digest = digest.value();
            let canonical = content.get(&digest).ctx(dir)?.map(|v| v.value());
            if let Some((image, _)) = canonical
                && image >= first
            {
                content.remove(&digest).ctx(dir)?;
            }
        }
        Ok(())
    }

    /// Deletes the digests and extents of image `id`.
    fn clear_image(&self, txn: &WriteTransaction, id: ImageId) -> Result<()> {
        let dir = &self.dir;
        let range = (id, 0)..=(id, u64::MAX);
        txn.open_table(DIGESTS)
            .ctx(dir)?
            .retain_in(range.clone(), |_, _| false)
            .ctx(dir)?;
        txn.open_table(EXTENTS)
            .ctx(dir)?
            .retain_in(range, |_, _| false)
            .ctx(dir)
    }

    /// Reads `image` and records its digests; returns its map.
    fn index_image(
        &self,
        txn: &WriteTransaction,
        image: &ImageFile,
        id: ImageId,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<(BlockMap, ScanStats)> {
        let dir = &self.dir;
        let mut digests = txn.open_table(DIGESTS).ctx(dir)?;
        let mut content = txn.open_table(CONTENT).ctx(dir)?;
        let mut builder = MapBuilder::new(id, image.block_count());
        let scan = Scan::new(&image.file, image.size, &image.path)?;
        let total = scan.data_bytes();
        let mut done = 0;
        progress(Progress { done, total });
        let stats = scan.run(|batch| {
            for (block, digest) in &batch.digests {
                digests.insert((id, *block), digest).ctx(dir)?;
                let source = canonical_source(&mut content, dir, id, *block, digest)?;
                builder.push(*block, 1, source);
            }
            done += batch.read_bytes;
            progress(Progress { done, total });
            Ok(())
        })?;
        Ok((builder.finish(), stats))
    }

    /// Rebuilds the map of image `id` from its stored digests (after the index changed
    /// under it), re-registering its canonical copies.
    fn remap(&self, txn: &WriteTransaction, id: ImageId) -> Result<()> {
        let dir = &self.dir;
        let mut record = self.record_in(txn, id)?;
        let mut builder = MapBuilder::new(id, record.size.div_ceil(crate::image::BLOCK_SIZE));
        {
            let digests = txn.open_table(DIGESTS).ctx(dir)?;
            let mut content = txn.open_table(CONTENT).ctx(dir)?;
            for entry in digests.range((id, 0)..=(id, u64::MAX)).ctx(dir)? {
                let (key, digest) = entry.ctx(dir)?;
                let block = key.value().1;
                let source = canonical_source(&mut content, dir, id, block, &digest.value())?;
                builder.push(block, 1, source);
            }
        }
        let map = builder.finish();
        txn.open_table(EXTENTS)
            .ctx(dir)?
            .retain_in((id, 0)..=(id, u64::MAX), |_, _| false)
            .ctx(dir)?;
        self.write_map(txn, &map)?;
        record.summary = map.summary(record.size);
        self.write_record(txn, &record)
    }

    fn write_map(&self, txn: &WriteTransaction, map: &BlockMap) -> Result<()> {
        let mut table = txn.open_table(EXTENTS).ctx(&self.dir)?;
        for e in &map.extents {
            let value = match e.source {
                Source::Zero => (0u8, e.len, 0, 0),
                Source::Own => (1, e.len, 0, 0),
                Source::Redirect { image, block } => (2, e.len, image, block),
            };
            table.insert((map.image, e.start), value).ctx(&self.dir)?;
        }
        Ok(())
    }

    fn write_record(&self, txn: &WriteTransaction, record: &ImageRecord) -> Result<()> {
        let dir = &self.dir;
        let bytes = serde_json::to_vec(record).map_err(|e| Error::Catalog {
            dir: dir.clone(),
            message: format!("cannot encode image record: {e}"),
        })?;
        txn.open_table(IMAGES)
            .ctx(dir)?
            .insert(record.id, bytes.as_slice())
            .ctx(dir)?;
        txn.open_table(NAMES)
            .ctx(dir)?
            .insert(record.name.as_str(), record.id)
            .ctx(dir)?;
        Ok(())
    }
}

/// Where block `block` of image `id` with content `digest` is served from: the canonical copy
/// if the content was seen before, else the block itself, which becomes canonical.
fn canonical_source(
    content: &mut Table<Digest, (u32, u64)>,
    dir: &Path,
    id: ImageId,
    block: u64,
    digest: &Digest,
) -> Result<Source> {
    let existing = content.get(digest).ctx(dir)?.map(|v| v.value());
    match existing {
        Some((image, block)) => Ok(Source::Redirect { image, block }),
        None => {
            content.insert(digest, (id, block)).ctx(dir)?;
            Ok(Source::Own)
        }
    }
}
