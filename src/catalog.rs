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
//! change. Re-capturing or removing image K rebuilds the index, and the maps of images K and
//! later, from the stored digests, without reading any image.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, RwLock};

use redb::{Database, ReadableTable, TableDefinition, WriteTransaction};

use crate::error::{Error, Result};
use crate::fault;
use crate::image::{BLOCK_SIZE, ImageFile, default_name, validate_name};
use crate::index::{self, Run, resolve};
use crate::map::{BlockMap, ImageId, MapBuilder, MapSummary, Source};
use crate::protocol::Progress;
pub use crate::records::{CaptureStatus, DeviceRecord, DeviceState, ImageRecord};
use crate::records::{decode_digests, decode_extents, encode_digests, encode_extents};
use crate::scan::{Digest, hash_image};
use crate::time::now_secs;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// id -> JSON of [`ImageRecord`].
const IMAGES: TableDefinition<u32, &[u8]> = TableDefinition::new("images");
const NAMES: TableDefinition<&str, u32> = TableDefinition::new("image_names");
/// (image, chunk) -> digests of non-zero blocks, [`DIGEST_RECORD`] bytes each, block order.
const DIGESTS: TableDefinition<(u32, u32), &[u8]> = TableDefinition::new("digests");
/// (image, chunk) -> extents of the map, [`EXTENT_RECORD`] bytes each, in order.
const EXTENTS: TableDefinition<(u32, u32), &[u8]> = TableDefinition::new("extents");
/// Device name -> JSON of [`DeviceRecord`]: the devices vmard should serve (desired state).
const DEVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("devices");
/// Run id -> entries: the runs of the content index, oldest first.
const RUNS: TableDefinition<u64, u64> = TableDefinition::new("index_runs");
/// Run id -> blake3 of the run file: a damaged run is found when it is opened.
const RUN_SUMS: TableDefinition<u64, &[u8]> = TableDefinition::new("index_run_sums");

const SCHEMA_VERSION: u64 = 2;
const NEXT_ID: &str = "next_image_id";
const NEXT_RUN: &str = "next_run_id";
/// File name of the catalog inside the state directory.
pub const CATALOG_FILE: &str = "catalog.redb";
/// Directory of the content index runs inside the state directory.
pub const INDEX_DIR: &str = "index";
/// Page cache of the catalog: bounds its memory whatever the number of images.
const CACHE_BYTES: usize = 32 << 20;
/// Records per stored chunk of digests or extents.
const CHUNK_RECORDS: usize = 16 * 1024;

/// What [`Catalog::recover`] brought back.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Recovery {
    pub images: Vec<String>,
    /// Images that could not be captured again, with the reason.
    pub skipped: Vec<(String, String)>,
    pub devices: Vec<String>,
}

/// The catalog in a state directory.
pub struct Catalog {
    /// The open database; `None` only while it is re-opened after an I/O error.
    db: RwLock<Option<Database>>,
    file: PathBuf,
    dir: PathBuf,
    index_dir: PathBuf,
    /// Serialises changes, and holds the runs of the content index as last committed.
    runs: Mutex<Vec<Run>>,
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

/// A change to the catalog that needs the index rebuilt from image `from` on.
struct Rebuild {
    from: ImageId,
    /// New record and digests of a re-captured image.
    replace: Option<(ImageRecord, Vec<(u64, Digest)>)>,
    /// An image being removed.
    remove: Option<ImageRecord>,
}

impl Catalog {
    /// Opens the catalog in `dir`, creating it only in a directory that holds no vmar state
    /// yet. Only one process may hold it. A missing, empty or unreadable catalog next to
    /// index runs or backups is refused with what to do: vmard never starts over silently.
    pub fn open(dir: &Path) -> Result<Catalog> {
        Catalog::open_with(dir, false)
    }

    fn open_with(dir: &Path, start_over: bool) -> Result<Catalog> {
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
        };
        let ids = catalog.init()?;
        let removed = index::remove_orphans(&catalog.index_dir, &ids.iter().copied().collect())?;
        if removed > 0 {
            tracing::info!(removed, "removed index runs left by an interrupted change");
        }
        let runs = catalog.open_runs(&ids)?;
        *catalog.lock()? = runs;
        Ok(catalog)
    }

