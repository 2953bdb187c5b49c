//! Prefetch of boot working sets: recording what boots read on this host, showing it, and
//! warming the page cache with it before VMs ask (pure logic in [`crate::workset`], reads
//! and residency in [`io`]).
//!
//! **Recording** ([`record`], `vmarctl record NAME`, or by itself [`Settings::record_after`]
//! seconds after a device's first open, [`Recorder`]): the blocks of device NAME that were
//! read are those of its dm-stats areas with reads (exact for devices up to 16 MiB, one
//! area per block; up to 1/4096 of the device per area above) whose canonical page, where
//! the live table reads it, is in the page cache now (`mincore`). Readahead the kernel did
//! around them counts as read: it is what the boot cost. The set is stored in image
//! space under the device's image and phase, merged (union) with what earlier recordings
//! of that phase found, and bounded to [`crate::workset::MAX_RUNS`] runs.
//!
//! **Warming** ([`warm`], `vmarctl warm NAME...`, or in the background after `create` and
//! `ensure` with `prefetch = "create"`): the union of the images' sets, translated through
//! each image's map as its device serves it (after the target budget), every canonical block
//! once, less what is cached, merged across gaps of up to 128 KiB into requests of up to
//! 8 MiB, read in disk order by one thread in the idle I/O priority class with one
//! 1 MiB buffer, readahead off. Stopped by `vmarctl warm --cancel`, by the client going
//! away, or by vmard stopping.

pub mod io;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use crate::catalog::Catalog;
use crate::error::{Error, Result};
use crate::image::BLOCK_SIZE;
use crate::kernel::Kernel;
use crate::map::ImageId;
use crate::name::{DeviceName, Name};
use crate::protocol::{
    Progress, RecordResult, SetSummary, WarmImage, WarmReport, WorkingSetResult,
};
use crate::stats::STATS_PROGRAM;
use crate::table::BlockDev;
use crate::workset::{self, MergePolicy, Mode, ReadRequest, Run};

/// The prefetch part of vmar.toml.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    pub mode: Mode,
    /// Record a device's working set this long after its first open (`None`: only when
    /// asked).
    pub record_after: Option<Duration>,
    /// Largest gap (bytes) a warm reads through to join two runs into one request
    /// ([`MergePolicy::max_gap`]).
    pub merge_gap: u64,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            mode: Mode::Off,
            record_after: None,
            merge_gap: workset::DEFAULT_MERGE_GAP,
        }
    }
}

impl Settings {
    /// How warms merge their runs into requests under these settings.
    pub fn policy(&self) -> MergePolicy {
        MergePolicy {
            max_gap: self.merge_gap,
            ..MergePolicy::default()
        }
    }
}

static SETTINGS: RwLock<Settings> = RwLock::new(Settings {
    mode: Mode::Off,
    record_after: None,
    merge_gap: workset::DEFAULT_MERGE_GAP,
});

/// Sets what vmard does by itself (at start and on SIGHUP).
pub fn set_settings(settings: Settings) {
    *SETTINGS.write().unwrap_or_else(|p| p.into_inner()) = settings;
}

/// What vmard does by itself.
pub fn settings() -> Settings {
    *SETTINGS.read().unwrap_or_else(|p| p.into_inner())
}

fn summary(phase: &str, set: &workset::WorkingSet, extents: bool) -> SetSummary {
    SetSummary {
        phase: phase.to_string(),
        blocks: set.blocks(),
        bytes: set.blocks() * BLOCK_SIZE,
        runs: set.runs.len() as u64,
        recordings: set.recordings,
        updated: set.updated,
        extents: extents.then(|| set.runs.iter().map(|r| [r.start, r.len]).collect()),
    }
}

/// The image a device or image name stands for: a saved device's image, else the image of
/// that name (neither: `unknown-image`, exit status 4). The name is only looked up.
fn image_of(catalog: &Catalog, name: &str) -> Result<String> {
    if let Some(device) = catalog.device(name)? {
        return Ok(device.image);
    }
    Ok(catalog.image(name)?.name)
}

