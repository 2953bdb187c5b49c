//! vmarctl's prefetch commands: record, working-set, warm (see `vmar::prefetch`).

use std::io::Write;

use anyhow::Result;
use clap::Subcommand;
use indicatif::HumanBytes;
use vmar::prefetch::{RecordResult, SetSummary, WarmReport, WorkingSetResult};
use vmar::protocol::Request;

use super::{Ctx, device_arg, print_json, show};

#[derive(Subcommand, Debug)]
pub enum Prefetch {
    /// Record what a live device read into its image's boot working set: the blocks of its
    /// dm-stats areas with reads whose pages are in the page cache now. Run it once the VM
    /// has booted (or let vmard do it: `record_after` in vmar.toml); later recordings of
    /// the same phase add to the set (union, at most 16,384 runs).
    Record {
        #[arg(value_parser = device_arg)]
        name: String,
        /// Phase label (a-z, 0-9, -, _): e.g. `boot`, then `app` once the application ran.
        #[arg(long, default_value = vmar::workset::DEFAULT_PHASE)]
        phase: String,
        /// Replace the phase's set instead of adding to it.
        #[arg(long)]
        replace: bool,
    },
    /// Show the working sets recorded for a device's (or an image's) image, by phase.
    WorkingSet {
        name: String,
        /// Also list each set's runs (first block, blocks).
        #[arg(long, conflicts_with = "forget")]
        extents: bool,
        /// Drop the sets instead (of --phase only, if given).
        #[arg(long)]
        forget: bool,
        #[arg(long, requires = "forget")]
        phase: Option<String>,
    },
    /// Read the working sets of devices or images into the page cache before their VMs
    /// start: the union of their canonical blocks, each once, less what is cached, in disk
    /// order, merged into large requests, in the idle I/O priority class. Ctrl-C
    /// stops it; `--cancel` stops every running warm (also the background ones of
    /// `prefetch = "create"`).
    Warm {
        #[arg(required_unless_present = "cancel", conflicts_with = "cancel")]
        names: Vec<String>,
        /// Only the sets of this phase [default: all].
        #[arg(long)]
        phase: Option<String>,
        #[arg(long)]
        cancel: bool,
    },
}

pub fn run(ctx: &Ctx, out: &mut dyn Write, command: &Prefetch) -> Result<()> {
    match command {
        Prefetch::Record {
            name,
            phase,
            replace,
        } => {
            let result: RecordResult = ctx.call(&Request::Record {
                name: name.clone(),
                phase: Some(phase.clone()),
                replace: *replace,
            })?;
            show(ctx.cli, out, &result, |out, r| {
                writeln!(
                    out,
                    "{}: recorded {} of image {} (phase {}): read areas {}, not cached {}",
                    r.device,
                    HumanBytes(r.recorded_bytes),
                    r.image,
                    r.set.phase,
                    HumanBytes(r.read_area_bytes),
                    HumanBytes(r.uncached_bytes)
                )?;
                set_line(out, &r.set)
            })
        }
        Prefetch::WorkingSet {
            name,
            extents,
            forget: true,
            phase,
        } => {
            let _ = extents;
            let result: serde_json::Value = ctx.call(&Request::ForgetWorkingSet {
                name: name.clone(),
                phase: phase.clone(),
            })?;
            show(ctx.cli, out, &result, |out, r| {
                writeln!(out, "forgot {} working set(s) of {name}", r["forgotten"])?;
                Ok(())
            })
        }
        Prefetch::WorkingSet {
            name,
            extents,
            forget: false,
            ..
        } => {
            let result: WorkingSetResult = ctx.call(&Request::WorkingSet {
                name: name.clone(),
                extents: *extents,
            })?;
            if ctx.cli.json {
                return print_json(out, &result);
            }
            if result.sets.is_empty() {
                writeln!(out, "{}: no working set recorded", result.image)?;
            }
            for set in &result.sets {
                write!(out, "{}: ", result.image)?;
                set_line(out, set)?;
                for [start, len] in set.extents.iter().flatten() {
                    writeln!(out, "  {start} +{len}")?;
                }
            }
            Ok(())
        }
        Prefetch::Warm {
            names,
            phase,
            cancel,
        } => {
            let request = Request::Warm {
                names: names.clone(),
                phase: phase.clone(),
                cancel: *cancel,
            };
            let report: WarmReport = ctx.call_with_progress(&request, "warm")?;
            show(ctx.cli, out, &report, |out, r| warm_text(out, r, *cancel))
        }
    }
}

fn set_line(out: &mut dyn Write, set: &SetSummary) -> Result<()> {
    writeln!(
        out,
        "phase {}: {} in {} runs, {} recording(s), last at {}",
        set.phase,
        HumanBytes(set.bytes),
        set.runs,
        set.recordings,
        set.updated
    )?;
    Ok(())
}

fn warm_text(out: &mut dyn Write, r: &WarmReport, cancel: bool) -> Result<()> {
    if cancel {
        writeln!(out, "stopped {} warm(s)", r.stopped)?;
        return Ok(());
    }
    for image in &r.images {
        if image.phases.is_empty() {
            writeln!(
                out,
                "{}: image {} has no working set (vmarctl record)",
                image.name, image.image
            )?;
        } else {
            writeln!(
                out,
                "{}: image {}, phases {}: {} ({} to read)",
                image.name,
                image.image,
                image.phases.join(","),
                HumanBytes(image.bytes),
                HumanBytes(image.canonical_bytes)
            )?;
        }
    }
    writeln!(
        out,
        "union {} (shared {}), cached {}; read {} in {} requests ({} of gaps), {} reads, {:.3} s{}",
        HumanBytes(r.union_bytes),
        HumanBytes(r.shared_bytes),
        HumanBytes(r.cached_bytes),
        HumanBytes(r.read_bytes),
        r.requests,
        HumanBytes(r.gap_bytes),
        r.reads,
        r.seconds,
        if r.cancelled { ", cancelled" } else { "" }
    )?;
    for e in &r.errors {
        writeln!(out, "error: {e}")?;
    }
    Ok(())
}
