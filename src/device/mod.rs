//! vmar devices: what `create`, `refresh`, `remove`, `list`, `status`, `stats` and the
//! start-up `restore` do. A device serves one captured image through a read-only dm table
//! over read-only, buffered loop devices of that image and of the images holding its
//! canonical blocks. All kernel work goes through [`crate::kernel::Kernel`]; this module
//! plans it and keeps the catalog's record and the kernel in step.
//!
//! Crash safety: the catalog record is written before the kernel is changed (`creating`,
//! `removing`), and marked done after. Whatever step a crash interrupts, [`restore`] at the
//! next start finishes or undoes it before anyone is served: a `creating` device is rolled
//! back, a `removing` one removed, a suspended one resumed, a table that is not the image's
//! current map replaced. The caller serialises all device changes (one at a time).
//!
//! One job per file: `plan.rs` (a device's table), `steps.rs` (the kernel steps changes are
//! made of: activate, swap, claim, dm-stats), `create.rs`, `refresh.rs`, `remove.rs`,
//! `restore.rs` (with unit tests on the in-memory kernel), `status.rs` (`list`, `status`),
//! `stats.rs` and `nodes.rs` (`/dev/vmar` nodes that name no live device, removed at start).

mod create;
pub mod nodes;
mod plan;
mod refresh;
mod remove;
mod restore;
mod stats;
mod status;
mod steps;

pub use create::{create, image_name};
pub use plan::{Plan, plan};
pub use refresh::refresh;
pub use remove::{prune, remove};
pub use restore::{restore, retry};
pub use stats::stats;
pub(crate) use status::status_of;
pub use status::{list, status};
pub(crate) use steps::swap;

/// Default most targets of one table: far below the kernel's 1,048,576, and still enough for
/// the maps of real multi-GiB images we measured (tens of thousands of extents).
pub const DEFAULT_MAX_TARGETS: u64 = 100_000;
