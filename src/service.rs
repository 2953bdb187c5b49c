//! What vmard does for each request, independent of the socket: turns a [`Request`] into a
//! JSON result using the catalog and the kernel. Kept apart from the server so it is tested
//! without one.
//!
//! Device changes (create, refresh, remove, restore) and the catalog changes that could pull
//! an image from under a device (forget, re-capture) run one at a time, under one lock: a
//! device name has one truth, and what a change checked stays true until it is done.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Instant;

use serde::Serialize;
use serde_json::Value;

use crate::catalog::Catalog;
use crate::error::{Error, Result};
use crate::instance::InstanceId;
use crate::kernel::Kernel;
use crate::protocol::{
    Call, CaptureResult, Dependent, Dependents, DeviceStatus, ForgetResult, ForgetWorkingSetResult,
    ImageEntry, ImageRef, ImagesResult, MapResult, MetricsResult, PROTOCOL_VERSION, PingResult,
    Progress, Redirecting, Request, TableResult, request,
};
use crate::roots::ImageRoots;
use crate::table::{self, BlockDev};
use crate::verify::verify;
use crate::{binding, device, prefetch};

/// What can change while vmard runs (SIGHUP re-reads the configuration).
#[derive(Clone, Debug, Default)]
pub struct Settings {
    /// Most targets of one device table.
    pub max_targets: u64,
    /// Where images may be captured from.
    pub roots: ImageRoots,
}

/// Opens the kernel when first needed, so that a host without device-mapper can still
/// capture and verify.
pub type KernelOpener = Box<dyn Fn() -> Result<Arc<dyn Kernel>> + Send + Sync>;

/// What the service needs besides the request.
pub struct Context {
    pub catalog: Catalog,
    /// The state dir's instance id, in the UUID of every device it makes.
    pub instance: InstanceId,
    settings: RwLock<Settings>,
    /// Saved devices the last restore or retry could not serve, with the reason.
    waiting: Mutex<BTreeMap<String, String>>,
    kernel: Mutex<Option<Arc<dyn Kernel>>>,
    open_kernel: KernelOpener,
    changes: Mutex<()>,
    restored: Mutex<crate::protocol::RestoreStatus>,
    /// What auto-capture did, when its watcher runs (see [`Context::auto_capture`]).
    auto_capture: crate::watch::Report,
}

impl Context {
    pub fn new(
        catalog: Catalog,
        instance: InstanceId,
        settings: Settings,
        open_kernel: KernelOpener,
    ) -> Context {
        Context {
            catalog,
            instance,
            settings: RwLock::new(settings),
            waiting: Mutex::new(BTreeMap::new()),
            kernel: Mutex::new(None),
            open_kernel,
            changes: Mutex::new(()),
            restored: Mutex::new(Default::default()),
            auto_capture: crate::watch::Report::default(),
        }
    }

    /// The auto-capture report `images` answers with: vmard hands it to the watcher it
    /// starts (`watch::start`), which fills it.
    pub fn auto_capture(&self) -> &crate::watch::Report {
        &self.auto_capture
    }