fn check_phase(phase: &str) -> Result<()> {
    if workset::valid_phase(phase) {
        Ok(())
    } else {
        Err(Error::Protocol(format!(
            "phase {:?}: give 1 to {} characters of a-z, 0-9, - and _",
            crate::error::shorten(phase),
            workset::MAX_PHASE
        )))
    }
}

/// `working-set NAME`: the stored sets of a device's (or an image's) image.
pub fn show(catalog: &Catalog, name: &Name, extents: bool) -> Result<WorkingSetResult> {
    let image = catalog.image(&image_of(catalog, name)?)?;
    let sets = catalog
        .working_sets(image.id)?
        .iter()
        .map(|(phase, set)| summary(phase, set, extents))
        .collect();
    Ok(WorkingSetResult {
        image: image.name,
        sets,
    })
}

/// `forget-working-set`: drops the sets of NAME's image (of `phase`, or all).
pub fn forget(catalog: &Catalog, name: &Name, phase: Option<&str>) -> Result<usize> {
    if let Some(phase) = phase {
        check_phase(phase)?;
    }
    let image = catalog.image(&image_of(catalog, name)?)?;
    catalog.forget_working_sets(image.id, phase)
}

/// The read areas of live device `name`, (start, length) in sectors.
fn read_areas(kernel: &dyn Kernel, name: &str) -> Result<Vec<(u64, u64)>> {
    let region = kernel
        .stats_regions(name)?
        .into_iter()
        .find(|r| r.program == STATS_PROGRAM)
        .ok_or_else(|| {
            Error::Protocol(format!(
                "device {} has no read statistics (dm-stats region); `vmarctl stats {}` makes one, then boot its VM again",
                crate::error::shorten(name),
                crate::error::shorten(name)
            ))
        })?;
    Ok(kernel
        .stats_areas(name, region.id)?
        .into_iter()
        .filter(|a| a.sectors_read > 0)
        .map(|a| (a.start, a.len))
        .collect())
}

/// The file a loop device reads, by the catalog's name for it where known.
fn loop_file(
    catalog: &Catalog,
    loops: &[crate::kernel::LoopInfo],
    captured: &[crate::records::ImageRecord],
    device: &BlockDev,
) -> Option<PathBuf> {
    let l = loops.iter().find(|l| l.block_dev() == *device)?;
    captured
        .iter()
        .find(|i| l.backs(&i.path, &i.identity))
        .map(|i| crate::holds::current_path(catalog, i))
        .or_else(|| l.backing.clone())
}

/// Size of the file or block device open as `file`.
fn size_of(file: &File, path: &std::path::Path) -> Result<u64> {
    use std::io::{Seek, SeekFrom};
    let meta = file
        .metadata()
        .map_err(|e| Error::io("cannot stat", path, e))?;
    if meta.is_file() {
        return Ok(meta.len());
    }
    let mut f = file;
    f.seek(SeekFrom::End(0))
        .map_err(|e| Error::io("cannot size", path, e))
}

/// `record NAME`: what device `name` read, from its dm-stats areas and the page cache,
/// merged into its image's set of `phase` (replacing it with `replace`). `areas` overrides
/// the kernel's counters (the recorder's reads since the device's last close).
pub fn record(
    catalog: &Catalog,
    kernel: &dyn Kernel,
    name: &DeviceName,
    phase: &str,
    replace: bool,
) -> Result<RecordResult> {
    record_areas(catalog, kernel, name, phase, replace, None)
}

