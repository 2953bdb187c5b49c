//! vmar devices: what `create`, `refresh`, `remove`, `list` and `status` do. A device
//! serves one captured image through a read-only dm table over read-only, buffered loop
//! devices of that image and of the images holding its canonical blocks. Kernel work is in
//! [`crate::dm`] and [`crate::loopdev`]; this module plans it and keeps the catalog's desired
//! state in step.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::budget::{self, BudgetCost};
use crate::catalog::{Catalog, DeviceRecord, ImageRecord};
use crate::dm::{DeviceMapper, LiveDevice, LiveTarget, node_path};
use crate::error::{Error, Result};
use crate::image::{SECTOR_SIZE, open_unchanged, validate_name};
use crate::loopdev::{self, LoopAttachment};
use crate::map::ImageId;
use crate::pagecache::{self, Residency};
use crate::stats::{self, ClassBytes, ReadBytes, TargetCounts};
use crate::table::{self, Target};

/// Default most targets of one table: far below the kernel's 1,048,576, and still enough for
/// the maps of real multi-GiB images we measured (tens of thousands of extents).
pub const DEFAULT_MAX_TARGETS: u64 = 100_000;

/// A table ready to load, with the loop devices it needs held open.
pub struct Plan {
    pub image: ImageRecord,
    pub targets: Vec<Target>,
    pub cost: BudgetCost,
    pub loops: BTreeMap<String, LoopAttachment>,
}

/// Plans the table of `image`: refuses it if the image or any image it reads from changed
/// since capture, fits the map into `max_targets`, attaches the loop devices.
pub fn plan(catalog: &Catalog, image: &str, max_targets: u64) -> Result<Plan> {
    let (record, map) = catalog.map(image)?;
    let (map, cost) = budget::fit(&map, max_targets);
    let mut ids: Vec<ImageId> = map.referenced_images();
    ids.push(record.id);
    let mut by_id = BTreeMap::new();
    let mut loops = BTreeMap::new();
    for id in ids {
        let other = if id == record.id {
            record.clone()
        } else {
            catalog.image_by_id(id)?
        };
        let file = open_unchanged(&other.name, &other.path, &other.identity)?;
        let attachment = loopdev::attach(&file)?;
        by_id.insert(id, attachment.dm_name());
        loops.insert(other.name, attachment);
    }
    let targets = table::build(&map, record.size, |id| {
        by_id.get(&id).cloned().unwrap_or_default()
    });
    Ok(Plan {
        image: record,
        targets,
        cost,
        loops,
    })
}

/// How a device stands: saved (desired), live (in the kernel), both, or one only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStatus {
    pub name: String,
    /// Image it serves, when saved.
    pub image: Option<String>,
    /// `active`: saved and live; `missing`: saved, not in the kernel; `unmanaged`: a
    /// `vmar-` device the catalog does not know.
    pub state: String,
    pub node: String,
    pub live: Option<LiveDevice>,
    /// Target counts of the live table by type.
    #[serde(default)]
    pub target_types: BTreeMap<String, u64>,
    /// Devices (`MAJOR:MINOR`) the live table reads from.
    #[serde(default)]
    pub reads_from: Vec<String>,
    /// What the target budget costs the image's current map.
    pub budget: Option<BudgetCost>,
    /// The live table, when asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<Vec<LiveTarget>>,
}

/// Result of `create` and `refresh`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceChange {
    pub device: DeviceStatus,
    pub targets: u64,
    pub budget: BudgetCost,
    /// Loop devices by image, and whether this change attached them.
    pub loops: BTreeMap<String, (String, bool)>,
    pub seconds: f64,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn change(plan: &Plan, device: DeviceStatus, started: std::time::Instant) -> DeviceChange {
    DeviceChange {
        device,
        targets: plan.targets.len() as u64,
        budget: plan.cost,
        loops: plan
            .loops
            .iter()
            .map(|(name, l)| (name.clone(), (l.device.display().to_string(), l.attached)))
            .collect(),
        seconds: started.elapsed().as_secs_f64(),
    }
}

