//! The image guard: images that live devices read must not change under them, and vmar
//! does not own them. Two layers:
//!
//! - **refusal** ([`perm`]): a fanotify permission guard makes the kernel refuse opens for
//!   writing of every image a live device reads (directly or as a redirect target), and
//!   names the process in the log;
//! - **detection** ([`check`]): whatever the guard cannot see (a writer that opened before
//!   the mark, `truncate(2)` by path, another NFS client, a block device written through
//!   another device, a vmard that was not running) is found by comparing every guarded
//!   image with the catalog: a file by its identity (size, mtime, ctime), a block device by
//!   its write counters and sampled digests ([`sample`]). Checks run when fanotify reports a
//!   write, every `image_check_interval` seconds, after every device change and on SIGHUP.
//!
//! A device that reads a changed image goes to state `image-changed` (saved, so a restart
//! or reboot keeps the verdict), logged at ERROR, and is handled by the policy
//! `on_image_change`: `fail-closed` (default) swaps its table, atomically while open, to one
//! whose extents reading the changed image are `error` targets, so the VM gets EIO there
//! (as dm-verity does) and the rest still reads; `report` leaves the table as it is.

pub mod perm;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::catalog::{Catalog, DeviceRecord, DeviceState, ImageRecord};
use crate::error::{Error, Result};
use crate::image::{DeviceNumber, ImageIdentity};
use crate::kernel::Kernel;
use crate::table::{self, BlockDev};

pub use crate::policy::{DEFAULT_INTERVAL, DEFAULT_SAMPLES, Policy, Settings, settings};
use crate::sample::{self, PLAN_SAMPLES};
pub use perm::{FileKey, Guarded};

impl Policy {
    fn action(self) -> &'static str {
        match self {
            Policy::FailClosed => {
                "reads of its extents now fail with EIO (on_image_change = \"fail-closed\")"
            }
            Policy::Report => "the devices serve what it holds now (on_image_change = \"report\")",
        }
    }
}

/// Wakes the checker; a request may carry a sender to be told when a check that began after
/// it has finished.
static WAKE: Mutex<Option<mpsc::Sender<Option<mpsc::Sender<()>>>>> = Mutex::new(None);
/// Longest a device change waits for the guard to mark its images.
const SYNC_WAIT: Duration = Duration::from_secs(10);

/// Replaces the guard's settings (start, SIGHUP) and checks at once.
pub fn set_settings(settings: Settings) {
    crate::policy::store(settings);
    poke();
}

/// Asks the running guard to check now (a device changed, a write was seen, SIGHUP).
pub fn poke() {
    if let Ok(wake) = WAKE.lock()
        && let Some(wake) = wake.as_ref()
    {
        let _ = wake.send(None);
    }
}

/// Checks now and waits (boundedly) until that check is done, so that a device change
/// returns only once the images it reads are guarded. The caller must not hold the lock
/// for device changes. Returns at once when no guard runs.
pub fn sync() {
    let (done, finished) = mpsc::channel();
    let sent = WAKE
        .lock()
        .ok()
        .and_then(|wake| wake.as_ref().map(|w| w.send(Some(done)).is_ok()))
        .unwrap_or(false);
    if sent && finished.recv_timeout(SYNC_WAIT).is_err() {
        tracing::warn!("the image guard did not check within {SYNC_WAIT:?}");
    }
}

/// An image found changed under live devices.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangedImage {
    pub image: String,
    pub path: PathBuf,
    pub what: String,
}

/// What one check found.
#[derive(Debug, Default)]
pub struct CheckReport {
    /// Every image a live device reads, with its devices: what the permission guard marks.
    pub guarded: Vec<Guarded>,
    /// Images found changed by this check (not before).
    pub changed: Vec<ChangedImage>,
    /// Devices that went `image-changed` in this check.
    pub affected: Vec<String>,
    /// Devices or images that could not be checked, and why.
    pub failed: Vec<(String, String)>,
}

/// What the checker remembers between checks: block devices' write counters when vmar
/// began serving them, and their sample pools.
#[derive(Default)]
pub struct Probe {
    baselines: BTreeMap<DeviceNumber, u64>,
    samples: BTreeMap<String, sample::Samples>,
}