fn record_areas(
    catalog: &Catalog,
    kernel: &dyn Kernel,
    name: &str,
    phase: &str,
    replace: bool,
    areas: Option<Vec<(u64, u64)>>,
) -> Result<RecordResult> {
    check_phase(phase)?;
    let unknown = || Error::UnknownDevice {
        name: name.to_string(),
    };
    let saved = catalog.device(name)?.ok_or_else(unknown)?;
    kernel.dm_info(name)?.ok_or_else(unknown)?;
    let image = catalog.image(&saved.image)?;
    let table = kernel.dm_table(name)?;
    let areas = match areas {
        Some(areas) => areas,
        None => read_areas(kernel, name)?,
    };
    let targets: Vec<workset::TableTarget<BlockDev>> = table
        .iter()
        .map(|t| {
            let source = t.linear_source().map(|(d, at)| (d.clone(), at.0));
            (t.start.0, t.len.0, source)
        })
        .collect();
    let segments = workset::read_segments(&areas, &targets);
    let loops = kernel.loops()?;
    let captured = catalog.images()?;
    // Residency of each segment's source, one segment at a time (memory bounded by the
    // largest area); unknown residency (no file found) keeps the segment's blocks.
    let mut files: BTreeMap<BlockDev, Option<(File, PathBuf, u64)>> = BTreeMap::new();
    let mut recording = workset::Recording::new();
    for s in &segments {
        let resident = match &s.source {
            Some((device, from)) => {
                let entry = files.entry(device.clone()).or_insert_with(|| {
                    let path = loop_file(catalog, &loops, &captured, device)?;
                    let file = File::open(&path).ok()?;
                    let size = size_of(&file, &path).ok()?;
                    Some((file, path, size))
                });
                match entry {
                    Some((file, path, size)) => {
                        Some(io::resident_blocks(file, path, *size, *from, s.blocks)?)
                    }
                    None => None,
                }
            }
            None => None,
        };
        recording.add(s, resident.as_deref());
    }
    let recorded = recording.blocks;
    let runs = recording.finish();
    let area_blocks: u64 = segments.iter().map(|s| s.blocks).sum();
    let previous = if replace {
        None
    } else {
        catalog
            .working_sets(image.id)?
            .into_iter()
            .find(|(p, _)| p == phase)
            .map(|(_, set)| set)
    };
    let set = workset::merge_recording(previous.as_ref(), &runs, crate::time::now_secs());
    catalog.save_working_set(image.id, phase, &set)?;
    tracing::info!(
        device = name,
        image = image.name,
        phase,
        recorded_bytes = recorded * BLOCK_SIZE,
        set_bytes = set.blocks() * BLOCK_SIZE,
        "working set recorded"
    );
    Ok(RecordResult {
        device: name.to_string(),
        image: image.name,
        read_area_bytes: area_blocks * BLOCK_SIZE,
        uncached_bytes: (area_blocks - recorded.min(area_blocks)) * BLOCK_SIZE,
        recorded_bytes: recorded * BLOCK_SIZE,
        set: summary(phase, &set, false),
    })
}

/// A warm ready to read: its requests and the files they read.
pub struct Plan {
    pub report: WarmReport,
    pub requests: Vec<ReadRequest>,
    files: BTreeMap<ImageId, (PathBuf, String)>,
}