/// Creates device `name` serving captured image `image`, and saves it.
pub fn create(
    catalog: &Catalog,
    name: &str,
    image: &str,
    max_targets: u64,
) -> Result<DeviceChange> {
    validate_name(name)?;
    let started = std::time::Instant::now();
    if catalog.device(name)?.is_some() {
        return Err(Error::DeviceExists {
            name: name.to_string(),
        });
    }
    let dm = DeviceMapper::open()?;
    let plan = plan(catalog, image, max_targets)?;
    dm.create(name, &plan.targets)?;
    let record = DeviceRecord {
        name: name.to_string(),
        image: plan.image.name.clone(),
        created_at: now_secs(),
    };
    if let Err(e) = catalog.save_device(&record) {
        let _ = dm.remove(name, false);
        return Err(e);
    }
    let status = status_with(catalog, &dm, name, max_targets)?;
    Ok(change(&plan, status, started))
}

/// What [`restore`] did at start-up.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreReport {
    /// Saved devices that were missing and were created.
    pub created: Vec<String>,
    /// Saved devices already live with the expected table: left alone.
    pub unchanged: Vec<String>,
    /// Saved devices live with another table (e.g. a map changed while vmard was down):
    /// left alone, `vmarctl refresh` swaps the new table in.
    pub differs: Vec<String>,
    /// Saved devices that could not be served, with the reason; the others were restored.
    pub failed: Vec<(String, String)>,
    /// `VMAR-` devices the catalog does not know (left by a crash between creating the
    /// device and saving it), removed.
    pub cleaned: Vec<String>,
}

/// Brings the kernel in line with the saved devices, as at boot: creates missing ones,
/// leaves correct ones, reports broken ones without letting them block the rest, and removes
/// unsaved `VMAR-` leftovers that nobody has open.
pub fn restore(catalog: &Catalog, max_targets: u64) -> Result<RestoreReport> {
    let saved = catalog.devices()?;
    let dm = match DeviceMapper::open() {
        Ok(dm) => dm,
        // Nothing to restore, and no device-mapper to clean up: not an error (a host that
        // only captures, or the tests).
        Err(_) if saved.is_empty() => return Ok(RestoreReport::default()),
        Err(e) => return Err(e),
    };
    let mut report = RestoreReport::default();
    let live_devices = dm.list().unwrap_or_else(|e| {
        report.failed.push(("(list)".into(), e.to_string()));
        Vec::new()
    });
    for live in live_devices {
        let ours = live
            .uuid
            .as_deref()
            .is_some_and(|u| u.starts_with(crate::dm::UUID_PREFIX));
        if ours && live.open_count == 0 && !saved.iter().any(|d| d.name == live.name) {
            match dm.remove(&live.name, false) {
                Ok(_) => report.cleaned.push(live.name),
                Err(e) => report.failed.push((live.name, e.to_string())),
            }
        }
    }
    for record in saved {
        enum Outcome {
            Created,
            Unchanged,
            Differs,
        }
        let outcome = (|| -> Result<Outcome> {
            let plan = plan(catalog, &record.image, max_targets)?;
            if dm.info(&record.name)?.is_none() {
                dm.create(&record.name, &plan.targets)?;
                return Ok(Outcome::Created);
            }
            let live = dm.table(&record.name)?;
            let same = live.len() == plan.targets.len()
                && live.iter().zip(&plan.targets).all(|(l, t)| {
                    l.start == t.start
                        && l.len == t.len
                        && l.target_type == t.target_type()
                        && l.params == t.params()
                });
            Ok(if same {
                Outcome::Unchanged
            } else {
                Outcome::Differs
            })
        })();
        match outcome {
            Ok(Outcome::Created) => report.created.push(record.name),
            Ok(Outcome::Unchanged) => report.unchanged.push(record.name),
            Ok(Outcome::Differs) => report.differs.push(record.name),
            Err(e) => report.failed.push((record.name, e.to_string())),
        }
    }
    Ok(report)
}

/// Swaps the current map of a live device's image in, atomically.
pub fn refresh(catalog: &Catalog, name: &str, max_targets: u64) -> Result<DeviceChange> {
    validate_name(name)?;
    let started = std::time::Instant::now();
    let record = catalog.device(name)?.ok_or_else(|| Error::UnknownDevice {
        name: name.to_string(),
    })?;
    let dm = DeviceMapper::open()?;
    let plan = plan(catalog, &record.image, max_targets)?;
    dm.reload(name, &plan.targets)?;
    let status = status_with(catalog, &dm, name, max_targets)?;
    Ok(change(&plan, status, started))
}

/// Result of `remove`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removed {
    pub name: String,
    /// The device was open: it goes away when its last user closes it.
    pub deferred: bool,
    /// It was in the kernel (not only saved).
    pub was_live: bool,
}