    pub fn settings(&self) -> Settings {
        self.settings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the settings (a configuration reload).
    pub fn set_settings(&self, settings: Settings) {
        *self.settings.write().unwrap_or_else(|p| p.into_inner()) = settings;
    }

    /// The kernel, opened on first use.
    pub fn kernel(&self) -> Result<Arc<dyn Kernel>> {
        let mut kernel = self.kernel.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = &*kernel {
            return Ok(Arc::clone(k));
        }
        let k = (self.open_kernel)()?;
        *kernel = Some(Arc::clone(&k));
        Ok(k)
    }

    /// Serialises device changes and the catalog changes that affect devices.
    pub fn changes(&self) -> MutexGuard<'_, ()> {
        self.changes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Brings the kernel in line with the saved devices (see [`device::restore`]), and keeps
    /// the outcome for `restore-status`, `metrics` and the reasons `list` gives.
    pub fn restore(&self) -> Result<crate::protocol::RestoreReport> {
        let outcome = self.restore_devices();
        *self.restored.lock().unwrap_or_else(|p| p.into_inner()) = crate::protocol::RestoreStatus {
            ran: true,
            at: Some(crate::time::now_secs()),
            report: outcome.as_ref().ok().cloned(),
            error: outcome.as_ref().err().map(ToString::to_string),
        };
        outcome
    }

    fn restore_devices(&self) -> Result<crate::protocol::RestoreReport> {
        let _changes = self.changes();
        let kernel = match self.kernel() {
            Ok(kernel) => kernel,
            // No device-mapper and nothing to restore: a host that only captures.
            Err(_) if self.catalog.devices()?.is_empty() => {
                return Ok(crate::protocol::RestoreReport::default());
            }
            Err(e) => return Err(e),
        };
        let report = device::restore(
            &self.catalog,
            kernel.as_ref(),
            &self.instance,
            self.settings().max_targets,
        )?;
        self.set_waiting(&report);
        crate::guard::poke();
        release_holds(&self.catalog);
        Ok(report)
    }

    /// Tries again the saved devices the last restore could not serve (their image root was
    /// missing, or a file in it), and only those: a device restored meanwhile, or changed by
    /// an administrator since, is left as it is.
    pub fn retry(&self) -> Result<crate::protocol::RestoreReport> {
        let _changes = self.changes();
        let names: Vec<String> = self.waiting().into_keys().collect();
        if names.is_empty() {
            return Ok(crate::protocol::RestoreReport::default());
        }
        let kernel = self.kernel()?;
        let report = device::retry(
            &self.catalog,
            kernel.as_ref(),
            &self.instance,
            &names,
            self.settings().max_targets,
        )?;
        self.set_waiting(&report);
        Ok(report)
    }

    /// Saved devices not restored yet, with the reason (a record removed since is not).
    pub fn waiting(&self) -> BTreeMap<String, String> {
        let mut waiting = self
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        waiting.retain(|name, _| matches!(self.catalog.device(name), Ok(Some(_))));
        waiting
    }

    fn set_waiting(&self, report: &crate::protocol::RestoreReport) {
        let failed = report
            .failed
            .iter()
            .filter(|(name, _)| !name.starts_with('('))
            .cloned()
            .collect();
        *self.waiting.lock().unwrap_or_else(|p| p.into_inner()) = failed;
    }

    /// Checks the images that live devices read and applies the policy to the devices of
    /// changed ones (see [`crate::guard`]), serialised with device changes.
    pub fn check_images(
        &self,
        probe: &mut crate::guard::Probe,
    ) -> Result<crate::guard::CheckReport> {
        let kernel = match self.kernel() {
            Ok(kernel) => kernel,
            Err(_) if self.catalog.devices()?.is_empty() => {
                return Ok(crate::guard::CheckReport::default());
            }
            Err(e) => return Err(e),
        };
        let _changes = self.changes();
        crate::guard::check(
            &self.catalog,
            kernel.as_ref(),
            probe,
            crate::guard::settings(),
        )
    }

    /// What the restore at start did.
    pub fn restore_status(&self) -> crate::protocol::RestoreStatus {
        self.restored
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Adds to `status` why it is not active, where vmard knows.
    fn explain(&self, status: &mut DeviceStatus) {
        if status.state != "missing" || status.reason.is_some() {
            return;
        }
        let restored = self.restore_status();
        let failed = restored
            .report
            .iter()
            .flat_map(|r| &r.failed)
            .find(|(name, _)| *name == status.name);
        status.reason = Some(match (failed, &restored.error, restored.ran) {
            (Some((_, why)), _, _) => format!("the restore at vmard's start failed: {why}"),
            (None, Some(why), _) => format!("devices were not restored at vmard's start: {why}"),
            (None, None, false) => {
                "vmard started with --no-restore; restart it to create the device".to_string()
            }
            (None, None, true) => "saved, but not in the kernel: removed outside vmar since \
                 vmard started (dmsetup remove?); restart vmard to create it again"
                .to_string(),
        });
    }
}

/// What the prefetch recorder needs of vmard (see [`prefetch::start_recorder`]).
impl prefetch::Host for Context {
    fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    fn kernel(&self) -> Result<Arc<dyn Kernel>> {
        Context::kernel(self)
    }

    fn serialise(&self) -> Box<dyn prefetch::Held + '_> {
        Box::new(self.changes())
    }
}

/// Holds, in the background, the images captured before vmar held its images (see
/// [`crate::holds::hold_older_images`]): each is hashed once, which a start must not wait for.
pub fn hold_older_images(ctx: Arc<Context>) {
    let spawned = std::thread::Builder::new()
        .name("vmard-holds".into())
        .spawn(
            move || match crate::holds::hold_older_images(&ctx.catalog, || ctx.changes()) {
                Ok(0) => {}
                Ok(held) => {
                    tracing::info!(held, "images captured before holds existed are held now")
                }
                Err(e) => tracing::warn!("older images not held: {e}"),
            },
        );
    if let Err(e) = spawned {
        tracing::warn!("older images not held: {e}");
    }
}

fn to_value(result: impl Serialize) -> Result<serde_json::Value> {
    serde_json::to_value(result).map_err(|e| Error::internal(format!("cannot encode reply: {e}")))
}

/// Runs the handler of one request and encodes its result. The handler's result must be the
/// request's [`Call::Reply`], the type clients decode it as.
fn answer<C: Call>(request: C, handler: impl FnOnce(C) -> Result<C::Reply>) -> Result<Value> {
    to_value(handler(request)?)
}

/// Carries out one request. `progress` receives byte progress of long operations.
pub fn handle(
    ctx: &Context,
    request: Request,
    progress: &mut dyn FnMut(Progress),
) -> Result<Value> {
    let catalog = &ctx.catalog;
    let settings = ctx.settings();
    let max_targets = settings.max_targets;
    match request {
        Request::Ping => answer(request::Ping, |_| ping(ctx, &settings)),
        Request::Check => answer(request::Check, |_| check(ctx, &settings)),
        Request::Capture(r) => answer(r, |r| capture(ctx, &settings, r, progress)),
        Request::Images => answer(request::Images, |_| images(ctx)),
        Request::Map(r) => answer(r, |r| map(catalog, r)),
        Request::Table(r) => answer(r, |r| table_of(catalog, &r.name, &r.devices)),
        Request::Verify(r) => answer(r, |r| verify(catalog, &r.name, progress)),
        Request::Forget(r) => answer(r, |r| forget(ctx, r)),
        Request::Create(r) => answer(r, |r| create(ctx, &settings, r, progress)),
        Request::Ensure(r) => answer(r, |r| ensure(ctx, &settings, r, progress)),
        Request::Remove(r) => answer(r, |r| remove(ctx, r)),
        Request::List => answer(request::List, |_| list(ctx, max_targets)),
        Request::Status(r) => answer(r, |r| status(ctx, r, max_targets)),
        Request::Refresh(r) => answer(r, |r| refresh(ctx, r, max_targets)),
        Request::Stats(r) => answer(r, |r| {
            device::stats(catalog, ctx.kernel()?.as_ref(), r.name.as_ref())
        }),
        Request::Metrics => answer(request::Metrics, |_| {
            Ok(MetricsResult {
                text: crate::metrics::render(&snapshot(ctx)?),
            })
        }),
        Request::Dependents(r) => answer(r, |r| dependents(catalog, &r.name)),
        Request::RestoreStatus => answer(request::RestoreStatus, |_| Ok(ctx.restore_status())),
        Request::Bindings => answer(request::Bindings, |_| crate::binding::list(catalog)),
        Request::Record(r) => answer(r, |r| record(ctx, r)),
        Request::WorkingSet(r) => answer(r, |r| prefetch::show(catalog, &r.name, r.extents)),
        Request::ForgetWorkingSet(r) => answer(r, |r| {
            Ok(ForgetWorkingSetResult {
                forgotten: prefetch::forget(catalog, &r.name, r.phase.as_deref())?,
            })
        }),
        Request::Warm(r) => answer(r, |r| {
            prefetch::warm(
                catalog,
                &r.names,
                r.phase.as_deref(),
                max_targets,
                r.cancel,
                progress,
            )
        }),
    }
}

// One handler per request whose work is more than a call: each takes its request and
// returns its reply type (`C::Reply` of its [`Call`]), so `handle` above only dispatches.

fn ping(ctx: &Context, settings: &Settings) -> Result<PingResult> {
    Ok(PingResult {
        version: env!("CARGO_PKG_VERSION").to_string(),
        protocol: PROTOCOL_VERSION,
        state_dir: ctx.catalog.dir().to_path_buf(),
        instance: Some(ctx.instance.to_string()),
        roots: settings.roots.health(),
        waiting: ctx.waiting(),
    })
}

fn check(ctx: &Context, settings: &Settings) -> Result<<request::Check as Call>::Reply> {
    crate::check::check(
        &ctx.catalog,
        ctx.kernel().ok().as_deref(),
        &ctx.instance,
        &settings.roots,
        settings.max_targets,
        &ctx.waiting(),
    )
}

fn capture(
    ctx: &Context,
    settings: &Settings,
    r: request::Capture,
    progress: &mut dyn FnMut(Progress),
) -> Result<CaptureResult> {
    let catalog = &ctx.catalog;
    let started = Instant::now();
    let mut image = open_image(catalog, settings, &r.path, r.force_raw)?;
    // Re-capture rewrites maps that devices may use: checked and done under the lock.
    let _changes = r.recapture.then(|| ctx.changes());
    let pending = crate::holds::prepare_capture(catalog, &mut image, r.recapture)?;
    let captured = catalog.capture_changing(&image, r.name.as_deref(), r.recapture, progress);
    crate::holds::finish_capture(catalog, pending, &image);
    let captured = captured?;
    crate::watch::captured(catalog.dir(), &captured.record, ctx.auto_capture());
    Ok(CaptureResult {
        status: captured.status,
        image: captured.record,
        seconds: started.elapsed().as_secs_f64(),
        changed: captured.changed,
        sidecar: captured.sidecar,
    })
}

fn images(ctx: &Context) -> Result<ImagesResult> {
    let images = ctx.catalog.images()?;
    let files = crate::holds::file_states(&ctx.catalog, &images)?;
    Ok(ImagesResult {
        images: images
            .into_iter()
            .zip(files)
            .map(|(record, file)| ImageEntry {
                record,
                file: Some(file),
            })
            .collect(),
        auto_capture: ctx.auto_capture.snapshot(),
    })
}

fn map(catalog: &Catalog, r: request::Map) -> Result<MapResult> {
    let (record, map) = catalog.map(&r.name)?;
    let sources = catalog.sources_of(&record, &map)?;
    let references = map
        .referenced_images()
        .into_iter()
        .filter_map(|id| {
            let name = sources.get(&id)?.name.clone();
            Some(ImageRef { id, name })
        })
        .collect();
    Ok(MapResult {
        name: record.name,
        size: record.size,
        summary: record.summary,
        references,
        extents: r.extents.then_some(map.extents),
    })
}

fn forget(ctx: &Context, r: request::Forget) -> Result<ForgetResult> {
    let catalog = &ctx.catalog;
    let _changes = ctx.changes();
    if let Ok(kernel) = ctx.kernel() {
        device::prune(catalog, kernel.as_ref())?;
    }
    let (image, changed) = catalog.forget(&r.name)?;
    release_holds(catalog);
    crate::watch::forgotten(catalog.dir(), &image);
    Ok(ForgetResult { image, changed })
}

fn create(
    ctx: &Context,
    settings: &Settings,
    r: request::Create,
    progress: &mut dyn FnMut(Progress),
) -> Result<<request::Create as Call>::Reply> {
    let catalog = &ctx.catalog;
    let image = device_image(
        ctx,
        settings,
        &r.image,
        r.options.capture,
        r.options.force_raw,
        progress,
    )?;
    let kernel = ctx.kernel()?;
    let created = {
        let _changes = ctx.changes();
        binding::create(
            catalog,
            kernel.as_ref(),
            &ctx.instance,
            &r.name,
            &image,
            settings.max_targets,
            r.options.rebind,
        )
    };
    // Answered once the guard refuses writes to the images the new device reads.
    crate::guard::sync();
    let created = created?;
    prefetch::after_device(catalog, &r.name, settings.max_targets);
    Ok(created)
}

fn ensure(
    ctx: &Context,
    settings: &Settings,
    r: request::Ensure,
    progress: &mut dyn FnMut(Progress),
) -> Result<<request::Ensure as Call>::Reply> {
    let catalog = &ctx.catalog;
    let image = match &r.image {
        Some(image) => Some(device_image(
            ctx,
            settings,
            image,
            r.options.capture,
            r.options.force_raw,
            progress,
        )?),
        None => None,
    };
    let kernel = ctx.kernel()?;
    let ensured = {
        let _changes = ctx.changes();
        binding::ensure(
            catalog,
            kernel.as_ref(),
            &ctx.instance,
            &r.name,
            image.as_deref(),
            settings.max_targets,
            r.options.rebind,
        )
    };
    crate::guard::sync();
    let ensured = ensured?;
    prefetch::after_device(catalog, &r.name, settings.max_targets);
    Ok(ensured)
}

fn remove(ctx: &Context, r: request::Remove) -> Result<<request::Remove as Call>::Reply> {
    let catalog = &ctx.catalog;
    let kernel = ctx.kernel()?;
    let removed = {
        let _changes = ctx.changes();
        let removed = device::remove(catalog, kernel.as_ref(), &ctx.instance, &r.name, r.deferred)?;
        release_holds(catalog);
        removed
    };
    // Answered once the guard no longer refuses writes to images nothing reads now.
    crate::guard::sync();
    Ok(removed)
}

fn list(ctx: &Context, max_targets: u64) -> Result<<request::List as Call>::Reply> {
    let mut devices = device::list(
        &ctx.catalog,
        ctx.kernel()?.as_ref(),
        &ctx.instance,
        max_targets,
    )?;
    devices.iter_mut().for_each(|d| ctx.explain(d));
    Ok(devices)
}

fn status(
    ctx: &Context,
    r: request::Status,
    max_targets: u64,
) -> Result<<request::Status as Call>::Reply> {
    let mut status = device::status(
        &ctx.catalog,
        ctx.kernel()?.as_ref(),
        &ctx.instance,
        &r.name,
        max_targets,
        r.table,
    )?;
    ctx.explain(&mut status);
    Ok(status)
}

fn refresh(
    ctx: &Context,
    r: request::Refresh,
    max_targets: u64,
) -> Result<<request::Refresh as Call>::Reply> {
    let kernel = ctx.kernel()?;
    let refreshed = {
        let _changes = ctx.changes();
        device::refresh(
            &ctx.catalog,
            kernel.as_ref(),
            &ctx.instance,
            &r.name,
            max_targets,
        )
    };
    crate::guard::sync();
    refreshed
}

fn record(ctx: &Context, r: request::Record) -> Result<<request::Record as Call>::Reply> {
    let kernel = ctx.kernel()?;
    let phase = r.phase.as_deref().unwrap_or(crate::workset::DEFAULT_PHASE);
    let _changes = ctx.changes();
    prefetch::record(&ctx.catalog, kernel.as_ref(), &r.name, phase, r.replace)
}

/// The devices and maps that read image `name`.
fn dependents(catalog: &Catalog, name: &str) -> Result<Dependents> {
    let image = catalog.image(name)?.name;
    let devices = catalog
        .devices_reading()?
        .into_iter()
        .filter(|(_, _, read)| read.contains(&image))
        .map(|(device, serves, _)| Dependent {
            node: crate::kernel::node_path(&device).display().to_string(),
            name: device,
            serves,
        })
        .collect();
    let images = catalog
        .redirecting_to(&image)?
        .into_iter()
        .map(|(name, blocks)| Redirecting { name, blocks })
        .collect();
    Ok(Dependents {
        image,
        devices,
        images,
    })
}

/// What the metrics are made of. Without a kernel (a host that only captures) the device
/// figures are left out, the rest is still reported.
fn snapshot(ctx: &Context) -> Result<crate::metrics::Snapshot> {
    let catalog = &ctx.catalog;
    let max_targets = ctx.settings().max_targets;
    let (devices, stats) = match ctx.kernel() {
        Ok(kernel) => {
            let mut devices = device::list(catalog, kernel.as_ref(), &ctx.instance, max_targets)?;
            devices.iter_mut().for_each(|d| ctx.explain(d));
            let stats = match device::stats(catalog, kernel.as_ref(), None) {
                Ok(stats) => Some(stats),
                Err(e) => {
                    tracing::warn!("metrics without read statistics: {e}");
                    None
                }
            };
            (devices, stats)
        }
        Err(_) => (Vec::new(), None),
    };
    let images = catalog
        .images()?
        .into_iter()
        .map(|record| {
            let missing = std::fs::symlink_metadata(&record.path).is_err();
            let changed = !missing
                && matches!(
                    crate::image::open_unchanged(&record.name, &record.path, &record.identity),
                    Err(Error::ImageChanged { .. })
                );
            crate::metrics::ImageHealth {
                shared: record.summary.bytes_shared,
                name: record.name,
                size: record.size,
                missing,
                changed,
            }
        })
        .collect();
    Ok(crate::metrics::Snapshot {
        devices,
        stats,
        images,
        catalog_bytes: [
            crate::catalog::CATALOG_FILE,
            crate::catalog::INDEX_DIR,
            "backup",
        ]
        .iter()
        .map(|entry| tree_bytes(&catalog.dir().join(entry)))
        .sum(),
        restore: ctx.restore_status(),
    })
}

/// Bytes of file `path`, or of the files in directory `path` and below (images kept in the
/// state directory are not under the paths asked about).
fn tree_bytes(path: &Path) -> u64 {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_file() => m.len(),
        Ok(m) if m.is_dir() => std::fs::read_dir(path).map_or(0, |entries| {
            entries.flatten().map(|e| tree_bytes(&e.path())).sum()
        }),
        _ => 0,
    }
}

