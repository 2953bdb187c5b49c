//! `stats`: read statistics, target counts and page-cache sharing of devices.

use std::collections::BTreeMap;
use std::path::Path;

use super::steps::stats_region;
use crate::catalog::Catalog;
use crate::error::{Error, Result};
use crate::kernel::{Kernel, LoopInfo};
use crate::name::DeviceName;
use crate::protocol::{DeviceStats, ImageCache, StatsReport};
use crate::stats::{self, ClassBytes, ReadBytes, TargetCounts};
use crate::table::{BlockDev, Target};
use crate::units::Sectors;

/// Read statistics, target counts and page-cache sharing of device `name`, or of all live
/// devices.
pub fn stats(
    catalog: &Catalog,
    kernel: &dyn Kernel,
    name: Option<&DeviceName>,
) -> Result<StatsReport> {
    let names: Vec<String> = match name {
        Some(name) => {
            if kernel.dm_info(name)?.is_none() {
                return Err(Error::UnknownDevice {
                    name: name.to_string(),
                });
            }
            vec![name.to_string()]
        }
        None => kernel.dm_list()?,
    };
    let loops = kernel.loops()?;
    let captured = catalog.images()?;
    let mut images: BTreeMap<BlockDev, (ImageCache, crate::kernel::Residency)> = BTreeMap::new();
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
        let table = kernel.dm_table(&name)?;
        for (source, _) in table.iter().filter_map(Target::linear_source) {
            if images.contains_key(source) {
                continue;
            }
            // A device that is not a loop device has no image file whose cache could be
            // counted; its reads are still counted.
            let Some(l) = loops.iter().find(|l| l.block_dev() == *source) else {
                continue;
            };
            // The catalog's name of the file: the kernel's may be from another mount
            // namespace (vmard's under systemd).
            let known = captured
                .iter()
                .find(|i| l.backs(&i.path, &i.identity))
                .map(|i| crate::holds::current_path(catalog, i));
            let Some(path) = known.or_else(|| l.backing.clone()) else {
                continue;
            };
            let path = &path;
            match image_cache(kernel, source, path) {
                Ok(cache) => {
                    images.insert(source.clone(), cache);
                }
                Err(e) => tracing::warn!("{name}: no page-cache figures for {source}: {e}"),
            }
        }
        let image = catalog.device(&name)?.map(|d| d.image);
        // Its own image's loop device, found by file identity: whether the page-cache figures
        // could be had or not, own extents are told from redirected ones.
        let own = match &image {
            Some(image) => {
                let record = catalog.image(image)?;
                loops
                    .iter()
                    .find(|l| l.backs(&record.path, &record.identity))
                    .map(LoopInfo::block_dev)
            }
            None => None,
        };
        let mapped = stats::classify(&table, own.as_ref());
        let mut cached = 0;
        for m in &mapped {
            if let Some((device, offset)) = &m.source
                && let Some((_, residency)) = images.get(device)
            {
                cached += stats::resident_bytes(
                    &residency.pages,
                    residency.page_size,
                    offset.bytes(),
                    m.len.bytes(),
                );
            }
        }
        let sectors = table.last().map_or(Sectors(0), Target::end);
        let region = stats_region(kernel, &name, sectors)?;
        let read = stats::attribute(&mapped, &kernel.stats_areas(&name, region.id)?);
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

/// Size of the image at `path`: a block device's is its device size (`st_size` is 0).
fn file_size(path: &Path) -> Result<u64> {
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::FileTypeExt;
    let meta = std::fs::metadata(path).map_err(|e| Error::io("cannot stat", path, e))?;
    if !meta.file_type().is_block_device() {
        return Ok(meta.len());
    }
    std::fs::File::open(path)
        .and_then(|mut f| f.seek(SeekFrom::End(0)))
        .map_err(|e| Error::io("cannot size", path, e))
}

/// The page-cache residency of image `path` (a file, or a block device whose own page cache
/// a buffered loop device reads through), read through loop device `device`.
fn image_cache(
    kernel: &dyn Kernel,
    device: &BlockDev,
    path: &Path,
) -> Result<(ImageCache, crate::kernel::Residency)> {
    let size = file_size(path)?;
    let residency = kernel.residency(path, size)?;
    Ok((
        ImageCache {
            cached: residency.cached_bytes(),
            path: path.display().to_string(),
            loop_device: device.to_string(),
            size,
        },
        residency,
    ))
}
