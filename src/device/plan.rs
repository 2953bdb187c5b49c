//! Planning a device's table: the image's map fitted into the target budget, over the loop
//! devices of the images it reads (attached or reused), refused or failed closed where an
//! image changed since capture; and what `status` compares live tables with.

use std::collections::BTreeMap;
use std::path::Path;

use crate::budget::{self, BudgetCost};
use crate::catalog::{Catalog, ImageRecord};
use crate::error::{Error, Result};
use crate::image::ImageIdentity;
use crate::kernel::{Kernel, LoopHold, LoopInfo};
use crate::map::{BlockMap, ImageId};
use crate::protocol::{DeviceChange, DeviceStatus};
use crate::table::{self, BlockDev, Target};

/// A table ready to load, with the loop devices it needs held open.
pub struct Plan {
    pub image: ImageRecord,
    pub targets: Vec<Target>,
    pub cost: BudgetCost,
    pub loops: BTreeMap<String, LoopHold>,
}

/// The loop device that serves the image at `path`, if one is attached as vmar needs it.
fn existing_loop(loops: &[LoopInfo], path: &Path, identity: &ImageIdentity) -> Option<LoopInfo> {
    loops.iter().find(|l| l.serves(path, identity)).cloned()
}

/// Plans the table of `image`: refuses it if the image or any image it reads from changed
/// since capture, fits the map into `max_targets`, attaches (or reuses) the loop devices.
pub fn plan(catalog: &Catalog, kernel: &dyn Kernel, image: &str, max_targets: u64) -> Result<Plan> {
    plan_with(catalog, kernel, image, max_targets, None).map(|(plan, _)| plan)
}

/// [`plan`] for a device vmar already serves, failing closed: with `tolerate`, images named
/// in it (found changed before) and images found changed now (written in place: the file
/// is still there) get no loop device, so their extents become `error` targets. Returns the
/// names of those images too.
pub(super) fn plan_with(
    catalog: &Catalog,
    kernel: &dyn Kernel,
    image: &str,
    max_targets: u64,
    tolerate: Option<&[String]>,
) -> Result<(Plan, Vec<String>)> {
    let (record, map) = catalog.map(image)?;
    let (map, cost) = budget::fit(&map, max_targets);
    let mut by_id = BTreeMap::new();
    let mut loops = BTreeMap::new();
    let attached = kernel.loops()?;
    let mut changed = Vec::new();
    for (id, other) in catalog.sources_of(&record, &map)? {
        if tolerate.is_some_and(|known| known.contains(&other.name)) {
            changed.push(other.name);
            continue;
        }
        // The captured file, or vmar's hold on it once its name is gone.
        let file = match crate::holds::open_captured(catalog, &other)
            .and_then(|file| crate::sample::check_block_image(catalog, &other).map(|()| file))
        {
            Ok(file) => file,
            Err(Error::ImageChanged { .. }) if tolerate.is_some() && other.path.exists() => {
                changed.push(other.name);
                continue;
            }
            Err(e) => return Err(e),
        };
        // Checked unchanged above, but read by no extent: no loop device (an autoclear one
        // would go as soon as this plan lets go of it).
        if id == record.id && !map.reads_own() {
            continue;
        }
        let mut hold = None;
        // An existing one may go away between the scan and the open (autoclear).
        if let Some(info) = existing_loop(&attached, &file.path, &file.identity) {
            hold = kernel.loop_hold(&info).ok();
        }
        let hold = match hold {
            Some(hold) => hold,
            None => kernel.loop_attach(&file)?,
        };
        by_id.insert(id, hold.info.block_dev());
        loops.insert(other.name, hold);
    }
    let targets = table::build_guarded(&map, record.size, |id| by_id.get(&id).cloned());
    let plan = Plan {
        image: record,
        targets,
        cost,
        loops,
    };
    Ok((plan, changed))
}

/// The table `image` would get now from the loop devices already attached, without
/// attaching any: `None` if one is missing. What `status` compares live tables with.
pub(super) fn expected(
    catalog: &Catalog,
    kernel: &dyn Kernel,
    image: &str,
    max_targets: u64,
) -> Result<Option<Vec<Target>>> {
    let (record, map) = catalog.map(image)?;
    let (map, _) = budget::fit(&map, max_targets);
    let loops = kernel.loops()?;
    let mut by_id: BTreeMap<ImageId, BlockDev> = BTreeMap::new();
    for (id, other) in catalog.sources_of(&record, &map)? {
        if id == record.id && !map.reads_own() {
            continue;
        }
        match existing_loop(&loops, &other.path, &other.identity) {
            Some(l) => by_id.insert(id, l.block_dev()),
            None => return Ok(None),
        };
    }
    Ok(Some(build_table(&map, record.size, &by_id)))
}

/// The table of `map` reading each image through the device `by_id` names for it.
fn build_table(map: &BlockMap, size: u64, by_id: &BTreeMap<ImageId, BlockDev>) -> Vec<Target> {
    table::build(map, size, |id| {
        by_id
            .get(&id)
            .cloned()
            .unwrap_or_else(|| BlockDev::Named(format!("missing-image-{id}")))
    })
}

pub(super) fn change(
    plan: &Plan,
    device: DeviceStatus,
    started: std::time::Instant,
) -> DeviceChange {
    DeviceChange {
        device,
        targets: plan.targets.len() as u64,
        budget: plan.cost,
        loops: plan
            .loops
            .iter()
            .map(|(name, l)| {
                (
                    name.clone(),
                    (l.info.node.display().to_string(), l.attached),
                )
            })
            .collect(),
        seconds: started.elapsed().as_secs_f64(),
    }
}