/// Releases the holds nothing needs any more (see [`crate::holds::release_unneeded`]); a
/// failure is logged: the change that asked for it is done.
fn release_holds(catalog: &Catalog) {
    if let Err(e) = crate::holds::release_unneeded(catalog) {
        tracing::warn!("holds not released: {e}");
    }
}

/// Opens an image to capture: absolute, inside the image roots (vmar's own hold is the one
/// extra link allowed), raw unless forced.
/// The captured image a device is to serve: `image` captured first when `capture` and it
/// is a path (`create --capture`, `ensure --capture`), else the image it names.
fn device_image(
    ctx: &Context,
    settings: &Settings,
    image: &str,
    capture: bool,
    force_raw: bool,
    progress: &mut dyn FnMut(Progress),
) -> Result<String> {
    if capture && image.starts_with('/') {
        capture_held(ctx, settings, Path::new(image), force_raw, progress)
    } else {
        device::image_name(&ctx.catalog, &settings.roots, image)
    }
}

/// Captures the image at `path` for a device (`create --capture`, `ensure --capture`), with
/// vmar's hold made before its identity is taken; returns its name.
fn capture_held(
    ctx: &Context,
    settings: &Settings,
    path: &Path,
    force_raw: bool,
    progress: &mut dyn FnMut(Progress),
) -> Result<String> {
    let catalog = &ctx.catalog;
    let mut file = open_image(catalog, settings, path, force_raw)?;
    let pending = crate::holds::prepare_capture(catalog, &mut file, false)?;
    let captured = catalog.capture(&file, None, false, progress);
    crate::holds::finish_capture(catalog, pending, &file);
    let record = captured?.0;
    crate::watch::captured(catalog.dir(), &record, ctx.auto_capture());
    Ok(record.name)
}