    /// Opens the committed index runs, checking each against the checksum the catalog holds
    /// for it. A missing or damaged run is derived data: the index is rebuilt from the
    /// stored digests (the damaged file is kept aside as `damaged-*.idx`), and no map
    /// changes.
    fn open_runs(&self, ids: &[u64]) -> Result<Vec<Run>> {
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
    fn run_sums(&self) -> Result<BTreeMap<u64, [u8; 32]>> {
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

    pub fn dir(&self) -> &Path {
        &self.dir
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
        }
        fault::point("catalog.init")?;
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
        serde_json::from_slice(bytes)
            .map_err(|e| self.corrupt(format!("corrupt image record: {e}")))
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
            let record = serde_json::from_slice(value.value())
                .map_err(|e| self.corrupt(format!("corrupt {what} record: {e}")))?;
            records.push(record);
        }
        Ok(records)
    }

    /// The image captured from `path` (canonical), if any.
    pub fn image_at(&self, path: &Path) -> Result<Option<ImageRecord>> {
        Ok(self.images()?.into_iter().find(|r| r.path == path))
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
        let dir = &self.dir;
        let txn = self.read_txn()?;
        let table = txn.open_table(EXTENTS).ctx(dir)?;
        let mut extents = Vec::new();
        for entry in table
            .range((record.id, 0)..=(record.id, u32::MAX))
            .ctx(dir)?
        {
            let (_, value) = entry.ctx(dir)?;
            extents.extend(decode_extents(value.value()).map_err(|m| self.corrupt(m))?);
        }
        let map = BlockMap {
            image: record.id,
            blocks: record.size.div_ceil(BLOCK_SIZE),
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
        if let Some(name) = name {
            validate_name(name)?;
        }
        // Changes are serialised: what is checked here stays true until this one commits.
        let mut runs = self.lock()?;
        let existing = self.image_at(&image.path)?;
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
                // A new map under a live device would serve other bytes than its table.
                if let Some(device) = self.images_in_use()?.remove(&record.name) {
                    return Err(Error::ImageInUse {
                        name: record.name,
                        device,
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
                match self.image(&name) {
                    Ok(other) => {
                        return Err(Error::NameTaken {
                            name,
                            path: other.path,
                        });
                    }
                    Err(Error::UnknownImage { .. }) => {}
                    Err(e) => return Err(e),
                }
                (
                    ImageId::try_from(self.meta(NEXT_ID)?)
                        .map_err(|_| self.corrupt("all image ids are used".into()))?,
                    name,
                    CaptureStatus::Captured,
                )
            }
        };

        let started = std::time::Instant::now();
        let (digests, scan) =
            hash_image(image, &mut |done, total| progress(Progress { done, total }))?;
        let hashed = started.elapsed();
        let now = image.current_identity()?;
        if now != image.identity {
            return Err(Error::ChangedDuringCapture {
                path: image.path.clone(),
                what: image.identity.describe_change(&now),
            });
        }
        let mut record = ImageRecord {
            id,
            name,
            path: image.path.clone(),
            size: image.size,
            identity: image.identity,
            captured_at: now_secs(),
            scan,
            summary: MapSummary::default(),
            fingerprint: Some(crate::records::fingerprint(image.size, &digests)),
        };
        if status == CaptureStatus::Recaptured {
            let rebuild = Rebuild {
                from: id,
                replace: Some((record, digests)),
                remove: None,
            };
            let record = self
                .rebuild(&mut runs, rebuild)?
                .ok_or_else(|| self.corrupt("rebuild did not meet the changed image".into()))?;
            self.write_backup();
            return Ok((record, status));
        }

        if u32::try_from(digests.len()).is_err() {
            return Err(Error::Catalog {
                dir: self.dir.clone(),
                message: format!(
                    "{} has more than 2^32 non-zero blocks (16 TiB); vmar indexes at most that many per image",
                    image.path.display()
                ),
            });
        }
        let resolution = resolve(id, &digests, &runs);
        let resolved = started.elapsed();
        let map = build_map(&record, &digests, &resolution.sources);
        record.summary = map.summary(record.size);
        let run_id = self.meta(NEXT_RUN)?;
        let dir = &self.dir;
        // The new run is written and synced while the catalog transaction is prepared; it must
        // be durable before the commit that names it.
        let (run, txn) = std::thread::scope(|scope| {
            let entries = resolution.new_entries(id, &digests);
            let writer = scope.spawn(|| index::write_run(&self.index_dir, run_id, entries));
            let txn = self.prepare_capture(id, run_id, &digests, &map, &record);
            let run = writer
                .join()
                .map_err(|_| self.corrupt("index writer panicked".into()))?;
            Ok::<_, Error>((run?, txn?))
        })?;
        let run_written = started.elapsed();
        let run_len = run.len() as u64;
        txn.open_table(RUNS)
            .ctx(dir)?
            .insert(run_id, run_len)
            .ctx(dir)?;
        txn.open_table(RUN_SUMS)
            .ctx(dir)?
            .insert(run_id, index::checksum(&run).as_slice())
            .ctx(dir)?;
        self.commit(txn)?;
        runs.push(run);
        self.write_backup();
        tracing::debug!(
            image = %record.name,
            ?hashed,
            ?resolved,
            ?run_written,
            committed = ?started.elapsed(),
            "capture phases"
        );
        Ok((record, status))
    }

    /// A transaction holding a new image's digests, map, record and counters.
    fn prepare_capture(
        &self,
        id: ImageId,
        run_id: u64,
        digests: &[(u64, Digest)],
        map: &BlockMap,
        record: &ImageRecord,
    ) -> Result<WriteTransaction> {
        let dir = &self.dir;
        let txn = self.write_txn()?;
        self.write_digests(&txn, id, digests)?;
        self.write_map(&txn, map)?;
        self.write_record(&txn, record)?;
        {
            let mut meta = txn.open_table(META).ctx(dir)?;
            meta.insert(NEXT_ID, u64::from(id) + 1).ctx(dir)?;
            meta.insert(NEXT_RUN, run_id + 1).ctx(dir)?;
        }
        Ok(txn)
    }

    /// Saved devices, by name.
    pub fn devices(&self) -> Result<Vec<DeviceRecord>> {
        self.records(DEVICES, "device")
    }

    /// The saved device `name`, if any.
    pub fn device(&self, name: &str) -> Result<Option<DeviceRecord>> {
        Ok(self.devices()?.into_iter().find(|d| d.name == name))
    }

    /// Saves (or replaces) a device record.
    pub fn save_device(&self, record: &DeviceRecord) -> Result<()> {
        let _guard = self.lock()?;
        let dir = &self.dir;
        let bytes = serde_json::to_vec(record)
            .map_err(|e| self.corrupt(format!("cannot encode device record: {e}")))?;
        let txn = self.write_txn()?;
        txn.open_table(DEVICES)
            .ctx(dir)?
            .insert(record.name.as_str(), bytes.as_slice())
            .ctx(dir)?;
        self.commit(txn)?;
        self.write_backup();
        Ok(())
    }

    /// Removes a device record; true if there was one.
    pub fn forget_device(&self, name: &str) -> Result<bool> {
        let _guard = self.lock()?;
        let dir = &self.dir;
        let txn = self.write_txn()?;
        let existed = txn
            .open_table(DEVICES)
            .ctx(dir)?
            .remove(name)
            .ctx(dir)?
            .is_some();
        self.commit(txn)?;
        self.write_backup();
        Ok(existed)
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
            Rebuild {
                from: record.id,
                replace: None,
                remove: Some(record.clone()),
            },
        )?;
        self.write_backup();
        Ok(record)
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

    /// Rewrites the backup of the records (see [`crate::backup`]) after a change. A failure
    /// is logged: the change itself is committed.
    fn write_backup(&self) {
        let backup = self.images().and_then(|images| {
            Ok(crate::backup::Backup {
                images,
                devices: self.devices()?,
            })
        });
        if let Err(e) = backup.and_then(|b| crate::backup::write(&self.dir, &b)) {
            tracing::warn!("cannot write the catalog backup: {e}");
        }
    }

    /// Rebuilds a lost or damaged catalog in `dir` from its backup: moves what is left aside
    /// (`*.broken-TIME`, nothing is deleted), captures the backed-up images again in their
    /// capture order (same maps), skipping any that changed or vanished, and saves their
    /// devices again. Returns the new catalog and what was recovered.
    pub fn recover(dir: &Path) -> Result<(Catalog, Recovery)> {
        let backup = crate::backup::read(dir)?;
        let stamp = crate::time::now_secs();
        for name in [CATALOG_FILE, INDEX_DIR] {
            let path = dir.join(name);
            if path.exists() {
                let aside = dir.join(format!("{name}.broken-{stamp}"));
                std::fs::rename(&path, &aside)
                    .map_err(|e| Error::io("cannot move aside", &path, e))?;
            }
        }
        let catalog = Catalog::open_with(dir, true)?;
        let mut recovery = Recovery::default();
        let mut images = backup.images;
        images.sort_by_key(|i| i.id);
        for image in images {
            let outcome = ImageFile::open(&image.path).and_then(|file| {
                if file.identity != image.identity {
                    return Err(Error::ImageChanged {
                        what: image.identity.describe_change(&file.identity),
                        name: image.name.clone(),
                        path: image.path.clone(),
                    });
                }
                catalog.capture(&file, Some(&image.name), false, &mut |_| {})
            });
            match outcome {
                Ok(_) => recovery.images.push(image.name),
                Err(e) => recovery.skipped.push((image.name, e.to_string())),
            }
        }
        for device in backup.devices {
            if device.state == DeviceState::Active && recovery.images.contains(&device.image) {
                catalog.save_device(&device)?;
                recovery.devices.push(device.name);
            }
        }
        Ok((catalog, recovery))
    }

    fn read_txn(&self) -> Result<redb::ReadTransaction> {
        let db = self.db.read().unwrap_or_else(|p| p.into_inner());
        match &*db {
            Some(db) => db.begin_read().ctx(&self.dir),
            None => Err::<_, redb::Error>(redb::Error::PreviousIo).ctx(&self.dir),
        }
    }

    fn write_txn(&self) -> Result<WriteTransaction> {
        self.begin_write().map_err(|e| Error::Catalog {
            dir: self.dir.clone(),
            message: e.to_string(),
        })
    }

    fn begin_write(&self) -> std::result::Result<WriteTransaction, Box<redb::Error>> {
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
    fn reopen(&self) {
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
    fn commit(&self, txn: WriteTransaction) -> Result<()> {
        fault::point("catalog.commit")?;
        let committed = txn.commit();
        if committed.is_err() {
            self.reopen();
        }
        committed.ctx(&self.dir)
    }

    /// Images that saved devices read: their own image and every image its map redirects
    /// to, each with one device that reads it. Such images must not change under them.
    pub fn images_in_use(&self) -> Result<BTreeMap<String, String>> {
        let mut used = BTreeMap::new();
        for device in self.devices()? {
            let (record, map) = match self.map(&device.image) {
                Ok(found) => found,
                Err(Error::UnknownImage { .. }) => continue,
                Err(e) => return Err(e),
            };
            used.entry(record.name)
                .or_insert_with(|| device.name.clone());
            for id in map.referenced_images() {
                let other = self.image_by_id(id)?;
                used.entry(other.name)
                    .or_insert_with(|| device.name.clone());
            }
        }
        Ok(used)
    }

    fn meta(&self, key: &str) -> Result<u64> {
        let dir = &self.dir;
        let txn = self.read_txn()?;
        let meta = txn.open_table(META).ctx(dir)?;
        Ok(meta.get(key).ctx(dir)?.map(|v| v.value()).unwrap_or(0))
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

    fn compact(&self, runs: &mut Vec<Run>) -> Result<()> {
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
    fn remove_runs(&self, old: Vec<Run>) {
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
    fn rebuild(&self, runs: &mut Vec<Run>, change: Rebuild) -> Result<Option<ImageRecord>> {
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
                let (mut record, digests, replaced) = match replace.take_if(|(r, _)| r.id == id) {
                    Some((record, digests)) => (record, digests, true),
                    None => (
                        self.record_in(&txn, id)?,
                        self.read_digests(&txn, id)?,
                        false,
                    ),
                };
                let resolution = resolve(id, &digests, &new_runs);
                let run = index::write_run(
                    &self.index_dir,
                    next_run,
                    resolution.new_entries(id, &digests),
                )?;
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
                    let map = build_map(&record, &digests, &resolution.sources);
                    record.summary = map.summary(record.size);
                    clear(&txn, EXTENTS, id, dir)?;
                    self.write_map(&txn, &map)?;
                    if replaced {
                        clear(&txn, DIGESTS, id, dir)?;
                        self.write_digests(&txn, id, &digests)?;
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

    fn ids(&self, txn: &WriteTransaction) -> Result<Vec<ImageId>> {
        let table = txn.open_table(IMAGES).ctx(&self.dir)?;
        let mut ids = Vec::new();
        for entry in table.iter().ctx(&self.dir)? {
            ids.push(entry.ctx(&self.dir)?.0.value());
        }
        Ok(ids)
    }

    fn record_in(&self, txn: &WriteTransaction, id: ImageId) -> Result<ImageRecord> {
        let table = txn.open_table(IMAGES).ctx(&self.dir)?;
        let value = table.get(id).ctx(&self.dir)?;
        let value =
            value.ok_or_else(|| self.corrupt(format!("image {id} is referenced but missing")))?;
        self.decode(value.value())
    }

    fn read_digests(&self, txn: &WriteTransaction, id: ImageId) -> Result<Vec<(u64, Digest)>> {
        let table = txn.open_table(DIGESTS).ctx(&self.dir)?;
        let mut digests = Vec::new();
        for entry in table.range((id, 0)..=(id, u32::MAX)).ctx(&self.dir)? {
            let (_, value) = entry.ctx(&self.dir)?;
            digests.extend(decode_digests(value.value()).map_err(|m| self.corrupt(m))?);
        }
        Ok(digests)
    }

    fn write_digests(
        &self,
        txn: &WriteTransaction,
        id: ImageId,
        digests: &[(u64, Digest)],
    ) -> Result<()> {
        let mut table = txn.open_table(DIGESTS).ctx(&self.dir)?;
        for (n, chunk) in digests.chunks(CHUNK_RECORDS).enumerate() {
            let bytes = encode_digests(chunk);
            table
                .insert((id, self.chunk_number(n)?), bytes.as_slice())
                .ctx(&self.dir)?;
        }
        Ok(())
    }

    fn chunk_number(&self, n: usize) -> Result<u32> {
        u32::try_from(n).map_err(|_| self.corrupt(format!("record chunk {n} out of range")))
    }

    fn write_map(&self, txn: &WriteTransaction, map: &BlockMap) -> Result<()> {
        let mut table = txn.open_table(EXTENTS).ctx(&self.dir)?;
        for (n, chunk) in map.extents.chunks(CHUNK_RECORDS).enumerate() {
            let bytes = encode_extents(chunk);
            table
                .insert((map.image, self.chunk_number(n)?), bytes.as_slice())
                .ctx(&self.dir)?;
        }
        Ok(())
    }

    fn write_record(&self, txn: &WriteTransaction, record: &ImageRecord) -> Result<()> {
        let dir = &self.dir;
        let bytes = serde_json::to_vec(record)
            .map_err(|e| self.corrupt(format!("cannot encode image record: {e}")))?;
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

/// Deletes the chunks of image `id` from a chunked table.
fn clear(
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

/// The map of an image from the sources of its non-zero blocks.
fn build_map(record: &ImageRecord, digests: &[(u64, Digest)], sources: &[Source]) -> BlockMap {
    let mut builder = MapBuilder::new(record.id, record.size.div_ceil(BLOCK_SIZE));
    for ((block, _), source) in digests.iter().zip(sources) {
        builder.push(*block, 1, *source);
    }
    builder.finish()
}

/// Something in `dir` that only an existing catalog leaves: index runs or a backup.
fn existing_state(dir: &Path) -> Option<PathBuf> {
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
fn create_private_dir(dir: &Path) -> Result<()> {
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
