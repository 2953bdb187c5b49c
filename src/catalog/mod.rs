//! The catalog: an embedded, transactional store of captured images (redb), their block
//! digests and maps, and the content index of canonical copies ([`crate::index`]).
//!
//! Crash safety: every capture, re-capture and removal commits one redb transaction (fsync)
//! that names the index runs it relies on; runs are synced to disk before that commit, and
//! runs no commit names are removed on open. After a crash the catalog holds the whole change
//! or none of it.
//!
//! Invariant: the canonical copy of a content is its first occurrence in capture order (image
//! id, then block). A capture only adds index entries, so maps of images captured before never
//! change. Forgetting image K changes only the maps that redirect to it (found in the
//! reference table): each content K held moves to its first copy in the earliest of them. A
//! re-capture forgets the old version and captures the new one last. Neither reads an image.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use redb::{Database, ReadableTable, TableDefinition, WriteTransaction};

use crate::digests;
use crate::error::{Error, Result};
use crate::fault;
use crate::image::{BLOCK_SIZE, ImageFile, default_name, validate_name};
use crate::index::{self, Run, RunWriter};
use crate::map::{BlockMap, ImageId, MapBuilder, MapSummary, Source};
use crate::progress::Progress;
pub use crate::records::{CaptureStatus, DeviceRecord, DeviceState, ImageRecord, NameBinding};
use crate::records::{decode_digests, decode_extents, encode_extents, seal, unseal};
use crate::scan::hash_image;
use crate::sidecar::{SidecarReport, SidecarWriter, Sidecars};
use crate::spill::{BlockDigests, DigestCollector, Hashed, SortedRedirects, Spill};
use crate::time::now_secs;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// id -> JSON of [`ImageRecord`].
const IMAGES: TableDefinition<u32, &[u8]> = TableDefinition::new("images");
const NAMES: TableDefinition<&str, u32> = TableDefinition::new("image_names");
/// Image path (bytes) -> id: finding the image at a path without reading every record.
const PATHS: TableDefinition<&[u8], u32> = TableDefinition::new("image_paths");
/// (image, chunk) -> digests of non-zero blocks, [`DIGEST_RECORD`] bytes each, block order.
const DIGESTS: TableDefinition<(u32, u32), &[u8]> = TableDefinition::new("digests");
/// (image, chunk) -> extents of the map, [`EXTENT_RECORD`] bytes each, in order.
const EXTENTS: TableDefinition<(u32, u32), &[u8]> = TableDefinition::new("extents");
/// Device name -> JSON of [`DeviceRecord`]: the devices vmard should serve (desired state).
const DEVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("devices");
/// Device name -> JSON of [`NameBinding`]: the content each device name served, kept after
/// the device is removed.
const NAME_BINDINGS: TableDefinition<&str, &[u8]> = TableDefinition::new("device_name_bindings");
/// Run id -> entries: the runs of the content index, oldest first.
const RUNS: TableDefinition<u64, u64> = TableDefinition::new("index_runs");
/// Run id -> blake3 of the run file: a damaged run is found when it is opened.
const RUN_SUMS: TableDefinition<u64, &[u8]> = TableDefinition::new("index_run_sums");
/// (canonical image, image redirecting to it) -> blocks redirected: the images whose maps
/// change when an image is forgotten, found without reading every map.
const REFS: TableDefinition<(u32, u32), u64> = TableDefinition::new("image_refs");
/// Forgotten images whose entries may still be in index runs: lookups skip them, merges drop
/// them. Emptied when the index is rebuilt from scratch.
const DEAD: TableDefinition<u32, u64> = TableDefinition::new("dead_images");

/// 3: every record value is sealed with a checksum (schema 2 catalogs are upgraded in place).
/// 4: block digests live in digest lists next to the index runs ([`crate::digests`]), not in
/// [`DIGESTS`] (schema 2 and 3 catalogs are moved out on open; vmar before 4 refuses 4).
const SCHEMA_VERSION: u64 = 4;
const NEXT_ID: &str = "next_image_id";
const NEXT_RUN: &str = "next_run_id";
/// Set once [`REFS`] holds every image's references (catalogs from before it are filled in
/// on open).
const REFS_BUILT: &str = "refs_built";
/// Set once [`PATHS`] names every image (filled in on open, like [`REFS_BUILT`]).
const PATHS_BUILT: &str = "paths_built";
/// File name of the catalog inside the state directory.
pub const CATALOG_FILE: &str = "catalog.redb";
/// Directory of the content index runs inside the state directory.
pub const INDEX_DIR: &str = "index";
/// Page cache of the catalog: bounds its memory whatever the number of images.
const CACHE_BYTES: usize = 32 << 20;
/// Records per stored chunk of digests or extents.
const CHUNK_RECORDS: usize = 16 * 1024;