/// Plans warming `names` (devices or images): the union of their working sets (of `phase`,
/// or all phases) through their maps as served under `max_targets`, less what is cached.
/// The names are only looked up (a request's were checked when it was read).
pub fn plan(
    catalog: &Catalog,
    names: &[impl AsRef<str>],
    phase: Option<&str>,
    max_targets: u64,
    policy: MergePolicy,
) -> Result<Plan> {
    if let Some(phase) = phase {
        check_phase(phase)?;
    }
    let mut report = WarmReport::default();
    let mut canonical = Vec::new();
    let mut per_image_bytes = 0;
    let mut seen = BTreeSet::new();
    for name in names {
        let image_name = image_of(catalog, name.as_ref())?;
        if !seen.insert(image_name.clone()) {
            continue;
        }
        let (record, map) = catalog.map(&image_name)?;
        let (map, _) = crate::budget::fit(&map, max_targets);
        let mut phases = Vec::new();
        let mut runs: Vec<Run> = Vec::new();
        for (p, set) in catalog.working_sets(record.id)? {
            if phase.is_none_or(|phase| phase == p) {
                runs.extend_from_slice(&set.runs);
                phases.push(p);
            }
        }
        let runs = workset::normalize(runs);
        let mine = workset::union(workset::translate(&runs, &map));
        let mine_blocks: u64 = mine.iter().map(|c| c.len).sum();
        per_image_bytes += mine_blocks * BLOCK_SIZE;
        canonical.extend(mine);
        report.images.push(WarmImage {
            name: name.as_ref().to_string(),
            image: record.name,
            phases,
            bytes: workset::blocks(&runs) * BLOCK_SIZE,
            canonical_bytes: mine_blocks * BLOCK_SIZE,
        });
    }
    let union = workset::union(canonical);
    report.union_bytes = union.iter().map(|c| c.len).sum::<u64>() * BLOCK_SIZE;
    report.shared_bytes = per_image_bytes.saturating_sub(report.union_bytes);
    // The files, their sizes, and what of the union they hold cached already.
    let mut files = BTreeMap::new();
    let mut sizes = BTreeMap::new();
    let mut cached = Vec::new();
    let mut wanted = Vec::new();
    for chunk in union.chunk_by(|a, b| a.image == b.image) {
        let id = chunk[0].image;
        let record = catalog.image_by_id(id)?;
        let path = crate::holds::current_path(catalog, &record);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) => {
                report.errors.push(format!(
                    "{}: cannot open {}: {e}",
                    record.name,
                    path.display()
                ));
                continue;
            }
        };
        let size = size_of(&file, &path)?;
        cached.extend(io::cached_runs(&file, &path, size, chunk)?);
        wanted.extend_from_slice(chunk);
        sizes.insert(id, size);
        files.insert(id, (path, record.name));
    }
    report.cached_bytes = cached.iter().map(|c| c.len).sum::<u64>() * BLOCK_SIZE;
    let rest = workset::subtract(&wanted, &cached);
    let mut requests = workset::requests(&rest, |id| sizes.get(&id).copied().unwrap_or(0), policy);
    // In disk order where the file systems tell (FIEMAP) and the files share one device
    // (positions on different devices do not compare), else by image and offset.
    let mut handles = BTreeMap::new();
    let mut devices = BTreeSet::new();
    for (id, (path, _)) in &files {
        if let Ok(file) = File::open(path) {
            if let Ok(meta) = file.metadata() {
                devices.insert(std::os::unix::fs::MetadataExt::dev(&meta));
            }
            handles.insert(*id, file);
        }
    }
    let one_device = devices.len() == 1;
    workset::order(&mut requests, |r| {
        let file = handles.get(&r.image).filter(|_| one_device)?;
        io::physical_offset(file, r.offset)
    });
    let figures = workset::figures(&requests);
    report.requests = figures.requests;
    report.request_bytes = figures.bytes;
    report.gap_bytes = figures.bytes - figures.wanted;
    Ok(Plan {
        report,
        requests,
        files,
    })
}

/// Whether the failure to lower the I/O priority was logged (once is enough).
static PRIORITY_WARNED: AtomicBool = AtomicBool::new(false);

/// Held by the background warm that reads.
static BACKGROUND: Mutex<()> = Mutex::new(());

/// Warms running now, each with its stop flag.
static RUNNING: Mutex<BTreeMap<u64, Arc<AtomicBool>>> = Mutex::new(BTreeMap::new());
static NEXT: AtomicU64 = AtomicU64::new(0);

/// Stops every running warm; returns how many.
pub fn cancel_all() -> u64 {
    let running = RUNNING.lock().unwrap_or_else(|p| p.into_inner());
    for flag in running.values() {
        flag.store(true, Ordering::SeqCst);
    }
    running.len() as u64
}