impl Probe {
    /// How `image` differs from its capture now, if it does. A file that is gone or was
    /// replaced is not a change of what its loop device serves (that still reads the
    /// captured inode); only a write in place or a truncation is.
    pub fn change_of(
        &mut self,
        catalog: &Catalog,
        image: &ImageRecord,
        samples: usize,
    ) -> Result<Option<String>> {
        let captured = &image.identity;
        if let Some(device) = captured.block_device() {
            return self.block_change(catalog, image, device, samples);
        }
        let Ok(meta) = std::fs::metadata(&image.path) else {
            return Ok(None);
        };
        if meta.dev() != captured.dev || meta.ino() != captured.ino {
            return Ok(None);
        }
        let now = ImageIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime_ns: Some(
                i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
            ),
            block_id: None,
        };
        Ok((now != *captured).then(|| captured.describe_change(&now)))
    }

    fn block_change(
        &mut self,
        catalog: &Catalog,
        image: &ImageRecord,
        device: DeviceNumber,
        samples: usize,
    ) -> Result<Option<String>> {
        let file = sample::open_direct(&image.path).ok();
        // Counters count I/O that reached the device: buffered writes still in its page
        // cache (which the loop device already serves) are written back first.
        if let Some(file) = &file
            && let Err(e) = file.sync_all()
        {
            tracing::debug!(path = %image.path.display(), "cannot flush before counting writes: {e}");
        }
        if let Some(now) = sample::writes(device) {
            let base = *self.baselines.entry(device).or_insert(now);
            if now > base {
                return Ok(Some(format!(
                    "{} sectors written to or discarded on the device since vmar began serving it",
                    now - base
                )));
            }
        }
        let Some(file) = file else {
            return Ok(None);
        };
        let meta = file
            .metadata()
            .map_err(|e| Error::io("cannot stat", &image.path, e))?;
        if meta.rdev() != image.identity.dev {
            // Another device under that name now; the loop device serves the captured one.
            return Ok(None);
        }
        let size = {
            use std::io::{Seek, SeekFrom};
            (&file)
                .seek(SeekFrom::End(0))
                .map_err(|e| Error::io("cannot size", &image.path, e))?
        };
        if size != image.size {
            return Ok(Some(format!("size {} -> {size}", image.size)));
        }
        let pool = match self.samples.entry(image.name.clone()) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => {
                e.insert(sample::load(catalog, image, PLAN_SAMPLES)?)
            }
        };
        pool.check(&file, &image.path, size, samples)
    }

    /// Forgets what it knew of images no live device reads any more.
    fn retain(&mut self, guarded: &[Guarded]) {
        self.samples
            .retain(|name, _| guarded.iter().any(|g| &g.image == name));
        self.baselines.retain(|device, _| {
            guarded.iter().any(|g| {
                matches!(g.key, FileKey::Block { rdev } if crate::image::device_number(rdev) == Some(*device))
            })
        });
    }
}

/// The key the permission guard knows `image` by.
pub fn key_of(identity: &ImageIdentity) -> FileKey {
    if identity.is_block_device() {
        FileKey::Block { rdev: identity.dev }
    } else {
        FileKey::File {
            dev: identity.dev,
            ino: identity.ino,
        }
    }
}

/// Checks every image that live devices read and applies the policy to the devices of
/// those that changed. The caller serialises it with device changes.
pub fn check(
    catalog: &Catalog,
    kernel: &dyn Kernel,
    probe: &mut Probe,
    settings: Settings,
) -> Result<CheckReport> {
    let mut report = CheckReport::default();
    let mut verdicts: BTreeMap<String, Option<String>> = BTreeMap::new();
    let mut guarded: BTreeMap<String, Guarded> = BTreeMap::new();
    let mut sources_of: BTreeMap<String, std::result::Result<Vec<ImageRecord>, String>> =
        BTreeMap::new();
    for device in catalog.devices()? {
        if !matches!(
            device.state,
            DeviceState::Active | DeviceState::ImageChanged
        ) {
            continue;
        }
        if kernel.dm_info(&device.name)?.is_none() {
            continue;
        }
        // Devices of one image read the same images: its map is read once per check.
        let found = sources_of.entry(device.image.clone()).or_insert_with(|| {
            catalog
                .map(&device.image)
                .and_then(|(record, map)| catalog.sources_of(&record, &map))
                .map(|sources| sources.into_values().collect())
                .map_err(|e| e.to_string())
        });
        let sources = match found {
            Ok(sources) => sources.clone(),
            Err(e) => {
                report.failed.push((device.name.clone(), e.clone()));
                continue;
            }
        };
        let mut newly = Vec::new();
        for image in sources {
            guarded
                .entry(image.name.clone())
                .or_insert_with(|| Guarded {
                    image: image.name.clone(),
                    path: image.path.clone(),
                    key: key_of(&image.identity),
                    devices: Vec::new(),
                })
                .devices
                .push(device.name.clone());
            if !verdicts.contains_key(&image.name) {
                let verdict = match probe.change_of(catalog, &image, settings.samples) {
                    Ok(verdict) => verdict,
                    Err(e) => {
                        report.failed.push((image.name.clone(), e.to_string()));
                        None
                    }
                };
                verdicts.insert(image.name.clone(), verdict);
            }
            if let Some(Some(what)) = verdicts.get(&image.name)
                && !device.changed.contains(&image.name)
            {
                newly.push((image, what.clone()));
            }
        }
        if newly.is_empty() {
            continue;
        }
        match affect(catalog, kernel, &device, &newly, settings.policy) {
            Ok(()) => report.affected.push(device.name.clone()),
            Err(e) => report.failed.push((device.name.clone(), e.to_string())),
        }
    }
    report.guarded = guarded.into_values().collect();
    for g in &report.guarded {
        if let Some(Some(what)) = verdicts.get(&g.image) {
            let first = report.affected.iter().any(|d| g.devices.contains(d));
            if first {
                tracing::error!(
                    image = %g.image,
                    path = %g.path.display(),
                    devices = ?g.devices,
                    "image changed under live devices ({what}): {}",
                    settings.policy.action()
                );
                report.changed.push(ChangedImage {
                    image: g.image.clone(),
                    path: g.path.clone(),
                    what: what.clone(),
                });
            }
        }
    }
    probe.retain(&report.guarded);
    Ok(report)
}