/// Removes device `name` from the kernel and the catalog.
pub fn remove(catalog: &Catalog, name: &str, force: bool) -> Result<Removed> {
    validate_name(name)?;
    let dm = DeviceMapper::open()?;
    let live = dm.info(name)?.is_some();
    let saved = catalog.device(name)?.is_some();
    if !live && !saved {
        return Err(Error::UnknownDevice {
            name: name.to_string(),
        });
    }
    let deferred = if live { dm.remove(name, force)? } else { false };
    catalog.forget_device(name)?;
    Ok(Removed {
        name: name.to_string(),
        deferred,
        was_live: live,
    })
}

/// Saved and live devices, by name.
pub fn list(catalog: &Catalog, max_targets: u64) -> Result<Vec<DeviceStatus>> {
    let dm = DeviceMapper::open()?;
    let mut names: Vec<String> = catalog.devices()?.into_iter().map(|d| d.name).collect();
    names.extend(dm.list()?.into_iter().map(|d| d.name));
    names.sort();
    names.dedup();
    names
        .iter()
        .map(|name| status_with(catalog, &dm, name, max_targets))
        .collect()
}

/// Status of one device.
pub fn status(catalog: &Catalog, name: &str, max_targets: u64) -> Result<DeviceStatus> {
    validate_name(name)?;
    let dm = DeviceMapper::open()?;
    let status = status_with(catalog, &dm, name, max_targets)?;
    if status.image.is_none() && status.live.is_none() {
        return Err(Error::UnknownDevice {
            name: name.to_string(),
        });
    }
    Ok(status)
}

/// The live table of device `name`.
pub fn live_table(name: &str) -> Result<Vec<LiveTarget>> {
    validate_name(name)?;
    let dm = DeviceMapper::open()?;
    if dm.info(name)?.is_none() {
        return Err(Error::UnknownDevice {
            name: name.to_string(),
        });
    }
    dm.table(name)
}

fn status_with(
    catalog: &Catalog,
    dm: &DeviceMapper,
    name: &str,
    max_targets: u64,
) -> Result<DeviceStatus> {
    let saved = catalog.device(name)?;
    let live = dm.info(name)?;
    let state = match (&saved, &live) {
        (Some(_), Some(_)) => "active",
        (Some(_), None) => "missing",
        (None, _) => "unmanaged",
    };
    let mut target_types = BTreeMap::new();
    let mut reads_from = Vec::new();
    if live.is_some() {
        for target in dm.table(name)? {
            *target_types.entry(target.target_type.clone()).or_insert(0) += 1;
            if let Some((device, _)) = target.linear_source()
                && !reads_from.iter().any(|d| d == device)
            {
                reads_from.push(device.to_string());
            }
        }
    }
    reads_from.sort();
    let budget = match &saved {
        Some(record) => match catalog.map(&record.image) {
            Ok((_, map)) => Some(budget::fit(&map, max_targets).1),
            Err(_) => None,
        },
        None => None,
    };
    Ok(DeviceStatus {
        name: name.to_string(),
        image: saved.map(|s| s.image),
        state: state.to_string(),
        node: node_path(name).display().to_string(),
        live,
        target_types,
        reads_from,
        budget,
        table: None,
    })
}

/// Resolves what `vmarctl create` names as the image: a captured image's name, or the path
/// of a captured image file.
pub fn image_name(catalog: &Catalog, reference: &str) -> Result<String> {
    if reference.starts_with('/') {
        let path = Path::new(reference)
            .canonicalize()
            .map_err(|e| Error::io("cannot resolve", reference, e))?;
        return catalog
            .image_at(&path)?
            .map(|i| i.name)
            .ok_or_else(|| Error::UnknownImage {
                name: reference.to_string(),
            });
    }
    validate_name(reference)?;
    catalog.image(reference).map(|i| i.name)
}

/// What `vmarctl stats` reports of one device.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceStats {
    pub name: String,
    pub image: Option<String>,
    pub targets: TargetCounts,
    /// Bytes of the device each class of extent maps.
    pub mapped: ClassBytes,
    /// Bytes read since the device was created (or since its statistics region was).
    pub read: ReadBytes,
    /// Bytes of the device whose backing pages are in the host page cache.
    pub cached: u64,
}

/// Page cache of one image file that devices read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageCache {
    pub path: String,
    /// Loop device (`MAJOR:MINOR`) the tables read it through.
    pub loop_device: String,
    pub size: u64,
    pub cached: u64,
}