/// A running warm's registration; deregisters when dropped.
struct Registered(u64, Arc<AtomicBool>);

impl Registered {
    fn new() -> Registered {
        let id = NEXT.fetch_add(1, Ordering::SeqCst);
        let flag = Arc::new(AtomicBool::new(false));
        RUNNING
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, Arc::clone(&flag));
        Registered(id, flag)
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        RUNNING
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.0);
    }
}

impl Plan {
    /// Reads the plan on this thread in the idle I/O priority class (restored
    /// after), until done or `stop`.
    pub fn execute(
        mut self,
        stop: &dyn Fn() -> bool,
        progress: &mut dyn FnMut(Progress),
    ) -> WarmReport {
        let registered = Registered::new();
        let before = io::priority().ok();
        if let Err(e) = io::lower_priority()
            && !PRIORITY_WARNED.swap(true, Ordering::SeqCst)
        {
            // The shipped unit allows ioprio_set alone of @resources; a unit that leaves out
            // the whole group refuses it.
            tracing::warn!(
                "working sets are warmed at vmard's own I/O priority: ioprio_set: {e} (a unit whose SystemCallFilter= leaves out @resources needs SystemCallFilter=ioprio_set after it)"
            );
        }
        let total = self.report.request_bytes;
        let files = &self.files;
        let open = |id: ImageId| {
            let (path, name) = files.get(&id)?;
            io::open_for_reading(path).ok().map(|f| (f, name.clone()))
        };
        let flag = &registered.1;
        let halt = || stop() || flag.load(Ordering::SeqCst) || crate::shutdown::requested();
        // A progress line every 8 MiB: enough to notice a client that went away.
        let mut next = 0;
        let outcome = io::read_requests(&open, &self.requests, &halt, &mut |done| {
            if done >= next || done == total {
                next = done + (8 << 20);
                progress(Progress { done, total });
            }
        });
        if let Some(before) = before {
            // SAFETY: as in io::lower_priority: three integers, the calling thread.
            unsafe {
                nix::libc::syscall(nix::libc::SYS_ioprio_set, 1, 0, before);
            }
        }
        self.report.read_bytes = outcome.bytes;
        self.report.reads = outcome.reads;
        self.report.seconds = outcome.seconds;
        self.report.cancelled = outcome.cancelled;
        self.report.skipped_requests = outcome.skipped;
        self.report.errors.extend(outcome.errors);
        self.report
    }

    /// Reads the plan on a thread of its own; returns the report so far.
    pub fn spawn(self) -> WarmReport {
        let mut report = self.report.clone();
        report.background = true;
        if self.requests.is_empty() {
            return report;
        }
        let names: Vec<String> = self.report.images.iter().map(|i| i.name.clone()).collect();
        let spawned = std::thread::Builder::new()
            .name("vmard-warm".into())
            .spawn(move || {
                // One background warm at a time: the next one skips what this one read.
                let _one = BACKGROUND.lock().unwrap_or_else(|p| p.into_inner());
                let done = self.execute(&|| false, &mut |_| {});
                tracing::info!(
                    images = names.join(" "),
                    read_bytes = done.read_bytes,
                    requests = done.requests,
                    seconds = done.seconds,
                    cancelled = done.cancelled,
                    "working sets warmed"
                );
            });
        if let Err(e) = spawned {
            report.errors.push(format!("cannot start the warm: {e}"));
        }
        report
    }
}