/// The catalog in a state directory.
pub struct Catalog {
    /// The open database; `None` only while it is re-opened after an I/O error.
    db: RwLock<Option<Database>>,
    file: PathBuf,
    dir: PathBuf,
    index_dir: PathBuf,
    /// Serialises changes, and holds the runs of the content index as last committed.
    runs: Mutex<Vec<Run>>,
    /// Per-block records a capture keeps in memory before spilling ([`crate::spill`]).
    spill_records: AtomicUsize,
    /// Where the backup stands; `None` until the first change after open, which writes a
    /// snapshot.
    backup: Mutex<Option<recover::BackupPosition>>,
    /// The state directory's lock, held while the catalog is open.
    _lock: StateLock,
    /// Digest sidecars on shared storage ([`crate::sidecar`]); `None` when off.
    sidecars: RwLock<Option<Arc<Sidecars>>>,
    /// Set by [`Catalog::close`]: the database is closed for good, not re-opened.
    closed: AtomicBool,
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

mod backfill;
mod capture;
mod compact;
mod devices;
mod forget;
mod held;
mod lock;
mod rebuild;
mod recover;
mod refs;
mod runs;
mod stamps;
mod state_dir;
mod store;
mod workset;

pub use capture::Captured;

/// For the catalog's unit tests: a catalog in `dir/state` that has captured one small image,
/// `dir/img.raw` (three blocks of 7s).
#[cfg(test)]
fn captured_for_test(dir: &Path) -> Catalog {
    let image = dir.join("img.raw");
    std::fs::write(&image, [7u8; 3 * 4096]).unwrap();
    let catalog = Catalog::open(&dir.join("state")).unwrap();
    let file = ImageFile::open(&image).unwrap();
    catalog.capture(&file, None, false, &mut |_| {}).unwrap();
    catalog
}

pub use lock::{LOCK_FILE, StateLock};
pub use recover::Recovery;
use state_dir::{create_private_dir, existing_state};
use store::clear;

impl Catalog {
    /// Opens the catalog in `dir`, creating it only in a directory that holds no vmar state
    /// yet. Only one process may hold it. A missing, empty or unreadable catalog next to
    /// index runs or backups is refused with what to do: vmard never starts over silently.
    /// The state directory is locked first; a recovery that was killed after it had built
    /// its new catalog is finished (see [`Catalog::recover`]).
    pub fn open(dir: &Path) -> Result<Catalog> {
        let lock = StateLock::take(dir)?;
        recover::finish_interrupted(dir)?;
        Catalog::open_with(dir, false, lock)
    }