/// Result of `stats`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatsReport {
    pub devices: Vec<DeviceStats>,
    pub images: Vec<ImageCache>,
    /// Sums over `devices`.
    pub targets: TargetCounts,
    pub mapped: ClassBytes,
    pub read: ReadBytes,
    /// Cached bytes all devices can read, over cached bytes of the image files: how many
    /// devices' worth of data each cached byte serves (1.0: no sharing).
    pub sharing_factor: Option<f64>,
}

/// Read statistics, target counts and page-cache sharing of device `name`, or of all live
/// devices.
pub fn stats(catalog: &Catalog, name: Option<&str>) -> Result<StatsReport> {
    if let Some(name) = name {
        validate_name(name)?;
    }
    let dm = DeviceMapper::open()?;
    let names: Vec<String> = match name {
        Some(name) => {
            if dm.info(name)?.is_none() {
                return Err(Error::UnknownDevice {
                    name: name.to_string(),
                });
            }
            vec![name.to_string()]
        }
        None => dm.list()?.into_iter().map(|d| d.name).collect(),
    };
    let mut images: BTreeMap<String, (ImageCache, Residency)> = BTreeMap::new();
    let mut report = StatsReport {
        devices: Vec::new(),
        images: Vec::new(),
        targets: TargetCounts::default(),
        mapped: ClassBytes::default(),
        read: ReadBytes::default(),
        sharing_factor: None,
    };
    let mut visible = 0;
    for name in names {
        let table = dm.table(&name)?;
        for (source, _) in table.iter().filter_map(LiveTarget::linear_source) {
            if !images.contains_key(source) {
                // A device that is not one of vmar's loop devices has no image file whose
                // cache could be counted; its reads are still counted.
                match image_cache(source) {
                    Ok(cache) => {
                        images.insert(source.to_string(), cache);
                    }
                    Err(e) => tracing::warn!("{name}: no page-cache figures for {source}: {e}"),
                }
            }
        }
        let image = catalog.device(&name)?.map(|d| d.image);
        let own_path = match &image {
            Some(image) => Some(catalog.image(image)?.path.display().to_string()),
            None => None,
        };
        let own = images
            .iter()
            .find(|(_, (cache, _))| Some(&cache.path) == own_path.as_ref())
            .map(|(device, _)| device.clone());
        let mapped = stats::classify(&table, own.as_deref());
        let mut cached = 0;
        for m in &mapped {
            if let Some((device, offset)) = &m.source
                && let Some((_, residency)) = images.get(device)
            {
                cached += stats::resident_bytes(
                    &residency.pages,
                    residency.page_size,
                    offset * SECTOR_SIZE,
                    m.len * SECTOR_SIZE,
                );
            }
        }
        let sectors = table.last().map_or(0, |t| t.start + t.len);
        let region = dm.ensure_stats_region(&name, stats::area_sectors(sectors))?;
        let read = stats::attribute(&mapped, &dm.stats_areas(&name, region.id)?);
        let device = DeviceStats {
            name,
            image,
            targets: TargetCounts::of(&mapped),
            mapped: stats::layout(&mapped),
            read,
            cached,
        };
        report.targets.accumulate(&device.targets);
        report.mapped.accumulate(&device.mapped);
        report.read.accumulate(&device.read);
        visible += cached;
        report.devices.push(device);
    }
    report.images = images.into_values().map(|(cache, _)| cache).collect();
    let cached: u64 = report.images.iter().map(|i| i.cached).sum();
    report.sharing_factor = stats::sharing_factor(visible, cached);
    Ok(report)
}

/// The image file behind loop device `device` (`MAJOR:MINOR`) and its page-cache residency.
fn image_cache(device: &str) -> Result<(ImageCache, Residency)> {
    let sys = Path::new("/sys/dev/block")
        .join(device)
        .join("loop/backing_file");
    let path = std::fs::read_to_string(&sys)
        .map_err(|e| Error::io("cannot find the image file of", &sys, e))?
        .trim()
        .to_string();
    let size = std::fs::metadata(&path)
        .map_err(|e| Error::io("cannot stat", &path, e))?
        .len();
    let residency = pagecache::residency(Path::new(&path), size)?;
    Ok((
        ImageCache {
            cached: residency.cached_bytes(),
            path,
            loop_device: device.to_string(),
            size,
        },
        residency,
    ))
}