fn open_image(
    catalog: &Catalog,
    settings: &Settings,
    path: &Path,
    force_raw: bool,
) -> Result<crate::image::ImageFile> {
    if !path.is_absolute() {
        return Err(Error::Protocol(format!(
            "image path {} must be absolute",
            crate::error::shorten(&path.display().to_string())
        )));
    }
    let holds = crate::holds::Holds::of(catalog.dir());
    let image = settings.roots.open_held(path, Some(&holds))?;
    if !force_raw {
        image.check_raw()?;
    }
    Ok(image)
}

/// The table of image `name`, with devices named in `devices` (by image name) or
/// `loop:NAME` placeholders.
fn table_of(
    catalog: &Catalog,
    name: &str,
    devices: &BTreeMap<String, String>,
) -> Result<TableResult> {
    let (record, map) = catalog.map(name)?;
    let sources = catalog.sources_of(&record, &map)?;
    let mut by_id = BTreeMap::new();
    for (image, device) in devices {
        let Some((id, _)) = sources.iter().find(|(_, r)| &r.name == image) else {
            return Err(Error::Protocol(format!(
                "--device {}={}: the table of {name} does not read image {}; it reads {}",
                crate::error::shorten(image),
                crate::error::shorten(device),
                crate::error::shorten(image),
                sources
                    .values()
                    .map(|r| r.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        };
        let dev: BlockDev = device.parse().ok().filter(is_device).ok_or_else(|| {
            Error::Protocol(format!(
                "device {:?} must be a /dev path or MAJOR:MINOR",
                crate::error::shorten(device)
            ))
        })?;
        by_id.insert(*id, dev);
    }
    let device_of = |id| {
        by_id.get(&id).cloned().unwrap_or_else(|| {
            let image = sources.get(&id).map_or("unknown", |r| r.name.as_str());
            BlockDev::Named(format!("loop:{image}"))
        })
    };
    let targets = table::build(&map, record.size, device_of);
    let text = table::to_text(&targets);
    Ok(TableResult {
        name: record.name,
        targets,
        text,
    })
}

fn is_device(device: &BlockDev) -> bool {
    match device {
        BlockDev::Number { .. } => true,
        BlockDev::Named(path) => Path::new(path).starts_with("/dev/"),
    }
}