    fn open_with(dir: &Path, start_over: bool, lock: StateLock) -> Result<Catalog> {
        let index_dir = dir.join(INDEX_DIR);
        let file = dir.join(CATALOG_FILE);
        let refuse = |what: String| Error::Catalog {
            dir: dir.to_path_buf(),
            message: format!(
                "{what}; vmard will not start over with an empty catalog. Restore {} from a \
                 backup of the file system, or rebuild it with `vmard --recover` (re-captures \
                 the images recorded in {}), or move {} aside to start empty",
                file.display(),
                dir.join(crate::backup::BACKUP_FILE).display(),
                dir.display()
            ),
        };
        match std::fs::metadata(&file) {
            Ok(meta) if meta.len() == 0 => {
                return Err(refuse(format!("{} is empty (0 bytes)", file.display())));
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if !start_over && let Some(state) = existing_state(dir) {
                    return Err(refuse(format!(
                        "{} is missing, but {} is left of an existing catalog",
                        file.display(),
                        state.display()
                    )));
                }
            }
            Err(e) => return Err(Error::io("cannot stat", &file, e)),
        }
        create_private_dir(dir)?;
        create_private_dir(&index_dir)?;
        state_dir::check_writable(dir, &file)?;
        let exists = file.exists();
        // redb panics on some truncated files instead of returning an error.
        let opened = std::panic::catch_unwind(|| {
            let builder = {
                let mut b = Database::builder();
                b.set_cache_size(CACHE_BYTES);
                b
            };
            if exists {
                builder.open(&file)
            } else {
                builder.create(&file)
            }
        });
        let db = match opened {
            Ok(Ok(db)) => db,
            Ok(Err(e)) if exists => {
                let e: redb::Error = e.into();
                if matches!(e, redb::Error::DatabaseAlreadyOpen) {
                    return Err(Error::Catalog {
                        dir: dir.to_path_buf(),
                        message: "another vmard holds this catalog".into(),
                    });
                }
                return Err(refuse(format!("{} cannot be read ({e})", file.display())));
            }
            Ok(Err(e)) => return Err(Err::<(), _>(e).ctx(dir).unwrap_err()),
            Err(_) => {
                return Err(refuse(format!(
                    "{} is corrupt (reading it failed inside redb)",
                    file.display()
                )));
            }
        };
        if !exists {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| Error::io("cannot set mode of", &file, e))?;
        }
        let catalog = Catalog {
            db: RwLock::new(Some(db)),
            file: file.clone(),
            dir: dir.to_path_buf(),
            index_dir,
            runs: Mutex::new(Vec::new()),
            spill_records: AtomicUsize::new(crate::spill::DEFAULT_RECORDS),
            backup: Mutex::new(None),
            _lock: lock,
            sidecars: RwLock::new(None),
            closed: AtomicBool::new(false),
        };
        let spilled = crate::spill::remove_leftovers(&dir.join(crate::spill::SPILL_DIR))?;
        if spilled > 0 {
            tracing::info!(
                spilled,
                "removed spill directories left by interrupted captures"
            );
        }
        let ids = catalog.init()?;
        let removed = index::remove_orphans(&catalog.index_dir, &ids.iter().copied().collect())?;
        if removed > 0 {
            tracing::info!(removed, "removed index runs left by an interrupted change");
        }
        let images: BTreeSet<ImageId> = {
            let txn = catalog.read_txn()?;
            let table = txn.open_table(IMAGES).ctx(dir)?;
            let mut ids = BTreeSet::new();
            for entry in table.iter().ctx(dir)? {
                ids.insert(entry.ctx(dir)?.0.value());
            }
            ids
        };
        let removed = digests::remove_orphans(&catalog.index_dir, |id| images.contains(&id))?;
        if removed > 0 {
            tracing::info!(removed, "removed digest lists of images no longer recorded");
        }
        let runs = catalog.open_runs(&ids)?;
        *catalog.lock()? = runs;
        Ok(catalog)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Sets how many per-block records (of each kind) a capture keeps in memory before it
    /// spills them to files under the state directory: the bound on a capture's memory. For
    /// tests and benchmarks; the default keeps about 60 MiB.
    pub fn set_spill_records(&self, records: usize) {
        self.spill_records.store(records.max(2), Ordering::Relaxed);
    }

    /// Uses digest sidecars for the captures that follow (`None`: off).
    pub fn set_sidecars(&self, sidecars: Option<Sidecars>) {
        if let Ok(mut slot) = self.sidecars.write() {
            *slot = sidecars.map(Arc::new);
        }
    }

    fn sidecars(&self) -> Option<Arc<Sidecars>> {
        self.sidecars.read().ok().and_then(|s| s.clone())
    }

    fn spill(&self) -> Result<Spill> {
        Spill::new(
            &self.dir.join(crate::spill::SPILL_DIR),
            self.spill_records.load(Ordering::Relaxed),
        )
    }

    fn lock(&self) -> Result<MutexGuard<'_, Vec<Run>>> {
        self.runs.lock().map_err(|_| Error::Catalog {
            dir: self.dir.clone(),
            message: "an earlier change panicked; restart vmard".into(),
        })
    }

    fn corrupt(&self, message: String) -> Error {
        Error::Catalog {
            dir: self.dir.clone(),
            message,
        }
    }