/// `warm NAME...`: plans and reads now, on the request's thread (stopped when its client
/// goes away); with `cancel`, stops the running warms instead.
pub fn warm(
    catalog: &Catalog,
    names: &[Name],
    phase: Option<&str>,
    max_targets: u64,
    cancel: bool,
    progress: &mut dyn FnMut(Progress),
) -> Result<WarmReport> {
    if cancel {
        return Ok(WarmReport {
            stopped: cancel_all(),
            ..WarmReport::default()
        });
    }
    if names.is_empty() {
        return Err(Error::Protocol("name the devices or images to warm".into()));
    }
    let plan = plan(catalog, names, phase, max_targets, settings().policy())?;
    Ok(plan.execute(&crate::shutdown::cancelled, progress))
}

/// After a successful `create` or `ensure` of device `name`: with `prefetch = "create"`,
/// warms its image's working sets in the background. Never fails the request: problems are
/// logged.
pub fn after_device(catalog: &Catalog, name: &str, max_targets: u64) {
    if settings().mode != Mode::Create {
        return;
    }
    match plan(
        catalog,
        &[name.to_string()],
        None,
        max_targets,
        settings().policy(),
    ) {
        Ok(plan) if plan.requests.is_empty() => {}
        Ok(plan) => {
            let report = plan.spawn();
            tracing::info!(
                device = name,
                request_bytes = report.request_bytes,
                cached_bytes = report.cached_bytes,
                "warming the working set"
            );
        }
        Err(e) => tracing::warn!("{name}: working set not warmed: {e}"),
    }
}

/// What the recorder needs of vmard (implemented by [`crate::service::Context`]).
pub trait Host: Send + Sync {
    fn catalog(&self) -> &Catalog;
    fn kernel(&self) -> Result<Arc<dyn Kernel>>;
    /// Serialises with device changes while a recording reads a live table.
    fn serialise(&self) -> Box<dyn Held + '_>;
}

/// A guard held until dropped.
pub trait Held {}
impl<T> Held for T {}

/// One device as the recorder last saw it.
#[derive(Debug, Default)]
struct Watched {
    /// Per-area sectors read when last seen closed (`None`: never seen closed, so counted
    /// from the device's creation).
    baseline: Option<Vec<u64>>,
    /// When it was first seen open since then.
    opened: Option<std::time::Instant>,
    recorded: bool,
}

/// Records the working set of every saved device `record_after` seconds after its first
/// open ([`Settings::record_after`]): the areas read since it was last seen closed. vmard
/// looks every quarter of `record_after`, between 0.25 and 5 s; a device opened and closed
/// between two looks is not recorded.
pub struct Recorder {
    watched: BTreeMap<String, Watched>,
}

impl Default for Recorder {
    fn default() -> Recorder {
        Recorder::new()
    }
}

impl Recorder {
    pub fn new() -> Recorder {
        Recorder {
            watched: BTreeMap::new(),
        }
    }

    /// The sectors read per area of `name`'s vmar region, in area order.
    fn counters(kernel: &dyn Kernel, name: &str) -> Result<Vec<(u64, u64, u64)>> {
        let Some(region) = kernel
            .stats_regions(name)?
            .into_iter()
            .find(|r| r.program == STATS_PROGRAM)
        else {
            return Ok(Vec::new());
        };
        Ok(kernel
            .stats_areas(name, region.id)?
            .into_iter()
            .map(|a| (a.start, a.len, a.sectors_read))
            .collect())
    }

