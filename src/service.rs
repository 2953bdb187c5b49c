//! What vmard does for each request, independent of the socket: turns a [`Request`] into a
//! JSON result using the catalog. Kept apart from the server so it is tested without one.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use crate::catalog::{Catalog, Progress};
use crate::device;
use crate::error::{Error, Result};
use crate::image::validate_name;
use crate::protocol::{
    CaptureResult, ImageRef, ImagesResult, MapResult, PROTOCOL_VERSION, PingResult, Request,
    TableResult,
};
use crate::roots::ImageRoots;
use crate::table;
use crate::verify::verify;

/// What the service needs besides the request.
pub struct Context {
    pub catalog: Catalog,
    /// Most targets of one device table.
    pub max_targets: u64,
    /// Where images may be captured from.
    pub roots: ImageRoots,
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
    match request {
        Request::Ping => to_value(PingResult {
            version: env!("CARGO_PKG_VERSION").to_string(),
            protocol: PROTOCOL_VERSION,
            state_dir: catalog.dir().to_path_buf(),
        }),
        Request::Capture {
            path,
            name,
            recapture,
        } => {
            if !path.is_absolute() {
                return Err(Error::Protocol(format!(
                    "image path {} must be absolute",
                    path.display()
                )));
            }
            let started = Instant::now();
            let image = ctx.roots.open(&path)?;
            let (image, status) = catalog.capture(&image, name.as_deref(), recapture, progress)?;
            to_value(CaptureResult {
                status,
                image,
                seconds: started.elapsed().as_secs_f64(),
            })
        }
        Request::Images => to_value(ImagesResult {
            images: catalog.images()?,
        }),
        Request::Map { name, extents } => {
            validate_name(&name)?;
            let (record, map) = catalog.map(&name)?;
            let references = map
                .referenced_images()
                .into_iter()
                .map(|id| {
                    catalog
                        .image_by_id(id)
                        .map(|r| ImageRef { id, name: r.name })
                })
                .collect::<Result<_>>()?;
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
            to_value(catalog.forget(&name)?)
        }
        Request::Create {
            name,
            image,
            capture,
        } => {
            validate_name(&name)?;
            let image = if capture && image.starts_with('/') {
                let file = ctx.roots.open(Path::new(&image))?;
                catalog.capture(&file, None, false, progress)?.0.name
            } else {
                device::image_name(catalog, &image)?
            };
            to_value(device::create(catalog, &name, &image, ctx.max_targets)?)
        }
        Request::Remove { name, force } => to_value(device::remove(catalog, &name, force)?),
        Request::List => to_value(device::list(catalog, ctx.max_targets)?),
        Request::Status { name, table } => {
            let mut status = device::status(catalog, &name, ctx.max_targets)?;
            if table && status.live.is_some() {
                status.table = Some(device::live_table(&name)?);
            }
            to_value(status)
        }
        Request::Refresh { name } => to_value(device::refresh(catalog, &name, ctx.max_targets)?),
        Request::Stats { name } => to_value(device::stats(catalog, name.as_deref())?),
    }
}

/// The table of image `name`, with devices named in `devices` (by image name) or
/// `loop:NAME` placeholders.
fn table_of(
    catalog: &Catalog,
    name: &str,
    devices: &BTreeMap<String, String>,
) -> Result<TableResult> {
    for device in devices.values() {
        if device.is_empty() || device.contains(char::is_whitespace) || !is_device(device) {
            return Err(Error::Protocol(format!(
                "device {device:?} must be a /dev path or MAJOR:MINOR"
            )));
        }
    }
    let (record, map) = catalog.map(name)?;
    let mut names = BTreeMap::new();
    names.insert(record.id, record.name.clone());
    for id in map.referenced_images() {
        names.insert(id, catalog.image_by_id(id)?.name);
    }
    let device_of = |id| {
        let image = names.get(&id).map(String::as_str).unwrap_or("unknown");
        devices
            .get(image)
            .cloned()
            .unwrap_or_else(|| format!("loop:{image}"))
    };
    let targets = table::build(&map, record.size, device_of);
    let text = table::to_text(&targets);
    Ok(TableResult {
        name: record.name,
        targets,
        text,
    })
}

fn is_device(device: &str) -> bool {
    if let Some((major, minor)) = device.split_once(':') {
        return major.parse::<u32>().is_ok() && minor.parse::<u32>().is_ok();
    }
    Path::new(device).starts_with("/dev/")
}