    /// Creates the tables, checks the schema and returns the committed index runs.
    fn init(&self) -> Result<Vec<u64>> {
        let dir = &self.dir;
        let txn = self.write_txn()?;
        {
            let mut meta = txn.open_table(META).ctx(dir)?;
            let version = meta.get("schema_version").ctx(dir)?.map(|v| v.value());
            match version {
                None => {
                    meta.insert("schema_version", SCHEMA_VERSION).ctx(dir)?;
                }
                Some(SCHEMA_VERSION) => {}
                Some(old @ (2 | 3)) => {
                    drop(meta);
                    if old == 2 {
                        self.seal_all(&txn)?;
                    }
                    let moved = self.move_digests_out(&txn)?;
                    txn.open_table(META)
                        .ctx(dir)?
                        .insert("schema_version", SCHEMA_VERSION)
                        .ctx(dir)?;
                    tracing::info!(
                        images = moved,
                        "catalog upgraded from schema {old} to {SCHEMA_VERSION} (checksummed \
                         records, digests in digest lists)"
                    );
                }
                Some(other) => {
                    return Err(self.corrupt(format!(
                        "schema version {other} is not supported by this vmar (it reads {SCHEMA_VERSION})"
                    )));
                }
            }
            txn.open_table(IMAGES).ctx(dir)?;
            txn.open_table(NAMES).ctx(dir)?;
            txn.open_table(DIGESTS).ctx(dir)?;
            txn.open_table(EXTENTS).ctx(dir)?;
            txn.open_table(RUNS).ctx(dir)?;
            txn.open_table(DEVICES).ctx(dir)?;
            txn.open_table(RUN_SUMS).ctx(dir)?;
            txn.open_table(REFS).ctx(dir)?;
            txn.open_table(DEAD).ctx(dir)?;
            txn.open_table(PATHS).ctx(dir)?;
        }
        if self.meta_in(&txn, REFS_BUILT)? == 0 {
            self.build_refs(&txn)?;
        }
        if self.meta_in(&txn, PATHS_BUILT)? == 0 {
            self.build_paths(&txn)?;
        }
        fault::point(fault::Step::CatalogInit)?;
        txn.commit().ctx(dir)?;
        let txn = self.read_txn()?;
        let runs = txn.open_table(RUNS).ctx(dir)?;
        let mut ids = Vec::new();
        for entry in runs.iter().ctx(dir)? {
            ids.push(entry.ctx(dir)?.0.value());
        }
        Ok(ids)
    }

    fn decode(&self, bytes: &[u8]) -> Result<ImageRecord> {
        self.decode_json(bytes, "image")
    }

    /// A sealed JSON record (`what` names its kind in errors): checksum, then JSON.
    fn decode_json<T: serde::de::DeserializeOwned>(&self, bytes: &[u8], what: &str) -> Result<T> {
        serde_json::from_slice(self.unseal(bytes, what)?)
            .map_err(|e| self.corrupt(format!("corrupt {what} record: {e}")))
    }

    /// All images in capture order.
    pub fn images(&self) -> Result<Vec<ImageRecord>> {
        self.records(IMAGES, "image")
    }