/// Marks `device` `image-changed` for `images` and, failing closed, swaps in its table with
/// their extents as `error` targets.
fn affect(
    catalog: &Catalog,
    kernel: &dyn Kernel,
    device: &DeviceRecord,
    images: &[(ImageRecord, String)],
    policy: Policy,
) -> Result<()> {
    // Saved first: if the swap fails or vmard dies, restore fails it closed.
    let mut record = device.clone();
    record.state = DeviceState::ImageChanged;
    for (image, _) in images {
        if !record.changed.contains(&image.name) {
            record.changed.push(image.name.clone());
        }
    }
    catalog.save_device(&record)?;
    if policy == Policy::FailClosed {
        let live = kernel.dm_table(&device.name)?;
        let loops = kernel.loops()?;
        let changed: Vec<BlockDev> = loops
            .iter()
            .filter(|l| images.iter().any(|(i, _)| l.backs(&i.path, &i.identity)))
            .map(crate::kernel::LoopInfo::block_dev)
            .collect();
        let closed = table::fail_closed(&live, &changed);
        if closed != live {
            crate::device::swap(kernel, &device.name, &closed)?;
        }
    }
    Ok(())
}

/// Starts the guard in vmard: the checker thread and, if `refuse` and the kernel allows
/// it, the fanotify permission guard. `check` runs one check (taking vmard's lock for
/// device changes) and returns what it found.
pub fn start(
    refuse: bool,
    check: impl Fn(&mut Probe) -> Result<CheckReport> + Send + 'static,
) -> Result<()> {
    let (wake, woken) = mpsc::channel::<Option<mpsc::Sender<()>>>();
    if let Ok(mut w) = WAKE.lock() {
        *w = Some(wake);
    }
    let marks = if refuse {
        match perm::Marks::new() {
            Ok(marks) => {
                let marks = Arc::new(marks);
                let listener = Arc::clone(&marks);
                std::thread::Builder::new()
                    .name("vmard-fanotify".into())
                    .spawn(move || listener.listen(poke))
                    .map_err(|e| Error::io("cannot start the fanotify thread", "vmard", e))?;
                let changes = Arc::clone(&marks);
                std::thread::Builder::new()
                    .name("vmard-changes".into())
                    .spawn(move || changes.listen_changes(poke))
                    .map_err(|e| Error::io("cannot start the fanotify thread", "vmard", e))?;
                Some(marks)
            }
            Err(e) => {
                tracing::warn!(
                    "writes to served images are not refused, only detected: {e} (needs CAP_SYS_ADMIN and fanotify_init in the system call filter)"
                );
                None
            }
        }
    } else {
        tracing::info!("writes to served images are only detected (refuse_image_writes = false)");
        None
    };
    std::thread::Builder::new()
        .name("vmard-guard".into())
        .spawn(move || {
            let mut probe = Probe::default();
            let mut waiting: Vec<mpsc::Sender<()>> = Vec::new();
            loop {
                tracing::debug!("image check");
                match check(&mut probe) {
                    Ok(report) => {
                        tracing::debug!(
                            guarded = report.guarded.len(),
                            changed = report.changed.len(),
                            "image check done"
                        );
                        for (what, why) in &report.failed {
                            tracing::warn!("image check of {what} failed: {why}");
                        }
                        if let Some(marks) = &marks {
                            marks.set(report.guarded);
                        }
                    }
                    Err(e) => tracing::warn!("image check failed: {e}"),
                }
                for done in waiting.drain(..) {
                    let _ = done.send(());
                }
                match woken.recv_timeout(settings().interval) {
                    Ok(first) => {
                        // Several wake-ups (a burst of writes) make one check.
                        waiting.extend(first);
                        while let Ok(more) = woken.try_recv() {
                            waiting.extend(more);
                        }
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
        })
        .map_err(|e| Error::io("cannot start the guard thread", "vmard", e))?;
    Ok(())
}