    /// One look at the devices; records those due. Returns the recordings made.
    pub fn tick(&mut self, host: &dyn Host, after: Duration) -> Vec<RecordResult> {
        let mut done = Vec::new();
        let kernel = match host.kernel() {
            Ok(kernel) => kernel,
            Err(_) => return done,
        };
        let devices = match host.catalog().devices() {
            Ok(devices) => devices,
            Err(e) => {
                tracing::warn!("working sets not recorded: {e}");
                return done;
            }
        };
        self.watched
            .retain(|name, _| devices.iter().any(|d| &d.name == name));
        for device in devices {
            let name = device.name;
            let Ok(Some(info)) = kernel.dm_info(&name) else {
                self.watched.remove(&name);
                continue;
            };
            let watched = self.watched.entry(name.clone()).or_default();
            if info.open_count <= 0 {
                watched.opened = None;
                watched.recorded = false;
                watched.baseline = Self::counters(kernel.as_ref(), &name)
                    .ok()
                    .map(|c| c.into_iter().map(|(_, _, read)| read).collect());
                continue;
            }
            let opened = *watched.opened.get_or_insert_with(std::time::Instant::now);
            if watched.recorded || opened.elapsed() < after {
                continue;
            }
            watched.recorded = true;
            let outcome = (|| {
                let _serial = host.serialise();
                let counters = Self::counters(kernel.as_ref(), &name)?;
                let areas = counters
                    .iter()
                    .enumerate()
                    .filter(|(i, (_, _, read))| {
                        let before = watched
                            .baseline
                            .as_ref()
                            .and_then(|b| b.get(*i).copied())
                            .unwrap_or(0);
                        *read > before
                    })
                    .map(|(_, (start, len, _))| (*start, *len))
                    .collect();
                record_areas(
                    host.catalog(),
                    kernel.as_ref(),
                    &name,
                    workset::DEFAULT_PHASE,
                    false,
                    Some(areas),
                )
            })();
            match outcome {
                Ok(result) => done.push(result),
                Err(e) => tracing::warn!("{name}: working set not recorded: {e}"),
            }
        }
        done
    }
}

/// Starts the recorder thread: while `record_after` is set, a look every quarter of it
/// (0.25 to 5 s). It holds vmard's context weakly and ends at shutdown.
pub fn start_recorder(host: std::sync::Weak<dyn Host>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("vmard-record".into())
        .spawn(move || {
            let mut recorder = Recorder::new();
            while !crate::shutdown::requested() {
                let after = settings().record_after;
                let pause = after.map_or(Duration::from_secs(5), |a| {
                    (a / 4).clamp(Duration::from_millis(250), Duration::from_secs(5))
                });
                std::thread::sleep(pause);
                let (Some(after), Some(host)) = (after, host.upgrade()) else {
                    continue;
                };
                recorder.tick(host.as_ref(), after);
            }
        })
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_running_warm_is_stopped_by_cancel_all_and_then_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, vec![9u8; 4 << 20]).unwrap();
        File::open(&path).unwrap().sync_all().unwrap();
        io::drop_cache(&path).unwrap();
        let requests: Vec<ReadRequest> = (0..4)
            .map(|i| ReadRequest {
                image: 1,
                offset: i << 20,
                len: 1 << 20,
                wanted: 1 << 20,
            })
            .collect();
        let plan = |requests: Vec<ReadRequest>| Plan {
            report: WarmReport {
                request_bytes: 4 << 20,
                ..WarmReport::default()
            },
            requests,
            files: BTreeMap::from([(1, (path.clone(), "img".to_string()))]),
        };
        // Another client cancels while it runs: the stop check sees it at the next read.
        let stopped = std::cell::Cell::new(0);
        let report = plan(requests.clone()).execute(
            &|| {
                stopped.set(stopped.get() + cancel_all());
                false
            },
            &mut |_| {},
        );
        assert_eq!(stopped.get(), 1, "the warm was registered while it ran");
        // Unless the cache could not be dropped (tmpfs: every request skipped).
        if report.skipped_requests == 0 {
            assert!(report.cancelled, "{report:?}");
            assert_eq!(report.read_bytes, 0);
        }
        // Done: no longer registered.
        assert_eq!(cancel_all(), 0);
        // Not cancelled: reads everything that is not cached.
        io::drop_cache(&path).unwrap();
        let mut seen = Vec::new();
        let report = plan(requests).execute(&|| false, &mut |p| seen.push(p.done));
        assert!(!report.cancelled);
        assert_eq!(
            report.read_bytes + (report.skipped_requests << 20),
            4 << 20,
            "{report:?}"
        );
        assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    }
}