    /// Every JSON record of `table`, in key order.
    fn records<K: redb::Key + 'static, T: serde::de::DeserializeOwned>(
        &self,
        table: TableDefinition<K, &[u8]>,
        what: &str,
    ) -> Result<Vec<T>> {
        let dir = &self.dir;
        let txn = self.read_txn()?;
        let table = txn.open_table(table).ctx(dir)?;
        let mut records = Vec::new();
        for entry in table.iter().ctx(dir)? {
            let (_, value) = entry.ctx(dir)?;
            records.push(self.decode_json(value.value(), what)?);
        }
        Ok(records)
    }

    /// The image captured from `path` (canonical), if any.
    pub fn image_at(&self, path: &Path) -> Result<Option<ImageRecord>> {
        let dir = &self.dir;
        let txn = self.read_txn()?;
        let paths = txn.open_table(PATHS).ctx(dir)?;
        let Some(id) = paths.get(path_key(path)).ctx(dir)?.map(|v| v.value()) else {
            return Ok(None);
        };
        let images = txn.open_table(IMAGES).ctx(dir)?;
        let record = images.get(id).ctx(dir)?;
        let record = record.ok_or_else(|| {
            self.corrupt(format!(
                "path {} points to missing image {id}",
                path.display()
            ))
        })?;
        let record = self.decode(record.value())?;
        Ok((record.path == path).then_some(record))
    }

    /// The image called `name`.
    pub fn image(&self, name: &str) -> Result<ImageRecord> {
        let dir = &self.dir;
        let txn = self.read_txn()?;
        let names = txn.open_table(NAMES).ctx(dir)?;
        let id = names.get(name).ctx(dir)?.map(|v| v.value());
        let id = id.ok_or_else(|| Error::UnknownImage {
            name: name.to_string(),
        })?;
        let images = txn.open_table(IMAGES).ctx(dir)?;
        let record = images.get(id).ctx(dir)?;
        let record = record
            .ok_or_else(|| self.corrupt(format!("name {name:?} points to missing image {id}")))?;
        self.decode(record.value())
    }

    /// The image with catalog id `id`.
    pub fn image_by_id(&self, id: ImageId) -> Result<ImageRecord> {
        let dir = &self.dir;
        let txn = self.read_txn()?;
        let images = txn.open_table(IMAGES).ctx(dir)?;
        let record = images.get(id).ctx(dir)?;
        let record =
            record.ok_or_else(|| self.corrupt(format!("image {id} is referenced but missing")))?;
        self.decode(record.value())
    }

    /// The images `map` (of `record`) reads from: `record` itself and every image it
    /// redirects to, by id.
    pub fn sources_of(
        &self,
        record: &ImageRecord,
        map: &BlockMap,
    ) -> Result<BTreeMap<ImageId, ImageRecord>> {
        let mut sources = BTreeMap::new();
        sources.insert(record.id, record.clone());
        for id in map.referenced_images() {
            if id != record.id {
                sources.insert(id, self.image_by_id(id)?);
            }
        }
        Ok(sources)
    }

    /// The map of image `name`.
    pub fn map(&self, name: &str) -> Result<(ImageRecord, BlockMap)> {
        let record = self.image(name)?;
        let txn = self.read_txn()?;
        let table = txn.open_table(EXTENTS).ctx(&self.dir)?;
        let map = self.map_from(&table, record.id, record.size)?;
        Ok((record, map))
    }

    /// Records `identity` as image `name`'s, as if it had been captured so: lets tests put a
    /// catalog out of step with an image's content, which the identity check otherwise
    /// refuses before verify could compare anything.
    #[cfg(test)]
    pub(crate) fn replace_identity(
        &self,
        name: &str,
        identity: crate::image::ImageIdentity,
    ) -> Result<()> {
        let _guard = self.lock()?;
        let mut record = self.image(name)?;
        record.identity = identity;
        let txn = self.write_txn()?;
        self.write_record(&txn, &record)?;
        self.commit(txn)
    }

    /// The stored digests of blocks `blocks` (sorted, distinct) of image `id`: `None` for a
    /// block the capture found all zeros (zero blocks have no digest). A few reads of the
    /// image's digest list per block, whatever the image's size.
    pub fn sample_digests(
        &self,
        id: ImageId,
        blocks: &[u64],
    ) -> Result<Vec<Option<crate::scan::Digest>>> {
        digests::StoredList::open(&digests::list_path(&self.index_dir, id))?.lookup(blocks)
    }

    /// Images that saved devices read: their own image and every image its map redirects
    /// to, each with every device that reads it (by name, sorted). Such images must not
    /// change under them.
    pub fn images_in_use(&self) -> Result<BTreeMap<String, Vec<String>>> {
        let mut used: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (device, _, read) in self.devices_reading()? {
            for image in read {
                used.entry(image).or_default().push(device.clone());
            }
        }
        for devices in used.values_mut() {
            devices.sort();
            devices.dedup();
        }
        Ok(used)
    }

    /// Every saved device with the image it serves and the images it reads (that image and
    /// those its map redirects to).
    pub fn devices_reading(&self) -> Result<Vec<(String, String, Vec<String>)>> {
        let mut out = Vec::new();
        for device in self.devices()? {
            let (record, map) = match self.map(&device.image) {
                Ok(found) => found,
                Err(Error::UnknownImage { .. }) => continue,
                Err(e) => return Err(e),
            };
            let mut read = vec![record.name.clone()];
            for id in map.referenced_images() {
                read.push(self.image_by_id(id)?.name);
            }
            out.push((device.name, record.name, read));
        }
        Ok(out)
    }

    /// Images whose maps redirect blocks to image `name`, with how many, in capture order.
    pub fn redirecting_to(&self, name: &str) -> Result<Vec<(String, u64)>> {
        let target = self.image(name)?.id;
        let dir = &self.dir;
        let txn = self.read_txn()?;
        let refs = txn.open_table(REFS).ctx(dir)?;
        let mut ids = Vec::new();
        for entry in refs.range((target, 0)..=(target, u32::MAX)).ctx(dir)? {
            let (key, blocks) = entry.ctx(dir)?;
            ids.push((key.value().1, blocks.value()));
        }
        drop(refs);
        drop(txn);
        ids.sort();
        ids.into_iter()
            .filter(|(id, _)| *id != target)
            .map(|(id, blocks)| Ok((self.image_by_id(id)?.name, blocks)))
            .collect()
    }

    fn meta(&self, key: &str) -> Result<u64> {
        let dir = &self.dir;
        let txn = self.read_txn()?;
        let meta = txn.open_table(META).ctx(dir)?;
        Ok(meta.get(key).ctx(dir)?.map(|v| v.value()).unwrap_or(0))
    }
}

/// The key of `path` in [`PATHS`]: its bytes, whatever their encoding.
fn path_key(path: &Path) -> &[u8] {
    use std::os::unix::ffi::OsStrExt;
    path.as_os_str().as_bytes()
}
