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

use crate::catalog::Catalog;
use crate::device;
use crate::error::{Error, Result};
use crate::image::validate_name;
use crate::instance::InstanceId;
use crate::kernel::Kernel;
use crate::protocol::{
    CaptureResult, ForgetResult, ImageRef, ImagesResult, MapResult, PROTOCOL_VERSION, PingResult,
    Progress, Request, TableResult,
};
use crate::roots::ImageRoots;
use crate::table::{self, BlockDev};
use crate::verify::verify;

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
        }
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

    /// Brings the kernel in line with the saved devices (see [`device::restore`]).
    pub fn restore(&self) -> Result<crate::protocol::RestoreReport> {
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
}

fn to_value(result: impl Serialize) -> Result<serde_json::Value> {
    serde_json::to_value(result).map_err(|e| Error::Protocol(format!("cannot encode reply: {e}")))
}

/// Carries out one request. `progress` receives byte progress of long operations.
pub fn handle(
    ctx: &Context,
    request: Request,
    progress: &mut dyn FnMut(Progress),
) -> Result<serde_json::Value> {
    let catalog = &ctx.catalog;
    let settings = ctx.settings();
    let max_targets = settings.max_targets;
    match request {
        Request::Ping => to_value(PingResult {
            version: env!("CARGO_PKG_VERSION").to_string(),
            protocol: PROTOCOL_VERSION,
            state_dir: catalog.dir().to_path_buf(),
            instance: Some(ctx.instance.to_string()),
            roots: settings.roots.health(),
            waiting: ctx.waiting(),
        }),
        Request::Check => to_value(crate::check::check(
            catalog,
            ctx.kernel().ok().as_deref(),
            &ctx.instance,
            &settings.roots,
            max_targets,
            &ctx.waiting(),
        )?),
        Request::Capture {
            path,
            name,
            recapture,
            force_raw,
        } => {
            let started = Instant::now();
            let image = open_image(&settings, &path, force_raw)?;
            // Re-capture rewrites maps that devices may use: checked and done under the lock.
            let _changes = recapture.then(|| ctx.changes());
            let captured =
                catalog.capture_changing(&image, name.as_deref(), recapture, progress)?;
            to_value(CaptureResult {
                status: captured.status,
                image: captured.record,
                seconds: started.elapsed().as_secs_f64(),
                changed: captured.changed,
            })
        }
        Request::Images => to_value(ImagesResult {
            images: catalog.images()?,
            auto_capture: crate::watch::report(),
        }),
        Request::Map { name, extents } => {
            validate_name(&name)?;
            let (record, map) = catalog.map(&name)?;
            let sources = catalog.sources_of(&record, &map)?;
            let references = map
                .referenced_images()
                .into_iter()
                .filter_map(|id| {
                    let name = sources.get(&id)?.name.clone();
                    Some(ImageRef { id, name })
                })
                .collect();
            to_value(MapResult {
                name: record.name,
                size: record.size,
                summary: record.summary,
                references,
                extents: extents.then_some(map.extents),
            })
        }
        Request::Table { name, devices } => {
            validate_name(&name)?;
            to_value(table_of(catalog, &name, &devices)?)
        }
        Request::Verify { name } => {
            validate_name(&name)?;
            to_value(verify(catalog, &name, progress)?)
        }
        Request::Forget { name } => {
            validate_name(&name)?;
            let _changes = ctx.changes();
            if let Ok(kernel) = ctx.kernel() {
                device::prune(catalog, kernel.as_ref())?;
            }
            let (image, changed) = catalog.forget(&name)?;
            to_value(ForgetResult { image, changed })
        }
        Request::Create {
            name,
            image,
            capture,
            force_raw,
        } => {
            validate_name(&name)?;
            let image = if capture && image.starts_with('/') {
                let file = open_image(&settings, Path::new(&image), force_raw)?;
                catalog.capture(&file, None, false, progress)?.0.name
            } else {
                device::image_name(catalog, &settings.roots, &image)?
            };
            let kernel = ctx.kernel()?;
            let _changes = ctx.changes();
            to_value(device::create(
                catalog,
                kernel.as_ref(),
                &ctx.instance,
                &name,
                &image,
                max_targets,
            )?)
        }
        Request::Remove { name, deferred } => {
            let kernel = kernel_for(ctx, Some(&name))?;
            let _changes = ctx.changes();
            to_value(device::remove(
                catalog,
                kernel.as_ref(),
                &ctx.instance,
                &name,
                deferred,
            )?)
        }
        Request::List => to_value(device::list(
            catalog,
            ctx.kernel()?.as_ref(),
            &ctx.instance,
            max_targets,
        )?),
        Request::Status { name, table } => to_value(device::status(
            catalog,
            kernel_for(ctx, Some(&name))?.as_ref(),
            &ctx.instance,
            &name,
            max_targets,
            table,
        )?),
        Request::Refresh { name } => {
            let kernel = kernel_for(ctx, Some(&name))?;
            let _changes = ctx.changes();
            to_value(device::refresh(
                catalog,
                kernel.as_ref(),
                &ctx.instance,
                &name,
                max_targets,
            )?)
        }
        Request::Stats { name } => to_value(device::stats(
            catalog,
            kernel_for(ctx, name.as_deref())?.as_ref(),
            name.as_deref(),
        )?),
    }
}

/// The kernel for a request about device `name`, once the name is known to be valid: a bad
/// name is a bad request whatever the host has.
fn kernel_for(ctx: &Context, name: Option<&str>) -> Result<Arc<dyn Kernel>> {
    if let Some(name) = name {
        validate_name(name)?;
    }
    ctx.kernel()
}

/// Opens an image to capture: absolute, inside the image roots, raw unless forced.
fn open_image(
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
    let image = settings.roots.open(path)?;
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
